"""Built engines recorded in ``artrt.json``, and whether one may still be used.

A TensorRT plan runs only on the TensorRT version and GPU architecture it was built
with, only for the shapes of its optimization profile, and it stands for the ONNX file
it was built from. :func:`staleness` lists every way a record no longer fits;
:func:`component_file` picks the file a backend loads for a component and refuses a
stale plan with the command that rebuilds it. Imports neither torch nor TensorRT.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import PackageError
from .package import Manifest, engine_files_of, file_record, resolve

log = logging.getLogger(__name__)

ENGINE_DIR = "engines"
ENGINE_SUFFIX = {"trt": ".plan", "ort-cuda": ".cuda.onnx"}
Shape = tuple[int, ...]


class StaleEngineError(PackageError):
    """A built engine is missing or does not fit this system, package or request."""


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


def find_record(manifest: Manifest, component: str, backend: str) -> EngineRecord | None:
    for data in manifest.engines:
        if data.get("component") == component and data.get("backend") == backend:
            return EngineRecord.from_json(data)
    return None


def make_record(
    root: Path, manifest: Manifest, component: str, backend: str, file: str, *,
    profile: Mapping[str, tuple[Shape, Shape, Shape]] | None = None, system: SystemInfo | None = None,
    opt_level: int | None = None, extra_files: Sequence[str] = (),
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
        opt_level=opt_level, extra_files=tuple(extra_files),
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
    """The file ``backend`` loads for ``component``: the CPU graph (else fp32 ONNX) on ``ort-cpu``;
    the fused ONNX (else fp16, else fp32 ONNX) on ``ort-cuda``; the plan on ``trt``, if not stale."""
    root = Path(root)
    if backend == "ort-cpu":
        comp = manifest.components[component]
        return resolve(root, comp.onnx_cpu or comp.onnx)
    record = find_record(manifest, component, backend)
    if backend == "ort-cuda":
        if record is not None:
            reasons = staleness(record, manifest, system or SystemInfo(onnxruntime_version=_ort_version()))
            if not reasons:
                return resolve(root, record.file)
            log.warning("%s: not using %s (%s); rebuild it: artrt build %s --backend ort-cuda --rebuild",
                        component, record.file, "; ".join(reasons), root)
        return resolve(root, source_onnx(manifest, component))
    if backend != "trt":
        raise ValueError(f"unknown backend {backend!r}")
    if record is None:
        raise StaleEngineError(f"no TensorRT engine built for {component}: run {build_command(root, manifest, shapes)}")
    reasons = staleness(record, manifest, system, shapes)
    if reasons:
        raise StaleEngineError(
            f"TensorRT engine {record.file} is stale: {'; '.join(reasons)}; "
            f"run: {build_command(root, manifest, shapes, rebuild=True)}"
        )
    return resolve(root, record.file)


def build_command(
    root: Path, manifest: Manifest, shapes: Mapping[str, Sequence[int]] | None = None, rebuild: bool = False
) -> str:
    """``artrt build`` for the requested latent shape, else for the shape the plans were built for."""
    latent = next((s for n, s in (shapes or {}).items() if n in ("sample", "latents")), None)
    for data in manifest.engines if latent is None else ():
        opt = {n: p[1] for n, p in data.get("profile", {}).items()}
        latent = opt.get("sample") or opt.get("latents") or latent
    words = ["artrt", "build", str(root)] + (["--rebuild"] if rebuild else [])
    if latent is not None and len(latent) == 4:
        scale = manifest.latent_scale
        words += ["--height", str(latent[2] * scale), "--width", str(latent[3] * scale), "--batch", str(latent[0])]
    return " ".join(words)


def _ort_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)
