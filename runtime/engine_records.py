"""Built engines recorded in ``artrt.json``, and whether one may still be used.

A TensorRT plan runs only on the TensorRT version and GPU architecture it was built
with, only for the shapes of its optimization profile, and it stands for the ONNX file
it was built from; a fused ONNX Runtime CUDA graph stands for its onnxruntime version and
source ONNX, and (static builds of the expert steps) for one shape. :func:`staleness`
lists every way a record no longer fits; :func:`component_file` picks the file a backend
loads for a component and refuses a stale engine of either backend with the command that
rebuilds it; :func:`check_profiles` refuses a request size the recorded profiles do not
cover, before any work. A component with no record on ``ort-cuda`` is not stale but
unbuilt: it runs the package's plain ONNX. Imports neither torch nor TensorRT.

The graphs' symbolic dimensions (the manifest's input shapes) and what sizes them, here for
requests and in ``export.build`` for profiles: ``batch`` (images; 2 prompts for text
encoders), ``cond_batch`` (2 x batch), ``height``/``width``, ``latent_height``/``latent_width``
(pixels / latent scale), ``latent_height_xK``/``latent_width_xK`` (K times those: the Wan
decoder's caches), ``latent_frames`` (Wan experts: (frames - 1)/4 + 1) and ``text_length``
(the tokens per prompt of the encoders that feed the component: its tokenizer's max_length).
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from artrt.errors import InputError, PackageError, StaleEngineError

from .package import Manifest, engine_files_of, file_record, resolve

log = logging.getLogger(__name__)

ENGINE_DIR = "engines"
ENGINE_SUFFIX = {"trt": ".plan", "ort-cuda": ".cuda.onnx"}
ENGINE_KIND = {"trt": "TensorRT engine", "ort-cuda": "fused ONNX Runtime CUDA graph"}
LATENT_INPUTS = ("sample", "latents")  # the [B, C, (F,) h, w] input of expert steps / the decoder
TEXT_BATCH = 2  # text encoders always run [negative, prompt] (as export.build.TEXT_BATCH)
FRAMES_PER_LATENT = 4  # video frames per latent frame after the first (runtime.video.FRAMES_PER_CHUNK)
_SCALED = re.compile(r"(latent_height|latent_width)_x([1-9][0-9]*)")  # the Wan decoder caches' axes
Shape = tuple[int, ...]



def format_capability(value: Any) -> str | None:
    """``(9, 0)``, ``"9.0"`` or ``9.0`` -> ``"9.0"`` (None stays None)."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        return ".".join(str(int(v)) for v in value)
    return str(value)


@dataclass(frozen=True)
class SystemInfo:
    """What a plan must match at load time: TensorRT version and GPU compute capability."""

    tensorrt_version: str | None = None
    compute_capability: str | None = None
    onnxruntime_version: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "compute_capability", format_capability(self.compute_capability))


@dataclass(frozen=True)
class EngineRecord:
    """One entry of ``artrt.json`` -> ``engines``. ``profile`` maps input -> (min, opt, max)."""

    component: str
    backend: str  # "trt" | "ort-cuda"
    file: str
    sha256: str
    size: int
    precision: str  # of the source graph: "fp16" | "fp32"
    source: str  # the package ONNX it was built from
    onnx_sha256: str
    profile: dict[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)
    tensorrt_version: str | None = None
    compute_capability: str | None = None
    onnxruntime_version: str | None = None
    opt_level: int | None = None
    extra_files: tuple[str, ...] = ()  # e.g. external weights of a fused ONNX
    refittable: bool = False  # a TensorRT plan built with --refittable (LoRA refits its weights)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["profile"] = {k: [list(s) for s in v] for k, v in self.profile.items()}
        data["extra_files"] = list(self.extra_files)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EngineRecord:
        try:
            profile = {k: tuple(tuple(int(d) for d in s) for s in v) for k, v in data.get("profile", {}).items()}
            if any(len(v) != 3 for v in profile.values()):
                raise ValueError("a profile entry is not [min, opt, max]")
            return cls(**{**data, "profile": profile, "extra_files": tuple(data.get("extra_files", ()))})
        except (TypeError, ValueError) as exc:
            raise PackageError(f"malformed engine record {dict(data)!r}: {exc}") from None


def engine_file_name(component: str, backend: str) -> str:
    """Package path of a component's engine: ``engines/<component>.plan`` (or ``.cuda.onnx``)."""
    return f"{ENGINE_DIR}/{component}{ENGINE_SUFFIX[backend]}"


def source_onnx(manifest: Manifest, component: str) -> str:
    """The graph GPU backends build from: the fp16 ONNX, else the fp32 one."""
    comp = manifest.components[component]
    return comp.onnx_fp16 or comp.onnx


def check_cpu_graphs(root: Path, manifest: Manifest) -> None:
    """Refuse ``ort-cpu`` for a package with a component it has no graph for (one exported with
    ``--targets cuda``, whose fp16 graphs only GPU backends run), with one :class:`InputError` line."""
    missing = [name for name, comp in manifest.components.items() if comp.cpu_graph is None]
    if missing:
        raise InputError(f"{root} was exported for cuda only (--targets cuda): no CPU graph for "
                         f"{', '.join(missing)}; run it on a GPU backend or re-export with --targets cpu")


def find_record(manifest: Manifest, component: str, backend: str) -> EngineRecord | None:
    for data in manifest.engines:
        if data.get("component") == component and data.get("backend") == backend:
            return EngineRecord.from_json(data)
    return None


def make_record(
    root: Path, manifest: Manifest, component: str, backend: str, file: str, *,
    profile: Mapping[str, tuple[Shape, Shape, Shape]] | None = None, system: SystemInfo | None = None,
    opt_level: int | None = None, extra_files: Sequence[str] = (), refittable: bool = False,
) -> EngineRecord:
    """The record of an engine just written to ``root/file`` from the component's source graph."""
    source = source_onnx(manifest, component)
    written = file_record(root, file)
    sources = {f.path: f for f in manifest.files}
    system = system or SystemInfo()
    return EngineRecord(
        component=component, backend=backend, file=file, sha256=written.sha256, size=written.size,
        precision="fp16" if source == manifest.components[component].onnx_fp16 else "fp32",
        source=source, onnx_sha256=sources[source].sha256,
        profile={k: tuple(tuple(int(d) for d in s) for s in v) for k, v in (profile or {}).items()},
        tensorrt_version=system.tensorrt_version if backend == "trt" else None,
        compute_capability=system.compute_capability if backend == "trt" else None,
        onnxruntime_version=system.onnxruntime_version if backend == "ort-cuda" else None,
        opt_level=opt_level, extra_files=tuple(extra_files), refittable=refittable and backend == "trt",
    )


def with_record(root: Path, manifest: Manifest, record: EngineRecord) -> Manifest:
    """``manifest`` with ``record`` replacing any engine of the same component and backend,
    and its files listed (with sha256) in place of the old engine's files."""
    old = [e for e in manifest.engines if (e.get("component"), e.get("backend")) == (record.component, record.backend)]
    drop = {p for e in old for p in engine_files_of(e)} | {record.file, *record.extra_files}
    files = [f for f in manifest.files if f.path not in drop]
    files.append(file_record(root, record.file))
    files += [file_record(root, p) for p in record.extra_files]
    engines = [e for e in manifest.engines if not any(e is o for o in old)] + [record.to_json()]
    return replace(manifest, files=tuple(files), engines=tuple(engines))


def staleness(
    record: EngineRecord, manifest: Manifest, system: SystemInfo | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> list[str]:
    """Why ``record`` cannot serve this system / package / request (empty: it can)."""
    reasons = []
    system = system or SystemInfo()
    if system.tensorrt_version and record.backend == "trt" and record.tensorrt_version != system.tensorrt_version:
        reasons.append(f"built with TensorRT {record.tensorrt_version}, running {system.tensorrt_version}")
    if system.compute_capability and record.backend == "trt" and record.compute_capability != system.compute_capability:
        reasons.append(
            f"built for compute capability {record.compute_capability}, this GPU is {system.compute_capability}"
        )
    if (system.onnxruntime_version and record.backend == "ort-cuda"
            and record.onnxruntime_version != system.onnxruntime_version):
        reasons.append(f"made with onnxruntime {record.onnxruntime_version}, running {system.onnxruntime_version}")
    expected = source_onnx(manifest, record.component)
    current = {f.path: f.sha256 for f in manifest.files}.get(expected)
    if record.source != expected:
        reasons.append(f"built from {record.source}, the package's graph is now {expected}")
    elif current != record.onnx_sha256:
        reasons.append(f"source ONNX changed (sha256 {record.onnx_sha256[:12]} at build, now {str(current)[:12]})")
    for name, shape in (shapes or {}).items() if record.profile else ():
        reasons += _shape_problems(name, tuple(int(d) for d in shape), record.profile.get(name))
    return reasons


def _shape_problems(name: str, shape: Shape, profile: tuple[Shape, Shape, Shape] | None) -> list[str]:
    if profile is None:
        return [f"input {name} has no optimization profile"]
    low, _, high = profile
    if len(shape) == len(low) and all(lo <= d <= hi for lo, d, hi in zip(low, shape, high)):
        return []
    return [f"{name} shape sample {list(shape)} outside profile [min {list(low)}, max {list(high)}]"]


def component_file(
    root: Path, manifest: Manifest, component: str, backend: str, system: SystemInfo | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> Path:
    """The file ``backend`` loads for ``component``: the CPU graph (else fp32 ONNX) on ``ort-cpu``
    (a package without either is refused by :func:`check_cpu_graphs`); the fused graph on
    ``ort-cuda`` (the fp16, else fp32 ONNX when none was built); the plan on ``trt``. A recorded
    engine that is stale is refused on both GPU backends (never replaced by a slower graph) with
    :class:`StaleEngineError` naming the file, the reasons and the command."""
    root = Path(root)
    if backend == "ort-cpu":
        graph = manifest.components[component].cpu_graph
        if graph is None:
            check_cpu_graphs(root, manifest)  # raises: a package exported for cuda only
        return resolve(root, graph)
    if backend not in ENGINE_SUFFIX:
        raise ValueError(f"unknown backend {backend!r}")
    record = find_record(manifest, component, backend)
    if backend == "ort-cuda":
        system = system or SystemInfo(onnxruntime_version=_ort_version())
        if record is None:  # unbuilt, not stale: the plain graph runs (dynamic shapes, slower)
            if any(e.get("backend") == "ort-cuda" for e in manifest.engines):
                log.warning("%s: no fused graph built (other components have one); running %s; build it: %s",
                            component, source_onnx(manifest, component), build_command(root, manifest, shapes,
                                                                                       backend=backend))
            return resolve(root, source_onnx(manifest, component))
    elif record is None:
        raise StaleEngineError(
            f"no TensorRT engine built for {component}: run {build_command(root, manifest, shapes, backend=backend)}"
        )
    reasons = staleness(record, manifest, system, shapes)
    if reasons:
        raise StaleEngineError(
            f"{ENGINE_KIND[backend]} {record.file} is stale: {'; '.join(reasons)}; "
            f"run: {build_command(root, manifest, shapes, rebuild=True, backend=backend)}"
        )
    return resolve(root, record.file)


def latent_frames(num_frames: int) -> int:
    """Latent frames of a video of ``num_frames`` (= 4k + 1) frames (``runtime.video.latent_frames``)."""
    return (num_frames - 1) // FRAMES_PER_LATENT + 1


def video_frames(latent: int) -> int:
    """Video frames decoded from ``latent`` latent frames: 1 + 4 (latent - 1)."""
    return 1 + FRAMES_PER_LATENT * (latent - 1)


def text_length(manifest: Manifest, component: str) -> int | None:
    """Tokens per prompt of the text that feeds ``component`` (its ``text_length`` axis): a text
    encoder's tokenizer's ``max_length``; for an expert step, that of the encoders its
    conditioning reads (512 for Wan's UMT5, 77 for CLIP). None where no tokenizer says (or
    the encoders disagree)."""
    comp = manifest.components[component]
    encoders = [component] if comp.kind == "text_encoder" else [
        name for e in manifest.experts if e.component == component for name in e.conditioning.text_encoders]
    lengths = set()
    for name in encoders:
        tokenizer = manifest.components[name].tokenizer if name in manifest.components else None
        if tokenizer in manifest.tokenizers:
            lengths.add(int(manifest.tokenizers[tokenizer].max_length))
    return lengths.pop() if len(lengths) == 1 else None


def dimension_size(dim: str, sizes: Mapping[str, int]) -> int | None:
    """The size of the symbolic dimension ``dim``: from ``sizes``, or ``latent_height_xK`` /
    ``latent_width_xK`` as K times ``latent_height`` / ``latent_width``; None when unknown."""
    if dim in sizes:
        return int(sizes[dim])
    scaled = _SCALED.fullmatch(dim)
    if scaled is not None and scaled[1] in sizes:
        return int(sizes[scaled[1]]) * int(scaled[2])
    return None


def request_shapes(
    manifest: Manifest, component: str, batch: int, height: int, width: int, num_frames: int | None = None,
) -> dict[str, Shape]:
    """The input shapes ``component`` runs with for ``batch`` images (or videos of ``num_frames``
    frames) of ``height`` x ``width`` pixels, sized as ``artrt build`` sizes profiles
    (``export.build.plan_profiles``): latents ``[batch, C, height/s, width/s]`` (Wan:
    ``[batch, C, latent_frames, height/s, width/s]``; the decoders take one latent frame and
    caches ``K·height/s``); the expert's conditioning (unconditional and conditional halves)
    ``cond_batch = 2 * batch`` by ``text_length`` tokens; text encoders always 2 prompts.
    Inputs with a dimension artrt does not size are left out: with ``num_frames`` None, the Wan
    experts' latents (their frames are not known)."""
    scale = manifest.latent_scale
    comp = manifest.components[component]
    sizes = {
        "height": height, "width": width, "latent_height": height // scale, "latent_width": width // scale,
        "batch": TEXT_BATCH if comp.kind == "text_encoder" else batch, "cond_batch": 2 * batch,
    }
    if num_frames is not None:
        sizes["latent_frames"] = latent_frames(num_frames)
    length = text_length(manifest, component)
    if length is not None:
        sizes["text_length"] = length
    shapes = {}
    for t in comp.inputs:
        dims = [d if isinstance(d, int) else dimension_size(d, sizes) for d in t.shape]
        if all(d is not None for d in dims):
            shapes[t.name] = tuple(int(d) for d in dims)  # type: ignore[arg-type]
    return shapes


def check_profiles(
    root: Path, manifest: Manifest, backend: str, batch: int, height: int, width: int, num_frames: int | None = None,
) -> None:
    """Refuse, before any work, a request whose shapes lie outside the recorded profile of an
    engine ``backend`` runs: every TensorRT plan, and the static fused ONNX Runtime CUDA graphs
    (records without a profile, i.e. dynamic fused graphs, run any size). Reads no file.
    ``num_frames``: a video request's frames (Wan packages), checked against the latent frames
    the experts were built for; None checks every other axis (the frames are not known).

    Raises :class:`StaleEngineError`: "<engine> <file> was built for HxW batch B, requested
    HxW batch B (<tensor> outside profile ...); run: artrt build ... for the requested size"."""
    if backend == "ort-cpu":
        return
    if backend not in ENGINE_SUFFIX:
        raise ValueError(f"unknown backend {backend!r}")
    misfits = []
    for name in manifest.components:
        record = find_record(manifest, name, backend)
        if record is None or not record.profile:
            continue
        shapes = request_shapes(manifest, name, batch, height, width, num_frames)
        problems = [p for t, s in shapes.items() for p in _shape_problems(t, s, record.profile.get(t))]
        if problems:
            misfits.append((record, problems))
    if not misfits:
        return
    record, problems = misfits[0]
    scale = manifest.latent_scale
    latent: Shape = (batch, manifest.latent_channels, height // scale, width // scale)
    requested = f"{height}x{width} batch {batch}"
    if has_frame_axis(manifest):  # Wan: [B, C, latent frames, h, w]; frames not known: keep the built ones
        frames = latent_frames(num_frames) if num_frames is not None else _built_latent_frames(manifest, backend)
        latent = (*latent[:2], frames, *latent[2:])
        requested += "" if num_frames is None else f", {_frames(num_frames)}"
    # build_reasons compares TensorRT profiles with the request, so only the misfits are rebuilt;
    # it does not compare fused graphs' shapes, so those need --rebuild.
    command = build_command(root, manifest, {"sample": latent}, rebuild=backend == "ort-cuda", backend=backend)
    others = ", ".join(r.file for r, _ in misfits[1:])
    raise StaleEngineError(
        f"{ENGINE_KIND[backend]} {record.file} was built for {_built_for(record, scale)}, requested "
        f"{requested} ({problems[0]})" + (f"; nor do {others} fit" if others else "")
        + f"; run: {command}"
    )


def has_frame_axis(manifest: Manifest) -> bool:
    """Whether the experts' latents have a ``latent_frames`` axis (the Wan family: videos)."""
    return any(d == "latent_frames" for c in manifest.components.values() for t in c.inputs for d in t.shape)


def _built_latent_frames(manifest: Manifest, backend: str) -> int:
    """The latent frames ``backend``'s expert engines were built for (their ``sample`` profile's
    opt), 1 when none records them."""
    for data in manifest.engines:
        sample = (data.get("profile") or {}).get("sample") if data.get("backend") == backend else None
        if sample is not None and len(sample[1]) == 5:
            return int(sample[1][2])
    return 1


def _frames(n: int) -> str:
    return f"{n} frame" if n == 1 else f"{n} frames"


def _built_for(record: EngineRecord, scale: int) -> str:
    """``32x32 batch 1`` (static) or ``16..48x16..48 batch 1..2`` (ranges), from the latent profile;
    an expert with a frame axis adds ``, 5 frames`` (or ``, 1..9 frames``)."""
    name, profile = next(((n, record.profile[n]) for n in LATENT_INPUTS if n in record.profile), (None, None))
    if profile is None or len(profile[0]) not in (4, 5):
        return "profile " + ", ".join(f"{n} [min {list(p[0])}, max {list(p[2])}]" for n, p in record.profile.items())
    low, _, high = profile

    def span(lo: int, hi: int) -> str:
        return str(lo) if lo == hi else f"{lo}..{hi}"

    text = (f"{span(low[-2] * scale, high[-2] * scale)}x{span(low[-1] * scale, high[-1] * scale)} "
            f"batch {span(low[0], high[0])}")
    if len(low) == 5 and name == "sample":  # the decoders' one latent frame says nothing about the video
        lo, hi = video_frames(low[2]), video_frames(high[2])
        text += f", {lo} frame" if lo == hi == 1 else f", {span(lo, hi)} frames"
    return text


def build_command(
    root: Path, manifest: Manifest, shapes: Mapping[str, Sequence[int]] | None = None, rebuild: bool = False,
    backend: str = "trt",
) -> str:
    """``artrt build ROOT --backend B [--rebuild]`` for the requested latent shape (``sample`` or
    ``latents`` in ``shapes``), else as ``backend``'s engines were built: their size and batch,
    with ``--dynamic`` and its bounds for ranges (a dynamic fused graph has no profile), and
    ``--refittable`` where they were built refittable (a rebuild must keep LoRA refits working)."""
    words = ["artrt", "build", shlex.quote(str(root)), "--backend", backend] + (["--rebuild"] if rebuild else [])
    if any(e.get("backend") == backend and e.get("refittable") for e in manifest.engines):
        words.append("--refittable")
    latent = next((tuple(int(d) for d in s) for n, s in (shapes or {}).items() if n in LATENT_INPUTS), None)
    if latent is not None:
        return " ".join(words + _size_flags(manifest.latent_scale, latent, latent, latent))
    records = [e for e in manifest.engines if e.get("backend") == backend]
    # the experts' ``sample`` first: it alone has the frames of a Wan build (the decoders take one)
    for name in LATENT_INPUTS:
        for data in records:
            profile = data.get("profile") or {}
            if name in profile:
                low, opt, high = (tuple(int(d) for d in s) for s in profile[name])
                return " ".join(words + _size_flags(manifest.latent_scale, low, opt, high))
    kinds = {name: comp.kind for name, comp in manifest.components.items()}
    if backend == "ort-cuda" and any(kinds.get(e.get("component")) == "fused_step" for e in records):
        # fused steps recorded without a profile: a dynamic build
        words.append("--dynamic")
    return " ".join(words)


def _size_flags(scale: int, low: Sequence[int], opt: Sequence[int], high: Sequence[int]) -> list[str]:
    """``--height --width --batch`` (and ``--frames``) of a latent profile ``[B, C, h, w]`` (or
    ``[B, C, F, h, w]``), and the ``--dynamic`` bounds of a range."""
    if not (len(low) == len(opt) == len(high) and len(low) in (4, 5)):
        return []
    flags = ["--height", str(opt[-2] * scale), "--width", str(opt[-1] * scale), "--batch", str(opt[0])]
    frames = len(low) == 5 and video_frames(opt[2]) != 1
    if frames:
        flags += ["--frames", str(video_frames(opt[2]))]
    if tuple(low) != tuple(high):  # dimension_ranges: one size range for both sides, batches (frames) 1..max
        flags += ["--dynamic", "--min-size", str(min(low[-2], low[-1]) * scale),
                  "--max-size", str(max(high[-2], high[-1]) * scale), "--max-batch", str(high[0])]
        if len(low) == 5 and high[2] != opt[2]:
            flags += ["--max-frames", str(video_frames(high[2]))]
    return flags


def _ort_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)
