"""ONNX Runtime backend on the CPU execution provider."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from artrt.errors import EngineError

from .base import Engine, TensorSpec

_ORT_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
}


def default_threads() -> int:
    """Intra-op threads: one per available core (ORT's own default counts hyperthreads)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def max_threads() -> int:
    """The most intra-op threads worth asking for: the machine's logical CPUs."""
    return os.cpu_count() or 1


class OrtSessionEngine(Engine):
    """What the ONNX Runtime backends share: a session and the tensors it describes."""

    _session: Any = None

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        self._require_active()
        return tuple(tensor_spec(node) for node in self._session.get_inputs())

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        self._require_active()
        return tuple(tensor_spec(node) for node in self._session.get_outputs())


class OrtCpuEngine(OrtSessionEngine):
    """Runs an ONNX file with ``onnxruntime`` on the CPU.

    Bound runs use IO binding on the caller's numpy buffers, so a denoising step
    neither allocates nor copies its inputs and outputs.

    The intra-op worker threads block between parallel sections instead of spinning
    (``spin=False``, ONNX Runtime spins by default): when other processes share the
    cores, spinning workers take CPU time from the thread that has work, and a package
    has one pool per component. Measured on a 2-core machine: end to end 1.5x faster on
    the tiny random SDXL pair with a training job beside it, 1.43x on a quiet machine
    (docs/benchmarks.md).
    """

    backend = "ort-cpu"

    def __init__(
        self, path: str | Path, name: str | None = None, threads: int | None = None, spin: bool = False
    ) -> None:
        super().__init__(path, name)
        self.threads = threads or default_threads()
        self.spin = spin
        self._session: Any = None

    def _activate(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise EngineError(f"{self.name}: onnxruntime could not load {self.path}: {exc}") from None

    def _release(self) -> None:
        self._session = None

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self._session.get_outputs()]
        try:
            values = self._session.run(names, dict(inputs))
        except Exception as exc:
            raise EngineError(f"{self.name}: onnxruntime failed: {exc}") from None
        return dict(zip(names, values))

    def _bind(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> Any:
        binding = self._session.io_binding()
        # Bind by pointer: ORT then reads and writes the caller's memory in place
        # (bind_cpu_input would copy the input once, at bind time).
        for name, array in inputs.items():
            binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        for name, array in outputs.items():
            binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        return binding

    def _run_bound(self, binding: Any) -> None:
        try:
            self._session.run_with_iobinding(binding)
        except Exception as exc:
            raise EngineError(f"{self.name}: onnxruntime failed: {exc}") from None


def tensor_spec(node: Any) -> TensorSpec:
    """An ONNX Runtime NodeArg as a TensorSpec."""
    if node.type not in _ORT_TYPES:
        raise EngineError(f"graph tensor {node.name!r} has unsupported type {node.type}")
    shape = tuple(d if isinstance(d, int) else str(d) for d in node.shape)
    return TensorSpec(node.name, _ORT_TYPES[node.type], shape)
