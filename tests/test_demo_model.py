"""The embedded demo model: export, parity with a PyTorch loop, and ``artrt demo``'s argument checks.

The reference is ``TorchDemoPipeline``: diffusers' own pieces (``DPMSolverMultistepScheduler``,
the UNets loaded from the committed weights, MiniLM through transformers), the same network
and noise as artrt's fused graphs, a different implementation of everything around them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import psnr, random_text_head

from artrt.demo.cache import weights_dir
from artrt.demo.reference import TorchDemoPipeline

PROMPT = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def demo_package(tmp_path_factory):
    """The full fp32 export of the committed weights (the shipped lean package: tests/test_demo_package*.py)."""
    from artrt.export.shapes_demo import export_demo

    path = tmp_path_factory.mktemp("demo") / "package"
    export_demo(path, weights_dir())
    return path


def test_committed_weights_are_small_fp16_safetensors():
    from safetensors import safe_open

    files = sorted(weights_dir().glob("*/*.safetensors"))
    assert {f.parent.name for f in files} >= {"composition", "detail"}
    assert sum(f.stat().st_size for f in files) <= 25e6  # experts and text head together
    for f in files:
        with safe_open(f, "np") as weights:
            assert {str(weights.get_tensor(k).dtype) for k in weights.keys()} == {"float16"}


def test_demo_matches_pytorch_reference(demo_package):
    from artrt.runtime import Pipeline

    latents = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with Pipeline.load(demo_package, backend="ort-cpu") as pipe:
        d = pipe.manifest.defaults
        assert d.sampler == "dpmpp_2m" and (d.height, d.width) == (32, 32)
        assert pipe.manifest.decoder is None and pipe.manifest.latent_channels == 3
        result = pipe.generate(PROMPT, latents=latents.numpy())
        guidance, switch, steps = result.parameters["guidance"][0], result.parameters["switch"], d.steps
    ours = np.asarray(result.images[0])[None]
    reference = np.round(TorchDemoPipeline()(PROMPT, latents, steps, guidance, switch) * 255).astype(np.uint8)
    value = psnr(ours, reference)
    print(f"PSNR artrt fp32 vs PyTorch: {value:.1f} dB")
    assert value >= 40.0


def test_text_head_is_exported_with_the_text_encoder(tmp_path):
    """Weights with a text head (here random, not the identity): the package's text encoder graph
    runs MiniLM then the head, and matches the PyTorch reference that does the same."""
    from artrt.export.shapes_demo import EXPERTS, TEXT_HEAD, export_demo
    from artrt.runtime import Pipeline

    weights = tmp_path / "weights"
    weights.mkdir()
    for name in (*EXPERTS, "demo.json"):
        (weights / name).symlink_to(weights_dir() / name)
    random_text_head().save(weights / TEXT_HEAD)
    export_demo(tmp_path / "package", weights)
    latents = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with Pipeline.load(tmp_path / "package", backend="ort-cpu") as pipe:
        result = pipe.generate(PROMPT, latents=latents.numpy(), steps=8, guidance=2.0, switch=0.5)
    reference = TorchDemoPipeline(weights)(PROMPT, latents, 8, 2.0, 0.5)
    plain = TorchDemoPipeline()(PROMPT, latents, 8, 2.0, 0.5)  # the same experts without the head
    ours = np.asarray(result.images[0])[None]
    assert psnr(ours, np.round(reference * 255).astype(np.uint8)) >= 40.0
    assert psnr(ours, np.round(plain * 255).astype(np.uint8)) < 30.0  # the head changed the image


def test_demo_command_rejects_bad_output(tmp_path, capsys):
    from artrt.runtime.cli import main

    assert main(["demo", "-o", str(tmp_path / "nowhere" / "x.png")]) == 1
    assert "does not exist" in capsys.readouterr().err
