"""Randomly initialised diffusers models built from configs, for tests and benchmarks.

Nothing is downloaded: the CLIP tokenizer is a byte-level vocabulary without merges
(every character is a token), which is a valid CLIP BPE tokenizer. ``tiny`` models
export in seconds; ``small`` ones are big enough for compute to dominate a step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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
    """Widths of the random models (text width per encoder, UNet channels, sample size)."""

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


def _text_config(s: Sizes, vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=s.text_width,
        intermediate_size=2 * s.text_width,
        num_hidden_layers=s.text_layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=s.text_width,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="gelu",
    )


def _unet(s: Sizes, cross_dim: int, n_time_ids: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
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


def _vae(s: Sizes) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(s.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(s.vae_channels),
        block_out_channels=s.vae_channels,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=s.sample_size * 2,
    )


def _scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )


def make_sdxl_pair(
    out: str | Path, size: str = "tiny", seed: int = 0
) -> tuple[StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline]:
    """Build a random SDXL base + refiner pair and save both under ``out/base``, ``out/refiner``.

    As in the real pair, the refiner shares ``text_encoder_2`` and the VAE, conditions
    on text_encoder_2 only and uses 5 time ids with aesthetic scores.
    """
    s = SIZES[size]
    out = Path(out)
    torch.manual_seed(seed)
    tok = make_clip_tokenizer(out / "_tokenizer")
    te1 = CLIPTextModel(_text_config(s, len(tok))).eval()
    te2 = CLIPTextModelWithProjection(_text_config(s, len(tok))).eval()
    vae = _vae(s).eval()
    base = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok,
        unet=_unet(s, 2 * s.text_width, 6).eval(),
        scheduler=_scheduler(),
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=te2,
        tokenizer=None,
        tokenizer_2=tok,
        unet=_unet(s, s.text_width, 5).eval(),
        scheduler=_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    for name, pipe in (("base", base), ("refiner", refiner)):
        pipe.save_pretrained(out / name)
        _add_sdxl_scheduler_keys(out / name / "scheduler" / "scheduler_config.json")
    return base, refiner


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


def main(argv: list[str] | None = None) -> None:
    """``python -m artrt.export.random_models OUT``: write a random SDXL pair and a detail UNet."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", type=Path, help="folder to create (base/, refiner/, detail_unet/)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    base, _ = make_sdxl_pair(args.out, args.size, args.seed)
    make_detail_unet(base.unet, args.out / "detail_unet", args.seed + 1)
    print(f"wrote {args.out}/base, {args.out}/refiner and {args.out}/detail_unet")


if __name__ == "__main__":
    main()
