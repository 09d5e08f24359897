"""The whole-loop CUDA graph of ``runtime.denoise``, on the CPU.

A fake device memory stands in for ``DeviceMemory``: its stream runs enqueued work at
once, or records it while a capture is open, and its graphs replay what they recorded
on ``launch``. Writes and reads refuse to run during a capture, as pageable uploads and
synchronising downloads would end a real one. A fake engine computes a simple step from
its bound numpy buffers on that stream and counts calls (enqueues) and executions.
The same loop on ``HostMemory`` without capture is the reference.

Also here: the CPU-side checks of the other GPU-path helpers in ``runtime.loading``
(shared scratch memory, the system description TensorRT plans are checked against).
"""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager

import numpy as np
import pytest

from artrt.engines import Engine, TensorSpec, cuda
from artrt.engines.cuda import DeviceArray, DeviceInfo
from artrt.engines.ort import OrtCpuEngine
from artrt.engines.ort_cuda import OrtCudaEngine
from artrt.engines.trt import INSTALL_HINT, TrtEngine
from artrt.errors import EngineError
from artrt.runtime import denoise as loop
from artrt.runtime.denoise import MAX_CAPTURED_LOOPS, HostMemory, LoopBuffers, can_capture, denoise
from artrt.runtime.experts import Segment
from artrt.runtime.samplers import STEP_SCALARS

SHAPE = (1, 2, 3, 3)
NAMES = ("composition", "detail")
F32 = np.dtype(np.float32)
G, D = STEP_SCALARS.index("guidance"), STEP_SCALARS.index("d")
INITIAL = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)


# -- fakes -----------------------------------------------------------------------------------
class FakeStream:
    """Runs enqueued work at once, or appends it to ``recording`` while a capture is open.
    ``clock`` advances by each engine run's cost; fake events read it."""

    def __init__(self) -> None:
        self.recording: list | None = None
        self.clock = 0.0
        self.synchronized = 0

    @property
    def capturing(self) -> bool:
        return self.recording is not None

    def enqueue(self, op) -> None:
        if self.recording is not None:
            self.recording.append(op)
        else:
            op()

    def synchronize(self) -> None:
        assert not self.capturing, "a synchronisation inside a capture ends a CUDA capture with an error"
        self.synchronized += 1


class FakeGraph:
    def __init__(self) -> None:
        self.ops: list = []
        self.launches = 0
        self.freed = False

    def launch(self, stream: FakeStream) -> None:
        assert not self.freed, "graph launched after free()"
        self.launches += 1
        for op in self.ops:
            stream.enqueue(op)

    def free(self) -> None:
        self.freed = True


class FakeEvent:
    time: float | None = None


class FakeDeviceMemory(HostMemory):
    """``DeviceMemory``'s interface on numpy arrays, with a fake stream and capture."""

    def __init__(self) -> None:
        self.stream = FakeStream()
        self.captured: list[FakeGraph] = []

    def write(self, dst: np.ndarray, src: np.ndarray) -> None:
        assert not self.stream.capturing, "an upload from pageable memory cannot be captured"
        super().write(dst, src)

    def copy_row(self, dst: np.ndarray, table: np.ndarray, row: int) -> None:
        self.stream.enqueue(lambda: np.copyto(dst, table[row]))

    def read(self, src: np.ndarray) -> np.ndarray:
        self.stream.synchronize()
        return src.copy()

    def mark(self) -> FakeEvent:
        event = FakeEvent()

        def record() -> None:
            event.time = self.stream.clock

        self.stream.enqueue(record)
        return event

    def seconds(self, start: FakeEvent, end: FakeEvent) -> float:
        assert start.time is not None and end.time is not None, "event read before it was recorded"
        return end.time - start.time

    @contextmanager
    def capture(self):
        graph = FakeGraph()
        self.stream.recording = graph.ops
        try:
            yield graph
        finally:
            self.stream.recording = None
        self.captured.append(graph)


class LoopEngine(Engine):
    """A fused step: next_sample = c_in·sample + 0.5·denoised_prev + 0.01·guidance + d·noise + scale·mean(cond)."""

    backend = "fake"
    captures_loop = True

    def __init__(self, name: str, scale: float, stream: FakeStream | None = None) -> None:
        super().__init__(f"{name}.fake", name)
        self.scale, self.stream = np.float32(scale), stream
        self.cost = 1.0  # clock ticks per executed run
        self.calls = 0  # run_bound calls (enqueued or recorded)
        self.executed = 0  # steps actually computed

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        latent = tuple(f"s{i}" for i in range(4))
        return (TensorSpec("sample", F32, latent), TensorSpec("denoised_prev", F32, latent),
                TensorSpec("noise", F32, latent), TensorSpec("step", F32, (len(STEP_SCALARS),)),
                TensorSpec("cond", F32, ("k",)))

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        latent = tuple(f"s{i}" for i in range(4))
        return TensorSpec("next_sample", F32, latent), TensorSpec("denoised", F32, latent)

    def _activate(self) -> None:
        pass

    def _release(self) -> None:
        pass

    def _run(self, inputs):
        raise NotImplementedError

    def _bind(self, inputs, outputs):
        return dict(inputs), dict(outputs)

    def _run_bound(self, binding) -> None:
        self.calls += 1
        if self.stream is None:
            self._compute(*binding)
        else:
            self.stream.enqueue(lambda: self._compute(*binding))

    def _compute(self, inputs, outputs) -> None:
        self.executed += 1
        if self.stream is not None:
            self.stream.clock += self.cost
        step = inputs["step"]
        sample = inputs["sample"]
        result = (step[0] * sample + np.float32(0.5) * inputs["denoised_prev"] + np.float32(0.01) * step[G]
                  + step[D] * inputs["noise"] + self.scale * inputs["cond"].mean(dtype=np.float32))
        np.copyto(outputs["next_sample"], result)
        np.copyto(outputs["denoised"], sample - np.float32(0.001) * step[G])


# -- helpers ---------------------------------------------------------------------------------
def scalars(steps: int, ancestral: bool = False) -> np.ndarray:
    table = np.zeros((steps, len(STEP_SCALARS)), np.float32)
    table[:, 0] = np.linspace(0.9, 0.6, steps)  # c_in: the engine's multiplier
    if ancestral:
        table[:-1, D] = 0.3
    return table


def plan(switch: int, steps: int = 7, guidance: tuple[float, float] = (5.0, 3.0)) -> list[Segment]:
    return [Segment(0, 0, switch, guidance[0]), Segment(1, switch, steps, guidance[1])]


def conditioning(value: float = 1.0, width: int = 4) -> dict[str, np.ndarray]:
    return {"cond": np.linspace(0, value, width, dtype=np.float32)}


class Loop:
    """One set of loop buffers with its two engines, on fake device memory or (``device=False``) host memory."""

    def __init__(self, device: bool = True, memory: FakeDeviceMemory | None = None) -> None:
        self.memory = memory or (FakeDeviceMemory() if device else HostMemory())
        stream = getattr(self.memory, "stream", None)
        self.engines = [LoopEngine(NAMES[0], 1.0, stream).activate(), LoopEngine(NAMES[1], -2.0, stream).activate()]
        self.buffers = LoopBuffers(SHAPE, self.memory)
        self.condition()

    def condition(self, value: float = 1.0, width: int = 4) -> None:
        for name, engine in zip(NAMES, self.engines):
            self.buffers.set_conditioning(name, engine, conditioning(value, width))

    def run(self, segments, steps_table=None, seed=0, capture=True):
        timings: dict[str, float] = {}
        table = scalars(segments[-1].stop) if steps_table is None else steps_table
        out = denoise(self.engines, NAMES, self.buffers, INITIAL, table, segments, np.random.default_rng(seed),
                      timings, capture=capture)
        return out, timings

    @property
    def calls(self) -> list[int]:
        return [engine.calls for engine in self.engines]

    @property
    def executed(self) -> list[int]:
        return [engine.executed for engine in self.engines]


def reference(segments, steps_table=None, seed=0, cond=(1.0, 4)) -> np.ndarray:
    """The same loop on host memory, step by step, without capture."""
    host = Loop(device=False)
    host.condition(*cond)
    return host.run(segments, steps_table, seed, capture=False)[0]


# -- capture, replay, invalidation -----------------------------------------------------------
def test_first_call_runs_eagerly_and_captures_then_one_launch_replays():
    dev, segments = Loop(), plan(4)  # 4 + 3 steps: the result lies in the odd parity's buffer
    want = reference(segments)
    out, timings = dev.run(segments)
    np.testing.assert_array_equal(out, want)
    assert dev.calls == [8, 6]  # every step once eagerly and once recorded
    assert dev.executed == [4, 3]  # recording did not run them
    assert len(dev.memory.captured) == 1 and dev.memory.captured[0].launches == 0
    assert dev.memory.stream.synchronized == 2  # before the capture, and the final read
    assert timings == {"expert:composition": 4.0, "expert:detail": 3.0}

    out, timings = dev.run(segments)
    np.testing.assert_array_equal(out, want)
    assert dev.calls == [8, 6]  # no per-step engine call: the graph replayed them
    assert dev.executed == [8, 6]
    assert len(dev.memory.captured) == 1 and dev.memory.captured[0].launches == 1
    assert timings == {"expert:composition": 4.0, "expert:detail": 3.0}
    for engine in dev.engines:
        engine.cost = 2.5
    _, timings = dev.run(segments)  # timings come from the events recorded by this replay
    assert timings == {"expert:composition": 10.0, "expert:detail": 7.5}
    assert dev.memory.captured[0].launches == 2


def test_new_guidance_replays_the_same_graph_with_the_new_values():
    dev = Loop()
    first, _ = dev.run(plan(4, guidance=(5.0, 3.0)))
    out, _ = dev.run(plan(4, guidance=(7.5, 1.0)))
    assert dev.calls == [8, 6] and len(dev.memory.captured) == 1 and len(dev.buffers.graphs) == 1
    assert dev.memory.captured[0].launches == 1
    np.testing.assert_array_equal(out, reference(plan(4, guidance=(7.5, 1.0))))
    assert not np.array_equal(out, first)


def test_new_conditioning_values_replay_and_a_new_shape_recaptures():
    dev = Loop()
    dev.run(plan(4))
    dev.condition(3.0)  # same shape: written in place, the graph stays
    out, _ = dev.run(plan(4))
    np.testing.assert_array_equal(out, reference(plan(4), cond=(3.0, 4)))
    assert dev.calls == [8, 6] and dev.memory.captured[0].launches == 1
    dev.condition(3.0, width=6)  # reallocated: the graph read the old addresses
    assert dev.memory.captured[0].freed and not dev.buffers.graphs
    out, _ = dev.run(plan(4))
    np.testing.assert_array_equal(out, reference(plan(4), cond=(3.0, 6)))
    assert dev.calls == [16, 12] and len(dev.memory.captured) == 2


def test_new_buffers_capture_their_own_graph():
    first = Loop()
    first.run(plan(4))
    second = Loop(memory=first.memory)  # same stream, new LoopBuffers (other addresses)
    out, _ = second.run(plan(4))
    np.testing.assert_array_equal(out, reference(plan(4)))
    assert second.calls == [8, 6] and len(first.memory.captured) == 2
    assert first.memory.captured[1].launches == 0 and not first.memory.captured[0].freed
    first.run(plan(4))
    assert first.memory.captured[0].launches == 1 and first.calls == [8, 6]
    second.buffers.release()
    assert first.memory.captured[1].freed and not second.buffers.graphs


def test_a_new_step_count_reallocates_the_table_and_recaptures():
    dev = Loop()
    dev.run(plan(4))
    out, _ = dev.run(plan(4, steps=9))
    assert dev.memory.captured[0].freed and len(dev.buffers.graphs) == 1
    np.testing.assert_array_equal(out, reference(plan(4, steps=9)))
    assert dev.calls == [16, 16]


def test_ancestral_noise_is_its_own_plan_and_replays_fresh_noise():
    dev, segments, table = Loop(), plan(3), scalars(7, ancestral=True)
    dev.run(segments)  # the same expert plan without noise
    out, _ = dev.run(segments, table, seed=1)
    np.testing.assert_array_equal(out, reference(segments, table, seed=1))
    assert len(dev.buffers.graphs) == 2 and dev.calls == [12, 16]
    out, _ = dev.run(segments, table, seed=2)  # replayed: the noise table was rewritten
    np.testing.assert_array_equal(out, reference(segments, table, seed=2))
    assert dev.calls == [12, 16] and dev.memory.captured[1].launches == 1
    assert not np.array_equal(out, reference(segments, table, seed=1))


def test_captured_loops_are_bounded_least_recently_used_first():
    steps = MAX_CAPTURED_LOOPS + 3
    dev = Loop()
    graphs = dev.memory.captured
    for switch in range(1, MAX_CAPTURED_LOOPS + 1):
        dev.run(plan(switch, steps))
    assert len(dev.buffers.graphs) == MAX_CAPTURED_LOOPS and not any(g.freed for g in graphs)
    dev.run(plan(1, steps))  # replayed: now the most recently used
    assert graphs[0].launches == 1 and len(graphs) == MAX_CAPTURED_LOOPS
    dev.run(plan(MAX_CAPTURED_LOOPS + 1, steps))
    assert len(dev.buffers.graphs) == MAX_CAPTURED_LOOPS
    assert [g.freed for g in graphs[:3]] == [False, True, False]  # switch 2 was the least recently used
    calls = dev.calls
    out, _ = dev.run(plan(2, steps))  # evicted: captured again
    np.testing.assert_array_equal(out, reference(plan(2, steps)))
    assert dev.calls != calls and graphs[-1].launches == 0 and graphs[2].freed
    assert len(dev.buffers.graphs) == MAX_CAPTURED_LOOPS


def test_the_key_holds_the_expert_plan_not_the_guidance():
    assert loop.plan_key(plan(4, guidance=(5.0, 3.0)), False) == loop.plan_key(plan(4, guidance=(1.0, 9.0)), False)
    assert loop.plan_key(plan(4), False) != loop.plan_key(plan(5), False)
    assert loop.plan_key(plan(4), False) != loop.plan_key(plan(4), True)
    swapped = [Segment(1, 0, 4, 5.0), Segment(0, 4, 7, 3.0)]
    assert loop.plan_key(plan(4), False) != loop.plan_key(swapped, False)


# -- who may capture ---------------------------------------------------------------------------
def test_engines_say_whether_the_caller_may_capture_them():
    assert TrtEngine.captures_loop is True
    assert OrtCudaEngine.captures_loop is False  # ONNX Runtime captures its own graphs
    assert OrtCpuEngine.captures_loop is False and Engine.captures_loop is False


def test_can_capture_needs_capturing_engines_and_device_memory():
    dev, host = Loop(), Loop(device=False)
    assert can_capture(dev.engines, dev.buffers)
    assert not can_capture(host.engines, host.buffers)  # host memory has no stream to capture
    dev.engines[1].captures_loop = False
    assert not can_capture(dev.engines, dev.buffers)
    with pytest.raises(EngineError, match=r"cannot capture the denoising loop.*detail \(fake\)"):
        dev.run(plan(4))
    with pytest.raises(EngineError, match="cannot capture the denoising loop.*HostMemory"):
        host.run(plan(4))
    assert dev.calls == [0, 0] and host.calls == [0, 0]


def test_without_capture_device_memory_runs_step_by_step():
    dev = Loop()
    for _ in range(2):
        out, _ = dev.run(plan(4), capture=False)
        np.testing.assert_array_equal(out, reference(plan(4)))
    assert dev.calls == dev.executed == [8, 6] and not dev.memory.captured


# -- the other GPU-path helpers in runtime.loading, without a GPU -------------------------------
class ScratchUser:
    def __init__(self, size: int) -> None:
        self.scratch_size, self.scratch = size, None

    def set_scratch(self, block) -> None:
        self.scratch = block


def test_engines_share_one_scratch_block_sized_to_the_largest(monkeypatch):
    from artrt.runtime.loading import OpenEngines, _share_scratch

    allocated = []

    def empty(shape, dtype):
        allocated.append(DeviceArray(0x10000 * (len(allocated) + 1), shape, dtype))
        return allocated[-1]

    monkeypatch.setattr(cuda.DeviceArray, "empty", staticmethod(empty))
    users = {"a": ScratchUser(4096), "b": ScratchUser(1 << 20), "c": ScratchUser(0)}
    opened = OpenEngines.of("trt", users)  # type: ignore[arg-type]
    _share_scratch(opened)
    assert len(allocated) == 1 and opened.scratch is allocated[0] and opened.scratch.nbytes == 1 << 20
    assert all(user.scratch is opened.scratch for user in users.values())


def test_system_info_reads_tensorrt_and_the_gpu(monkeypatch):
    from artrt.engines import trt
    from artrt.runtime.loading import _system_info

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not installed
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        _system_info()
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.13.0.35"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt, "tensorrt_installed", lambda: True)
    monkeypatch.setattr(cuda, "device_info", lambda device=0: DeviceInfo("NVIDIA H200", "9.0", 141 << 30))
    info = _system_info()
    assert (info.tensorrt_version, info.compute_capability) == ("10.13.0.35", "9.0")
    assert INSTALL_HINT.startswith("TensorRT is not installed")
