"""Flow-matching step plans (Wan 2.2) against diffusers' schedulers, with a stand-in network.

diffusers runs its scheduler step by step as WanPipeline does (one scheduler for both experts,
``set_begin_index(0)``, expert by ``t >= boundary_ratio * T``); artrt runs the same stand-in
through :func:`artrt.runtime.flow.run_flow_plan`, the reference of the extended fused step.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from artrt.errors import ConfigError, InputError
from artrt.runtime.experts import Segment
from artrt.runtime.flow import (
    FLOW_STEP_SCALARS,
    FlowSampler,
    FlowScheduleConfig,
    plan_flow_steps,
    run_flow_plan,
    unipc_orders,
    wan_segments,
)

# Wan-AI/Wan2.2-T2V-A14B-Diffusers scheduler/scheduler_config.json (I2V-A14B: flow_shift 5.0).
WAN22_SCHEDULER = {
    "_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.35.0.dev0", "beta_end": 0.02,
    "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True, "num_train_timesteps": 1000,
    "predict_x0": True, "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0, "solver_order": 2, "solver_p": None, "solver_type": "bh2", "steps_offset": 0,
    "thresholding": False, "time_shift_type": "exponential", "timestep_spacing": "linspace", "trained_betas": None,
    "use_beta_sigmas": False, "use_dynamic_shifting": False, "use_exponential_sigmas": False,
    "use_flow_sigmas": True, "use_karras_sigmas": False,
}
EULER_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                   "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                   "max_image_seq_len": 4096, "invert_sigmas": False, "shift_terminal": None,
                   "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                   "time_shift_type": "exponential", "stochastic_sampling": False}
SHAPE = (1, 16, 1, 8, 8)  # [B, C, frames, h, w]: one frame, text-to-image
STEPS = (1, 2, 3, 10, 30, 50)
SHIFTS = (1.0, 3.0, 5.0)
BOUNDARY = 0.875  # Wan 2.2 T2V A14B


def high_noise_net(x: np.ndarray, t: float) -> np.ndarray:
    """Stand-in velocity of the high-noise expert: nonlinear in x and t, so history matters."""
    return np.tanh(x) * (t / 1000) + 0.1 * x


def low_noise_net(x: np.ndarray, t: float) -> np.ndarray:
    """A different stand-in for the low-noise expert."""
    return 0.5 * np.sin(2 * x) * (1 - t / 1000) - 0.2 * x + 0.3


NETS = (high_noise_net, low_noise_net)


def diffusers_scheduler(sampler: FlowSampler, shift: float, **overrides):
    if sampler is FlowSampler.EULER:
        return FlowMatchEulerDiscreteScheduler.from_config({**EULER_SCHEDULER, "shift": shift, **overrides})
    return UniPCMultistepScheduler.from_config({**WAN22_SCHEDULER, "flow_shift": shift, **overrides})


def run_wan(scheduler, latents: np.ndarray, steps: int, boundary_ratio: float | None, start: int = 0,
            stop: int | None = None, on_step=None) -> np.ndarray:
    """WanPipeline's loop: steps [start, stop) of ``scheduler``, expert by ``t >= boundary``."""
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(start)
    boundary = None if boundary_ratio is None else boundary_ratio * scheduler.config.num_train_timesteps
    x = torch.from_numpy(latents.copy())
    for i, t in enumerate(scheduler.timesteps[start:stop], start):
        net = NETS[0] if boundary is None or t >= boundary else NETS[1]
        out = torch.from_numpy(net(x.numpy(), float(t)).astype(np.float32))
        x = scheduler.step(out, t, x, return_dict=False)[0]
        if on_step is not None:
            on_step(i, x.numpy(), scheduler)
    return x.numpy()


def initial_noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def assert_close(ours: np.ndarray, reference: np.ndarray) -> None:
    """1e-5 of the sample scale: float32 round-off (measured ≤ 1e-6 over 50 steps)."""
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5 * max(1.0, float(np.abs(reference).max())))


def artrt_run(config: FlowScheduleConfig, sampler: FlowSampler, steps: int, boundary_ratio: float | None,
              resets=(), on_step=None) -> np.ndarray:
    plan = plan_flow_steps(config, sampler, steps, history_resets=resets)
    segments = wan_segments(plan.timesteps, boundary_ratio, config.num_train_timesteps, (5.0, 4.0))
    return run_flow_plan(plan, NETS, segments, initial_noise(), on_step)


def compare_step_by_step(sampler: FlowSampler, shift: float, steps: int, boundary_ratio: float | None,
                         **overrides) -> None:
    """Every step's latents, and UniPC's corrected sample (diffusers' ``last_sample``), match."""
    reference, corrected = {}, {}

    def record(i, x, scheduler):
        reference[i] = x
        if sampler is FlowSampler.UNIPC:
            corrected[i] = scheduler.last_sample.numpy()

    scheduler = diffusers_scheduler(sampler, shift, **overrides)
    run_wan(scheduler, initial_noise(), steps, boundary_ratio, on_step=record)
    config = FlowScheduleConfig.from_diffusers(scheduler.config)

    def check(i, x, _denoised, x_hat):
        assert_close(x, reference[i])
        if sampler is FlowSampler.UNIPC:
            assert_close(x_hat, corrected[i])

    artrt_run(config, sampler, steps, boundary_ratio, on_step=check)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("sampler", list(FlowSampler))
def test_trajectory_matches_diffusers(sampler, shift, steps):
    compare_step_by_step(sampler, shift, steps, None)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("sampler", list(FlowSampler))
def test_trajectory_across_the_expert_switch_matches_one_scheduler(sampler, shift, steps):
    compare_step_by_step(sampler, shift, steps, BOUNDARY)


@pytest.mark.parametrize("steps,shift", [(10, 3.0), (30, 5.0), (50, 3.0)])
def test_resetting_history_at_the_switch_is_not_wan(steps, shift):
    """Control: an SDXL-style pair (a fresh scheduler for the second expert) is a different
    trajectory; artrt's Wan plan matches the single scheduler and not the pair, and a plan with
    a reset at the switch matches the pair (so the comparison can tell them apart)."""
    config = FlowScheduleConfig(shift=shift)
    plan = plan_flow_steps(config, "unipc", steps)
    switch = wan_segments(plan.timesteps, BOUNDARY, 1000, (1.0, 1.0))[1].start
    first = diffusers_scheduler(FlowSampler.UNIPC, shift)
    latents = run_wan(first, initial_noise(), steps, BOUNDARY, stop=switch)
    pair = run_wan(diffusers_scheduler(FlowSampler.UNIPC, shift), latents, steps, BOUNDARY, start=switch)
    single = run_wan(diffusers_scheduler(FlowSampler.UNIPC, shift), initial_noise(), steps, BOUNDARY)
    wan = artrt_run(config, FlowSampler.UNIPC, steps, BOUNDARY)
    reset = artrt_run(config, FlowSampler.UNIPC, steps, BOUNDARY, resets=(switch,))
    assert_close(wan, single)
    assert_close(reset, pair)
    scale = float(np.abs(single).max())
    assert np.abs(single - pair).max() > 1e-3 * scale
    assert np.abs(wan - pair).max() > 1e-3 * scale


def test_euler_has_no_history_to_reset():
    config = FlowScheduleConfig(shift=5.0)
    np.testing.assert_array_equal(plan_flow_steps(config, "euler", 20, (7,)).scalars,
                                  plan_flow_steps(config, "euler", 20).scalars)


@pytest.mark.parametrize("disabled", [[0, 3], [5], list(range(12))])
def test_disabled_correctors_match_diffusers(disabled):
    compare_step_by_step(FlowSampler.UNIPC, 3.0, 12, BOUNDARY, disable_corrector=disabled)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.875, 0.9, 1.0])
@pytest.mark.parametrize("steps", [1, 8, 40, 50])
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("sampler", list(FlowSampler))
def test_boundary_rule_is_wan_pipelines(sampler, shift, steps, ratio):
    scheduler = diffusers_scheduler(sampler, shift)
    scheduler.set_timesteps(steps)
    high = [bool(t >= ratio * 1000) for t in scheduler.timesteps]  # WanPipeline's test, tensor by tensor
    plan = plan_flow_steps(FlowScheduleConfig(shift=shift), sampler, steps)
    segments = wan_segments(plan.timesteps, ratio, 1000, (5.0, 4.0))
    ours = [s.expert == 0 for s in segments for _ in range(s.start, s.stop)]
    assert ours == high
    assert all(s.guidance == (5.0, 4.0)[s.expert] for s in segments)


def test_timestep_on_the_boundary_runs_the_high_noise_expert():
    plan = plan_flow_steps(FlowScheduleConfig(shift=1.0), "unipc", 8)
    assert plan.timesteps[1] == 875.0
    assert wan_segments(plan.timesteps, 0.875, 1000, (5.0, 4.0)) == [Segment(0, 0, 2, 5.0), Segment(1, 2, 8, 4.0)]
    assert wan_segments(plan.timesteps, None, 1000, (5.0,)) == [Segment(0, 0, 8, 5.0)]


@pytest.mark.parametrize("ratio", [-0.1, 1.5, True, "0.9"])
def test_bad_boundary_ratio(ratio):
    with pytest.raises(ConfigError, match="boundary_ratio"):
        wan_segments(np.array([999.0]), ratio, 1000, (1.0, 1.0))


@pytest.mark.parametrize("sampler", list(FlowSampler))
def test_grid_is_diffusers_own(sampler):
    for shift in SHIFTS:
        for steps in STEPS:
            scheduler = diffusers_scheduler(sampler, shift)
            scheduler.set_timesteps(steps)
            plan = plan_flow_steps(FlowScheduleConfig(shift=shift), sampler, steps)
            np.testing.assert_array_equal(plan.timesteps, scheduler.timesteps.numpy())
            np.testing.assert_array_equal(plan.sigmas, scheduler.sigmas.numpy())
            np.testing.assert_array_equal(plan.column("t"), scheduler.timesteps.numpy().astype(np.float32))
            np.testing.assert_array_equal(plan.column("c_out"), -scheduler.sigmas.numpy()[:-1])


@pytest.mark.parametrize("sampler", list(FlowSampler))
def test_plan_layout(sampler):
    plan = plan_flow_steps(FlowScheduleConfig(shift=3.0), sampler.value, 7)
    assert plan.scalars.shape == (7, len(FLOW_STEP_SCALARS)) and plan.scalars.dtype == np.float32
    assert FLOW_STEP_SCALARS[:9] == ("c_in", "t", "c_skip", "c_out", "guidance", "a", "b", "c", "d")
    for name, value in (("c_in", 1), ("c_skip", 1), ("guidance", 0), ("d", 0)):
        assert np.all(plan.column(name) == value), name
    np.testing.assert_allclose(plan.column("c_out"), -plan.sigmas[:-1], rtol=1e-7)
    with pytest.raises(ValueError):
        plan.scalars[0, 0] = 1.0


def test_euler_is_the_plain_fused_step():
    plan = plan_flow_steps(FlowScheduleConfig(shift=5.0), "euler", 9)
    sigma, sigma_next = plan.sigmas[:-1], plan.sigmas[1:]
    np.testing.assert_allclose(plan.column("a"), sigma_next / sigma, rtol=1e-6)
    np.testing.assert_allclose(plan.column("a") + plan.column("b"), 1, rtol=1e-6)
    assert np.all(plan.column("ca") == 1) and np.all(plan.column("c") == 0)
    assert all(np.all(plan.column(k) == 0) for k in ("cp", "cb", "cc"))


def test_unipc_columns_follow_the_orders():
    """Step 0: no corrector, first order. Step 1: first-order corrector (no x̂_prev term). Later:
    second order both ways. Last step: first order to σ = 0, so x' = D."""
    plan = plan_flow_steps(FlowScheduleConfig(shift=3.0), "unipc", 10)
    assert unipc_orders(10) == [1] + [2] * 8 + [1]
    ca, cp, cb, cc, c = (plan.column(k) for k in ("ca", "cp", "cb", "cc", "c"))
    assert ca[0] == 1 and cp[0] == 0 and cb[0] == 0 and cc[0] == 0 and c[0] == 0
    assert ca[1] == 1 and cp[1] == 0 and cb[1] != 0 and cc[1] == -cb[1]
    assert np.all(cp[2:] != 0) and np.all(ca[2:] != 1) and np.all(c[1:-1] != 0)
    assert c[-1] == 0 and plan.column("a")[-1] == 0 and plan.column("b")[-1] == 1
    assert unipc_orders(10, frozenset({4})) == [1, 2, 2, 2, 1, 2, 2, 2, 2, 1]
    reset = plan_flow_steps(FlowScheduleConfig(shift=3.0), "unipc", 10, (4,))
    assert reset.column("ca")[4] == 1 and reset.column("cb")[4] == 0 and reset.column("c")[4] == 0
    assert reset.column("cp")[5] == 0 and reset.column("cb")[5] != 0


def test_wan_config_is_read():
    config = FlowScheduleConfig.from_diffusers(WAN22_SCHEDULER)
    assert config == FlowScheduleConfig(num_train_timesteps=1000, shift=3.0)
    assert FlowScheduleConfig.from_diffusers(EULER_SCHEDULER) == FlowScheduleConfig(shift=3.0)
    assert FlowScheduleConfig.from_diffusers(config.to_dict()) == config
    assert FlowScheduleConfig.from_diffusers({**WAN22_SCHEDULER, "solver_type": "midpoint"}) == config


@pytest.mark.parametrize("key,value", [
    ("use_flow_sigmas", False), ("prediction_type", "epsilon"), ("predict_x0", False), ("solver_order", 3),
    ("lower_order_final", False), ("thresholding", True), ("final_sigmas_type", "sigma_min"),
    ("use_karras_sigmas", True), ("use_dynamic_shifting", True), ("shift_terminal", 0.1), ("flow_shift", 0.0),
    ("solver_type", "bh1"), ("disable_corrector", [1.5]), ("num_train_timesteps", 1), ("some_new_option", 1),
])
def test_unsupported_settings_are_named(key, value):
    with pytest.raises(ConfigError, match=key):
        FlowScheduleConfig.from_diffusers({**WAN22_SCHEDULER, key: value})


def test_unipc_defaults_are_not_flow():
    config = {k: v for k, v in WAN22_SCHEDULER.items() if k != "use_flow_sigmas"}
    with pytest.raises(ConfigError, match="use_flow_sigmas"):
        FlowScheduleConfig.from_diffusers(config)


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True, "10"])
def test_bad_step_counts(steps):
    with pytest.raises(InputError, match="steps"):
        plan_flow_steps(FlowScheduleConfig(), "unipc", steps)


def test_bad_history_reset_and_sampler():
    with pytest.raises(InputError, match="history reset"):
        plan_flow_steps(FlowScheduleConfig(), "unipc", 10, (10,))
    with pytest.raises(InputError, match="unknown sampler 'dpmpp_2m'"):
        plan_flow_steps(FlowScheduleConfig(), "dpmpp_2m", 10)


def test_flow_imports_without_torch():
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "diffusers", "transformers", "optimum"}:
            raise ImportError(name)
sys.meta_path.insert(0, Block())
from artrt.runtime.flow import FlowScheduleConfig, plan_flow_steps
plan_flow_steps(FlowScheduleConfig(shift=3.0), "unipc", 5)
assert "torch" not in sys.modules
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
