"""Real-size export: the ``large`` random SDXL pair (SDXL widths, > 2 GiB of fp32 weights per UNet).

Slow (on a 2-core CPU: about 6 minutes of export, a minute or two per 512 px image, 9 GB of models
and 9 GB of package on disk), so skipped unless ``ARTRT_LARGE_MODELS`` names a folder written by
``python -m artrt.export.random_models DIR --size large``::

    .venv/bin/python -m artrt.export.random_models /tmp/models/large --size large
    ARTRT_LARGE_MODELS=/tmp/models/large .venv/bin/python -m pytest -m slow -s tests/test_export_scale_large.py

Measured numbers and what they mean: docs/export-scale.md.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import psnr

MODELS = os.environ.get("ARTRT_LARGE_MODELS")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not MODELS, reason="set ARTRT_LARGE_MODELS (see the docstring)")]
GiB = 2**30


@pytest.fixture(scope="module")
def large_package(tmp_path_factory):
    """``artrt export`` of the large pair in a child process, and the child's peak RSS in bytes."""
    out = tmp_path_factory.mktemp("large") / "pkg"
    models = Path(MODELS)
    command = [sys.executable, "-m", "artrt.runtime.cli", "export", "--base", str(models / "base"),
               "--refiner", str(models / "refiner"), "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child so far
    return out, peak


def _largest_component_bytes() -> int:
    from artrt.export.sources import load_sdxl_ensemble
    from artrt.export.weights import weight_bytes

    sources = load_sdxl_ensemble(Path(MODELS) / "base", Path(MODELS) / "refiner")
    models = [e.model for e in sources.text_encoders.values()] + [e.unet for e in sources.experts] + [sources.vae]
    return max(weight_bytes(m) for m in models)


def test_large_export_peak_memory_is_within_the_bound(large_package):
    _, peak = large_package
    largest = _largest_component_bytes()
    assert largest > 2 * GiB  # the size exists to cross protobuf's limit
    bound = 1.5 * largest + 2 * GiB
    print(f"peak RSS {peak / GiB:.2f} GiB, bound {bound / GiB:.2f} GiB (largest component {largest / GiB:.2f} GiB)")
    assert peak <= bound


def test_large_graphs_keep_their_weights_beside_them(large_package):
    from artrt.runtime.package import read_manifest

    out, _ = large_package
    m = read_manifest(out)  # sha256 of every file, the .data files included
    for name in ("expert_composition", "expert_detail"):
        comp = m.components[name]
        for graph in (comp.onnx, comp.onnx_fp16, comp.onnx_cpu):
            assert (out / graph).stat().st_size < 16 * 2**20, graph
            model = onnx.load(str(out / graph), load_external_data=False)
            assert any(t.external_data for t in model.graph.initializer), graph
        assert (out / f"{comp.onnx}.data").stat().st_size > 2 * GiB


def test_large_package_matches_diffusers_at_512px(large_package):
    """Same latents and settings as diffusers' base + refiner (the oracle), 512 px, a few steps."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from artrt.runtime import Pipeline

    out, _ = large_package
    steps, switch, guidance, size, prompt = 4, 0.75, 5.0, 512, "a lighthouse at dusk"
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    with Pipeline.load(out, backend="ort-cpu") as pipe:
        result = pipe.generate(prompt, latents=latents.numpy(), steps=steps, switch=switch, guidance=guidance,
                               height=size, width=size)
    ours = np.asarray(result.images[0])[None]
    print("artrt timings (s):", {k: round(v, 2) for k, v in result.timings.items()})
    del pipe
    base = StableDiffusionXLPipeline.from_pretrained(Path(MODELS) / "base")
    common = dict(num_inference_steps=steps, guidance_scale=guidance)
    handoff = base(prompt, latents=latents.clone(), height=size, width=size, denoising_end=switch,
                   output_type="latent", **common).images
    del base
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(Path(MODELS) / "refiner")
    reference = refiner(prompt, image=handoff, denoising_start=switch, output_type="np", **common).images
    reference = np.round(np.clip(reference, 0, 1) * 255).astype(np.uint8)
    value = psnr(ours, reference)
    print(f"PSNR vs diffusers {value:.1f} dB")
    assert value >= 40.0
