"""Image output: arrays to PIL images, PNG files with the generation parameters."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from artrt.errors import InputError
from artrt.files import write_atomic

PNG_KEY = "parameters"


def to_pil(images: np.ndarray, pixel_space: bool = False) -> list[Image.Image]:
    """``[B, 3, H, W]`` floats in [0, 1] (or [-1, 1] when ``pixel_space``) to RGB images."""
    if pixel_space:
        images = images / 2 + 0.5
    images = np.clip(images, 0.0, 1.0).transpose(0, 2, 3, 1)
    return [Image.fromarray(np.round(image * 255).astype(np.uint8)) for image in images]


def save_png(image: Image.Image, path: str | Path, parameters: dict[str, Any]) -> Path:
    """Write ``image`` as PNG with ``parameters`` as JSON in a ``parameters`` text chunk.

    The file appears atomically (temporary file + rename).
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"output {path} must end in .png")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: directory {path.parent} does not exist")
    data = encode_png(image, parameters)
    return write_atomic(path, data)


def encode_png(image: Image.Image, parameters: dict[str, Any]) -> bytes:
    """PNG bytes of ``image`` with ``parameters`` as JSON in a ``parameters`` text chunk."""
    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(parameters, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_parameters(path: str | Path) -> dict[str, Any]:
    """The generation parameters stored in a PNG written by :func:`save_png`."""
    with Image.open(path) as image:
        return json.loads(image.info[PNG_KEY])
