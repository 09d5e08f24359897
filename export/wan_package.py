"""The Wan 2.2 family as a package: a diffusers ``WanPipeline`` folder read into sources, and its
graphs (UMT5, the two flow-step experts, the two VAE decoder graphs) written and checked.

The package layout and the runtime's side are in docs/package-format.md ("Wan packages") and
docs/wan-design.md. :func:`artrt.export.export_package` calls :func:`write_wan_graphs` for a
``wan`` source, so the atomic write, the output checks and the CPU graphs are the same as for
UNet pairs.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch

from artrt.errors import ConfigError, InputError
from artrt.runtime.flow import FlowSampler, FlowScheduleConfig
from artrt.runtime.package import Component, Conditioning, Expert, TokenizerInfo
from artrt.runtime.video import CHUNK_DECODER, LATENTS, VIDEO, WAN_FAMILY, cache_name, next_cache_name

from .attention_cost import vae_attention, wan_transformer_attention
from .components import _component, _export_graph, _Graph, _load, _release_memory
from .lora_targets import lora_fingerprints, write_lora_targets
from .sources import ExpertSource, ModelSources, TextEncoderSource, _diffusers_config, _model_index
from .wan_graphs import COND_AXES, LATENT_NAMES, STEP_OUTPUTS, WanFlowStepGraph, prepare_transformer, step_inputs
from .wan_graphs import LATENT_AXES as STEP_LATENT_AXES
from .wan_vae import (
    CACHE_T,
    FRAMES_PER_CHUNK,
    VIDEO_AXES,
    WanDecoderChunk,
    WanDecoderFirst,
    _layout,
    cache_axes,
    chunk_inputs,
    declare_output_shapes,
    first_inputs,
    prepare_vae,
)
from .wan_vae import LATENT_AXES as VAE_LATENT_AXES
from .weights import LazyModule, weight_files

log = logging.getLogger(__name__)

WAN_PIPELINES = {"WanPipeline"}
TRANSFORMER_CLASSES = {"WanTransformer3DModel"}
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's max_sequence_length: UMT5 tokens per prompt
DEFAULT_GUIDANCE = (4.0, 3.0)  # Wan 2.2 T2V-A14B's guidance_scale, guidance_scale_2
DEFAULT_SIZE = (480, 832)  # WanPipeline's default height, width
PATCH = 2  # spatial patch of the transformers (checked against their config)
TRACE_LATENT = (2, 4, 6)  # latent frames, height, width the graphs are traced at
CHECK_LATENT = (1, 6, 4)  # ... and checked at (batch 2)


def is_wan_folder(folder: Path) -> bool:
    """Whether ``folder`` is a diffusers ``WanPipeline`` folder."""
    try:
        return _model_index(Path(folder)).get("_class_name") in WAN_PIPELINES
    except (InputError, OSError, ValueError):
        return False


def _load_transformer(folder: Path) -> LazyModule:
    from diffusers import WanTransformer3DModel

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InputError(f"{folder} is not a diffusers transformer folder (no config.json)")
    kind = json.loads(config_path.read_text()).get("_class_name")
    if kind not in TRANSFORMER_CLASSES:
        raise ConfigError(f"{folder}: transformer class {kind} is not supported (artrt runs "
                          f"{', '.join(sorted(TRANSFORMER_CLASSES))})")
    config = _diffusers_config(WanTransformer3DModel, folder)
    if tuple(config.patch_size)[1:] != (PATCH, PATCH) or tuple(config.patch_size)[0] != 1:
        raise ConfigError(f"{folder}: patch_size {list(config.patch_size)} is not supported (artrt runs [1, 2, 2])")
    files = weight_files(folder, "diffusion_pytorch_model", "diffusion_pytorch_model.bin")
    load = functools.partial(_from_pretrained, WanTransformer3DModel, folder)
    return LazyModule(folder, load, config, files)


def _from_pretrained(cls: type, folder: Path) -> torch.nn.Module:
    return cls.from_pretrained(folder, torch_dtype=torch.float32).eval()


def load_wan(folder: str | Path, detail_transformer: str | Path | None = None) -> ModelSources:
    """A ``WanPipeline`` folder as export sources: ``transformer`` (high noise, expert 0) and
    ``transformer_2`` (low noise) or ``detail_transformer`` (a same-architecture transformer
    folder); the folder's ``boundary_ratio`` becomes the package's default switch."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    folder = Path(folder)
    index = _model_index(folder)
    if index.get("_class_name") not in WAN_PIPELINES:
        raise ConfigError(f"{folder}: pipeline {index.get('_class_name')} is not a WanPipeline")
    if index.get("text_encoder", [None, None])[1] != "UMT5EncoderModel":
        raise ConfigError(f"{folder}: text encoder {index.get('text_encoder')} is not supported (UMT5EncoderModel)")
    experts = [_load_transformer(folder / "transformer")]
    has_second = isinstance(index.get("transformer_2"), list) and any(index["transformer_2"])
    if detail_transformer is not None and has_second:
        raise InputError(f"{folder} has its own transformer_2; --detail-transformer is for one-expert folders")
    if detail_transformer is not None:
        experts.append(_load_transformer(Path(detail_transformer)))
        if dict(experts[1].config) != dict(experts[0].config):
            raise ConfigError(f"{detail_transformer}: the detail transformer's config differs from "
                              f"{folder}/transformer")
    elif has_second:
        experts.append(_load_transformer(folder / "transformer_2"))
    boundary = index.get("boundary_ratio")
    if len(experts) == 2 and boundary is None:
        raise ConfigError(f"{folder}: two experts need a boundary_ratio in model_index.json")
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", use_fast=True)
    tokenizer.model_max_length = MAX_SEQUENCE_LENGTH
    te_folder = folder / "text_encoder"
    te_config = UMT5EncoderModel.config_class.from_pretrained(te_folder)
    text = LazyModule(te_folder, functools.partial(_from_pretrained, UMT5EncoderModel, te_folder), te_config,
                      weight_files(te_folder, "model", "pytorch_model.bin"))
    encoder = TextEncoderSource("text_encoder", text, tokenizer, None, False, mask_pad_id=int(tokenizer.pad_token_id))
    vae_folder = folder / "vae"
    vae = LazyModule(vae_folder, functools.partial(_from_pretrained, AutoencoderKLWan, vae_folder),
                     _diffusers_config(AutoencoderKLWan, vae_folder),
                     weight_files(vae_folder, "diffusion_pytorch_model", "diffusion_pytorch_model.bin"))
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    schedule = FlowScheduleConfig.from_diffusers(scheduler)
    euler = scheduler.get("_class_name") == "FlowMatchEulerDiscreteScheduler"
    sampler = FlowSampler.EULER if euler else FlowSampler.UNIPC
    cond = Conditioning(text_encoders=("text_encoder",))
    names = ("composition", "detail")[:len(experts)]
    info = {"base": str(folder), "boundary_ratio": boundary, "max_sequence_length": MAX_SEQUENCE_LENGTH}
    if detail_transformer is not None:
        info["detail_transformer"] = str(detail_transformer)
    return ModelSources(WAN_FAMILY, {"text_encoder": encoder},
                        [ExpertSource(n, e, cond, patch=PATCH) for n, e in zip(names, experts)], vae,
                        schedule, sampler.value, int(vae.config.scale_factor_spatial or 8), info)  # type: ignore[arg-type]


def default_switch(sources: ModelSources) -> float:
    """The package's default switch: Wan's boundary_ratio (0.0, unused, for one expert)."""
    boundary = sources.info.get("boundary_ratio")
    return 0.0 if boundary is None else float(boundary)


def write_wan_graphs(sources: ModelSources, work: Path, graphs: Any) -> tuple[dict[str, Component], list[Expert],
                                                                              dict[str, Any], list[str]]:
    """Export every graph of a Wan source into ``work``, one model in memory at a time, in the
    precisions ``graphs`` (a ``GraphChoice``) asks for (the VAE in fp32, as Wan runs it); returns
    the components, experts, the layout fields of the manifest and the files written."""
    from .components import export_text_encoder

    components: dict[str, Component] = {}
    files: list[str] = []
    enc = sources.text_encoders["text_encoder"]
    comp, tok, written = export_text_encoder(enc, work, graphs.precisions("text_encoder"))
    components[comp.name] = comp
    files += written
    tokenizer = TokenizerInfo(tok.file, MAX_SEQUENCE_LENGTH, int(enc.tokenizer.pad_token_id), clean="wan")
    text_dim = int(enc.model.config.d_model)
    experts = []
    for expert in sources.experts:
        comp, written = _export_step(expert, work, text_dim, graphs.precisions("fused_step"))
        components[comp.name] = comp
        files += written
        experts.append(Expert(expert.name, comp.name, expert.conditioning))
    decoder_components, written, channels = _export_decoder(sources.vae, work)
    components.update(decoder_components)
    files += written
    layout = {"tokenizers": {enc.name: tokenizer}, "latent_channels": channels,
              "size_multiple": sources.latent_scale * PATCH, "decoder": "vae_decoder",
              "max_latent": max_latent(sources.experts[0].unet.config)}
    return components, experts, layout, files


def max_latent(config: Any) -> tuple[int, int, int]:
    """The largest latent [frames, height, width] a Wan transformer can run: its rotary position
    tables cover ``rope_max_seq_len`` patches along each axis (patches of 1 x 2 x 2 latents)."""
    positions = int(config.rope_max_seq_len)
    return positions, positions * PATCH, positions * PATCH


def default_size(size: tuple[int, int], latent_limit: tuple[int, ...], latent_scale: int,
                 multiple: int) -> tuple[int, int]:
    """WanPipeline's default (height, width), scaled down (keeping its aspect, rounded down to
    ``multiple``) where the transformer's position tables do not reach it."""
    largest = (latent_limit[1] * latent_scale, latent_limit[2] * latent_scale)
    factor = min(1.0, *(limit / side for limit, side in zip(largest, size)))
    return tuple(max(multiple, int(side * factor) // multiple * multiple) for side in size)  # type: ignore[return-value]


def _export_step(expert: ExpertSource, work: Path, text_dim: int, precisions: Any) -> tuple[Component, list[str]]:
    name = f"expert_{expert.name}"
    frames, h, w = TRACE_LATENT
    channels = int(expert.unet.config.in_channels)
    inputs = step_inputs(1, frames, h, w, 16, text_dim, seed=0, channels=channels)
    check_frames, ch, cw = CHECK_LATENT
    check = step_inputs(2, check_frames, ch, cw, 24, text_dim, seed=1, channels=channels)
    axes = {n: STEP_LATENT_AXES for n in LATENT_NAMES} | {"encoder_hidden_states": COND_AXES}
    transformer, owned = _load(name, expert.unet)
    fingerprints = lora_fingerprints(transformer)  # LoRA targets: before the module is prepared or halved
    graph = WanFlowStepGraph(prepare_transformer(transformer)).eval()
    del transformer
    job = _Graph(name, graph, owned, inputs, check, list(STEP_OUTPUTS), axes, precisions, ("encoder_hidden_states",))
    del graph
    written, graphs = _export_graph(job, work)
    written.append(write_lora_targets(fingerprints, work, name, graphs))
    del job
    _release_memory()
    attention = wan_transformer_attention(expert.unet.config)
    return _component(name, "fused_step", work, graphs, attention=attention), written


def _export_decoder(vae_source: Any, work: Path) -> tuple[dict[str, Component], list[str], int]:
    """``vae_decoder`` (latent frame 0 → video frame 0 and every cache) and ``vae_decoder_chunk``
    (a later latent frame and the caches → 4 video frames and the next caches), fp32."""
    vae, owned = _load("vae_decoder", vae_source)
    prepare_vae(vae)
    video_channels, specs = _layout(vae)
    axes = cache_axes(specs)
    n = len(specs)
    dtype, z = next(vae.parameters()).dtype, int(vae.config.z_dim)
    outputs = [VIDEO, *(next_cache_name(k) for k in range(n))]
    out_axes = {VIDEO: VIDEO_AXES} | {next_cache_name(k): axes[k] for k in range(n)}
    cache_shapes = {next_cache_name(k): ["batch", s["channels"], CACHE_T, axes[k][3], axes[k][4]]
                    for k, s in enumerate(specs)}
    _, h, w = TRACE_LATENT
    _, ch, cw = CHECK_LATENT
    jobs = [
        ("vae_decoder", WanDecoderFirst(vae).eval(), first_inputs(1, h, w, channels=z),
         first_inputs(2, ch, cw, channels=z, seed=1), {LATENTS: VAE_LATENT_AXES} | out_axes, 1),
        (CHUNK_DECODER, WanDecoderChunk(vae).eval(), chunk_inputs(specs, 1, h, w, channels=z, dtype=dtype),
         chunk_inputs(specs, 2, ch, cw, channels=z, seed=1, dtype=dtype),
         {LATENTS: VAE_LATENT_AXES} | {cache_name(k): axes[k] for k in range(n)} | out_axes, FRAMES_PER_CHUNK),
    ]
    components: dict[str, Component] = {}
    files: list[str] = []
    for name, module, inputs, check, graph_axes, frames in jobs:
        job = _Graph(name, module, False, inputs, check, outputs, graph_axes, ("fp32",))
        written, graphs = _export_graph(job, work)
        video = ["batch", video_channels, frames, VIDEO_AXES[3], VIDEO_AXES[4]]
        declare_output_shapes(work / graphs["fp32"][0], {VIDEO: video} | cache_shapes)
        components[name] = _component(name, "vae_decoder", work, graphs, attention=vae_attention(vae.config))
        files += written
    del vae, jobs
    if owned:
        _release_memory()
    return components, files, z


__all__ = ["default_switch", "is_wan_folder", "load_wan", "write_wan_graphs"]
