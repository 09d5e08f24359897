"""Exported graphs against PyTorch, and the hot loop's allocation behaviour."""

from __future__ import annotations

import gc
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from artrt.engines import create_engine
from artrt.runtime.package import read_manifest

BOUND = 1e-4  # fp32 ONNX vs PyTorch, relative to max(1, |output|)


def test_export_check_is_recorded_and_small(sdxl_package):
    m = read_manifest(sdxl_package)
    for comp in m.components.values():
        assert comp.export_check, comp.name
        for output, error in comp.export_check.items():
            assert 0.0 <= error < BOUND, (comp.name, output, error)


def _torch_components(models_dir):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    from artrt.export.graphs import DecoderGraph, FusedStepGraph, TextEncoderGraph

    te2 = CLIPTextModelWithProjection.from_pretrained(models_dir / "base" / "text_encoder_2").eval()
    unet = UNet2DConditionModel.from_pretrained(models_dir / "refiner" / "unet").eval()
    vae = AutoencoderKL.from_pretrained(models_dir / "base" / "vae").eval()
    return {
        "text_encoder_2": TextEncoderGraph(te2, -2, pooled=True),
        "expert_detail": FusedStepGraph(unet, added_conditioning=True),
        "vae_decoder": DecoderGraph(vae),
    }


def _inputs(name: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if name == "text_encoder_2":
        return {"input_ids": rng.integers(0, 500, (2, 77)).astype(np.int64)}
    if name == "vae_decoder":
        return {"latents": rng.standard_normal((1, 4, 12, 20), dtype=np.float32)}
    latent = lambda: rng.standard_normal((3, 4, 8, 16), dtype=np.float32)
    return {
        "sample": latent(), "denoised_prev": latent(), "noise": latent(),
        "step": np.array([0.2, 321.0, 1.0, -1.5, 6.5, 0.8, 0.2, 0.1, 0.3], np.float32),
        "encoder_hidden_states": rng.standard_normal((6, 77, 16), dtype=np.float32),
        "text_embeds": rng.standard_normal((6, 16), dtype=np.float32),
        "time_ids": np.tile(np.array([32, 64, 0, 0, 6], np.float32), (6, 1)),
    }


@pytest.mark.parametrize("name", ["text_encoder_2", "expert_detail", "vae_decoder"])
def test_onnx_matches_pytorch_on_new_shapes(models_dir, sdxl_package, name):
    """Each graph at a batch and size it was not traced with (dynamic axes really dynamic)."""
    module = _torch_components(models_dir)[name].eval()
    inputs = _inputs(name, np.random.default_rng(0))
    m = read_manifest(sdxl_package)
    with create_engine("ort-cpu", sdxl_package / m.components[name].onnx, name=name) as engine:
        got = engine.run(inputs)
    with torch.no_grad():
        expected = module(*(torch.from_numpy(v) for v in inputs.values()))
    expected = (expected,) if isinstance(expected, torch.Tensor) else expected
    for out_name, ref in zip([o.name for o in m.components[name].outputs], expected):
        ref = ref.numpy()
        assert got[out_name].shape == ref.shape
        error = np.max(np.abs(got[out_name] - ref))
        assert error < BOUND * max(1.0, np.max(np.abs(ref))), (name, out_name, error)


def test_denoising_loop_binds_once_and_python_allocations_do_not_grow_with_steps(sdxl_pipe, monkeypatch):
    """Steps run on buffers bound once per shape: a repeat generation binds nothing new,
    makes one bound run per step, and the peak of what tracemalloc traces (Python objects
    and NumPy buffers; not ONNX Runtime's own allocations) does not grow with steps."""
    sdxl_pipe.generate("warm", steps=3, seed=0)
    calls = {"bind": 0, "run_bound": 0}
    for engine in sdxl_pipe.engines.values():
        for method in calls:
            original = getattr(engine, method)

            def counted(*args, _original=original, _method=method, **kwargs):
                calls[_method] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(engine, method, counted)

    def peak(steps: int) -> int:
        tracemalloc.start()
        sdxl_pipe.generate("warm", steps=steps, seed=0)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    short = peak(3)
    long = peak(24)
    assert calls == {"bind": 0, "run_bound": 27}
    assert long - short < 16 * 1024, (short, long)


def _resident_bytes() -> int:
    """This process's resident set size now (/proc/self/statm): native allocations too."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set size from Linux /proc")
def test_resident_memory_does_not_grow_over_repeated_generations(sdxl_pipe):
    """After warm-up (ONNX Runtime's arenas reach their size), ten more 24-step generations
    at 128x128 leave RSS within 8 MiB: a buffer of one latent (64 KiB) kept per step would
    add 15 MiB."""
    def run() -> None:
        sdxl_pipe.generate("warm", steps=24, seed=0, height=128, width=128)

    for _ in range(3):
        run()
    gc.collect()
    before = _resident_bytes()
    for _ in range(10):
        run()
    gc.collect()
    growth = _resident_bytes() - before
    assert growth < 8 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over 10 generations"
