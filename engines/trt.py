"""TensorRT backend: one deserialized plan per component, run on a shared CUDA stream.

The execution context is created with user-managed activation memory: the pipeline
gives every engine the same scratch block (:meth:`TrtEngine.set_scratch`), since the
components run one after another. Bound runs only enqueue work and the engine never
captures a graph itself (``captures_loop``): ``runtime.denoise`` captures the whole
denoising loop into one CUDA graph, after running it once eagerly.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from artrt.errors import EngineError

from .base import Engine, TensorSpec
from .cuda import DeviceArray, Stream
from .onnx_weights import read_initializers

log = logging.getLogger(__name__)

INSTALL_HINT = "TensorRT is not installed (pip install tensorrt-cu12 or -cu13 from NVIDIA's index)"

# Every TensorRT name this module uses, as "Class.member" of the 10.x Python API
# (checked against tensorrt-stubs by the tests; all of them remain in TensorRT 11).
TRT_API_USED = (
    "__version__", "Logger", "Logger.WARNING", "Runtime", "Runtime.deserialize_cuda_engine",
    "ExecutionContextAllocationStrategy.USER_MANAGED", "TensorIOMode.INPUT", "DataType.FLOAT", "DataType.HALF",
    "DataType.INT8", "DataType.INT32", "DataType.INT64", "DataType.UINT8", "DataType.BOOL",
    "ICudaEngine.num_io_tensors", "ICudaEngine.get_tensor_name", "ICudaEngine.get_tensor_mode",
    "ICudaEngine.get_tensor_dtype", "ICudaEngine.get_tensor_shape", "ICudaEngine.get_tensor_profile_shape",
    "ICudaEngine.device_memory_size_v2", "ICudaEngine.create_execution_context",
    "IExecutionContext.set_device_memory", "IExecutionContext.set_input_shape",
    "IExecutionContext.get_tensor_shape", "IExecutionContext.set_tensor_address",
    "IExecutionContext.execute_async_v3", "ICudaEngine.refittable", "Refitter", "Refitter.set_named_weights",
    "Refitter.get_missing_weights", "Refitter.refit_cuda_engine", "Weights",
)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TrtBinding:
    """Input shapes and tensor addresses of one bound configuration (compared by value)."""

    shapes: tuple[tuple[str, Shape], ...]
    addresses: tuple[tuple[str, int], ...]
    buffers: tuple[Any, ...] = field(default=(), compare=False, repr=False)  # keeps them alive


def tensorrt_installed() -> bool:
    """True when the real ``tensorrt`` package is importable (``tensorrt-stubs`` alone makes
    ``tensorrt`` an empty namespace package, which ``find_spec`` reports too)."""
    try:
        spec = importlib.util.find_spec("tensorrt")
    except ValueError:  # a module without a spec is in sys.modules (a test's stand-in)
        return False
    return spec is not None and spec.origin is not None


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise EngineError(INSTALL_HINT) from None
    if not hasattr(tensorrt, "Runtime"):  # the namespace package left by tensorrt-stubs
        raise EngineError(f"{INSTALL_HINT}; only its type stubs are")
    return tensorrt


@functools.cache
def _logger(trt: Any) -> Any:
    """One TensorRT logger per process, at WARNING (it writes to stderr itself)."""
    return trt.Logger(trt.Logger.WARNING)


def _dims(dims: Any) -> Shape:
    return tuple(int(d) for d in dims)  # a TensorRT Dims; -1 marks a dynamic axis


def _numpy_dtypes(trt: Any) -> dict[Any, np.dtype]:
    kinds = {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16, trt.DataType.INT8: np.int8,
             trt.DataType.INT32: np.int32, trt.DataType.INT64: np.int64, trt.DataType.UINT8: np.uint8,
             trt.DataType.BOOL: np.bool_}
    return {key: np.dtype(value) for key, value in kinds.items()}


class TrtEngine(Engine):
    """Runs a TensorRT plan (``.plan``) with cuda-python buffers on one stream."""

    backend = "trt"
    device = "cuda"
    captures_loop = True  # bound runs are plain enqueues: the caller may record them into its graph

    def __init__(self, path: str | Path, name: str | None = None, stream: Stream | None = None,
                 weights: Mapping[str, np.ndarray] | None = None, source: str | Path | None = None) -> None:
        super().__init__(path, name)
        self.stream = stream
        self._own_stream = stream is None
        self.source = Path(source) if source is not None else None  # the ONNX the plan was built from
        self._weights = dict(weights or {})  # replaced initializers (LoRA), refitted at activation
        self._clear()

    def _clear(self) -> None:
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()
        self._profiles: dict[str, tuple[Shape, Shape, Shape]] = {}
        self._scratch: DeviceArray | None = None
        self._own_scratch: DeviceArray | None = None
        self._shapes: tuple[tuple[str, Shape], ...] | None = None  # input shapes set on the context
        self._warm = False  # the context has run since its input shapes last changed
        self._addresses: tuple[tuple[str, int], ...] | None = None  # addresses set on the context
        self._refitted: set[str] = set()  # weights that differ from the plan's own (the source ONNX's)

    # -- life cycle -------------------------------------------------------------
    def _activate(self) -> None:
        trt = _import_tensorrt()
        try:
            plan = self.path.read_bytes()
        except OSError as exc:
            raise EngineError(f"{self.name}: cannot read TensorRT plan {self.path}: {exc.strerror}") from None
        self._runtime = trt.Runtime(_logger(trt))
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineError(
                f"{self.name}: TensorRT {trt.__version__} cannot load {self.path}: built with another "
                "TensorRT version or for another GPU (rebuild it: artrt build --rebuild)"
            )
        context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise EngineError(f"{self.name}: TensorRT could not create an execution context for {self.path}")
        self._engine, self._context = engine, context
        self._read_specs(trt)
        self.stream = self.stream or Stream()
        if self._weights:
            self._refit(trt)
        log.debug("%s: TensorRT %s plan %s, %d bytes of activation memory",
                  self.name, trt.__version__, self.path, engine.device_memory_size_v2)

    def _read_specs(self, trt: Any) -> None:
        engine, dtypes = self._engine, _numpy_dtypes(trt)
        inputs, outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = engine.get_tensor_dtype(name)
            if dtype not in dtypes:
                raise EngineError(f"{self.name}: tensor {name!r} has unsupported TensorRT type {dtype}")
            dims = _dims(engine.get_tensor_shape(name))
            shape = tuple(f"{name}.{axis}" if d < 0 else d for axis, d in enumerate(dims))
            spec = TensorSpec(name, dtypes[dtype], shape)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(spec)
                low, opt, high = engine.get_tensor_profile_shape(name, 0)
                self._profiles[name] = (_dims(low), _dims(opt), _dims(high))
            else:
                outputs.append(spec)
        self._inputs, self._outputs = tuple(inputs), tuple(outputs)

    def _release(self) -> None:
        if self._own_scratch is not None:
            self._own_scratch.free()
        if self._own_stream and self.stream is not None:
            self.stream.destroy()
            self.stream = None
        self._clear()  # the context goes before the engine, the engine before the runtime

    # -- weights (LoRA) ----------------------------------------------------------
    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Run with ``weights`` (ONNX initializer name -> values in the source graph's dtype and
        layout) in place of the plan's; every other weight is the source ONNX's, and ``{}`` restores
        them all. Refits the engine in place: the plan must be built refittable
        (``artrt build --refittable``). Captured CUDA graphs must be captured again afterwards."""
        self._weights = {name: np.ascontiguousarray(array) for name, array in weights.items()}
        if self._active:
            self._refit(_import_tensorrt())

    def _refit(self, trt: Any) -> None:
        """Refit the changed weights: the new ones, the base value of every weight refitted before and
        not now (never a delta on a delta), and whatever TensorRT reports missing, from the source ONNX."""
        if not self._engine.refittable:
            raise EngineError(f"{self.name}: {self.path} was not built refittable; LoRA on TensorRT needs "
                              "artrt build --backend trt --refittable --rebuild")
        if self.source is None:
            raise EngineError(f"{self.name}: refitting {self.path} needs the ONNX it was built from")
        base = read_initializers(self.source)
        values = dict(self._weights)
        values.update({name: base[name].read() for name in self._refitted - set(values)})
        if self.stream is not None:
            self.stream.synchronize()  # refit_cuda_engine must not overlap queued work
        refitter = trt.Refitter(self._engine, _logger(trt))
        kept = []  # TensorRT reads the arrays until refit_cuda_engine returns
        for _ in range(2):  # the weights asked for, then those TensorRT stored combined with them
            for name, array in values.items():
                kept.append(array)
                if not refitter.set_named_weights(name, trt.Weights(array)):
                    raise EngineError(f"{self.name}: TensorRT rejected weights {name!r} ({array.dtype}"
                                      f"{list(array.shape)}) for {self.path.name}")
            missing = [n for n in refitter.get_missing_weights() if n]
            unknown = [n for n in missing if n not in base]
            if unknown:
                raise EngineError(f"{self.name}: TensorRT needs weights {unknown[0]!r}, which {self.source.name} "
                                  "does not hold")
            values = {name: base[name].read() for name in missing}
        if values or not refitter.refit_cuda_engine():
            raise EngineError(f"{self.name}: TensorRT could not refit {self.path.name} (see its log above)")
        self._refitted = set(self._weights)
        log.info("%s: refitted %d weights", self.name, len(self._weights))

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        self._require_active()
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        self._require_active()
        return self._outputs

    # -- activation memory ------------------------------------------------------
    @property
    def scratch_size(self) -> int:
        """Bytes of activation memory the context needs (``device_memory_size_v2``)."""
        self._require_active()
        return int(self._engine.device_memory_size_v2)

    def set_scratch(self, scratch: DeviceArray) -> None:
        """Use ``scratch`` (shared with other engines that never run at the same time) as
        activation memory. Graphs captured before the change keep using the old block."""
        needed = self.scratch_size
        if scratch.nbytes < needed:
            raise EngineError(f"{self.name}: scratch block of {scratch.nbytes} bytes, TensorRT needs {needed}")
        self._context.set_device_memory(scratch.ptr, scratch.nbytes)
        self._scratch = scratch
        if self._own_scratch is not None and self._own_scratch is not scratch:
            self._own_scratch.free()
            self._own_scratch = None

    def _ensure_scratch(self) -> None:
        if self._scratch is None:  # used alone, not from a pipeline: take a private block
            self._own_scratch = DeviceArray.empty((max(self.scratch_size, 1),), np.uint8)
            self.set_scratch(self._own_scratch)

    # -- running ----------------------------------------------------------------
    def _bind(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> TrtBinding:
        for name, array in {**inputs, **outputs}.items():
            if not hasattr(array, "ptr"):
                raise EngineError(f"{self.name}: TensorRT binds DeviceArrays, got {type(array).__name__} for {name!r}")
        shapes = tuple((spec.name, tuple(inputs[spec.name].shape)) for spec in self._inputs)
        expected = self._output_shapes(shapes)
        for spec in self._outputs:
            array = outputs[spec.name]
            if tuple(array.shape) != expected[spec.name] or array.dtype != spec.dtype:
                raise EngineError(
                    f"{self.name}: output {spec.name!r} bound as {array.dtype}{list(array.shape)}, "
                    f"engine writes {spec.dtype}{list(expected[spec.name])}"
                )
        tensors = [*self._inputs, *self._outputs]
        arrays = {**inputs, **outputs}
        addresses = tuple((spec.name, int(arrays[spec.name].ptr)) for spec in tensors)
        return TrtBinding(shapes, addresses, tuple(arrays[spec.name] for spec in tensors))

    def _output_shapes(self, shapes: tuple[tuple[str, Shape], ...]) -> dict[str, Shape]:
        """Check input shapes against the profile, set them, and read the output shapes."""
        for name, shape in shapes:
            low, opt, high = self._profiles[name]
            if len(shape) != len(low) or any(not lo <= n <= hi for lo, n, hi in zip(low, shape, high)):
                raise EngineError(
                    f"{self.name}: input {name!r} has shape {list(shape)}, outside the engine's profile "
                    f"(min {list(low)}, opt {list(opt)}, max {list(high)}); rebuild with: artrt build"
                )
        self._set_input_shapes(shapes)
        result = {}
        for spec in self._outputs:
            shape = _dims(self._context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise EngineError(f"{self.name}: output {spec.name!r} has a data-dependent shape {list(shape)}")
            result[spec.name] = shape
        return result

    def _set_input_shapes(self, shapes: tuple[tuple[str, Shape], ...]) -> None:
        if shapes == self._shapes:
            return
        for name, shape in shapes:
            if not self._context.set_input_shape(name, shape):
                raise EngineError(f"{self.name}: TensorRT rejected shape {list(shape)} for input {name!r}")
        self._shapes, self._warm = shapes, False

    def _run_bound(self, binding: TrtBinding) -> None:
        if self._context is None:
            raise EngineError(f"{self.name}: engine is not active; call activate() first")
        self._ensure_scratch()
        capturing = getattr(self.stream, "capturing", False)
        if capturing and not (self._warm and binding.shapes == self._shapes):
            raise EngineError(
                f"{self.name}: TensorRT must run once with these input shapes, outside capture, before a "
                "CUDA graph captures it (run the steps eagerly and synchronise first, as runtime.denoise does)"
            )
        self._set_input_shapes(binding.shapes)
        if binding.addresses != self._addresses:
            self._addresses = None
            for name, ptr in binding.addresses:
                if not self._context.set_tensor_address(name, ptr):
                    raise EngineError(f"{self.name}: TensorRT rejected address {ptr:#x} for tensor {name!r}")
            self._addresses = binding.addresses
        if not self._context.execute_async_v3(self.stream.handle):
            raise EngineError(f"{self.name}: TensorRT failed to enqueue {self.path.name} (see its log above)")
        self._warm = self._warm or not capturing

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays: dict[str, DeviceArray] = {}
        try:
            hosts = {spec.name: np.ascontiguousarray(inputs[spec.name]) for spec in self._inputs}
            shapes = tuple((name, tuple(host.shape)) for name, host in hosts.items())
            out_shapes = self._output_shapes(shapes)
            for name, host in hosts.items():
                arrays[name] = DeviceArray.empty(host.shape, host.dtype)
                arrays[name].upload(host, self.stream)
            for spec in self._outputs:
                arrays[spec.name] = DeviceArray.empty(out_shapes[spec.name], spec.dtype)
            addresses = tuple((name, array.ptr) for name, array in arrays.items())
            self._run_bound(TrtBinding(shapes, addresses))
            return {spec.name: arrays[spec.name].download(self.stream) for spec in self._outputs}
        finally:
            if self.stream is not None and arrays:
                self.stream.synchronize()
            for array in arrays.values():
                array.free()
            self._addresses = None  # they pointed at the temporaries

