"""Write a package: every graph exported to ONNX and checked, tokenizers, manifest."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import artrt
from artrt.errors import InputError
from artrt.runtime.arguments import check_float, check_steps, check_switch
from artrt.runtime.package import (
    FORMAT_NAME,
    MANIFEST_NAME,
    Component,
    Defaults,
    Expert,
    Manifest,
    TensorInfo,
    TokenizerInfo,
    file_record,
    write_manifest,
)

from .cpu_optimize import add_cpu_graphs
from .graphs import DecoderGraph, FusedStepGraph, TextEncoderGraph
from .onnx_io import check_onnx, export_onnx, tensor_info
from .sources import ExpertSource, ModelSources, TextEncoderSource

log = logging.getLogger(__name__)

TOLERANCE = 1e-3  # allowed max abs error of ONNX vs PyTorch, relative to max(1, |output|)
TOLERANCE_FP16 = 5e-2  # the same for fp16 ONNX vs the fp32 PyTorch module
PRECISIONS = ("fp32", "fp16")
CONDITIONING = ("encoder_hidden_states", "text_embeds", "time_ids")  # fp16 inputs of fp16 step graphs
LATENT_AXES = {0: "batch", 2: "latent_height", 3: "latent_width"}
COND_AXES = {0: "cond_batch"}


def export_package(
    sources: ModelSources, out: str | Path, switch: float = 0.8, steps: int = 30,
    guidance: float = 5.0, overwrite: bool = False, precisions: Sequence[str] = PRECISIONS,
    fp16_vae: bool = False,
) -> Manifest:
    """Export ``sources`` into the package directory ``out`` and return its manifest.

    Every component gets an fp32 graph (``model.onnx``); with ``"fp16"`` in
    ``precisions`` the text encoders and experts also get a half-precision graph
    (``model_fp16.onnx``), and so does the VAE decoder when ``fp16_vae`` says it is
    fp16-safe (SDXL's original VAE overflows in fp16). The package is assembled in
    ``out.partial`` and renamed into place at the end, so an interrupted export never
    leaves a half-written package behind. ``out`` is checked first (see
    :func:`check_output_dir`): ``overwrite`` replaces only an artrt package or an empty directory.
    """
    out = check_output_dir(out, overwrite)
    fp16 = _check_precisions(precisions, fp16_vae)
    switch, steps, guidance = check_switch(switch), check_steps(steps), check_float("guidance", guidance)
    work = _beside(out, ".partial")
    if work.exists():
        log.warning("removing %s, left by an interrupted export", work)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    started = time.perf_counter()
    components: dict[str, Component] = {}
    tokenizers: dict[str, TokenizerInfo] = {}
    files: list[str] = []
    for enc in sources.text_encoders.values():
        comp, tok, written = _export_text_encoder(enc, work, fp16)
        components[comp.name], tokenizers[enc.name] = comp, tok
        files += written
    latent = _latent_shape(sources)
    experts = []
    for expert in sources.experts:
        comp, written = _export_expert(expert, sources, work, latent, fp16)
        components[comp.name] = comp
        files += written
        experts.append(Expert(expert.name, comp.name, expert.conditioning))
    decoder = None
    if sources.vae is not None:
        comp, written = _export_decoder(sources.vae, work, latent, fp16 and fp16_vae)
        components[comp.name], decoder = comp, comp.name
        files += written
    unet, patch = sources.experts[0].unet, sources.experts[0].patch
    default_size = int(unet.config.sample_size) * sources.latent_scale * patch
    manifest = Manifest(
        family=sources.family,
        components=components,
        tokenizers=tokenizers,
        schedule=sources.schedule.to_dict(),
        experts=tuple(experts),
        defaults=Defaults(steps, guidance, switch, sources.default_sampler, default_size, default_size),
        latent_channels=int(unet.config.in_channels) // patch**2,
        latent_scale=sources.latent_scale,
        size_multiple=sources.latent_scale * patch * 2 ** (len(unet.config.block_out_channels) - 1),
        decoder=decoder,
        files=tuple(file_record(work, f) for f in files),
        source=sources.info,
        artrt_version=artrt.__version__,
    )
    manifest = add_cpu_graphs(work, manifest)  # ort-cpu graphs with fused attention
    write_manifest(work, manifest)
    _move_into_place(work, out, overwrite)
    log.info("package written to %s in %.1f s", out, time.perf_counter() - started)
    return manifest


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an output directory that an export could not write or must not delete.

    Deletes and writes nothing, so callers can run it before any slow work; returns ``out``
    made absolute. ``out`` must not exist or, with ``overwrite``, be an artrt package or an
    empty directory: anything else may hold the user's own files. Its nearest existing
    parent must be a writable directory. ``OUT.partial`` (where the package is assembled)
    and ``OUT.old`` (where the replaced package waits to be deleted) may only be leftovers
    of an interrupted export: directories, ``OUT.old`` also a package or empty.
    """
    out = Path(os.path.abspath(out))
    if out.is_symlink():
        raise InputError(f"{out} is a symbolic link; give the directory itself or another --out")
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out} is a file, not a package directory; choose another --out")
        if not overwrite:
            raise InputError(f"{out} already exists; pass --overwrite to replace it")
        if not _replaceable(out):
            raise InputError(f"{out} is neither an artrt package ({MANIFEST_NAME}) nor empty, so --overwrite "
                             "will not delete it; choose another --out or empty it yourself")
    parent = out.parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"cannot create {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot create {out}: directory {parent} is not writable")
    partial, old = _beside(out, ".partial"), _beside(out, ".old")
    if os.path.lexists(partial) and (partial.is_symlink() or not partial.is_dir()):
        raise InputError(f"{partial} is not an interrupted export's directory but export needs that name; "
                         "move it away or choose another --out")
    if os.path.lexists(old) and not _replaceable(old):
        raise InputError(f"{old} is neither an artrt package nor empty but export needs that name; "
                         "move it away or choose another --out")
    return out


def _beside(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)


def _replaceable(path: Path) -> bool:
    """Whether ``path`` is a real directory that is empty or holds an artrt package (any
    format version; files are not verified)."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        if not any(path.iterdir()):
            return True
        data = json.loads((path / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT_NAME and {
        "format_version", "components", "experts", "files"} <= data.keys()


def _move_into_place(work: Path, out: Path, overwrite: bool) -> None:
    """Rename ``work`` to ``out``. What ``out`` held is first renamed to ``OUT.old`` and
    deleted last, so a failure in between leaves the old or the new package in place."""
    check_output_dir(out, overwrite)  # out may have changed during the export
    old = _beside(out, ".old")
    if os.path.lexists(old):
        log.warning("removing %s, left by an interrupted export", old)
        shutil.rmtree(old)
    moved = os.path.lexists(out)
    if moved:
        out.rename(old)
    try:
        work.rename(out)
    except OSError as exc:
        if moved:
            old.rename(out)
        raise InputError(f"cannot move the new package into {out} ({exc}); it is in {work}") from None
    if moved:
        shutil.rmtree(old, ignore_errors=True)
        if os.path.lexists(old):
            log.warning("could not delete the replaced package %s; delete it yourself", old)


def _check_precisions(precisions: Sequence[str], fp16_vae: bool) -> bool:
    """Validate ``precisions``; returns whether fp16 graphs are wanted."""
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise InputError(f"unknown precision(s) {', '.join(unknown)}; choose from {', '.join(PRECISIONS)}")
    if "fp32" not in precisions:
        raise InputError("fp32 graphs are always exported (ORT CPU runs them): use --precision fp32 [fp16]")
    if fp16_vae and "fp16" not in precisions:
        raise InputError("--fp16-vae needs fp16 in --precision")
    return "fp16" in precisions


class _Fp32Reference(torch.nn.Module):
    """The fp32 module fed an fp16 graph's inputs cast back to fp32: what its check compares with."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs: torch.Tensor):
        return self.module(*(t.float() if t.is_floating_point() else t for t in inputs))


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


def _component(name: str, kind: str, work: Path, written: dict, tokenizer=None) -> Component:
    onnx_rel, errors = written["fp32"]
    onnx_fp16, errors_fp16 = written.get("fp16", (None, {}))
    inputs, outputs = tensor_info(work / onnx_rel)

    def infos(items: list[dict]) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(i["name"], i["dtype"], tuple(i["shape"])) for i in items)

    return Component(name, kind, onnx_rel, infos(inputs), infos(outputs), tokenizer, errors, onnx_fp16, errors_fp16)


def _export_graph(module, name, inputs, check_inputs, outputs, axes, work: Path, fp16=None, half_inputs=()):
    """Export ``module`` to ``<name>/model.onnx`` and, with ``fp16`` (a half-precision
    version of it), to ``<name>/model_fp16.onnx``, checking each against the fp32 module.

    Returns the files written and ``{precision: (onnx path, max abs error per output)}``.
    """
    variants = [("fp32", module, "model.onnx", inputs, check_inputs, TOLERANCE, module)]
    if fp16 is not None:
        variants.append(("fp16", fp16, "model_fp16.onnx", _as_half(inputs, half_inputs),
                         _as_half(check_inputs, half_inputs), TOLERANCE_FP16, _Fp32Reference(module)))
    files, graphs = [], {}
    for precision, graph, filename, trace, check, tolerance, reference in variants:
        started = time.perf_counter()
        log.info("exporting %s (%s) ...", name, precision)
        path = work / name / filename
        written = export_onnx(graph, trace, outputs, axes, path)
        errors = check_onnx(reference, check, outputs, path, tolerance)
        log.info(
            "exported %s (%s) in %.1f s; max abs error vs PyTorch fp32: %s", name, precision,
            time.perf_counter() - started, ", ".join(f"{k} {v:.2e}" for k, v in errors.items()),
        )
        files += [str(p.relative_to(work)) for p in written]
        graphs[precision] = (str(path.relative_to(work)), errors)
    return files, graphs


def _export_text_encoder(enc: TextEncoderSource, work: Path, fp16: bool):
    max_length = int(enc.tokenizer.model_max_length)
    vocab = int(enc.model.config.vocab_size)
    graph = TextEncoderGraph(enc.model, enc.hidden_layer, enc.pooled, enc.mask_pad_id).eval()
    outputs = ["hidden_states", "pooled"] if enc.pooled else ["hidden_states"]
    ids = {"input_ids": _token_ids(1, max_length, vocab, enc.mask_pad_id, seed=0)}
    check = {"input_ids": _token_ids(3, max_length, vocab, enc.mask_pad_id, seed=1)}
    axes = {n: {0: "batch"} for n in ["input_ids", *outputs]}
    half = _half_copy(graph) if fp16 else None  # outputs fp16; hosts cast them as needed
    written, graphs = _export_graph(graph, enc.name, ids, check, outputs, axes, work, half)
    tok_rel = f"{enc.name}/tokenizer.json"
    enc.tokenizer.backend_tokenizer.save(str(work / tok_rel))
    tok = TokenizerInfo(tok_rel, max_length, int(enc.tokenizer.pad_token_id))
    comp = _component(enc.name, "text_encoder", work, graphs, tokenizer=enc.name)
    return comp, tok, [*written, tok_rel]


def _token_ids(batch: int, length: int, vocab: int, pad_id: int | None, seed: int) -> torch.Tensor:
    """Random token ids for tracing and checks; with ``pad_id``, rows end in padding of varied length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), dtype=torch.int64, generator=g)
    if pad_id is not None:
        ids[ids == pad_id] = (pad_id + 1) % vocab
        for row in range(batch):
            ids[row, length // (row + 2):] = pad_id
    return ids


def _latent_shape(sources: ModelSources) -> tuple[int, int]:
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


def _export_expert(expert: ExpertSource, sources: ModelSources, work: Path, latent: tuple[int, int], fp16: bool):
    _, size = latent
    added = expert.conditioning.pooled is not None
    graph = FusedStepGraph(expert.unet, added_conditioning=added, patch=expert.patch).eval()
    inputs = _step_inputs(expert, sources, 1, size, size, seed=0)
    check = _step_inputs(expert, sources, 2, 2 * size, size, seed=1)
    axes = {n: LATENT_AXES for n in ("sample", "denoised_prev", "noise", "next_sample", "denoised")}
    axes.update({n: COND_AXES for n in ("encoder_hidden_states", "text_embeds", "time_ids") if n in inputs})
    name = f"expert_{expert.name}"
    outputs = ["next_sample", "denoised"]
    half = _half_copy(graph) if fp16 else None  # FusedStepGraph keeps x, D and the update in fp32
    written, graphs = _export_graph(graph, name, inputs, check, outputs, axes, work, half, CONDITIONING)
    return _component(name, "fused_step", work, graphs), written


def _export_decoder(vae: torch.nn.Module, work: Path, latent: tuple[int, int], fp16: bool):
    channels, size = latent
    graph = DecoderGraph(vae).eval()
    g = torch.Generator().manual_seed(2)
    inputs = {"latents": torch.randn(1, channels, size, size, generator=g)}
    check = {"latents": torch.randn(2, channels, size, 2 * size, generator=g)}
    axes = {"latents": LATENT_AXES, "image": {0: "batch", 2: "height", 3: "width"}}
    half = _Fp32Boundary(_half_copy(graph)) if fp16 else None
    written, graphs = _export_graph(graph, "vae_decoder", inputs, check, ["image"], axes, work, half)
    return _component("vae_decoder", "vae_decoder", work, graphs), written


__all__ = ["check_output_dir", "export_package"]
