"""What ``artrt sample`` makes: one task per image (or video), grouped into deterministic batches.

An item with seed ``S`` and ``n`` images makes exactly the images of
``artrt generate PROMPT --seed S -n n``: initial noise ``default_rng(S)`` of shape
``[n, C, h, w]`` (Wan: ``[n, C, (frames - 1)/4 + 1, h, w]``), image ``k`` from row ``k``.
An item with ``frames`` > 1 (video packages) makes animated WebP videos, as ``generate --frames``.
Images of items that share every setting but the seed run as one engine batch
(``latents=`` stacked row by row), so batching changes no noise. Ancestral samplers draw
fresh noise from the seed's generator at every step, so for them a batch is exactly one item.

Batches are cut from the whole item list, never from what is left to do, so a
resumed run or a Ray run hands the engines the same batches as an uninterrupted
local run: images are byte-identical even on backends whose arithmetic depends on
the batch size.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from artrt.errors import ArtrtError, InputError
from artrt.runtime.arguments import GenerationArguments, check_int, parse_sampler
from artrt.runtime.budget import attention_bytes, check_fits, request_cost
from artrt.runtime.images import encode_png
from artrt.runtime.lora import Lora
from artrt.runtime.package import Manifest
from artrt.runtime.pipeline import Pipeline
from artrt.runtime.video import encode_webp, is_flow

from .prompt_files import BadLine, PromptItem

# Record fields that decide an image's pixels (besides the package): a record written
# with other values is not the image the current command asks for.
GENERATION_FIELDS = ("prompt", "negative_prompt", "steps", "guidance", "switch", "sampler", "seed",
                     "height", "width", "num_images", "num_frames", "index", "loras")
MAX_ITEM_IMAGES = 10_000  # images one prompt-file item may ask for
_BATCH_FIELDS = ("prompt", "negative_prompt", "steps", "guidance", "switch", "sampler", "height", "width",
                 "num_frames")


@dataclass(frozen=True)
class SampleOptions:
    """Command-line values every item starts from (None: the package default)."""

    negative_prompt: str = ""
    steps: int | None = None
    guidance: tuple[float, ...] | None = None
    switch: float | None = None
    sampler: str | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0  # item i gets seed + i unless it sets its own
    n: int = 1  # images per item
    frames: int = 1  # frames per video (video packages; 1: images)


@dataclass(frozen=True)
class SampleConfig:
    """Everything ``artrt sample`` was asked for."""

    prompts: Path
    model: Path
    out: Path
    options: SampleOptions = field(default_factory=SampleOptions)
    batch: int = 1  # images per engine call, at most
    overwrite: bool = False
    strict: bool = False
    backend: str = "auto"
    threads: int | None = None
    verify: bool = True
    ray: str | None = None  # a Ray address, "auto" or "local"; None runs here
    actors: int | None = None  # Ray actors (default: one per GPU, else one per --threads CPUs)
    memory: str = "default"  # Pipeline.load's memory mode
    vae_tile: int | None = None  # Pipeline.load's tiled decode
    loras: tuple[Lora, ...] = ()  # Pipeline.load's LoRAs, for every image of the job



@dataclass(frozen=True)
class ImageTask:
    """One image: its id (file name stem), its item, source line and PNG parameters."""

    id: str
    item: str
    line: int
    parameters: dict[str, Any]  # as generate's, with "index" (k of the item's n) and "id"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "item": self.item, "line": self.line, "parameters": self.parameters}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageTask:
        return cls(data["id"], data["item"], data["line"], data["parameters"])


@dataclass
class ImageResult:
    """A made image (PNG bytes, or WebP for a video, and their sha256) or the error that stopped its batch."""

    task: ImageTask
    png: bytes | None
    sha256: str | None
    timings: dict[str, float]  # of the whole batch, in seconds
    batch_size: int
    backend: str
    device: str
    error: str | None = None


def plan_tasks(
    items: Sequence[PromptItem], options: SampleOptions, manifest: Manifest, file: str, batch: int = 1,
    loras: list[dict[str, Any]] | None = None,
) -> tuple[list[ImageTask], list[BadLine]]:
    """Resolve every item against the options and package defaults; invalid ones become bad lines.
    ``loras`` (:func:`artrt.runtime.lora.lora_record` of the job's LoRAs) goes into every image's
    parameters, as ``generate`` records them."""
    tasks: list[ImageTask] = []
    bad: list[BadLine] = []
    used: dict[str, int] = {}
    for item in items:
        try:
            new = _item_tasks(item, options, manifest, batch, {"loras": loras} if loras else {})
            for task in new:
                if task.id in used:
                    raise InputError(f"image id {task.id} is already used on line {used[task.id]}")
        except ArtrtError as exc:
            bad.append(BadLine(file, item.line, str(exc)))
            continue
        used.update((task.id, item.line) for task in new)
        tasks += new
    return tasks, bad


def _item_tasks(item: PromptItem, options: SampleOptions, manifest: Manifest, batch: int,
                extra: dict[str, Any]) -> list[ImageTask]:
    v = item.values
    args = GenerationArguments.check(
        manifest, item.prompt, v.get("negative_prompt", options.negative_prompt), v.get("steps", options.steps),
        v.get("guidance", options.guidance), v.get("switch", options.switch), v.get("sampler", options.sampler),
        v.get("seed", options.seed + item.index), v.get("height", options.height), v.get("width", options.width),
        check_int("n", v.get("n", options.n), 1, MAX_ITEM_IMAGES), v.get("frames", options.frames),
    )
    # What one engine call of this item costs: ancestral items run whole, others in --batch images at most.
    images = args.num_images if args.sampler.draws_noise else min(args.num_images, batch)
    shape = (images, *args.latent_shape(manifest)[1:])
    cost = request_cost(shape, args.height, args.width, args.steps, args.sampler.draws_noise,
                        noise_images=args.num_images, frames=args.num_frames,
                        attention=attention_bytes(manifest, shape))  # sample runs mostly on CPUs: counted
    what = f"video(s) of {args.num_frames} frames" if args.num_frames > 1 else "image(s)"
    check_fits(cost, f"{images} {what} of {args.width}x{args.height} at once")
    parameters = {**args.record(manifest), **extra}
    item_id = v.get("id", f"{item.index:06d}")
    ids = [item_id] if args.num_images == 1 else [f"{item_id}-{k}" for k in range(args.num_images)]
    return [ImageTask(image_id, item_id, item.line, {**parameters, "index": k, "id": image_id})
            for k, image_id in enumerate(ids)]


def plan_batches(tasks: Sequence[ImageTask], batch_size: int) -> list[list[ImageTask]]:
    """Cut tasks into engine batches: images with the same settings, in file order, ``batch_size``
    at most (ancestral samplers: one item per batch, whatever its size)."""
    if batch_size < 1:
        raise InputError(f"--batch must be >= 1, got {batch_size}")
    groups: dict[tuple, list[ImageTask]] = {}
    for task in tasks:
        p = task.parameters
        own_item = task.item if parse_sampler(p["family"], p["sampler"]).draws_noise else None
        groups.setdefault((own_item, *(str(p.get(f)) for f in _BATCH_FIELDS)), []).append(task)
    batches = []
    for (own_item, *_), group in groups.items():
        size = len(group) if own_item is not None else batch_size
        batches += [group[i:i + size] for i in range(0, len(group), size)]
    return batches


def initial_noise(manifest: Manifest, seed: int, n: int, height: int, width: int, num_frames: int = 1) -> np.ndarray:
    """The unit noise ``generate`` draws for ``seed`` and ``n`` images (or videos of ``num_frames``)."""
    s = manifest.latent_scale
    frames = ((num_frames - 1) // 4 + 1,) if is_flow(manifest) else ()  # Wan latents have a frame axis
    shape = (n, manifest.latent_channels, *frames, height // s, width // s)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def batch_request(pipe: Pipeline, batch: Sequence[ImageTask]) -> dict[str, Any]:
    """The keyword arguments of the ``generate`` call that makes ``batch``."""
    p = batch[0].parameters
    kwargs = {f: p[f] for f in _BATCH_FIELDS if f != "num_frames"}
    kwargs["num_frames"] = p.get("num_frames", 1)
    if parse_sampler(p["family"], p["sampler"]).draws_noise:
        assert [t.parameters["index"] for t in batch] == list(range(p["num_images"])), "a noisy batch is one item"
        return {**kwargs, "seed": p["seed"], "num_images": p["num_images"]}
    return {**kwargs, "seed": p["seed"], "num_images": len(batch), "latents": _stacked_noise(pipe, batch)}


def make_batch(pipe: Pipeline, batch: Sequence[ImageTask], device: str) -> list[ImageResult]:
    """Generate one batch and encode its PNGs; an :class:`ArtrtError` becomes a result per image."""
    try:
        out = pipe.generate(**batch_request(pipe, batch))
    except (ArtrtError, MemoryError) as exc:  # the batch fails, the job goes on
        return failed(pipe, batch, device, exc)
    return batch_results(pipe, batch, out, device)


def make_batches(pipe: Pipeline, batches: Sequence[Sequence[ImageTask]], device: str) -> list[ImageResult]:
    """Generate several batches in one :meth:`Pipeline.generate_many` call (phase by phase with
    ``memory="low"``: each expert loaded once for all of them). If that call fails, each batch is
    retried alone, so only the batches that fail on their own are marked failed."""
    try:
        outs = pipe.generate_many([batch_request(pipe, batch) for batch in batches])
    except (ArtrtError, MemoryError):
        return [result for batch in batches for result in make_batch(pipe, batch, device)]
    return [result for batch, out in zip(batches, outs) for result in batch_results(pipe, batch, out, device)]


def batch_results(pipe: Pipeline, batch: Sequence[ImageTask], out: Any, device: str) -> list[ImageResult]:
    started = time.perf_counter()
    if out.frames is not None:  # videos: animated WebP, as generate --frames writes them
        files = [encode_webp(frames, task.parameters) for task, frames in zip(batch, out.frames)]
    else:
        files = [encode_png(image, task.parameters) for task, image in zip(batch, out.images)]
    timings = {**out.timings, "encode": time.perf_counter() - started}
    return [ImageResult(task, data, hashlib.sha256(data).hexdigest(), timings, len(batch), pipe.backend, device)
            for task, data in zip(batch, files)]


def failed(pipe: Pipeline, batch: Sequence[ImageTask], device: str, exc: BaseException) -> list[ImageResult]:
    error = f"{type(exc).__name__}: {exc}"
    return [ImageResult(t, None, None, {}, len(batch), pipe.backend, device, error) for t in batch]


def describe_device(pipe: Pipeline) -> str:
    """``cpu``, or ``cuda`` with the GPU's name."""
    if pipe.device != "cuda":
        return "cpu"
    try:
        from artrt.engines.cuda import device_info

        return f"cuda ({device_info().name})"
    except Exception:  # the name is only informative
        return "cuda"


def _stacked_noise(pipe: Pipeline, batch: Sequence[ImageTask]) -> np.ndarray:
    rows, cache = [], {}
    for task in batch:
        p = task.parameters
        key = (p["seed"], p["num_images"])
        if key not in cache:
            cache[key] = initial_noise(pipe.manifest, p["seed"], p["num_images"], p["height"], p["width"],
                                       p.get("num_frames", 1))
        rows.append(cache[key][p["index"]])
    return np.stack(rows)
