"""Per-step scalars of the fused step for each sampler, reproducing diffusers' schedulers.

One step i of the exported graph computes (x, D in fp32)::

    F = net(c_in·x, t)                         # after classifier-free guidance
    D = c_skip·x + c_out·F                     # x₀ estimate
    x' = a·x + b·D + c·D_prev + d·noise        # noise ~ N(0, 1), fresh each step

The latents keep each diffusers scheduler's own parameterisation: Euler and Euler
ancestral work on the VE sample x = x₀ + σ·ε (initial latents scaled by
``init_noise_sigma``), DDIM and DPM-Solver++ on the VP sample α·x₀ + s·ε with
α = 1/√(1 + σ²), s = σ·α. All coefficients are computed in float64.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from artrt.errors import ConfigError, InputError

from .schedules import (
    BetaSchedule,
    PredictionType,
    Sampler,
    ScheduleConfig,
    TimestepSpacing,
    alphas_cumprod,
    float32_values,
    karras_sigmas,
    leading_timesteps,
    linspace_timesteps,
    sigma_to_timestep,
    trailing_timesteps,
    training_sigmas,
)

STEP_SCALARS: tuple[str, ...] = ("c_in", "t", "c_skip", "c_out", "guidance", "a", "b", "c", "d")


@dataclass(frozen=True)
class StepPlan:
    """The whole run's step scalars, computed once before the loop (arrays are read-only)."""

    timesteps: np.ndarray  # float64 [n]: the network's timestep at each step
    scalars: np.ndarray  # float32 [n, 9] in STEP_SCALARS order; guidance is 0 (set per expert)
    init_noise_sigma: float  # initial latents = unit noise · init_noise_sigma

    def __post_init__(self) -> None:
        self.timesteps.flags.writeable = False
        self.scalars.flags.writeable = False


@dataclass(frozen=True)
class _Grid:
    """Noise levels of one run: step i goes from σ_i to σ'_i (VE σ, see schedules)."""

    timesteps: np.ndarray
    sigma: np.ndarray
    sigma_next: np.ndarray
    init_noise_sigma: float


def plan_steps(
    config: ScheduleConfig,
    sampler: Sampler | str,
    num_steps: int,
    history_resets: Sequence[int] = (),
) -> StepPlan:
    """The step plan of ``sampler`` over ``num_steps`` steps, as diffusers would run it.

    ``history_resets`` are steps where a multistep solver starts afresh (first order), as
    a second diffusers pipeline does with its own scheduler (``set_begin_index(k)``).
    """
    sampler = Sampler.parse(sampler)
    n = _check_steps(num_steps, config.num_train_timesteps)
    resets = _check_resets(history_resets, n)
    grid = _GRIDS[sampler](config, n)
    c_in, c_skip, c_out = _preconditioning(grid.sigma, config.prediction_type)
    if sampler in (Sampler.EULER, Sampler.EULER_A):
        a, b, c, d = _euler_update(grid.sigma, grid.sigma_next, sampler is Sampler.EULER_A)
    else:  # VP latents: the same step on x_VP = α·x_VE
        alpha = _vp_alpha(grid.sigma)
        c_in, c_skip = np.ones(n), c_skip / alpha
        second = np.zeros(n, dtype=bool)
        if sampler is Sampler.DPMPP_2M:
            second = _second_order_steps(n, resets)
        a, b, c, d = _dpm_solver_update(grid.sigma, grid.sigma_next, second)
    columns = {"c_in": c_in, "t": grid.timesteps, "c_skip": c_skip, "c_out": c_out,
               "guidance": 0.0, "a": a, "b": b, "c": c, "d": d}
    scalars = np.stack([np.broadcast_to(columns[k], (n,)) for k in STEP_SCALARS], axis=1)
    return StepPlan(grid.timesteps.copy(), scalars.astype(np.float32), float(grid.init_noise_sigma))


def _check_steps(num_steps: int, num_train_timesteps: int) -> int:
    try:
        n = operator.index(num_steps)
    except TypeError:
        raise InputError(f"steps must be an integer, got {num_steps!r}") from None
    if isinstance(num_steps, bool) or not 1 <= n <= num_train_timesteps:
        raise InputError(f"steps must be between 1 and {num_train_timesteps}, got {num_steps!r}")
    return n


def _check_resets(history_resets: Sequence[int], n: int) -> frozenset[int]:
    resets = frozenset(operator.index(k) for k in history_resets)
    bad = sorted(k for k in resets if not 0 <= k < n)
    if bad:
        raise InputError(f"history reset at step {bad[0]} is outside the {n} steps")
    return resets


def _second_order_steps(n: int, resets: frozenset[int]) -> np.ndarray:
    """Steps diffusers' DPMSolverMultistep takes in second order (solver_order 2).

    First order: the first step of a scheduler (``lower_order_nums == 0``: step 0 and
    every reset) and the last step (final σ = 0, ``final_sigmas_type="zero"``).
    """
    second = np.ones(n, dtype=bool)
    second[[0, n - 1, *resets]] = False
    return second


def _spaced_timesteps(config: ScheduleConfig, num_steps: int, round_linspace: bool) -> np.ndarray:
    T = config.num_train_timesteps
    if config.timestep_spacing is TimestepSpacing.LEADING:
        return leading_timesteps(T, num_steps, config.steps_offset)
    if config.timestep_spacing is TimestepSpacing.TRAILING:
        return trailing_timesteps(T, num_steps)
    t = linspace_timesteps(T - 1, num_steps)
    return np.round(t) if round_linspace else t


def _euler_grid(config: ScheduleConfig, n: int) -> _Grid:
    """EulerDiscreteScheduler's σ and t (Euler ancestral shares them; its Karras option too)."""
    train = training_sigmas(config)
    t = float32_values(_spaced_timesteps(config, n, round_linspace=False))
    sigma = np.interp(t, np.arange(len(train)), train)
    if config.use_karras_sigmas:  # between the σ of the first and last spaced timestep
        sigma = karras_sigmas(sigma[-1], sigma[0], n)
        t = float32_values(sigma_to_timestep(sigma, config))
    t, sigma = t[:n], sigma[:n]  # diffusers would step on to t = −1 (trailing_timesteps)
    sigmas = float32_values(np.append(sigma, 0.0))
    peak = sigmas.max()
    leading = config.timestep_spacing is TimestepSpacing.LEADING
    init = np.sqrt(peak**2 + 1) if leading else peak
    return _Grid(t, sigmas[:-1], sigmas[1:], float(init))


def _ddim_grid(config: ScheduleConfig, n: int) -> _Grid:
    """DDIMScheduler: step t goes to t − ⌊T/n⌋ whatever the spacing; past 0, to the final ᾱ."""
    if config.use_karras_sigmas:
        raise ConfigError("sampler ddim does not support use_karras_sigmas=True")
    T = config.num_train_timesteps
    t = _spaced_timesteps(config, n, round_linspace=True)[:n]
    if t.max() > T - 1:
        raise InputError(
            f"{n} ddim steps with steps_offset={config.steps_offset} reach timestep {t.max():.0f}"
            f" (the model has {T})"
        )
    alpha_bar = alphas_cumprod(config)
    prev = t.astype(np.int64) - T // n
    final = 1.0 if config.set_alpha_to_one else alpha_bar[0]
    alpha_bar_next = np.where(prev >= 0, alpha_bar[np.maximum(prev, 0)], final)
    sigma = np.sqrt((1 - alpha_bar[t.astype(np.int64)]) / alpha_bar[t.astype(np.int64)])
    return _Grid(t, sigma, np.sqrt((1 - alpha_bar_next) / alpha_bar_next), 1.0)


def _dpm_grid(config: ScheduleConfig, n: int) -> _Grid:
    """DPMSolverMultistepScheduler's own spacing (n + 1 points, last dropped) and Karras path."""
    train = training_sigmas(config)
    if config.use_karras_sigmas:  # over the whole training range; t rounded (cosine: truncated)
        sigma = karras_sigmas(train[0], train[-1], n)
        t = sigma_to_timestep(sigma, config)
        cosine = config.beta_schedule is BetaSchedule.SQUAREDCOS_CAP_V2
        t = np.trunc(t) if cosine else np.round(t)
    else:
        if config.timestep_spacing is TimestepSpacing.TRAILING:
            t = trailing_timesteps(config.num_train_timesteps, n)[:n]
        else:
            t = _spaced_timesteps(config, n + 1, round_linspace=True)[:-1]
        sigma = np.interp(t, np.arange(len(train)), train)
    sigmas = float32_values(np.append(sigma, 0.0))
    T = config.num_train_timesteps
    if t.max() > T - 1 or np.any(np.diff(sigmas) >= 0):  # DPM-Solver divides by log(σ/σ'): no repeats
        what = f"reach timestep {t.max():.0f} (the model has {T})" if t.max() > T - 1 else "repeat timesteps"
        raise InputError(f"{n} dpmpp_2m steps with timestep_spacing={config.timestep_spacing.value} and "
                         f"steps_offset={config.steps_offset} {what}: use fewer steps")
    return _Grid(t, sigmas[:-1], sigmas[1:], 1.0)


_GRIDS = {Sampler.EULER: _euler_grid, Sampler.EULER_A: _euler_grid,
          Sampler.DDIM: _ddim_grid, Sampler.DPMPP_2M: _dpm_grid}


def _vp_alpha(sigma: np.ndarray) -> np.ndarray:
    """α = 1/√(1 + σ²): the VP signal scale at VE noise level σ."""
    return 1 / np.sqrt(sigma**2 + 1)


def _preconditioning(sigma: np.ndarray, prediction: PredictionType) -> tuple[np.ndarray, ...]:
    """c_in, c_skip, c_out for the VE sample x = x₀ + σ·ε (Karras et al. 2022, Table 1).

    ε: D = x − σ·F.  v (Salimans & Ho 2022): D = α²·x − σα·F with F fed c_in·x = α·x.
    """
    alpha = _vp_alpha(sigma)
    if prediction is PredictionType.EPSILON:
        return alpha, np.ones_like(sigma), -sigma
    return alpha, alpha**2, -sigma * alpha


def _euler_update(sigma: np.ndarray, sigma_next: np.ndarray, ancestral: bool) -> tuple:
    """Euler step of dx/dσ = (x − D)/σ from σ to σ' (Karras et al. 2022, Alg. 1).

    Ancestral: step to σ_down, then add σ_up·noise, σ_up² = σ'²(σ² − σ'²)/σ².
    """
    d = np.zeros_like(sigma)
    if ancestral:
        d = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_next = np.sqrt(sigma_next**2 - d**2)
    a = sigma_next / sigma
    return a, 1 - a, np.zeros_like(sigma), d


def _dpm_solver_update(sigma: np.ndarray, sigma_next: np.ndarray, second: np.ndarray) -> tuple:
    """DPM-Solver++ on VP latents (Lu et al. 2022, arXiv 2211.01095, eq. 8 and Alg. 2).

    λ = log(α/s) = −log σ, h = λ' − λ, r = h_prev/h. First order (= DDIM, η = 0):
    x' = (s'/s)·x − α'(e^(−h) − 1)·D. Second order (2M, midpoint) adds
    −(α'/2r)(e^(−h) − 1)·(D − D_prev).
    """
    alpha, alpha_next = _vp_alpha(sigma), _vp_alpha(sigma_next)
    a = (alpha_next * sigma_next) / (alpha * sigma)  # s'/s
    phi = alpha_next * (1 - sigma_next / sigma)  # −α'(e^(−h) − 1), e^(−h) = σ'/σ
    r = np.ones_like(sigma)
    i = np.flatnonzero(second)
    h = np.log(sigma[i]) - np.log(sigma_next[i])
    h_prev = np.log(sigma[i - 1]) - np.log(sigma[i])  # σ of step i − 1
    r[i] = h_prev / h
    b = np.where(second, phi * (1 + 1 / (2 * r)), phi)
    c = np.where(second, -phi / (2 * r), 0.0)
    return a, b, c, np.zeros_like(sigma)
