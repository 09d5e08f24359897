"""What a component's largest attention costs, recorded at export for the runtime's memory estimate.

ONNX Runtime on the CPU materializes each attention's scores, ``[batch, heads, tokens, tokens]``
floats, so a request's memory grows with the square of its pixels; the runtime cannot see that
from the graph alone. Export records, per component, the attention with the largest scores per
latent pixel squared: its heads and its stride on the package's latent grid (tokens =
``ceil(h / stride) * ceil(w / stride)``, times the latent frames where attention spans frames).
:func:`artrt.runtime.budget.attention_bytes` turns that into bytes.
"""

from __future__ import annotations

from typing import Any

from artrt.runtime.package import Attention


def _largest(blocks: list[tuple[int, int]], frames: bool = False) -> Attention | None:
    """The (heads, stride) with the most score bytes per token-count squared (heads / stride**4)."""
    if not blocks:
        return None
    heads, stride = max(blocks, key=lambda b: b[0] / b[1] ** 4)
    return Attention(heads=int(heads), stride=int(stride), frames=frames)


def unet_attention(config: Any, patch: int = 1) -> Attention | None:
    """A diffusers ``UNet2DConditionModel``: every cross-attention down block and the mid block
    (their self-attention over ``h*w`` tokens; ``patch``: the expert's space-to-depth factor)."""
    types = list(config.down_block_types)
    heads = config.num_attention_heads or config.attention_head_dim  # diffusers' legacy naming
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(types)
    blocks = [(heads[i], patch * 2**i) for i, kind in enumerate(types) if "CrossAttn" in kind]
    if "CrossAttn" in str(getattr(config, "mid_block_type", "UNetMidBlock2DCrossAttn")):
        blocks.append((heads[-1], patch * 2 ** (len(types) - 1)))
    return _largest(blocks)


def wan_transformer_attention(config: Any) -> Attention:
    """A ``WanTransformer3DModel``: self-attention over every patch of every latent frame."""
    _, ph, pw = config.patch_size
    return Attention(heads=int(config.num_attention_heads), stride=int(ph), frames=True)


def vae_attention(config: Any) -> Attention | None:
    """A VAE decoder's mid-block self-attention: one head over the latent grid, frame by frame."""
    if getattr(config, "mid_block_add_attention", True) is False:
        return None
    return Attention(heads=1, stride=1, frames=False)
