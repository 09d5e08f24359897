"""Write a package: every graph exported to ONNX and checked, tokenizers, manifest."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
from artrt.runtime.errors import InputError
from artrt.runtime.package import (
    Component,
    Defaults,
    Expert,
    Manifest,
    TensorInfo,
    TokenizerInfo,
    file_record,
    write_manifest,
)

import artrt

from .graphs import DecoderGraph, FusedStepGraph, TextEncoderGraph
from .onnx_io import check_onnx, export_onnx, tensor_info
from .sources import ExpertSource, ModelSources, TextEncoderSource

log = logging.getLogger(__name__)

TOLERANCE = 1e-3  # allowed max abs error of ONNX vs PyTorch, relative to max(1, |output|)
LATENT_AXES = {0: "batch", 2: "latent_height", 3: "latent_width"}
COND_AXES = {0: "cond_batch"}


def export_package(
    sources: ModelSources, out: str | Path, switch: float = 0.8, steps: int = 30,
    guidance: float = 5.0, overwrite: bool = False,
) -> Manifest:
    """Export ``sources`` into the package directory ``out`` and return its manifest.

    The package is assembled in ``out.partial`` and renamed into place at the end, so
    an interrupted export never leaves a half-written package behind.
    """
    out = Path(out)
    if not 0.0 <= switch <= 1.0:
        raise InputError(f"--switch must be in [0, 1], got {switch}")
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it")
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    components: dict[str, Component] = {}
    tokenizers: dict[str, TokenizerInfo] = {}
    files: list[str] = []
    for enc in sources.text_encoders.values():
        comp, tok, written = _export_text_encoder(enc, work)
        components[comp.name], tokenizers[enc.name] = comp, tok
        files += written
    latent = _latent_shape(sources)
    experts = []
    for expert in sources.experts:
        comp, written = _export_expert(expert, sources, work, latent)
        components[comp.name] = comp
        files += written
        experts.append(Expert(expert.name, comp.name, expert.conditioning))
    decoder = None
    if sources.vae is not None:
        comp, written = _export_decoder(sources.vae, work, latent)
        components[comp.name], decoder = comp, comp.name
        files += written
    unet = sources.experts[0].unet
    default_size = int(unet.config.sample_size) * sources.latent_scale
    manifest = Manifest(
        family=sources.family,
        components=components,
        tokenizers=tokenizers,
        schedule=sources.schedule.to_dict(),
        experts=tuple(experts),
        defaults=Defaults(steps, guidance, switch, sources.default_sampler, default_size, default_size),
        latent_channels=int(unet.config.in_channels),
        latent_scale=sources.latent_scale,
        size_multiple=sources.latent_scale * 2 ** (len(unet.config.block_out_channels) - 1),
        decoder=decoder,
        files=tuple(file_record(work, f) for f in files),
        source=sources.info,
        artrt_version=artrt.__version__,
    )
    write_manifest(work, manifest)
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    log.info("package written to %s in %.1f s", out, time.perf_counter() - started)
    return manifest


def _component(name: str, kind: str, work: Path, onnx_rel: str, errors: dict, tokenizer=None) -> Component:
    inputs, outputs = tensor_info(work / onnx_rel)

    def infos(items: list[dict]) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(i["name"], i["dtype"], tuple(i["shape"])) for i in items)

    return Component(name, kind, onnx_rel, infos(inputs), infos(outputs), tokenizer, errors)


def _export_graph(module, name, inputs, check_inputs, outputs, axes, work: Path):
    started = time.perf_counter()
    log.info("exporting %s ...", name)
    path = work / name / "model.onnx"
    written = export_onnx(module, inputs, outputs, axes, path)
    errors = check_onnx(module, check_inputs, outputs, path, TOLERANCE)
    log.info(
        "exported %s in %.1f s; max abs error vs PyTorch: %s", name, time.perf_counter() - started,
        ", ".join(f"{k} {v:.2e}" for k, v in errors.items()),
    )
    return [str(p.relative_to(work)) for p in written], errors


def _export_text_encoder(enc: TextEncoderSource, work: Path):
    max_length = int(enc.tokenizer.model_max_length)
    vocab = int(enc.model.config.vocab_size)
    graph = TextEncoderGraph(enc.model, enc.hidden_layer, enc.pooled).eval()
    outputs = ["hidden_states", "pooled"] if enc.pooled else ["hidden_states"]
    ids = {"input_ids": torch.randint(0, vocab, (1, max_length), dtype=torch.int64)}
    check = {"input_ids": torch.randint(0, vocab, (3, max_length), dtype=torch.int64)}
    axes = {n: {0: "batch"} for n in ["input_ids", *outputs]}
    written, errors = _export_graph(graph, enc.name, ids, check, outputs, axes, work)
    tok_rel = f"{enc.name}/tokenizer.json"
    enc.tokenizer.backend_tokenizer.save(str(work / tok_rel))
    tok = TokenizerInfo(tok_rel, max_length, int(enc.tokenizer.pad_token_id))
    comp = _component(enc.name, "text_encoder", work, written[0], errors, tokenizer=enc.name)
    return comp, tok, [*written, tok_rel]


def _latent_shape(sources: ModelSources) -> tuple[int, int]:
    """A small latent size for tracing: two size multiples, in latent pixels."""
    config = sources.experts[0].unet.config
    multiple = 2 ** (len(config.block_out_channels) - 1)
    return int(config.in_channels), 2 * multiple


def _step_inputs(expert: ExpertSource, sources: ModelSources, batch: int, h: int, w: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    channels = int(expert.unet.config.in_channels)
    cond = expert.conditioning
    width = sum(int(_hidden_width(sources.text_encoders[n])) for n in cond.text_encoders)
    latents = {
        n: torch.randn(batch, channels, h, w, generator=g) for n in ("sample", "denoised_prev", "noise")
    }
    step = torch.tensor([0.3, 500.0, 1.0, -2.0, 5.0, 0.9, 0.1, -0.05, 0.2])
    inputs = {**latents, "step": step, "encoder_hidden_states": torch.randn(2 * batch, 77, width, generator=g)}
    if cond.pooled is not None:
        pooled_width = int(sources.text_encoders[cond.pooled].model.config.projection_dim)
        n_ids = 5 if cond.time_ids == "aesthetic" else 6
        inputs["text_embeds"] = torch.randn(2 * batch, pooled_width, generator=g)
        inputs["time_ids"] = torch.tensor([[h * 8.0, w * 8.0, 0, 0, h * 8.0, w * 8.0][:n_ids]] * 2 * batch)
    return inputs


def _hidden_width(enc: TextEncoderSource) -> int:
    return int(enc.model.config.hidden_size)


def _export_expert(expert: ExpertSource, sources: ModelSources, work: Path, latent: tuple[int, int]):
    _, size = latent
    added = expert.conditioning.pooled is not None
    graph = FusedStepGraph(expert.unet, added_conditioning=added).eval()
    inputs = _step_inputs(expert, sources, 1, size, size, seed=0)
    check = _step_inputs(expert, sources, 2, 2 * size, size, seed=1)
    axes = {n: LATENT_AXES for n in ("sample", "denoised_prev", "noise", "next_sample", "denoised")}
    axes.update({n: COND_AXES for n in ("encoder_hidden_states", "text_embeds", "time_ids") if n in inputs})
    name = f"expert_{expert.name}"
    outputs = ["next_sample", "denoised"]
    written, errors = _export_graph(graph, name, inputs, check, outputs, axes, work)
    return _component(name, "fused_step", work, written[0], errors), written


def _export_decoder(vae: torch.nn.Module, work: Path, latent: tuple[int, int]):
    channels, size = latent
    graph = DecoderGraph(vae).eval()
    g = torch.Generator().manual_seed(2)
    inputs = {"latents": torch.randn(1, channels, size, size, generator=g)}
    check = {"latents": torch.randn(2, channels, size, 2 * size, generator=g)}
    axes = {"latents": LATENT_AXES, "image": {0: "batch", 2: "height", 3: "width"}}
    written, errors = _export_graph(graph, "vae_decoder", inputs, check, ["image"], axes, work)
    return _component("vae_decoder", "vae_decoder", work, written[0], errors), written


__all__ = ["export_package"]
