"""The package format: a directory with ``artrt.json`` and the files it names.

Reading validates everything a user could have broken (missing or edited files, paths
that leave the directory, unknown format versions) and raises :class:`PackageError`
with a message naming the file. Writing is torch-free too, so tools can rewrite a
manifest (e.g. to record built engines) without the export extra.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from artrt.errors import PackageError
from artrt.files import write_atomic

MANIFEST_NAME = "artrt.json"
FORMAT_NAME = "artrt-package"
FORMAT_VERSION = 1
TARGETS = ("cpu", "cuda")  # what an export writes graphs for: ort-cpu, or the GPU backends (trt, ort-cuda)
PRECISIONS = ("fp32", "fp16", "both")  # the precision of the graphs written for the cuda target


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype and shape of one graph input or output (str dims are symbolic)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class Attention:
    """A component's largest attention (recorded at export; :mod:`artrt.export.attention_cost`):
    ``heads`` over ``ceil(h/stride) * ceil(w/stride)`` tokens of the latent grid, times the latent
    frames where ``frames`` (Wan's transformers attend across frames)."""

    heads: int
    stride: int
    frames: bool = False


@dataclass(frozen=True)
class Component:
    """One network of the package (a text encoder, an expert step or the decoder) and its graphs.

    A package holds what its export's targets chose (docs/package-format.md, "Targets"): the fp32
    graph ``onnx``, the fp16 graph ``onnx_fp16`` and the CPU-optimized ``onnx_cpu``, at least one."""

    name: str
    kind: str  # "text_encoder" | "fused_step" | "vae_decoder"
    onnx: str | None  # fp32 graph, path relative to the package (None: exported for cuda in fp16 only)
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    tokenizer: str | None = None  # text encoders: key into Manifest.tokenizers
    export_check: dict[str, float] = field(default_factory=dict)  # output -> max abs error
    # fp16 graph for GPU backends (None: they use ``onnx``); docs/gpu-design.md has its I/O dtypes
    onnx_fp16: str | None = None
    export_check_fp16: dict[str, float] = field(default_factory=dict)  # vs the fp32 PyTorch module
    # fp32 graph rewritten for ONNX Runtime CPU (fused attention; None: ort-cpu uses ``onnx``)
    onnx_cpu: str | None = None
    attention: Attention | None = None  # its largest attention, for the memory estimate (None: unknown)

    @property
    def cpu_graph(self) -> str | None:
        """The graph ``ort-cpu`` loads: the CPU-optimized one, else the fp32 one; None when the
        package has neither (exported with ``--targets cuda``)."""
        return self.onnx_cpu or self.onnx

    @property
    def graphs(self) -> dict[str, str]:
        """The graphs the package holds for this component by kind: ``fp32``, ``fp16``, ``cpu``."""
        kinds = {"fp32": self.onnx, "fp16": self.onnx_fp16, "cpu": self.onnx_cpu}
        return {kind: path for kind, path in kinds.items() if path is not None}


@dataclass(frozen=True)
class TokenizerInfo:
    """A ``tokenizers`` JSON file plus the padding the text encoder was trained with."""

    file: str
    max_length: int
    pad_id: int
    clean: str | None = None  # the pipeline's prompt clean-up before tokenizing ("wan": runtime.text.CLEANERS)


@dataclass(frozen=True)
class Conditioning:
    """How an expert's cross-attention and added conditioning are built from text.

    ``text_encoders`` hidden states are concatenated on the last axis in this order;
    ``pooled`` names the encoder whose pooled output feeds ``text_embeds``;
    ``time_ids`` is ``"size"`` (SDXL: original size, crop, target size),
    ``"aesthetic"`` (SDXL refiner: original size, crop, aesthetic score) or None.
    """

    text_encoders: tuple[str, ...]
    pooled: str | None = None
    time_ids: str | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    zero_negative_when_empty: bool = False


@dataclass(frozen=True)
class Expert:
    """A denoiser responsible for part of the noise range (composition or detail)."""

    name: str
    component: str
    conditioning: Conditioning


@dataclass(frozen=True)
class Defaults:
    steps: int
    guidance: float | list[float]  # one value, or one per expert
    switch: float
    sampler: str
    height: int
    width: int


@dataclass(frozen=True)
class FileRecord:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """The parsed ``artrt.json``. ``decoder`` is None for pixel-space models."""

    family: str
    components: dict[str, Component]
    tokenizers: dict[str, TokenizerInfo]
    schedule: dict[str, Any]
    experts: tuple[Expert, ...]
    defaults: Defaults
    latent_channels: int
    latent_scale: int  # image pixels per latent pixel
    size_multiple: int  # height and width must be multiples of this
    decoder: str | None
    files: tuple[FileRecord, ...]
    engines: tuple[dict[str, Any], ...] = ()  # built engines, see engine_records.EngineRecord
    source: dict[str, Any] = field(default_factory=dict)
    artrt_version: str = ""
    # the export's choice of graphs (``--targets``, ``--precision``); empty / None in older packages
    targets: tuple[str, ...] = ()
    precision: str | None = None
    # the largest latent [frames, height, width] the experts' position tables cover (Wan's RoPE); None: no limit
    max_latent: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if data["max_latent"] is None:  # written only where there is a limit
            del data["max_latent"]
        for component in data["components"].values():
            if component["attention"] is None:  # older packages: no attention record
                del component["attention"]
        data = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **data}
        return data


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(root: Path, relative: str) -> FileRecord:
    path = root / relative
    return FileRecord(relative, sha256_file(path), path.stat().st_size)


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Write ``artrt.json`` atomically (:func:`artrt.files.write_atomic`)."""
    return write_atomic(Path(root) / MANIFEST_NAME, (json.dumps(manifest.to_json(), indent=2) + "\n").encode())


def package_root(path: str | Path) -> Path:
    """A package directory from ``path``: the directory itself, or the one holding ``path`` when it
    names the ``artrt.json`` file."""
    if not isinstance(path, (str, Path)):
        raise PackageError(f"a package path must be a string or Path, got {type(path).__name__}")
    path = Path(path)
    return path.parent if path.name == MANIFEST_NAME and path.is_file() else path


def graph_bytes(manifest: Manifest, graph: str) -> int:
    """Bytes of the package file ``graph`` and of its external data (``graph.data`` and the like)."""
    return sum(f.size for f in manifest.files if f.path == graph or f.path.startswith(graph + "."))


def graph_sizes(manifest: Manifest, component: str) -> dict[str, int]:
    """Bytes of each graph the package holds for ``component`` (external data included), by kind
    (``fp32``, ``fp16``, ``cpu``; a CPU graph that shares the fp32 graph's external data counts only
    its own file)."""
    return {kind: graph_bytes(manifest, path) for kind, path in manifest.components[component].graphs.items()}


def read_manifest(root: str | Path, verify_hashes: bool = True, check_engines: bool = True) -> Manifest:
    """Read and validate a package directory's manifest.

    Checks the format version, that every listed file stays inside the package and
    exists with the recorded size (and sha256 when ``verify_hashes``), and that every
    reference between sections resolves. ``check_engines=False`` skips the files of
    built engines (``artrt build`` replaces broken ones instead of refusing the package).
    """
    root = package_root(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise PackageError(f"package directory not found: {root}")
    if not path.is_file():
        raise PackageError(f"{root} is not an artrt package: {MANIFEST_NAME} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{path}: not valid JSON ({exc})") from None
    try:
        manifest = _parse(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PackageError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from None
    _check_references(manifest, path, check_engines)
    _check_files(root, manifest, verify_hashes, check_engines)
    return manifest


def engine_files(manifest: Manifest) -> set[str]:
    """The package paths that belong to built engines (plans, fused ONNX and their data)."""
    return {p for record in manifest.engines for p in engine_files_of(record)}


def engine_files_of(record: dict[str, Any]) -> list[str]:
    """The files of one engine record of ``artrt.json``: its ``file`` and ``extra_files``."""
    return [str(p) for p in (record.get("file"), *record.get("extra_files", ())) if p]


def _engine_backend(m: Manifest, path: str) -> str:
    """The backend of the engine record that owns ``path``."""
    return next((str(r.get("backend")) for r in m.engines if path in engine_files_of(r)), "trt")


def resolve(root: Path, relative: str) -> Path:
    """Resolve a manifest path, refusing anything that leaves the package directory."""
    if Path(relative).is_absolute():
        raise PackageError(f"manifest path {relative!r} is absolute; package paths are relative")
    root_resolved = root.resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root_resolved):
        raise PackageError(f"manifest path {relative!r} points outside the package {root}")
    return target


def _parse(data: Any) -> Manifest:
    if not isinstance(data, dict):
        raise ValueError(f"the manifest is a JSON {type(data).__name__}, not an object")
    if data.get("format") != FORMAT_NAME:
        raise ValueError(f"'format' is {data.get('format')!r}, expected {FORMAT_NAME!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"format_version {data.get('format_version')!r} is not supported "
            f"(this artrt reads version {FORMAT_VERSION}); re-export the package"
        )
    components = {name: _component(c) for name, c in data["components"].items()}
    return Manifest(
        family=str(data["family"]),
        components=components,
        tokenizers={k: TokenizerInfo(**v) for k, v in data["tokenizers"].items()},
        schedule=dict(data["schedule"]),
        experts=tuple(
            Expert(e["name"], e["component"], _conditioning(e["conditioning"]))
            for e in data["experts"]
        ),
        defaults=Defaults(**data["defaults"]),
        latent_channels=_positive(data, "latent_channels"),
        latent_scale=_positive(data, "latent_scale"),
        size_multiple=_positive(data, "size_multiple"),
        decoder=data["decoder"],
        files=tuple(FileRecord(**f) for f in data["files"]),
        engines=tuple(data.get("engines", ())),
        source=dict(data.get("source", {})),
        artrt_version=str(data.get("artrt_version", "")),
        targets=tuple(str(t) for t in data.get("targets") or ()),
        precision=data.get("precision"),
        max_latent=_max_latent(data.get("max_latent")),
    )


def _max_latent(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 3 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError(f"max_latent must be [frames, height, width] of positive integers, got {value!r}")
    return tuple(value)


def _tensors(items: list[dict[str, Any]]) -> tuple[TensorInfo, ...]:
    return tuple(TensorInfo(t["name"], t["dtype"], tuple(t["shape"])) for t in items)


def _component(c: dict[str, Any]) -> Component:
    return Component(
        name=c["name"],
        kind=c["kind"],
        onnx=c.get("onnx"),
        inputs=_tensors(c["inputs"]),
        outputs=_tensors(c["outputs"]),
        tokenizer=c.get("tokenizer"),
        export_check=dict(c.get("export_check", {})),
        onnx_fp16=c.get("onnx_fp16"),
        export_check_fp16=dict(c.get("export_check_fp16", {})),
        onnx_cpu=c.get("onnx_cpu"),
        attention=_attention(c.get("attention")),
    )


def _attention(value: Any) -> Attention | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"heads", "stride", "frames"}:
        raise ValueError(f"a component's 'attention' must be {{heads, stride, frames}}, got {value!r}")
    heads, stride = _positive(value, "heads"), _positive(value, "stride")
    return Attention(heads, stride, bool(value.get("frames", False)))


def _positive(data: dict[str, Any], key: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key!r} must be a whole number >= 1, got {value!r}")
    return value


def _conditioning(c: dict[str, Any]) -> Conditioning:
    unknown = sorted(set(c) - {f.name for f in fields(Conditioning)})
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))} in an expert's 'conditioning'")
    return Conditioning(**{**c, "text_encoders": tuple(c["text_encoders"])})


def _check_references(m: Manifest, path: Path, check_engines: bool = True) -> None:
    problems = []
    listed = {f.path for f in m.files}
    for comp in m.components.values():
        if not comp.graphs:
            problems.append(f"component {comp.name!r} has no graph (none of onnx, onnx_fp16, onnx_cpu)")
        for onnx in comp.graphs.values():
            if onnx not in listed:
                problems.append(f"component {comp.name!r} file {onnx!r} is not in 'files'")
        if comp.tokenizer is not None and comp.tokenizer not in m.tokenizers:
            problems.append(f"component {comp.name!r} names unknown tokenizer {comp.tokenizer!r}")
    for tok in m.tokenizers.values():
        if tok.file not in listed:
            problems.append(f"tokenizer file {tok.file!r} is not in 'files'")
    for expert in m.experts:
        names = (expert.component, *expert.conditioning.text_encoders, expert.conditioning.pooled)
        problems += [
            f"expert {expert.name!r} names unknown component {n!r}"
            for n in names
            if n is not None and n not in m.components
        ]
    for engine in m.engines if check_engines else ():
        if engine.get("component") not in m.components:
            problems.append(f"engine record names unknown component {engine.get('component')!r}")
        problems += [f"engine file {p!r} is not in 'files'" for p in engine_files_of(engine) if p not in listed]
    if m.decoder is not None and m.decoder not in m.components:
        problems.append(f"decoder {m.decoder!r} is not a component")
    if len(m.experts) not in (1, 2):
        problems.append(f"{len(m.experts)} experts listed; artrt runs one or two")
    if problems:
        raise PackageError(f"{path}: " + "; ".join(problems))


def _check_files(root: Path, m: Manifest, verify_hashes: bool, check_engines: bool) -> None:
    engines = engine_files(m)
    for record in m.files:
        is_engine = record.path in engines
        if is_engine and not check_engines:
            continue
        fix = (f"rebuild it: artrt build {root} --backend {_engine_backend(m, record.path)} --rebuild" if is_engine
               else "re-export it")
        target = resolve(root, record.path)
        if not target.is_file():
            raise PackageError(f"package file missing: {record.path} (in {root}); {fix}")
        size = target.stat().st_size
        if size != record.size:
            raise PackageError(
                f"package file {record.path} has {size} bytes, manifest says {record.size}: "
                f"the package is corrupt or was modified; {fix}"
            )
        if verify_hashes and sha256_file(target) != record.sha256:
            raise PackageError(
                f"package file {record.path} does not match its sha256 in {MANIFEST_NAME}: "
                f"the package is corrupt or was modified; {fix}"
            )
