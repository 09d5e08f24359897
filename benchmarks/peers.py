"""The runtimes compared by ``compare.py``, each behind the same two calls.

``prepare(work, threads)`` builds what the peer needs from the workload's diffusers folders
(exports are cached in ``work``) and loads it; ``run(latents)`` generates one image from
the given unit-variance latents and returns it as ``uint8 [H, W, 3]``. Every peer runs the
ensemble of expert denoisers the same way: first expert for ``t >= cutoff``
(``denoising_end=switch``), second below (``denoising_start=switch``), no re-noising.

Three kinds of workload: a random SDXL base + refiner (:data:`PEERS`), the embedded demo model,
two same-architecture pixel-space experts (:data:`DEMO_PEERS`; optimum has no pipeline for it),
and a random Wan 2.2 two-expert ``WanPipeline`` folder (:data:`WAN_PEERS`: artrt against
diffusers' ``WanPipeline``; ``run`` returns every frame, ``uint8 [T, H, W, 3]``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("benchmarks.peers")
PROMPT = "a lighthouse at dusk"
DEMO_PROMPT = "a red circle left of a blue square"
WAN_PROMPT = "a red cat with a blue dog"
WAN_NEGATIVE = "blurry, low quality"


@dataclass(frozen=True)
class Settings:
    steps: int
    height: int
    width: int
    switch: float
    guidance: float
    sampler: str = "euler"
    prompt: str = PROMPT
    negative_prompt: str = ""  # Wan only (the SDXL and demo peers run without one)
    frames: int = 1  # Wan: video frames (4k + 1)
    guidance_2: float | None = None  # Wan: the low-noise expert's guidance (guidance_scale_2)


def to_uint8(images: Any) -> np.ndarray:
    """First image (or video: ``[T, H, W, 3]``) of a diffusers ``output_type="np"`` batch, rounded
    as diffusers' PIL output is."""
    return np.round(np.clip(np.asarray(images)[0], 0, 1) * 255).astype(np.uint8)


class ArtrtPeer:
    """artrt on ONNX Runtime CPU, from a package exported with ``artrt.export`` (fp32)."""

    name = "artrt (ort-cpu)"

    def __init__(self, models: Path, settings: Settings) -> None:
        self.models, self.s, self.pipe, self.timer = models, settings, None, None

    def prepare(self, work: Path, threads: int) -> None:
        from artrt.runtime import Pipeline
        from artrt.runtime.cli.bench import EngineTimer

        self.pipe = Pipeline.load(self.package(work), backend="ort-cpu", threads=threads)
        self.timer = EngineTimer(self.pipe)  # engine floor and host overhead of artrt's runs

    def package(self, work: Path) -> Path:
        """The package to run, exported into ``work`` unless it is there already."""
        package = work / "artrt"
        if not _has_cpu_graphs(package):
            export_artrt(self.models, package, self.s)
        return package

    def run(self, latents: np.ndarray) -> np.ndarray:
        s = self.s
        out = self.pipe.generate(s.prompt, latents=latents, steps=s.steps, guidance=s.guidance, switch=s.switch,
                                 sampler=s.sampler, height=s.height, width=s.width)
        self.last_timings = out.timings
        return np.asarray(out.images[0])


class ArtrtPlainPeer(ArtrtPeer):
    """artrt as before its CPU graphs: the same package with ``onnx_cpu`` taken out of the
    manifest, so ORT CPU runs the plain exported fp32 graphs (unfused attention). For
    before/after comparisons in one run; not a default peer."""

    name = "artrt (plain fp32 graphs)"

    def package(self, work: Path) -> Path:
        import shutil
        from dataclasses import replace

        from artrt.runtime.package import read_manifest, write_manifest

        plain = work / "artrt-plain"
        shutil.rmtree(plain, ignore_errors=True)
        shutil.copytree(super().package(work), plain)
        manifest = read_manifest(plain)
        cpu = {c.onnx_cpu for c in manifest.components.values()}
        components = {k: replace(c, onnx_cpu=None) for k, c in manifest.components.items()}
        files = tuple(f for f in manifest.files if f.path not in cpu)
        write_manifest(plain, replace(manifest, components=components, files=files))
        return plain


def _has_cpu_graphs(package: Path) -> bool:
    """Whether ``package`` exists and was exported with CPU graphs (older exports are redone)."""
    from artrt.runtime.package import read_manifest

    if not (package / "artrt.json").is_file():
        return False
    return any(c.onnx_cpu for c in read_manifest(package, verify_hashes=False).components.values())


def export_artrt(models: Path, package: Path, s: Settings) -> None:
    import inspect

    from artrt.export import export_package, load_sdxl_ensemble

    parameters = inspect.signature(export_package).parameters  # older artrt checkouts: precisions=
    options = ({"targets": ("cpu",)} if "targets" in parameters
               else {"precisions": ("fp32",)} if "precisions" in parameters else {})
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
            handoff = self.base(s.prompt, latents=torch.from_numpy(latents.copy()), height=s.height, width=s.width,
                                denoising_end=s.switch, output_type="latent", **common).images
            images = self.refiner(s.prompt, image=handoff, denoising_start=s.switch, output_type="np", **common).images
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
    spin = True  # ONNX Runtime's default

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
        if not self.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.base = ORTStableDiffusionXLPipeline.from_pretrained(folders["base"], export=False,
                                                                 session_options=options)
        self.refiner = ORTStableDiffusionXLImg2ImgPipeline.from_pretrained(folders["refiner"], export=False,
                                                                           session_options=options)
        for pipe in (self.base, self.refiner):
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)


class OptimumNoSpinPeer(OptimumPeer):
    """optimum with artrt's session option (worker threads block instead of spinning), to
    tell that option's share of a difference from the rest. Not a default peer."""

    name = "optimum (ORT CPU, no spinning)"
    spin = False


def export_optimum(folder: Path, out: Path, task: str) -> None:
    """``optimum.exporters.onnx.main_export`` on a local diffusers folder, nothing downloaded."""
    from optimum.exporters.onnx import main_export

    log.info("exporting %s to ONNX with optimum (%s)", folder, task)
    main_export(model_name_or_path=str(folder), output=out, task=task, device="cpu", do_validation=False,
                no_post_process=True, local_files_only=True)


class DemoArtrtPeer(ArtrtPeer):
    """artrt on the demo package (``artrt.export.shapes_demo.export_demo``, fp32 + CPU graphs)."""

    def package(self, work: Path) -> Path:
        from artrt.export.shapes_demo import export_demo

        package = work / "artrt"
        if not _has_cpu_graphs(package):
            log.info("exporting the demo package to %s", package)
            export_demo(package, self.models, overwrite=True)
        return package


class DemoTorchPeer:
    """The demo model in PyTorch with diffusers' UNets and scheduler (``TorchDemoPipeline``):
    the loop over two same-architecture UNets a diffusers user would write."""

    name = "diffusers (PyTorch)"

    def __init__(self, models: Path, settings: Settings) -> None:
        self.models, self.s, self.pipe = models, settings, None

    def prepare(self, work: Path, threads: int) -> None:
        import torch

        from artrt.demo.reference import TorchDemoPipeline

        torch.set_num_threads(threads)
        self.pipe = TorchDemoPipeline(self.models)

    def run(self, latents: np.ndarray) -> np.ndarray:
        import torch

        s = self.s
        return to_uint8(self.pipe(s.prompt, torch.from_numpy(latents.copy()), s.steps, s.guidance, s.switch))


class WanArtrtPeer(ArtrtPeer):
    """artrt on a package exported from the Wan folder (``load_wan`` + ``export_package``, fp32
    graphs for ``ort-cpu``): text encoder, both flow-step experts, the causal VAE decode."""

    def package(self, work: Path) -> Path:
        package = work / "artrt"
        if not (package / "artrt.json").is_file():
            from artrt.export import export_package
            from artrt.export.wan_package import load_wan

            log.info("exporting the Wan package to %s", package)
            export_package(load_wan(self.models), package, steps=self.s.steps, targets=("cpu",), overwrite=True)
        return package

    def run(self, latents: np.ndarray) -> np.ndarray:
        s = self.s
        out = self.pipe.generate(s.prompt, negative_prompt=s.negative_prompt, latents=latents, steps=s.steps,
                                 guidance=[s.guidance, _second(s)], switch=s.switch, sampler=s.sampler,
                                 height=s.height, width=s.width, num_frames=s.frames)
        self.last_timings = out.timings
        frames = out.frames[0] if out.frames is not None else [out.images[0]]
        return np.stack([np.asarray(f) for f in frames])


def _second(s: Settings) -> float:
    return s.guidance if s.guidance_2 is None else s.guidance_2


class WanDiffusersPeer:
    """diffusers' ``WanPipeline`` on PyTorch (CPU, fp32) from the same folder, its own UniPC
    scheduler, ``boundary_ratio`` set to the workload's switch."""

    name = "diffusers (PyTorch)"

    def __init__(self, models: Path, settings: Settings) -> None:
        self.models, self.s, self.pipe = models, settings, None

    def prepare(self, work: Path, threads: int) -> None:
        import torch
        from diffusers import WanPipeline

        torch.set_num_threads(threads)
        self.pipe = WanPipeline.from_pretrained(self.models, torch_dtype=torch.float32, local_files_only=True)
        self.pipe.register_to_config(boundary_ratio=self.s.switch)
        self.pipe.set_progress_bar_config(disable=True)

    def run(self, latents: np.ndarray) -> np.ndarray:
        import torch

        s = self.s
        with torch.inference_mode():
            frames = self.pipe(s.prompt, negative_prompt=s.negative_prompt, height=s.height, width=s.width,
                               num_frames=s.frames, num_inference_steps=s.steps, guidance_scale=s.guidance,
                               guidance_scale_2=_second(s), latents=torch.from_numpy(latents.copy()),
                               output_type="np").frames
        return to_uint8(frames)


PEERS = {"artrt": ArtrtPeer, "diffusers": DiffusersPeer, "optimum": OptimumPeer, "artrt-plain": ArtrtPlainPeer,
         "optimum-nospin": OptimumNoSpinPeer}
DEFAULT_PEERS = ("artrt", "diffusers", "optimum")
DEMO_PEERS = {"artrt": DemoArtrtPeer, "diffusers": DemoTorchPeer}
WAN_PEERS = {"artrt": WanArtrtPeer, "diffusers": WanDiffusersPeer}
