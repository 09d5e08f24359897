"""Fuse a component's ONNX graph for ONNX Runtime's CUDA execution provider.

:func:`optimize_for_cuda` runs the ``onnxruntime.transformers`` offline fusions
(python pattern matching only: ``opt_level=0``, so ONNX Runtime's own graph optimizer
still runs when the session loads). The fused graph holds ``com.microsoft`` contrib ops
(``NhwcConv``, ``BiasSplitGelu``, ``BiasAdd``, ``SkipLayerNormalization``, ...) whose
kernels and layouts are chosen for the CUDA EP: **a fused file runs only on the EP it
was made for** (``ort-cuda``); ORT CPU keeps the plain fp32 ONNX.

The input is the exporter's graph as it is: fp16 graphs are already half precision
(traced from the half module) and are not converted again, so the fused step keeps its
fp32 latents, ``step`` scalars and sampler update; the check after fusing refuses a
result whose input or output names or dtypes changed. This module imports no torch
(only onnx and onnxruntime).

What the fusions do here (onnxruntime 1.32 optimizer, checked on tiny graphs):
- fp16 UNet step: NhwcConv, SkipLayerNormalization, Gelu (and BiasSplitGelu, BiasAdd at
  Stable Diffusion widths). The GroupNorm fusions write fp16 weights into float
  initializers and fail, so they are off for fp16 graphs; the attention matcher does not
  recognise the fp16 trace (extra Casts on the attention scale), so attention stays unfused.
- fp16 CLIP: BiasGelu, SkipLayerNormalization. fp32 VAE: NhwcConv, GroupNorm, SkipGroupNorm.
- Some CUDA kernels take only Stable Diffusion's widths (:data:`SIZE_LIMITED`); a fusion
  that produced an op its kernel would reject at run time is turned off and the graph
  fused again. A failing attention fusion (numpy >= 2.4 breaks FusionAttentionUnet on
  fp32 graphs) is likewise turned off, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from artrt.errors import InputError, OptimizeError

from .onnx_files import save_onnx

log = logging.getLogger(__name__)

MODEL_TYPES = ("unet", "clip", "vae")
CONTRIB_DOMAIN = "com.microsoft"
# Fused ops whose CUDA kernels take only some widths (onnxruntime/contrib_ops/cuda/diffusion/*.cc,
# 1.31): op -> the fusion option that makes it and the widths (bias / gamma length) it accepts;
# None for GroupNorm, whose limit depends on the groups (see _group_norm_accepts).
SIZE_LIMITED: dict[str, tuple[str, frozenset[int] | None]] = {
    "BiasSplitGelu": ("enable_bias_splitgelu", frozenset({2560, 5120, 6144, 10240, 12288})),
    "BiasAdd": ("enable_bias_add", frozenset({320, 640, 1280})),
    "GroupNorm": ("enable_group_norm", None),
    "SkipGroupNorm": ("enable_skip_group_norm", None),
}
GROUP_NORM_BLOCK_SIZES = (128, 256, 320, 384, 512)  # kSizes in group_norm_common_base.h



def optimize_for_cuda(src: Path, dst: Path, model_type: str) -> Path:
    """Fuse ``src`` (and its external data) for the CUDA EP and write it to ``dst`` (+ ``dst.data``
    when its weights exceed :data:`onnx_files.EXTERNAL_DATA_THRESHOLD`), atomically.

    ``model_type`` is ``"unet"`` (a fused step), ``"clip"`` (a text encoder) or ``"vae"``
    (the decoder). Returns ``dst``. Logs the fused operators it produced.
    """
    import onnx

    if model_type not in MODEL_TYPES:
        raise InputError(f"unknown model type {model_type!r}; choose from {', '.join(MODEL_TYPES)}")
    src, dst = Path(src), Path(dst)
    source = onnx.load(str(src), load_external_data=False)
    fp16 = _has_fp16_weights(source)
    optimized = _fuse(src, model_type, fusion_options(model_type, fp16))
    _check_interface(source, optimized.model, src.name)
    optimized.topological_sort()
    if fused_operators(optimized.model) and not any(o.domain == CONTRIB_DOMAIN for o in optimized.model.opset_import):
        optimized.model.opset_import.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1))
    # external data past onnx_files.EXTERNAL_DATA_THRESHOLD, like the exporter; both files atomic
    save_onnx(optimized.model, dst, source_dir=src.parent)
    log.info("%s: fused for the CUDA EP (%s): %s", src.name, "fp16" if fp16 else "fp32",
             fused_operators(optimized.model) or "no contrib ops")
    return dst


def _fuse(src: Path, model_type: str, options: Any) -> Any:
    """``optimize_model`` with ``options``, less the fusions that fail on this graph or
    whose CUDA kernels reject its sizes (each is turned off and the graph fused again)."""
    from onnxruntime.transformers.optimizer import optimize_model

    while True:
        try:
            with _progress_bars(log.isEnabledFor(logging.INFO)):
                fused = optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                                       use_gpu=True, optimization_options=options)
        except Exception as exc:  # the fusions raise assorted errors on graphs they misread
            if not options.enable_attention:
                raise OptimizeError(f"{src.name}: onnxruntime's {model_type} optimizer failed: {exc}") from None
            # e.g. FusionAttentionUnet calls int() on a 1-element array, an error since numpy 2.4.
            log.warning("%s: attention fusion failed (%s); fusing without it", src.name, exc)
            options.enable_attention = False
            continue
        rejected = {op: n for op, n in unsupported_sizes(fused.model).items() if getattr(options, SIZE_LIMITED[op][0])}
        if not rejected:
            return fused
        log.info("%s: not fusing %s: the CUDA kernels do not take sizes %s", src.name, sorted(rejected), rejected)
        for op in rejected:
            setattr(options, SIZE_LIMITED[op][0], False)


@contextlib.contextmanager
def _progress_bars(shown: bool) -> Iterator[None]:
    """The optimizer's tqdm ``fusion`` bars, hidden unless ``shown`` (``-q``: log level above INFO).

    The optimizer calls ``tqdm.tqdm(...)`` by attribute; ``TQDM_DISABLE`` is read only when tqdm is
    first imported, so the attribute is swapped for a disabled bar while the optimizer runs."""
    try:
        import tqdm
    except ImportError:  # the optimizer runs without bars
        shown = True
    if shown:
        yield
        return
    bar = tqdm.tqdm

    class Hidden(bar):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

    tqdm.tqdm = Hidden
    try:
        yield
    finally:
        tqdm.tqdm = bar


def unsupported_sizes(model: Any) -> dict[str, list[str]]:
    """Fused ops whose width (bias or gamma length, and groups) their CUDA kernel rejects."""
    widths = {i.name: int(i.dims[0]) if len(i.dims) == 1 else -1 for i in model.graph.initializer}
    found: dict[str, set[str]] = {}
    for node in model.graph.node:
        if node.domain != CONTRIB_DOMAIN or node.op_type not in SIZE_LIMITED or len(node.input) < 2:
            continue
        width, accepted = widths.get(node.input[1], -1), SIZE_LIMITED[node.op_type][1]
        if accepted is not None and width not in accepted:
            found.setdefault(node.op_type, set()).add(str(width))
        if accepted is None:
            groups = next((a.i for a in node.attribute if a.name == "groups"), 0)
            if not _group_norm_accepts(width, groups):
                found.setdefault(node.op_type, set()).add(f"{width} channels in {groups} groups")
    return {op: sorted(v) for op, v in found.items()}


def _group_norm_accepts(channels: int, groups: int) -> bool:
    """ORT's CUDA GroupNorm check: even channels per group that fit its channels-per-block choice."""
    if channels <= 0 or groups <= 0 or channels % groups:
        return False
    per_group = channels // groups
    per_block = per_group
    if per_group < GROUP_NORM_BLOCK_SIZES[-1] // 2:  # FindChannelsPerBlock: least idle threads
        costs = []
        for size in GROUP_NORM_BLOCK_SIZES:
            if size >= per_group:
                block = size // per_group * per_group
                costs.append(((channels + block - 1) // block * size - channels, -size, block))
        per_block = min(costs)[2]
    return per_block % per_group == 0 and per_block <= GROUP_NORM_BLOCK_SIZES[-1] and per_group % 2 == 0


def fusion_options(model_type: str, fp16: bool) -> Any:
    """The ``FusionOptions`` for one component: the defaults of ``model_type``, less the
    fusions that fail on, or do not suit, the graph's precision."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    if fp16:
        # FusionGroupNorm stores the (fp16) weights as float initializers: raw size mismatch.
        options.enable_group_norm = False
        options.enable_skip_group_norm = False
    else:
        # Packed QKV/KV only pay off with the fp16 fused-attention kernels (ORT's SD pipeline does the same).
        options.enable_packed_qkv = False
        options.enable_packed_kv = False
    return options


def fused_operators(model: Any) -> dict[str, int]:
    """Count of each ``com.microsoft`` contrib op in an ONNX model (the fused operators)."""
    counts = Counter(n.op_type for n in model.graph.node if n.domain == CONTRIB_DOMAIN)
    return dict(sorted(counts.items()))


def interface(model: Any) -> list[tuple[str, str, int]]:
    """``(kind, name, elem_type)`` of a model's graph inputs (initializers excluded) and outputs."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [("input", v.name, v.type.tensor_type.elem_type) for v in model.graph.input if v.name not in initializers]
    outputs = [("output", v.name, v.type.tensor_type.elem_type) for v in model.graph.output]
    return inputs + outputs


def _check_interface(before: Any, after: Any, name: str) -> None:
    if interface(before) != interface(after):
        raise OptimizeError(
            f"{name}: the optimizer changed the graph's inputs/outputs "
            f"from {interface(before)} to {interface(after)}"
        )


def _has_fp16_weights(model: Any) -> bool:
    from onnx import TensorProto

    return any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)


__all__ = [
    "MODEL_TYPES", "OptimizeError", "fused_operators", "fusion_options", "optimize_for_cuda", "unsupported_sizes",
]
