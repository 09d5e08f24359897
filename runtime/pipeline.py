"""The public entry point: ``Pipeline.load(path).generate(prompt, ...)``."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import artrt
from artrt.engines import Engine

from .conditioning import EncodedText, build_conditioning
from .denoise import LoopBuffers, denoise
from .errors import EngineError, InputError
from .experts import history_resets, plan_experts
from .images import save_png, to_pil
from .loading import OpenEngines, choose_backend, open_engines
from .package import Manifest, read_manifest, resolve
from .samplers import plan_steps
from .schedules import Sampler, ScheduleConfig
from .text import PromptTokenizer

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """Images, seconds per stage and the parameters that reproduce them."""

    images: list[Image.Image]
    timings: dict[str, float]
    parameters: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> list[Path]:
        """Save as PNG with the parameters embedded; ``name.png`` becomes ``name-K.png`` for K > 0."""
        path = Path(path)
        paths = [path if k == 0 else path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(len(self.images))]
        return [
            save_png(image, p, {**self.parameters, "index": k})
            for k, (image, p) in enumerate(zip(self.images, paths))
        ]


class Pipeline:
    """A loaded package: tokenizers, engines for every component, reusable loop buffers."""

    def __init__(self, root: Path, manifest: Manifest, opened: OpenEngines) -> None:
        self.root = root
        self.manifest = manifest
        self.backend = opened.backend
        self.schedule = ScheduleConfig.from_diffusers(manifest.schedule)
        self.tokenizers = {
            name: PromptTokenizer(resolve(root, info.file), info) for name, info in manifest.tokenizers.items()
        }
        self._opened = opened
        self.engines: dict[str, Engine] = opened.engines
        self._buffers: LoopBuffers | None = None

    @classmethod
    def load(
        cls, path: str | Path, backend: str = "auto", threads: int | None = None, verify_hashes: bool = True,
        cuda_graphs: bool = True,
    ) -> Pipeline:
        """Validate the package at ``path`` and load every component on ``backend``
        (``auto``: TensorRT when the package has engines for it, else ONNX Runtime CUDA, else CPU).
        ``cuda_graphs=False`` runs GPU steps without graph capture (for comparison)."""
        root = Path(path)
        manifest = read_manifest(root, verify_hashes=verify_hashes)
        backend = choose_backend(backend, manifest)
        log.info("loading %s (%s) on %s", root, manifest.family, backend)
        opened = open_engines(root, manifest, backend, threads, cuda_graphs)
        try:
            return cls(root, manifest, opened)
        except BaseException:
            opened.close()
            raise

    def close(self) -> None:
        if self._buffers is not None:
            self._buffers.release()
            self._buffers = None
        self._opened.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        steps: int | None = None,
        guidance: float | Sequence[float] | None = None,
        switch: float | None = None,
        sampler: str | None = None,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        latents: np.ndarray | None = None,
    ) -> GenerationResult:
        """Generate ``num_images`` images for ``prompt``; unset arguments take the package defaults.

        ``guidance`` is one value or one per expert. ``latents`` is unit-variance
        noise of shape ``[num_images, C, height/s, width/s]`` (as diffusers' ``latents=``);
        otherwise it is drawn from ``numpy.random.default_rng(seed)``.
        """
        started = time.perf_counter()
        d = self.manifest.defaults
        args = _Arguments.check(
            self.manifest, prompt, _default(steps, d.steps), _default(guidance, d.guidance),
            _default(switch, d.switch), _default(sampler, d.sampler), seed,
            _default(height, d.height), _default(width, d.width), num_images,
        )
        timings: dict[str, float] = {}
        encoded = self._encode([negative_prompt, prompt], timings)
        plan = plan_steps(self.schedule, args.sampler, args.steps)
        segments = plan_experts(plan.timesteps, args.switch, self.schedule.num_train_timesteps, args.guidance)
        if len(segments) > 1:
            plan = plan_steps(self.schedule, args.sampler, args.steps, history_resets(segments))
        shape = (num_images, self.manifest.latent_channels, args.height // self.manifest.latent_scale,
                 args.width // self.manifest.latent_scale)
        rng = np.random.default_rng(seed)
        initial = _initial_latents(latents, shape, rng) * np.float32(plan.init_noise_sigma)
        buffers = self._loop_buffers(shape)
        experts = self.manifest.experts
        engines = [self.engines[e.component] for e in experts]
        for expert, engine in zip(experts, engines):
            feeds = build_conditioning(
                expert.conditioning, encoded, not negative_prompt, num_images, args.height, args.width
            )
            buffers.set_conditioning(expert.name, engine, feeds)
        capture = self.backend == "trt"  # ORT captures its own graphs; the CPU has none
        final = denoise(engines, [e.name for e in experts], buffers, initial, plan.scalars, segments, rng,
                        timings, capture=capture)
        check_finite(final, "the final latents")
        images = self._decode(final, timings)
        timings["total"] = time.perf_counter() - started
        parameters = args.record(prompt, negative_prompt, self.manifest)
        return GenerationResult(images, timings, parameters)

    def _encode(self, prompts: list[str], timings: dict[str, float]) -> dict[str, EncodedText]:
        started = time.perf_counter()
        ids = {name: tok(prompts) for name, tok in self.tokenizers.items()}
        timings["tokenize"] = time.perf_counter() - started
        encoded = {}
        for name, comp in self.manifest.components.items():
            if comp.kind != "text_encoder":
                continue
            started = time.perf_counter()
            out = self.engines[name].run({"input_ids": ids[comp.tokenizer]})
            encoded[name] = EncodedText(out["hidden_states"], out.get("pooled"))
            timings[name] = time.perf_counter() - started
        return encoded

    def _decode(self, latents: np.ndarray, timings: dict[str, float]) -> list[Image.Image]:
        started = time.perf_counter()
        if self.manifest.decoder is None:
            images = to_pil(latents, pixel_space=True)
        else:
            pixels = self.engines[self.manifest.decoder].run({"latents": latents})["image"]
            check_finite(pixels, "the decoded image")
            images = to_pil(pixels)
        timings["decode"] = time.perf_counter() - started
        return images

    def _loop_buffers(self, shape: tuple[int, int, int, int]) -> LoopBuffers:
        if self._buffers is None or self._buffers.shape != shape:
            if self._buffers is not None:
                self._buffers.release()
            memory = None
            if self._opened.device == "cuda":
                from .device_memory import DeviceMemory

                memory = DeviceMemory(self._opened.stream)
            self._buffers = LoopBuffers(shape, memory)
        return self._buffers


def check_finite(array: np.ndarray, what: str) -> None:
    """Raise when a stage produced NaN or Inf (e.g. an fp16 overflow), instead of saving a black image."""
    if not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise EngineError(f"{bad} NaN/Inf values in {what}; if this is an fp16 engine, use an fp32 or fp16-safe VAE")


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _initial_latents(latents: np.ndarray | None, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if latents is None:
        return rng.standard_normal(shape, dtype=np.float32)
    latents = np.asarray(latents, dtype=np.float32)
    if latents.shape != shape:
        raise InputError(f"latents have shape {latents.shape}; this size and num_images need {shape}")
    return latents


@dataclass(frozen=True)
class _Arguments:
    """Validated generation arguments."""

    steps: int
    guidance: tuple[float, ...]
    switch: float
    sampler: Sampler
    seed: int
    height: int
    width: int
    num_images: int

    @classmethod
    def check(cls, m: Manifest, prompt: str, steps: int, guidance: float | Sequence[float], switch: float,
              sampler: str, seed: int, height: int, width: int, num_images: int) -> _Arguments:
        if not isinstance(prompt, str):
            raise InputError("prompt must be a string")
        if int(steps) != steps or steps < 1:
            raise InputError(f"steps must be a whole number >= 1, got {steps}")
        if not 0.0 <= switch <= 1.0:
            raise InputError(f"switch must be in [0, 1], got {switch}")
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % m.size_multiple:
                raise InputError(f"{name} {value} must be a positive multiple of {m.size_multiple} for this model")
        if num_images < 1:
            raise InputError(f"num_images must be >= 1, got {num_images}")
        values = (guidance,) if isinstance(guidance, (int, float)) else tuple(guidance)
        if len(values) == 1:
            values = values * len(m.experts)
        if len(values) != len(m.experts):
            raise InputError(f"guidance takes 1 or {len(m.experts)} values (one per expert), got {len(values)}")
        return cls(int(steps), tuple(float(g) for g in values), float(switch), Sampler.parse(sampler),
                   int(seed), int(height), int(width), int(num_images))

    def record(self, prompt: str, negative_prompt: str, m: Manifest) -> dict[str, Any]:
        return {
            "prompt": prompt, "negative_prompt": negative_prompt, "steps": self.steps,
            "guidance": list(self.guidance), "switch": self.switch, "sampler": self.sampler.value,
            "seed": self.seed, "height": self.height, "width": self.width, "num_images": self.num_images,
            "family": m.family, "artrt_version": artrt.__version__,
        }
