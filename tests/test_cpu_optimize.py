"""CPU graphs: exported attention fused into MultiHeadAttention, checked against the plain graph."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from artrt.export.cpu_optimize import CONTRIB_DOMAIN, fuse_attention, optimize_for_cpu
from artrt.runtime.engine_records import component_file
from artrt.runtime.package import read_manifest


def _ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_package_has_cpu_graphs_for_steps_and_decoder(sdxl_package):
    m = read_manifest(sdxl_package)
    listed = {f.path for f in m.files}
    for comp in m.components.values():
        if comp.kind == "text_encoder":  # CLIP's masked attention is left as it is
            assert comp.onnx_cpu is None
            continue
        assert comp.onnx_cpu == str(Path(comp.onnx).with_name("model_cpu.onnx")) and comp.onnx_cpu in listed
        ops = _ops(sdxl_package / comp.onnx_cpu)
        assert ops["MultiHeadAttention"] == _ops(sdxl_package / comp.onnx)["Softmax"] > 0
        assert ops["Softmax"] == 0
        assert component_file(sdxl_package, m, comp.name, "ort-cpu") == sdxl_package / comp.onnx_cpu


class _Attention(torch.nn.Module):
    """diffusers' attention block (self or cross) with its default SDPA processor, or raw
    ``scaled_dot_product_attention`` with an explicit ``scale``."""

    def __init__(self, dim: int, heads: int, cross_dim: int | None, scale: float | None = None) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.attn = Attention(dim, cross_attention_dim=cross_dim, heads=heads, dim_head=dim // heads)
        self.heads, self.scale = heads, scale

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        context = context if self.attn.is_cross_attention else x
        if self.scale is None:
            return self.attn(x, encoder_hidden_states=context if self.attn.is_cross_attention else None)
        b, heads = x.shape[0], self.heads
        q, k, v = (proj(t).view(b, -1, heads, proj.out_features // heads).transpose(1, 2)
                   for proj, t in ((self.attn.to_q, x), (self.attn.to_k, context), (self.attn.to_v, context)))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return out.transpose(1, 2).reshape(b, -1, self.attn.to_q.out_features)  # as diffusers does


def _export(module: torch.nn.Module, path: Path, context_width: int) -> None:
    x, context = torch.randn(2, 50, 32), torch.randn(2, 7, context_width)
    torch.onnx.export(module, (x, context), str(path), input_names=["x", "context"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch", 1: "tokens"}, "context": {0: "batch"}}, opset_version=17,
                      dynamo=False)


@pytest.mark.parametrize("cross, scale", [(False, None), (True, None), (False, 0.3), (True, 1.0)])
def test_fused_attention_matches_pytorch(tmp_path, cross, scale):
    torch.manual_seed(0)
    width = 24 if cross else 32
    module = _Attention(32, 4, width if cross else None, scale).eval()
    src, dst = tmp_path / "attention.onnx", tmp_path / "attention_cpu.onnx"
    _export(module, src, width)
    assert optimize_for_cpu(src, dst, {"batch": 3, "tokens": 20}) == {"MultiHeadAttention": 1}
    assert _ops(dst)["Softmax"] == 0
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((3, 33, 32), dtype=np.float32),
             "context": rng.standard_normal((3, 7, width), dtype=np.float32)}
    with torch.no_grad():
        expected = module(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    names = {i.name for i in session.get_inputs()}  # self-attention graphs do not read ``context``
    got = session.run(None, {k: v for k, v in feeds.items() if k in names})[0]
    assert np.max(np.abs(got - expected)) < 1e-5


def test_other_attention_forms_are_left_alone(tmp_path):
    """diffusers' non-SDPA processor (``scale_qk=False``: baddbmm scores) does not match."""
    from diffusers.models.attention_processor import Attention

    src = tmp_path / "attention.onnx"
    module = Attention(32, heads=4, dim_head=8, scale_qk=False).eval()
    torch.onnx.export(module, (torch.randn(2, 50, 32),), str(src), opset_version=17, dynamo=False)
    assert optimize_for_cpu(src, tmp_path / "attention_cpu.onnx") == {}
    assert not (tmp_path / "attention_cpu.onnx").exists()


def test_graph_without_attention_is_left_alone(tmp_path):
    src = tmp_path / "mlp.onnx"
    torch.onnx.export(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Softmax(-1)), (torch.randn(2, 8),),
                      str(src), opset_version=17, dynamo=False)
    model = onnx.load(str(src))
    assert fuse_attention(model) == 0
    assert not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import)
    assert optimize_for_cpu(src, tmp_path / "mlp_cpu.onnx") == {}
    assert not (tmp_path / "mlp_cpu.onnx").exists()


@pytest.mark.parametrize("name", ["expert_detail", "vae_decoder"])
def test_cpu_graph_matches_pytorch_on_new_shapes(models_dir, sdxl_package, name):
    """The fused graph at a batch and size it was neither traced nor checked with."""
    from test_export import BOUND, _inputs, _torch_components

    from artrt.engines import create_engine

    module = _torch_components(models_dir)[name].eval()
    inputs = _inputs(name, np.random.default_rng(0))
    m = read_manifest(sdxl_package)
    with create_engine("ort-cpu", sdxl_package / m.components[name].onnx_cpu, name=name) as engine:
        got = engine.run(inputs)
    with torch.no_grad():
        expected = module(*(torch.from_numpy(v) for v in inputs.values()))
    expected = (expected,) if isinstance(expected, torch.Tensor) else expected
    for out_name, ref in zip([o.name for o in m.components[name].outputs], expected):
        error = np.max(np.abs(got[out_name] - ref.numpy()))
        assert error < BOUND * max(1.0, float(np.max(np.abs(ref.numpy())))), (name, out_name, error)
