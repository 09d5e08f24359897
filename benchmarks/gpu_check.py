"""One-call GPU validation: correctness and timings on a lent NVIDIA GPU.

Builds a random SDXL base + refiner pair from configs, exports an artrt package (fp32 +
fp16), fuses it for ONNX Runtime's CUDA EP, then measures in one process:

- correctness: the ort-cuda fp16 image vs the ort-cpu fp32 image (same latents), PSNR;
- per-step latency on ort-cuda with and without CUDA graphs, the first step after the
  expert switch vs the median step, decode and end to end;
- the diffusers fp16 PyTorch ensemble (base ``denoising_end`` + refiner
  ``denoising_start``) on the same model, latents and settings.

Writes ``OUT/gpu_check.json`` and prints a short table last. Usage (on the GPU machine):
``python benchmarks/gpu_check.py --out $OUT [--size small --px 512 --steps 30]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("gpu_check")
PROMPT = "a lighthouse at dusk"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def make_package(work: Path, size: str, px: int) -> Path:
    from artrt.export import export_package, load_sdxl_ensemble
    from artrt.export.build import BuildRequest, build_engines
    from artrt.export.random_models import make_sdxl_pair

    make_sdxl_pair(work / "models", size=size, seed=0)
    package = work / "package"
    export_package(load_sdxl_ensemble(work / "models" / "base", work / "models" / "refiner"), package,
                   overwrite=True)
    build_engines(package, BuildRequest(backend="ort-cuda", height=px, width=px, batch=1))  # static shapes
    return package


def timed_steps(pipe, **kwargs) -> tuple[list[float], dict[str, float], object]:
    """Generate once while timing every expert step (stream synchronised after each step)."""
    stream = pipe.stream
    times: list[float] = []
    originals = {}
    for name in ("expert_composition", "expert_detail"):
        engine = pipe.engines[name]
        originals[name] = engine.run_bound

        def run(binding, _run=engine.run_bound):
            start = time.perf_counter()
            _run(binding)
            if stream is not None:
                stream.synchronize()
            times.append(time.perf_counter() - start)

        engine.run_bound = run
    try:
        out = pipe.generate(PROMPT, **kwargs)
    finally:
        for name, original in originals.items():
            pipe.engines[name].run_bound = original
    return times, out.timings, out


def artrt_runs(package: Path, backend: str, latents: np.ndarray, settings: dict, runs: int, **load) -> dict:
    from artrt.runtime import Pipeline

    started = time.perf_counter()
    with Pipeline.load(package, backend=backend, **load) as pipe:
        first = pipe.generate(PROMPT, latents=latents, **settings)
        cold = time.perf_counter() - started
        totals, per_step_runs, stage = [], [], []
        for _ in range(runs):
            out = pipe.generate(PROMPT, latents=latents, **settings)
            totals.append(out.timings["total"])
            stage.append(out.timings)
        steps, _, _ = timed_steps(pipe, latents=latents, **settings)
        per_step_runs = steps
    switch_index = _switch_index(package, settings)
    return {
        "cold_start_s": cold,
        "end_to_end_p50_s": statistics.median(totals),
        "decode_p50_s": statistics.median(t["decode"] for t in stage),
        "stages_last": stage[-1],
        "step_median_ms": 1000 * statistics.median(per_step_runs),
        "step_at_switch_ms": 1000 * per_step_runs[switch_index] if switch_index is not None else None,
        "steps_ms": [1000 * t for t in per_step_runs],
        "image": np.asarray(first.images[0]),
    }


def _switch_index(package: Path, settings: dict) -> int | None:
    from artrt.runtime.experts import plan_experts
    from artrt.runtime.package import read_manifest
    from artrt.runtime.samplers import plan_steps
    from artrt.runtime.schedules import Sampler, ScheduleConfig

    m = read_manifest(package, verify_hashes=False)
    plan = plan_steps(ScheduleConfig.from_diffusers(m.schedule), Sampler.parse(settings["sampler"]), settings["steps"])
    segments = plan_experts(plan.timesteps, settings["switch"], 1000, (1.0, 1.0))
    return segments[1].start if len(segments) > 1 else None


def diffusers_runs(models: Path, latents: np.ndarray, settings: dict, runs: int) -> dict:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(models / "base", torch_dtype=torch.float16).to("cuda")
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(models / "refiner", torch_dtype=torch.float16).to("cuda")
    for pipe in (base, refiner):
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
    lat = torch.from_numpy(latents).to("cuda", torch.float16)
    common = {"num_inference_steps": settings["steps"], "guidance_scale": settings["guidance"]}

    def once():
        torch.cuda.synchronize()
        start = time.perf_counter()
        handoff = base(PROMPT, latents=lat, height=settings["height"], width=settings["width"],
                       denoising_end=settings["switch"], output_type="latent", **common).images
        image = refiner(PROMPT, image=handoff, denoising_start=settings["switch"], output_type="np", **common).images
        torch.cuda.synchronize()
        return time.perf_counter() - start, image

    once()
    results = [once() for _ in range(runs)]
    return {"end_to_end_p50_s": statistics.median(r[0] for r in results),
            "image": np.round(results[-1][1][0] * 255).astype(np.uint8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"))
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--px", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    import onnxruntime
    import torch  # loads the CUDA 13 / cuDNN 9 libraries that onnxruntime-gpu's CUDA EP needs

    if hasattr(onnxruntime, "preload_dlls"):
        onnxruntime.preload_dlls()
    log.info("torch %s (cuda %s), onnxruntime %s providers %s", torch.__version__, torch.version.cuda,
             onnxruntime.__version__, onnxruntime.get_available_providers())
    from artrt.engines.cuda import device_info

    results: dict = {"device": device_info().__dict__, "date": time.strftime("%Y-%m-%d"), "host": platform.node()}
    package = make_package(args.work, args.size, args.px)
    settings = {"steps": args.steps, "guidance": 5.0, "switch": 0.8, "sampler": "euler",
                "height": args.px, "width": args.px}
    results["settings"] = {**settings, "model": f"random {args.size} SDXL pair"}
    latents = np.random.default_rng(0).standard_normal((1, 4, args.px // 2, args.px // 2), dtype=np.float32)
    cpu = artrt_runs(package, "ort-cpu", latents, settings, runs=1)
    graphs = artrt_runs(package, "ort-cuda", latents, settings, args.runs)
    eager = artrt_runs(package, "ort-cuda", latents, settings, args.runs, cuda_graphs=False)
    results["psnr_fp16_cuda_vs_fp32_cpu_db"] = psnr(graphs["image"], cpu["image"])
    results["psnr_cuda_graphs_vs_eager_db"] = psnr(graphs["image"], eager["image"])
    try:
        ref = diffusers_runs(args.work / "models", latents, settings, args.runs)
        results["diffusers_fp16"] = {"end_to_end_p50_s": ref["end_to_end_p50_s"]}
        results["psnr_artrt_cuda_vs_diffusers_fp16_db"] = psnr(graphs["image"], ref["image"])
    except Exception as exc:  # a baseline failure must not lose the artrt measurements
        results["diffusers_fp16"] = {"error": f"{type(exc).__name__}: {exc}"}
    for name, run in (("ort_cpu_fp32", cpu), ("ort_cuda_graphs", graphs), ("ort_cuda_eager", eager)):
        results[name] = {k: v for k, v in run.items() if k != "image"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    print_table(results)


def print_table(r: dict) -> None:
    rows = [
        ("device", r["device"]["name"]),
        ("settings", json.dumps(r["settings"])),
        ("PSNR fp16 ort-cuda vs fp32 ort-cpu (dB)", f"{r['psnr_fp16_cuda_vs_fp32_cpu_db']:.1f}"),
        ("PSNR ort-cuda graphs vs eager (dB)", f"{r['psnr_cuda_graphs_vs_eager_db']:.1f}"),
    ]
    for key in ("ort_cuda_graphs", "ort_cuda_eager", "ort_cpu_fp32"):
        run = r[key]
        rows.append((f"{key}: e2e p50 / step median / step at switch / decode (ms)",
                     f"{1000 * run['end_to_end_p50_s']:.1f} / {run['step_median_ms']:.2f} / "
                     f"{run['step_at_switch_ms'] or float('nan'):.2f} / {1000 * run['decode_p50_s']:.1f}"))
    rows.append(("diffusers fp16 e2e p50 (ms)", str(r["diffusers_fp16"])))
    if "psnr_artrt_cuda_vs_diffusers_fp16_db" in r:
        rows.append(("PSNR artrt ort-cuda vs diffusers fp16 (dB)", f"{r['psnr_artrt_cuda_vs_diffusers_fp16_db']:.1f}"))
    for name, value in rows:
        print(f"{name:<62} {value}")


if __name__ == "__main__":
    main()
