"""Validation of generation arguments: the one place that checks steps, guidance, switch, seed,
sizes, sampler and batch size, for the Python API, the CLI and offline sampling alike.

Accepted: Python and numpy numbers (not ``bool``, not strings), ``None`` for "the package
default" (``seed=None``: a fresh random seed, recorded in the parameters; ``negative_prompt=None``:
no negative prompt, as in diffusers). Everything else raises :class:`InputError` with one line.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np

import artrt
from artrt.engines import BACKENDS
from artrt.errors import InputError

from .budget import attention_bytes, check_fits, request_cost
from .checks import check_float, check_int, check_steps, check_switch
from .flow import FlowSampler
from .package import Manifest
from .schedules import Sampler
from .video import FRAMES_PER_CHUNK, MAX_FRAMES, WAN_FAMILY, is_flow, latent_frames, makes_video

MAX_SEED = 2**63 - 1
MAX_SIDE = 16384  # pixels; the memory estimate refuses most sizes far below this


def check_guidance(value: Any, experts: int) -> tuple[float, ...]:
    """One guidance value, or one per expert, as a tuple of one value per expert."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Real, Sequence, np.ndarray)):
        raise InputError(f"guidance must be a number or a list of numbers, got {value!r}")
    values = [value] if isinstance(value, Real) else list(np.asarray(value, dtype=object).ravel())
    checked = tuple(check_float("guidance", v) for v in values)
    if len(checked) == 1:
        checked *= experts
    if len(checked) != experts:
        raise InputError(f"guidance takes 1 or {experts} values (one per expert), got {len(checked)}")
    return checked


def check_seed(value: Any) -> int:
    """A seed for ``numpy.random.default_rng``; None draws a fresh one."""
    return secrets.randbelow(2**32) if value is None else check_int("seed", value, 0, MAX_SEED)


def check_backend(name: Any) -> str:
    """A backend name: ``auto`` or one of :data:`artrt.engines.BACKENDS`."""
    if not isinstance(name, str) or name not in ("auto", *BACKENDS):
        raise InputError(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    return name


MEMORY_MODES = ("default", "low")


def check_memory_mode(mode: Any) -> str:
    """``default`` (every component resident) or ``low`` (one at a time)."""
    if mode not in MEMORY_MODES:
        raise InputError(f"memory must be one of {', '.join(MEMORY_MODES)}, got {mode!r}")
    return str(mode)


def check_side(name: str, value: Any, multiple: int) -> int:
    value = check_int(name, value, 1, MAX_SIDE)
    if value % multiple:
        raise InputError(f"{name} {value} must be a positive multiple of {multiple} for this model")
    return value


def check_frames(value: Any, m: Manifest) -> int:
    """``num_frames`` for package ``m``: 1 for image packages; 4k + 1 for video packages."""
    frames = check_int("num_frames", value, 1, MAX_FRAMES)
    if frames == 1:
        return frames
    if not makes_video(m):
        what = "its VAE's chunk decoder is missing" if is_flow(m) else f"family {m.family} makes images"
        raise InputError(f"this package makes single images ({what}); num_frames must be 1, got {frames}")
    if (frames - 1) % FRAMES_PER_CHUNK:
        low = frames - (frames - 1) % FRAMES_PER_CHUNK
        raise InputError(f"num_frames must be 4k+1 (1, 5, 9, 13, ...): the VAE makes 4 frames per latent frame "
                         f"after the first; got {frames} (try {low} or {low + FRAMES_PER_CHUNK})")
    return frames


def check_latent_limit(m: Manifest, height: int, width: int, num_frames: int = 1) -> None:
    """Refuse sizes and frame counts beyond what the package's experts can position
    (:attr:`Manifest.max_latent`: Wan's rotary tables), naming the largest that works."""
    if m.max_latent is None:
        return
    frames, most_height, most_width = m.max_latent
    s = m.latent_scale
    if height > most_height * s or width > most_width * s:
        raise InputError(f"{width}x{height} is larger than this package's transformers can place: "
                         f"width and height must be <= {most_width * s}x{most_height * s}")
    if is_flow(m) and latent_frames(num_frames) > frames:
        raise InputError(f"num_frames {num_frames} is more than this package's transformers can place: "
                         f"at most {(frames - 1) * FRAMES_PER_CHUNK + 1}")


def parse_sampler(family: str, name: Any) -> Sampler | FlowSampler:
    """A sampler name of package family ``family``: flow samplers for Wan, the others for UNet pairs."""
    return (FlowSampler if family == WAN_FAMILY else Sampler).parse(name)


@dataclass(frozen=True)
class GenerationArguments:
    """Validated generation arguments, package defaults filled in."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance: tuple[float, ...]
    switch: float
    sampler: Sampler | FlowSampler
    seed: int
    height: int
    width: int
    num_images: int
    num_frames: int = 1

    @classmethod
    def check(
        cls, m: Manifest, prompt: Any, negative_prompt: Any = None, steps: Any = None, guidance: Any = None,
        switch: Any = None, sampler: Any = None, seed: Any = None, height: Any = None, width: Any = None,
        num_images: Any = 1, num_frames: Any = 1,
    ) -> GenerationArguments:
        """Check every argument (None: the package default) and return them validated. Samplers are
        per family (:class:`Sampler` for UNet pairs, :class:`FlowSampler` for Wan); ``switch`` is the
        composition expert's fraction of the schedule for UNet pairs and Wan's ``boundary_ratio``
        for Wan packages (docs/package-format.md, "Switch semantics")."""
        d = m.defaults
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        negative_prompt = "" if negative_prompt is None else negative_prompt
        if not isinstance(negative_prompt, str):
            raise InputError(f"negative_prompt must be a string or None, got {type(negative_prompt).__name__}")
        if sampler is not None and not isinstance(sampler, str):
            raise InputError(f"sampler must be a string, got {type(sampler).__name__}")
        args = cls(
            prompt=prompt,
            negative_prompt=negative_prompt,
            steps=check_steps(_or(steps, d.steps)),
            guidance=check_guidance(_or(guidance, d.guidance), len(m.experts)),
            switch=check_switch(_or(switch, d.switch)),
            sampler=parse_sampler(m.family, _or(sampler, d.sampler)),
            seed=check_seed(seed),
            height=check_side("height", _or(height, d.height), m.size_multiple),
            width=check_side("width", _or(width, d.width), m.size_multiple),
            num_images=check_int("num_images", num_images, 1),
            num_frames=check_frames(num_frames, m),
        )
        check_latent_limit(m, args.height, args.width, args.num_frames)
        return args

    def check_memory(self, m: Manifest, device: str = "cpu") -> None:
        """Refuse (:class:`InputError`) a request whose estimated memory this machine does not have
        (``device``: where the engines run; attention scores count on the CPU only)."""
        shape = self.latent_shape(m)
        attention = attention_bytes(m, shape) if device == "cpu" else 0
        cost = request_cost(shape, self.height, self.width, self.steps, self.sampler.draws_noise,
                            frames=self.num_frames, attention=attention)
        frames = f" of {self.num_frames} frames" if self.num_frames > 1 else ""
        check_fits(cost, f"{self.num_images} {'video' if frames else 'image'}(s){frames} of {self.width}x{self.height}")

    def latent_shape(self, m: Manifest) -> tuple[int, ...]:
        """``[num_images, C, height/s, width/s]`` for this package; Wan packages have a frame axis:
        ``[num_images, C, (num_frames − 1)/4 + 1, height/s, width/s]``."""
        s = m.latent_scale
        size = (self.height // s, self.width // s)
        if is_flow(m):
            return (self.num_images, m.latent_channels, latent_frames(self.num_frames), *size)
        return (self.num_images, m.latent_channels, *size)

    def record(self, m: Manifest) -> dict[str, Any]:
        """The parameters that reproduce the images (stored in PNGs and sample metadata)."""
        return {
            "prompt": self.prompt, "negative_prompt": self.negative_prompt, "steps": self.steps,
            "guidance": list(self.guidance), "switch": self.switch, "sampler": self.sampler.value,
            "seed": self.seed, "height": self.height, "width": self.width, "num_images": self.num_images,
            **({"num_frames": self.num_frames} if is_flow(m) else {}),
            "family": m.family, "artrt_version": artrt.__version__,
        }


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value
