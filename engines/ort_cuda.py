"""ONNX Runtime backend on the CUDA execution provider: IO binding on device buffers, CUDA graphs.

A session runs on the pipeline's :class:`~artrt.engines.cuda.Stream` (provider option
``user_compute_stream``). :meth:`OrtCudaEngine.bind` binds :class:`~artrt.engines.cuda.DeviceArray`
buffers by pointer, and with ``cuda_graph`` each distinct set of buffers (names, pointers,
shapes, dtypes) gets its own ``gpu_graph_id``: ONNX Runtime owns the capture, and a
captured graph replays on the addresses it captured, so an id is never reused for other
buffers. Host arrays (:meth:`run`) take the ordinary path (``gpu_graph_id`` -1).

Synchronisation. ORT ends a run with ``cudaStreamSynchronize`` on its compute stream
unless the run option ``disable_synchronize_execution_providers`` is ``"1"``
(onnxruntime_run_options_config_keys.h); bound runs on a caller's stream set it, so
:meth:`run_bound` only enqueues. Exceptions: the first bound run of a new graph id runs
the graph ordinarily (to size ORT's arena), captures it and replays it inside that one
call, and capture begins with a stream synchronisation; and ORT releases without
microsoft/onnxruntime#28686 (merged 2026-05; issue #20392) synchronise after every replay.
Measured with onnxruntime-gpu 1.31.1 on an H100: with 86 ms of work queued ahead, a bound
run without graphs returned in 5-8 ms (its own kernel launches), the first graph run in
96-98 ms (it waited), and every later replay in 0.13-0.25 ms. IOBinding's
``synchronize_inputs/outputs`` are not called: inputs are written on the same stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from artrt.errors import EngineError, GraphCaptureError

from .ort import SESSION_LOG_LEVEL, OrtSessionEngine

CUDA_EP = "CUDAExecutionProvider"
GRAPH_ID_KEY = "gpu_graph_id"  # run option: which captured graph a run uses; -1 = none
NO_SYNC_KEY = "disable_synchronize_execution_providers"  # run option: "1" = only enqueue
NO_GRAPH = -1

GraphKey = tuple[tuple[str, str, int, tuple[int, ...], str], ...]


def cuda_provider_options(device_id: int = 0, stream: int = 0, cuda_graph: bool = True) -> dict[str, str]:
    """CUDA EP options (as strings, the form ONNX Runtime parses) for one session.

    ``stream`` is a ``cudaStream_t`` handle; 0 leaves ORT on its own stream.
    """
    options = {
        "device_id": str(device_id),
        "enable_cuda_graph": "1" if cuda_graph else "0",
        # Shapes are fixed per binding, so the exhaustive cuDNN search pays for itself in the warm-up runs.
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        # Grow the arena by what is asked: experts stay resident, so no power-of-two slack per session.
        "arena_extend_strategy": "kSameAsRequested",
    }
    if stream:
        # The Python API derives has_user_compute_stream from user_compute_stream (ORT PR #19229);
        # set both so the intent reads the same through the C API's names.
        options["has_user_compute_stream"] = "1"
        options["user_compute_stream"] = str(int(stream))
    return options


def graph_key(inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> GraphKey:
    """What a captured graph depends on: each bound name's pointer, shape and dtype."""
    def entries(kind: str, arrays: Mapping[str, Any]) -> list[tuple[str, str, int, tuple[int, ...], str]]:
        return [(kind, n, int(a.ptr), tuple(int(d) for d in a.shape), np.dtype(a.dtype).str) for n, a in arrays.items()]

    return tuple(sorted(entries("in", inputs) + entries("out", outputs)))


def _check_no_overlap(name: str, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
    """Outputs must not alias inputs: ORT runs a new graph id several times in its first call."""
    def span(a: Any) -> tuple[int, int]:
        return int(a.ptr), int(a.ptr) + int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize

    for out_name, out in outputs.items():
        lo, hi = span(out)
        for in_name, array in inputs.items():
            start, end = span(array)
            if start < hi and lo < end:
                raise EngineError(f"{name}: output {out_name!r} overlaps input {in_name!r} in device memory")


@dataclass(frozen=True)
class CudaBinding:
    """Device buffers bound to one session, with the run options that select their graph."""

    io: Any  # onnxruntime.IOBinding
    run_options: Any  # onnxruntime.RunOptions
    graph_id: int  # -1 when CUDA graphs are off


class OrtCudaEngine(OrtSessionEngine):
    """Runs an (fp16, optionally CUDA-fused) ONNX file with ONNX Runtime's CUDA EP."""

    backend = "ort-cuda"
    device = "cuda"
    captures_loop = False  # ONNX Runtime owns capture (one graph per gpu_graph_id), never a caller's

    def __init__(
        self, path: str | Path, name: str | None = None, stream: Any = None,
        cuda_graph: bool = True, device_id: int = 0, weights: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__(path, name)
        self._weights = dict(weights or {})  # replaced initializers (LoRA): OrtSessionEngine.set_weights
        self.stream = stream  # an engines.cuda.Stream shared by the pipeline's engines
        self.cuda_graph = cuda_graph
        self.device_id = device_id
        self._session: Any = None
        self._graph_ids: dict[GraphKey, int] = {}

    # -- life cycle -------------------------------------------------------------
    def _activate(self) -> None:
        import onnxruntime as ort

        if CUDA_EP not in ort.get_available_providers():
            raise self._no_cuda_ep(ort)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = SESSION_LOG_LEVEL
        stream = int(self.stream.handle) if self.stream is not None else 0
        providers = [(CUDA_EP, cuda_provider_options(self.device_id, stream, self.cuda_graph)), "CPUExecutionProvider"]
        model = self._model(options)
        try:
            session = ort.InferenceSession(model, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            if self.cuda_graph and "graph capture" in str(exc):  # its refusal to capture this graph
                raise GraphCaptureError(f"{self.name}: onnxruntime cannot capture {self.path} into a CUDA graph "
                                        f"(every node must run on the CUDA EP): {exc}") from None
            raise EngineError(f"{self.name}: onnxruntime could not load {self.path} on CUDA: {exc}") from None
        if session.get_providers()[:1] != [CUDA_EP]:
            raise self._no_cuda_ep(ort, session.get_providers())
        self._session = session
        self._graph_ids.clear()

    def _release(self) -> None:
        self._session = None  # captured graphs belong to the session and go with it
        self._graph_ids.clear()
        self._weight_values = []

    def _no_cuda_ep(self, ort: Any, got: list[str] | None = None) -> EngineError:
        session = f"; the session got {got}" if got is not None else ""
        return EngineError(
            f"{self.name}: onnxruntime-gpu with a working CUDA EP is required for ort-cuda; installed "
            f"onnxruntime {ort.__version__} has providers {ort.get_available_providers()}{session}"
        )

    # -- running ----------------------------------------------------------------
    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in and out: ORT copies them over and synchronises; never a graph (shapes vary)."""
        import onnxruntime as ort

        names = [o.name for o in self._session.get_outputs()]
        run_options = ort.RunOptions()
        run_options.add_run_config_entry(GRAPH_ID_KEY, str(NO_GRAPH))
        try:
            values = self._session.run(names, dict(inputs), run_options)
        except Exception as exc:
            raise EngineError(f"{self.name}: onnxruntime failed: {exc}") from None
        return dict(zip(names, values))

    def _bind(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> CudaBinding:
        import onnxruntime as ort

        _check_no_overlap(self.name, inputs, outputs)
        graph_id = self.graph_id(graph_key(inputs, outputs))
        io = self._session.io_binding()
        try:
            for name, array in inputs.items():
                io.bind_input(name, "cuda", self.device_id, array.dtype, list(array.shape), int(array.ptr))
            for name, array in outputs.items():
                io.bind_output(name, "cuda", self.device_id, array.dtype, list(array.shape), int(array.ptr))
        except Exception as exc:
            raise EngineError(f"{self.name}: onnxruntime could not bind device buffers: {exc}") from None
        run_options = ort.RunOptions()
        run_options.add_run_config_entry(GRAPH_ID_KEY, str(graph_id))
        if self.stream is not None:  # on ORT's own stream the caller could not wait: let ORT synchronise
            run_options.add_run_config_entry(NO_SYNC_KEY, "1")
        return CudaBinding(io, run_options, graph_id)

    def graph_id(self, key: GraphKey) -> int:
        """The ``gpu_graph_id`` for a set of buffers: the same buffers keep their id, new
        ones get the next (from 1: 0 is ORT's id for runs that set none); -1 without graphs."""
        if not self.cuda_graph:
            return NO_GRAPH
        return self._graph_ids.setdefault(key, len(self._graph_ids) + 1)

    def _run_bound(self, binding: CudaBinding) -> None:
        if binding.graph_id != NO_GRAPH and getattr(self.stream, "capturing", False):
            raise EngineError(f"{self.name}: ort-cuda captures its own CUDA graphs and cannot run inside "
                              "another capture on its stream")
        try:
            self._session.run_with_iobinding(binding.io, binding.run_options)
        except Exception as exc:
            raise EngineError(f"{self.name}: onnxruntime failed: {exc}") from None


__all__ = ["CudaBinding", "OrtCudaEngine", "cuda_provider_options", "graph_key"]
