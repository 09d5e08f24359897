"""``artrt build``: optimization profiles, and the build against a stand-in for TensorRT.

TensorRT cannot be installed here: the build is driven through a fake ``tensorrt``
module that records what it is asked (flags, profiles, optimization level, timing
cache), and every TensorRT name the builder uses (read from its source) is checked
against the ``tensorrt-stubs`` 10.13 .pyi files vendored in tests/data. ``ort-cuda``
builds run a stand-in for ``optimize_for_cuda`` (the real optimizer takes seconds per
UNet, even tiny ones).
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import onnx
import pytest
from trt_api import load_stubs, missing_from, module_attributes, tensorrt_uses, wrong_calls

from artrt.errors import BuildError, InputError, StaleEngineError
from artrt.export.build import BuildRequest, DynamicRange, build_engines, plan_profiles
from artrt.runtime.engine_records import SystemInfo, component_file, find_record
from artrt.runtime.package import read_manifest


def test_static_profiles(sdxl_package):
    m = read_manifest(sdxl_package)  # latent scale 2, size multiple 4
    step = plan_profiles(m, "expert_composition", 48, 32, 3)
    assert step["sample"] == ((3, 4, 24, 16),) * 3
    assert step["encoder_hidden_states"] == ((6, 77, 32),) * 3
    assert step["time_ids"] == ((6, 6),) * 3 and step["step"] == ((9,),) * 3
    assert plan_profiles(m, "expert_detail", 48, 32, 3)["time_ids"] == ((6, 5),) * 3
    assert plan_profiles(m, "text_encoder", 48, 32, 3) == {"input_ids": ((2, 77),) * 3}
    assert plan_profiles(m, "vae_decoder", 48, 32, 3) == {"latents": ((3, 4, 24, 16),) * 3}


def test_dynamic_profiles(sdxl_package):
    m = read_manifest(sdxl_package)
    step = plan_profiles(m, "expert_composition", 32, 32, 2, DynamicRange(16, 64, 4))
    assert step["sample"] == ((1, 4, 8, 8), (2, 4, 16, 16), (4, 4, 32, 32))
    assert step["text_embeds"] == ((2, 16), (4, 16), (8, 16))
    default = plan_profiles(m, "vae_decoder", 32, 40, 1, DynamicRange())
    assert default["latents"] == ((1, 4, 8, 8), (1, 4, 16, 20), (1, 4, 30, 30))  # 16..60 px: half / 1.5x
    assert plan_profiles(m, "text_encoder", 32, 32, 2, DynamicRange())["input_ids"] == ((2, 77),) * 3


@pytest.mark.parametrize("args, message", [
    ((30, 32, 1, None), "--height must be a positive multiple of 4"),
    ((32, 32, 0, None), "--batch must be at least 1"),
    ((32, 32, 2, DynamicRange(max_batch=1)), "--max-batch 1 is smaller"),
    ((32, 32, 1, DynamicRange(min_size=48)), "must bracket"),
    ((32, 32, 1, DynamicRange(max_size=42)), "--max-size must be a positive multiple"),
])
def test_bad_profile_requests(sdxl_package, args, message):
    with pytest.raises(InputError, match=re.escape(message)):
        plan_profiles(read_manifest(sdxl_package), "expert_composition", *args)


# -- building with a stand-in TensorRT ------------------------------------------------
def _fake_tensorrt(version: str = "10.13.0.35", parse_ok: bool = True, build_ok: bool = True):
    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.builds, trt.caches = version, [], []
    trt.ILogger = type("ILogger", (), {"__init__": lambda self: None})
    trt.IProgressMonitor = type("IProgressMonitor", (), {"__init__": lambda self: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.Builder = lambda logger: types.SimpleNamespace(
        create_network=lambda flags: types.SimpleNamespace(flags=flags, tensors=[], num_inputs=0),
        create_builder_config=lambda: _FakeConfig(trt.caches),
        create_optimization_profile=lambda: types.SimpleNamespace(shapes={}, set_shape=_set_shape),
        build_serialized_network=lambda network, config: _fake_build(trt, logger, network, config, build_ok),
    )
    trt.OnnxParser = lambda network, logger: _FakeParser(network, parse_ok)
    return trt


def _set_shape(name, low, opt, high):
    if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
        raise ValueError(f"bad shape for {name}")


class _FakeConfig:
    def __init__(self, caches):
        self.profiles, self.cache, self.progress_monitor, self.caches = [], None, None, caches

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data):
        self.caches.append(bytes(data))  # what was read from disk
        return types.SimpleNamespace(serialize=lambda: b"timings", combine=lambda other, ignore: True)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class _FakeParser:
    def __init__(self, network, ok):
        self.network, self.ok, self.num_errors = network, ok, 0

    def parse_from_file(self, path):
        if not self.ok:
            self.num_errors = 1
            return False
        graph = onnx.load(path, load_external_data=False).graph
        for v in graph.input:
            dims = tuple(d.dim_value if d.dim_value else -1 for d in v.type.tensor_type.shape.dim)
            self.network.tensors.append(types.SimpleNamespace(name=v.name, shape=dims))
        self.network.num_inputs = len(self.network.tensors)
        self.network.get_input = lambda i: self.network.tensors[i]
        return True

    def get_error(self, i):
        return types.SimpleNamespace(node=lambda: 7, node_name=lambda: "/unet/Conv_3", node_operator=lambda: "Conv",
                                     desc=lambda: "unsupported padding")


def _fake_build(trt, logger, network, config, ok):
    if not ok:
        logger.log(1, "out of device memory")
        return None
    config.progress_monitor.phase_start("Building engine", None, 3)
    trt.builds.append(network.tensors[0].name)
    return json.dumps({"flags": network.flags, "opt_level": config.builder_optimization_level}).encode()


@pytest.fixture()
def fake_gpu(monkeypatch):
    """A stand-in TensorRT 10.13 and an sm_89 GPU; returns a function swapping the TensorRT."""
    cuda = types.ModuleType("artrt.engines.cuda")
    cuda.device_info = lambda: types.SimpleNamespace(compute_capability=(8, 9), name="fake GPU")
    monkeypatch.setitem(sys.modules, "artrt.engines.cuda", cuda)

    def use(**kwargs):
        trt = _fake_tensorrt(**kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt

    use()
    return use


def test_build_records_every_plan_and_keeps_up_to_date_ones(package_copy, fake_gpu):
    trt = fake_gpu()
    m = build_engines(package_copy, BuildRequest(height=32, width=32, batch=1, opt_level=4))
    assert len(trt.builds) == 5 and trt.caches[0] == b"" and trt.caches[1] == b"timings"
    assert (package_copy / "engines" / "timing.cache").read_bytes() == b"timings"
    m = read_manifest(package_copy)  # plans are listed with their sha256 and verified
    record = find_record(m, "expert_composition", "trt")
    assert record.file == "engines/expert_composition.plan" and record.precision == "fp16"
    assert record.source == "expert_composition/model_fp16.onnx" and record.opt_level == 4
    assert (record.tensorrt_version, record.compute_capability) == ("10.13.0.35", "8.9")
    assert record.profile["sample"] == ((1, 4, 16, 16),) * 3
    assert find_record(m, "vae_decoder", "trt").precision == "fp32"
    plan = json.loads((package_copy / record.file).read_bytes())
    assert plan == {"flags": 2, "opt_level": 4}  # 1 << STRONGLY_TYPED
    system = SystemInfo("10.13.0.35", (8, 9))
    assert component_file(package_copy, m, "expert_composition", "trt", system) == package_copy / record.file

    build_engines(package_copy, BuildRequest(height=32, width=32))
    assert len(trt.builds) == 5  # all up to date
    build_engines(package_copy, BuildRequest(height=64, width=32))
    assert len(trt.builds) == 8  # experts and decoder; text encoders do not depend on the size
    cache = package_copy.parent / "elsewhere.cache"
    build_engines(package_copy, BuildRequest(height=64, width=32, rebuild=True, timing_cache=cache))
    assert len(trt.builds) == 13 and cache.read_bytes() == b"timings"

    trt = fake_gpu(version="11.4.0")
    with pytest.raises(StaleEngineError, match=r"built with TensorRT 10.13.0.35, running 11.4.0.*--rebuild"):
        component_file(package_copy, m, "text_encoder", "trt", SystemInfo("11.4.0", "8.9"))
    build_engines(package_copy, BuildRequest(height=64, width=32))
    assert len(trt.builds) == 5


def test_build_failures_name_the_node_and_leave_the_package_valid(package_copy, fake_gpu):
    fake_gpu(parse_ok=False)
    with pytest.raises(BuildError, match=r"node 7 '/unet/Conv_3' \(Conv\): unsupported padding"):
        build_engines(package_copy, BuildRequest())
    fake_gpu(build_ok=False)
    with pytest.raises(BuildError, match="out of device memory"):
        build_engines(package_copy, BuildRequest())
    assert read_manifest(package_copy).engines == ()
    assert not list((package_copy / "engines").glob("*.plan"))


def test_build_without_tensorrt_is_one_clear_error(package_copy, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    with pytest.raises(BuildError, match="TensorRT is not installed"):
        build_engines(package_copy, BuildRequest())
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # e.g. only the stubs
    with pytest.raises(BuildError, match="TensorRT is not installed"):
        build_engines(package_copy, BuildRequest())


def test_ort_cuda_build_records_fused_graphs(package_copy, monkeypatch):
    def optimize_for_cuda(src: Path, dst: Path, model_type: str) -> Path:
        dst.write_bytes(src.read_bytes() + model_type.encode())
        if model_type == "unet":  # as if the weights went to external data
            dst.with_name(dst.name + ".data").write_bytes(b"weights")
        return dst

    fake = types.ModuleType("artrt.export.ort_optimize")
    fake.optimize_for_cuda = optimize_for_cuda
    monkeypatch.setitem(sys.modules, "artrt.export.ort_optimize", fake)
    build_engines(package_copy, BuildRequest(backend="ort-cuda"))
    m = read_manifest(package_copy)
    record = find_record(m, "expert_detail", "ort-cuda")
    assert record.file == "engines/expert_detail.cuda.onnx" and record.precision == "fp16"
    assert record.extra_files == ("engines/expert_detail.cuda.onnx.data",)
    # Static by default: the expert step is fixed to the default size so ORT can capture it.
    assert record.profile["sample"] == ((1, 4, 16, 16),) * 3
    assert not find_record(m, "vae_decoder", "ort-cuda").profile
    assert (package_copy / record.file).read_bytes().endswith(b"unet")
    assert component_file(package_copy, m, "expert_detail", "ort-cuda") == package_copy / record.file
    assert not list((package_copy / "engines").glob(".*"))  # no scratch left


def test_tensorrt_names_used_by_the_builder_exist_in_tensorrt_10_13():
    """Every TensorRT name export/trt_build.py uses, read from its source (tests/trt_api.py),
    is in the tensorrt-stubs 10.13 .pyi files vendored in tests/data, with calls and the
    logger's and progress monitor's overrides matching a signature there."""
    from artrt.export import trt_build

    source = Path(trt_build.__file__).read_text()
    stubs = load_stubs()
    uses = tensorrt_uses(source, stubs)
    owners = {name.rpartition(".")[0] for name in uses.names}
    # The inference must follow the builder's objects, or it checks next to nothing.
    assert {"", "Builder", "IBuilderConfig", "INetworkDefinition", "OnnxParser", "ParserError", "ITimingCache",
            "ILogger", "IProgressMonitor"} <= owners, sorted(uses.names)
    assert module_attributes(source, "trt") <= uses.names
    assert uses.overrides, "the logger's and progress monitor's methods were not found"
    assert not uses.unresolved, f"uses on values whose type the stubs leave open: {uses.unresolved}"
    missing = missing_from(stubs, uses.names)
    assert not missing, f"not in TensorRT 10.13: { {name: uses.lines[name] for name in missing} }"
    assert not wrong_calls(stubs, uses)
