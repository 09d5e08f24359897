"""Backends that run one exported component: ``ort-cpu`` today."""

from __future__ import annotations

from pathlib import Path

from artrt.runtime.errors import InputError

from .base import Engine, TensorSpec

BACKENDS = ("ort-cpu",)


def resolve_backend(name: str) -> str:
    """Map ``auto`` to the fastest installed backend; reject unknown names."""
    if name == "auto":
        return "ort-cpu"
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    return name


def create_engine(backend: str, path: str | Path, name: str | None = None, **options: object) -> Engine:
    """Create (not yet activate) the engine for one component file."""
    backend = resolve_backend(backend)
    from .ort import OrtCpuEngine

    return OrtCpuEngine(path, name=name, **options)  # type: ignore[arg-type]


__all__ = ["BACKENDS", "Engine", "TensorSpec", "create_engine", "resolve_backend"]
