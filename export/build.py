"""``artrt build``: a GPU engine for every component of a package, recorded in ``artrt.json``.

- ``trt``: one TensorRT plan per component, built from its fp16 ONNX (the fp32 one for
  a decoder without an fp16-safe graph) for one optimization profile: static by default
  (min = opt = max from height, width and batch), or ranges with ``dynamic``.
- ``ort-cuda``: the ONNX Runtime transformers optimizer's fused graph per component.

Profiles size every symbolic dimension of a component's inputs (the manifest's shapes; see
:mod:`artrt.runtime.engine_records`): Wan packages add ``latent_frames`` (from ``frames``),
``text_length`` (the tokenizer's ``max_length``) and the VAE caches' ``latent_height_xK``.

Engines that are up to date for the request are kept (``rebuild`` forces them); each new
engine is written atomically and recorded in the manifest at once, so an interrupted
build leaves a valid package. The planning functions here are pure and testable without
TensorRT; the TensorRT calls are in :mod:`.trt_build`.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from artrt.errors import ArtrtError, BuildError, InputError
from artrt.runtime.engine_records import (
    ENGINE_DIR,
    EngineRecord,
    SystemInfo,
    dimension_size,
    engine_file_name,
    find_record,
    format_capability,
    has_frame_axis,
    latent_frames,
    make_record,
    source_onnx,
    staleness,
    text_length,
    with_record,
)
from artrt.runtime.package import Manifest, read_manifest, resolve, sha256_file, write_manifest

from .onnx_files import move_file, save_onnx
from .trt_build import Shape, build_plan, plan_refittable, tensorrt_version

log = logging.getLogger(__name__)

BACKENDS = ("trt", "ort-cuda")
MODEL_TYPES = {"fused_step": "unet", "text_encoder": "clip", "vae_decoder": "vae"}  # optimize_for_cuda
TEXT_BATCH = 2  # text encoders always run [negative, prompt]
Range = tuple[int, int, int]  # (min, opt, max)


@dataclass(frozen=True)
class DynamicRange:
    """Bounds of a dynamic build; None takes half / 1.5x the requested size, the batch and the
    frames (video packages: latent frames range from 1 to those of ``max_frames``)."""

    min_size: int | None = None
    max_size: int | None = None
    max_batch: int | None = None
    max_frames: int | None = None


@dataclass(frozen=True)
class BuildRequest:
    height: int | None = None  # None: the package's default
    width: int | None = None
    batch: int = 1
    dynamic: DynamicRange | None = None
    backend: str = "trt"
    opt_level: int = 3
    timing_cache: Path | None = None  # None: <package>/engines/timing.cache
    rebuild: bool = False
    refittable: bool = False  # trt: plans whose weights LoRA can refit (docs/lora.md)
    frames: int = 1  # video packages (Wan): frames per video, 4k + 1 (latent frames (frames - 1)/4 + 1)


def _check_frames(manifest: Manifest, flag: str, frames: int) -> int:
    """The latent frames of ``frames`` video frames, or one :class:`InputError` line."""
    if frames < 1 or (frames - 1) % 4:
        raise InputError(f"{flag} must be 4k+1 (1, 5, 9, ...), got {frames}")
    if frames != 1 and not has_frame_axis(manifest):
        raise InputError(f"{flag} applies to video packages (wan); this {manifest.family} package makes "
                         "single images")
    return latent_frames(frames)


def dimension_ranges(
    manifest: Manifest, height: int, width: int, batch: int, dynamic: DynamicRange | None = None, frames: int = 1,
) -> dict[str, Range]:
    """(min, opt, max) of every symbolic dimension the exported graphs use, but those of one
    component (``text_length``, the text encoders' batch; :func:`component_ranges`) and the
    ones derived from others (``latent_height_xK``)."""
    multiple = manifest.size_multiple
    for flag, value in (("--height", height), ("--width", width)):
        if value <= 0 or value % multiple:
            raise InputError(f"{flag} must be a positive multiple of {multiple}, got {value}")
    if batch < 1:
        raise InputError(f"--batch must be at least 1, got {batch}")
    latent = _check_frames(manifest, "--frames", frames)
    sizes = {"height": (height,) * 3, "width": (width,) * 3}
    batches = (batch,) * 3
    latents = (latent,) * 3
    if dynamic is not None:
        low = dynamic.min_size or max(multiple, min(height, width) // 2 // multiple * multiple)
        high = dynamic.max_size or -(-max(height, width) * 3 // 2 // multiple) * multiple
        for flag, value in (("--min-size", low), ("--max-size", high)):
            if value <= 0 or value % multiple:
                raise InputError(f"{flag} must be a positive multiple of {multiple}, got {value}")
        if not low <= min(height, width) or not max(height, width) <= high:
            raise InputError(f"--min-size {low} / --max-size {high} must bracket --height {height} / --width {width}")
        top = dynamic.max_batch or batch
        if top < batch:
            raise InputError(f"--max-batch {top} is smaller than --batch {batch}")
        sizes = {"height": (low, height, high), "width": (low, width, high)}
        batches = (1, batch, top)
        most = frames if dynamic.max_frames is None else dynamic.max_frames
        top_latent = _check_frames(manifest, "--max-frames", most)
        if most < frames:
            raise InputError(f"--max-frames {most} is smaller than --frames {frames}")
        latents = (1, latent, top_latent)
    scale = manifest.latent_scale
    return {
        **sizes,
        "latent_height": tuple(v // scale for v in sizes["height"]),
        "latent_width": tuple(v // scale for v in sizes["width"]),
        "batch": batches,
        "cond_batch": tuple(2 * b for b in batches),
        "latent_frames": latents,
    }


def component_ranges(
    manifest: Manifest, component: str, height: int, width: int, batch: int, dynamic: DynamicRange | None = None,
    frames: int = 1,
) -> dict[str, Range]:
    """(min, opt, max) of every symbolic dimension of ``component``'s inputs: text encoders always
    take 2 prompts, ``text_length`` is the tokenizer's ``max_length``, ``latent_height_xK`` is K
    times ``latent_height``. A dimension artrt cannot size is one :class:`BuildError`."""
    ranges = dimension_ranges(manifest, height, width, batch, dynamic, frames)
    comp = manifest.components[component]
    if comp.kind == "text_encoder":
        ranges["batch"] = (TEXT_BATCH,) * 3
    length = text_length(manifest, component)
    if length is not None:
        ranges["text_length"] = (length,) * 3
    found: dict[str, Range] = {}
    for tensor in comp.inputs:
        for d in tensor.shape:
            if isinstance(d, int) or d in found:
                continue
            sized = [dimension_size(d, {k: v[i] for k, v in ranges.items()}) for i in range(3)]
            if any(v is None for v in sized):
                raise BuildError(f"{component}: input {tensor.name} has a dimension {d!r} artrt cannot size")
            found[d] = tuple(sized)  # type: ignore[assignment]
    return found


def plan_profiles(
    manifest: Manifest, component: str, height: int, width: int, batch: int, dynamic: DynamicRange | None = None,
    frames: int = 1,
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """The optimization profile of one component: input -> (min, opt, max) shapes."""
    ranges = component_ranges(manifest, component, height, width, batch, dynamic, frames)
    profile = {}
    for tensor in manifest.components[component].inputs:
        dims = [(d, d, d) if isinstance(d, int) else ranges[d] for d in tensor.shape]
        profile[tensor.name] = tuple(tuple(dim[i] for dim in dims) for i in range(3))
    return profile


def build_engines(package: str | Path, request: BuildRequest) -> Manifest:
    """Build (or keep, when up to date) every component's engine; returns the new manifest."""
    root = Path(package)
    manifest = read_manifest(root, check_engines=False)
    if request.backend not in BACKENDS:
        raise InputError(f"unknown build backend {request.backend!r}; choose from {', '.join(BACKENDS)}")
    if request.refittable and request.backend != "trt":
        raise InputError("--refittable applies to --backend trt (ONNX Runtime takes new weights without it)")
    height = request.height or manifest.defaults.height
    width = request.width or manifest.defaults.width
    frames = request.frames
    for name in manifest.components:  # validate before any work (every dimension sized)
        component_ranges(manifest, name, height, width, request.batch, request.dynamic, frames)
    system = _system(request.backend)
    cache = request.timing_cache or root / ENGINE_DIR / "timing.cache"
    started = time.perf_counter()
    for name in manifest.components:
        profile = {}
        static_step = request.dynamic is None and manifest.components[name].kind == "fused_step"
        if request.backend == "trt" or static_step:  # fused ort-cuda steps are built for one static shape
            profile = plan_profiles(manifest, name, height, width, request.batch, request.dynamic, frames)
        reasons = build_reasons(root, manifest, name, request.backend, system, profile, request.rebuild,
                                request.refittable)
        if not reasons:
            log.info("%s: %s is up to date", name, engine_file_name(name, request.backend))
            continue
        log.info("building %s for %s (%s) ...", name, request.backend, "; ".join(reasons))
        step = time.perf_counter()
        if request.backend == "trt":
            record = _build_plan(root, manifest, name, profile, request, system, cache)
        else:
            dims = None
            if static_step:
                dims = {k: v[1] for k, v in component_ranges(manifest, name, height, width, request.batch,
                                                             frames=frames).items()}
            record = _build_fused(root, manifest, name, system, dims, profile or None)
        manifest = with_record(root, manifest, record)
        write_manifest(root, manifest)
        log.info("%s: wrote %s (%.1f MB) in %.1f s", name, record.file, record.size / 1e6, time.perf_counter() - step)
    log.info("engines of %s ready in %.1f s", root, time.perf_counter() - started)
    return manifest


def build_reasons(
    root: Path, manifest: Manifest, component: str, backend: str, system: SystemInfo,
    profile: dict[str, tuple[Shape, Shape, Shape]], rebuild: bool, refittable: bool = False,
) -> list[str]:
    """Why ``component`` needs a new engine (empty: its recorded one serves the request). With
    ``refittable``, a TensorRT plan that is not refittable needs one too."""
    record = find_record(manifest, component, backend)
    if record is None:
        return ["not built yet"]
    if rebuild:
        return ["--rebuild"]
    reasons = staleness(record, manifest, system)
    for i in (0, 2):  # the request's min and max shapes must lie in the recorded profile
        shapes = {tensor: shapes[i] for tensor, shapes in profile.items()}
        reasons += [r for r in staleness(record, manifest, None, shapes) if r not in reasons]
    reasons += _file_problems(root, record)
    if refittable and not reasons and backend == "trt" and not plan_refittable(resolve(root, record.file)):
        reasons.append("not refittable (--refittable)")
    return reasons


def _file_problems(root: Path, record: EngineRecord) -> list[str]:
    path = resolve(root, record.file)
    if not path.is_file():
        return [f"{record.file} is missing"]
    if path.stat().st_size != record.size or sha256_file(path) != record.sha256:
        return [f"{record.file} was modified"]
    return []


def _system(backend: str) -> SystemInfo:
    """What the engines are built for: TensorRT version and GPU, or the onnxruntime version."""
    if backend == "ort-cuda":
        import onnxruntime

        return SystemInfo(onnxruntime_version=str(onnxruntime.__version__))
    version = tensorrt_version()
    try:
        from artrt.engines.cuda import device_info

        capability = format_capability(device_info().compute_capability)
    except ArtrtError:
        raise
    except Exception as exc:  # ImportError (no cuda-python / module) or a driver error
        raise BuildError(f"cannot query the GPU to build TensorRT engines for: {exc}") from None
    return SystemInfo(tensorrt_version=version, compute_capability=capability)


def _build_plan(root, manifest, name, profile, request: BuildRequest, system: SystemInfo, cache: Path):
    file = engine_file_name(name, "trt")
    source = resolve(root, source_onnx(manifest, name))
    if manifest.components[name].onnx_fp16 is None and manifest.components[name].kind != "vae_decoder":
        log.warning("%s: the package has no fp16 graph (exported with --precision fp32); building fp32", name)
    build_plan(source, resolve(root, file), profile, request.opt_level, cache, name, request.refittable)
    return make_record(root, manifest, name, "trt", file, profile=profile, system=system,
                       opt_level=request.opt_level, refittable=request.refittable)


def _fix_dims(source: Path, dims: dict[str, int], dst: Path) -> Path:
    """Copy of ``source`` with its symbolic dimensions set: shape arithmetic then folds away,
    every node lands on the CUDA EP and ONNX Runtime can capture the step in a CUDA graph."""
    import onnx

    model = onnx.load(str(source), load_external_data=False)  # weights are copied in chunks
    for value in (*model.graph.input, *model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            size = dimension_size(dim.dim_param, dims) if dim.dim_param else None
            if size is not None:
                dim.dim_value = size
    save_onnx(model, dst, source_dir=source.parent)
    return dst


def _build_fused(
    root: Path, manifest: Manifest, name: str, system: SystemInfo, dims: dict[str, int] | None = None,
    profile: dict[str, tuple[Shape, Shape, Shape]] | None = None,
) -> EngineRecord:
    """Fuse into a scratch folder, then move the files (graph + any external data) into place.

    With ``dims`` (static builds of expert steps) the graph is first fixed to those shapes, and
    ``profile`` (their static profile, min = opt = max) is recorded."""
    from .ort_optimize import optimize_for_cuda

    engines = root / ENGINE_DIR
    scratch = engines / f".{name}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        source = resolve(root, source_onnx(manifest, name))
        if dims is not None:
            (scratch / "static").mkdir()
            source = _fix_dims(source, dims, scratch / "static" / "model.onnx")
        out = Path(optimize_for_cuda(source, scratch / Path(engine_file_name(name, "ort-cuda")).name,
                                     MODEL_TYPES[manifest.components[name].kind]))
        # external data first, the graph last: a graph under its final name has its weights beside it
        produced = sorted((p.name for p in scratch.iterdir() if p.is_file()), key=lambda f: (f == out.name, f))
        for file in produced:
            move_file(scratch / file, engines / file)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    extra = [f"{ENGINE_DIR}/{f}" for f in produced if f != out.name]
    if dims is None:
        profile = None
    return make_record(root, manifest, name, "ort-cuda", f"{ENGINE_DIR}/{out.name}", system=system,
                       extra_files=extra, profile=profile)


__all__ = ["BuildRequest", "DynamicRange", "build_engines", "build_reasons", "component_ranges", "dimension_ranges",
           "plan_profiles"]
