"""``artrt sample``: a prompt file to an image set, resumable, locally or on Ray.

The driver reads the prompt file, plans tasks and batches, works out what an earlier
run already finished, and writes every image and record itself (see
:mod:`.sample_output`); the images come from a local pipeline or from Ray actors
(:mod:`.sample_ray`). Both hand the engines the same batches, so they make the same bytes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import artrt
from artrt.errors import InputError
from artrt.runtime.arguments import check_backend
from artrt.runtime.lora import lora_record
from artrt.runtime.package import Manifest, engine_files, read_manifest, sha256_file

from .output import OutputDir, Resumed
from .prompt_files import BadLine, read_prompt_file
from .tasks import (
    ImageResult,
    ImageTask,
    SampleConfig,
    describe_device,
    make_batch,
    make_batches,
    plan_batches,
    plan_tasks,
)

log = logging.getLogger(__name__)

PHASE_BATCHES = 16  # with --memory low: engine batches whose phases share one load of each expert


@dataclass
class Counts:
    items: int = 0
    images: int = 0
    bad_lines: int = 0
    done_before: int = 0
    generated: int = 0
    failed: int = 0


def run_sample(cfg: SampleConfig) -> dict[str, Any]:
    """Run the job and return what ``run.json`` says about it; :class:`InputError` if images failed."""
    started = time.monotonic()
    if cfg.ray is not None:
        from .ray_pool import check_ray

        check_ray()  # before OUT is made
    check_backend(cfg.backend)
    manifest = read_manifest(cfg.model, verify_hashes=cfg.verify)
    tasks, bad, items = _plan(cfg, manifest)
    out = OutputDir(cfg.out)
    out.prepare(cfg.overwrite)
    try:
        info = _run(cfg, out, manifest, tasks, bad, items, Progress(len(tasks), started=started))
    finally:
        out.close()
    log.info("sample: %s", summary(info))
    if info["counts"]["failed"]:
        raise InputError(f"{info['counts']['failed']} image(s) failed, listed in {out.run_file}; "
                         "run again to retry them")
    return info


def _run(cfg: SampleConfig, out: OutputDir, manifest: Manifest, tasks: list[ImageTask], bad: list[BadLine],
         items: int, progress: Progress) -> dict[str, Any]:
    """Resume what ``out`` holds, make the rest and keep ``run.json`` up to date."""
    resumed = out.resume(tasks)
    package = {"path": str(cfg.model.resolve()), "sha256": package_sha256(manifest), "family": manifest.family}
    _check_package(resumed, package, out)
    batches = [b for b in plan_batches(tasks, cfg.batch) if any(t.id not in resumed.records for t in b)]
    counts = Counts(items, len(tasks), len(bad), len(resumed.records))
    info = _run_info(cfg, package, counts, bad, resumed)
    out.write_run(info)
    log.info("sample: %d images of %d items, %d already in %s, %d to make in %d batch(es)", len(tasks), items,
             counts.done_before, cfg.out, len(tasks) - counts.done_before, len(batches))
    results = _local_results(cfg, batches) if cfg.ray is None else _ray_results(cfg, batches, info)
    progress.done = counts.done_before
    try:
        for result in results:
            _store(out, result, resumed.records, counts, info, progress)
    except BaseException as exc:
        _finish(out, info, counts, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", progress)
        raise
    _finish(out, info, counts, "complete" if not counts.failed else "incomplete", progress)
    return info


def _plan(cfg: SampleConfig, manifest: Manifest) -> tuple[list[ImageTask], list[BadLine], int]:
    items, bad = read_prompt_file(cfg.prompts)
    loras = lora_record(cfg.loras) if cfg.loras else None
    tasks, unusable = plan_tasks(items, cfg.options, manifest, str(cfg.prompts), cfg.batch, loras)
    bad = sorted(bad + unusable, key=lambda b: b.line)
    for line in bad:
        log.warning("%s%s", line, "" if cfg.strict else " (skipped)")
    if bad and cfg.strict:
        raise InputError(f"{len(bad)} bad line(s) in {cfg.prompts}, first {bad[0]}; --strict generates nothing")
    if not tasks:
        raise InputError(f"no usable prompts in {cfg.prompts}")
    return tasks, bad, len(items) + len(bad) - len(unusable)


def package_sha256(manifest: Manifest) -> str:
    """sha256 of the package's model: ``artrt.json`` without built engines (which ``artrt build`` adds)."""
    data = manifest.to_json()
    skip = engine_files(manifest)
    data["engines"] = []
    data["files"] = [f for f in data["files"] if f["path"] not in skip]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _check_package(resumed: Resumed, package: dict[str, Any], out: OutputDir) -> None:
    before = (resumed.previous or {}).get("package", {}).get("sha256")
    if resumed.records and before is not None and before != package["sha256"]:
        raise InputError(f"{out.root} holds images of another package ({before[:12]}, this one is "
                         f"{package['sha256'][:12]}): use --overwrite to redo the set, or another --out")


def _local_results(cfg: SampleConfig, batches: Sequence[list[ImageTask]]) -> Iterator[ImageResult]:
    if not batches:
        return
    from artrt.runtime.pipeline import Pipeline

    with Pipeline.load(cfg.model, backend=cfg.backend, threads=cfg.threads, verify_hashes=False, memory=cfg.memory,
                       vae_tile=cfg.vae_tile, loras=cfg.loras) as pipe:
        device = describe_device(pipe)
        if cfg.memory == "low":  # phase batching: each expert loaded once per group of batches
            for start in range(0, len(batches), PHASE_BATCHES):
                yield from make_batches(pipe, batches[start : start + PHASE_BATCHES], device)
        else:
            for batch in batches:
                yield from make_batch(pipe, batch, device)


def _ray_results(cfg: SampleConfig, batches: Sequence[list[ImageTask]], info: dict[str, Any]) -> Iterator[ImageResult]:
    from .ray_pool import ray_results

    return ray_results(cfg, batches, info)


def _store(out: OutputDir, r: ImageResult, done: dict[str, Any], counts: Counts, info: dict[str, Any],
           progress: Progress) -> None:
    """Write one result: the image, then its record; or note its failure."""
    info["backend"], info["device"] = r.backend, r.device
    if r.task.id in done:  # the rest of a batch that an earlier run half finished
        return
    if r.error is not None:
        counts.failed += 1
        info["failures"].append({"id": r.task.id, "line": r.task.line, "error": r.error})
        log.error("sample: %s (line %d) failed: %s", r.task.id, r.task.line, r.error)
        return
    path = out.write_image(r.task.id, r.png, video=r.task.parameters.get("num_frames", 1) != 1)
    record = {**r.task.parameters, "item": r.task.item, "line": r.task.line,
              "file": path.relative_to(out.root).as_posix(), "sha256": r.sha256, "backend": r.backend,
              "device": r.device, "batch_size": r.batch_size, "timings": r.timings}
    out.append(record)
    done[r.task.id] = record
    counts.generated += 1
    progress.update(1)


def _run_info(cfg: SampleConfig, package: dict[str, Any], counts: Counts, bad: list[BadLine],
              resumed: Resumed) -> dict[str, Any]:
    previous = resumed.previous or {}
    history = previous.get("history", []) if not cfg.overwrite else []
    if previous.get("status") == "running" and not cfg.overwrite:  # that run never finished: killed
        history.append({"started": previous.get("started"), "finished": None, "status": "killed",
                        "backend": previous.get("backend"), "ray": previous.get("ray") is not None})
    return {
        "artrt_sample": 1, "status": "running", "artrt_version": artrt.__version__,
        "prompts": {"path": str(cfg.prompts.resolve()), "sha256": sha256_file(cfg.prompts)},
        "package": package, "backend": None, "device": None,
        "ray": {"address": cfg.ray, "actors": cfg.actors} if cfg.ray else None,
        "options": {**asdict(cfg.options), "batch": cfg.batch, "backend": cfg.backend, "threads": cfg.threads},
        "loras": [{"file": str(x.file), "scale": x.scale, "expert": x.expert} for x in cfg.loras],
        "started": _now(), "finished": None, "seconds": None, "images_per_s": None, "first_image_s": None,
        "steady_images_per_s": None,
        "counts": asdict(counts), "bad_lines": [asdict(b) for b in bad], "failures": [],
        "dropped_records": resumed.dropped, "history": history,
    }


def _finish(out: OutputDir, info: dict[str, Any], counts: Counts, status: str, progress: Progress) -> None:
    now = time.monotonic()
    seconds = now - progress.started
    first = None if progress.first is None else progress.first - progress.started
    steady = (progress.made - 1) / (now - progress.first) if progress.made > 1 else None
    info.update(status=status, finished=_now(), seconds=round(seconds, 3), counts=asdict(counts),
                images_per_s=round(counts.generated / seconds, 4) if seconds > 0 else None,
                first_image_s=None if first is None else round(first, 3),
                steady_images_per_s=None if steady is None else round(steady, 4))
    info["counts"]["complete"] = counts.done_before + counts.generated
    info["history"].append({k: info[k] for k in ("started", "finished", "status", "backend")}
                           | {"generated": counts.generated, "ray": info["ray"] is not None})
    out.write_run(info)


def summary(info: dict[str, Any]) -> str:
    c = info["counts"]
    return (f"{c['complete']}/{c['images']} images complete ({c['generated']} made now, {c['done_before']} "
            f"already there), {c['failed']} failed, {c['bad_lines']} bad line(s) skipped; "
            f"{info['images_per_s'] or 0:.2f} images/s over {info['seconds']:.1f} s"
            + (f" on {info['backend']}" if info["backend"] else ""))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Progress:
    """A text progress bar on the log (stderr): done/total, rate and ETA, at most every ``every`` s."""

    def __init__(self, total: int, done: int = 0, every: float = 2.0, started: float | None = None) -> None:
        self.total, self.done, self.made, self.every = total, done, 0, every
        self.started = self.shown = time.monotonic() if started is None else started
        self.first: float | None = None  # when the first image of this run arrived

    def update(self, n: int) -> None:
        self.done += n
        self.made += n
        now = time.monotonic()
        if self.first is None:
            self.first = now
        if now - self.shown >= self.every or self.done == self.total:
            self.shown = now
            log.info("sample: %s", self.line(now))

    def line(self, now: float) -> str:
        if self.made > 1:  # after the first image, leaving out start-up (loading, Ray)
            rate = (self.made - 1) / max(now - self.first, 1e-9)
        else:
            rate = self.made / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        filled = int(20 * self.done / max(self.total, 1))
        eta_text = str(datetime.timedelta(seconds=round(eta))) if eta != float("inf") else "?"
        return (f"[{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} images, "
                f"{rate:.2f} images/s, ETA {eta_text}")
