"""Read local diffusers folders into the parts a package is made of.

Two layouts (DESIGN.md, "Model families"):

- ``sdxl-ensemble``: an SDXL base (composition expert) and an SDXL refiner (detail
  expert) with its own conditioning: text_encoder_2 only and aesthetic-score time ids.
- ``same-arch``: one pipeline folder plus a second UNet of the same config (the seed's
  design, eDiff-I): both experts share the pipeline's text encoder(s) and VAE.

Nothing is loaded here but configs and tokenizers: every model is a :class:`LazyModule`
that export loads right before exporting it and frees after (DESIGN.md, "Memory"), so the
memory an export needs is set by its largest component, not by the sum of them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from artrt.errors import ConfigError, InputError
from artrt.runtime.package import Conditioning
from artrt.runtime.schedules import ScheduleConfig

from .weights import LazyModule, safetensors_header, weight_files

log = logging.getLogger(__name__)

SAMPLER_OF_SCHEDULER = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}
SDXL_PIPELINES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"}
SD_PIPELINES = {"StableDiffusionPipeline"}


@dataclass
class TextEncoderSource:
    name: str
    model: torch.nn.Module | LazyModule
    tokenizer: Any  # a transformers *fast* tokenizer
    hidden_layer: int | None  # None: final state; -2: penultimate layer
    pooled: bool
    mask_pad_id: int | None = None  # bidirectional encoders: mask padding (see TextEncoderGraph)


@dataclass
class ExpertSource:
    name: str
    unet: torch.nn.Module | LazyModule
    conditioning: Conditioning
    patch: int = 1  # pixel-space UNets on space-to-depth input (see FusedStepGraph)


@dataclass
class ModelSources:
    """Everything a package is made of. Models are modules, or :class:`LazyModule` loaders that
    export calls one at a time (``load_*`` below return those: memory bounded by one component)."""

    family: str
    text_encoders: dict[str, TextEncoderSource]
    experts: list[ExpertSource]
    vae: torch.nn.Module | LazyModule | None
    schedule: ScheduleConfig
    default_sampler: str
    latent_scale: int
    info: dict[str, Any] = field(default_factory=dict)


def _model_index(folder: Path) -> dict[str, Any]:
    path = folder / "model_index.json"
    if not path.is_file():
        raise InputError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    return json.loads(path.read_text())


def _schedule(folder: Path) -> tuple[ScheduleConfig, str]:
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    name = config.get("_class_name", "")
    return ScheduleConfig.from_diffusers(config), SAMPLER_OF_SCHEDULER.get(name, "euler")


def _from_pretrained(cls: type, folder: Path) -> torch.nn.Module:
    return cls.from_pretrained(folder).float().eval()


def _load_text_encoder(folder: Path, sub: str, tok_sub: str, name: str, hidden_layer: int | None):
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    cls_name = _model_index(folder)[sub][1]
    if cls_name not in classes:
        raise ConfigError(f"{folder}/{sub}: text encoder class {cls_name} is not supported")
    cls = classes[cls_name]
    config = cls.config_class.from_pretrained(folder / sub)
    files = weight_files(folder / sub, "model", "pytorch_model.bin")
    model = LazyModule(folder / sub, functools.partial(_from_pretrained, cls, folder / sub), config, files)
    tokenizer = AutoTokenizer.from_pretrained(folder / tok_sub, use_fast=True)
    pooled = cls_name == "CLIPTextModelWithProjection"
    return TextEncoderSource(name, model, tokenizer, hidden_layer, pooled)


def _diffusers_config(cls: type, folder: Path) -> Any:
    """A diffusers model's config as ``from_pretrained`` would set it (the JSON over the constructor's
    defaults), read without building the model."""
    from diffusers.configuration_utils import FrozenDict

    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return FrozenDict({**defaults, **cls.load_config(folder)})


def _load_unet(folder: Path) -> LazyModule:
    from diffusers import UNet2DConditionModel

    if not (folder / "config.json").is_file():
        raise InputError(f"{folder} is not a diffusers UNet folder (no config.json)")
    files = weight_files(folder, "diffusion_pytorch_model", "diffusion_pytorch_model.bin")
    config = _diffusers_config(UNet2DConditionModel, folder)
    return LazyModule(folder, functools.partial(_from_pretrained, UNet2DConditionModel, folder), config, files)


def _load_vae(folder: Path) -> tuple[LazyModule, int]:
    from diffusers import AutoencoderKL

    sub = folder / "vae"
    files = weight_files(sub, "diffusion_pytorch_model", "diffusion_pytorch_model.bin")
    config = _diffusers_config(AutoencoderKL, sub)
    vae = LazyModule(sub, functools.partial(_from_pretrained, AutoencoderKL, sub), config, files)
    return vae, 2 ** (len(config.block_out_channels) - 1)


def _public_config(module: torch.nn.Module | LazyModule) -> dict[str, Any]:
    return {k: v for k, v in dict(module.config).items() if not k.startswith("_")}


def _same_weights(a: LazyModule, b: LazyModule) -> bool:
    """Whether two models hold the same fp32 weights: compared tensor by tensor from their
    safetensors files (memory: one tensor), or, for pickle checkpoints, loaded whole."""
    if not a.files or not b.files or any(f.suffix != ".safetensors" for f in (*a.files, *b.files)):
        sa, sb = a().state_dict(), b().state_dict()
        return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)
    from safetensors import safe_open

    def keys(files: tuple[Path, ...]) -> dict[str, Path]:
        return {k: f for f in files for k in safetensors_header(f) if k != "__metadata__"}

    ka, kb = keys(a.files), keys(b.files)
    if ka.keys() != kb.keys():
        return False
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), "pt")) for f in (*a.files, *b.files)}
        return all(torch.equal(handles[ka[k]].get_tensor(k).float(), handles[kb[k]].get_tensor(k).float())
                   for k in ka)


def _has(index: dict, component: str) -> bool:
    """Whether a model_index.json lists ``component`` (a refiner lists text_encoder as [null, null])."""
    entry = index.get(component)
    return isinstance(entry, list) and any(entry)


def load_sdxl_ensemble(base: Path, refiner: Path) -> ModelSources:
    """SDXL base (t >= cutoff) + SDXL refiner (t < cutoff), each with its own conditioning."""
    base_index, refiner_index = _model_index(base), _model_index(refiner)
    if base_index.get("_class_name") not in SDXL_PIPELINES:
        raise ConfigError(f"{base}: --base must be an SDXL pipeline, found {base_index.get('_class_name')}")
    if refiner_index.get("_class_name") not in SDXL_PIPELINES:
        raise ConfigError(f"{refiner}: --refiner must be an SDXL pipeline folder")
    if not _has(base_index, "text_encoder") and _has(refiner_index, "text_encoder"):
        raise ConfigError(f"--base {base} looks like a refiner (no text_encoder) and --refiner {refiner} like a "
                          "base: swap them")
    if not _has(base_index, "text_encoder"):
        raise ConfigError(f"--base {base} has no text_encoder: the composition expert must be an SDXL base "
                          "pipeline (two text encoders)")
    encoders = {
        "text_encoder": _load_text_encoder(base, "text_encoder", "tokenizer", "text_encoder", -2),
        "text_encoder_2": _load_text_encoder(base, "text_encoder_2", "tokenizer_2", "text_encoder_2", -2),
    }
    refiner_te = _load_text_encoder(refiner, "text_encoder_2", "tokenizer_2", "refiner_text_encoder_2", -2)
    if _same_weights(refiner_te.model, encoders["text_encoder_2"].model):
        refiner_te_name = "text_encoder_2"
    else:
        log.info("the refiner's text_encoder_2 differs from the base's; exporting both")
        refiner_te_name = refiner_te.name
        encoders[refiner_te_name] = refiner_te
    base_cond = Conditioning(
        text_encoders=("text_encoder", "text_encoder_2"),
        pooled="text_encoder_2",
        time_ids="aesthetic" if base_index.get("requires_aesthetics_score") else "size",
        zero_negative_when_empty=bool(base_index.get("force_zeros_for_empty_prompt", True)),
    )
    refiner_cond = Conditioning(
        text_encoders=(refiner_te_name,),
        pooled=refiner_te_name,
        time_ids="aesthetic" if refiner_index.get("requires_aesthetics_score") else "size",
        zero_negative_when_empty=bool(refiner_index.get("force_zeros_for_empty_prompt", True)),
    )
    schedule, sampler = _schedule(base)
    if _schedule(refiner)[0] != schedule:
        log.warning("the refiner's scheduler config differs from the base's; the base's is used")
    vae, scale = _load_vae(base)
    experts = [
        ExpertSource("composition", _load_unet(base / "unet"), base_cond),
        ExpertSource("detail", _load_unet(refiner / "unet"), refiner_cond),
    ]
    info = {"base": str(base), "refiner": str(refiner)}
    return ModelSources("sdxl-ensemble", encoders, experts, vae, schedule, sampler, scale, info)


def load_same_arch(base: Path, detail_unet: Path) -> ModelSources:
    """A pipeline (SD 1.x/2.x or SDXL) whose UNet is the composition expert, plus a detail UNet."""
    index = _model_index(base)
    kind = index.get("_class_name")
    if kind in SDXL_PIPELINES:
        encoders = {
            "text_encoder": _load_text_encoder(base, "text_encoder", "tokenizer", "text_encoder", -2),
            "text_encoder_2": _load_text_encoder(base, "text_encoder_2", "tokenizer_2", "text_encoder_2", -2),
        }
        cond = Conditioning(
            text_encoders=("text_encoder", "text_encoder_2"),
            pooled="text_encoder_2",
            time_ids="aesthetic" if index.get("requires_aesthetics_score") else "size",
            zero_negative_when_empty=bool(index.get("force_zeros_for_empty_prompt", True)),
        )
    elif kind in SD_PIPELINES:
        encoders = {"text_encoder": _load_text_encoder(base, "text_encoder", "tokenizer", "text_encoder", None)}
        cond = Conditioning(text_encoders=("text_encoder",))
    else:
        raise ConfigError(f"{base}: pipeline {kind} is not supported (SD, SDXL)")
    composition = _load_unet(base / "unet")
    detail = _load_unet(detail_unet)
    if _public_config(detail) != _public_config(composition):
        raise ConfigError(f"{detail_unet}: the detail UNet's config differs from {base}/unet")
    schedule, sampler = _schedule(base)
    vae, scale = _load_vae(base)
    experts = [ExpertSource("composition", composition, cond), ExpertSource("detail", detail, cond)]
    info = {"base": str(base), "detail_unet": str(detail_unet)}
    return ModelSources("same-arch", encoders, experts, vae, schedule, sampler, scale, info)
