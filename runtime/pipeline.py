"""The public entry point: ``Pipeline.load(path).generate(prompt, ...)``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from artrt.engines import Engine
from artrt.engines.ort import max_threads
from artrt.errors import EngineError, InputError

from .arguments import GenerationArguments, check_backend, check_int, check_memory_mode
from .budget import check_load_fits
from .conditioning import EncodedText, build_conditioning
from .denoise import LoopBuffers, can_capture, denoise, enqueue_steps, finish_loop, start_loop
from .engine_records import check_profiles, find_record
from .experts import history_resets, plan_experts
from .images import save_png, to_pil
from .loading import OpenEngines, choose_backend, open_engines
from .package import Manifest, package_root, read_manifest, resolve
from .samplers import plan_steps
from .schedules import ScheduleConfig
from .text import PromptTokenizer
from .tiles import decode_tiled

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
    """A loaded package: tokenizers, engines for every component, reusable loop buffers.

    Thread safety: one ``Pipeline`` may be shared by threads. Tokenization and argument checks
    run concurrently; the engines, the loop buffers and captured graphs are shared state, so
    the encode-denoise-decode part of each call holds the pipeline's lock and calls run it one
    after another (each gets exactly the images it would get alone).
    """

    def __init__(self, root: Path, manifest: Manifest, opened: OpenEngines, cuda_graphs: bool = True,
                 vae_tile: int | None = None) -> None:
        self.root = root
        self.manifest = manifest
        self.backend = opened.backend
        self.cuda_graphs = cuda_graphs
        self.memory = "default" if opened.resident else "low"
        self.vae_tile = vae_tile
        self.schedule = ScheduleConfig.from_diffusers(manifest.schedule)
        self.tokenizers = {
            name: PromptTokenizer(resolve(root, info.file), info) for name, info in manifest.tokenizers.items()
        }
        self._opened = opened
        self.engines: dict[str, Engine] = opened.engines
        self._buffers: LoopBuffers | None = None
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def load(
        cls, path: str | Path, backend: str = "auto", threads: int | None = None, verify_hashes: bool = True,
        cuda_graphs: bool = True, memory: str = "default", vae_tile: int | None = None,
    ) -> Pipeline:
        """Validate the package at ``path`` and load every component on ``backend``
        (``auto``: TensorRT when the package has engines for it, else ONNX Runtime CUDA, else CPU).
        ``threads``: CPU threads per engine (default one per core).
        ``cuda_graphs=False`` runs GPU steps without graph capture (for comparison).
        ``memory="low"``: load nothing up front; each stage loads the component it runs and
        releases it after (text encoders, then each expert in turn, then the decoder), for the
        same images at a fraction of the resident memory and a load per stage.
        ``vae_tile``: decode in overlapping tiles of this many pixels (bounds the decoder's memory
        on large images; see :func:`artrt.runtime.tiles.decode_tiled`)."""
        check_backend(backend)
        check_memory_mode(memory)
        if vae_tile is not None:
            vae_tile = check_int("vae_tile", vae_tile, 64)
        if threads is not None:
            threads = check_int("threads", threads, 1, max_threads())
        if not isinstance(cuda_graphs, bool):
            raise InputError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
        root = package_root(path)
        manifest = read_manifest(root, verify_hashes=verify_hashes)
        backend = choose_backend(backend, manifest)
        log.info("loading %s (%s) on %s", root, manifest.family, backend)
        check_load_fits(root, manifest, backend, memory)
        opened = open_engines(root, manifest, backend, threads, cuda_graphs, resident=memory == "default")
        try:
            return cls(root, manifest, opened, cuda_graphs, vae_tile)
        except BaseException:
            opened.close()
            raise

    @property
    def device(self) -> str:
        """``cpu``, or ``cuda`` when the engines run on a GPU."""
        return self._opened.device

    @property
    def stream(self) -> Any:
        """The CUDA stream every engine runs on (None on the CPU)."""
        return self._opened.stream

    def watch_engines(self, callback: Callable[[str, Engine], None]) -> None:
        """Call ``callback(component, engine)`` for every engine open now and every one opened later
        (with ``memory="low"`` engines are opened per stage); used by ``artrt bench`` to time them."""
        for name, engine in self._opened.engines.items():
            callback(name, engine)
        self._opened.watchers.append(callback)

    def close(self) -> None:
        """Release the engines and buffers (waits for a running call); later calls raise InputError."""
        with self._lock:
            self._closed = True
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
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance: float | Sequence[float] | None = None,
        switch: float | None = None,
        sampler: str | None = None,
        seed: int | None = 0,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        latents: np.ndarray | None = None,
    ) -> GenerationResult:
        """Generate ``num_images`` images for ``prompt``; unset arguments take the package defaults.

        ``guidance`` is one value or one per expert. ``seed=None`` draws a fresh seed (recorded in
        the parameters). ``latents`` is unit-variance noise of shape ``[num_images, C, height/s,
        width/s]`` (as diffusers' ``latents=``); otherwise it is drawn from
        ``numpy.random.default_rng(seed)``. Bad arguments and requests that would not fit in memory
        raise :class:`InputError` before any work.
        """
        started = time.perf_counter()
        args = GenerationArguments.check(
            self.manifest, prompt, negative_prompt, steps, guidance, switch, sampler, seed, height, width,
            num_images,
        )
        args.check_memory(self.manifest)
        check_profiles(self.root, self.manifest, self.backend, args.num_images, args.height, args.width)
        shape = args.latent_shape(self.manifest)
        rng = np.random.default_rng(args.seed)  # initial noise, then (ancestral samplers) step noise
        initial = _initial_latents(latents, shape, rng)
        timings: dict[str, float] = {}
        tick = time.perf_counter()
        ids = {name: tok([args.negative_prompt, args.prompt]) for name, tok in self.tokenizers.items()}
        timings["tokenize"] = time.perf_counter() - tick
        with self._lock:
            if self._closed:
                raise InputError("this Pipeline is closed; load the package again")
            self._opened.load_seconds = 0.0
            final = self._denoise(args, ids, initial, rng, timings)
            images = self._decode(final, timings)
            if not self._opened.resident:
                timings["load"] = self._opened.load_seconds  # included in the stages' own seconds
        timings["total"] = time.perf_counter() - started
        return GenerationResult(images, timings, args.record(self.manifest))

    def _denoise(self, args: GenerationArguments, ids: dict[str, np.ndarray], initial: np.ndarray,
                 rng: np.random.Generator, timings: dict[str, float]) -> np.ndarray:
        encoded = self._encode(ids, timings)
        plan = plan_steps(self.schedule, args.sampler, args.steps)
        segments = plan_experts(plan.timesteps, args.switch, self.schedule.num_train_timesteps, args.guidance)
        if len(segments) > 1:
            plan = plan_steps(self.schedule, args.sampler, args.steps, history_resets(segments))
        buffers = self._loop_buffers(initial.shape)
        experts = self.manifest.experts
        feeds = [build_conditioning(e.conditioning, encoded, not args.negative_prompt, args.num_images, args.height,
                                    args.width) for e in experts]
        names = [e.name for e in experts]
        initial = initial * np.float32(plan.init_noise_sigma)
        on_step = step_progress(args.steps)
        if self._opened.resident:
            engines = [self._opened.get(e.component) for e in experts]
            for name, engine, feed in zip(names, engines, feeds):
                buffers.set_conditioning(name, engine, feed)
            capture = self.cuda_graphs and can_capture(engines, buffers)  # ORT captures its own; CPU has none
            final = denoise(engines, names, buffers, initial, plan.scalars, segments, rng, timings, capture=capture,
                            on_step=on_step)
        else:  # one expert resident at a time: load it at its first step, release it after its last
            has_noise = start_loop(buffers, initial, plan.scalars, segments, rng)
            parity, marks = 0, []
            for segment in segments:
                expert = experts[segment.expert]
                with self._opened.using(expert.component) as engine:
                    buffers.set_conditioning(expert.name, engine, feeds[segment.expert])
                    parity, segment_marks = enqueue_steps({segment.expert: engine}, names, buffers, [segment],
                                                          has_noise, on_step, parity)
                    marks += segment_marks
                    buffers.memory.read(buffers.samples[parity])  # the engine finished before it is released
                    buffers.forget(expert.name)
            final = finish_loop(buffers, parity, marks, timings)
        self._check_finite(final, "the final latents", [e.component for e in experts])
        return final

    def _encode(self, ids: dict[str, np.ndarray], timings: dict[str, float]) -> dict[str, EncodedText]:
        encoded = {}
        for name, comp in self.manifest.components.items():
            if comp.kind != "text_encoder":
                continue
            started = time.perf_counter()
            with self._opened.using(name) as engine:
                out = engine.run({"input_ids": ids[comp.tokenizer]})
            encoded[name] = EncodedText(out["hidden_states"], out.get("pooled"))
            timings[name] = time.perf_counter() - started
        return encoded

    def _decode(self, latents: np.ndarray, timings: dict[str, float]) -> list[Image.Image]:
        started = time.perf_counter()
        if self.manifest.decoder is None:
            images = to_pil(latents, pixel_space=True)
        else:
            with self._opened.using(self.manifest.decoder) as engine:
                if self.vae_tile is None:
                    pixels = engine.run({"latents": latents})["image"]
                else:
                    pixels = decode_tiled(lambda z: engine.run({"latents": z})["image"], latents,
                                          self.vae_tile // self.manifest.latent_scale, self.manifest.latent_scale)
            self._check_finite(pixels, "the decoded image", [self.manifest.decoder])
            images = to_pil(pixels)
        timings["decode"] = time.perf_counter() - started
        return images

    def _check_finite(self, array: np.ndarray, what: str, components: list[str]) -> None:
        """Raise when a stage produced NaN or Inf from finite inputs, naming what ran and how."""
        if np.isfinite(array).all():
            return
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        ran = ", ".join(f"{c} ({component_precision(self.manifest, c, self.backend)})" for c in components)
        hint = ""
        if "fp16" in ran:
            hint = ("; fp16 can overflow: try an fp32 engine" if what != "the decoded image" else
                    "; fp16 VAE decoders can overflow: export without --fp16-vae to decode in fp32")
        raise EngineError(f"{bad} of {array.size} values are NaN/Inf in {what}, from finite inputs; "
                          f"{ran} ran on {self.backend}{hint}")

    def _loop_buffers(self, shape: tuple[int, ...]) -> LoopBuffers:
        if self._buffers is None or self._buffers.shape != shape:
            if self._buffers is not None:
                self._buffers.release()
            memory = None
            if self.device == "cuda":
                from .device_memory import DeviceMemory

                memory = DeviceMemory(self._opened.stream)
            self._buffers = LoopBuffers(shape, memory)
        return self._buffers


def component_precision(manifest: Manifest, component: str, backend: str) -> str:
    """``fp32`` or ``fp16``: the precision ``component`` runs in on ``backend``."""
    if backend == "ort-cpu":
        return "fp32"
    record = find_record(manifest, component, backend)
    if record is not None:
        return str(record.precision)
    return "fp16" if manifest.components[component].onnx_fp16 else "fp32"


def step_progress(total: int, every: float = 2.0) -> Callable[[int], None]:
    """A step callback that logs ``step i/total`` at most every ``every`` seconds, once a run is long."""
    started = last = time.monotonic()

    def on_step(i: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= every or (i + 1 == total and now - started >= every):
            last = now
            log.info("step %d/%d, %.1f s", i + 1, total, now - started)

    return on_step


def _initial_latents(latents: np.ndarray | None, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if latents is None:
        return rng.standard_normal(shape, dtype=np.float32)
    try:
        latents = np.asarray(latents, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"latents must be an array of numbers: {exc}") from None
    if latents.shape != shape:
        raise InputError(f"latents have shape {latents.shape}; this size and num_images need {shape}")
    if not np.isfinite(latents).all():
        raise InputError("latents contain NaN or Inf values")
    return latents
