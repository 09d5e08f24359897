"""Names for the demo weights' contents: what the shipped package was exported from, and the cache key.

Torch-free and free of artrt's export side, so both ``artrt.demo.cache`` (the runtime) and
``artrt.export.shapes_demo`` (the export) use it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import artrt
from artrt.errors import InputError
from artrt.runtime.package import sha256_file


def _weight_files(weights: Path) -> list[Path]:
    files = sorted(p for p in weights.rglob("*") if p.is_file() and p.suffix in {".json", ".safetensors"})
    if not files:
        raise InputError(f"no demo weights in {weights}; reinstall artrt")
    return files


def weights_digest(weights: Path) -> str:
    """sha256 over the weights' files (names and contents): the shipped package records the one it
    was exported from (``source.weights_sha256``)."""
    return _digest(weights)


def fingerprint(weights: Path) -> str:
    """12 hex digits naming the weights' contents and this artrt version."""
    return _digest(weights, artrt.__version__.encode())[:12]


def _digest(weights: Path, prefix: bytes = b"") -> str:
    digest = hashlib.sha256(prefix)
    for path in _weight_files(weights):
        digest.update(f"{path.relative_to(weights)}:{sha256_file(path)}".encode())
    return digest.hexdigest()
