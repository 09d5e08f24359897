"""The sampling loop: one fused engine call per step, experts switched mid-loop.

Every buffer of one latent shape lives in :class:`LoopBuffers` at a fixed address
(host memory for CPU engines, device memory for CUDA engines) and is bound to the
expert engines once. The per-step scalars and, for ancestral samplers, the per-step
noise are written as whole tables before the loop; a step copies its row into the
bound ``step`` (and ``noise``) buffer and runs. Latents and denoised estimates
ping-pong between two buffers each, so no step allocates and, on a GPU, no step
synchronises with the host. Flow-matching steps (the Wan family, :mod:`artrt.runtime.flow`)
carry a third pair, the corrected sample, and read 13 scalars per step instead of 9.

With engines that allow it (:attr:`Engine.captures_loop`, TensorRT) and device memory,
the whole loop is captured into one CUDA graph per expert plan and replayed as a single
launch (:func:`can_capture`, :func:`denoise`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from artrt.engines import Engine
from artrt.errors import EngineError

from .experts import Segment
from .flow import FLOW_STEP_SCALARS
from .samplers import STEP_SCALARS

_D_COLUMN = STEP_SCALARS.index("d")
_GUIDANCE_COLUMN = STEP_SCALARS.index("guidance")

MAX_CAPTURED_LOOPS = 8  # captured loops kept per LoopBuffers; the least recently used one is freed

PlanKey = tuple[tuple[tuple[int, int, int], ...], bool]


class HostMemory:
    """Buffers as numpy arrays; the same operations as ``DeviceMemory`` on a GPU."""

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.zeros(shape, dtype)

    def write(self, dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(dst, src, casting="same_kind")

    def copy_row(self, dst: np.ndarray, table: np.ndarray, row: int) -> None:
        np.copyto(dst, table[row])

    def read(self, src: np.ndarray) -> np.ndarray:
        return src.copy()

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start


@dataclass
class CapturedLoop:
    """A captured loop, the parity holding its result, and its timing marks (recorded by each replay)."""

    graph: Any
    parity: int
    marks: list[tuple[str, Any, Any]]


@dataclass
class LoopState:
    """Where a loop stands between two steps (host arrays): the latents, the last denoised
    estimate and, for flow steps, the last corrected sample (None for the others)."""

    sample: np.ndarray
    denoised: np.ndarray
    corrected: np.ndarray | None = None

    @classmethod
    def start(cls, sample: np.ndarray, flow: bool) -> LoopState:
        """The state before step 0: no history yet (zeros; device memory is not zeroed, and a
        coefficient of 0 times NaN left in a buffer would still be NaN)."""
        return cls(sample, np.zeros_like(sample), np.zeros_like(sample) if flow else None)


class LoopBuffers:
    """Latent, noise, scalar-table and conditioning buffers for one latent shape (``(B, C, h, w)``,
    or ``(B, C, F, h, w)`` for video). ``flow``: the steps are flow-matching ones
    (:data:`FLOW_STEP_SCALARS`), which also read the previous corrected sample (``sample_prev``)
    and write the new one (``corrected``): a third ping-pong pair.

    Not thread-safe: one loop at a time writes the tables and the ping-pong buffers
    (``Pipeline`` serialises its calls with its lock).
    """

    def __init__(self, shape: tuple[int, ...], memory: Any = None, flow: bool = False) -> None:
        self.shape = shape
        self.flow = flow
        self.memory = memory or HostMemory()
        empty = self.memory.empty
        self.samples = [empty(shape, np.float32), empty(shape, np.float32)]
        self.denoised = [empty(shape, np.float32), empty(shape, np.float32)]
        self.corrected = [empty(shape, np.float32), empty(shape, np.float32)] if flow else []
        self.noise = empty(shape, np.float32)
        self.step = empty((len(FLOW_STEP_SCALARS if flow else STEP_SCALARS),), np.float32)
        self.tables: dict[str, Any] = {}
        self.conditioning: dict[str, dict[str, Any]] = {}
        self._bindings: dict[tuple[str, int], Any] = {}
        # Captured loops by expert plan, least recently used first. A graph replays on the
        # addresses it captured, so every one is freed when a buffer here is reallocated.
        self.graphs: OrderedDict[PlanKey, CapturedLoop] = OrderedDict()

    def release(self) -> None:
        """Free device memory and captured graphs now (host arrays are left to the GC)."""
        self.drop_graphs()
        arrays = [*self.samples, *self.denoised, *self.corrected, self.noise, self.step, *self.tables.values()]
        arrays += [a for feeds in self.conditioning.values() for a in feeds.values()]
        for array in arrays:
            if hasattr(array, "free"):
                array.free()
        self.tables, self.conditioning, self._bindings = {}, {}, {}

    def drop_graphs(self) -> None:
        """Free every captured loop (their buffer addresses are about to change)."""
        while self.graphs:
            self.graphs.popitem(last=False)[1].graph.free()

    def table(self, name: str, values: np.ndarray) -> Any:
        """Write ``values`` into the persistent table ``name`` (reallocated when its shape changes)."""
        current = self.tables.get(name)
        if current is None or current.shape != values.shape:
            if current is not None:  # captured loops read the old table
                self.drop_graphs()
                if hasattr(current, "free"):
                    current.free()
            current = self.tables[name] = self.memory.empty(values.shape, values.dtype)
        self.memory.write(current, values)
        return current

    def set_conditioning(self, expert: str, engine: Engine, feeds: Mapping[str, np.ndarray]) -> None:
        """Write an expert's conditioning in the dtypes its graph takes (allocated on first use)."""
        dtypes = {spec.name: spec.dtype for spec in engine.inputs}
        current = self.conditioning.get(expert)
        if current is None or any(current[k].shape != v.shape for k, v in feeds.items()):
            if current is not None:  # captured loops read the old buffers
                self.drop_graphs()
                for array in current.values():
                    if hasattr(array, "free"):
                        array.free()
            current = {k: self.memory.empty(v.shape, dtypes[k]) for k, v in feeds.items()}
            self.conditioning[expert] = current
            self._bindings = {key: b for key, b in self._bindings.items() if key[0] != expert}
        for name, value in feeds.items():
            self.memory.write(current[name], value.astype(dtypes[name], copy=False))

    def forget(self, expert: str) -> None:
        """Drop the bindings of ``expert`` (its engine is being released or replaced)."""
        self._bindings = {key: b for key, b in self._bindings.items() if key[0] != expert}

    def binding(self, expert: str, engine: Engine, parity: int) -> Any:
        """The engine binding that reads buffers ``parity`` and writes ``1 - parity``."""
        key = (expert, parity)
        if key not in self._bindings:
            inputs = {
                "sample": self.samples[parity],
                "denoised_prev": self.denoised[parity],
                "noise": self.noise,
                "step": self.step,
                **self.conditioning[expert],
            }
            outputs = {"next_sample": self.samples[1 - parity], "denoised": self.denoised[1 - parity]}
            if self.flow:
                inputs["sample_prev"] = self.corrected[parity]
                outputs["corrected"] = self.corrected[1 - parity]
            self._bindings[key] = engine.bind(inputs, outputs)
        return self._bindings[key]


def step_tables(
    scalars: np.ndarray, segments: Sequence[Segment], shape: tuple[int, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """The ``[steps, 9]`` (flow: ``[steps, 13]``) scalar table with each segment's guidance, and the per-step noise
    ``[steps, *shape]`` when a step has ``d != 0`` (drawn in step order from ``rng``)."""
    table = np.array(scalars, dtype=np.float32, copy=True)
    for segment in segments:
        table[segment.start : segment.stop, _GUIDANCE_COLUMN] = segment.guidance
    if not np.any(table[:, _D_COLUMN] != 0.0):
        return table, None
    noise = np.zeros((len(table), *shape), np.float32)
    for i in np.flatnonzero(table[:, _D_COLUMN] != 0.0):
        noise[i] = rng.standard_normal(shape, dtype=np.float32)
    return table, noise


def enqueue_steps(
    engines: Sequence[Engine] | Mapping[int, Engine], names: Sequence[str], buffers: LoopBuffers,
    segments: Sequence[Segment], has_noise: bool, on_step: Callable[[int], None] | None = None, parity: int = 0,
) -> tuple[int, list[tuple[str, Any, Any]]]:
    """Issue every step of ``segments``, starting from buffers ``parity``; returns the parity
    holding the result and (expert, start, end) marks. ``engines[k]`` runs expert ``k``.
    ``on_step(i)`` is called after step ``i`` is issued (on a GPU: enqueued, not finished)."""
    memory, marks = buffers.memory, []
    for segment in segments:
        engine, name = engines[segment.expert], names[segment.expert]
        bound = [buffers.binding(name, engine, 0), buffers.binding(name, engine, 1)]
        start = memory.mark()
        for i in range(segment.start, segment.stop):
            memory.copy_row(buffers.step, buffers.tables["scalars"], i)
            if has_noise:
                memory.copy_row(buffers.noise, buffers.tables["noise"], i)
            engine.run_bound(bound[parity])
            parity ^= 1
            if on_step is not None:
                on_step(i)
        marks.append((name, start, memory.mark()))
    return parity, marks


def can_capture(engines: Sequence[Engine], buffers: LoopBuffers) -> bool:
    """True when the whole loop can be recorded into one CUDA graph: every engine's bound
    runs may be captured by the caller (:attr:`Engine.captures_loop`) and the buffers are
    device memory on a stream that can be captured."""
    return all(engine.captures_loop for engine in engines) and callable(getattr(buffers.memory, "capture", None))


def plan_key(segments: Sequence[Segment], has_noise: bool) -> PlanKey:
    """What a captured loop depends on besides its buffers: which expert runs which steps,
    and whether a noise row is copied per step. Guidance and the other per-step scalars
    are not part of it: the graph reads them from the scalar table, rewritten every call."""
    return tuple((s.expert, s.start, s.stop) for s in segments), has_noise


def denoise(
    engines: Sequence[Engine],
    names: Sequence[str],
    buffers: LoopBuffers,
    initial: np.ndarray,
    scalars: np.ndarray,
    segments: Sequence[Segment],
    rng: np.random.Generator,
    timings: dict[str, float],
    capture: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Run every step of ``segments`` and return the final latents as a host array.

    Seconds spent per expert are added to ``timings`` under ``expert:<name>``. With
    ``capture`` (only where :func:`can_capture`), the whole loop is captured into one CUDA
    graph the first time an expert plan is seen and replayed as a single launch afterwards.
    """
    if capture and not can_capture(engines, buffers):
        kinds = ", ".join(f"{engine.name} ({engine.backend or type(engine).__name__})" for engine in engines)
        raise EngineError(f"cannot capture the denoising loop: it needs device memory and engines that allow "
                          f"capture by the caller; got {type(buffers.memory).__name__} and {kinds}")
    has_noise = start_loop(buffers, initial, scalars, segments, rng)
    if capture:
        parity, marks = _replay_or_capture(engines, names, buffers, segments, has_noise)
    else:
        parity, marks = enqueue_steps(engines, names, buffers, segments, has_noise, on_step)
    return finish_loop(buffers, parity, marks, timings)


def start_loop(
    buffers: LoopBuffers, initial: np.ndarray, scalars: np.ndarray, segments: Sequence[Segment],
    rng: np.random.Generator,
) -> bool:
    """Write the step tables and the initial latents (parity 0); returns whether steps add noise."""
    table, noise = step_tables(scalars, segments, buffers.shape, rng)
    load_state(buffers, table, noise, LoopState.start(initial, buffers.flow))
    return noise is not None


def load_state(buffers: LoopBuffers, table: np.ndarray, noise: np.ndarray | None, state: LoopState) -> None:
    """Write a loop's tables and its state into parity 0 (to start it, or to resume it where
    :func:`read_state` left it: a flow loop resumes with its corrected sample too)."""
    if table.shape[1] != buffers.step.shape[0]:
        raise ValueError(f"a step table of {table.shape[1]} columns for a loop of {buffers.step.shape[0]}")
    buffers.table("scalars", table)
    if noise is not None:
        buffers.table("noise", noise)
    buffers.memory.write(buffers.samples[0], state.sample)
    buffers.memory.write(buffers.denoised[0], state.denoised)
    if buffers.flow:
        if state.corrected is None:
            raise ValueError("a flow loop resumes with its corrected sample")
        buffers.memory.write(buffers.corrected[0], state.corrected)


def read_state(buffers: LoopBuffers, parity: int) -> LoopState:
    """The state held at ``parity`` (host copies; synchronises)."""
    read = buffers.memory.read
    corrected = read(buffers.corrected[parity]) if buffers.flow else None
    return LoopState(read(buffers.samples[parity]), read(buffers.denoised[parity]), corrected)


def finish_loop(buffers: LoopBuffers, parity: int, marks: Sequence[tuple[str, Any, Any]],
                timings: dict[str, float]) -> np.ndarray:
    """The final latents as a host array (synchronises a device stream); adds each expert's
    seconds to ``timings`` under ``expert:<name>``."""
    final = buffers.memory.read(buffers.samples[parity])
    add_timings(buffers, marks, timings)
    return final


def add_timings(buffers: LoopBuffers, marks: Sequence[tuple[str, Any, Any]], timings: dict[str, float]) -> None:
    """Add each mark's seconds to ``timings`` under ``expert:<name>`` (after the stream synchronised)."""
    for name, start, end in marks:
        key = f"expert:{name}"
        timings[key] = timings.get(key, 0.0) + buffers.memory.seconds(start, end)


def _replay_or_capture(
    engines: Sequence[Engine], names: Sequence[str], buffers: LoopBuffers, segments: Sequence[Segment],
    has_noise: bool,
) -> tuple[int, list[tuple[str, Any, Any]]]:
    """Launch the captured loop for this plan, or run it eagerly and capture it for next time.

    The graph records the buffer addresses, so it lives in ``buffers.graphs`` and is
    freed with them (or when a table or conditioning buffer is reallocated); at most
    :data:`MAX_CAPTURED_LOOPS` are kept, the least recently used freed first. Its timing
    events are recorded inside the graph, so per-expert timings still come out of a replay.
    """
    key = plan_key(segments, has_noise)
    captured = buffers.graphs.get(key)
    if captured is not None:
        buffers.graphs.move_to_end(key)
        captured.graph.launch(buffers.memory.stream)
        return captured.parity, captured.marks
    parity, marks = enqueue_steps(engines, names, buffers, segments, has_noise)
    buffers.memory.stream.synchronize()  # engines have run once, as TensorRT requires before capture
    with buffers.memory.capture() as graph:
        _, graph_marks = enqueue_steps(engines, names, buffers, segments, has_noise)
    buffers.graphs[key] = CapturedLoop(graph, parity, graph_marks)
    while len(buffers.graphs) > MAX_CAPTURED_LOOPS:
        buffers.graphs.popitem(last=False)[1].graph.free()
    return parity, marks
