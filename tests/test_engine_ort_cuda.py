"""ort-cuda: provider options, the CUDA EP check, graph-id bookkeeping, and the CUDA fusion.

Without a GPU these run against the installed (CPU) onnxruntime, fakes for the device
buffers and session, and a tiny fp16 fused step. Tests marked ``gpu`` compare real
CUDA runs with ORT CPU and need onnxruntime-gpu.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from artrt.engines.cuda import gpu_available
from artrt.engines.ort_cuda import OrtCudaEngine, cuda_provider_options
from artrt.errors import EngineError, InputError

HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not (gpu_available() and HAS_CUDA_EP), reason="needs a GPU and onnxruntime-gpu")
LATENT = (1, 4, 8, 8)


def step_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """Host inputs of the tiny fused step (SDXL-style conditioning: 32-wide text, 6 time ids)."""
    rng = np.random.default_rng(seed)
    latents = {n: rng.standard_normal(LATENT, np.float32) for n in ("sample", "denoised_prev", "noise")}
    return {
        **latents,
        "step": np.array([0.3, 500.0, 1.0, -2.0, 5.0, 0.9, 0.1, -0.05, 0.2], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float16),
        "text_embeds": rng.standard_normal((2, 16)).astype(np.float16),
        "time_ids": np.array([[64, 64, 0, 0, 64, 64]] * 2, np.float16),
    }


@pytest.fixture(scope="module")
def step_graphs(tmp_path_factory) -> dict[str, Path]:
    """The tiny fused step exported in fp16 (network in half precision) and fp32, static shapes
    (symbolic shape inference in the optimizer is several times slower on dynamic axes)."""
    torch = pytest.importorskip("torch")
    from artrt.export.graphs import FusedStepGraph
    from artrt.export.onnx_io import export_onnx
    from artrt.export.random_models import SIZES, _unet

    out = tmp_path_factory.mktemp("ort_cuda")
    torch.manual_seed(0)
    unet = _unet(SIZES["tiny"], 32, 6).eval()
    graphs = {}
    for precision, module in (("fp32", unet), ("fp16", copy.deepcopy(unet).half())):
        feeds = {k: torch.from_numpy(v) for k, v in step_inputs().items()}
        if precision == "fp32":
            feeds = {k: v.float() for k, v in feeds.items()}
        path = out / f"step_{precision}.onnx"
        export_onnx(FusedStepGraph(module, True).eval(), feeds, ["next_sample", "denoised"], {}, path)
        graphs[precision] = path
    return graphs


# -- provider options and activation (no GPU) -------------------------------------------------
def test_provider_options_are_strings_with_stream_and_graphs():
    options = cuda_provider_options(device_id=1, stream=0x7F00_1234, cuda_graph=True)
    assert all(isinstance(v, str) for v in options.values())
    assert options["device_id"] == "1" and options["enable_cuda_graph"] == "1"
    assert options["user_compute_stream"] == str(0x7F00_1234) and options["has_user_compute_stream"] == "1"
    plain = cuda_provider_options(stream=0, cuda_graph=False)
    assert plain["enable_cuda_graph"] == "0" and "user_compute_stream" not in plain


@pytest.mark.skipif(HAS_CUDA_EP, reason="onnxruntime here has the CUDA EP")
def test_activation_without_cuda_ep_raises(step_graphs):
    with pytest.raises(EngineError, match="onnxruntime-gpu with a working CUDA EP is required for ort-cuda; "
                                          "installed onnxruntime .* has providers"):
        OrtCudaEngine(step_graphs["fp16"]).activate()


@pytest.mark.skipif(HAS_CUDA_EP, reason="onnxruntime here has the CUDA EP")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available")
def test_session_that_falls_back_to_cpu_is_refused(step_graphs, monkeypatch):
    """A CUDA EP that is listed but does not load: ORT falls back to the CPU; the engine refuses."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(EngineError, match=r"the session got \['CPUExecutionProvider'\]"):
        OrtCudaEngine(step_graphs["fp16"], cuda_graph=False).activate()


# -- binding and graph ids with fakes (no GPU) ------------------------------------------------
@dataclass
class FakeArray:
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype = np.dtype(np.float32)


@dataclass
class FakeNode:
    name: str
    type: str
    shape: list


class FakeIOBinding:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def bind_input(self, *args) -> None:
        self.calls.append(("in", *args))

    def bind_output(self, *args) -> None:
        self.calls.append(("out", *args))


class FakeSession:
    def __init__(self) -> None:
        self.runs: list[tuple] = []

    def get_inputs(self) -> list[FakeNode]:
        return [FakeNode("sample", "tensor(float)", list(LATENT))]

    def get_outputs(self) -> list[FakeNode]:
        return [FakeNode("next_sample", "tensor(float)", list(LATENT))]

    def io_binding(self) -> FakeIOBinding:
        return FakeIOBinding()

    def run_with_iobinding(self, io, run_options) -> None:
        self.runs.append((io, run_options.get_run_config_entry("gpu_graph_id")))


@dataclass
class FakeStream:
    handle: int = 0xBEEF
    capturing: bool = False


def fake_engine(**kwargs) -> OrtCudaEngine:
    engine = OrtCudaEngine("step.onnx", **kwargs)
    engine._session, engine._active = FakeSession(), True
    return engine


def test_graph_ids_follow_the_bound_buffers():
    engine = fake_engine(stream=FakeStream())
    a, b, c = FakeArray(0x1000, LATENT), FakeArray(0x2000, LATENT), FakeArray(0x3000, LATENT)
    even = engine.bind({"sample": a}, {"next_sample": b})
    odd = engine.bind({"sample": b}, {"next_sample": a})  # ping-pong: same buffers, other roles
    again = engine.bind({"sample": a}, {"next_sample": b})
    fresh = engine.bind({"sample": a}, {"next_sample": c})
    assert (even.graph_id, odd.graph_id, again.graph_id, fresh.graph_id) == (1, 2, 1, 3)
    assert even.io is not again.io  # one IOBinding per call, one graph per set of buffers
    assert even.run_options.get_run_config_entry("gpu_graph_id") == "1"
    assert even.run_options.get_run_config_entry("disable_synchronize_execution_providers") == "1"
    assert even.io.calls[0] == ("in", "sample", "cuda", 0, np.dtype(np.float32), list(LATENT), 0x1000)
    engine.release()
    engine._session, engine._active = FakeSession(), True
    assert engine.bind({"sample": c}, {"next_sample": a}).graph_id == 1  # graphs went with the session


def test_graph_ids_change_with_shape_and_without_graphs():
    engine = fake_engine(stream=FakeStream())
    base = engine.bind({"sample": FakeArray(0x1000, LATENT)}, {"next_sample": FakeArray(0x2000, LATENT)})
    wide = (1, 4, 8, 16)
    engine._session.get_inputs = lambda: [FakeNode("sample", "tensor(float)", [1, 4, 8, "w"])]
    other = engine.bind({"sample": FakeArray(0x1000, wide)}, {"next_sample": FakeArray(0x2000, wide)})
    assert (base.graph_id, other.graph_id) == (1, 2)
    plain = fake_engine(cuda_graph=False)  # no stream either: ORT keeps synchronising
    binding = plain.bind({"sample": FakeArray(0x1000, LATENT)}, {"next_sample": FakeArray(0x2000, LATENT)})
    assert binding.graph_id == -1 and binding.run_options.get_run_config_entry("gpu_graph_id") == "-1"
    with pytest.raises(RuntimeError):  # ORT raises for a key that was never set
        binding.run_options.get_run_config_entry("disable_synchronize_execution_providers")


def test_run_bound_passes_the_binding_and_refuses_inside_a_capture():
    stream = FakeStream()
    engine = fake_engine(stream=stream)
    binding = engine.bind({"sample": FakeArray(0x1000, LATENT)}, {"next_sample": FakeArray(0x2000, LATENT)})
    engine.run_bound(binding)
    assert engine._session.runs == [(binding.io, "1")]
    stream.capturing = True
    with pytest.raises(EngineError, match="captures its own CUDA graphs"):
        engine.run_bound(binding)


def test_bind_checks_names_and_dtypes():
    engine = fake_engine()
    with pytest.raises(EngineError, match="is float16, graph wants float32"):
        engine.bind({"sample": FakeArray(0x1000, LATENT, np.dtype(np.float16))}, {"next_sample": FakeArray(0, LATENT)})
    with pytest.raises(EngineError, match="no buffer bound for output"):
        engine.bind({"sample": FakeArray(0x1000, LATENT)}, {})
    with pytest.raises(EngineError, match="output 'next_sample' overlaps input 'sample'"):  # 1 KiB each
        engine.bind({"sample": FakeArray(0x1000, LATENT)}, {"next_sample": FakeArray(0x1200, LATENT)})


# -- the CUDA fusion (runs on the CPU) ---------------------------------------------------------
def test_optimize_for_cuda_keeps_the_interface_of_an_fp16_step(step_graphs, tmp_path):
    from artrt.export.ort_optimize import fused_operators, interface, optimize_for_cuda, unsupported_sizes

    src = step_graphs["fp16"]
    out = optimize_for_cuda(src, tmp_path / "step.cuda.onnx", "unet")
    onnx.checker.check_model(str(out))
    before, after = onnx.load(str(src)), onnx.load(str(out))
    assert interface(after) == interface(before)
    dtypes = {name: onnx.helper.tensor_dtype_to_np_dtype(t).name for _, name, t in interface(after)}
    assert dtypes["sample"] == dtypes["step"] == dtypes["next_sample"] == dtypes["denoised"] == "float32"
    assert dtypes["encoder_hidden_states"] == "float16"
    fused = fused_operators(after)
    assert {"NhwcConv", "SkipLayerNormalization"} <= set(fused), fused
    # the tiny widths (GEGLU 256, 32 channels) are not ones the BiasSplitGelu/BiasAdd kernels take
    assert not {"BiasSplitGelu", "BiasAdd"} & set(fused) and not unsupported_sizes(after)
    with pytest.raises(Exception, match="NhwcConv"):  # a fused graph is for the CUDA EP only
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_unsupported_sizes_follow_the_cuda_kernels():
    from artrt.export.ort_optimize import unsupported_sizes

    def graph(op: str, width: int, **attrs: int) -> onnx.ModelProto:
        weight = onnx.numpy_helper.from_array(np.zeros(width, np.float32), "w")
        node = onnx.helper.make_node(op, ["x", "w"], ["y"], domain="com.microsoft", **attrs)
        return onnx.helper.make_model(onnx.helper.make_graph([node], "g", [], [], [weight]))

    assert unsupported_sizes(graph("BiasAdd", 640)) == {}
    assert unsupported_sizes(graph("BiasAdd", 96)) == {"BiasAdd": ["96"]}
    assert unsupported_sizes(graph("BiasSplitGelu", 10240)) == {}
    for channels, groups in ((128, 32), (320, 32), (1280, 32), (16, 8)):  # SD's VAE and UNet widths, tiny VAE
        assert unsupported_sizes(graph("GroupNorm", channels, groups=groups)) == {}
    assert unsupported_sizes(graph("SkipGroupNorm", 8, groups=8)) == {"SkipGroupNorm": ["8 channels in 8 groups"]}


def test_optimize_for_cuda_refuses_unknown_model_types(step_graphs, tmp_path):
    from artrt.export.ort_optimize import fusion_options, optimize_for_cuda

    with pytest.raises(InputError, match="unknown model type 'dit'"):
        optimize_for_cuda(step_graphs["fp16"], tmp_path / "x.onnx", "dit")
    assert not fusion_options("unet", fp16=True).enable_group_norm
    assert not fusion_options("vae", fp16=False).enable_packed_qkv


# -- real CUDA runs ----------------------------------------------------------------------------
def _assert_close(got: dict, want: dict, tolerance: float = 5e-2) -> None:
    for name, ref in want.items():
        scale = max(1.0, float(np.abs(ref).max()))
        assert np.abs(got[name].astype(np.float32) - ref).max() <= tolerance * scale, name


@gpu
@needs_gpu
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_run_matches_cpu(step_graphs, tmp_path, fused):
    from artrt.engines.ort import OrtCpuEngine
    from artrt.export.ort_optimize import optimize_for_cuda

    feeds = step_inputs(1)
    with OrtCpuEngine(step_graphs["fp32"]) as cpu:
        want = cpu.run({k: v.astype(np.float32) for k, v in feeds.items()})
    path = optimize_for_cuda(step_graphs["fp16"], tmp_path / "s.onnx", "unet") if fused else step_graphs["fp16"]
    with OrtCudaEngine(path, cuda_graph=False) as engine:
        _assert_close(engine.run(feeds), want)


@gpu
@needs_gpu
def test_bound_runs_with_cuda_graphs_match_the_host_path(step_graphs):
    from artrt.engines.cuda import DeviceArray, Stream

    stream = Stream()
    with OrtCudaEngine(step_graphs["fp16"], stream=stream) as engine:
        feeds = step_inputs(2)
        want = engine.run(feeds)
        inputs = {k: DeviceArray.empty(v.shape, v.dtype) for k, v in feeds.items()}
        outputs = {k: DeviceArray.empty(v.shape, v.dtype) for k, v in want.items()}
        binding = engine.bind(inputs, outputs)
        for i in range(5):  # two warm-up runs, the capture, then replays reading new inputs
            feeds = step_inputs(10 + i)
            for k, v in feeds.items():
                inputs[k].upload(v, stream)
            engine.run_bound(binding)
            got = {k: a.download(stream) for k, a in outputs.items()}
            _assert_close(got, engine.run(feeds), tolerance=1e-3)
