"""The Wan 2.2 graphs: the flow-matching fused step of one expert and the UMT5 text encoder.

- :class:`WanFlowStepGraph`: one sampling step of a ``WanTransformer3DModel`` expert with
  classifier-free guidance and the extended (UniPC predictor-corrector) update of
  docs/wan-design.md, line for line as ``artrt.runtime.flow.flow_step``.
- :func:`text_encoder_graph`: UMT5's last hidden state as ``WanPipeline`` uses it (padding
  masked out of attention and its states zeroed).
- :func:`prepare_transformer`: makes a transformer exportable by the TorchScript exporter
  (``torch.onnx.export(dynamo=False)``), which has no symbolic for ``aten::rms_norm``.

:func:`export_wan_step` and :func:`export_wan_text_encoder` write and check the ONNX files
(ONNX Runtime CPU against the PyTorch module, on shapes other than the traced ones).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .graphs import STEP_SCALARS, TextEncoderGraph
from .onnx_io import check_onnx, export_onnx

# Column order of the flow step's ``step`` input; must match artrt.runtime.flow.FLOW_STEP_SCALARS.
FLOW_STEP_SCALARS = (*STEP_SCALARS, "ca", "cp", "cb", "cc")

STEP_INPUTS = ("sample", "sample_prev", "denoised_prev", "noise", "step", "encoder_hidden_states")
STEP_OUTPUTS = ("next_sample", "denoised", "corrected")
LATENT_NAMES = ("sample", "sample_prev", "denoised_prev", "noise", *STEP_OUTPUTS)
# [B, 16, F, h, w] latents; [2B, L, D] conditioning (uncond half first).
LATENT_AXES = {0: "batch", 2: "latent_frames", 3: "latent_height", 4: "latent_width"}
COND_AXES = {0: "cond_batch", 1: "text_length"}
TEXT_AXES = {0: "batch", 1: "text_length"}
TOLERANCE = 1e-4  # max abs error of fp32 ONNX vs PyTorch, relative to max(1, |output|)


class ManualRMSNorm(nn.Module):
    """``torch.nn.RMSNorm`` in plain ops (pow, mean, rsqrt, mul): in fp32 for fp16/bf16 inputs,
    weight included, then cast to the input dtype (bit for bit what torch 2.13 computes on the CPU)."""

    def __init__(self, norm: nn.RMSNorm) -> None:
        super().__init__()
        self.dims = tuple(range(-len(norm.normalized_shape), 0))
        self.eps = norm.eps
        self.weight = norm.weight  # shared, not copied (None without elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        out = x32 * torch.rsqrt(x32.pow(2).mean(self.dims, keepdim=True) + eps)
        if self.weight is not None:
            out = out * self.weight.to(out.dtype)
        return out.to(x.dtype)


def replace_rms_norms(module: nn.Module) -> int:
    """Swap every ``torch.nn.RMSNorm`` inside ``module`` for a :class:`ManualRMSNorm` sharing its
    weight (in place); returns how many were swapped. The TorchScript ONNX exporter (opset ≤ 20)
    has no symbolic for ``aten::rms_norm``; ONNX's RMSNormalization needs opset 23."""
    swaps = [(parent, name, child) for parent in module.modules()
             for name, child in parent.named_children() if isinstance(child, nn.RMSNorm)]
    for parent, name, child in swaps:
        setattr(parent, name, ManualRMSNorm(child))
    return len(swaps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan rotary embedding without its in-place strided writes (``out[..., 0::2] = …``),
    which the TorchScript exporter turns into Expands of the traced shape: the two halves are
    interleaved by stack + flatten instead (the same values, element for element)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).type_as(x)


class ExportAttnProcessor:
    """``WanAttnProcessor`` (text-to-video: no image keys) with :func:`_rotate` as its rotary step."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if attn.add_k_proj is not None:
            raise NotImplementedError("image-conditioned Wan attention (I2V) is not exported")
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (v.unflatten(2, (attn.heads, -1)) for v in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                              is_causal=False)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def prepare_transformer(transformer: nn.Module) -> nn.Module:
    """Make a ``WanTransformer3DModel`` exportable by the TorchScript exporter, in place: manual
    RMSNorms (:func:`replace_rms_norms`) and an attention processor whose rotary step traces with
    dynamic shapes (:class:`ExportAttnProcessor`). Both compute the same values as diffusers'.
    (The rotary tables are float32 already: ``get_1d_rotary_pos_embed`` computes them in float64
    and returns them as float32, so the graph has no float64 arithmetic, which TensorRT lacks.)
    """
    replace_rms_norms(transformer)
    for module in transformer.modules():
        if hasattr(module, "set_processor") and hasattr(module, "norm_q"):  # WanAttention
            module.set_processor(ExportAttnProcessor())
    return transformer


class WanFlowStepGraph(nn.Module):
    """One flow step of a Wan expert: ``(sample, sample_prev, denoised_prev, noise, step,
    encoder_hidden_states) -> (next_sample, denoised, corrected)``.

    ``step`` holds 13 scalars in :data:`FLOW_STEP_SCALARS` order. ``encoder_hidden_states`` is
    ``[2B, L, D]``, the unconditional half first. The transformer runs in its own dtype on
    ``c_in·sample`` duplicated; guidance, the x₀ estimate and both updates run in fp32 in
    ``runtime/flow.py``'s ``flow_step`` order::

        F  = F_u + g·(F_c − F_u);  D = c_skip·x + c_out·F
        x̂  = ca·x + cp·sample_prev + cb·D + cc·denoised_prev
        x' = a·x̂ + b·D + c·denoised_prev + d·noise
    """

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(
        self,
        sample: torch.Tensor,
        sample_prev: torch.Tensor,
        denoised_prev: torch.Tensor,
        noise: torch.Tensor,
        step: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c_in, t, c_skip, c_out, guidance, a, b, c, d, ca, cp, cb, cc = step.unbind(0)
        net_dtype = next(self.transformer.parameters()).dtype
        x_in = (c_in * sample).to(net_dtype)
        x_in = torch.cat([x_in, x_in])
        out = self.transformer(
            hidden_states=x_in,
            timestep=t.expand(x_in.shape[0]),  # fp32: the sinusoidal embedding casts it to float itself
            encoder_hidden_states=encoder_hidden_states.to(net_dtype),
            return_dict=False,
        )[0].float().reshape(x_in.shape)  # static channels in the graph's output shapes (unpatchify loses them)
        uncond, cond = out.chunk(2)
        guided = uncond + guidance * (cond - uncond)
        denoised = c_skip * sample + c_out * guided
        corrected = ca * sample + cp * sample_prev + cb * denoised + cc * denoised_prev
        next_sample = a * corrected + b * denoised + c * denoised_prev + d * noise
        return next_sample, denoised, corrected


def text_encoder_graph(encoder: nn.Module, pad_token_id: int | None = None) -> TextEncoderGraph:
    """UMT5's ``last_hidden_state`` as ``WanPipeline._get_t5_prompt_embeds`` uses it: attention mask
    = (ids != pad), states past the prompt zeroed. The graph takes ``input_ids`` only.

    diffusers takes the tokenizer's mask, which is the same for every prompt whose text does not
    itself contain the literal pad token (``<pad>``, id 0)."""
    pad = encoder.config.pad_token_id if pad_token_id is None else pad_token_id
    return TextEncoderGraph(encoder, hidden_layer=None, pooled=False, mask_pad_id=int(pad)).eval()


def step_inputs(batch: int, frames: int, height: int, width: int, text_length: int, text_dim: int,
                seed: int = 0, channels: int = 16, step: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Random inputs of :class:`WanFlowStepGraph` (latent ``frames``/``height``/``width``), and a
    ``step`` row with every coefficient non-zero (so each input reaches the outputs)."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, channels, frames, height, width)
    latents = {n: torch.randn(shape, generator=g) for n in ("sample", "sample_prev", "denoised_prev", "noise")}
    row = step if step is not None else (1.0, 875.0, 1.0, -0.9, 4.0, 0.9, 0.1, -0.05, 0.2, 1.1, -0.3, 0.2, -0.1)
    return {**latents, "step": torch.tensor(row, dtype=torch.float32),
            "encoder_hidden_states": torch.randn(2 * batch, text_length, text_dim, generator=g)}


def export_wan_step(transformer: nn.Module, path: Path, trace: Mapping[str, torch.Tensor],
                    checks: Sequence[Mapping[str, torch.Tensor]], tolerance: float = TOLERANCE
                    ) -> tuple[WanFlowStepGraph, list[dict[str, float]]]:
    """Export ``transformer`` (prepared in place) as a :class:`WanFlowStepGraph` traced on ``trace``
    to ``path``, then check the file on each of ``checks``; returns the module and the max abs
    errors per output of each check (an ``ExportError`` past ``tolerance``)."""
    graph = WanFlowStepGraph(prepare_transformer(transformer)).eval()
    axes = {n: LATENT_AXES for n in LATENT_NAMES} | {"encoder_hidden_states": COND_AXES}
    export_onnx(graph, trace, STEP_OUTPUTS, axes, path)
    return graph, [check_onnx(graph, inputs, STEP_OUTPUTS, path, tolerance) for inputs in checks]


def token_ids(batch: int, length: int, vocab: int, pad_id: int, seed: int = 0) -> torch.Tensor:
    """Random ids whose rows end in padding of different lengths (row r keeps length // (r + 2)
    tokens), with no pad id inside a prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), dtype=torch.int64, generator=g)
    ids[ids == pad_id] = (pad_id + 1) % vocab
    for row in range(batch):
        ids[row, max(1, length // (row + 2)):] = pad_id
    return ids


def export_wan_text_encoder(encoder: nn.Module, path: Path, trace: torch.Tensor,
                            checks: Sequence[torch.Tensor], tolerance: float = TOLERANCE
                            ) -> tuple[TextEncoderGraph, list[dict[str, float]]]:
    """Export UMT5 (:func:`text_encoder_graph`) traced on ids ``trace`` to ``path`` with dynamic
    batch and length, and check it on each id tensor of ``checks``."""
    graph = text_encoder_graph(encoder)
    axes = {"input_ids": TEXT_AXES, "hidden_states": TEXT_AXES}
    export_onnx(graph, {"input_ids": trace}, ["hidden_states"], axes, path)
    errors = [check_onnx(graph, {"input_ids": ids}, ["hidden_states"], path, tolerance) for ids in checks]
    return graph, errors
