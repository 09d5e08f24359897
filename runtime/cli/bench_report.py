"""Statistics and output of ``artrt bench``: percentiles, least-squares fits, machine stamp,
the readable table and the JSON document. Plain numpy; no timing happens here."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from artrt.errors import InputError, OutputError


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default method): p50 of [1, 2, 3, 4] is 2.5, p90 is 3.7."""
    if len(values) == 0:
        raise ValueError("percentile of no values")
    return float(np.percentile(np.asarray(values, np.float64), q))


def summarize(values: Sequence[float]) -> dict[str, float]:
    """p50, p90, min and the number of samples."""
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "min": float(min(values)), "n": len(values)}


def fit_line(x: Sequence[float], y: Sequence[float]) -> dict[str, float] | None:
    """Least squares ``y = fixed + slope * x``; None with fewer than two distinct ``x``.

    ``r2`` is the coefficient of determination (1.0 for a perfect line)."""
    xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(np.unique(xs)) < 2:
        return None
    design = np.stack([np.ones_like(xs), xs], axis=1)
    (fixed, slope), *_ = np.linalg.lstsq(design, ys, rcond=None)
    residual = float(np.sum((ys - (fixed + slope * xs)) ** 2))
    total = float(np.sum((ys - ys.mean()) ** 2))
    return {"fixed": float(fixed), "slope": float(slope), "r2": 1.0 - residual / total if total > 0 else 1.0}


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What a result is stamped with: CPU, usable cores, OS, Python, onnxruntime, UTC date."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort_version,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,  # other work on the machine
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def busy_cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds used by the whole machine, by this process and its children) so far.

    Their difference over a run is the CPU that other processes took meanwhile: the part of
    a noisy timing that is not ours. Linux only (``/proc/stat``); None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    values = [int(v) for v in fields]
    busy = sum(values) - values[3] - (values[4] if len(values) > 4 else 0)  # minus idle and iowait
    t = os.times()
    return busy / ticks, t.user + t.system + t.children_user + t.children_system


def other_cores(before: tuple[float, float] | None, after: tuple[float, float] | None, started: float) -> float | None:
    """Average number of cores other processes kept busy since ``started`` (a perf_counter value)."""
    seconds = time.perf_counter() - started
    if before is None or after is None or seconds <= 0:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / seconds)


def check_json_path(path: str | Path) -> Path:
    """Refuse a ``--json`` path that cannot be written, before any benchmark runs."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise InputError(f"--json {path} is a directory; give a file name, e.g. {path / 'bench.json'}")
    if not parent.is_dir():
        raise InputError(f"cannot write --json {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"cannot write --json {path}: {path if path.exists() else f'directory {parent}'} "
                         "is not writable")
    return path


def write_json(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write the report; a failure is one :class:`OutputError` line."""
    path = Path(path)
    try:
        path.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as exc:
        raise OutputError(f"cannot write --json {path}: {exc.strerror or exc}") from None
    return path


# -- the readable table ----------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:10.2f}"


def _stage_rows(report: Mapping[str, Any]) -> list[str]:
    rows = [f"{'stage':<28}{'p50 ms':>10}{'p90 ms':>12}"]
    for name, stats in report["stages"].items():
        rows.append(f"{_stage_label(name, report):<28}{_ms(stats['p50'])}  {_ms(stats['p90'])}")
    return rows


def _stage_label(name: str, report: Mapping[str, Any]) -> str:
    if name.startswith("step:"):
        expert = name.split(":", 1)[1]
        return f"  per step {expert} (x{report['steps_per_expert'].get(expert, 0)})"
    if name.startswith("expert:"):
        return f"expert {name.split(':', 1)[1]} (all steps)"
    switch = "  step at the switch" + (" (after load)" if "load" in report["stages"] else "")
    return {"switch_step": switch, "e2e": "end to end", "floor": "engine floor", "host_overhead": "host overhead",
            "load": "engine loads (low memory)"}.get(name, name)


def _fit_line_text(fit: Mapping[str, Any] | None, unit: str, scale: float, label: str) -> str:
    if not fit:
        return f"{label:<16}not measured"
    points = ", ".join(str(p["x_label"]) for p in fit["points"])
    return (f"{label:<16}e2e = {fit['fixed'] * 1e3:.1f} ms + {fit['slope'] * scale * 1e3:.3f} ms x {unit}"
            f"  (r2 {fit['r2']:.3f}; {points})")


def format_table(report: Mapping[str, Any]) -> str:
    """The human-readable summary printed by ``artrt bench``."""
    c, m = report["config"], report["machine"]
    overhead = report["stages"].get("host_overhead_pct", {}).get("p50")
    lines = [
        f"artrt bench  {c['model']}  backend {report['backend']}  {c['steps']} steps  {c['width']}x{c['height']}"
        f"  runs {c['runs']} (warm-up {c['warmup']})  threads {c['threads'] or 'default'}",
        f"machine       {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}, {m['date']}"
        + ("" if m.get("other_processes_cores") is None else
           f"; other processes used {m['other_processes_cores']:.2f} cores meanwhile"),
        f"cold start    load {report['cold_start']['load_s']:.3f} s, load to first image "
        f"{report['cold_start']['first_image_s']:.3f} s",
        "",
        *_stage_rows({**report, "stages": {k: v for k, v in report["stages"].items() if k != "host_overhead_pct"}}),
        f"{'host overhead share':<28}{'-' if overhead is None else f'{overhead:10.2f} %'}",
        "",
    ]
    mem = report["memory"]
    lines.append(f"peak host mem {mem['peak_rss_mib']:.0f} MiB ({mem['method']}; {mem['before_load_rss_mib']:.0f} MiB "
                 f"before load)" + (f", device used {mem['device_used_mib']:.0f} MiB" if mem.get("device_used_mib")
                                    else ""))
    lines.append("throughput    " + ", ".join(f"batch {t['batch']}: {t['images_per_s']:.3f} img/s "
                                              f"({t['e2e_p50'] * 1e3:.1f} ms)" for t in report["throughput"]))
    lines.append(_fit_line_text(report.get("fit_steps"), "steps", 1.0, "cost vs steps"))
    lines.append(_fit_line_text(report.get("fit_size"), "megapixels", 1e6, "cost vs size"))
    return "\n".join(lines)
