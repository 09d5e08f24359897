"""Randomly initialised diffusers models built from configs, for tests and benchmarks.

Nothing is downloaded: the CLIP tokenizer is a byte-level vocabulary without merges
(every character is a token), which is a valid CLIP BPE tokenizer. Sizes:

- ``tiny``: exports in seconds (the tests); ``small``: big enough for compute to dominate a step.
- ``large``: SDXL's real UNet and VAE widths with one transformer layer per block, so each
  UNet holds more than 2 GiB of fp32 weights (base 641 M parameters, 2.39 GiB; refiner
  624 M, 2.32 GiB) and exports in minutes: the scale at which ONNX needs external data.
  Text encoders have SDXL's widths (768 and 1280, so cross-attention is 2048 wide and the
  pooled embedding 1280) and vocabulary but 4 layers instead of 12 and 32.
- ``xl``: SDXL's full configs (2.6 B parameter base UNet, CLIP-L and OpenCLIP bigG text
  encoders, the 4-level refiner UNet): about 23 GB of fp32 files, for manual runs only.

Components are built and written one at a time (peak memory: the largest component).
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


@dataclass(frozen=True)
class Sizes:
    """Widths of the tiny and small random models (text width per encoder, UNet channels, sample size)."""

    text_width: int
    text_layers: int
    unet_channels: tuple[int, ...]
    sample_size: int  # UNet latent size; image size = sample_size * 2 (two VAE blocks)
    vae_channels: tuple[int, ...]


SIZES = {
    "tiny": Sizes(16, 2, (16, 32), 16, (8, 16)),
    "small": Sizes(64, 3, (64, 128), 64, (32, 64)),
}
TIME_EMBED_DIM = 8
CLIP_VOCAB = 49408  # the CLIP BPE vocabulary size of SDXL's text encoders (large, xl)


@dataclass(frozen=True)
class PairConfigs:
    """Constructor arguments of every model of a random SDXL base + refiner pair."""

    text_encoder: dict[str, Any]  # CLIPTextConfig (base only)
    text_encoder_2: dict[str, Any]  # CLIPTextConfig with projection (shared)
    base_unet: dict[str, Any]  # UNet2DConditionModel
    refiner_unet: dict[str, Any]
    vae: dict[str, Any]  # AutoencoderKL (shared)


def make_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the 512 byte-level symbols plus specials."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _clip(tokens: int, width: int, layers: int, heads: int, ffn: int, act: str, vocab: int) -> dict[str, Any]:
    """A CLIP text config; ``tokens`` is the tokenizer's size (its last two ids are BOS and EOS)."""
    return dict(
        vocab_size=vocab, hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, projection_dim=width,
        bos_token_id=tokens - 2, eos_token_id=tokens - 1, pad_token_id=tokens - 1, hidden_act=act,
    )


def _small_unet_config(s: Sizes, cross_dim: int, n_time_ids: int) -> dict[str, Any]:
    return dict(
        sample_size=s.sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=s.unet_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        cross_attention_dim=cross_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=n_time_ids * TIME_EMBED_DIM + s.text_width,
        transformer_layers_per_block=(1, 1),
    )


def _unet(s: Sizes, cross_dim: int, n_time_ids: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(**_small_unet_config(s, cross_dim, n_time_ids))


def _sdxl_unet_config(cross_dim: int, n_time_ids: int, pooled: int, layers: Any, refiner: bool) -> dict[str, Any]:
    """SDXL's UNet configs: the base's 3 levels (320/640/1280) or the refiner's 4 (384/768/1536/1536);
    heads of 64 channels, time ids embedded in 256 channels each."""
    if refiner:
        blocks = dict(block_out_channels=(384, 768, 1536, 1536), attention_head_dim=(6, 12, 24, 24),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    else:
        blocks = dict(block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    return dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
        cross_attention_dim=cross_dim, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=n_time_ids * 256 + pooled,
        transformer_layers_per_block=layers, **blocks,
    )


def _vae_config(channels: tuple[int, ...], groups: int, sample_size: int, **extra: Any) -> dict[str, Any]:
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels, latent_channels=4,
        norm_num_groups=groups, sample_size=sample_size, **extra,
    )


def pair_configs(size: str, tokens: int = 514) -> PairConfigs:
    """The configs of one size (see the module docstring); ``tokens``: the tokenizer's vocabulary size."""
    if size in SIZES:
        s = SIZES[size]
        text = _clip(tokens, s.text_width, s.text_layers, 2, 2 * s.text_width, "gelu", tokens)
        return PairConfigs(text, text, _small_unet_config(s, 2 * s.text_width, 6),
                           _small_unet_config(s, s.text_width, 5), _vae_config(s.vae_channels, 8, s.sample_size * 2))
    if size not in ("large", "xl"):
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZE_NAMES)}")
    xl = size == "xl"
    clip_l = _clip(tokens, 768, 12 if xl else 4, 12, 3072, "quick_gelu", CLIP_VOCAB)
    clip_g = _clip(tokens, 1280, 32 if xl else 4, 20, 5120, "gelu", CLIP_VOCAB)
    vae = _vae_config((128, 256, 512, 512), 32, 1024, layers_per_block=2, scaling_factor=0.13025, force_upcast=True)
    # large: both UNets at the base's widths, one transformer layer per block (> 2 GiB each).
    base_layers, refiner_layers = ((1, 2, 10), 4) if xl else ((1, 1, 1), (1, 1, 1))
    return PairConfigs(clip_l, clip_g, _sdxl_unet_config(2048, 6, 1280, base_layers, refiner=False),
                       _sdxl_unet_config(1280, 5, 1280, refiner_layers, refiner=xl), vae)


SIZE_NAMES = (*SIZES, "large", "xl")


def _scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )


def _model_index(cls: type, components: dict[str, tuple[str, str] | None], **flags: Any) -> dict[str, Any]:
    """A pipeline's model_index.json as ``save_pretrained`` writes it."""
    import diffusers

    index: dict[str, Any] = {"_class_name": cls.__name__, "_diffusers_version": diffusers.__version__, **flags}
    for name in ("feature_extractor", "image_encoder", "scheduler", "text_encoder", "text_encoder_2", "tokenizer",
                 "tokenizer_2", "unet", "vae"):
        entry = components.get(name)
        index[name] = list(entry) if entry else [None, None]
    return index


def _save(module: torch.nn.Module, folders: list[Path], half: bool = False) -> None:
    if half:
        module.half()
    for folder in folders:
        module.save_pretrained(folder)


def write_sdxl_pair(out: str | Path, size: str = "tiny", seed: int = 0, half: bool = False) -> None:
    """Write a random SDXL base + refiner pair under ``out/base`` and ``out/refiner``.

    As in the real pair, the refiner shares ``text_encoder_2`` and the VAE, conditions on
    text_encoder_2 only and uses 5 time ids with aesthetic scores. Each model is built,
    written and freed before the next (the ``xl`` size would not fit in memory at once).
    ``half``: store the weights in fp16, as the released SDXL fp16 checkpoints do (half the disk;
    export loads them in fp32 either way).
    """
    out = Path(out)
    base, refiner = out / "base", out / "refiner"
    torch.manual_seed(seed)
    tok = make_clip_tokenizer(out / "_tokenizer")
    c = pair_configs(size, len(tok))
    for folder in (base / "tokenizer", base / "tokenizer_2", refiner / "tokenizer_2"):
        tok.save_pretrained(folder)
    builders = [  # in the order the random weights are drawn
        (lambda: CLIPTextModel(CLIPTextConfig(**c.text_encoder)), [base / "text_encoder"]),
        (lambda: CLIPTextModelWithProjection(CLIPTextConfig(**c.text_encoder_2)),
         [base / "text_encoder_2", refiner / "text_encoder_2"]),
        (lambda: AutoencoderKL(**c.vae), [base / "vae", refiner / "vae"]),
        (lambda: UNet2DConditionModel(**c.base_unet), [base / "unet"]),
        (lambda: UNet2DConditionModel(**c.refiner_unet), [refiner / "unet"]),
    ]
    for build, folders in builders:
        module = build().eval()
        _save(module, folders, half)
        del module
        gc.collect()
    scheduler = _scheduler()
    common = {"scheduler": ("diffusers", "EulerDiscreteScheduler"), "vae": ("diffusers", "AutoencoderKL"),
              "unet": ("diffusers", "UNet2DConditionModel"), "tokenizer_2": ("transformers", "CLIPTokenizer"),
              "text_encoder_2": ("transformers", "CLIPTextModelWithProjection")}
    indexes = {
        base: _model_index(StableDiffusionXLPipeline, {
            **common, "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
        }, force_zeros_for_empty_prompt=True),
        refiner: _model_index(StableDiffusionXLImg2ImgPipeline, common, force_zeros_for_empty_prompt=False,
                              requires_aesthetics_score=True),
    }
    for folder, index in indexes.items():
        scheduler.save_pretrained(folder / "scheduler")
        _add_sdxl_scheduler_keys(folder / "scheduler" / "scheduler_config.json")
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def make_sdxl_pair(
    out: str | Path, size: str = "tiny", seed: int = 0
) -> tuple[StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline]:
    """:func:`write_sdxl_pair`, then both pipelines loaded from what it wrote."""
    write_sdxl_pair(out, size, seed)
    out = Path(out)
    return (StableDiffusionXLPipeline.from_pretrained(out / "base"),
            StableDiffusionXLImg2ImgPipeline.from_pretrained(out / "refiner"))


def _add_sdxl_scheduler_keys(path: Path) -> None:
    """Add the DDIM-era keys that the released SDXL scheduler_config.json carries."""
    config = json.loads(path.read_text())
    config.update(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, sample_max_value=1.0)
    path.write_text(json.dumps(config, indent=2))


def make_detail_unet(base_unet: UNet2DConditionModel, out: str | Path, seed: int = 1) -> UNet2DConditionModel:
    """A second UNet with the base's config and different random weights (same-architecture expert)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(base_unet.config).eval()
    unet.save_pretrained(out)
    return unet


def write_detail_unet(base_unet: str | Path, out: str | Path, seed: int = 1) -> None:
    """:func:`make_detail_unet` from the config in the UNet folder ``base_unet`` (no weights loaded)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base_unet)).eval()
    unet.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    """``python -m artrt.export.random_models OUT``: write a random SDXL pair and a detail UNet."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", type=Path, help="folder to create (base/, refiner/, detail_unet/)")
    parser.add_argument("--size", choices=SIZE_NAMES, default="tiny",
                        help="tiny, small, large (SDXL widths, > 2 GiB per UNet) or xl (SDXL's full configs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--half", action="store_true", help="store the weights in fp16, as released SDXL fp16 "
                        "checkpoints do (half the disk: xl is 11.5 GB instead of 23 GB)")
    parser.add_argument("--no-detail-unet", action="store_true", help="write the SDXL pair only (no detail_unet/)")
    args = parser.parse_args(argv)
    write_sdxl_pair(args.out, args.size, args.seed, args.half)
    if args.no_detail_unet:
        print(f"wrote {args.out}/base and {args.out}/refiner")
        return
    write_detail_unet(args.out / "base" / "unet", args.out / "detail_unet", args.seed + 1)
    print(f"wrote {args.out}/base, {args.out}/refiner and {args.out}/detail_unet")


if __name__ == "__main__":
    main()
