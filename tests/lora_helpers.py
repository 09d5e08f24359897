"""Random, non-zero LoRA files made with peft on the tiny models, in diffusers and kohya format.

peft initialises ``lora_B`` to zero (the adapter starts as the identity), which would test
nothing: every LoRA matrix here is filled with seeded random values instead.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def random_adapter(module: torch.nn.Module, targets: Sequence[str], rank: int, alpha: float, seed: int,
                   std: float = 0.15) -> tuple[dict[str, torch.Tensor], dict]:
    """The PEFT state dict (``<module>.lora_A.weight`` / ``lora_B.weight``) and LoraConfig of a random
    adapter on ``module``, which is left as it was."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    module.add_adapter(config, adapter_name="random")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    state = get_peft_model_state_dict(module, adapter_name="random")
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    remove = getattr(module, "delete_adapters", None) or module.delete_adapter  # diffusers / transformers
    remove("random")
    return state, config.to_dict()


def save_diffusers_lora(path: Path, unet: dict | None = None, unet_config: dict | None = None,
                        text_encoder: dict | None = None, text_encoder_2: dict | None = None,
                        text_config: dict | None = None) -> Path:
    """A LoRA file as diffusers' ``StableDiffusionXLPipeline.save_lora_weights`` writes it."""
    from diffusers import StableDiffusionXLPipeline

    metadata = {}
    if unet_config is not None:
        metadata["unet_lora_adapter_metadata"] = _jsonable(unet_config)
    if text_config is not None:
        for key, layers in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
            if layers:
                metadata[f"{key}_lora_adapter_metadata"] = _jsonable(text_config)
    StableDiffusionXLPipeline.save_lora_weights(
        path.parent, unet_lora_layers=unet, text_encoder_lora_layers=text_encoder,
        text_encoder_2_lora_layers=text_encoder_2, weight_name=path.name, **metadata)
    return path


def _jsonable(config: dict) -> dict:
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()
            if isinstance(v, (int, float, str, bool, list, dict, set, type(None)))}


def sgm_name(name: str, layers_per_block: int) -> str:
    """A diffusers UNet module name (with ``_``) in the original SDXL UNet's blocks, as kohya's
    SDXL trainer names it: ``down_blocks_1_attentions_0_...`` -> ``input_blocks_4_1_...``."""
    per = layers_per_block + 1
    match = re.match(r"down_blocks_(\d+)_attentions_(\d+)_(.+)", name)
    if match:
        block, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"input_blocks_{block * per + layer + 1}_1_{rest}"
    match = re.match(r"mid_block_attentions_0_(.+)", name)
    if match:
        return f"middle_block_1_{match[1]}"
    match = re.match(r"up_blocks_(\d+)_attentions_(\d+)_(.+)", name)
    if match:
        block, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"output_blocks_{block * per + layer}_1_{rest}"
    return name


def save_kohya_lora(path: Path, unet: dict[str, torch.Tensor] | None, alpha: float,
                    text_encoders: dict[str, dict[str, torch.Tensor]] | None = None,
                    layers_per_block: int | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """The same adapters in kohya's format (``lora_unet_<module>.lora_down/lora_up/alpha``), with SGM
    block names when ``layers_per_block`` is given, stored in ``dtype`` (kohya files are fp16/bf16)."""
    out: dict[str, torch.Tensor] = {}
    parts = [("lora_unet", unet or {})]
    prefixes = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    parts += [(prefixes[k], v) for k, v in (text_encoders or {}).items()]
    for prefix, state in parts:
        for key, value in state.items():
            module, kind = key.rsplit(".lora_", 1)
            name = module.replace(".", "_")
            if layers_per_block is not None and prefix == "lora_unet":
                name = sgm_name(name, layers_per_block)
            part = "lora_down.weight" if kind.startswith("A") else "lora_up.weight"
            out[f"{prefix}_{name}.{part}"] = value.to(dtype)
            out[f"{prefix}_{name}.alpha"] = torch.tensor(float(alpha))
    save_file(out, str(path))
    return path


def lora_package(sdxl_package: Path, models_dir: Path, dst: Path) -> Path:
    """A copy of the SDXL test package with ``lora_targets.json`` for its experts and text encoders."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from artrt.export.lora_targets import add_lora_targets

    shutil.copytree(sdxl_package, dst)
    add_lora_targets(dst, {
        "expert_composition": UNet2DConditionModel.from_pretrained(models_dir / "base" / "unet"),
        "expert_detail": UNet2DConditionModel.from_pretrained(models_dir / "refiner" / "unet"),
        "text_encoder": CLIPTextModel.from_pretrained(models_dir / "base" / "text_encoder"),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(models_dir / "base" / "text_encoder_2"),
    })
    return dst


def make_lora_files(models_dir: Path, folder: Path) -> dict[str, Path]:
    """The LoRA files of these tests: diffusers and kohya format, on each expert and the text encoders."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    base = UNet2DConditionModel.from_pretrained(models_dir / "base" / "unet")
    refiner = UNet2DConditionModel.from_pretrained(models_dir / "refiner" / "unet")
    files = {}
    state, config = random_adapter(base, UNET_TARGETS, rank=4, alpha=8, seed=1)
    files["a"] = save_diffusers_lora(folder / "a.safetensors", unet=state, unet_config=config)
    state, _ = random_adapter(base, ("to_k", "to_out.0", "proj_out", "ff.net.2"), rank=2, alpha=3, seed=2)
    files["b_kohya"] = save_kohya_lora(folder / "b_kohya.safetensors", state, alpha=3, layers_per_block=1)
    # the detail expert runs the low-noise steps, where a weaker change would not move the image past the bar
    state, _ = random_adapter(refiner, UNET_TARGETS, rank=4, alpha=4, seed=3, std=0.5)  # alpha = rank: no metadata
    files["detail"] = save_diffusers_lora(folder / "detail.safetensors", unet=state)
    state, _ = random_adapter(refiner, ("to_q", "to_v", "ff.net.0.proj"), rank=3, alpha=6, seed=4, std=0.5)
    files["detail_kohya"] = save_kohya_lora(folder / "detail_kohya.safetensors", state, alpha=6, dtype=torch.bfloat16)
    te1, te1_config = random_adapter(CLIPTextModel.from_pretrained(models_dir / "base" / "text_encoder"),
                                     TEXT_TARGETS, rank=4, alpha=2, seed=5, std=0.3)
    te2, _ = random_adapter(CLIPTextModelWithProjection.from_pretrained(models_dir / "base" / "text_encoder_2"),
                            TEXT_TARGETS, rank=4, alpha=2, seed=6, std=0.3)
    files["text"] = save_diffusers_lora(folder / "text.safetensors", text_encoder=te1, text_encoder_2=te2,
                                        text_config=te1_config)
    return files
