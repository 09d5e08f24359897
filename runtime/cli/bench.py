"""``artrt bench``: where the time of a generation goes, measured with the public Pipeline.

Method (also recorded in the JSON under ``method``):

- Stages come from ``GenerationResult.timings``; end to end is wall time around
  ``Pipeline.generate`` in this harness.
- Engine floor: the harness wraps each engine's backend call (``_run`` / ``_run_bound``,
  the ONNX Runtime session call) with a timer on the instance, never in library code; the
  floor is the sum of those calls and host overhead = end to end - floor (artrt's own
  input checks count as overhead). On CUDA backends a call only enqueues, so there the
  floor is enqueue time, not GPU time.
- Per-step time of an expert = its stage seconds / its number of engine calls. The step
  at the switch = end of the detail expert's first call - end of the composition expert's
  last call (the detail expert's first step plus the host work of switching experts).
- ``--memory low``: engines are opened during each call; their load seconds
  (``GenerationResult.timings["load"]``) are reported as their own stage, left out of the
  host overhead, and the step at the switch starts when the detail expert has loaded.
- Peak host memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the process's high-water
  mark, imports included); before-load value given beside it.
- Fits: least squares over the p50 end to end of a few step counts and sizes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from artrt.errors import ArtrtError, InputError
from artrt.runtime.arguments import GenerationArguments, check_backend, check_latent_limit, check_side
from artrt.runtime.checks import MAX_STEPS, check_int

from .bench_report import (
    busy_cpu_seconds,
    check_json_path,
    fit_line,
    format_table,
    machine_info,
    other_cores,
    summarize,
    write_json,
)
from .options import add_lora_option, add_memory_options, check_memory_options, parse_loras

log = logging.getLogger("artrt.runtime.cli.bench")  # also when run as __main__
PROMPT = "a lighthouse at dusk"


@dataclass(frozen=True)
class BenchConfig:
    model: str
    backend: str = "auto"
    steps: int = 20
    height: int | None = None  # None: the package default
    width: int | None = None
    batches: tuple[int, ...] = (1,)
    runs: int = 5
    warmup: int = 1
    threads: int | None = None
    fit: bool = True
    fit_runs: int = 2
    verify: bool = True
    memory: str = "default"
    vae_tile: int | None = None
    loras: tuple[str, ...] = ()  # --lora FILE[:SCALE][@EXPERT] specs


class EngineTimer:
    """Records ``(component, start, end)`` of every backend call of ``engines``, and
    ``(component, time)`` of every engine opened (loaded) meanwhile.

    Wraps the instances' ``_run`` and ``_run_bound`` (shadowing the class methods);
    :meth:`restore` removes the wrappers."""

    def __init__(self, pipe: Any) -> None:
        self.calls: list[tuple[str, float, float]] = []
        self.opened: list[tuple[str, float]] = []
        self._patched: list[tuple[Any, str]] = []
        pipe.watch_engines(self.add)

    def add(self, name: str, engine: Any) -> None:
        """Time ``engine`` (component ``name``, just opened) from now on."""
        self.opened.append((name, time.perf_counter()))
        for attr in ("_run", "_run_bound"):
            setattr(engine, attr, self._wrap(name, getattr(engine, attr)))
            self._patched.append((engine, attr))

    def _wrap(self, name: str, call: Any) -> Any:
        calls, clock = self.calls, time.perf_counter

        def timed(*args: Any) -> Any:
            start = clock()
            try:
                return call(*args)
            finally:
                calls.append((name, start, clock()))

        return timed

    def take(self) -> list[tuple[str, float, float]]:
        """The calls since the last ``take`` (and forget them)."""
        taken = list(self.calls)
        self.calls.clear()
        return taken

    def take_opened(self) -> list[tuple[str, float]]:
        """The engines opened since the last ``take_opened`` (and forget them)."""
        taken = list(self.opened)
        self.opened.clear()
        return taken

    def restore(self) -> None:
        for engine, attr in self._patched:
            vars(engine).pop(attr, None)
        self._patched = []


def generate_once(pipe: Any, timer: EngineTimer, steps: int, height: int, width: int, batch: int) -> dict[str, Any]:
    """One timed generation: wall seconds, the pipeline's stage timings and the engine calls."""
    timer.take()
    timer.take_opened()
    started = time.perf_counter()
    result = pipe.generate(PROMPT, steps=steps, height=height, width=width, num_images=batch, seed=0)
    e2e = time.perf_counter() - started
    return {"e2e": e2e, "timings": dict(result.timings), "calls": timer.take(), "opened": timer.take_opened()}


def stage_values(sample: Mapping[str, Any], experts: Sequence[tuple[str, str]]) -> dict[str, float]:
    """Seconds per stage of one generation; ``experts`` is ``[(expert name, component)]`` in order.
    Engine loads (``load``, low memory only) are not host overhead."""
    values = {k: v for k, v in sample["timings"].items() if k != "total"}
    calls = sample["calls"]
    for name, component in experts:
        count = sum(1 for c in calls if c[0] == component)
        if count and f"expert:{name}" in values:
            values[f"step:{name}"] = values[f"expert:{name}"] / count
    switch = switch_step(calls, [component for _, component in experts], sample.get("opened", ()))
    if switch is not None:
        values["switch_step"] = switch
    values["e2e"] = sample["e2e"]
    values["floor"] = sum(end - start for _, start, end in calls)
    values["host_overhead"] = values["e2e"] - values["floor"] - values.get("load", 0.0)
    values["host_overhead_pct"] = 100.0 * values["host_overhead"] / values["e2e"]
    return values


def switch_step(calls: Sequence[tuple[str, float, float]], components: Sequence[str],
                opened: Sequence[tuple[str, float]] = ()) -> float | None:
    """End of the second expert's first call minus end of the call before it (None without a switch),
    or minus the moment the second expert finished loading when it was opened in between (``opened``:
    ``(component, time)`` of engines opened, with ``memory="low"``)."""
    if len(components) < 2:
        return None
    for i, (name, start, end) in enumerate(calls):
        if name == components[1]:
            if i == 0 or calls[i - 1][0] != components[0]:
                return None
            before = calls[i - 1][2]
            loaded = [t for c, t in opened if c == name and before <= t <= start]
            return end - max([before, *loaded])
    return None


def collect(samples: Sequence[Mapping[str, Any]], experts: Sequence[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """p50/p90 of every stage over ``samples``, in a readable order."""
    per_run = [stage_values(s, experts) for s in samples]
    names = list(dict.fromkeys(k for values in per_run for k in values))
    order = {"tokenize": 0, "decode": 3, "load": 3.5, "e2e": 4, "floor": 5, "host_overhead": 6,
             "host_overhead_pct": 7}
    names.sort(key=lambda k: order.get(k, 2 if k.startswith(("expert:", "step:", "switch")) else 1))
    return {k: summarize([v[k] for v in per_run if k in v]) for k in names}


def _timed_runs(pipe: Any, timer: EngineTimer, runs: int, steps: int, h: int, w: int, batch: int) -> list[dict]:
    log.info("  %d run(s): %d steps, %dx%d, batch %d", runs, steps, w, h, batch)
    return [generate_once(pipe, timer, steps, h, w, batch) for _ in range(runs)]


def fit_steps(pipe: Any, timer: EngineTimer, cfg: BenchConfig, h: int, w: int, main_p50: float) -> dict | None:
    """``e2e = fixed + per_step * steps`` over steps/4, steps/2 and steps (p50 each)."""
    counts = sorted({max(2, cfg.steps // 4), max(2, cfg.steps // 2)} - {cfg.steps})
    points = [(n, summarize([s["e2e"] for s in _timed_runs(pipe, timer, cfg.fit_runs, n, h, w, 1)])["p50"])
              for n in counts] + [(cfg.steps, main_p50)]
    fit = fit_line([p[0] for p in points], [p[1] for p in points])
    return fit and {**fit, "points": [{"x": n, "x_label": n, "e2e_p50": t} for n, t in points]}


def fit_size(pipe: Any, timer: EngineTimer, cfg: BenchConfig, h: int, w: int, main_p50: float) -> dict | None:
    """``e2e = fixed + per_pixel * pixels`` over about 1/2, 3/4 and all of the size (multiples kept)."""
    m = pipe.manifest.size_multiple
    scaled = {(max(m, round(h * f / m) * m), max(m, round(w * f / m) * m)) for f in (0.5, 0.75)} - {(h, w)}
    points = [(sh, sw, summarize([s["e2e"] for s in _timed_runs(pipe, timer, cfg.fit_runs, cfg.steps, sh, sw, 1)])
               ["p50"]) for sh, sw in sorted(scaled)] + [(h, w, main_p50)]
    fit = fit_line([a * b for a, b, _ in points], [t for *_, t in points])
    return fit and {**fit, "points": [{"x": a * b, "x_label": f"{b}x{a}", "e2e_p50": t} for a, b, t in points]}


def peak_rss_mib() -> float | None:
    """The process's peak resident set (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def device_used_mib() -> float | None:
    """Memory in use on the current GPU (all processes; a snapshot, not a peak), or None."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    err, free, total = cudart.cudaMemGetInfo()
    return None if int(err) != 0 else (total - free) / 2**20


def check_config(cfg: BenchConfig) -> tuple[int, int]:
    """Check every option against the package, before anything loads; returns (height, width)."""
    from artrt.runtime.package import read_manifest

    check_int("--steps", cfg.steps, 1, MAX_STEPS)
    check_backend(cfg.backend)
    if cfg.runs < 1 or cfg.warmup < 0 or not cfg.batches or any(b < 1 for b in cfg.batches):
        raise InputError("--runs and --batch must be >= 1 and --warmup >= 0")
    if cfg.fit:
        check_int("--fit-runs", cfg.fit_runs, 1)
    m = read_manifest(cfg.model, verify_hashes=False)
    h, w = cfg.height or m.defaults.height, cfg.width or m.defaults.width
    try:
        check_side("height", h, m.size_multiple)
        check_side("width", w, m.size_multiple)
        check_latent_limit(m, h, w)
    except InputError as exc:
        raise InputError(f"--size {w}x{h}: {exc}") from None
    device = "cpu" if cfg.backend in ("auto", "ort-cpu") else "cuda"  # auto: as if on the CPU, as generate
    GenerationArguments.check(m, PROMPT, steps=cfg.steps, seed=0, height=h, width=w,
                              num_images=max(cfg.batches)).check_memory(m, device)
    return h, w


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Measure everything ``artrt bench`` reports and return it as a JSON-ready dict."""
    from artrt.runtime.pipeline import Pipeline

    h, w = check_config(cfg)
    before, cpu = peak_rss_mib(), busy_cpu_seconds()
    started = time.perf_counter()
    pipe = Pipeline.load(cfg.model, backend=cfg.backend, threads=cfg.threads, verify_hashes=cfg.verify,
                         memory=cfg.memory, vae_tile=cfg.vae_tile, loras=parse_loras(list(cfg.loras)))
    load_s = time.perf_counter() - started
    timer = EngineTimer(pipe)
    try:
        log.info("cold start: first image")
        generate_once(pipe, timer, cfg.steps, h, w, 1)
        cold = {"load_s": load_s, "first_image_s": time.perf_counter() - started}
        for _ in range(cfg.warmup):
            generate_once(pipe, timer, cfg.steps, h, w, 1)
        experts = [(e.name, e.component) for e in pipe.manifest.experts]
        samples = _timed_runs(pipe, timer, cfg.runs, cfg.steps, h, w, 1)
        stages = collect(samples, experts)
        e2e = stages["e2e"]["p50"]
        throughput = [{"batch": 1, "e2e_p50": e2e, "images_per_s": 1 / e2e}]
        for b in (b for b in cfg.batches if b != 1):
            p50 = summarize([s["e2e"] for s in _timed_runs(pipe, timer, cfg.runs, cfg.steps, h, w, b)])["p50"]
            throughput.append({"batch": b, "e2e_p50": p50, "images_per_s": b / p50})
        fits = {"fit_steps": fit_steps(pipe, timer, cfg, h, w, e2e), "fit_size": fit_size(pipe, timer, cfg, h, w, e2e)
                } if cfg.fit else {"fit_steps": None, "fit_size": None}
        counts = {name: sum(1 for c in samples[0]["calls"] if c[0] == comp) for name, comp in experts}
        memory = {"peak_rss_mib": peak_rss_mib(), "before_load_rss_mib": before, "method": "ru_maxrss",
                  "device_used_mib": device_used_mib() if pipe.device == "cuda" else None}
        backend = pipe.backend
    finally:
        timer.restore()
        pipe.close()
    config = {**asdict(cfg), "height": h, "width": w, "batches": list(cfg.batches)}
    machine = {**machine_info(), "other_processes_cores": other_cores(cpu, busy_cpu_seconds(), started)}
    return {"artrt_bench": 1, "config": config, "backend": backend, "machine": machine, "cold_start": cold,
            "stages": stages, "steps_per_expert": counts, "memory": memory,
            "throughput": sorted(throughput, key=lambda t: t["batch"]), **fits, "method": METHOD}


METHOD = {
    "end_to_end": "wall time around Pipeline.generate",
    "engine_floor": "sum of time inside each engine's backend call (_run/_run_bound wrapped in the harness); "
    "on CUDA backends that is enqueue time",
    "per_step": "expert stage seconds / number of that expert's engine calls",
    "switch_step": "end of the detail expert's first call - end of the composition expert's last call "
    "(--memory low: - end of the detail expert's load, when later)",
    "load": "--memory low: GenerationResult.timings['load'], engines opened during the call; "
    "not counted in host overhead (= end to end - floor - load)",
    "memory": "resource.getrusage(RUSAGE_SELF).ru_maxrss, whole process",
    "percentiles": "linear interpolation (numpy default) over the timed runs, after warm-up",
}


def parse_size(text: str) -> tuple[int, int]:
    """``256`` -> (256, 256); ``192x256`` -> (192, 256) as width x height (as ``artrt info`` prints
    sizes and the server's ``size`` takes them)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not N or WxH") from None
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} is not N or WxH")
    return (parts[0], parts[-1])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help="package directory")
    p.add_argument("--backend", default="auto", help="auto (default), trt, ort-cuda or ort-cpu")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--size", type=parse_size, help="N or WxH (width x height) in pixels (default: the package's size)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], metavar="B", help="batch sizes for throughput")
    p.add_argument("--runs", type=int, default=5, help="timed runs per setting, after warm-up (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs after the cold start (default 1)")
    p.add_argument("--threads", type=int, help="CPU threads per engine (default: one per core)")
    p.add_argument("--json", help="also write the full results as JSON to this file")
    p.add_argument("--no-fit", action="store_true", help="skip the steps and size sweeps")
    p.add_argument("--fit-runs", type=int, default=2, help="runs per point of the sweeps (default 2)")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks of the package files")
    add_memory_options(p)
    add_lora_option(p)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``artrt`` command line (the caller dispatches to :func:`run`)."""
    p = subparsers.add_parser("bench", help="measure latency per stage, overhead, memory and throughput",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


def run(args: argparse.Namespace) -> None:
    check_memory_options(args)
    width, height = args.size or (None, None)
    cfg = BenchConfig(args.model, args.backend, args.steps, height, width, tuple(args.batch), args.runs, args.warmup,
                      args.threads, not args.no_fit, args.fit_runs, not args.no_verify, args.memory, args.vae_tiles,
                      tuple(args.lora))
    if args.json:
        check_json_path(args.json)  # before the benchmark, which takes minutes
    report = run_bench(cfg)
    print(format_table(report), flush=True)
    if args.json:  # after the table, so a late failure (disk full, folder removed) loses no results
        log.info("wrote %s", write_json(report, args.json))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m artrt.runtime.cli.bench --model PKG ...``"""
    parser = argparse.ArgumentParser(prog="python -m artrt.runtime.cli.bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from .options import configure_logging

    configure_logging()
    try:
        run(args)
    except ArtrtError as exc:
        print(f"artrt: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
