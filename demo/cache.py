"""The embedded shapes model as a package: exported once into a cache, then loaded (``artrt demo``).

The weights ship inside the distribution (``artrt/demo/weights``); the package exported from
them lives in ``$ARTRT_CACHE`` (default ``~/.cache/artrt``) under a name derived from the
weights' sha256 and the artrt version, so new weights or a new artrt export afresh. The first
export needs the ``demo`` extra (torch, diffusers, the MiniLM text encoder); later runs only
load the cached package (torch-free).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from PIL import Image

import artrt
from artrt.errors import InputError
from artrt.runtime.package import MANIFEST_NAME, sha256_file

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


def fingerprint(weights: Path) -> str:
    """12 hex digits naming the weights' contents and this artrt version."""
    digest = hashlib.sha256(artrt.__version__.encode())
    files = sorted(p for p in weights.rglob("*") if p.is_file() and p.suffix in {".json", ".safetensors"})
    if not files:
        raise InputError(f"no demo weights in {weights}; reinstall artrt")
    for path in files:
        digest.update(f"{path.relative_to(weights)}:{sha256_file(path)}".encode())
    return digest.hexdigest()[:12]


def demo_package(weights: Path | None = None, cache: Path | None = None) -> Path:
    """The exported demo package, exporting it first when the cache has none for these weights."""
    weights = weights or weights_dir()
    path = (cache or cache_root()) / f"demo-{fingerprint(weights)}"
    if (path / MANIFEST_NAME).is_file():
        return path
    try:
        from artrt.export.shapes_demo import export_demo
    except ImportError as exc:
        raise InputError(f"the first demo run exports the model and needs the 'demo' extra "
                         f"(pip install 'artrt[demo]'): {exc}") from None
    log.info("first run: exporting the demo model to %s (once; about a minute on 2 cores)", path)
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    export_demo(path, weights, overwrite=True)
    log.info("demo model exported in %.0f s", time.perf_counter() - started)
    return path


def upscale(image: Image.Image, factor: int) -> Image.Image:
    """Nearest-neighbour enlargement for viewing (no new detail is invented)."""
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)
