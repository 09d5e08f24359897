"""The public entry point: ``Pipeline.load(path).generate(prompt, ...)``."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from artrt.engines import Engine
from artrt.engines.ort import max_threads
from artrt.errors import ArtrtError, Cancelled, EngineError, InputError

from .arguments import GenerationArguments, check_backend, check_int, check_memory_mode
from .batching import StackedNoise, batch_key, split, stack_conditioning
from .budget import check_load_fits, check_lora_swap_fits
from .conditioning import EncodedText, build_conditioning
from .denoise import (
    LoopBuffers,
    LoopState,
    add_timings,
    can_capture,
    denoise,
    enqueue_steps,
    load_state,
    read_state,
    step_tables,
)
from .engine_records import check_profiles, find_record
from .experts import Segment, history_resets, plan_experts
from .flow import FlowScheduleConfig, plan_flow_steps, wan_segments
from .images import save_png, to_pil
from .loading import OpenEngines, choose_backend, open_engines
from .lora import Lora, check_loras
from .lora_weights import LoraPlan, prepare_loras
from .package import Manifest, package_root, read_manifest, resolve
from .samplers import plan_steps
from .schedules import ScheduleConfig
from .text import PromptTokenizer
from .tiles import decode_tiled
from .video import CHUNK_DECODER, decode_frames, is_flow, save_webp, to_frames

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """Images, seconds per stage and the parameters that reproduce them. Video packages asked
    for ``num_frames > 1`` also fill ``frames``: one list of frames per video (``images`` then
    holds the first frame of each). ``batch``: the images of the engine batch that made these
    (more than ``len(images)`` when ``generate_many(batch=True)`` merged calls; the stage timings
    are then the batch's)."""

    images: list[Image.Image]
    timings: dict[str, float]
    parameters: dict[str, Any] = field(default_factory=dict)
    frames: list[list[Image.Image]] | None = None
    batch: int = 0

    def __post_init__(self) -> None:
        self.batch = self.batch or len(self.images)

    def save(self, path: str | Path) -> list[Path]:
        """Save with the parameters embedded: images as PNG, videos as animated WebP (``.webp``);
        ``name.png`` becomes ``name-K.png`` for K > 0."""
        path = Path(path)
        items: list[Any] = self.frames if self.frames is not None else self.images
        paths = [path if k == 0 else path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(len(items))]
        write = save_webp if self.frames is not None else save_png
        return [write(item, p, {**self.parameters, "index": k}) for k, (item, p) in enumerate(zip(items, paths))]


@dataclass
class _Request:
    """One generate() call on its way through the pipeline."""

    args: GenerationArguments
    rng: np.random.Generator
    initial: np.ndarray  # unit-variance noise
    ids: dict[str, np.ndarray]  # token ids per tokenizer
    timings: dict[str, float]
    started: float
    encoded: dict[str, EncodedText] = field(default_factory=dict)
    segments: list[Segment] = field(default_factory=list)
    scalars: np.ndarray | None = None
    feeds: list[dict[str, np.ndarray]] = field(default_factory=list)
    sample: np.ndarray | None = None  # scaled initial latents, then the loop's current latents
    state: LoopState | None = None  # low memory: where the loop stands between phases
    tables: tuple[np.ndarray, np.ndarray | None] | None = None  # low memory: step scalars and noise
    parts: list[_Request] = field(default_factory=list)  # a batch of several calls: the calls, in order
    cancel: Any = None  # the caller's cancel event (anything with is_set()), or None


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
        # the family's schedule: flow matching (Wan) or a discrete one (UNet pairs)
        self.flow = FlowScheduleConfig.from_diffusers(manifest.schedule) if is_flow(manifest) else None
        self.schedule = None if self.flow else ScheduleConfig.from_diffusers(manifest.schedule)
        self.tokenizers = {
            name: PromptTokenizer(resolve(root, info.file), info) for name, info in manifest.tokenizers.items()
        }
        self._opened = opened
        self.engines: dict[str, Engine] = opened.engines
        self._buffers: LoopBuffers | None = None
        self._loras: list[dict[str, Any]] | None = []  # the active LoRAs' record; None after a failed set_loras
        self._lock = threading.Lock()
        self._closed = False
        self._stop: Callable[[], None] = lambda: None  # the running call's cancel check (under the lock)

    @classmethod
    def load(
        cls, path: str | Path, backend: str = "auto", threads: int | None = None, verify_hashes: bool = True,
        cuda_graphs: bool = True, memory: str = "default", vae_tile: int | None = None,
        loras: Sequence[Lora] = (),
    ) -> Pipeline:
        """Validate the package at ``path`` and load every component on ``backend``
        (``auto``: TensorRT when the package has engines for it, else ONNX Runtime CUDA, else CPU).
        ``threads``: CPU threads per engine (default one per core).
        ``cuda_graphs=False`` runs GPU steps without graph capture (for comparison).
        ``memory="low"``: load nothing up front; each stage loads the component it runs and
        releases it after (text encoders, then each expert in turn, then the decoder), for the
        same images at a fraction of the resident memory and a load per stage.
        ``vae_tile``: decode in overlapping tiles of this many pixels (bounds the decoder's memory
        on large images; see :func:`artrt.runtime.tiles.decode_tiled`).
        ``loras``: :class:`~artrt.runtime.lora.Lora` adapters applied to their experts' weights
        (checked before any engine loads; :meth:`set_loras` replaces them later; docs/lora.md)."""
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
        if vae_tile is not None and (manifest.decoder is None or is_flow(manifest)):
            what = "draws pixels, it has no VAE decoder" if manifest.decoder is None else "decodes video frame by frame"
            raise InputError(f"vae_tile (--vae-tiles): tiled decoding is for image VAE decoders; this package {what}")
        backend = choose_backend(backend, manifest)
        log.info("loading %s (%s) on %s", root, manifest.family, backend)
        loras = check_loras(loras)
        plan = _prepare_loras(root, manifest, backend, {}, loras) if loras else None
        check_load_fits(root, manifest, backend, memory, lora_bytes=plan.replaced_bytes() if plan else None)

        def lora_weights(opened: OpenEngines) -> dict[str, dict[str, np.ndarray]]:
            assert plan is not None
            ready = dataclasses.replace(plan, files={name: opened.weight_file(name) for name in plan.updates})
            return {name: ready.weights(name) for name in ready.updates}

        opened = open_engines(root, manifest, backend, threads, cuda_graphs, resident=memory == "default",
                              weights=lora_weights if plan else None)
        try:
            pipe = cls(root, manifest, opened, cuda_graphs, vae_tile)
            pipe._loras = plan.record if plan else []
            return pipe
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

    @property
    def loras(self) -> list[dict[str, Any]]:
        """The active LoRAs as recorded in image parameters: file, scale, expert, sha256."""
        return list(self._loras or [])

    def set_loras(self, loras: Sequence[Lora]) -> None:
        """Replace the active LoRAs between calls (waits for a running one); ``[]`` restores the
        package's weights exactly. Every LoRA is read and checked before any weight changes, and
        every new weight is computed from the base weight, never from the last set."""
        loras = check_loras(loras)
        with self._lock:
            if self._closed:
                raise InputError("this Pipeline is closed; load the package again")
            files = {name: self._opened.weight_file(name) for name in self.manifest.components}
            plan = _prepare_loras(self.root, self.manifest, self._opened.backend, files, loras)
            check_lora_swap_fits(plan.replaced_bytes())
            if self._buffers is not None:  # its bindings and captured graphs belong to the old weights
                self._buffers.release()
                self._buffers = None
            self._loras = None  # until every component has its new weights
            for name in self.manifest.components:  # one component's new weights in memory at a time
                self._opened.set_weights(name, plan.weights(name))
            self._loras = plan.record

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
        num_frames: int = 1,
        cancel: Any = None,
    ) -> GenerationResult:
        """Generate ``num_images`` images for ``prompt``; unset arguments take the package defaults.

        ``guidance`` is one value or one per expert. ``switch``: the composition expert's fraction of
        the schedule (UNet pairs) or Wan's ``boundary_ratio``. ``seed=None`` draws a fresh seed
        (recorded in the parameters). ``latents`` is unit-variance noise of shape ``[num_images, C,
        height/s, width/s]`` (Wan: ``[num_images, C, (num_frames - 1)/4 + 1, height/s, width/s]``), as
        diffusers' ``latents=``; otherwise it is drawn from ``numpy.random.default_rng(seed)``.
        ``num_frames`` (video packages): 4k + 1 frames per video, returned in ``frames``. Bad
        arguments and requests that would not fit in memory raise :class:`InputError` before any work.
        ``cancel``: a :class:`threading.Event` (anything with ``is_set()``); once it is set the call
        stops at the next step (or before decoding) and raises :class:`~artrt.errors.Cancelled`.
        A loop captured into one CUDA graph runs to its end first.
        """
        request = self._prepare(prompt, negative_prompt, steps, guidance, switch, sampler, seed, height, width,
                                num_images, latents, num_frames, cancel)
        return self._run([request])[0]

    def generate_many(self, requests: Sequence[Mapping[str, Any]], batch: bool = False) -> list[GenerationResult]:
        """Run several :meth:`generate` calls (each a dict of its keyword arguments) and return their
        results, each equal to its own call. Every request is checked before any runs. With
        ``memory="low"`` they run phase by phase: each text encoder, each expert and the decoder is
        loaded once for all of them (offline sampling's phase batching).

        ``batch=True``: requests that share every setting but the prompts, seed and image count run as
        one engine batch (one call per step and one decode for all of them; :mod:`artrt.runtime.batching`).
        Each still gets the images of its own call, up to the engine's batched arithmetic (identical on
        ONNX Runtime CPU for the models tested, ``tests/test_serve_batching.py``). A group whose total
        batch an engine profile or the memory estimate refuses runs call by call.

        A request's ``cancel`` (as in :meth:`generate`) stops the call only once every request of it
        is cancelled: :class:`~artrt.errors.Cancelled` is raised and no result is returned."""
        if isinstance(requests, (str, bytes, Mapping)) or not isinstance(requests, Sequence):
            raise InputError(f"requests must be a list of dicts of generate()'s arguments, "
                             f"got {type(requests).__name__}")
        prepared = [self._prepare(**_request_arguments(i, request)) for i, request in enumerate(requests)]
        return self._run(prepared, batch) if prepared else []

    def _prepare(
        self, prompt: Any, negative_prompt: Any = None, steps: Any = None, guidance: Any = None, switch: Any = None,
        sampler: Any = None, seed: Any = 0, height: Any = None, width: Any = None, num_images: Any = 1,
        latents: Any = None, num_frames: Any = 1, cancel: Any = None,
    ) -> _Request:
        """Check one request and draw its noise (no engine runs)."""
        started = time.perf_counter()
        args = GenerationArguments.check(
            self.manifest, prompt, negative_prompt, steps, guidance, switch, sampler, seed, height, width,
            num_images, num_frames,
        )
        if cancel is not None and not callable(getattr(cancel, "is_set", None)):
            raise InputError(f"cancel must be a threading.Event (anything with is_set()), got {cancel!r}")
        args.check_memory(self.manifest, self.device)
        check_profiles(self.root, self.manifest, self.backend, args.num_images, args.height, args.width,
                       args.num_frames)
        rng = np.random.default_rng(args.seed)  # initial noise, then (ancestral samplers) step noise
        initial = _initial_latents(latents, args.latent_shape(self.manifest), rng)
        tick = time.perf_counter()
        warned: set[str] = set()  # one truncation warning per prompt, whichever text encoders cut it
        ids = {name: tok([args.negative_prompt, args.prompt], warned) for name, tok in self.tokenizers.items()}
        return _Request(args, rng, initial, ids, {"tokenize": time.perf_counter() - tick}, started, cancel=cancel)

    def _run(self, requests: list[_Request], batch: bool = False) -> list[GenerationResult]:
        with self._lock:
            if self._closed:
                raise InputError("this Pipeline is closed; load the package again")
            if self._loras is None:
                raise EngineError("the last set_loras failed part way; call set_loras again before generating")
            loras = {"loras": self._loras} if self._loras else {}
            self._stop = _stop_check(requests)
            self._stop()
            self._opened.load_seconds = 0.0
            self._encode(requests)
            for r in requests:
                self._plan(r)
            runs = self._batches(requests) if batch else requests
            if self._opened.resident:
                for r in runs:
                    r.sample = self._denoise_resident(r)
            else:
                self._denoise_by_phase(runs)
            for r in runs:
                self._check_finite(r.sample, "the final latents", [e.component for e in self.manifest.experts])
            self._stop()
            decoded = self._decode(runs)
            load = self._opened.load_seconds
        results = {}
        for run, (images, frames) in zip(runs, decoded):
            parts = run.parts or [run]
            counts = [r.args.num_images for r in parts]
            for r, own_images, own_frames in zip(parts, split(images, counts), split(frames or images, counts)):
                if r is not run:
                    r.timings.update({k: v for k, v in run.timings.items() if k not in r.timings})
                if not self._opened.resident:
                    r.timings["load"] = load  # of the whole call, included in the stages' own seconds
                r.timings["total"] = time.perf_counter() - r.started
                record = {**r.args.record(self.manifest), **loras}
                results[id(r)] = GenerationResult(own_images, r.timings, record, own_frames if frames else None,
                                                  sum(counts))
        return [results[id(r)] for r in requests]

    def _batches(self, requests: list[_Request]) -> list[_Request]:
        """``requests`` with those that share their settings merged into one batched request each
        (where every engine profile and the memory estimate take the total batch)."""
        groups: dict[GenerationArguments, list[_Request]] = {}
        for r in requests:
            groups.setdefault(batch_key(r.args), []).append(r)
        runs = []
        for group in groups.values():
            if len(group) > 1 and self._batch_fits(group):
                runs.append(self._merge(group))
            else:
                runs += group
        return runs

    def _batch_fits(self, group: list[_Request]) -> bool:
        args = dataclasses.replace(group[0].args, num_images=sum(r.args.num_images for r in group))
        try:
            check_profiles(self.root, self.manifest, self.backend, args.num_images, args.height, args.width,
                           args.num_frames)
            args.check_memory(self.manifest, self.device)
        except ArtrtError as exc:
            log.debug("not batching %d requests: %s", len(group), exc)
            return False
        return True

    def _merge(self, group: list[_Request]) -> _Request:
        """One request running ``group`` (planned, with the same settings) as one batch."""
        counts = [r.args.num_images for r in group]
        first = group[0]
        merged = _Request(dataclasses.replace(first.args, num_images=sum(counts)),
                          StackedNoise([r.rng for r in group], counts),  # type: ignore[arg-type]
                          np.concatenate([r.initial for r in group]), {}, {}, first.started)
        merged.segments, merged.scalars = first.segments, first.scalars
        merged.feeds = [stack_conditioning([r.feeds[k] for r in group], counts) for k in range(len(first.feeds))]
        merged.sample = np.concatenate([r.sample for r in group])
        merged.parts = group
        return merged

    def _encode(self, requests: list[_Request]) -> None:
        for name, comp in self.manifest.components.items():
            if comp.kind != "text_encoder":
                continue
            with self._opened.using(name) as engine:
                for r in requests:
                    started = time.perf_counter()
                    out = engine.run({"input_ids": r.ids[comp.tokenizer]})
                    r.encoded[name] = EncodedText(out["hidden_states"], out.get("pooled"))
                    r.timings[name] = time.perf_counter() - started

    def _plan(self, r: _Request) -> None:
        """The request's step plan, expert segments, conditioning and step tables."""
        args = r.args
        if self.flow is not None:  # one scheduler for both experts: history carries across the switch
            plan = plan_flow_steps(self.flow, args.sampler, args.steps)
            boundary = args.switch if len(self.manifest.experts) > 1 else None
            r.segments = wan_segments(plan.timesteps, boundary, self.flow.num_train_timesteps, args.guidance)
        else:  # the detail expert restarts its scheduler at the switch (as the SDXL refiner does)
            plan = plan_steps(self.schedule, args.sampler, args.steps)
            r.segments = plan_experts(plan.timesteps, args.switch, self.schedule.num_train_timesteps, args.guidance)
            if len(r.segments) > 1:
                plan = plan_steps(self.schedule, args.sampler, args.steps, history_resets(r.segments))
        r.scalars = plan.scalars
        r.feeds = [build_conditioning(e.conditioning, r.encoded, not args.negative_prompt, args.num_images,
                                      args.height, args.width) for e in self.manifest.experts]
        r.sample = r.initial * np.float32(plan.init_noise_sigma)

    def _denoise_resident(self, r: _Request) -> np.ndarray:
        """The whole loop on resident engines (captured into one CUDA graph where they allow it)."""
        experts = self.manifest.experts
        buffers = self._loop_buffers(r.sample.shape)
        engines = [self._opened.get(e.component) for e in experts]
        for expert, engine, feed in zip(experts, engines, r.feeds):
            buffers.set_conditioning(expert.name, engine, feed)
        capture = self.cuda_graphs and can_capture(engines, buffers)  # ORT captures its own graphs; CPU has none
        return denoise(engines, [e.name for e in experts], buffers, r.sample, r.scalars, r.segments, r.rng,
                       r.timings, capture=capture, on_step=self._on_step(r.args.steps))

    def _denoise_by_phase(self, requests: list[_Request]) -> None:
        """Low memory: each expert is loaded at its first step, runs its steps of every request, and is
        released before the next expert loads. A request's latents and denoised estimate wait on the
        host between phases (with the corrected sample of flow steps), so each request gets exactly
        the images of a whole-loop run."""
        experts, names = self.manifest.experts, [e.name for e in self.manifest.experts]
        for r in requests:
            r.tables = step_tables(r.scalars, r.segments, r.sample.shape, r.rng)
            r.state = LoopState.start(r.sample, self.flow is not None)
        for index, expert in enumerate(experts):
            todo = [(r, [s for s in r.segments if s.expert == index]) for r in requests]
            todo = [(r, segments) for r, segments in todo if segments]
            if not todo:
                continue
            with self._opened.using(expert.component) as engine:
                for r, segments in todo:
                    buffers = self._loop_buffers(r.sample.shape)  # no bindings of this expert: dropped below
                    try:
                        buffers.set_conditioning(expert.name, engine, r.feeds[index])
                        load_state(buffers, *r.tables, r.state)
                        parity, marks = enqueue_steps({index: engine}, names, buffers, segments,
                                                      r.tables[1] is not None, self._on_step(r.args.steps))
                        r.state = read_state(buffers, parity)
                        add_timings(buffers, marks, r.timings)
                    finally:  # also when cancelled or failed: the engine is released after this phase
                        buffers.forget(expert.name)
        for r in requests:
            r.sample = r.state.sample

    def _on_step(self, steps: int) -> Callable[[int], None]:
        """After each step: progress on long runs, and stop here if the call was cancelled."""
        progress, stop = step_progress(steps), self._stop

        def on_step(i: int) -> None:
            progress(i)
            stop()

        return on_step

    def _decode(self, requests: list[_Request]) -> list[tuple[list[Image.Image], list[list[Image.Image]] | None]]:
        """Each request's images and, for videos, its frames."""
        if self.manifest.decoder is None:
            return [(to_pil(r.sample, pixel_space=True), None) for r in requests]
        if self.flow is not None:
            return self._decode_video(requests)
        images = []
        with self._opened.using(self.manifest.decoder) as engine:
            for r in requests:
                started = time.perf_counter()
                if self.vae_tile is None:
                    pixels = engine.run({"latents": r.sample})["image"]
                else:
                    pixels = decode_tiled(lambda z: engine.run({"latents": z})["image"], r.sample,
                                          self.vae_tile // self.manifest.latent_scale, self.manifest.latent_scale)
                self._check_finite(pixels, "the decoded image", [self.manifest.decoder])
                images.append((to_pil(pixels), None))
                r.timings["decode"] = time.perf_counter() - started
        return images

    def _decode_video(self, requests: list[_Request]) -> list[tuple[list[Image.Image], list[list[Image.Image]] | None]]:
        """The Wan VAE, causal over frames: latent frame 0 through the first decoder, each later one
        through the chunk decoder with the caches the previous call returned."""
        decoders = [self.manifest.decoder]
        if any(r.args.num_frames > 1 for r in requests):
            decoders.append(CHUNK_DECODER)
        results = []
        with ExitStack() as opened:
            run_first, *run_chunk = [opened.enter_context(self._opened.using(name)).run for name in decoders]
            for r in requests:
                started = time.perf_counter()
                video = decode_frames(run_first, run_chunk[0] if run_chunk else None, r.sample)
                self._check_finite(video, "the decoded video" if r.args.num_frames > 1 else "the decoded image",
                                   decoders)
                frames = to_frames(video)
                results.append(([clip[0] for clip in frames], frames if r.args.num_frames > 1 else None))
                r.timings["decode"] = time.perf_counter() - started
        return results

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
            self._buffers = LoopBuffers(shape, memory, flow=self.flow is not None)
        return self._buffers


def component_precision(manifest: Manifest, component: str, backend: str) -> str:
    """``fp32`` or ``fp16``: the precision ``component`` runs in on ``backend``."""
    if backend == "ort-cpu":
        return "fp32"
    record = find_record(manifest, component, backend)
    if record is not None:
        return str(record.precision)
    return "fp16" if manifest.components[component].onnx_fp16 else "fp32"


def _prepare_loras(root: Path, manifest: Manifest, backend: str, files: Mapping[str, Path],
                   loras: Sequence[Lora]) -> LoraPlan:
    """``loras`` checked against the package; ``files``: per component, the ONNX file its engine's
    weights are read from (may be filled in later, once the engines are open)."""
    names = [n for n, c in manifest.components.items() if c.kind in ("fused_step", "text_encoder")]
    precisions = {n: component_precision(manifest, n, backend) for n in names}
    return prepare_loras(root, manifest, loras, files, precisions)


_GENERATE_ARGUMENTS = tuple(p for p in inspect.signature(Pipeline.generate).parameters if p != "self")


def _request_arguments(index: int, request: Any) -> Mapping[str, Any]:
    """One request of :meth:`Pipeline.generate_many`: a mapping of :meth:`Pipeline.generate`'s arguments."""
    if not isinstance(request, Mapping):
        raise InputError(f"request {index}: a dict of generate()'s arguments is expected, got {type(request).__name__}")
    unknown = [k for k in request if k not in _GENERATE_ARGUMENTS]
    if unknown:
        raise InputError(f"request {index}: unknown argument {unknown[0]!r} "
                         f"(generate takes {', '.join(_GENERATE_ARGUMENTS)})")
    if "prompt" not in request:
        raise InputError(f"request {index}: prompt is required")
    return request


def _stop_check(requests: Sequence[_Request]) -> Callable[[], None]:
    """A check that raises :class:`Cancelled` once every request has a cancel event and all are set."""
    events = [r.cancel for r in requests]
    if not events or any(e is None for e in events):
        return lambda: None

    def stop() -> None:
        if all(e.is_set() for e in events):
            raise Cancelled(f"cancelled by the caller ({len(events)} request(s))")

    return stop


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
