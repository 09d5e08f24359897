"""cuda-python helpers shared by the GPU engines: device memory, streams, events, graphs.

cuda-python is imported on first use, so this module imports without it. Every call
goes through :func:`check`, which turns cuda-python's ``(err, *values)`` results into
values or an :class:`EngineError` naming the call. Device memory, streams, events and
graphs are released by ``free()`` / ``destroy()`` or, failing that, when garbage
collected (never at interpreter exit, when the driver may already be gone).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from artrt.errors import EngineError


@functools.cache
def cudart() -> Any:
    """The cuda-python runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # type: ignore[no-redef]
        except ImportError:
            raise EngineError("cuda-python is not installed (pip install cuda-python)") from None
    return runtime


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-python result: None, the single value, or a tuple of values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", None) or f"cudaError {int(err)}"
        raise EngineError(f"{what}: {name} ({int(err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _release(call: Callable[..., Any], handle: Any) -> None:
    """Finalizer body: free a handle, ignoring errors (the context may be gone)."""
    try:
        call(handle)
    except Exception:  # never raise from a finalizer
        pass


def _finalizer(owner: object, call: Callable[..., Any], handle: Any) -> weakref.finalize:
    finalizer = weakref.finalize(owner, _release, call, handle)
    finalizer.atexit = False
    return finalizer


def gpu_available() -> bool:
    """True when cuda-python, a driver and at least one CUDA device are present; never raises."""
    try:
        return check(cudart().cudaGetDeviceCount(), "cudaGetDeviceCount") > 0
    except Exception:
        return False


@dataclass(frozen=True)
class DeviceInfo:
    """What engines are built for: the GPU's name, compute capability ("9.0") and memory in bytes."""

    name: str
    compute_capability: str
    total_memory: int


def device_info(device: int = 0) -> DeviceInfo:
    props = check(cudart().cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})")
    name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(name, f"{props.major}.{props.minor}", int(props.totalGlobalMem))


class Stream:
    """A CUDA stream (a blocking one, so legacy-stream copies still order after its work).

    ``capturing`` is True while :meth:`CudaGraph.capture` records it; engines and
    :class:`Event` read it instead of asking the driver on every call.
    """

    def __init__(self) -> None:
        self._stream = check(cudart().cudaStreamCreate(), "cudaStreamCreate")
        self.handle = int(self._stream)
        self.capturing = False
        self._finalize = _finalizer(self, cudart().cudaStreamDestroy, self._stream)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def destroy(self) -> None:
        self._finalize()


class Event:
    """A timing event. Recorded while its stream is being captured, it becomes an event
    node of the graph (``cudaEventRecordExternal``), so graph replays still time segments."""

    def __init__(self) -> None:
        self._event = check(cudart().cudaEventCreate(), "cudaEventCreate")
        self._finalize = _finalizer(self, cudart().cudaEventDestroy, self._event)

    def record(self, stream: Stream) -> None:
        rt = cudart()
        if getattr(stream, "capturing", False):
            check(rt.cudaEventRecordWithFlags(self._event, stream.handle, rt.cudaEventRecordExternal),
                  "cudaEventRecordWithFlags")
        else:
            check(rt.cudaEventRecord(self._event, stream.handle), "cudaEventRecord")

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds from ``start`` to this event (waits for this event to complete)."""
        check(cudart().cudaEventSynchronize(self._event), "cudaEventSynchronize")
        return float(check(cudart().cudaEventElapsedTime(start._event, self._event), "cudaEventElapsedTime"))

    def destroy(self) -> None:
        self._finalize()


class DeviceArray:
    """A C-contiguous array in device memory; ``row(i)`` views never free their memory."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: Any, base: DeviceArray | None = None) -> None:
        self.ptr = int(ptr)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self._base = base  # keeps the owner of a view alive
        self._finalize: weakref.finalize | None = None

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: Any) -> DeviceArray:
        """Allocate uninitialised device memory (``cudaMalloc``, 256-byte aligned)."""
        shape = tuple(int(n) for n in shape)
        if any(n < 0 for n in shape):
            raise EngineError(f"cannot allocate a device array of shape {shape}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        ptr = check(cudart().cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes} bytes)")
        array = cls(ptr, shape, dtype)
        array._finalize = _finalizer(array, cudart().cudaFree, ptr)
        return array

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __repr__(self) -> str:
        kind = "view" if self._base is not None else "array"
        return f"DeviceArray({kind}, shape={self.shape}, dtype={self.dtype}, ptr={self.ptr:#x})"

    def upload(self, host: np.ndarray, stream: Stream | None = None) -> None:
        """Copy a host array of the same shape and dtype in. With a stream the copy is
        asynchronous: keep ``host`` alive and unchanged until the stream synchronises."""
        if host.shape != self.shape or host.dtype != self.dtype:
            raise EngineError(f"upload of {host.dtype}{list(host.shape)} into {self.dtype}{list(self.shape)}")
        if not host.flags.c_contiguous:
            raise EngineError("upload needs a C-contiguous host array")
        self._copy(self.ptr, host.ctypes.data, "cudaMemcpyHostToDevice", stream)

    def download(self, stream: Stream | None = None) -> np.ndarray:
        """Copy to a new host array; synchronises ``stream`` (all earlier work on it is done)."""
        host = np.empty(self.shape, self.dtype)
        self._copy(host.ctypes.data, self.ptr, "cudaMemcpyDeviceToHost", stream)
        if stream is not None:
            stream.synchronize()
        return host

    def copy_from(self, other: DeviceArray, stream: Stream) -> None:
        """Enqueue a device-to-device copy of ``other`` (same shape and dtype) into this array."""
        if other.shape != self.shape or other.dtype != self.dtype:
            raise EngineError(f"copy of {other.dtype}{list(other.shape)} into {self.dtype}{list(self.shape)}")
        self._copy(self.ptr, other.ptr, "cudaMemcpyDeviceToDevice", stream)

    def row(self, i: int) -> DeviceArray:
        """A non-owning view of ``self[i]`` along the first axis."""
        if not self.shape or not 0 <= i < self.shape[0]:
            raise EngineError(f"row {i} out of range for a device array of shape {self.shape}")
        size = self.nbytes // self.shape[0]
        return DeviceArray(self.ptr + i * size, self.shape[1:], self.dtype, base=self)

    def free(self) -> None:
        """Release the memory now (a no-op on views and on arrays already freed)."""
        if self._finalize is not None:
            self._finalize()

    def __enter__(self) -> DeviceArray:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def _copy(self, dst: int, src: int, kind: str, stream: Stream | None) -> None:
        if self._finalize is not None and not self._finalize.alive:
            raise EngineError("device array used after free()")
        if self.nbytes == 0:
            return
        rt = cudart()
        memcpy_kind = getattr(rt.cudaMemcpyKind, kind)
        if stream is None:
            check(rt.cudaMemcpy(dst, src, self.nbytes, memcpy_kind), f"cudaMemcpy ({kind})")
        else:
            check(rt.cudaMemcpyAsync(dst, src, self.nbytes, memcpy_kind, stream.handle), f"cudaMemcpyAsync ({kind})")


class CudaGraph:
    """A captured, instantiated CUDA graph: ``with CudaGraph.capture(stream) as graph: ...``
    then ``graph.launch(stream)``. The graph replays the captured work on the device
    addresses it was captured with: drop it when those buffers are freed or replaced."""

    def __init__(self) -> None:
        self._exec: Any = None
        self._finalize: weakref.finalize | None = None

    @classmethod
    @contextmanager
    def capture(cls, stream: Stream) -> Iterator[CudaGraph]:
        """Record the work enqueued on ``stream`` in the body instead of running it.

        Thread-local mode: a call from this thread that is unsafe during capture (a
        synchronisation, ``cudaMalloc``) ends the capture with an error, while other
        threads may keep using the GPU. The graph is usable after the ``with`` block.
        """
        rt = cudart()
        graph = cls()
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt.cudaStreamBeginCapture(stream.handle, mode), "cudaStreamBeginCapture")
        stream.capturing = True
        try:
            yield graph
        except BaseException:
            stream.capturing = False
            raw = rt.cudaStreamEndCapture(stream.handle)
            if int(raw[0]) == 0 and raw[1] is not None:
                rt.cudaGraphDestroy(raw[1])
            raise
        stream.capturing = False
        template = check(rt.cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")
        try:
            graph._exec = check(rt.cudaGraphInstantiate(template, 0), "cudaGraphInstantiate")
        finally:
            rt.cudaGraphDestroy(template)  # the executable graph is independent of its template
        graph._finalize = _finalizer(graph, rt.cudaGraphExecDestroy, graph._exec)

    def launch(self, stream: Stream) -> None:
        """Enqueue one replay of the graph on ``stream``."""
        if self._finalize is None or not self._finalize.alive:
            raise EngineError("CUDA graph launched before capture finished or after free()")
        check(cudart().cudaGraphLaunch(self._exec, stream.handle), "cudaGraphLaunch")

    def free(self) -> None:
        if self._finalize is not None:
            self._finalize()
