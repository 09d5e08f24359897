"""ONNX Runtime backend on the CPU execution provider."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from artrt.errors import EngineError

from .base import Engine, TensorSpec
from .onnx_weights import check_weights, patched_bytes, read_initializers

# Where a session created from bytes finds the graph's external data (onnxruntime_session_options_config_keys.h)
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
# Session log level (0 verbose .. 3 error, 4 fatal): a failed run's message reaches the caller in
# the exception (EngineError), so ORT's own coloured error log would only print it twice; runs
# log at their session's level unless RunOptions.log_severity_level says otherwise.
SESSION_LOG_LEVEL = 4

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
    """What the ONNX Runtime backends share: a session and the tensors it describes, and weights
    that replace some of the graph's initializers (LoRA, :meth:`set_weights`).

    Replaced weights are given to the session before its graph optimizations run, so they see
    the new values exactly as if the file held them: embedded initializers are replaced in a
    copy of the file's bytes (:func:`~artrt.engines.onnx_weights.patched_bytes`), external ones
    with ``SessionOptions.add_external_initializers``. (``add_initializer`` is not used: ONNX
    Runtime applies it after the layout optimizations, which then keep the file's values of
    convolution weights.)
    """

    _session: Any = None
    _weights: dict[str, np.ndarray] = {}
    _weight_values: list[Any] = []  # OrtValues the session reads: they live as long as it

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Run with ``weights`` (initializer name -> values in the graph's dtype and shape) in place
        of the graph's own; every other initializer keeps the file's value, and ``{}`` restores the
        file exactly. An active engine gets a new session (checked first: on error it keeps its old one)."""
        weights = {name: np.ascontiguousarray(array) for name, array in weights.items()}
        if weights:
            check_weights(self.path, read_initializers(self.path), weights)
        self._weights = weights
        if self._active:
            self.release()
            self.activate()

    def _model(self, options: Any) -> str | bytes:
        """What to create the session from: the file, or its bytes with the replaced weights."""
        import onnxruntime as ort

        self._weight_values = []
        if not self._weights:
            return str(self.path)
        index = read_initializers(self.path)
        check_weights(self.path, index, self._weights)
        external = [name for name in self._weights if index[name].external]
        if external:
            self._weight_values = [ort.OrtValue.ortvalue_from_numpy(self._weights[n]) for n in external]
            options.add_external_initializers(external, self._weight_values)
        if len(external) == len(self._weights):
            return str(self.path)
        if any(init.external for init in index.values()):  # the bytes need the folder of their external data
            options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(self.path.parent))
        return patched_bytes(self.path, index, self._weights)

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
        self, path: str | Path, name: str | None = None, threads: int | None = None, spin: bool = False,
        weights: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__(path, name)
        self.threads = threads or default_threads()
        self.spin = spin
        self._session: Any = None
        self._weights = dict(weights or {})

    def _activate(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = SESSION_LOG_LEVEL
        model = self._model(options)
        try:
            self._session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise EngineError(f"{self.name}: onnxruntime could not load {self.path}: {exc}") from None

    def _release(self) -> None:
        self._session = None
        self._weight_values = []

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
