"""The engine interface every backend implements.

An engine runs one exported component. Its life cycle is ``activate`` (load the
graph, create sessions and device state), ``run`` / ``run_bound`` any number of
times, then ``release``; it is also a context manager. Hot loops bind fixed host
buffers once with :meth:`Engine.bind` and call :meth:`Engine.run_bound` per step, so
no step allocates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from artrt.errors import EngineError


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: symbolic dimensions are strings."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str, ...]


class Engine(ABC):
    """One component on one backend. Subclasses implement the ``_`` methods."""

    backend: str = ""
    device: str = "cpu"  # "cuda" engines bind DeviceArrays and enqueue asynchronously
    captures_loop: bool = False
    """The engine's bound runs may be recorded into a caller's CUDA graph: ``run_bound``
    only enqueues on the caller's stream and captures nothing itself, so the whole
    denoising loop can become one graph (TensorRT). False for ONNX Runtime CUDA, which
    captures its own graphs, and for CPU engines."""

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.stem
        self._active = False

    # -- life cycle -------------------------------------------------------------
    def activate(self) -> Engine:
        if not self._active:
            self._activate()
            self._active = True
        return self

    def release(self) -> None:
        if self._active:
            self._release()
            self._active = False

    def __enter__(self) -> Engine:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- description ------------------------------------------------------------
    @property
    @abstractmethod
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    @abstractmethod
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    # -- running ----------------------------------------------------------------
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on host arrays; returns newly allocated outputs."""
        self._require_active()
        self._check_inputs(inputs)
        return self._run(inputs)

    def bind(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> Any:
        """Bind buffers for repeated runs: numpy arrays on CPU engines, DeviceArrays on
        CUDA ones. They must stay alive and in place; :meth:`run_bound` reads their
        current contents and writes the outputs into them."""
        self._require_active()
        self._check_inputs(inputs)
        missing = {o.name for o in self.outputs} - set(outputs)
        if missing:
            raise EngineError(f"{self.name}: no buffer bound for output(s) {sorted(missing)}")
        for name, array in {**inputs, **outputs}.items():
            if isinstance(array, np.ndarray) and not array.flags.c_contiguous:
                raise EngineError(f"{self.name}: buffer {name!r} must be C-contiguous")
        return self._bind(inputs, outputs)

    def run_bound(self, binding: Any) -> None:
        """Run on bound buffers. CPU engines return when done; CUDA engines only enqueue
        on their stream (the caller synchronises)."""
        self._run_bound(binding)

    # -- helpers for subclasses -------------------------------------------------
    def _require_active(self) -> None:
        if not self._active:
            raise EngineError(f"{self.name}: engine is not active; call activate() first")

    def _check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        expected = {spec.name: spec for spec in self.inputs}
        unknown = set(inputs) - set(expected)
        missing = set(expected) - set(inputs)
        if unknown or missing:
            raise EngineError(
                f"{self.name}: inputs do not match the graph "
                f"(missing {sorted(missing)}, unexpected {sorted(unknown)})"
            )
        for name, array in inputs.items():
            spec = expected[name]
            if array.dtype != spec.dtype:
                raise EngineError(f"{self.name}: input {name!r} is {array.dtype}, graph wants {spec.dtype}")
            if len(array.shape) != len(spec.shape) or any(
                isinstance(d, int) and d != n for d, n in zip(spec.shape, array.shape)
            ):
                raise EngineError(
                    f"{self.name}: input {name!r} has shape {array.shape}, graph wants {spec.shape}"
                )

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _release(self) -> None: ...

    @abstractmethod
    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _bind(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> Any: ...

    @abstractmethod
    def _run_bound(self, binding: Any) -> None: ...
