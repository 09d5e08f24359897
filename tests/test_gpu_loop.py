"""The device loop on a real GPU, without TensorRT (GPU-marked; skipped without a GPU).

- The whole-loop CUDA graph of ``runtime.denoise`` with the real ``DeviceMemory`` and the
  real ``engines/cuda.py`` stream, device arrays, events and graphs. The experts are
  stand-in engines whose step is a CUDA kernel (a CuPy ``RawKernel``) launched on the
  pipeline's stream from ``run_bound``, with ``captures_loop`` as TensorRT has it; the
  reference is the same loop on host memory with the kernel written in numpy.
- ``loading._share_scratch`` allocating one real device block for every engine.
- The real ``Pipeline`` on ``ort-cuda`` against ``ort-cpu`` on the tiny SDXL package.

These have not yet been run on a GPU (docs/gpu-validation.md says what has). CuPy,
cuda-python and onnxruntime-gpu are imported only by the tests that need them.
"""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest

from artrt.engines import Engine, TensorSpec
from artrt.engines.cuda import gpu_available
from artrt.runtime.denoise import HostMemory, LoopBuffers, denoise
from artrt.runtime.experts import Segment
from artrt.runtime.samplers import STEP_SCALARS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs an NVIDIA GPU, its driver and cuda-python"),
]

HAS_CUDA_EP = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
SHAPE = (2, 4, 32, 32)
NAMES = ("composition", "detail")
F32 = np.dtype(np.float32)
G, D = STEP_SCALARS.index("guidance"), STEP_SCALARS.index("d")

KERNEL = r"""
extern "C" __global__ void fused_step(const float* sample, const float* denoised_prev, const float* noise,
                                      const float* step, const float* cond, const float scale, const int n_cond,
                                      float* next_sample, float* denoised, const int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float mean = 0.0f;
    for (int k = 0; k < n_cond; ++k) mean += cond[k];
    mean /= (float)n_cond;
    float g = step[G_COLUMN], d = step[D_COLUMN];
    next_sample[i] = step[0] * sample[i] + 0.5f * denoised_prev[i] + 0.01f * g + d * noise[i] + scale * mean;
    denoised[i] = sample[i] - 0.001f * g;
}
""".replace("G_COLUMN", str(G)).replace("D_COLUMN", str(D))


class StepEngine(Engine):
    """A fused step on bound buffers: the CUDA kernel above on ``stream``, or numpy without one."""

    backend = "stand-in"
    captures_loop = True

    def __init__(self, name: str, scale: float, stream=None) -> None:
        super().__init__(f"{name}.kernel", name)
        self.scale, self.stream = np.float32(scale), stream
        self.device = "cpu" if stream is None else "cuda"
        self.calls = 0

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
        if self.stream is not None:
            import cupy

            self._cupy = cupy
            self._kernel = cupy.RawKernel(KERNEL, "fused_step")

    def _release(self) -> None:
        pass

    def _run(self, inputs):
        raise NotImplementedError

    def _bind(self, inputs, outputs):
        arrays = {**inputs, **outputs}
        if self.stream is None:
            return arrays
        cp = self._cupy
        views = {}
        for name, array in arrays.items():  # CuPy views of the DeviceArrays (no copy, not owned)
            memory = cp.cuda.UnownedMemory(array.ptr, array.nbytes, array)
            views[name] = cp.ndarray(array.shape, array.dtype, cp.cuda.MemoryPointer(memory, 0))
        return views

    def _run_bound(self, b) -> None:
        self.calls += 1
        if self.stream is None:
            step, mean = b["step"], b["cond"].mean(dtype=np.float32)
            np.copyto(b["next_sample"], step[0] * b["sample"] + np.float32(0.5) * b["denoised_prev"]
                      + np.float32(0.01) * step[G] + step[D] * b["noise"] + self.scale * mean)
            np.copyto(b["denoised"], b["sample"] - np.float32(0.001) * step[G])
            return
        n = b["sample"].size
        args = (b["sample"], b["denoised_prev"], b["noise"], b["step"], b["cond"], self.scale,
                np.int32(b["cond"].size), b["next_sample"], b["denoised"], np.int32(n))
        with self._cupy.cuda.ExternalStream(self.stream.handle):
            self._kernel(((n + 255) // 256,), (256,), args)


def scalars(steps: int, ancestral: bool = False) -> np.ndarray:
    table = np.zeros((steps, len(STEP_SCALARS)), np.float32)
    table[:, 0] = np.linspace(0.9, 0.6, steps)
    if ancestral:
        table[:-1, D] = 0.3
    return table


def plan(guidance=(5.0, 3.0), switch: int = 6, steps: int = 9) -> list[Segment]:
    return [Segment(0, 0, switch, guidance[0]), Segment(1, switch, steps, guidance[1])]


def run_loop(engines, buffers, segments, table, seed=0, capture=False):
    for name, engine in zip(NAMES, engines):
        buffers.set_conditioning(name, engine, {"cond": np.linspace(0, 1, 5, dtype=np.float32)})
    timings: dict[str, float] = {}
    initial = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    out = denoise(engines, NAMES, buffers, initial, table, segments, np.random.default_rng(seed), timings,
                  capture=capture)
    return out, timings


def host_loop(segments, table, seed=0) -> np.ndarray:
    engines = [StepEngine(NAMES[0], 1.0).activate(), StepEngine(NAMES[1], -2.0).activate()]
    return run_loop(engines, LoopBuffers(SHAPE, HostMemory()), segments, table, seed)[0]


def close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_whole_loop_graph_on_the_gpu_matches_the_host_loop():
    pytest.importorskip("cupy")
    from artrt.engines.cuda import Stream
    from artrt.runtime.device_memory import DeviceMemory

    stream = Stream()
    engines = [StepEngine(NAMES[0], 1.0, stream).activate(), StepEngine(NAMES[1], -2.0, stream).activate()]
    buffers = LoopBuffers(SHAPE, DeviceMemory(stream))
    try:
        table = scalars(9)  # 6 + 3 steps: the result lies in the odd parity's buffer
        eager, timings = run_loop(engines, buffers, plan(), table, capture=True)  # runs, then captures
        close(eager, host_loop(plan(), table))
        assert [e.calls for e in engines] == [12, 6] and len(buffers.graphs) == 1
        assert timings["expert:composition"] > 0 and timings["expert:detail"] > 0

        replayed, timings = run_loop(engines, buffers, plan(), table, capture=True)  # one launch
        np.testing.assert_array_equal(replayed, eager)
        assert [e.calls for e in engines] == [12, 6]
        assert timings["expert:composition"] > 0 and timings["expert:detail"] > 0

        other, _ = run_loop(engines, buffers, plan((7.5, 1.0)), table, capture=True)  # read from the table
        close(other, host_loop(plan((7.5, 1.0)), table))
        assert [e.calls for e in engines] == [12, 6] and not np.allclose(other, eager)

        noisy = scalars(9, ancestral=True)  # a second plan: a noise row copied per step
        for seed in (1, 2):  # captured, then replayed with new noise
            out, _ = run_loop(engines, buffers, plan(), noisy, seed=seed, capture=True)
            close(out, host_loop(plan(), noisy, seed))
        assert [e.calls for e in engines] == [24, 12] and len(buffers.graphs) == 2
    finally:
        buffers.release()
        stream.destroy()


class ScratchUser:
    def __init__(self, size: int) -> None:
        self.scratch_size, self.scratch = size, None

    def set_scratch(self, block) -> None:
        self.scratch = block

    def release(self) -> None:
        pass


def test_engines_share_one_real_scratch_block_sized_to_the_largest():
    from artrt.runtime.loading import OpenEngines, _share_scratch

    users = {"text_encoder": ScratchUser(1 << 16), "composition": ScratchUser(3 << 20), "detail": ScratchUser(1 << 20)}
    opened = OpenEngines.of("trt", users)  # type: ignore[arg-type]
    _share_scratch(opened)
    block = opened.scratch
    try:
        assert block.nbytes == 3 << 20 and all(user.scratch is block for user in users.values())
        pattern = (np.arange(block.nbytes) % 251).astype(np.uint8)
        block.upload(pattern)
        np.testing.assert_array_equal(block.download(), pattern)
    finally:
        opened.close()


@pytest.mark.skipif(not HAS_CUDA_EP, reason="onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_pipeline_on_ort_cuda_matches_ort_cpu(sdxl_package, cuda_graphs):
    from conftest import psnr

    from artrt.runtime import Pipeline

    args = {"prompt": "a lighthouse at dusk", "steps": 6, "seed": 3}
    with Pipeline.load(sdxl_package, backend="ort-cpu", threads=2) as cpu:
        want = np.asarray(cpu.generate(**args).images[0])
    with Pipeline.load(sdxl_package, backend="ort-cuda", cuda_graphs=cuda_graphs) as gpu:
        assert gpu.backend == "ort-cuda"
        for _ in range(2):  # the second call replays what the first captured
            got = np.asarray(gpu.generate(**args).images[0])
            assert psnr(got, want) >= 40.0
