"""Tiled decoding: decode latents in overlapping tiles and blend them, so the decoder's working
memory is bounded by one tile instead of the whole image.

Tiles of ``tile`` latent pixels overlap by a quarter of a tile; inside an overlap the two tiles
are mixed with linear ramps (weights that sum to one), which hides the seams a decoder's
limited view of its neighbours would leave. Results differ slightly from an untiled decode:
``docs/requests.md`` has the measured PSNR.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``[0, size)``, neighbours overlapping by at
    least ``overlap`` (the last tile is moved back to end at ``size``)."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def ramp(length: int, before: int, after: int) -> np.ndarray:
    """Blend weights along one axis of a tile: linear ramps over the ``before`` and ``after`` pixels
    shared with the neighbouring tiles (0: an image border), 1 elsewhere; never 0."""
    weights = np.ones(length, np.float32)
    if before:
        weights[:before] = (np.arange(before, dtype=np.float32) + 0.5) / before
    if after:
        weights[length - after :] = np.minimum(weights[length - after :],
                                               (np.arange(after, 0, -1, dtype=np.float32) - 0.5) / after)
    return weights


def decode_tiled(
    decode: Callable[[np.ndarray], np.ndarray], latents: np.ndarray, tile: int, scale: int
) -> np.ndarray:
    """``decode`` applied tile by tile to ``latents`` ``[B, C, h, w]``; returns ``[B, 3, h*scale, w*scale]``.

    ``tile`` is the tile side in latent pixels; ``scale`` the decoder's upsampling factor.
    """
    batch, _, height, width = latents.shape
    if height <= tile and width <= tile:
        return decode(latents)
    overlap = tile // 4
    out = np.zeros((batch, 3, height * scale, width * scale), np.float32)
    total = np.zeros((height * scale, width * scale), np.float32)
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    for y in rows:
        for x in cols:
            th, tw = min(tile, height), min(tile, width)
            pixels = decode(np.ascontiguousarray(latents[:, :, y : y + th, x : x + tw]))
            wy = ramp(th * scale, *(n * scale for n in _shared(rows, y, th)))
            wx = ramp(tw * scale, *(n * scale for n in _shared(cols, x, tw)))
            weights = np.outer(wy, wx)
            ys, xs = slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale)
            out[:, :, ys, xs] += pixels * weights
            total[ys, xs] += weights
    return out / total


def _shared(starts: list[int], start: int, size: int) -> tuple[int, int]:
    """Pixels the tile at ``start`` shares with the tile before it and with the tile after it."""
    i = starts.index(start)
    before = starts[i - 1] + size - start if i > 0 else 0
    after = start + size - starts[i + 1] if i + 1 < len(starts) else 0
    return max(0, before), max(0, after)
