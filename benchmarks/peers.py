"""The runtimes compared by ``compare.py``, each behind the same two calls.

``prepare(work, threads)`` builds what the peer needs from the workload's diffusers folders
(exports are cached in ``work``) and loads it; ``run(latents)`` generates one image from
the given unit-variance latents and returns it as ``uint8 [H, W, 3]``. Every peer runs the
SDXL ensemble of expert denoisers the same way: base for ``t >= cutoff``
(``denoising_end=switch``), refiner below (``denoising_start=switch``), no re-noising.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("benchmarks.peers")
PROMPT = "a lighthouse at dusk"


@dataclass(frozen=True)
class Settings:
    steps: int
    height: int
    width: int
    switch: float
    guidance: float


def to_uint8(images: Any) -> np.ndarray:
    """First image of a diffusers ``output_type="np"`` batch, rounded as diffusers' PIL output is."""
    return np.round(np.clip(np.asarray(images)[0], 0, 1) * 255).astype(np.uint8)


class ArtrtPeer:
    """artrt on ONNX Runtime CPU, from a package exported with ``artrt.export`` (fp32)."""

    name = "artrt (ort-cpu)"

    def __init__(self, models: Path, settings: Settings) -> None:
        self.models, self.s, self.pipe, self.timer = models, settings, None, None

    def prepare(self, work: Path, threads: int) -> None:
        from artrt.runtime import Pipeline
        from artrt.runtime.bench import EngineTimer

        package = work / "artrt"
        if not _has_cpu_graphs(package):
            export_artrt(self.models, package, self.s)
        self.pipe = Pipeline.load(package, backend="ort-cpu", threads=threads)
        self.timer = EngineTimer(self.pipe.engines)  # engine floor and host overhead of artrt's runs

    def run(self, latents: np.ndarray) -> np.ndarray:
        s = self.s
        out = self.pipe.generate(PROMPT, latents=latents, steps=s.steps, guidance=s.guidance, switch=s.switch,
                                 sampler="euler", height=s.height, width=s.width)
        self.last_timings = out.timings
        return np.asarray(out.images[0])


class ArtrtPlainPeer(ArtrtPeer):
    """artrt as before its CPU graphs: the same package with ``onnx_cpu`` taken out of the
    manifest, so ORT CPU runs the plain exported fp32 graphs (unfused attention). For
    before/after comparisons in one run; not a default peer."""

    name = "artrt (plain fp32 graphs)"

    def prepare(self, work: Path, threads: int) -> None:
        import shutil
        from dataclasses import replace

        from artrt.runtime import Pipeline
        from artrt.runtime.bench import EngineTimer
        from artrt.runtime.package import read_manifest, write_manifest

        package, plain = work / "artrt", work / "artrt-plain"
        if not _has_cpu_graphs(package):
            export_artrt(self.models, package, self.s)
        shutil.rmtree(plain, ignore_errors=True)
        shutil.copytree(package, plain)
        manifest = read_manifest(plain)
        cpu = {c.onnx_cpu for c in manifest.components.values()}
        components = {k: replace(c, onnx_cpu=None) for k, c in manifest.components.items()}
        files = tuple(f for f in manifest.files if f.path not in cpu)
        write_manifest(plain, replace(manifest, components=components, files=files))
        self.pipe = Pipeline.load(plain, backend="ort-cpu", threads=threads)
        self.timer = EngineTimer(self.pipe.engines)


def _has_cpu_graphs(package: Path) -> bool:
    """Whether ``package`` exists and was exported with CPU graphs (older exports are redone)."""
    from artrt.runtime.package import read_manifest

    if not (package / "artrt.json").is_file():
        return False
    return any(c.onnx_cpu for c in read_manifest(package, verify_hashes=False).components.values())


def export_artrt(models: Path, package: Path, s: Settings) -> None:
    import inspect

    from artrt.export import export_package, load_sdxl_ensemble

    options = {"precisions": ("fp32",)} if "precisions" in inspect.signature(export_package).parameters else {}
    log.info("exporting the artrt package to %s", package)
    export_package(load_sdxl_ensemble(models / "base", models / "refiner"), package, switch=s.switch,
                   steps=s.steps, guidance=s.guidance, overwrite=True, **options)


class _DiffusersEnsemble:
    """Shared call of the two diffusers-API pipelines (PyTorch or optimum's ONNX Runtime ones)."""

    base: Any = None
    refiner: Any = None
    s: Settings

    def run(self, latents: np.ndarray) -> np.ndarray:
        import torch

        s = self.s
        common = dict(num_inference_steps=s.steps, guidance_scale=s.guidance)
        with torch.inference_mode():
            handoff = self.base(PROMPT, latents=torch.from_numpy(latents.copy()), height=s.height, width=s.width,
                                denoising_end=s.switch, output_type="latent", **common).images
            images = self.refiner(PROMPT, image=handoff, denoising_start=s.switch, output_type="np", **common).images
        return to_uint8(images)


class DiffusersPeer(_DiffusersEnsemble):
    """diffusers' own SDXL pipelines on PyTorch (CPU, fp32, ``torch.set_num_threads(threads)``)."""

    name = "diffusers (PyTorch)"

    def __init__(self, models: Path, settings: Settings) -> None:
        self.models, self.s = models, settings

    def prepare(self, work: Path, threads: int) -> None:
        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        torch.set_num_threads(threads)
        self.base = StableDiffusionXLPipeline.from_pretrained(self.models / "base", torch_dtype=torch.float32)
        self.refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(self.models / "refiner",
                                                                        torch_dtype=torch.float32)
        for pipe in (self.base, self.refiner):
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)


class OptimumPeer(_DiffusersEnsemble):
    """optimum's ONNX Runtime SDXL pipelines (``ORTStableDiffusionXLPipeline`` and
    ``...Img2ImgPipeline``), exported offline from the same folders with ``main_export``."""

    name = "optimum (ORT CPU)"

    def __init__(self, models: Path, settings: Settings) -> None:
        self.models, self.s = models, settings

    def prepare(self, work: Path, threads: int) -> None:
        import onnxruntime as ort
        from diffusers import EulerDiscreteScheduler
        from optimum.onnxruntime import ORTStableDiffusionXLImg2ImgPipeline, ORTStableDiffusionXLPipeline

        folders = {}
        for part, task in (("base", "text-to-image"), ("refiner", "image-to-image")):
            folders[part] = work / "optimum" / part
            if not (folders[part] / "unet" / "model.onnx").is_file():
                export_optimum(self.models / part, folders[part], task)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.base = ORTStableDiffusionXLPipeline.from_pretrained(folders["base"], export=False,
                                                                 session_options=options)
        self.refiner = ORTStableDiffusionXLImg2ImgPipeline.from_pretrained(folders["refiner"], export=False,
                                                                           session_options=options)
        for pipe in (self.base, self.refiner):
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)


def export_optimum(folder: Path, out: Path, task: str) -> None:
    """``optimum.exporters.onnx.main_export`` on a local diffusers folder, nothing downloaded."""
    from optimum.exporters.onnx import main_export

    log.info("exporting %s to ONNX with optimum (%s)", folder, task)
    main_export(model_name_or_path=str(folder), output=out, task=task, device="cpu", do_validation=False,
                no_post_process=True, local_files_only=True)


PEERS = {"artrt": ArtrtPeer, "diffusers": DiffusersPeer, "optimum": OptimumPeer, "artrt-plain": ArtrtPlainPeer}
DEFAULT_PEERS = ("artrt", "diffusers", "optimum")
