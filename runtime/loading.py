"""Open every component of a package on one backend.

CPU: one ONNX Runtime session per component. GPU: the engines share one CUDA stream,
and TensorRT engines share one activation (scratch) block sized to the largest, since
the components run one after another and never at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from artrt.engines import BACKENDS, Engine, create_engine, resolve_backend
from artrt.errors import EngineError, GraphCaptureError

from .engine_records import component_file, source_onnx
from .package import Manifest, resolve

log = logging.getLogger(__name__)


class OpenEngines:
    """The engines of a package by component name, with their shared GPU resources.

    ``resident`` (the default memory mode): every engine is opened at load and stays open.
    Otherwise (``memory="low"``) engines are opened when :meth:`using` asks for them and
    released when the block ends, so only the component that is working holds memory.
    """

    def __init__(self, backend: str, paths: dict[str, Path], options: dict[str, dict[str, Any]],
                 stream: Any = None, resident: bool = True) -> None:
        self.backend = backend
        self.paths = paths
        self.options = options
        self.stream = stream
        self.resident = resident
        self.engines: dict[str, Engine] = {}  # the engines open now
        self.scratch: Any = None
        self.load_seconds = 0.0  # spent opening engines since the last reset (low memory: per call)
        self.watchers: list[Callable[[str, Engine], None]] = []  # called with every engine opened

    @classmethod
    def of(cls, backend: str, engines: dict[str, Engine], stream: Any = None) -> OpenEngines:
        """Engines opened elsewhere (resident), e.g. by tests or tools."""
        paths = {name: getattr(engine, "path", None) for name, engine in engines.items()}
        opened = cls(backend, paths, {name: {} for name in engines}, stream)
        opened.engines.update(engines)
        return opened

    @property
    def device(self) -> str:
        return "cpu" if self.backend == "ort-cpu" else "cuda"

    def get(self, name: str) -> Engine:
        """The engine of component ``name``, opened now if it is not open."""
        if name not in self.engines:
            log.debug("opening %s", name)
            started = time.perf_counter()
            self.engines[name] = _activate(self.backend, self.paths[name], name, self.options[name])
            self.load_seconds += time.perf_counter() - started
            for watch in self.watchers:
                watch(name, self.engines[name])
        return self.engines[name]

    def weight_file(self, name: str) -> Path:
        """The ONNX file whose initializers name the weights of component ``name``'s engine: the file
        it loads, or for a TensorRT plan the ONNX it was built from."""
        return Path(self.options[name].get("source") or self.paths[name])

    def set_weights(self, name: str, weights: Mapping[str, Any]) -> None:
        """Replace initializers of component ``name`` (``{}``: the file's own): an open engine changes
        now, one opened later (``memory="low"``) gets them when it opens."""
        if not weights and not self.options[name].get("weights"):
            return
        self.options[name]["weights"] = dict(weights)
        engine = self.engines.get(name)
        if engine is not None:
            if not hasattr(engine, "set_weights"):
                raise EngineError(f"{name}: the {self.backend} engine cannot replace weights")
            engine.set_weights(weights)  # type: ignore[attr-defined]

    def release(self, name: str) -> None:
        """Close one engine (its memory is freed once nothing else refers to it)."""
        engine = self.engines.pop(name, None)
        if engine is not None:
            log.debug("releasing %s", name)
            engine.release()

    @contextmanager
    def using(self, name: str) -> Iterator[Engine]:
        """The engine for the length of a block; released after it unless engines are resident."""
        engine = self.get(name)
        try:
            yield engine
        finally:
            if not self.resident:
                self.release(name)

    def close(self) -> None:
        for name in list(self.engines):
            self.release(name)
        for resource in (self.scratch, self.stream):
            if resource is not None:
                resource.free() if hasattr(resource, "free") else resource.destroy()
        self.scratch = self.stream = None


def choose_backend(requested: str, manifest: Manifest) -> str:
    """Resolve ``auto`` (TensorRT only when the package has engines built for it) and check names."""
    has_plans = any(_record_backend(record) == "trt" for record in manifest.engines)
    candidates = tuple(b for b in BACKENDS if b != "trt" or has_plans)
    backend = resolve_backend(requested, candidates)
    if requested == "auto":
        log.info("backend auto -> %s", backend)
    return backend


def _record_backend(record: Any) -> str | None:
    return record.get("backend") if isinstance(record, dict) else getattr(record, "backend", None)


def _system_info() -> Any:
    """The running TensorRT version and GPU compute capability, which TensorRT plans must match."""
    from artrt.engines.cuda import device_info
    from artrt.engines.trt import INSTALL_HINT, tensorrt_installed

    from .engine_records import SystemInfo

    if not tensorrt_installed():  # before the import: the stubs alone leave an empty namespace package
        raise EngineError(INSTALL_HINT)
    import tensorrt

    return SystemInfo(tensorrt.__version__, device_info().compute_capability)


def open_engines(
    root: Path, manifest: Manifest, backend: str, threads: int | None = None, cuda_graphs: bool = True,
    resident: bool = True, weights: Callable[[OpenEngines], Mapping[str, Mapping[str, Any]]] | None = None,
) -> OpenEngines:
    """Resolve every component's file on ``backend`` (stale engines are refused here) and, when
    ``resident``, create and activate one engine per component; on failure release what was opened.
    ``weights``: called once the files are known (before any engine opens), it returns the
    initializers to replace per component (LoRA), which every engine of that component gets."""
    options: dict[str, Any] = {}
    stream = None
    if backend == "ort-cpu":
        options = {"threads": threads} if threads else {}
    else:
        from artrt.engines.cuda import Stream

        stream = Stream()
        options = {"stream": stream}
    opened = OpenEngines(backend, {}, {}, stream, resident)
    try:
        system = _system_info() if backend == "trt" else None
        for name, comp in manifest.components.items():
            opened.paths[name] = component_file(root, manifest, name, backend, system=system)
            own = dict(options)
            if backend == "ort-cuda":  # graphs pay off only in the loop, and need every node on the GPU
                own["cuda_graph"] = cuda_graphs and comp.kind == "fused_step"
            if backend == "trt":  # refitting a plan (LoRA) reads base weights from its source graph
                own["source"] = resolve(root, source_onnx(manifest, name))
            opened.options[name] = own
        for name, values in (weights(opened) if weights is not None else {}).items():
            opened.options[name]["weights"] = dict(values)
        if resident:
            for name in manifest.components:
                opened.get(name)
            if backend == "trt":
                _share_scratch(opened)
    except BaseException:
        opened.close()
        raise
    return opened


def _activate(backend: str, path: Path, name: str, options: dict[str, Any]) -> Engine:
    """Activate one engine; an ONNX Runtime graph that cannot be captured runs uncaptured."""
    try:
        return create_engine(backend, path, name=name, **options).activate()
    except GraphCaptureError as exc:
        log.warning("%s: CUDA graph capture unavailable (%s); running it without graphs", name, exc)
        return create_engine(backend, path, name=name, **{**options, "cuda_graph": False}).activate()


def _share_scratch(opened: OpenEngines) -> None:
    from artrt.engines.cuda import DeviceArray

    size = max(engine.scratch_size for engine in opened.engines.values())  # type: ignore[attr-defined]
    opened.scratch = DeviceArray.empty((max(size, 1),), "uint8")
    for engine in opened.engines.values():
        engine.set_scratch(opened.scratch)  # type: ignore[attr-defined]
    log.info("TensorRT engines share %.1f MiB of activation memory", size / 2**20)
