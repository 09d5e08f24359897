"""``artrt sample --ray``: the same batches, made by a pool of Ray actors.

Ray Data maps the work batches (one row each) over an actor pool with
``map_batches``; every actor loads one :class:`Pipeline` (one GPU each when the
cluster has GPUs) and returns PNG bytes. The driver writes every file and record,
exactly as a local run does, so the output directory needs to exist only where the
driver runs; the package must be readable at the same path on every node.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

from artrt.errors import ArtrtError, EngineError, InputError

from .tasks import ImageResult, ImageTask, SampleConfig, describe_device, make_batch

log = logging.getLogger(__name__)
RAY_MISSING = "--ray needs the 'ray' extra (pip install 'artrt[ray]')"


def check_ray() -> None:
    """Refuse ``--ray`` without Ray installed (one :class:`InputError` line), before any work."""
    try:
        import ray  # noqa: F401  (a fraction of a second; the run imports it anyway)
    except ImportError:
        raise InputError(RAY_MISSING) from None


class BatchMaker:
    """A Ray Data actor: one loaded pipeline that turns work batches into PNG rows.

    A package that does not load here comes back as a ``fatal`` row, not as an actor
    that dies and is restarted, so the driver can stop with the reason in one line."""

    COLUMNS = ("id", "png", "sha256", "timings", "batch_size", "backend", "device", "error", "fatal")

    def __init__(self, model: str, backend: str, threads: int | None, verify: bool, memory: str = "default",
                 vae_tile: int | None = None, loras: tuple[tuple[str, float, str], ...] = ()) -> None:
        from artrt.runtime.lora import Lora
        from artrt.runtime.pipeline import Pipeline

        self.pipe, self.load_error = None, ""
        try:
            self.pipe = Pipeline.load(model, backend=backend, threads=threads, verify_hashes=verify, memory=memory,
                                      vae_tile=vae_tile, loras=[Lora(*spec) for spec in loras])
            self.device = describe_device(self.pipe)
        except ArtrtError as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"

    def __call__(self, rows: dict[str, Any]) -> dict[str, list[Any]]:
        columns: dict[str, list[Any]] = {k: [] for k in self.COLUMNS}
        for text in rows["batch"]:
            batch = [ImageTask.from_json(t) for t in json.loads(text)]
            if self.pipe is None:
                values = [(t.id, b"", "", "{}", len(batch), "", "", self.load_error, True) for t in batch]
            else:
                values = [(r.task.id, r.png or b"", r.sha256 or "", json.dumps(r.timings), r.batch_size, r.backend,
                           r.device, r.error or "", False) for r in make_batch(self.pipe, batch, self.device)]
            for row in values:
                for key, value in zip(self.COLUMNS, row):
                    columns[key].append(value)
        return columns


def ray_results(cfg: SampleConfig, batches: Sequence[list[ImageTask]], info: dict[str, Any]) -> Iterator[ImageResult]:
    """Make ``batches`` on Ray and yield the images as they arrive (in any order)."""
    if not batches:
        return
    started_here = _connect(cfg.ray)  # one line, not a traceback, if Ray is missing
    import ray

    try:
        yield from _run(cfg, batches, info)
    finally:
        if started_here:
            ray.shutdown()


def _connect(address: str | None) -> bool:
    """Connect to Ray (``local`` starts an instance here); False when this process already was."""
    try:
        import ray
    except ImportError:
        raise InputError(RAY_MISSING) from None
    if ray.is_initialized():
        return False
    try:
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise InputError(f"cannot connect to Ray at {address!r}: {exc} (start one with 'ray start --head', "
                         "or use --ray local)") from None
    return True


def _run(cfg: SampleConfig, batches: Sequence[list[ImageTask]], info: dict[str, Any]) -> Iterator[ImageResult]:
    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # progress lines; errors come back as one line
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    actors, resources, threads = _pool(cfg, ray.cluster_resources())
    info["ray"] = {"address": cfg.ray, "actors": actors, "per_actor": resources}
    log.info("sample: Ray, %d actor(s) with %s each", actors, resources)
    tasks = {t.id: t for batch in batches for t in batch}
    rows = [{"batch": json.dumps([t.to_json() for t in batch])} for batch in batches]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        BatchMaker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"model": str(cfg.model.resolve()), "backend": cfg.backend, "threads": threads,
                               "verify": cfg.verify, "memory": cfg.memory, "vae_tile": cfg.vae_tile,
                               "loras": tuple((str(x.file.resolve()), x.scale, x.expert) for x in cfg.loras)},
        **resources,
    )
    try:
        for row in dataset.iter_rows():
            if row["fatal"]:
                raise EngineError(f"a Ray actor cannot load {cfg.model}: {row['error']}")
            yield _result(tasks, row)
    except ray.exceptions.RayError as exc:
        raise EngineError(f"the Ray job failed: {_cause(exc)}") from None


def _cause(exc: BaseException) -> str:
    """The artrt error inside a Ray error (an actor's traceback as text), else its first line."""
    text = str(exc)
    found = re.findall(r"artrt\.runtime\.errors\.\w+: (.+)", text)
    if found:
        return found[-1].strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


def _result(tasks: dict[str, ImageTask], row: dict[str, Any]) -> ImageResult:
    return ImageResult(tasks[row["id"]], row["png"] or None, row["sha256"] or None, json.loads(row["timings"]),
                       int(row["batch_size"]), row["backend"], row["device"], row["error"] or None)


def _pool(cfg: SampleConfig, cluster: dict[str, float]) -> tuple[int, dict[str, float], int | None]:
    """Actor count, resources per actor and engine threads: a GPU each when there are GPUs, else
    ``--threads`` CPUs each (default 1)."""
    gpus = int(cluster.get("GPU", 0))
    if gpus and cfg.backend != "ort-cpu":
        return cfg.actors or gpus, {"num_gpus": 1}, cfg.threads
    threads = cfg.threads or 1
    return cfg.actors or max(1, int(cluster.get("CPU", 1)) // threads), {"num_cpus": threads}, threads
