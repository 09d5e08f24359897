"""The mechanism under LoRA: which initializer holds each weight (export), reading and replacing
initializers without ``onnx`` (runtime), ONNX Runtime sessions with replaced weights, and the
TensorRT refit path (against a stand-in TensorRT; the names it uses are checked against the
10.13 stubs by tests/test_engine_trt.py and tests/test_build.py)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_build import _FakeConfig, fake_gpu  # noqa: F401  (fake_gpu is a fixture)
from test_engine_trt import FakeEngine, fake_stream, fake_tensorrt

from artrt.engines.onnx_weights import read_initializers
from artrt.engines.ort import OrtCpuEngine
from artrt.engines.trt import TrtEngine
from artrt.errors import EngineError, InputError
from artrt.export.build import BuildRequest, build_engines
from artrt.export.lora_targets import lora_fingerprints, write_lora_targets
from artrt.export.onnx_io import export_onnx
from artrt.runtime.engine_records import build_command, find_record
from artrt.runtime.package import read_manifest


# -- which initializer holds each weight ------------------------------------------------------
class Tiny(torch.nn.Module):
    """Linear on 3-D input (a transposed MatMul weight), on 2-D input (Gemm, stored as is), a conv,
    two layers with equal weights (stored once) and one the output does not depend on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = torch.nn.Linear(8, 6)
        self.emb = torch.nn.Linear(8, 8)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.left, self.right = torch.nn.Linear(6, 6, bias=False), torch.nn.Linear(6, 6, bias=False)
        with torch.no_grad():
            self.right.weight.copy_(self.left.weight)
        self.unused = torch.nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, v: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.attn(x)
        return self.left(h) + self.right(h) + self.emb(v).sum(), self.conv(image)


def _tiny_graphs(tmp_path: Path) -> tuple[Tiny, dict[str, str]]:
    module = Tiny().eval()
    inputs = {"x": torch.randn(1, 5, 8), "v": torch.randn(2, 8), "image": torch.randn(1, 3, 6, 6)}
    export_onnx(module, inputs, ["out", "features"], {}, tmp_path / "tiny" / "model.onnx")
    half = {k: v.half() for k, v in inputs.items()}
    export_onnx(Tiny().eval().half(), half, ["out", "features"], {}, tmp_path / "tiny" / "model_fp16.onnx")
    return module, {"fp32": "tiny/model.onnx", "fp16": "tiny/model_fp16.onnx"}


def test_targets_are_found_by_value_transposed_shared_or_unused(tmp_path):
    module, graphs = _tiny_graphs(tmp_path)
    assert write_lora_targets(lora_fingerprints(module), tmp_path, "tiny", graphs) == "tiny/lora_targets.json"
    doc = json.loads((tmp_path / "tiny" / "lora_targets.json").read_text())
    assert doc["unused"] == ["unused"] and set(doc["targets"]) == {"attn", "emb", "conv", "left", "right"}
    assert doc["targets"]["left"]["fp32"]["shared_with"] == ["right"]
    for precision, graph in graphs.items():
        index = read_initializers(tmp_path / graph)
        for name, target in doc["targets"].items():
            weight = getattr(module, name).weight.detach()
            weight = (weight.half() if precision == "fp16" else weight).numpy()
            stored = index[target[precision]["name"]].read()
            assert np.array_equal(stored.T if target[precision]["transposed"] else stored, weight), (precision, name)
            assert target["shape"] == list(weight.shape)
    assert doc["targets"]["attn"]["fp32"]["transposed"] and not doc["targets"]["conv"]["fp32"]["transposed"]


def test_initializers_read_without_onnx_match_onnx(tmp_path):
    _, graphs = _tiny_graphs(tmp_path)
    path = tmp_path / graphs["fp16"]
    external = tmp_path / "external" / "model.onnx"
    external.parent.mkdir()
    onnx.save(onnx.load(str(path)), str(external), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    for graph in (path, external):
        model = onnx.load(str(graph))
        index = read_initializers(graph)
        assert set(index) == {t.name for t in model.graph.initializer}
        for tensor in model.graph.initializer:
            assert np.array_equal(index[tensor.name].read(), numpy_helper.to_array(tensor)), tensor.name
    assert all(i.external for i in read_initializers(external).values())
    with pytest.raises(EngineError, match="cannot read the initializers of"):
        read_initializers(tmp_path / "missing.onnx")


# -- ONNX Runtime sessions with replaced weights -----------------------------------------------
def _conv_matmul_graph(path: Path, threshold: int | None) -> dict[str, np.ndarray]:
    """MatMul then Conv: ORT CPU's layout optimizer (NCHWc, ORT_ENABLE_ALL) rewrites conv weights.
    Initializers of ``threshold`` bytes or more go to external data (W has 1024, C 1152)."""
    rng = np.random.default_rng(0)
    weights = {"W": rng.standard_normal((16, 16)).astype(np.float32),
               "C": rng.standard_normal((8, 4, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Reshape", ["y", "shape"], ["y4"]),
             helper.make_node("Conv", ["y4", "C"], ["z"], pads=[1, 1, 1, 1])]
    initializers = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    initializers.append(numpy_helper.from_array(np.array([1, 4, 8, 8], np.int64), "shape"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 16])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=threshold is not None, location=f"{path.name}.data",
              size_threshold=threshold or 0)
    return weights


def _rewritten(path: Path, weights: dict[str, np.ndarray], dst: Path) -> np.ndarray:
    model = onnx.load(str(path))
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name], tensor.name))
    onnx.save(model, str(dst))
    return ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]


X = np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32)


@pytest.mark.parametrize("threshold", [None, 256, 1100], ids=["embedded", "external", "both"])
def test_replaced_weights_run_as_if_the_file_held_them(tmp_path, threshold):
    path = tmp_path / "g" / "model.onnx"
    base = _conv_matmul_graph(path, threshold)
    new = {"W": base["W"] + 1, "C": base["C"] * -2}
    expected = _rewritten(path, new, tmp_path / "rewritten.onnx")
    engine = OrtCpuEngine(path, threads=1, weights=new).activate()
    assert np.array_equal(engine.run({"x": X})["z"], expected)  # conv weights too, at ORT_ENABLE_ALL
    plain = OrtCpuEngine(path, threads=1).activate().run({"x": X})["z"]
    engine.set_weights({})
    assert np.array_equal(engine.run({"x": X})["z"], plain)
    engine.set_weights({"C": new["C"]})
    assert np.array_equal(engine.run({"x": X})["z"], _rewritten(path, {"C": new["C"]}, tmp_path / "c.onnx"))
    for bad, message in [({"V": base["W"]}, "has no initializer 'V'"),
                         ({"W": base["W"][:8]}, r"'W' is float32\[16, 16\], the replacement float32\[8, 16\]"),
                         ({"W": base["W"].astype(np.float16)}, "the replacement float16")]:
        with pytest.raises(EngineError, match=message):
            engine.set_weights(bad)
    assert np.array_equal(engine.run({"x": X})["z"], _rewritten(path, {"C": new["C"]}, tmp_path / "c.onnx"))


# -- TensorRT: refit on a stand-in ------------------------------------------------------------
class FakeRefitter:
    """Weights ``w`` and ``b`` are stored combined: setting one makes the other missing."""

    def __init__(self, engine, logger):
        self.engine, self.given = engine, {}

    def set_named_weights(self, name, weights):
        if name not in self.engine.weights or weights.array.dtype != self.engine.weights[name].dtype:
            return False
        self.given[name] = weights.array.copy()
        return True

    def get_missing_weights(self):
        return [n for n in ("w", "b") if set(self.given) & {"w", "b"} and n not in self.given]

    def refit_cuda_engine(self):
        self.engine.weights.update(self.given)
        self.engine.refits += 1
        return True


@pytest.fixture()
def refit_setup(tmp_path, monkeypatch):
    base = {"w": np.arange(16, dtype=np.float16).reshape(4, 4), "b": np.ones(4, np.float16),
            "v": np.full((4, 4), 3, np.float16)}
    graph = helper.make_graph([], "g", [], [], [numpy_helper.from_array(v, k) for k, v in base.items()])
    source = tmp_path / "model_fp16.onnx"
    onnx.save(helper.make_model(graph), str(source))
    (tmp_path / "unet.plan").write_bytes(b"plan")
    trt = fake_tensorrt()
    trt.Refitter, trt.Weights = FakeRefitter, lambda array: types.SimpleNamespace(array=array)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    engine = FakeEngine()
    engine.refittable, engine.refits, engine.weights = True, 0, {k: v.copy() for k, v in base.items()}
    trt.Runtime.deserialize_cuda_engine = lambda self, plan: engine
    return tmp_path / "unet.plan", source, engine, base


def test_refit_replaces_from_the_base_and_restores(refit_setup):
    plan, source, fake, base = refit_setup
    w1 = base["w"] + np.float16(1)
    trt_engine = TrtEngine(plan, stream=fake_stream(), weights={"w": w1}, source=source).activate()
    assert fake.refits == 1 and np.array_equal(fake.weights["w"], w1)
    assert np.array_equal(fake.weights["b"], base["b"])  # reported missing: the source's value
    v1 = base["v"] * np.float16(2)
    trt_engine.set_weights({"v": v1})  # w goes back to the base, not w1 + anything
    assert np.array_equal(fake.weights["w"], base["w"]) and np.array_equal(fake.weights["v"], v1)
    trt_engine.set_weights({})
    assert all(np.array_equal(fake.weights[k], base[k]) for k in base) and fake.refits == 3
    with pytest.raises(EngineError, match=r"TensorRT rejected weights 'w' \(float32\[4, 4\]\)"):
        trt_engine.set_weights({"w": base["w"].astype(np.float32)})
    fake.refittable = False
    with pytest.raises(EngineError, match="was not built refittable; LoRA on TensorRT needs artrt build --backend trt "
                                          "--refittable --rebuild"):
        trt_engine.set_weights({"w": w1})


def test_build_refittable_plans(package_copy, fake_gpu, monkeypatch):  # noqa: F811
    trt = fake_gpu()
    flags = []
    monkeypatch.setattr(_FakeConfig, "set_flag", lambda self, flag: flags.append(flag), raising=False)
    trt.BuilderFlag = types.SimpleNamespace(REFIT="refit")
    refittable = {"value": False}
    trt.Runtime = lambda logger: types.SimpleNamespace(
        deserialize_cuda_engine=lambda plan: types.SimpleNamespace(refittable=refittable["value"]))
    build_engines(package_copy, BuildRequest(height=32, width=32))
    assert len(trt.builds) == 5 and flags == []
    assert "--refittable" not in build_command(package_copy, read_manifest(package_copy), rebuild=True)
    build_engines(package_copy, BuildRequest(height=32, width=32, refittable=True))  # not refittable: rebuilt
    assert len(trt.builds) == 10 and flags == ["refit"] * 5
    refittable["value"] = True
    build_engines(package_copy, BuildRequest(height=32, width=32, refittable=True))
    assert len(trt.builds) == 10  # up to date
    manifest = read_manifest(package_copy)
    assert find_record(manifest, "expert_composition", "trt").refittable
    # a rebuild hint (stale engine, shape outside the profile) keeps the plans refittable
    assert build_command(package_copy, manifest, rebuild=True).split()[3:] == \
        ["--backend", "trt", "--rebuild", "--refittable", "--height", "32", "--width", "32", "--batch", "1"]
    with pytest.raises(InputError, match="--refittable applies to --backend trt"):
        build_engines(package_copy, BuildRequest(backend="ort-cuda", refittable=True))
