"""Shared fixtures: random tiny diffusers models built from configs and their packages.

Everything is made on the CPU in a session-wide temporary directory; nothing is
downloaded. Exporting the tiny models (fp32 and fp16 graphs) takes a few seconds.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def random_text_head(**config):
    """A demo text head with every weight random (as after training): not the identity a new one is."""
    import torch

    from artrt.demo.text_head import TextHead

    head = TextHead(**config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return head.eval()


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two images on the same scale."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    from artrt.export.random_models import make_detail_unet, make_sdxl_pair

    root = tmp_path_factory.mktemp("models")
    base, _ = make_sdxl_pair(root, size="tiny", seed=0)
    make_detail_unet(base.unet, root / "detail_unet", seed=1)
    return root


@pytest.fixture(scope="session")
def sdxl_package(models_dir, tmp_path_factory) -> Path:
    from artrt.export import export_package, load_sdxl_ensemble

    logging.getLogger("artrt").setLevel(logging.INFO)
    out = tmp_path_factory.mktemp("packages") / "sdxl-duo"
    export_package(load_sdxl_ensemble(models_dir / "base", models_dir / "refiner"), out, switch=0.8, steps=8)
    return out


@pytest.fixture(scope="session")
def same_arch_package(models_dir, tmp_path_factory) -> Path:
    from artrt.export import export_package, load_same_arch

    out = tmp_path_factory.mktemp("packages") / "same-arch"
    sources = load_same_arch(models_dir / "base", models_dir / "detail_unet")
    export_package(sources, out, switch=0.6, steps=8, fp16_vae=True)  # the SDXL package has no fp16 decoder
    return out


@pytest.fixture(scope="session")
def sdxl_pipe(sdxl_package):
    from artrt.runtime import Pipeline

    with Pipeline.load(sdxl_package, backend="ort-cpu", threads=1) as pipe:
        yield pipe


@pytest.fixture()
def package_copy(sdxl_package, tmp_path) -> Path:
    """A private copy of the SDXL package that a test may corrupt."""
    return Path(shutil.copytree(sdxl_package, tmp_path / "pkg"))
