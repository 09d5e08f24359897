"""The Wan VAE decoder as two ONNX graphs with its causal feature cache as explicit tensors.

diffusers' ``AutoencoderKLWan.decode`` runs ``post_quant_conv`` and then the decoder one latent
frame at a time. Every causal conv of the decoder keeps the last ``CACHE_T = 2`` frames of its
input (``feat_cache``) for the next frame, and each temporal upsampler (``upsample3d``) skips its
``time_conv`` on the first frame (the ``"Rep"`` marker). Latent frame 0 decodes to 1 video frame,
every later one to 4. A graph traced on the whole latent video would hold one frame count; these
graphs each decode one latent frame, so a runtime decodes any length by calling them in turn:

- ``decoder_first``: ``latents`` (latent frame 0) → ``video`` (1 frame) and every ``next_cache_*``;
- ``decoder_chunk``: ``latents`` (one later latent frame) and every ``cache_*`` → ``video``
  (4 frames) and every ``next_cache_*``.

Cache ``k`` is ``[B, C_k, 2, h·s_k, w·s_k]`` for latents ``[B, 16, 1, h, w]`` (``C_k`` and the spatial
scale ``s_k`` ∈ {1, 2, 4, 8} are fixed by the VAE config; :func:`cache_specs`). Every cache is carried
in this 2-frame form, zero-filled where diffusers starts from nothing, so one rule holds for each conv:
its input is ``cat(cache, x)`` along time and its next cache is the last 2 frames of that. For the
first frame this equals diffusers' zero padding (a missing cache) and its 1-frame caches; the
``"Rep"`` entries of the temporal upsamplers come out of ``decoder_first`` as zeros, which is what
diffusers' second frame uses (``time_conv`` with zero padding, then ``cat(zeros, x)`` as the cache).

Both graphs include ``WanPipeline``'s de-normalisation (``latents / (1 / latents_std) + latents_mean``,
in the VAE's dtype) and the final ``clamp(-1, 1)``: ``video`` is what ``vae.decode`` returns for the
pipeline's latents. The pipeline's postprocess (``video / 2 + 0.5``, clamp to [0, 1]) is the runtime's.

:func:`prepare_vae` swaps the ``nearest-exact`` 2× upsamplers, which the TorchScript exporter cannot
export (``aten::_upsample_nearest_exact2d``), for plain ``nearest`` ones (equal for a scale of 2).
:func:`decode_frames` is the executable specification of the runtime's decode loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from artrt.runtime.video import (  # noqa: F401  (decode_frames: the runtime's loop, re-exported for tests)
    FRAMES_PER_CHUNK,
    LATENTS,
    VIDEO,
    Runner,
    cache_name,
    decode_frames,
    next_cache_name,
)

from .onnx_io import check_onnx, export_onnx

CACHE_T = 2  # frames per cache (diffusers' CACHE_T)
FIRST = "decoder_first"
CHUNK = "decoder_chunk"
TOLERANCE = 1e-4  # max abs error of fp32 ONNX vs PyTorch (the video is in [-1, 1])
LATENT_AXES = {0: "batch", 3: "latent_height", 4: "latent_width"}
VIDEO_AXES = {0: "batch", 3: "height", 4: "width"}


# --- export preparation ---------------------------------------------------------------------------

class NearestUpsample2x(nn.Module):
    """2× spatial nearest upsampling in ``mode="nearest"``, in fp32 and cast back as ``WanUpsample``.

    For an integer scale of 2 this is ``nearest-exact``: output pixel ``i`` reads source
    ``floor((i + 0.5) / 2) = floor(i / 2)`` under both rules. The TorchScript exporter has a
    symbolic for ``nearest`` (ONNX ``Resize``, asymmetric coordinates, floor) and none for
    ``aten::_upsample_nearest_exact2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest").type_as(x)


def replace_upsamplers(module: nn.Module) -> int:
    """Swap every diffusers ``WanUpsample`` (2× ``nearest-exact``) inside ``module`` for a
    :class:`NearestUpsample2x`, in place; returns how many were swapped. Any other upsampler
    raises ``NotImplementedError`` (the equality holds for a scale of exactly 2)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanUpsample

    swaps = [(parent, name, child) for parent in module.modules()
             for name, child in parent.named_children() if isinstance(child, WanUpsample)]
    for parent, name, child in swaps:
        scale = child.scale_factor if isinstance(child.scale_factor, tuple) else (child.scale_factor,) * 2
        if child.mode not in ("nearest-exact", "nearest") or tuple(float(s) for s in scale) != (2.0, 2.0):
            raise NotImplementedError(f"WanUpsample(mode={child.mode!r}, scale_factor={child.scale_factor})")
        setattr(parent, name, NearestUpsample2x())
    return len(swaps)


class ExportAttentionBlock(nn.Module):
    """diffusers' ``WanAttentionBlock`` (single-head spatial self-attention per frame) with the same
    modules and values, but ``x[:, 0]`` for its ``x.squeeze(1)``: the TorchScript exporter cannot
    tell that the head axis after ``scaled_dot_product_attention`` is 1 and writes the squeeze as an
    ONNX ``If`` whose branches differ in rank, which TensorRT cannot build."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm, self.to_qkv, self.proj = block.norm, block.to_qkv, block.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        batch_size, channels, time, height, width = x.size()
        x = x.permute(0, 2, 1, 3, 4).reshape(batch_size * time, channels, height, width)
        x = self.norm(x)
        qkv = self.to_qkv(x).reshape(batch_size * time, 1, channels * 3, -1)
        q, k, v = qkv.permute(0, 1, 3, 2).contiguous().chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x[:, 0].permute(0, 2, 1).reshape(batch_size * time, channels, height, width)
        x = self.proj(x)
        x = x.view(batch_size, time, channels, height, width).permute(0, 2, 1, 3, 4)
        return x + identity


def replace_attention_blocks(module: nn.Module) -> int:
    """Swap every diffusers ``WanAttentionBlock`` inside ``module`` for an :class:`ExportAttentionBlock`
    sharing its weights (in place); returns how many were swapped."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock

    swaps = [(parent, name, child) for parent in module.modules()
             for name, child in parent.named_children() if isinstance(child, WanAttentionBlock)]
    for parent, name, child in swaps:
        setattr(parent, name, ExportAttentionBlock(child))
    return len(swaps)


def prepare_vae(vae: nn.Module) -> nn.Module:
    """Make an ``AutoencoderKLWan`` exportable (in place, same values): :func:`replace_upsamplers`
    and :func:`replace_attention_blocks`. Tiling and slicing are turned off (the graphs decode
    whole frames; batch is a graph axis)."""
    replace_upsamplers(vae)
    replace_attention_blocks(vae)
    vae.use_tiling = False
    vae.use_slicing = False
    return vae.eval()


# --- the two graphs -------------------------------------------------------------------------------

class _WanDecoderGraph(nn.Module):
    """De-normalisation, ``post_quant_conv`` and the decoder on one latent frame, as diffusers'
    ``AutoencoderKLWan._decode`` runs it, with the feature cache in and out as 2-frame tensors."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        config = vae.config
        self.vae = vae
        self.patch_size = config.patch_size  # Wan 2.2 TI2V-5B's VAE: the decoder's output is patchified
        dtype = next(vae.parameters()).dtype
        z = config.z_dim
        # WanPipeline: latents_std = 1.0 / tensor(latents_std); latents = latents / latents_std + latents_mean
        # (float32 tensors cast to the VAE's dtype, as the pipeline casts them to the latents' dtype).
        self.register_buffer("inverse_std", (1.0 / torch.tensor(config.latents_std)).view(1, z, 1, 1, 1).to(dtype))
        self.register_buffer("mean", torch.tensor(config.latents_mean).view(1, z, 1, 1, 1).to(dtype))
        self.conv_num = sum(isinstance(m, type(vae.post_quant_conv)) for m in vae.decoder.modules())

    def _decode(self, latents: torch.Tensor, caches: Sequence[torch.Tensor] | None
                ) -> tuple[torch.Tensor, list[Any]]:
        z = latents.to(self.inverse_std.dtype) / self.inverse_std + self.mean
        x = self.vae.post_quant_conv(z)
        first = caches is None
        feat_cache: list[Any] = [None] * self.conv_num if first else [*caches, *[None] * (self.conv_num - len(caches))]
        feat_idx = [0]
        out = self.vae.decoder(x, feat_cache=feat_cache, feat_idx=feat_idx, first_chunk=first)
        if not first and feat_idx[0] != len(caches):
            raise RuntimeError(f"the decoder used {feat_idx[0]} caches, {len(caches)} were given")
        if self.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=self.patch_size)
        return torch.clamp(out, min=-1.0, max=1.0).float(), feat_cache[: feat_idx[0]]


class WanDecoderFirst(_WanDecoderGraph):
    """``decoder_first``: ``latents [B, 16, 1, h, w]`` (latent frame 0, as the sampler leaves it) →
    ``video [B, 3, 1, 8h, 8w]`` in [-1, 1] and every cache ``[B, C_k, 2, ·, ·]``.

    diffusers' first frame leaves 1-frame caches (the conv input) and ``"Rep"`` for each temporal
    upsampler; here the former are zero-padded in front to 2 frames and the latter are zeros of the
    upsampler's input shape, both what diffusers' second frame computes with."""

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rep_inputs: list[torch.Tensor] = []
        hooks = [m.register_forward_pre_hook(lambda _m, args: rep_inputs.append(args[0]))
                 for m in self.vae.decoder.modules() if getattr(m, "mode", None) == "upsample3d"]
        try:
            video, feat_cache = self._decode(latents, None)
        finally:
            for h in hooks:
                h.remove()
        reps = iter(rep_inputs)
        caches = []
        for entry in feat_cache:
            if isinstance(entry, str):  # "Rep": the upsampler's time_conv has not run yet
                x = next(reps)
                caches.append(torch.zeros_like(x).repeat(1, 1, CACHE_T, 1, 1))
            else:  # the conv's 1-frame input; a missing frame is a zero frame (diffusers' padding)
                caches.append(torch.cat([torch.zeros_like(entry)] * (CACHE_T - entry.shape[2]) + [entry], 2))
        return (video, *caches)


class WanDecoderChunk(_WanDecoderGraph):
    """``decoder_chunk``: ``latents [B, 16, 1, h, w]`` (one latent frame after the first) and every
    ``cache_k`` → ``video [B, 3, 4, 8h, 8w]`` in [-1, 1] and every ``next_cache_k``.

    diffusers' own decoder runs with the cache list filled with the input tensors: each causal conv
    reads ``cat(cache, x)`` with no padding left, each temporal upsampler takes a tensor cache
    (not ``"Rep"``), and each next cache is the last two frames of ``cat(cache, x)``."""

    def forward(self, latents: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        video, feat_cache = self._decode(latents, list(caches))
        return (video, *feat_cache)


# --- cache layout ---------------------------------------------------------------------------------

def _layout(vae: nn.Module) -> tuple[int, list[dict[str, int]]]:
    """Video channels, and channels and spatial scale of each cache: :class:`WanDecoderFirst` run
    once on a 1×1 latent frame (prepared or not, either works)."""
    first = WanDecoderFirst(vae).eval()
    with torch.no_grad():
        video, *caches = first(torch.zeros(1, vae.config.z_dim, 1, 1, 1))
    return int(video.shape[1]), [{"channels": int(c.shape[1]), "scale": int(c.shape[3])} for c in caches]


def cache_specs(vae: nn.Module) -> list[dict[str, int]]:
    """Channels and spatial scale (relative to the latents) of each cache, in cache order."""
    return _layout(vae)[1]


def cache_axes(specs: Sequence[Mapping[str, int]]) -> list[dict[int, str]]:
    """Dynamic axes of each cache: batch, and height/width named by their scale to the latents."""
    def name(axis: str, scale: int) -> str:
        return f"latent_{axis}" if scale == 1 else f"latent_{axis}_x{scale}"

    return [{0: "batch", 3: name("height", s["scale"]), 4: name("width", s["scale"])} for s in specs]


def first_inputs(batch: int, height: int, width: int, channels: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of ``decoder_first``: fp32 latents of scale 1, as the sampler gives them."""
    g = torch.Generator().manual_seed(seed)
    return {LATENTS: torch.randn(batch, channels, 1, height, width, generator=g)}


def chunk_inputs(specs: Sequence[Mapping[str, int]], batch: int, height: int, width: int, channels: int = 16,
                 seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random inputs of ``decoder_chunk``: fp32 latents and every cache in ``dtype`` (the VAE's),
    random so that each reaches the outputs."""
    g = torch.Generator().manual_seed(seed)
    inputs = {LATENTS: torch.randn(batch, channels, 1, height, width, generator=g)}
    for k, s in enumerate(specs):
        shape = (batch, s["channels"], CACHE_T, height * s["scale"], width * s["scale"])
        inputs[cache_name(k)] = torch.randn(shape, generator=g)
    return {k: v if k == LATENTS else v.to(dtype) for k, v in inputs.items()}


# --- export ---------------------------------------------------------------------------------------

def declare_output_shapes(path: Path, shapes: Mapping[str, Sequence[int | str]]) -> None:
    """Write the true shapes (fixed sizes as numbers, axes by name) on the graph outputs of ``path``.

    The TorchScript exporter's shape inference loses most fixed sizes of these outputs (cache
    channels and frames become ``Concat…_dim_1`` names) and labels the video's frame axis
    ``batch``, which is wrong for any batch but 1. Only the declarations change."""
    import onnx

    from .onnx_files import write_graph

    model = onnx.load(str(path), load_external_data=False)
    for value in model.graph.output:
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in shapes[value.name]:
            dim = dims.add()
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = int(size)
    write_graph(model, path)


def export_wan_decoder(vae: nn.Module, out_dir: str | Path, trace_size: tuple[int, int] = (4, 6),
                       checks: Sequence[tuple[int, int, int]] = ((1, 6, 4), (2, 3, 5)),
                       tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Write ``decoder_first.onnx`` and ``decoder_chunk.onnx`` for an ``AutoencoderKLWan`` (prepared
    in place by :func:`prepare_vae`) into ``out_dir``.

    Both are traced at batch 1 and latent ``trace_size`` (h, w), then checked with ONNX Runtime
    (CPU) against the PyTorch modules on each ``(batch, h, w)`` of ``checks`` (an ``ExportError``
    past ``tolerance``). Returns the layout a runtime needs: ``paths``, the ``inputs``/``outputs``
    names of each graph, ``caches`` (channels and spatial scale per cache), ``cache_dtype`` (the
    VAE's; latents in and video out are fp32), ``frames`` (video frames per call),
    ``scale`` (spatial, 8) and ``errors`` (max abs error per output of each check)."""
    out_dir = Path(out_dir)
    prepare_vae(vae)
    video_channels, specs = _layout(vae)
    axes = cache_axes(specs)
    n = len(specs)
    dtype, z = next(vae.parameters()).dtype, int(vae.config.z_dim)
    first, chunk = WanDecoderFirst(vae).eval(), WanDecoderChunk(vae).eval()
    outputs = [VIDEO, *(next_cache_name(k) for k in range(n))]
    chunk_names = [LATENTS, *(cache_name(k) for k in range(n))]
    out_axes = {VIDEO: VIDEO_AXES} | {next_cache_name(k): axes[k] for k in range(n)}
    paths = {FIRST: out_dir / f"{FIRST}.onnx", CHUNK: out_dir / f"{CHUNK}.onnx"}
    h, w = trace_size
    export_onnx(first, first_inputs(1, h, w, channels=z), outputs, {LATENTS: LATENT_AXES} | out_axes,
                paths[FIRST])
    export_onnx(chunk, chunk_inputs(specs, 1, h, w, channels=z, dtype=dtype), outputs,
                {LATENTS: LATENT_AXES} | {cache_name(k): axes[k] for k in range(n)} | out_axes, paths[CHUNK])
    cache_shapes = {next_cache_name(k): ["batch", s["channels"], CACHE_T, axes[k][3], axes[k][4]]
                    for k, s in enumerate(specs)}
    for name, frames in ((FIRST, 1), (CHUNK, FRAMES_PER_CHUNK)):
        video = ["batch", video_channels, frames, VIDEO_AXES[3], VIDEO_AXES[4]]
        declare_output_shapes(paths[name], {VIDEO: video} | cache_shapes)
    errors = {FIRST: [], CHUNK: []}
    for i, (b, ch, cw) in enumerate(checks):
        feeds = {FIRST: first_inputs(b, ch, cw, channels=z, seed=i + 1),
                 CHUNK: chunk_inputs(specs, b, ch, cw, channels=z, seed=i + 1, dtype=dtype)}
        for name, module in ((FIRST, first), (CHUNK, chunk)):
            errors[name].append(check_onnx(module, feeds[name], outputs, paths[name], tolerance))
    return {
        "paths": paths,
        "inputs": {FIRST: [LATENTS], CHUNK: chunk_names},
        "outputs": {FIRST: outputs, CHUNK: outputs},
        "caches": specs,
        "cache_dtype": str(dtype).removeprefix("torch."),
        "frames": {FIRST: 1, CHUNK: FRAMES_PER_CHUNK},
        "scale": int(vae.config.scale_factor_spatial or 8),
        "errors": errors,
    }


# --- the runtime's decode loop (executable specification) -----------------------------------------

def ort_runner(path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Runner:
    """A :data:`Runner` over an ONNX Runtime session of ``path``: named inputs → named outputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=list(providers))
    names = [o.name for o in session.get_outputs()]

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, dict(feeds))))

    run.session = session  # type: ignore[attr-defined]
    return run
