"""Experiment: artrt's end to end under other ONNX Runtime CPU session options.

    python benchmarks/ort_options.py build/bench/tiny/artrt --size 32 --rounds 30 --out benchmarks/results/

Every variant is a Pipeline of the same package whose sessions the harness re-creates with
that variant's options (library code untouched). Runs are interleaved, one generation per
variant per round, so load from other processes hits every variant alike; the share of
the machine they took is recorded. A short untimed pause before each run keeps one
variant's spinning workers from slowing the next one down. Variants, each against artrt's own options:

- ``spinning``: ONNX Runtime's default ``session.intra_op.allow_spinning=1``.
- ``threads 1``: one intra-op thread (no thread pool).
- ``static shapes``: ``add_free_dimension_override_by_name`` for the experts' batch and
  latent size, so ONNX Runtime folds the shape arithmetic of the dynamic-axes export.
- ``plain graphs``: the fp32 graphs without the CPU attention fusion (``Component.onnx``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from artrt.runtime import Pipeline
from artrt.runtime.cli.bench_report import busy_cpu_seconds, machine_info, other_cores, summarize

PROMPT = "a lighthouse at dusk"


@dataclass(frozen=True)
class Variant:
    threads: int | None = None  # None: the --threads of the run
    spin: bool = False
    static: bool = False
    plain: bool = False


VARIANTS = {
    "artrt (no spinning)": Variant(),
    "spinning (ORT default)": Variant(spin=True),
    "threads 1": Variant(threads=1),
    "static shapes": Variant(static=True),
    "plain graphs": Variant(plain=True),
}


def session(path: Path, threads: int, v: Variant, dims: dict[str, int] | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if v.spin else "0")
    for name, value in (dims or {}).items():
        options.add_free_dimension_override_by_name(name, value)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def load(package: str, threads: int, v: Variant, size: int) -> Pipeline:
    """The package's Pipeline with every session re-created under ``v``."""
    pipe = Pipeline.load(package, backend="ort-cpu", threads=threads)
    scale = pipe.manifest.latent_scale
    dims = {"batch": 1, "cond_batch": 2, "latent_height": size // scale, "latent_width": size // scale}
    for name, engine in pipe.engines.items():
        comp = pipe.manifest.components[name]
        path = pipe.root / comp.onnx if v.plain else engine.path
        static = v.static and comp.kind == "fused_step"
        engine._session = session(path, v.threads or threads, v, dims if static else None)
    return pipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=20, help="timed rounds after one warm-up round")
    p.add_argument("--threads", type=int, default=machine_info()["cores"])
    p.add_argument("--pause", type=float, default=0.3, help="untimed seconds before each run (default 0.3)")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument("--out", type=Path, help="write ort-options-<size>px.{json,md} here")
    args = p.parse_args()
    pipes = {label: load(args.package, args.threads, VARIANTS[label], args.size) for label in args.variants}
    times: dict[str, list[float]] = {label: [] for label in pipes}
    machine = machine_info()
    before, started = busy_cpu_seconds(), time.perf_counter()
    for round_ in range(args.rounds + 1):
        for label, pipe in pipes.items():
            time.sleep(args.pause)  # let the previous variant's spinning workers go idle
            start = time.perf_counter()
            pipe.generate(PROMPT, steps=args.steps, height=args.size, width=args.size, seed=0)
            if round_:
                times[label].append(time.perf_counter() - start)
    machine["other_processes_cores"] = other_cores(before, busy_cpu_seconds(), started)
    reference = float(np.median(times[args.variants[0]]))
    rows = {label: {**summarize(t), "variant": asdict(VARIANTS[label]),
                    "artrt_speedup": float(np.median(t)) / reference} for label, t in times.items()}
    report = {"package": args.package, "size": args.size, "steps": args.steps, "threads": args.threads,
              "rounds": args.rounds, "machine": machine, "variants": rows}
    table = markdown(report)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"ort-options-{Path(args.package).parent.name}-{args.size}px"
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(table + "\n")


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"#### ONNX Runtime CPU session options: {report['package']}, {report['size']}x{report['size']} px, "
        f"{report['steps']} steps",
        "",
        f"{m['cpu']}, {m['cores']} cores, {report['threads']} intra-op threads unless noted; {m['date']}; other "
        f"processes used {m['other_processes_cores'] or 0:.2f} cores meanwhile. p50/p90 of {report['rounds']} "
        "interleaved rounds after 1 warm-up, end to end.",
        "",
        "| session options | e2e p50 ms | e2e p90 ms | artrt speed-up (variant p50 / artrt p50) |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {label} | {r['p50'] * 1e3:.1f} | {r['p90'] * 1e3:.1f} | {r['artrt_speedup']:.2f}x |"
              for label, r in report["variants"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
