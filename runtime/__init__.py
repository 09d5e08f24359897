"""Torch-free runtime core: package loading, schedules, the sampling loop, images (CLI in ``cli``).

``Pipeline`` and ``GenerationResult`` are imported on first use, so importing a
submodule (``artrt.runtime.package``) stays cheap. The errors live in ``artrt.errors``.
"""

from typing import Any

from artrt.errors import ArtrtError, ConfigError, EngineError, InputError, PackageError

__all__ = ["ArtrtError", "ConfigError", "EngineError", "GenerationResult", "InputError", "Lora", "PackageError",
           "Pipeline"]


def __getattr__(name: str) -> Any:
    if name in ("Pipeline", "GenerationResult"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "Lora":
        from .lora import Lora

        return Lora
    raise AttributeError(f"module 'artrt.runtime' has no attribute {name!r}")
