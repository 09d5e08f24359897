"""Flow-matching samplers (Wan 2.2) as tables of per-step scalars for the extended fused step.

A flow model predicts the velocity v of x_σ = (1 − σ)·x₀ + σ·ε, so x₀ = x − σ·v. Both
samplers reproduce diffusers (the oracle): ``euler`` is FlowMatchEulerDiscreteScheduler,
``unipc`` is UniPCMultistepScheduler as Wan configures it (flow sigmas, ``flow_prediction``,
``predict_x0``, bh2, order 2, ``lower_order_final``, corrector on). One step i of the graph::

    F  = net(c_in·x, t)                                    # after classifier-free guidance
    D  = c_skip·x + c_out·F                                 # x₀ estimate (c_in = c_skip = 1, c_out = −σ)
    x̂  = ca·x + cp·x̂_prev + cb·D + cc·D_prev                # corrected sample (UniC)
    x' = a·x̂ + b·D + c·D_prev + d·noise                    # next sample (UniP, or Euler)
    outputs: x', D, x̂;  the next step reads x ← x', x̂_prev ← x̂, D_prev ← D

With ca = 1 and cp = cb = cc = 0 this is the plain fused step (Euler, and every step without
a corrector). :func:`flow_step` is its executable specification; docs/wan-design.md derives
the columns. Coefficients are computed in float64 from diffusers' float32 σ.
"""

from __future__ import annotations

import enum
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from artrt.errors import ConfigError, InputError

from .experts import Segment
from .samplers import STEP_SCALARS
from .schedules import parse_choice

FLOW_STEP_SCALARS: tuple[str, ...] = (*STEP_SCALARS, "ca", "cp", "cb", "cc")


class FlowSampler(str, enum.Enum):
    """The flow-matching samplers artrt runs (each mirrors one diffusers scheduler)."""

    EULER = "euler"  # FlowMatchEulerDiscreteScheduler
    UNIPC = "unipc"  # UniPCMultistepScheduler (use_flow_sigmas, flow_prediction)

    @classmethod
    def parse(cls, name: str | FlowSampler) -> FlowSampler:
        return parse_choice(cls, name, "sampler")

    @property
    def draws_noise(self) -> bool:
        """Neither flow sampler adds noise per step."""
        return False


# diffusers keys that never change these samplers' math under flow sigmas.
_IGNORED_KEYS = frozenset({
    "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr", "timestep_spacing",
    "steps_offset", "dynamic_thresholding_ratio", "sample_max_value", "time_shift_type", "base_shift",
    "max_shift", "base_image_seq_len", "max_image_seq_len", "sigma_min", "sigma_max",
})
# diffusers keys whose other values change the math, with the values artrt reproduces.
_FIXED_KEYS: dict[str, tuple[Any, ...]] = {
    "use_flow_sigmas": (True,), "prediction_type": ("flow_prediction",), "predict_x0": (True,),
    "solver_order": (2,), "lower_order_final": (True,), "thresholding": (False,), "final_sigmas_type": ("zero",),
    "use_karras_sigmas": (False, None), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
    "use_dynamic_shifting": (False,), "shift_terminal": (None,), "solver_p": (None,), "invert_sigmas": (False,),
    "stochastic_sampling": (False,),
    # bh1 (B(h) = −h) yields NaN at the final σ = 0 in diffusers; the others are aliases of bh2.
    "solver_type": ("bh2", "midpoint", "heun", "logrho"),
}
# UniPC's own defaults are not flow ones: its config must say so.
_REQUIRED_KEYS = {"UniPCMultistepScheduler": ("use_flow_sigmas", "prediction_type")}


@dataclass(frozen=True)
class FlowScheduleConfig:
    """A flow model's schedule: ``shift`` is the Wan folder's ``flow_shift`` (FlowMatchEuler's ``shift``)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    disable_corrector: tuple[int, ...] = ()  # UniPC: no corrector at step i + 1 for each i here

    def __post_init__(self) -> None:
        T, shift = self.num_train_timesteps, self.shift
        if isinstance(T, bool) or not isinstance(T, int) or T < 2:
            raise ConfigError(f"unsupported scheduler setting num_train_timesteps={T!r}")
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 < shift < math.inf:
            raise ConfigError(f"unsupported scheduler setting flow_shift={shift!r}")
        try:
            disabled = tuple(sorted({operator.index(i) for i in self.disable_corrector}))
        except TypeError:
            raise ConfigError(f"unsupported scheduler setting disable_corrector={self.disable_corrector!r}") from None
        object.__setattr__(self, "disable_corrector", disabled)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> FlowScheduleConfig:
        """Read a UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler ``scheduler_config.json``;
        :class:`ConfigError` names the first setting whose value artrt cannot reproduce."""
        for key in _REQUIRED_KEYS.get(config.get("_class_name"), ()):
            if key not in config:
                raise ConfigError(f"scheduler config lacks {key} (artrt needs {_FIXED_KEYS[key][0]!r})")
        values: dict[str, Any] = {}
        for key, value in config.items():
            if key in ("flow_shift", "shift"):
                if "shift" in values and values["shift"] != value:
                    raise ConfigError(f"scheduler config has shift={values['shift']!r} and flow_shift={value!r}")
                values["shift"] = value
            elif key == "num_train_timesteps":
                values[key] = value
            elif key == "disable_corrector":
                values[key] = tuple(value or ())
            elif key.startswith("_") or key in _IGNORED_KEYS:
                continue
            elif key not in _FIXED_KEYS:
                raise ConfigError(f"unsupported scheduler setting {key}={value!r}")
            elif not any(value is ok or (type(value) is type(ok) and value == ok) for ok in _FIXED_KEYS[key]):
                raise ConfigError(f"unsupported scheduler setting {key}={value!r} (artrt supports "
                                  f"{' or '.join(repr(ok) for ok in _FIXED_KEYS[key])})")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that :meth:`from_diffusers` reads back."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**values, "disable_corrector": list(self.disable_corrector)}


@dataclass(frozen=True)
class FlowStepPlan:
    """The whole run's step scalars (arrays read-only); ``sigmas`` has the final σ = 0 appended."""

    timesteps: np.ndarray  # float64 [n]: the network's timestep (diffusers' own values)
    sigmas: np.ndarray  # float64 [n + 1]: diffusers' float32 σ
    scalars: np.ndarray  # float32 [n, 13] in FLOW_STEP_SCALARS order; guidance is 0 (set per expert)
    init_noise_sigma: float = 1.0  # initial latents = unit noise

    def __post_init__(self) -> None:
        for array in (self.timesteps, self.sigmas, self.scalars):
            array.flags.writeable = False

    def column(self, name: str) -> np.ndarray:
        """The column ``name`` of :data:`FLOW_STEP_SCALARS` (a read-only float32 view)."""
        return self.scalars[:, FLOW_STEP_SCALARS.index(name)]


def plan_flow_steps(
    config: FlowScheduleConfig, sampler: FlowSampler | str, steps: int, history_resets: Sequence[int] = ()
) -> FlowStepPlan:
    """The step plan of ``sampler`` over ``steps`` steps, as one diffusers scheduler runs them.

    Wan runs one scheduler across both experts, so the default carries UniPC's history across
    the switch. ``history_resets``: steps where a fresh scheduler takes over (``set_begin_index``),
    as SDXL's refiner does; not Wan's semantics, kept for comparison and other families.
    """
    sampler = FlowSampler.parse(sampler)
    n = _check_steps(steps, config.num_train_timesteps)
    resets = frozenset(operator.index(k) for k in history_resets)
    if any(not 0 <= k < n for k in resets):
        raise InputError(f"history reset at step {min(resets)} is outside the {n} steps")
    if sampler is FlowSampler.EULER:
        timesteps, sigmas = euler_grid(config, n)
        columns = _euler_columns(sigmas)
    else:
        timesteps, sigmas = unipc_grid(config, n)
        columns = _unipc_columns(config, sigmas, resets)
    columns.update(c_in=1.0, t=timesteps, c_skip=1.0, c_out=-sigmas[:-1], guidance=0.0, d=0.0)
    table = np.stack([np.broadcast_to(np.asarray(columns[k], np.float64), (n,)) for k in FLOW_STEP_SCALARS], 1)
    return FlowStepPlan(timesteps, sigmas, table.astype(np.float32))


def _check_steps(steps: int, num_train_timesteps: int) -> int:
    try:
        n = operator.index(steps)
    except TypeError:
        raise InputError(f"steps must be an integer, got {steps!r}") from None
    if isinstance(steps, bool) or not 1 <= n <= num_train_timesteps:
        raise InputError(f"steps must be between 1 and {num_train_timesteps}, got {steps!r}")
    return n


def euler_grid(config: FlowScheduleConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """FlowMatchEulerDiscreteScheduler: (t [n], σ [n + 1]) as float64 copies of its float32 values.

    Its constructor shifts the training σ = (T..1)/T in float32; ``set_timesteps`` spaces t linearly
    between T·σ_max and T·σ_min of those shifted values and shifts again (float64), then t = T·σ in float32.
    """
    T, shift = config.num_train_timesteps, config.shift
    one, shift32, T32 = np.float32(1), np.float32(shift), np.float32(T)
    train = np.arange(T, 0, -1, dtype=np.float32) / T32  # every operation rounds to float32, as torch does
    train = shift32 * train / (one + np.float32(shift - 1) * train)
    s = np.linspace(float(train[0]) * T, float(train[-1]) * T, n) / T  # float64 from here
    sigma = np.float32(shift * s / (1 + (shift - 1) * s))
    return (sigma * T32).astype(np.float64), np.append(sigma, 0).astype(np.float32).astype(np.float64)


def unipc_grid(config: FlowScheduleConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """UniPCMultistepScheduler with ``use_flow_sigmas``: σ linear from 1 to 1/T (n of n + 1 points),
    shifted, the first moved 10⁻⁶ below 1; t = ⌊T·σ⌋ (int64) from the float64 σ; final σ = 0."""
    T, shift = config.num_train_timesteps, config.shift
    s = np.linspace(1, 1 / T, n + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    if abs(s[0] - 1) < 1e-6:
        s[0] -= 1e-6
    t = np.trunc(s * T)
    return t, np.append(s, 0.0).astype(np.float32).astype(np.float64)


def _euler_columns(sigmas: np.ndarray) -> dict[str, Any]:
    """x' = x + (σ' − σ)·v = (σ'/σ)·x + (1 − σ'/σ)·D with D = x − σ·v."""
    a = sigmas[1:] / sigmas[:-1]
    return {"a": a, "b": 1 - a, "c": 0.0, "ca": 1.0, "cp": 0.0, "cb": 0.0, "cc": 0.0}


def unipc_orders(n: int, resets: frozenset[int] = frozenset()) -> list[int]:
    """UniP's order p_i at each step: warm-up from each (re)start, ``lower_order_final``."""
    orders, warm = [], 0
    for i in range(n):
        warm = 0 if i in resets else warm
        orders.append(min(2, n - i, warm + 1))
        warm = min(warm + 1, 2)
    return orders


def _unipc_columns(config: FlowScheduleConfig, sigmas: np.ndarray, resets: frozenset[int]) -> dict[str, Any]:
    """UniPC-p (Zhao et al. 2023, arXiv 2302.04867, Alg. 2/3, B(h) variant) on x₀ estimates m_i.

    λ = log(α/σ) with α = 1 − σ; h_i = λ_{i+1} − λ_i; r_i = (λ_{i−1} − λ_i)/h_i.
    UniP step i:  x' = (σ_{i+1}/σ_i)·x̂_i − α_{i+1}(e^(−h) − 1)·m_i − α_{i+1}·B(h)·ρ_p·(m_{i−1} − m_i)/r_i.
    UniC at step i (order of UniP i − 1) shares that step's base, so x̂_i is x_i plus the difference of
    the corrector and predictor terms; m_{i−2} drops out (see docs/wan-design.md).
    """
    n = len(sigmas) - 1
    orders = unipc_orders(n, resets)
    alpha = 1 - sigmas
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigmas)  # λ_n = +inf at the final σ = 0
    cols = {k: np.zeros(n) for k in ("a", "b", "c", "cb", "cc", "cp")}
    cols["ca"] = np.ones(n)
    for i in range(n):
        h = lam[i + 1] - lam[i]
        phi = math.expm1(-h)  # e^(−h) − 1 = −1 at σ' = 0; also B(h) (bh2)
        cols["a"][i], cols["b"][i] = sigmas[i + 1] / sigmas[i], -alpha[i + 1] * phi
        if orders[i] == 2:  # ρ_p = ½ (diffusers' order-2 shortcut)
            k = alpha[i + 1] * phi * 0.5 / ((lam[i - 1] - lam[i]) / h)
            cols["b"][i] += k
            cols["c"][i] = -k
        started = i > 0 and i not in resets
        if started and i - 1 not in config.disable_corrector:
            _corrector(cols, i, orders[i - 1], lam, sigmas)
    return cols


def _corrector(cols: dict[str, np.ndarray], i: int, order: int, lam: np.ndarray, sigmas: np.ndarray) -> None:
    """UniC-p at step i: x̂_i = base − α_i·B(h)·(ρ_c·D1s + ρ_c,last·(m_i − m_{i−1})), h = λ_i − λ_{i−1}.

    Order 1: ρ = ½, and x_i = base. Order 2: ρ_c solves [[1, 1], [r, 1]]·ρ = (g₁, g₂) (diffusers' b)
    with r = (λ_{i−2} − λ_{i−1})/h; UniP i − 1 took x_i = base − α_i·B·½·(m_{i−2} − m_{i−1})/r, so
    x̂_i = x_i + (2ρ₀ − 1)·(x_i − base) − α_i·B·ρ₁·(m_i − m_{i−1}).
    """
    h = lam[i] - lam[i - 1]
    alpha, B = 1 - sigmas[i], math.expm1(-h)  # bh2: B(h) = e^(−h) − 1
    if order == 1:
        rho0, rho1 = 0.5, 0.5  # ρ₀ = ½ makes 2ρ₀ − 1 vanish: x̂_i = x_i − α_i·B·½·(m_i − m_{i−1})
    else:
        hh = -h
        phi_1 = math.expm1(hh)
        b1 = (phi_1 / hh - 1) / B
        b2 = ((phi_1 / hh - 1) / hh - 0.5) * 2 / B
        r = (lam[i - 2] - lam[i - 1]) / h
        rho0, rho1 = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), np.array([b1, b2]))
    k = 2 * rho0 - 1
    cols["ca"][i] = 1 + k
    cols["cp"][i] = -k * sigmas[i] / sigmas[i - 1]
    cols["cb"][i] = -alpha * B * rho1
    cols["cc"][i] = k * alpha * B + alpha * B * rho1  # from −k·base (its m_{i−1} term) and from ρ₁


def boundary_timestep(boundary_ratio: float, num_train_timesteps: int) -> float:
    """WanPipeline's switch: the high-noise expert runs while t ≥ boundary_ratio·T."""
    if isinstance(boundary_ratio, bool) or not isinstance(boundary_ratio, (int, float)) or \
            not 0 <= boundary_ratio <= 1:
        raise ConfigError(f"unsupported boundary_ratio={boundary_ratio!r} (a number in [0, 1])")
    return float(boundary_ratio) * num_train_timesteps


def wan_segments(
    timesteps: np.ndarray, boundary_ratio: float | None, num_train_timesteps: int, guidance: Sequence[float]
) -> list[Segment]:
    """Expert 0 (``transformer``, ``guidance[0]``) for t ≥ boundary, expert 1 (``transformer_2``,
    ``guidance[-1]``) after; one segment when ``boundary_ratio`` is None (Wan 2.1 layout). The
    comparison is diffusers' float32 one. Segments never reset sampler history (one scheduler)."""
    n = len(timesteps)
    if boundary_ratio is None:
        return [Segment(0, 0, n, float(guidance[0]))]
    boundary = np.float32(boundary_timestep(boundary_ratio, num_train_timesteps))
    high = int(np.sum(np.asarray(timesteps, np.float32) >= boundary))
    segments = [Segment(0, 0, high, float(guidance[0])), Segment(1, high, n, float(guidance[-1]))]
    return [s for s in segments if s.stop > s.start]


Net = Callable[[np.ndarray, float], np.ndarray]


def flow_step(net: Net, sample: np.ndarray, sample_prev: np.ndarray, denoised_prev: np.ndarray,
              noise: np.ndarray | None, row: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The extended fused step in float32, in the graph's order: returns the graph's outputs
    (next_sample, denoised, corrected).

    ``net(x_in, t)`` is the guided network output F; ``row`` one row of a plan's ``scalars``.
    """
    c_in, t, c_skip, c_out, _, a, b, c, d, ca, cp, cb, cc = (np.float32(v) for v in row)
    out = np.asarray(net(c_in * sample, float(t)), np.float32)
    denoised = c_skip * sample + c_out * out
    corrected = ca * sample + cp * sample_prev + cb * denoised + cc * denoised_prev
    next_sample = a * corrected + b * denoised + c * denoised_prev
    if noise is not None:
        next_sample = next_sample + d * noise
    return next_sample, denoised, corrected


def run_flow_plan(plan: FlowStepPlan, nets: Sequence[Net], segments: Sequence[Segment], initial: np.ndarray,
                  on_step: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None = None) -> np.ndarray:
    """The loop over ``segments`` with ``nets[segment.expert]`` (the reference for denoise.py): the three
    carried buffers start at (initial·init_noise_sigma, 0, 0) and are never reset between experts."""
    sample = np.asarray(initial, np.float32) * np.float32(plan.init_noise_sigma)
    sample_prev, denoised_prev = np.zeros_like(sample), np.zeros_like(sample)
    for segment in segments:
        for i in range(segment.start, segment.stop):
            sample, denoised_prev, sample_prev = flow_step(
                nets[segment.expert], sample, sample_prev, denoised_prev, None, plan.scalars[i])
            if on_step is not None:  # on_step(i, next_sample, denoised, corrected)
                on_step(i, sample, denoised_prev, sample_prev)
    return sample
