"""artrt against the peers a user would pick instead, in one run on one machine.

    python benchmarks/compare.py --workload small --out benchmarks/results/

Builds the random SDXL base + refiner pair of the workload from configs
(``artrt.export.random_models``; cached under ``--work``), exports it for artrt and for
optimum, then times end-to-end generation (prompt to decoded image) of every peer with the
same latents, prompt, steps, switch, guidance, Euler sampler and thread count. The ``demo``
workload is the embedded demo model (32 px, its own defaults: DPM-Solver++(2M), switch and
guidance from ``demo.json``) in artrt and in a PyTorch loop of diffusers' pieces. The
``wan-tiny`` / ``wan-small`` workloads are a random Wan 2.2 two-expert ``WanPipeline`` folder
(``artrt.export.wan_models``) in artrt and in diffusers' ``WanPipeline``: same latents
``[1, 16, (frames - 1)/4 + 1, H/8, W/8]``, prompt and negative prompt, guidance pair, boundary,
UniPC steps, and ``--frames`` frames (1: text to image), every frame compared. Runs are
interleaved (one run of each peer per round) so drift in the machine's speed hits every
peer alike. Writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``--out``. A peer
that fails is recorded with the reason, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from peers import DEFAULT_PEERS, DEMO_PEERS, DEMO_PROMPT, PEERS, WAN_NEGATIVE, WAN_PEERS, WAN_PROMPT, Settings
from report import write_outputs

from artrt.runtime.cli.bench import stage_values
from artrt.runtime.cli.bench_report import busy_cpu_seconds, machine_info, other_cores, summarize

log = logging.getLogger("benchmarks")
EXPERTS = [("composition", "expert_composition"), ("detail", "expert_detail")]
WAN_WORKLOADS = {"wan-tiny": "tiny", "wan-small": "small"}  # workload -> artrt.export.wan_models size
WAN_GUIDANCE = (4.0, 3.0)  # Wan 2.2 T2V-A14B's guidance_scale, guidance_scale_2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("tiny", "small", "large", "demo", *WAN_WORKLOADS), default="tiny",
                   help="random SDXL pair size, the embedded demo model, or a random Wan 2.2 pair (wan-*)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, help="image height and width in pixels (default 256; demo: 32, fixed; "
                   "wan-tiny: 32x48, wan-small: 64x96)")
    p.add_argument("--frames", type=int, default=1, help="wan-*: video frames, 4k+1 (default 1: one image)")
    p.add_argument("--switch", type=float, help="default 0.8 (demo: its demo.json; wan-*: the folder's "
                   "boundary_ratio, 0.875)")
    p.add_argument("--guidance", type=float, help="default 5 (demo: its demo.json; wan-*: 4)")
    p.add_argument("--guidance-2", type=float, help="wan-*: the low-noise expert's guidance (default 3)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per peer after warm-up (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per peer (default 1)")
    p.add_argument("--threads", type=int, help="threads for every peer (default: usable cores)")
    p.add_argument("--peers", nargs="+", choices=sorted(PEERS), default=list(DEFAULT_PEERS),
                   help="default: %(default)s; artrt-plain: artrt without its CPU graphs (before/after); "
                   "optimum-nospin: optimum with artrt's no-spinning session option")
    p.add_argument("--pause", type=float, default=0.3, help="untimed seconds before each run (default 0.3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared latents")
    p.add_argument("--work", type=Path, default=Path("build/bench"), help="cache of models and exports")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return p.parse_args(argv)


def make_models(workload: str, folder: Path) -> Path:
    if not (folder / "base" / "model_index.json").is_file():
        from artrt.export.random_models import make_sdxl_pair

        log.info("building the random %s SDXL pair in %s", workload, folder)
        make_sdxl_pair(folder, size=workload, seed=0)
    return folder


def latent_scale(models: Path) -> int:
    """Pixels per latent pixel: the VAE halves the size once per block after the first."""
    config = json.loads((models / "base" / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


def make_wan_models(size: str, folder: Path) -> Path:
    if not (folder / "model_index.json").is_file():
        from artrt.export.wan_models import write_wan_pair

        log.info("building the random %s Wan 2.2 pair in %s", size, folder)
        write_wan_pair(folder, size=size, seed=0)
    return folder


def wan_workload(args: argparse.Namespace) -> tuple[Settings, Path, tuple[int, ...]]:
    """Settings, WanPipeline folder and latent shape of a ``wan-*`` workload."""
    from artrt.export.wan_models import BOUNDARY_RATIO, SIZES

    size = WAN_WORKLOADS[args.workload]
    frames = args.frames
    if frames < 1 or (frames - 1) % 4:
        raise SystemExit(f"compare.py: error: --frames must be 4k+1 (1, 5, 9, ...), got {frames}")
    defaults = SIZES[size].defaults
    height, width = (args.size, args.size) if args.size else (defaults["height"], defaults["width"])
    if height % 16 or width % 16:
        raise SystemExit(f"compare.py: error: Wan sizes are multiples of 16, got {height}x{width}")
    settings = Settings(args.steps, height, width, _given(args.switch, BOUNDARY_RATIO),
                        _given(args.guidance, WAN_GUIDANCE[0]), "unipc", WAN_PROMPT, WAN_NEGATIVE, frames,
                        _given(args.guidance_2, WAN_GUIDANCE[1]))
    models = make_wan_models(size, args.work / args.workload / "models")
    return settings, models, (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)


def workload(args: argparse.Namespace) -> tuple[Settings, Path, tuple[int, ...]]:
    """Settings, model folder and latent shape of ``args.workload``."""
    if args.workload in WAN_WORKLOADS:
        return wan_workload(args)
    if args.frames != 1:
        raise SystemExit("compare.py: error: --frames applies to the wan-* workloads")
    if args.workload == "demo":
        from artrt.export.shapes_demo import IMAGE_SIZE, WEIGHTS, read_card

        if args.size not in (None, IMAGE_SIZE):
            raise SystemExit(f"compare.py: error: the demo model draws {IMAGE_SIZE}x{IMAGE_SIZE} only")
        d = read_card(WEIGHTS)["defaults"]
        settings = Settings(args.steps, IMAGE_SIZE, IMAGE_SIZE, _given(args.switch, d["switch"]),
                            _given(args.guidance, d["guidance"]), d["sampler"], DEMO_PROMPT)
        return settings, WEIGHTS, (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    size = _given(args.size, 256)
    settings = Settings(args.steps, size, size, _given(args.switch, 0.8), _given(args.guidance, 5.0))
    models = make_models(args.workload, args.work / args.workload / "models")
    scale = latent_scale(models)
    return settings, models, (1, 4, size // scale, size // scale)


def _given(value: float | None, default: float) -> float:
    return default if value is None else value


def prepare(names: list[str], models: Path, work: Path, settings: Settings, threads: int,
            workload: str = "tiny") -> tuple[dict, dict]:
    """Load every peer; returns ``(peers, results)`` where failed peers have only an error."""
    peers, results = {}, {}
    available = DEMO_PEERS if workload == "demo" else WAN_PEERS if workload in WAN_WORKLOADS else PEERS
    for key in names:
        if key not in available:
            results[key] = {"name": key, "error": f"no {key} peer for the {workload} workload"}
            continue
        peer = available[key](models, settings)
        try:
            started, rss = time.perf_counter(), rss_mib()
            peer.prepare(work, threads)
            results[key] = {"name": peer.name, "load_s": time.perf_counter() - started, "times": []}
            if rss is not None:  # what loading (and any export) left resident; peers share the process
                results[key]["load_rss_mib"] = rss_mib() - rss
            peers[key] = peer
        except Exception as exc:  # a peer that cannot run is a result, not a crash
            log.exception("%s cannot run", peer.name)
            results[key] = {"name": peer.name, "error": f"{type(exc).__name__}: {exc}"}
    return peers, results


def timed_rounds(peers: dict, results: dict, latents: np.ndarray, warmup: int, runs: int,
                 pause: float = 0.0) -> dict[str, np.ndarray]:
    """Warm-up and timed runs, interleaved by round; returns each peer's last image.

    ``pause`` seconds (untimed) before each run let the previous peer's spinning worker
    threads (ONNX Runtime's, OpenMP's) go idle instead of slowing the next peer down."""
    images: dict[str, np.ndarray] = {}
    for round_ in range(warmup + runs):
        for key, peer in list(peers.items()):
            time.sleep(pause)
            if hasattr(peer, "timer"):
                peer.timer.take()
            started = time.perf_counter()
            try:
                images[key] = peer.run(latents)
            except Exception as exc:
                log.exception("%s failed", peer.name)
                results[key]["error"] = f"{type(exc).__name__}: {exc}"
                del peers[key]
                continue
            seconds = time.perf_counter() - started
            log.info("round %d/%d %-22s %.3f s%s", round_ + 1, warmup + runs, peer.name, seconds,
                     " (warm-up)" if round_ < warmup else "")
            if round_ >= warmup:
                results[key]["times"].append(seconds)
                if hasattr(peer, "timer"):
                    sample = {"e2e": seconds, "timings": peer.last_timings, "calls": peer.timer.take()}
                    results[key].setdefault("stages", []).append(stage_values(sample, EXPERTS))
    return images


def summarize_results(results: dict, images: dict[str, np.ndarray]) -> None:
    """p50/p90 per peer, artrt's floor and overhead, image agreement with diffusers, ratios."""
    reference = images.get("diffusers")
    for key, r in results.items():
        if r.get("times"):
            r.update(summarize(r["times"]))
        stages = r.pop("stages", None)
        if stages:
            for stage in ("floor", "host_overhead", "host_overhead_pct"):
                r[stage] = summarize([s[stage] for s in stages])["p50"]
        if reference is not None and key in images:
            r["psnr_vs_diffusers_db"] = psnr(images[key], reference)
    ours = results.get("artrt", {}).get("p50")
    for key, r in results.items():
        if ours and r.get("p50") and key != "artrt":
            r["artrt_speedup"] = r["p50"] / ours  # > 1: artrt is faster


def rss_mib() -> float | None:
    """The process's resident memory now, MiB (None where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float | None:
    """The process's peak resident memory so far, MiB (``ru_maxrss``: every peer together)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("artrt", "onnxruntime", "torch", "diffusers", "transformers", "optimum-onnx"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.shape != b.shape:
        return None
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = args.threads or machine_info()["cores"]
    settings, models, shape = workload(args)
    work = args.work / args.workload
    machine = {**machine_info(), "versions": versions()}  # load average before: other work skews every peer
    peers, results = prepare(args.peers, models, work, settings, threads, args.workload)
    latents = np.random.default_rng(args.seed).standard_normal(shape, dtype=np.float32)
    cpu_before, started = busy_cpu_seconds(), time.perf_counter()
    images = timed_rounds(peers, results, latents, args.warmup, args.runs, args.pause)
    machine["other_processes_cores"] = other_cores(cpu_before, busy_cpu_seconds(), started)
    summarize_results(results, images)
    machine["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    machine["peak_rss_mib"] = peak_rss_mib()  # of the whole run: every peer is loaded in this one process
    name = f"{args.workload}-{settings.height}px-{args.steps}steps"
    if args.workload in WAN_WORKLOADS:
        name = f"{args.workload}-{settings.height}x{settings.width}px-{settings.frames}f-{args.steps}steps"
    settings_record = {**vars(settings), "threads": threads, "runs": args.runs, "warmup": args.warmup,
                       "pause_s": args.pause, "seed": args.seed, "workload": args.workload}
    report = {"benchmark": name, "machine": machine, "settings": settings_record, "peers": results}
    for path in write_outputs(report, args.out, name):
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
