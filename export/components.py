"""Export one component: load it, trace its fp32 and/or fp16 graph, check each against PyTorch.

Memory is bounded by one component (docs/export-scale.md): a :class:`LazyModule` is loaded here
and freed on return, converted to fp16 in place rather than copied, and freed before its graphs
are put in place and checked. Modules given directly (the demo) are borrowed and left as they are.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import itertools
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from artrt.runtime.package import Attention, Component, TensorInfo, TokenizerInfo

from .attention_cost import unet_attention, vae_attention
from .graphs import DecoderGraph, FusedStepGraph, TextEncoderGraph
from .lora_targets import lora_fingerprints, write_lora_targets
from .onnx_io import compare_onnx, place_onnx, run_module, tensor_info, trace_onnx
from .sources import ExpertSource, ModelSources, TextEncoderSource
from .weights import LazyModule, materialize

log = logging.getLogger(__name__)

TOLERANCE = 1e-3  # allowed max abs error of ONNX vs PyTorch, relative to max(1, |output|)
TOLERANCE_FP16 = 5e-2  # the same for fp16 ONNX vs the fp32 PyTorch module
CONDITIONING = ("encoder_hidden_states", "text_embeds", "time_ids")  # fp16 inputs of fp16 step graphs
LATENT_AXES = {0: "batch", 2: "latent_height", 3: "latent_width"}
COND_AXES = {0: "cond_batch"}


class _Fp32Boundary(torch.nn.Module):
    """Wraps a half-precision single-input graph so its input and output stay fp32."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.half()).float()


def _half_copy(module: torch.nn.Module) -> torch.nn.Module:
    """``copy.deepcopy(module).half()`` without an intermediate fp32 copy of the weights."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            half = tensor.detach().half()
            memo[id(tensor)] = torch.nn.Parameter(half, requires_grad=False) if isinstance(
                tensor, torch.nn.Parameter) else half
    return copy.deepcopy(module, memo).eval()


def _as_half(inputs: dict[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    return {k: v.half() if k in names else v for k, v in inputs.items()}


def _as_float(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}


def _release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps it otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _load(name: str, source: torch.nn.Module | LazyModule) -> tuple[torch.nn.Module, bool]:
    """The module of ``source`` (loaded now for a :class:`LazyModule`) and whether it is owned."""
    if not isinstance(source, LazyModule):
        return source, False
    log.info("%s: loading %s (%.2f GB in fp32) ...", name, source.folder, source.fp32_bytes / 1e9)
    started = time.perf_counter()
    module, owned = materialize(source)
    log.info("%s: loaded (%.1f s)", name, time.perf_counter() - started)
    return module, owned


def _component(name: str, kind: str, work: Path, written: dict, tokenizer=None,
               attention: Attention | None = None) -> Component:
    """The manifest entry of ``written`` graphs; its inputs and outputs are the fp32 graph's, else
    the fp16 graph's (the runtime feeds both the same, casting conditioning to the graph's dtype)."""
    onnx_rel, errors = written.get("fp32", (None, {}))
    onnx_fp16, errors_fp16 = written.get("fp16", (None, {}))
    inputs, outputs = tensor_info(work / (onnx_rel or onnx_fp16))

    def infos(items: list[dict]) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(i["name"], i["dtype"], tuple(i["shape"])) for i in items)

    return Component(name, kind, onnx_rel, infos(inputs), infos(outputs), tokenizer, errors, onnx_fp16, errors_fp16,
                     attention=attention)


@dataclass
class _Graph:
    """One component's graphs to export: the fp32 module, trace and check inputs, the precisions
    to write (``fp32``, ``fp16``) and for the fp16 graph the inputs it takes in half precision
    (``fp32_io``: keep input and output fp32)."""

    name: str
    module: torch.nn.Module | None  # None once exported (owned modules are freed before the checks)
    owned: bool  # the module is ours: convert it to fp16 in place (frees the fp32 weights)
    inputs: dict[str, torch.Tensor]
    check: dict[str, torch.Tensor]
    outputs: list[str]
    axes: dict[str, Any]
    precisions: Collection[str]
    half_inputs: Sequence[str] = ()
    fp32_io: bool = False


def _export_graph(job: _Graph, work: Path) -> tuple[list[str], dict[str, tuple[str, dict[str, float]]]]:
    """Export ``job.module`` to ``<name>/model.onnx`` (with ``fp32`` in ``job.precisions``) and its
    half-precision version to ``<name>/model_fp16.onnx`` (with ``fp16``), then check each file
    against the fp32 module's outputs.

    Memory (docs/export-scale.md): the PyTorch references are computed first (in fp32, also when
    only the fp16 graph is written), an owned module is converted to fp16 in place after the fp32
    export (never held in both precisions) and freed after the last export, so ONNX Runtime checks
    each file with no PyTorch weights resident. Whether the fp32 graph is written does not change
    the fp16 one. Returns the files written and ``{precision: (onnx path, max abs error per output)}``.
    """
    assert job.precisions and set(job.precisions) <= {"fp32", "fp16"}, job.precisions
    fp16 = "fp16" in job.precisions
    started = time.perf_counter()
    reference = run_module(job.module, job.check)
    half_check = _as_half(job.check, job.half_inputs)
    reference_fp16 = run_module(job.module, _as_float(half_check)) if fp16 and job.half_inputs else reference
    log.info("%s: PyTorch reference (%.1f s)", job.name, time.perf_counter() - started)
    checks, traced = [], []
    if "fp32" in job.precisions:
        checks.append(("fp32", work / job.name / "model.onnx", job.check, reference, TOLERANCE))
        traced.append(_trace(job.module, job.name, "fp32", job.inputs, job, checks[0][1]))
    if fp16:
        half = job.module.half() if job.owned else _half_copy(job.module)  # .half() converts in place
        _release_memory()
        path = work / job.name / "model_fp16.onnx"
        module = _Fp32Boundary(half) if job.fp32_io else half
        traced.append(_trace(module, job.name, "fp16", _as_half(job.inputs, job.half_inputs), job, path))
        checks.append(("fp16", path, half_check, reference_fp16, TOLERANCE_FP16))
        del half, module
    if job.owned:
        job.module = None  # freed before any graph is parsed or checked: the references hold what is needed
        _release_memory()
    files: list[str] = []
    for (_, path, *_), scratch in zip(checks, traced):
        step = time.perf_counter()
        written = place_onnx(scratch, path)
        files += [str(p.relative_to(work)) for p in written]
        log.info("%s: wrote %s (%.2f GB, %.1f s)", job.name, " + ".join(str(p.relative_to(work)) for p in written),
                 sum(p.stat().st_size for p in written) / 1e9, time.perf_counter() - step)
    graphs: dict[str, tuple[str, dict[str, float]]] = {}
    for precision, path, check, expected, tolerance in checks:
        step = time.perf_counter()
        errors = compare_onnx(path, check, expected, job.outputs, tolerance)
        log.info("%s: checked %s against PyTorch fp32 (%.1f s): max abs error %s", job.name, precision,
                 time.perf_counter() - step, ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
        graphs[precision] = (str(path.relative_to(work)), errors)
    return files, graphs


def _trace(module: torch.nn.Module, name: str, precision: str, inputs: dict[str, torch.Tensor], job: _Graph,
           path: Path) -> Path:
    step = time.perf_counter()
    scratch = trace_onnx(module, inputs, job.outputs, job.axes, path)
    log.info("%s: exported %s (%.1f s)", name, precision, time.perf_counter() - step)
    return scratch


def export_text_encoder(enc: TextEncoderSource, work: Path, precisions: Collection[str]):
    started = time.perf_counter()
    max_length = int(enc.tokenizer.model_max_length)
    vocab = int(enc.model.config.vocab_size)
    outputs = ["hidden_states", "pooled"] if enc.pooled else ["hidden_states"]
    ids = {"input_ids": _token_ids(1, max_length, vocab, enc.mask_pad_id, seed=0)}
    check = {"input_ids": _token_ids(3, max_length, vocab, enc.mask_pad_id, seed=1)}
    axes = {n: {0: "batch"} for n in ["input_ids", *outputs]}
    model, owned = _load(enc.name, enc.model)
    fingerprints = lora_fingerprints(model)  # before any fp16 conversion in place
    graph = TextEncoderGraph(model, enc.hidden_layer, enc.pooled, enc.mask_pad_id).eval()
    del model
    job = _Graph(enc.name, graph, owned, ids, check, outputs, axes, precisions)  # fp16 graph: fp16 outputs
    del graph
    written, graphs = _export_graph(job, work)
    del job
    _release_memory()
    tok_rel = f"{enc.name}/tokenizer.json"
    enc.tokenizer.backend_tokenizer.save(str(work / tok_rel))
    tok = TokenizerInfo(tok_rel, max_length, int(enc.tokenizer.pad_token_id))
    comp = _component(enc.name, "text_encoder", work, graphs, tokenizer=enc.name)
    log.info("%s: done (%.1f s)", enc.name, time.perf_counter() - started)
    return comp, tok, [*written, tok_rel, write_lora_targets(fingerprints, work, enc.name, graphs)]


def _token_ids(batch: int, length: int, vocab: int, pad_id: int | None, seed: int) -> torch.Tensor:
    """Random token ids for tracing and checks; with ``pad_id``, rows end in padding of varied length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), dtype=torch.int64, generator=g)
    if pad_id is not None:
        ids[ids == pad_id] = (pad_id + 1) % vocab
        for row in range(batch):
            ids[row, length // (row + 2):] = pad_id
    return ids


def latent_shape(sources: ModelSources) -> tuple[int, int]:
    """A small latent size for tracing: two size multiples, in latent pixels."""
    expert = sources.experts[0]
    config = expert.unet.config
    multiple = expert.patch * 2 ** (len(config.block_out_channels) - 1)
    return int(config.in_channels) // expert.patch**2, 2 * multiple


def _step_inputs(expert: ExpertSource, sources: ModelSources, batch: int, h: int, w: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    channels = int(expert.unet.config.in_channels) // expert.patch**2
    cond = expert.conditioning
    encoders = [sources.text_encoders[n] for n in cond.text_encoders]
    width = sum(_hidden_width(enc) for enc in encoders)
    tokens = int(encoders[0].tokenizer.model_max_length)
    latents = {
        n: torch.randn(batch, channels, h, w, generator=g) for n in ("sample", "denoised_prev", "noise")
    }
    step = torch.tensor([0.3, 500.0, 1.0, -2.0, 5.0, 0.9, 0.1, -0.05, 0.2])
    inputs = {**latents, "step": step,
              "encoder_hidden_states": torch.randn(2 * batch, tokens, width, generator=g)}
    if cond.pooled is not None:
        pooled_width = int(sources.text_encoders[cond.pooled].model.config.projection_dim)
        n_ids = 5 if cond.time_ids == "aesthetic" else 6
        inputs["text_embeds"] = torch.randn(2 * batch, pooled_width, generator=g)
        inputs["time_ids"] = torch.tensor([[h * 8.0, w * 8.0, 0, 0, h * 8.0, w * 8.0][:n_ids]] * 2 * batch)
    return inputs


def _hidden_width(enc: TextEncoderSource) -> int:
    return int(enc.model.config.hidden_size)


def export_expert(expert: ExpertSource, sources: ModelSources, work: Path, latent: tuple[int, int],
                  precisions: Collection[str]):
    started = time.perf_counter()
    _, size = latent
    name = f"expert_{expert.name}"
    inputs = _step_inputs(expert, sources, 1, size, size, seed=0)
    check = _step_inputs(expert, sources, 2, 2 * size, size, seed=1)
    axes = {n: LATENT_AXES for n in ("sample", "denoised_prev", "noise", "next_sample", "denoised")}
    axes.update({n: COND_AXES for n in ("encoder_hidden_states", "text_embeds", "time_ids") if n in inputs})
    unet, owned = _load(name, expert.unet)
    fingerprints = lora_fingerprints(unet)  # before any fp16 conversion in place
    added = expert.conditioning.pooled is not None
    graph = FusedStepGraph(unet, added_conditioning=added, patch=expert.patch).eval()
    del unet
    # the fp16 step keeps x, D and the sampler update in fp32 (FusedStepGraph)
    job = _Graph(name, graph, owned, inputs, check, ["next_sample", "denoised"], axes, precisions, CONDITIONING)
    del graph
    written, graphs = _export_graph(job, work)
    written.append(write_lora_targets(fingerprints, work, name, graphs))
    del job
    _release_memory()
    comp = _component(name, "fused_step", work, graphs, attention=unet_attention(expert.unet.config, expert.patch))
    log.info("%s: done (%.1f s)", name, time.perf_counter() - started)
    return comp, written


def export_decoder(vae: torch.nn.Module | LazyModule, work: Path, latent: tuple[int, int],
                   precisions: Collection[str]):
    started = time.perf_counter()
    channels, size = latent
    g = torch.Generator().manual_seed(2)
    inputs = {"latents": torch.randn(1, channels, size, size, generator=g)}
    check = {"latents": torch.randn(2, channels, size, 2 * size, generator=g)}
    axes = {"latents": LATENT_AXES, "image": {0: "batch", 2: "height", 3: "width"}}
    module, owned = _load("vae_decoder", vae)
    attention = vae_attention(module.config)
    graph = DecoderGraph(module).eval()
    del module
    job = _Graph("vae_decoder", graph, owned, inputs, check, ["image"], axes, precisions, fp32_io=True)
    del graph
    written, graphs = _export_graph(job, work)
    del job
    _release_memory()
    comp = _component("vae_decoder", "vae_decoder", work, graphs, attention=attention)
    log.info("vae_decoder: done (%.1f s)", time.perf_counter() - started)
    return comp, written


__all__ = ["export_decoder", "export_expert", "export_text_encoder", "latent_shape"]
