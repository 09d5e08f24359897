"""Per-expert conditioning inputs built from text-encoder outputs (SDXL rules).

Batches are ordered ``[unconditional x B, conditional x B]`` as in diffusers. An
empty negative prompt gives zeros to experts whose pipeline sets
``force_zeros_for_empty_prompt`` (the SDXL base) and the encoded empty string to the
others (the SDXL refiner).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from artrt.errors import PackageError

from .package import Conditioning


@dataclass(frozen=True)
class EncodedText:
    """One text encoder's outputs for ``[negative, prompt]`` (batch of 2)."""

    hidden_states: np.ndarray  # [2, tokens, width]
    pooled: np.ndarray | None  # [2, width] or None


def time_ids(cond: Conditioning, height: int, width: int) -> tuple[list[float], list[float]]:
    """SDXL micro-conditioning for (negative, positive): sizes, crop, target or aesthetic score."""
    size = [float(height), float(width), 0.0, 0.0]
    if cond.time_ids == "aesthetic":
        return size + [cond.negative_aesthetic_score], size + [cond.aesthetic_score]
    return size + [float(height), float(width)], size + [float(height), float(width)]


def build_conditioning(
    cond: Conditioning,
    encoded: dict[str, EncodedText],
    empty_negative: bool,
    batch: int,
    height: int,
    width: int,
) -> dict[str, np.ndarray]:
    """The fused step's conditioning inputs for one expert, ``2 * batch`` rows each."""
    hidden = np.concatenate([encoded[name].hidden_states for name in cond.text_encoders], axis=-1)
    hidden = hidden.astype(np.float32, copy=True)
    zero = empty_negative and cond.zero_negative_when_empty
    if zero:
        hidden[0] = 0.0
    feeds = {"encoder_hidden_states": np.repeat(hidden, batch, axis=0)}
    if cond.pooled is not None:
        pooled = encoded[cond.pooled].pooled
        if pooled is None:
            raise PackageError(f"the manifest takes pooled text embeddings from {cond.pooled}, whose graph has "
                               "no 'pooled' output")
        pooled = pooled.astype(np.float32, copy=True)
        if zero:
            pooled[0] = 0.0
        feeds["text_embeds"] = np.repeat(pooled, batch, axis=0)
    if cond.time_ids is not None:
        negative, positive = time_ids(cond, height, width)
        feeds["time_ids"] = np.repeat(np.array([negative, positive], dtype=np.float32), batch, axis=0)
    return feeds
