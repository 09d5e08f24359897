"""Schedule configs, training schedules and timesteps against diffusers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from test_samplers import CASES, diffusers_scheduler

from artrt.errors import ConfigError, InputError
from artrt.runtime.samplers import plan_steps
from artrt.runtime.schedules import (
    BetaSchedule,
    PredictionType,
    Sampler,
    ScheduleConfig,
    TimestepSpacing,
    alphas_cumprod,
    betas,
)

# stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
    "trained_betas": None, "use_karras_sigmas": False,
}


@pytest.mark.parametrize("beta_schedule", list(BetaSchedule))
def test_training_schedule_matches_diffusers(beta_schedule):
    """Within float32 round-off of torch's own linspace (its bits depend on the CPU's
    vector width, so they cannot be reproduced exactly)."""
    config = ScheduleConfig(beta_schedule=beta_schedule)
    values = config.to_dict()
    del values["use_karras_sigmas"]
    reference = DDIMScheduler(**values)
    assert betas(config).dtype == np.float64 and alphas_cumprod(config).dtype == np.float64
    np.testing.assert_allclose(betas(config), reference.betas.numpy(), rtol=5e-7)
    np.testing.assert_allclose(alphas_cumprod(config), reference.alphas_cumprod.numpy(), rtol=1e-6)


@pytest.mark.parametrize("steps_offset", [0, 1, 3])
@pytest.mark.parametrize("spacing", list(TimestepSpacing))
@pytest.mark.parametrize("sampler,karras", CASES)
def test_timesteps_match_diffusers(sampler, karras, spacing, steps_offset):
    for beta_schedule in BetaSchedule:
        config = ScheduleConfig(beta_schedule=beta_schedule, timestep_spacing=spacing,
                                steps_offset=steps_offset, use_karras_sigmas=karras)
        for num_steps in (1, 2, 7, 20, 50):
            reference = diffusers_scheduler(config, sampler, num_steps)
            plan = plan_steps(config, sampler, num_steps)
            expected = reference.timesteps.numpy().astype(np.float64)
            if karras and sampler in (Sampler.EULER, Sampler.EULER_A):  # continuous t: σ → t
                np.testing.assert_allclose(plan.timesteps, expected, rtol=0, atol=1e-4)
            else:
                np.testing.assert_array_equal(plan.timesteps, expected)
            init = float(reference.init_noise_sigma)
            assert plan.init_noise_sigma == pytest.approx(init, rel=1e-6)


@pytest.mark.parametrize("sampler", list(Sampler))
def test_trailing_keeps_the_steps_asked_for(sampler):
    """For some n diffusers' trailing spacing yields n + 1 timesteps, the last −1."""
    config = ScheduleConfig(timestep_spacing="trailing")
    reference = diffusers_scheduler(config, sampler, 61).timesteps.numpy()
    assert len(reference) == 62 and reference[-1] == -1
    np.testing.assert_array_equal(plan_steps(config, sampler, 61).timesteps, reference[:61])


def test_sdxl_config():
    config = ScheduleConfig.from_diffusers(SDXL_SCHEDULER)
    assert config == ScheduleConfig()
    assert config.beta_schedule is BetaSchedule.SCALED_LINEAR
    assert config.prediction_type is PredictionType.EPSILON


@pytest.mark.parametrize("scheduler", [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
                                       DDIMScheduler, DPMSolverMultistepScheduler])
def test_reads_each_scheduler_class_config(scheduler):
    values = {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "steps_offset": 0}
    if scheduler is DDIMScheduler:
        values["set_alpha_to_one"] = True
    if scheduler in (EulerDiscreteScheduler, DPMSolverMultistepScheduler):
        values["use_karras_sigmas"] = True
    clip = {"clip_sample": False} if scheduler is DDIMScheduler else {}
    instance = scheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         **values, **clip)
    config = ScheduleConfig.from_diffusers(dict(instance.config))
    assert config.to_dict() == ScheduleConfig().to_dict() | values


def test_round_trip_through_json():
    config = ScheduleConfig(beta_schedule="linear", prediction_type="v_prediction",
                            timestep_spacing="linspace", steps_offset=0, use_karras_sigmas=True,
                            set_alpha_to_one=True)
    text = json.dumps(config.to_dict())
    assert json.loads(text)["beta_schedule"] == "linear"
    assert ScheduleConfig.from_diffusers(json.loads(text)) == config


def test_missing_keys_take_defaults_and_none_karras_is_false():
    config = ScheduleConfig.from_diffusers({"_class_name": "PNDMScheduler", "use_karras_sigmas": None})
    assert config == ScheduleConfig()


@pytest.mark.parametrize("key,value", [
    ("trained_betas", [0.1, 0.2]), ("rescale_betas_zero_snr", True),
    ("use_exponential_sigmas", True), ("use_beta_sigmas", True), ("thresholding", True),
    ("clip_sample", True), ("timestep_type", "continuous"), ("prediction_type", "sample"),
    ("final_sigmas_type", "sigma_min"), ("interpolation_type", "log_linear"), ("sigma_min", 0.1),
    ("sigma_max", 80.0), ("shift", 3.0), ("use_dynamic_shifting", True), ("solver_order", 3),
    ("algorithm_type", "sde-dpmsolver++"), ("solver_type", "heun"), ("lambda_min_clipped", -5.1),
    ("variance_type", "learned_range"), ("use_lu_lambdas", True), ("use_flow_sigmas", True),
    ("beta_schedule", "sigmoid"), ("timestep_spacing", "karras"), ("steps_offset", -1),
    ("num_train_timesteps", 1.5), ("beta_start", 0.0), ("use_karras_sigmas", "yes"),
])
def test_unsupported_settings_are_named(key, value):
    with pytest.raises(ConfigError) as error:
        ScheduleConfig.from_diffusers(SDXL_SCHEDULER | {key: value})
    assert f"{key}={value!r}" in str(error.value)


@pytest.mark.parametrize("key,value", [
    ("trained_betas", None), ("clip_sample", False), ("thresholding", False),
    ("timestep_type", "discrete"), ("final_sigmas_type", "zero"), ("lambda_min_clipped", -np.inf),
    ("algorithm_type", "dpmsolver++"), ("solver_type", "midpoint"), ("solver_order", 2),
    ("variance_type", None), ("lower_order_final", False), ("euler_at_final", True),
    ("dynamic_thresholding_ratio", 0.9), ("_use_default_values", ["x"]),
])
def test_settings_that_keep_the_math_are_accepted(key, value):
    assert ScheduleConfig.from_diffusers(SDXL_SCHEDULER | {key: value}) == ScheduleConfig()


def test_lambda_min_clipped_from_json():
    text = json.dumps({"lambda_min_clipped": -float("inf")})  # written as -Infinity
    assert ScheduleConfig.from_diffusers(json.loads(text)) == ScheduleConfig()


def test_constructor_coerces_and_checks_choices():
    assert ScheduleConfig(timestep_spacing="trailing").timestep_spacing is TimestepSpacing.TRAILING
    with pytest.raises(ConfigError, match="prediction_type='flow'"):
        ScheduleConfig(prediction_type="flow")


@pytest.mark.parametrize("name,sampler", [("euler", Sampler.EULER), ("Euler_A", Sampler.EULER_A),
                                          (" ddim ", Sampler.DDIM), (Sampler.DPMPP_2M, Sampler.DPMPP_2M)])
def test_sampler_parse(name, sampler):
    assert Sampler.parse(name) is sampler


@pytest.mark.parametrize("name", ["x", "", "dpm++", None])
def test_sampler_parse_errors(name):
    with pytest.raises(InputError) as error:
        Sampler.parse(name)
    assert str(error.value) == f"unknown sampler {name!r}; choose from euler, euler_a, ddim, dpmpp_2m"
