"""End-to-end parity with diffusers (the oracle) on random tiny models, ORT CPU.

Same latents, prompt, steps, guidance and scheduler on both sides. The acceptance bar
is PSNR >= 40 dB, but on these tiny random models a wrong switch point can still reach
~40 dB (see the control test), so parity is held to MIN_PSNR instead; measured values are
80 dB to inf (identical 8-bit images).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import psnr
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

SCHEDULERS = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
PROMPT = "a lighthouse at dusk"
MIN_PSNR = 60.0


@pytest.fixture(scope="module")
def diffusers_pair(models_dir):
    base = StableDiffusionXLPipeline.from_pretrained(models_dir / "base").to(torch.float32)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(models_dir / "refiner").to(torch.float32)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return base, refiner


def _use_sampler(pipe, sampler: str) -> None:
    config = EulerDiscreteScheduler.load_config(pipe.config._name_or_path, subfolder="scheduler")
    pipe.scheduler = SCHEDULERS[sampler].from_config(config)


def _latents(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, height // 2, width // 2, generator=g)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)


def _ours(pipe, latents: torch.Tensor, **kwargs) -> np.ndarray:
    out = pipe.generate(PROMPT, latents=latents.numpy(), num_images=latents.shape[0], **kwargs)
    return np.stack([np.asarray(image) for image in out.images])


@pytest.mark.parametrize(
    "sampler, switch, size, guidance, steps, negative",
    [
        ("euler", 0.8, (32, 32), 5.0, 10, ""),
        ("euler", 0.5, (48, 32), 7.5, 8, "blurry"),
        ("ddim", 0.8, (32, 32), 5.0, 10, ""),
        ("ddim", 0.3, (32, 48), 3.0, 7, "blurry"),
        ("dpmpp_2m", 0.8, (32, 32), 5.0, 10, ""),
        ("dpmpp_2m", 0.55, (32, 32), 6.0, 9, ""),
    ],
)
def test_sdxl_ensemble_matches_diffusers(diffusers_pair, sdxl_pipe, sampler, switch, size, guidance, steps, negative):
    base, refiner = diffusers_pair
    _use_sampler(base, sampler)
    _use_sampler(refiner, sampler)
    height, width = size
    latents = _latents(2 if negative else 1, height, width)
    common = dict(num_inference_steps=steps, guidance_scale=guidance, negative_prompt=negative or None,
                  num_images_per_prompt=latents.shape[0])
    handoff = base(PROMPT, latents=latents.clone(), height=height, width=width, denoising_end=switch,
                   output_type="latent", **common).images
    reference = refiner(PROMPT, image=handoff, denoising_start=switch, output_type="np", **common).images
    ours = _ours(sdxl_pipe, latents, steps=steps, guidance=guidance, switch=switch, sampler=sampler,
                 height=height, width=width, negative_prompt=negative)
    assert ours.shape == reference.shape
    value = psnr(ours, _to_uint8(reference))
    print(f"PSNR {value:.1f} dB")
    assert value >= MIN_PSNR


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
def test_single_expert_matches_diffusers(diffusers_pair, sdxl_pipe, sampler):
    """switch = 1: the composition expert alone must equal the diffusers base pipeline."""
    base, _ = diffusers_pair
    _use_sampler(base, sampler)
    latents = _latents(1, 32, 32, seed=3)
    reference = base(PROMPT, latents=latents.clone(), num_inference_steps=12, guidance_scale=4.0,
                     output_type="np").images
    ours = _ours(sdxl_pipe, latents, steps=12, guidance=4.0, switch=1.0, sampler=sampler)
    value = psnr(ours, _to_uint8(reference))
    print(f"PSNR {value:.1f} dB")
    assert value >= MIN_PSNR


def test_history_reset_makes_the_dpm_step_at_the_switch_first_order(sdxl_pipe):
    """The detail expert's first DPM++(2M) step is first order, as with diffusers' fresh refiner
    scheduler; carrying the composition expert's history over would change the image."""
    from artrt.runtime.experts import plan_experts
    from artrt.runtime.samplers import plan_steps
    from artrt.runtime.schedules import Sampler

    plan = plan_steps(sdxl_pipe.schedule, Sampler.DPMPP_2M, 10)
    segments = plan_experts(plan.timesteps, 0.8, 1000, (5.0, 5.0))
    k = segments[1].start
    reset = plan_steps(sdxl_pipe.schedule, Sampler.DPMPP_2M, 10, history_resets=(k,))
    c = reset.scalars[:, 7]
    assert c[k] == 0.0 and plan.scalars[k, 7] != 0.0
    np.testing.assert_array_equal(np.delete(reset.scalars, k, axis=0), np.delete(plan.scalars, k, axis=0))


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_same_arch_experts_match_reference_loop(models_dir, same_arch_package, sampler):
    """Same-architecture experts against a loop written with diffusers components."""
    from artrt.runtime import Pipeline

    base = StableDiffusionXLPipeline.from_pretrained(models_dir / "base")
    detail = UNet2DConditionModel.from_pretrained(models_dir / "detail_unet").eval()
    _use_sampler(base, sampler)
    steps, guidance, switch, height, width = 9, 5.0, 0.6, 32, 32
    latents = _latents(1, height, width, seed=5)
    reference = _reference_loop(base, detail, latents, steps, guidance, switch, height, width)
    with Pipeline.load(same_arch_package, backend="ort-cpu") as pipe:
        ours = _ours(pipe, latents, steps=steps, guidance=guidance, switch=switch, sampler=sampler)
    value = psnr(ours, _to_uint8(reference))
    print(f"PSNR {value:.1f} dB")
    assert value >= MIN_PSNR


@torch.no_grad()
def _reference_loop(base, detail, latents, steps, guidance, switch, height, width) -> np.ndarray:
    scheduler = base.scheduler
    cond, uncond, pooled, uncond_pooled = base.encode_prompt(PROMPT, do_classifier_free_guidance=True)
    embeds = torch.cat([uncond, cond])
    added = {
        "text_embeds": torch.cat([uncond_pooled, pooled]),
        "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * 2, dtype=torch.float32),
    }
    cutoff = round(1000 - switch * 1000)
    scheduler.set_timesteps(steps)
    x = latents * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps.clone()):
        unet = base.unet if t >= cutoff else detail
        if unet is detail and i > 0 and scheduler.timesteps[i - 1] >= cutoff:
            # The detail expert starts with a fresh scheduler, as the SDXL refiner does.
            scheduler = type(scheduler).from_config(scheduler.config)
            scheduler.set_timesteps(steps)
            scheduler.set_begin_index(i)
        x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        out = unet(x_in, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
        out_uncond, out_cond = out.chunk(2)
        x = scheduler.step(out_uncond + guidance * (out_cond - out_uncond), t, x).prev_sample
    image = base.vae.decode(x / base.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_control_a_wrong_switch_fails_the_bar(diffusers_pair, sdxl_pipe):
    """The comparison can fail: diffusers at switch 0.6 vs artrt at 0.8 is far below MIN_PSNR."""
    base, refiner = diffusers_pair
    _use_sampler(base, "euler")
    _use_sampler(refiner, "euler")
    latents = _latents(1, 32, 32)
    handoff = base(PROMPT, latents=latents.clone(), denoising_end=0.6, num_inference_steps=10,
                   output_type="latent").images
    reference = refiner(PROMPT, image=handoff, denoising_start=0.6, num_inference_steps=10, output_type="np").images
    ours = _ours(sdxl_pipe, latents, steps=10, guidance=5.0, switch=0.8, sampler="euler")
    assert psnr(ours, _to_uint8(reference)) < MIN_PSNR - 10
