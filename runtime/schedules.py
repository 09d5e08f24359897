"""Training noise schedules and their discretisation, reproducing diffusers' schedulers.

A :class:`ScheduleConfig` is read from a diffusers ``scheduler_config.json``; the
functions here turn it into arrays (float64): betas, ᾱ (``alphas_cumprod``), the
VE noise levels σ = √((1 − ᾱ)/ᾱ) of Karras et al. 2022 (EDM, arXiv 2206.00364),
the timestep spacings of Lin et al. 2023 (arXiv 2305.08891, Table 2), Karras σ
and the σ → t map. How a sampler combines them lives in :mod:`.samplers`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import numpy as np

from artrt.errors import ConfigError, InputError

Choice = TypeVar("Choice", bound=enum.Enum)


def parse_choice(kind: type[Choice], name: Any, what: str) -> Choice:
    """The member of the string enum ``kind`` called ``name`` (case-insensitive); one
    :class:`InputError` line naming the choices if there is none."""
    if isinstance(name, kind):
        return name
    try:
        return kind(str(name).strip().lower())
    except ValueError:
        choices = ", ".join(str(s.value) for s in kind)
        raise InputError(f"unknown {what} {name!r}; choose from {choices}") from None


class Sampler(str, enum.Enum):
    """The sampling algorithms artrt runs (each mirrors one diffusers scheduler)."""

    EULER = "euler"  # EulerDiscreteScheduler
    EULER_A = "euler_a"  # EulerAncestralDiscreteScheduler
    DDIM = "ddim"  # DDIMScheduler, eta = 0
    DPMPP_2M = "dpmpp_2m"  # DPMSolverMultistepScheduler, dpmsolver++, order 2, midpoint

    @classmethod
    def parse(cls, name: str | Sampler) -> Sampler:
        """The sampler called ``name`` (case-insensitive); :class:`InputError` if there is none."""
        return parse_choice(cls, name, "sampler")

    @property
    def draws_noise(self) -> bool:
        """Ancestral samplers add fresh noise at every step."""
        return self is Sampler.EULER_A


class PredictionType(str, enum.Enum):
    """What the network predicts: the noise ε, or v = α·ε − σ·x₀ (Salimans & Ho 2022)."""

    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"


class BetaSchedule(str, enum.Enum):
    LINEAR = "linear"
    SCALED_LINEAR = "scaled_linear"
    SQUAREDCOS_CAP_V2 = "squaredcos_cap_v2"


class TimestepSpacing(str, enum.Enum):
    LEADING = "leading"
    TRAILING = "trailing"
    LINSPACE = "linspace"


# diffusers keys that never change the math of the samplers artrt runs.
_IGNORED_KEYS = frozenset({
    "skip_prk_steps", "clip_sample_range", "sample_max_value", "dynamic_thresholding_ratio",
    "lower_order_final", "euler_at_final", "time_shift_type", "flow_shift",
})
# diffusers keys whose other values change the math; the values artrt reproduces.
_FIXED_KEYS: dict[str, tuple[Any, ...]] = {
    "trained_betas": (None,),
    "rescale_betas_zero_snr": (False,),
    "clip_sample": (False,),
    "thresholding": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "timestep_type": ("discrete",),
    "interpolation_type": ("linear",),
    "final_sigmas_type": ("zero",),
    "lambda_min_clipped": (-math.inf,),
    "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
    "solver_order": (2,),
    "algorithm_type": ("dpmsolver++", "deis"),  # diffusers maps deis to dpmsolver++
    "solver_type": ("midpoint", "logrho", "bh1", "bh2"),  # diffusers maps these to midpoint
}


@dataclass(frozen=True)
class ScheduleConfig:
    """The noise schedule of a model and how diffusers discretises it (SD/SDXL defaults)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: BetaSchedule = BetaSchedule.SCALED_LINEAR
    prediction_type: PredictionType = PredictionType.EPSILON
    timestep_spacing: TimestepSpacing = TimestepSpacing.LEADING
    steps_offset: int = 1
    use_karras_sigmas: bool = False
    set_alpha_to_one: bool = False  # DDIM: ᾱ after the last step is 1 (else ᾱ at t = 0)

    def __post_init__(self) -> None:
        for name, kind in (("beta_schedule", BetaSchedule), ("prediction_type", PredictionType),
                           ("timestep_spacing", TimestepSpacing)):
            object.__setattr__(self, name, _choice(name, getattr(self, name), kind))
        T, offset = self.num_train_timesteps, self.steps_offset
        if isinstance(T, bool) or not isinstance(T, int) or T < 2:
            raise ConfigError(f"unsupported scheduler setting num_train_timesteps={T!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ConfigError(f"unsupported scheduler setting steps_offset={offset!r}")
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ConfigError(f"unsupported scheduler setting {name}={value!r}")
        for name in ("use_karras_sigmas", "set_alpha_to_one"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"unsupported scheduler setting {name}={getattr(self, name)!r}")

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> ScheduleConfig:
        """Read a diffusers scheduler config; missing keys take this class's defaults.

        Raises :class:`ConfigError` naming the first key whose value artrt cannot reproduce.
        """
        own = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in config.items():
            if key in own:
                values[key] = bool(value) if key == "use_karras_sigmas" and value is None else value
            elif key.startswith("_") or key in _IGNORED_KEYS:
                continue
            elif key not in _FIXED_KEYS:
                raise ConfigError(f"unsupported scheduler setting {key}={_short(value)}")
            elif not any(_same(value, ok) for ok in _FIXED_KEYS[key]):
                allowed = " or ".join(repr(ok) for ok in _FIXED_KEYS[key])
                raise ConfigError(
                    f"unsupported scheduler setting {key}={_short(value)} (artrt supports {allowed})"
                )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (enums as their values) that :meth:`from_diffusers` reads back."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _choice(key: str, value: Any, kind: type[enum.Enum]) -> Any:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(str(k.value) for k in kind)
        raise ConfigError(
            f"unsupported scheduler setting {key}={_short(value)} (artrt supports {allowed})"
        ) from None


def _same(value: Any, ok: Any) -> bool:
    """Equality that keeps True apart from 1 and None apart from False."""
    if ok is None or isinstance(ok, bool):
        return value is ok
    return not isinstance(value, bool) and value == ok


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def float32_values(x: np.ndarray) -> np.ndarray:
    """Round to float32, returned as float64: the values diffusers stores in its tensors."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def betas(config: ScheduleConfig) -> np.ndarray:
    """β₁..β_T as diffusers holds them (float32 values, returned as float64)."""
    T = config.num_train_timesteps
    if config.beta_schedule is BetaSchedule.LINEAR:
        beta = np.linspace(config.beta_start, config.beta_end, T)
    elif config.beta_schedule is BetaSchedule.SCALED_LINEAR:
        beta = np.linspace(math.sqrt(config.beta_start), math.sqrt(config.beta_end), T) ** 2
    else:  # cosine ᾱ(t) = cos²((t + s)/(1 + s)·π/2), s = 0.008 (Nichol & Dhariwal 2021, eq. 17)
        t = np.arange(T + 1) / T
        alpha_bar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        beta = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    return float32_values(beta)


def alphas_cumprod(config: ScheduleConfig) -> np.ndarray:
    """ᾱ_t = ∏_{s≤t} (1 − β_s), t = 0..T−1, from diffusers' float32 αs (float64 out)."""
    return float32_values(np.cumprod(float32_values(1.0 - betas(config))))


def training_sigmas(config: ScheduleConfig) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for t = 0..T−1 (increasing), as diffusers' float32 table."""
    alpha_bar = alphas_cumprod(config)
    return float32_values(np.sqrt((1 - alpha_bar) / alpha_bar))


def leading_timesteps(num_train_timesteps: int, num_steps: int, steps_offset: int) -> np.ndarray:
    """t_i = (n − 1 − i)·⌊T/n⌋ + offset: integers that start below T − 1."""
    step = num_train_timesteps // num_steps
    return (np.arange(num_steps)[::-1] * step + steps_offset).astype(np.float64)


def trailing_timesteps(num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """t_i = round(T − i·T/n) − 1: integers that start at T − 1.

    Built as diffusers does, with ``np.arange(T, 0, -T/n)``, which for some n (61, 103,
    ...) yields n + 1 values, the last −1. Callers keep the first n as steps; the extra
    value only matters as an end point of the Karras range (Euler).
    """
    step = num_train_timesteps / num_steps
    return np.round(np.arange(num_train_timesteps, 0, -step)) - 1


def linspace_timesteps(last: int, num_points: int) -> np.ndarray:
    """``num_points`` evenly spaced values from ``last`` down to 0 (not rounded)."""
    return np.linspace(0, last, num_points)[::-1].copy()


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, num_steps)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


def sigma_to_timestep(sigmas: np.ndarray, config: ScheduleConfig) -> np.ndarray:
    """Continuous t with σ(t) = σ: linear interpolation in log σ, clamped to [0, T − 1].

    The log σ table is diffusers' float32 one: DPM-Solver's Karras path truncates t for
    the cosine schedule, where one bit can move a timestep.
    """
    log_train = np.log(training_sigmas(config).astype(np.float32)).astype(np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    return np.interp(log_sigma, log_train, np.arange(len(log_train), dtype=np.float64))
