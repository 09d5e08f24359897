"""Loop buffers in GPU memory: the device twin of ``denoise.HostMemory``.

Writes are asynchronous uploads on the pipeline's stream (the host arrays are kept
alive until the next synchronising read), row copies are device-to-device copies, and
timing marks are CUDA events, so the loop never waits for the GPU until the final
latents are read back.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class DeviceMemory:
    """Allocates ``DeviceArray``s and orders every transfer on one stream."""

    def __init__(self, stream: Any) -> None:
        from artrt.engines import cuda

        self._cuda = cuda
        self.stream = stream
        self._pending: list[np.ndarray] = []  # host sources of in-flight uploads

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self._cuda.DeviceArray.empty(shape, np.dtype(dtype))

    def write(self, dst: Any, src: np.ndarray) -> None:
        host = np.ascontiguousarray(src, dtype=dst.dtype)
        self._pending.append(host)
        dst.upload(host, self.stream)

    def copy_row(self, dst: Any, table: Any, row: int) -> None:
        dst.copy_from(table.row(row), self.stream)

    def read(self, src: Any) -> np.ndarray:
        host = src.download(self.stream)  # synchronises the stream
        self._pending.clear()
        return host

    def mark(self) -> Any:
        event = self._cuda.Event()
        event.record(self.stream)
        return event

    def seconds(self, start: Any, end: Any) -> float:
        return end.elapsed_ms(start) / 1000.0

    def capture(self) -> Any:
        """Context manager capturing the work enqueued on the stream into a CUDA graph."""
        return self._cuda.CudaGraph.capture(self.stream)
