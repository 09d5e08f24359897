"""LoRA per expert against diffusers (the oracle) on the tiny random SDXL pair, ORT CPU.

The same LoRA files (random and non-zero, made with peft: tests/lora_helpers.py), scales,
latents and scheduler on both sides (Euler, 8 steps, switch 0.5, so the detail expert runs half
the steps); diffusers applies them with ``load_lora_weights`` + ``set_adapters``. Bar: 40 dB
(measured: 74 dB to inf). Each case also checks the control:
the image without the adapter is below the bar against the same reference, so the
comparison does see the adapter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import psnr
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from lora_helpers import lora_package, make_lora_files
from PIL import Image

from artrt.runtime import Lora, Pipeline

# diffusers loads a second adapter into a model that has one: what the stacked case is about
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")

PROMPT = "a lighthouse at dusk"
STEPS, GUIDANCE, SWITCH, SIZE = 8, 5.0, 0.5, 32
BAR = 40.0


@pytest.fixture(scope="module")
def package(sdxl_package, models_dir, tmp_path_factory) -> Path:
    return lora_package(sdxl_package, models_dir, tmp_path_factory.mktemp("lora") / "pkg")


@pytest.fixture(scope="module")
def files(models_dir, tmp_path_factory) -> dict[str, Path]:
    return make_lora_files(models_dir, tmp_path_factory.mktemp("lora_files"))


@pytest.fixture(scope="module")
def pipe(package):
    with Pipeline.load(package, backend="ort-cpu", threads=1) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def diffusers_pair(models_dir):
    base = StableDiffusionXLPipeline.from_pretrained(models_dir / "base").to(torch.float32)
    # The package holds one text_encoder_2 for both experts: the refiner shares the base's, as in
    # diffusers' base + refiner example, so a LoRA on it changes both (artrt: expert "both").
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        models_dir / "refiner", text_encoder_2=base.text_encoder_2).to(torch.float32)
    for p in (base, refiner):
        p.set_progress_bar_config(disable=True)
    return base, refiner


LATENTS = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))


def _reference(diffusers_pair, loras: list[Lora]) -> np.ndarray:
    """diffusers' image with ``loras`` loaded into the base (composition) and refiner (detail) pipelines
    (text-encoder weights through the base, whose text_encoder_2 the refiner shares)."""
    pipes = dict(zip(("composition", "detail"), diffusers_pair))
    try:
        for name, p in pipes.items():
            mine = [(k, lora) for k, lora in enumerate(loras) if lora.expert in (name, "both")
                    and (name == "composition" or "unet" in lora.file.stem or "detail" in lora.file.stem)]
            for k, lora in mine:
                p.load_lora_weights(str(lora.file.parent), weight_name=lora.file.name, adapter_name=f"l{k}")
            if mine:
                p.set_adapters([f"l{k}" for k, _ in mine], [lora.scale for _, lora in mine])
        common = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE)
        handoff = pipes["composition"](PROMPT, latents=LATENTS.clone(), denoising_end=SWITCH, output_type="latent",
                                       **common).images
        image = pipes["detail"](PROMPT, image=handoff, denoising_start=SWITCH, output_type="np", **common).images
    finally:
        for p in pipes.values():
            p.unload_lora_weights()
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def _ours(pipe: Pipeline) -> np.ndarray:
    out = pipe.generate(PROMPT, latents=LATENTS.numpy(), steps=STEPS, guidance=GUIDANCE, switch=SWITCH,
                        sampler="euler")
    return np.stack([np.asarray(image) for image in out.images])


CASES = {
    "composition": [("a", 0.8, "composition")],
    "composition-kohya-sgm-fp16": [("b_kohya", 1.0, "composition")],
    "detail": [("detail", 0.7, "detail")],
    "detail-kohya-bf16": [("detail_kohya", 1.3, "detail")],
    "two-stacked-on-composition": [("a", 0.8, "composition"), ("b_kohya", 0.5, "composition")],
    "one-per-expert": [("a", 0.6, "composition"), ("detail", 1.2, "detail")],
    "text-encoders": [("text", 1.0, "both")],
}


@pytest.mark.parametrize("case", CASES)
def test_loras_match_diffusers(pipe, files, diffusers_pair, case):
    loras = [Lora(files[key], scale, expert) for key, scale, expert in CASES[case]]
    reference = _reference(diffusers_pair, loras)
    pipe.set_loras([])
    plain = _ours(pipe)
    pipe.set_loras(loras)
    ours = _ours(pipe)
    value, control = psnr(ours, reference), psnr(plain, reference)
    print(f"{case}: PSNR {value:.1f} dB; without the LoRA {control:.1f} dB")
    assert value >= BAR
    assert control < BAR  # ignoring the adapter fails the bar


def test_scale_zero_is_exactly_no_lora(pipe, files):
    pipe.set_loras([])
    plain = _ours(pipe)
    pipe.set_loras([Lora(files["a"], 0.0, "composition"), Lora(files["text"], 0, "both")])
    assert np.array_equal(_ours(pipe), plain)
    assert [r["scale"] for r in pipe.loras] == [0.0, 0.0]


def test_swaps_are_each_a_fresh_load(package, files, tmp_path):
    """A -> B -> none on one pipeline: each image equals a fresh load with that set (never stacked);
    a low-memory load, whose engines get the weights as they open, gives the same images."""
    sets = {"A": [Lora(files["a"], 0.8, "composition")],
            "B": [Lora(files["b_kohya"], 1.0, "composition"), Lora(files["detail"], 0.5, "detail")],
            "none": []}
    with Pipeline.load(package, backend="ort-cpu", threads=1, loras=sets["A"]) as swapped:
        for name, loras in sets.items():
            swapped.set_loras(loras)
            got = _ours(swapped)
            with Pipeline.load(package, backend="ort-cpu", threads=1, loras=loras) as fresh:
                assert np.array_equal(got, _ours(fresh)), name
            if name == "B":
                with Pipeline.load(package, backend="ort-cpu", threads=1, loras=loras, memory="low") as low:
                    assert np.array_equal(got, _ours(low))
                result = swapped.generate(PROMPT, steps=2)
                saved = result.save(tmp_path / "b.png")[0]
                recorded = Image.open(saved).text["parameters"]
                assert "b_kohya.safetensors" in recorded and '"expert": "detail"' in recorded
                assert result.parameters["loras"][1] == {"file": str(files["detail"]), "scale": 0.5,
                                                         "expert": "detail", "sha256": swapped.loras[1]["sha256"]}
        assert "loras" not in swapped.generate(PROMPT, steps=2).parameters
