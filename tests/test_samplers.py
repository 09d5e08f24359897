"""Step plans against diffusers' schedulers: whole trajectories with a fake network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from artrt.errors import ConfigError, InputError
from artrt.runtime.samplers import STEP_SCALARS, plan_steps
from artrt.runtime.schedules import Sampler, ScheduleConfig

SHAPE = (1, 4, 8, 8)
SCHEDULERS = {
    Sampler.EULER: EulerDiscreteScheduler,
    Sampler.EULER_A: EulerAncestralDiscreteScheduler,
    Sampler.DDIM: DDIMScheduler,
    Sampler.DPMPP_2M: DPMSolverMultistepScheduler,
}
# (sampler, use_karras_sigmas): every valid combination.
CASES = [(s, k) for s in Sampler for k in (False, True) if not (s is Sampler.DDIM and k)]


def diffusers_scheduler(config: ScheduleConfig, sampler: Sampler, num_steps: int):
    """A diffusers scheduler for ``config`` after ``set_timesteps(num_steps)``.

    EulerAncestralDiscreteScheduler has no Karras option: artrt's "euler_a" with Karras σ
    is that scheduler on EulerDiscreteScheduler's Karras σ and timesteps.
    """
    values = config.to_dict()
    karras = values.pop("use_karras_sigmas")
    set_alpha_to_one = values.pop("set_alpha_to_one")
    if sampler is Sampler.DDIM:
        scheduler = DDIMScheduler(**values, clip_sample=False, set_alpha_to_one=set_alpha_to_one)
    elif sampler is Sampler.EULER_A:
        scheduler = EulerAncestralDiscreteScheduler(**values)
    else:
        scheduler = SCHEDULERS[sampler](**values, use_karras_sigmas=karras)
    scheduler.set_timesteps(num_steps)
    if sampler is Sampler.EULER_A and karras:
        euler = EulerDiscreteScheduler(**values, use_karras_sigmas=True)
        euler.set_timesteps(num_steps)
        scheduler.sigmas, scheduler.timesteps = euler.sigmas, euler.timesteps
    return scheduler


def fake_net(x_in: torch.Tensor, t: float) -> torch.Tensor:
    """A deterministic stand-in for the (guided) network, in float32."""
    t = torch.tensor(float(t), dtype=torch.float32)
    return torch.tanh(0.3 * x_in) * (1 + t / 1000) + 0.1 * torch.cos(x_in)


def unit_noise(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def run_diffusers(scheduler, latents: torch.Tensor, start: int, stop: int, seed: int) -> torch.Tensor:
    """Steps [start, stop) as a diffusers pipeline runs them (begin index set, as SDXL does)."""
    generator = torch.Generator().manual_seed(seed)
    if hasattr(scheduler, "set_begin_index"):  # as the pipelines do; DDIM has no step index
        scheduler.set_begin_index(start)
    for t in scheduler.timesteps[start:stop]:
        model_input = scheduler.scale_model_input(latents, t)
        out = fake_net(model_input, t)
        latents = scheduler.step(out, t, latents, generator=generator).prev_sample
    return latents


def run_plan(plan, latents: np.ndarray, sampler: Sampler, seed: int) -> np.ndarray:
    """The fused step's formula in float32, noises drawn as diffusers' Euler ancestral does."""
    generator = torch.Generator().manual_seed(seed)
    x = latents.astype(np.float32)
    d_prev = np.zeros_like(x)
    for row in plan.scalars:
        c_in, t, c_skip, c_out, _, a, b, c, d = row
        noise = np.zeros_like(x)
        if sampler is Sampler.EULER_A:
            noise = torch.randn(SHAPE, generator=generator, dtype=torch.float32).numpy()
        out = fake_net(torch.from_numpy(c_in * x), t).numpy()
        denoised = c_skip * x + c_out * out
        x = a * x + b * denoised + c * d_prev + d * noise
        d_prev = denoised
    return x


def assert_close(ours: np.ndarray, reference: torch.Tensor, initial: np.ndarray) -> None:
    """Equal up to float32 round-off: 1e-4 of the final sample scale, plus a few float32
    ulps of the initial latents, which diffusers' Euler step x + (x − D)/σ·(σ' − σ) cancels
    (the cosine schedule starts at σ ≈ 2·10⁴)."""
    reference = reference.numpy()
    scale = max(1.0, float(np.abs(reference).max()))
    ulps = 4 * np.finfo(np.float32).eps * float(np.abs(initial).max())
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4 * scale + ulps)


def compare_trajectories(config: ScheduleConfig, sampler: Sampler, num_steps: int) -> None:
    scheduler = diffusers_scheduler(config, sampler, num_steps)
    noise = unit_noise(1)
    reference = run_diffusers(scheduler, noise * scheduler.init_noise_sigma, 0, num_steps, 2)
    plan = plan_steps(config, sampler, num_steps)
    initial = noise.numpy() * np.float32(plan.init_noise_sigma)
    assert_close(run_plan(plan, initial, sampler, 2), reference, initial)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler,karras", CASES)
def test_trajectory_matches_diffusers(sampler, karras, prediction, spacing):
    config = ScheduleConfig(prediction_type=prediction, timestep_spacing=spacing,
                            use_karras_sigmas=karras)
    for num_steps in (1, 2, 13):
        compare_trajectories(config, sampler, num_steps)


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler,karras", CASES)
def test_other_beta_schedules(sampler, karras, prediction, beta_schedule):
    config = ScheduleConfig(beta_start=0.0001, beta_end=0.02, beta_schedule=beta_schedule,
                            prediction_type=prediction, use_karras_sigmas=karras,
                            timestep_spacing="trailing", steps_offset=0)
    compare_trajectories(config, sampler, 9)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_ddim_final_alpha_and_offset(set_alpha_to_one, steps_offset):
    config = ScheduleConfig(set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset)
    compare_trajectories(config, Sampler.DDIM, 8)


def two_scheduler_run(config, sampler, num_steps, switch_at, noise):
    """diffusers' SDXL base + refiner: the refiner has its own, fresh scheduler."""
    first = diffusers_scheduler(config, sampler, num_steps)
    latents = run_diffusers(first, noise * first.init_noise_sigma, 0, switch_at, 3)
    second = diffusers_scheduler(config, sampler, num_steps)
    return run_diffusers(second, latents, switch_at, num_steps, 4)


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("num_steps,switch_at", [(10, 3), (10, 8), (20, 16)])
def test_dpm_history_reset_matches_fresh_scheduler(num_steps, switch_at, karras):
    config = ScheduleConfig(use_karras_sigmas=karras)
    noise = unit_noise(5)
    reference = two_scheduler_run(config, Sampler.DPMPP_2M, num_steps, switch_at, noise)
    plan = plan_steps(config, Sampler.DPMPP_2M, num_steps, history_resets=(switch_at,))
    ours = run_plan(plan, noise.numpy(), Sampler.DPMPP_2M, 0)
    assert_close(ours, reference, noise.numpy())
    carried = run_plan(plan_steps(config, Sampler.DPMPP_2M, num_steps), noise.numpy(),
                       Sampler.DPMPP_2M, 0)
    assert np.abs(carried - reference.numpy()).max() > 1e-3


def test_history_reset_only_changes_its_own_step():
    config = ScheduleConfig()
    plain, reset = plan_steps(config, "dpmpp_2m", 10), plan_steps(config, "dpmpp_2m", 10, (4,))
    c, b = STEP_SCALARS.index("c"), STEP_SCALARS.index("b")
    assert plain.scalars[4, c] != 0 and reset.scalars[4, c] == 0 and reset.scalars[5, c] != 0
    assert reset.scalars[4, b] < plain.scalars[4, b]
    np.testing.assert_array_equal(np.delete(reset.scalars, 4, 0), np.delete(plain.scalars, 4, 0))


@pytest.mark.parametrize("sampler", [Sampler.EULER, Sampler.EULER_A, Sampler.DDIM])
def test_single_step_samplers_ignore_resets_like_diffusers(sampler):
    config = ScheduleConfig()
    noise = unit_noise(6)
    reference = two_scheduler_run(config, sampler, 10, 7, noise)
    plan = plan_steps(config, sampler, 10, history_resets=(7,))
    np.testing.assert_array_equal(plan.scalars, plan_steps(config, sampler, 10).scalars)
    if sampler is not Sampler.EULER_A:  # the split run draws its noises from two generators
        initial = noise.numpy() * np.float32(plan.init_noise_sigma)
        assert_close(run_plan(plan, initial, sampler, 0), reference, initial)


def test_first_and_last_dpm_steps_are_first_order():
    scalars = plan_steps(ScheduleConfig(), Sampler.DPMPP_2M, 20).scalars
    c = scalars[:, STEP_SCALARS.index("c")]
    assert c[0] == 0 and c[-1] == 0 and np.all(c[1:-1] != 0)


@pytest.mark.parametrize("sampler", list(Sampler))
def test_plan_layout(sampler):
    plan = plan_steps(ScheduleConfig(), sampler.value, 7)
    assert plan.scalars.shape == (7, len(STEP_SCALARS)) and plan.scalars.dtype == np.float32
    assert plan.timesteps.shape == (7,) and plan.timesteps.dtype == np.float64
    np.testing.assert_array_equal(plan.scalars[:, 1], plan.timesteps.astype(np.float32))
    assert np.all(plan.scalars[:, STEP_SCALARS.index("guidance")] == 0)
    noisy = np.any(plan.scalars[:, STEP_SCALARS.index("d")] != 0)
    assert noisy == (sampler is Sampler.EULER_A)
    with pytest.raises(ValueError):
        plan.scalars[0, 0] = 1.0


def test_euler_scalars_follow_the_design_formulas():
    plan = plan_steps(ScheduleConfig(), Sampler.EULER, 5)
    scheduler = diffusers_scheduler(ScheduleConfig(), Sampler.EULER, 5)
    sigma, sigma_next = scheduler.sigmas.numpy()[:-1], scheduler.sigmas.numpy()[1:]
    c_in, _, c_skip, c_out, _, a, b, c, d = plan.scalars.T
    np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(c_out, -sigma, rtol=1e-6)
    np.testing.assert_allclose(a, sigma_next / sigma, rtol=1e-6)
    np.testing.assert_allclose(a + b, 1.0, rtol=1e-6)
    assert np.all(c_skip == 1) and np.all(c == 0) and np.all(d == 0)


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True, "10"])
def test_bad_step_counts(steps):
    with pytest.raises(InputError, match="steps"):
        plan_steps(ScheduleConfig(), Sampler.EULER, steps)


@pytest.mark.parametrize("resets", [(-1,), (10,), (3, 12)])
def test_bad_history_resets(resets):
    with pytest.raises(InputError, match="history reset"):
        plan_steps(ScheduleConfig(), Sampler.DPMPP_2M, 10, resets)


def test_ddim_has_no_karras_sigmas():
    with pytest.raises(ConfigError, match="use_karras_sigmas"):
        plan_steps(ScheduleConfig(use_karras_sigmas=True), Sampler.DDIM, 10)


def test_ddim_timesteps_past_the_schedule_are_refused():
    with pytest.raises(InputError, match="timestep 1000"):
        plan_steps(ScheduleConfig(steps_offset=1), Sampler.DDIM, 1000)


def test_unknown_sampler():
    with pytest.raises(InputError, match="unknown sampler 'heun'"):
        plan_steps(ScheduleConfig(), "heun", 10)


@pytest.mark.parametrize(("spacing", "offset", "steps", "message"), [
    ("leading", 1, 999, "999 dpmpp_2m steps with timestep_spacing=leading and steps_offset=1 reach timestep 1000 "
                        "(the model has 1000): use fewer steps"),
    ("linspace", 0, 1000, "1000 dpmpp_2m steps with timestep_spacing=linspace and steps_offset=0 repeat timesteps: "
                          "use fewer steps"),
])
def test_dpm_steps_past_the_schedule_are_refused_before_any_nan(spacing, offset, steps, message):
    """DPM-Solver divides by log(σ/σ'): a repeated or clamped timestep made every latent NaN after a
    whole run; now one line before any step, and one step fewer still plans finite tables."""
    config = ScheduleConfig.from_diffusers({"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                            "beta_schedule": "scaled_linear", "timestep_spacing": spacing,
                                            "steps_offset": offset})
    with pytest.raises(InputError) as error:
        plan_steps(config, Sampler.DPMPP_2M, steps)
    assert str(error.value) == message
    assert np.isfinite(plan_steps(config, Sampler.DPMPP_2M, steps - 1).scalars).all()
