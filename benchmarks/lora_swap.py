"""LoRA cost on ONNX Runtime CPU: time to apply at load, time to swap, memory added.

    python benchmarks/lora_swap.py --workload tiny --out benchmarks/results/lora-tiny.json
    python benchmarks/lora_swap.py --workload small --rank 16 --out benchmarks/results/lora-small.json

Builds the random SDXL pair of ``--workload`` (``artrt.export.random_models``; cached in
``--work``), exports it for the CPU with LoRA targets, and writes two random LoRA files in
diffusers format from the targets (rank ``--rank`` on every attention, feed-forward and
projection weight: A on the composition expert, B on both experts). Each mode runs in its own
process, so its RSS is its own:

- ``plain``: load without LoRA;
- ``lora``: load with A (the time to apply it at load is the difference), then swap
  A -> B -> none -> A ``--swaps`` times, timing each ``set_loras`` and, apart, the part of it
  that reads the files and computes the weights (``prepare``; the rest recreates the sessions).

Memory added: RSS after loading with A minus RSS after loading plain (both after one image),
and the bytes of the replaced weights artrt holds. Each mode also times one image, and checks
that ``set_loras([])`` gives the plain images bit for bit.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TARGETS = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2)$")
PROMPT = "a lighthouse at dusk"


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def prepare(work: Path, workload: str, rank: int) -> tuple[Path, Path, Path]:
    """The package (with LoRA targets) and two LoRA files, made once per workload and rank."""
    package = work / f"{workload}-cpu"
    if not (package / "artrt.json").exists():
        from diffusers import UNet2DConditionModel

        from artrt.export import export_package, load_sdxl_ensemble
        from artrt.export.lora_targets import add_lora_targets
        from artrt.export.random_models import make_sdxl_pair

        models = work / f"{workload}-models"
        if not (models / "refiner").exists():
            make_sdxl_pair(models, size=workload, seed=0)
        export_package(load_sdxl_ensemble(models / "base", models / "refiner"), package, targets=("cpu",),
                       overwrite=True)
        add_lora_targets(package, {f"expert_{name}": UNet2DConditionModel.from_pretrained(models / folder / "unet")
                                   for name, folder in (("composition", "base"), ("detail", "refiner"))})
    a = _random_lora(package, work / f"{workload}-a-r{rank}.safetensors", ["expert_composition"], rank, seed=1)
    b = _random_lora(package, work / f"{workload}-b-r{rank}.safetensors", ["expert_composition", "expert_detail"],
                     rank, seed=2)
    return package, a, b


def _random_lora(package: Path, path: Path, components: list[str], rank: int, seed: int) -> Path:
    """Random ``unet.<module>.lora_A/lora_B`` for the targeted modules every one of ``components`` has."""
    if path.exists():
        return path
    from safetensors.numpy import save_file

    docs = [json.loads((package / c / "lora_targets.json").read_text())["targets"] for c in components]
    common = [m for m in docs[0] if TARGETS.search(m) and all(d.get(m, {}).get("shape") == docs[0][m]["shape"]
                                                            for d in docs)]
    rng = np.random.default_rng(seed)
    tensors = {}
    for module in common:
        out, inp = docs[0][module]["shape"][:2]
        tensors[f"unet.{module}.lora_A.weight"] = (rng.standard_normal((rank, inp)) * 0.05).astype(np.float16)
        tensors[f"unet.{module}.lora_B.weight"] = (rng.standard_normal((out, rank)) * 0.05).astype(np.float16)
    save_file(tensors, str(path))
    return path


def child(package: str, mode: str, a: str, b: str, swaps: int, steps: int, threads: int, size: int | None) -> dict:
    from artrt.runtime import Lora, Pipeline
    from artrt.runtime.engine_records import component_file
    from artrt.runtime.lora_weights import prepare_loras

    sets = {"A": [Lora(a, 1.0, "composition")], "B": [Lora(b, 0.7, "both")], "none": []}
    started = time.perf_counter()
    pipe = Pipeline.load(package, backend="ort-cpu", threads=threads, loras=sets["A"] if mode == "lora" else [])
    load_s = time.perf_counter() - started

    def image() -> tuple[float, str]:
        tick = time.perf_counter()
        out = pipe.generate(PROMPT, steps=steps, seed=0, height=size, width=size)
        return time.perf_counter() - tick, hashlib.sha256(out.images[0].tobytes()).hexdigest()

    image_s, digest = image()
    result = {"mode": mode, "load_s": load_s, "image_s": image_s, "rss_after_image_mib": rss_mib(), "sha256": digest}
    if mode == "plain":
        return result
    files = {n: component_file(pipe.root, pipe.manifest, n, "ort-cpu") for n in pipe.manifest.components}
    precisions = {n: "fp32" for n in files}  # ort-cpu runs the fp32 graphs
    plan = prepare_loras(pipe.root, pipe.manifest, sets["A"], files, precisions)
    result["replaced_weights_mib"] = sum(a.nbytes for c in plan.updates for a in plan.weights(c).values()) / 2**20
    del plan
    times: dict[str, list[float]] = {"B": [], "none": [], "A": []}
    prep: dict[str, list[float]] = {"B": [], "none": [], "A": []}
    for _ in range(swaps):
        for name in ("B", "none", "A"):
            tick = time.perf_counter()
            pipe.set_loras(sets[name])
            times[name].append(time.perf_counter() - tick)
            if name == "none":
                result["none_sha256"] = image()[1]
            tick = time.perf_counter()
            plan = prepare_loras(pipe.root, pipe.manifest, sets[name], files, precisions)
            for component in plan.updates:  # computed and dropped one component at a time, as set_loras does
                plan.weights(component)
            prep[name].append(time.perf_counter() - tick)
    result["swap_s"] = {k: statistics.median(v) for k, v in times.items()}
    result["prepare_s"] = {k: statistics.median(v) for k, v in prep.items()}
    result["image_with_lora_s"] = image()[0]
    result["peak_rss_mib"] = _peak_mib()
    pipe.close()
    return result


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("tiny", "small", "large"), default="tiny")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--swaps", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, help="image size in pixels (default: the package's)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--work", type=Path, default=Path("build/bench-lora"))
    p.add_argument("--out")
    p.add_argument("--child", nargs=3, metavar=("MODE", "A", "B"), help=argparse.SUPPRESS)
    p.add_argument("--package", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, a, b = args.child
        print(json.dumps(child(args.package, mode, a, b, args.swaps, args.steps, args.threads, args.size)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    package, a, b = prepare(args.work, args.workload, args.rank)
    results = {}
    for mode in ("plain", "lora"):
        cmd = [sys.executable, __file__, "--package", str(package), "--child", mode, str(a), str(b), "--swaps",
               str(args.swaps), "--steps", str(args.steps), "--threads", str(args.threads)]
        cmd += ["--size", str(args.size)] if args.size else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{mode} failed:\n{done.stderr}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    plain, lora = results["plain"], results["lora"]
    report = {
        "workload": args.workload, "rank": args.rank, "steps": args.steps, "size": args.size, "threads": args.threads,
        "package_mib": sum(f.stat().st_size for f in package.rglob("*") if f.is_file()) / 2**20,
        "lora_mib": {"A": a.stat().st_size / 2**20, "B": b.stat().st_size / 2**20},
        "apply_at_load_s": lora["load_s"] - plain["load_s"], "swap_s": lora["swap_s"], "prepare_s": lora["prepare_s"],
        "rss_added_mib": lora["rss_after_image_mib"] - plain["rss_after_image_mib"],
        "replaced_weights_mib": lora["replaced_weights_mib"],
        "image_s": {"plain": plain["image_s"], "lora": lora["image_with_lora_s"]},
        "none_is_plain": lora["none_sha256"] == plain["sha256"], "results": results,
        "machine": {"cpu": _cpu(), "cores": len(os.sched_getaffinity(0)), "load": os.getloadavg(),
                    "python": platform.python_version()},
        "date": datetime.date.today().isoformat(),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
