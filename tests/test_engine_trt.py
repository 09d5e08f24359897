"""TensorRT backend and cuda-python helpers.

TensorRT cannot be installed here, so the engine runs against a small fake of the
TensorRT objects it uses, and every name it uses (read from its source) is checked against
the ``tensorrt-stubs`` 10.13 .pyi files in tests/data.
Device memory, streams, events and graphs are exercised for real only on a GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from trt_api import (
    OPEN_RETURNS,
    STUB_FILES,
    STUBS,
    Stubs,
    Uses,
    load_stubs,
    missing_from,
    module_attributes,
    tensorrt_uses,
    wrong_calls,
)

from artrt.engines import cuda, trt
from artrt.engines.cuda import DeviceArray, check, gpu_available
from artrt.engines.trt import TRT_API_USED, TrtEngine
from artrt.errors import EngineError

needs_gpu = pytest.mark.skipif(not gpu_available(), reason="needs an NVIDIA GPU, its driver and cuda-python")
SHAPE = (2, 4, 8, 8)


# -- the TensorRT names used exist in TensorRT 10.13's Python API ------------------------
# What engines/trt.py uses is read from its source (tests/trt_api.py), and checked against
# the tensorrt-stubs 10.13.0.35.1 .pyi files vendored in tests/data.
@pytest.fixture(scope="module")
def stubs() -> Stubs:
    return load_stubs()


@pytest.fixture(scope="module")
def engine_uses(stubs) -> Uses:
    return tensorrt_uses(Path(trt.__file__).read_text(), stubs)


def test_trt_names_used_by_the_engine_exist_in_tensorrt_10_13(stubs, engine_uses):
    assert stubs.version == "10.13.0.35"
    owners = {name.rpartition(".")[0] for name in engine_uses.names}
    # The inference must reach the objects behind the module, or it checks next to nothing.
    assert {"", "Runtime", "ICudaEngine", "IExecutionContext"} <= owners, sorted(engine_uses.names)
    assert module_attributes(Path(trt.__file__).read_text(), "trt") <= engine_uses.names
    assert not engine_uses.unresolved, f"uses on values whose type the stubs leave open: {engine_uses.unresolved}"
    missing = missing_from(stubs, engine_uses.names)
    assert not missing, f"not in TensorRT 10.13: { {name: engine_uses.lines[name] for name in missing} }"
    assert not wrong_calls(stubs, engine_uses)


def test_trt_api_used_lists_what_the_source_uses(engine_uses):
    """TRT_API_USED (a hand-kept list in engines/trt.py) says what the derivation finds:
    its leaves, without the classes and enums they are reached through."""
    listed = set(TRT_API_USED)
    reached_through = {name.rsplit(".", 1)[0] for name in listed if "." in name}
    assert engine_uses.names - listed <= reached_through, engine_uses.names - listed - reached_through
    assert listed <= engine_uses.names, listed - engine_uses.names


def test_the_api_check_reports_wrong_names_calls_and_overrides(stubs):
    source = """
import tensorrt as trt

def run(plan):
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    context.execute_async_v2([], 0)  # gone in TensorRT 10
    context.set_tensor_address("x")
    trt.get_plugin_registry().plugin_creator_list  # annotated `...` in the stubs
    return engine.num_bindings, trt.BuilderFlag.FP16

class Log(trt.ILogger):
    def log(self, severity):
        pass
"""
    uses = tensorrt_uses(source, stubs)
    assert missing_from(stubs, uses.names) == ["ICudaEngine.num_bindings", "IExecutionContext.execute_async_v2"]
    assert uses.unresolved == {"get_plugin_registry().plugin_creator_list"}
    problems = wrong_calls(stubs, uses)
    assert len(problems) == 2, problems
    assert "IExecutionContext.set_tensor_address called with 1 positional" in problems[0]
    assert "override ILogger.log(severity)" in problems[1]
    assert {"BuilderFlag.FP16", "Runtime.deserialize_cuda_engine", "ICudaEngine.create_execution_context"} <= uses.names
    for method, cls in OPEN_RETURNS.items():  # each stand-in for an open annotation is still needed
        owner, _, name = method.rpartition(".")
        assert [stubs.type_of(m.annotation) for m in stubs.member(owner, name)] == ["?"] and cls in stubs.classes


def test_stubs_alone_do_not_count_as_tensorrt(tmp_path):
    """What `pip install tensorrt-stubs --no-deps` leaves (an importable `tensorrt` namespace
    package) is reported as TensorRT missing everywhere."""
    for installed, kept in STUB_FILES.items():  # laid out as pip installs them
        (tmp_path / "site" / installed).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(STUBS / kept, tmp_path / "site" / installed)
    (tmp_path / "unet.plan").write_bytes(b"plan")
    code = """
import importlib.util, re
import tensorrt  # the namespace package
from artrt.engines import backend_problems, trt
from artrt.export.trt_build import import_tensorrt
from artrt.errors import BuildError, EngineError
assert importlib.util.find_spec("tensorrt") is not None and not trt.tensorrt_installed()
assert backend_problems()["trt"] == "TensorRT is not installed"
try:
    trt.TrtEngine("unet.plan").activate()
except EngineError as exc:
    assert trt.INSTALL_HINT in str(exc), exc
else:
    raise AssertionError("activated without TensorRT")
try:
    import_tensorrt()
except BuildError as exc:
    assert "TensorRT is not installed" in str(exc), exc
else:
    raise AssertionError("built without TensorRT")
"""
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)


# -- cuda helpers without a GPU -----------------------------------------------------------
def test_check_unpacks_values_and_names_errors():
    cudart = pytest.importorskip("cuda.bindings.runtime")
    ok = cudart.cudaError_t.cudaSuccess
    assert check((ok,), "cudaFree") is None
    assert check((ok, 7), "cudaMalloc") == 7
    assert check((ok, 1, 2), "f") == (1, 2)
    with pytest.raises(EngineError, match=r"cudaMalloc\(16 bytes\): cudaErrorInvalidValue \(1\)"):
        check((cudart.cudaError_t.cudaErrorInvalidValue, None), "cudaMalloc(16 bytes)")
    with pytest.raises(EngineError, match=r"cudaGraphLaunch: cudaError 901 \(901\)"):
        check((901,), "cudaGraphLaunch")


def test_gpu_available_never_raises(monkeypatch):
    def broken():
        raise EngineError("cuda-python is not installed")

    monkeypatch.setattr(cuda, "cudart", broken)
    assert gpu_available() is False


def test_modules_import_without_tensorrt_or_cuda_python(tmp_path):
    code = ("import sys; sys.modules['tensorrt'] = sys.modules['cuda'] = None\n"
            "import artrt.engines.trt, artrt.engines.cuda as c\n"
            "assert not c.gpu_available() and not artrt.engines.trt.tensorrt_installed()\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)  # cwd: the installed artrt


def test_device_array_views_and_checks_need_no_gpu():
    table = DeviceArray(0x1000, (3, 9), np.float32)
    row = table.row(2)
    assert (row.ptr, row.shape, row.dtype, row.nbytes) == (0x1000 + 2 * 36, (9,), np.float32, 36)
    row.free()  # a view never frees
    with pytest.raises(EngineError, match="row 3 out of range"):
        table.row(3)
    with pytest.raises(EngineError, match="upload of float64"):
        row.upload(np.zeros(9))
    with pytest.raises(EngineError, match="copy of float32"):
        table.copy_from(row, stream=None)


# -- the engine against a fake TensorRT ----------------------------------------------------
class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}
        self.calls = {"set_input_shape": 0, "set_tensor_address": 0, "execute_async_v3": 0}
        self.reject, self.memory = None, None

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)

    def set_input_shape(self, name, shape):
        self.calls["set_input_shape"] += 1
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return list(self.shapes["sample"])  # next_sample has the shape of sample

    def set_tensor_address(self, name, ptr):
        self.calls["set_tensor_address"] += 1
        self.addresses[name] = ptr
        return name != self.reject

    def execute_async_v3(self, stream_handle):
        self.calls["execute_async_v3"] += 1
        if self.engine.kernel:
            self.engine.kernel(self, stream_handle)
        return True


class FakeEngine:
    """The ICudaEngine calls the backend makes; ``kernel`` stands in for the network."""

    device_memory_size_v2 = 4096
    tensors = {  # name: (mode, shape, profile)
        "sample": ("in", [-1, 4, 8, 8], ([1, 4, 8, 8], [2, 4, 8, 8], [2, 4, 8, 8])),
        "step": ("in", [9], ([9], [9], [9])),
        "next_sample": ("out", [-1, 4, 8, 8], None),
    }
    num_io_tensors = len(tensors)
    get_tensor_name = lambda self, i: list(self.tensors)[i]
    get_tensor_mode = lambda self, name: self.tensors[name][0]
    get_tensor_dtype = lambda self, name: "float"
    get_tensor_shape = lambda self, name: self.tensors[name][1]
    get_tensor_profile_shape = lambda self, name, profile: self.tensors[name][2]

    def __init__(self, kernel=None):
        self.kernel = kernel

    def create_execution_context(self, strategy):
        assert strategy == "user-managed"
        self.context = FakeContext(self)
        return self.context


def fake_tensorrt(kernel=None) -> types.ModuleType:
    module = types.ModuleType("tensorrt")
    module.__version__ = "10.13.0.35"
    module.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
    module.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="user-managed")
    module.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    kinds = ("FLOAT", "HALF", "INT8", "INT32", "INT64", "UINT8", "BOOL")
    module.DataType = types.SimpleNamespace(**{kind: kind.lower() for kind in kinds})
    module.Runtime = type("Runtime", (), {
        "__init__": lambda self, logger: None,
        "deserialize_cuda_engine": lambda self, plan: FakeEngine(kernel) if plan == b"plan" else None,
    })
    return module


def fake_stream() -> types.SimpleNamespace:
    return types.SimpleNamespace(handle=0, capturing=False, synchronize=lambda: None)


@pytest.fixture()
def plan(tmp_path) -> Path:
    (tmp_path / "unet.plan").write_bytes(b"plan")
    return tmp_path / "unet.plan"


@pytest.fixture()
def engine(plan, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    with TrtEngine(plan, stream=fake_stream()) as active:
        active.set_scratch(DeviceArray(0x100000, (4096,), np.uint8))
        yield active


def buffers(ptr: int = 0x1000, batch: int = 2) -> tuple[dict, dict]:
    shape = (batch, 4, 8, 8)
    inputs = {"sample": DeviceArray(ptr, shape, np.float32), "step": DeviceArray(ptr + 0x10000, (9,), np.float32)}
    return inputs, {"next_sample": DeviceArray(ptr + 0x20000, shape, np.float32)}


def test_without_tensorrt_activate_names_the_install(plan, monkeypatch):
    for module in (None, types.ModuleType("tensorrt")):  # missing, or only the stubs' namespace package
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        with pytest.raises(EngineError, match=re.escape(trt.INSTALL_HINT)):
            TrtEngine(plan, stream=fake_stream()).activate()


def test_unloadable_plan_names_the_file(plan, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    plan.write_bytes(b"built elsewhere")
    with pytest.raises(EngineError, match=r"unet\.plan: built with another TensorRT version or for another GPU"):
        TrtEngine(plan, stream=fake_stream()).activate()


def test_specs_scratch_and_profile(engine):
    assert [(s.name, s.dtype, s.shape) for s in engine.inputs] == [
        ("sample", np.float32, ("sample.0", 4, 8, 8)), ("step", np.float32, (9,))]
    assert engine.outputs[0].name == "next_sample" and engine.scratch_size == 4096
    assert engine._context.memory == (0x100000, 4096)
    with pytest.raises(EngineError, match="scratch block of 100 bytes, TensorRT needs 4096"):
        engine.set_scratch(DeviceArray(0x200000, (100,), np.uint8))
    with pytest.raises(EngineError, match=r"'sample' has shape \[3, 4, 8, 8\].*min \[1, 4, 8, 8\].*max \[2, 4, 8, 8\]"):
        engine.bind(*buffers(batch=3))
    inputs, outputs = buffers()
    outputs["next_sample"] = DeviceArray(0x9000, (1, 4, 8, 8), np.float32)
    with pytest.raises(EngineError, match=r"output 'next_sample' bound as float32\[1, 4, 8, 8\]"):
        engine.bind(inputs, outputs)


def test_rebinding_only_when_the_binding_changes(engine):
    context = engine._context
    first, second = engine.bind(*buffers(0x1000)), engine.bind(*buffers(0x8000000))
    engine.run_bound(first)
    engine.run_bound(first)
    assert context.calls == {"set_input_shape": 2, "set_tensor_address": 3, "execute_async_v3": 2}
    engine.run_bound(second)
    assert context.calls["set_tensor_address"] == 6 and context.calls["set_input_shape"] == 2
    assert context.addresses["next_sample"] == 0x8000000 + 0x20000
    engine.run_bound(engine.bind(*buffers(0x1000)))
    assert context.calls["set_tensor_address"] == 9


def test_rejected_address_names_the_tensor(engine):
    engine._context.reject = "next_sample"
    with pytest.raises(EngineError, match="rejected address 0x21000 for tensor 'next_sample'"):
        engine.run_bound(engine.bind(*buffers()))


def test_capture_needs_an_eager_run_first(engine):
    binding = engine.bind(*buffers())
    engine.stream.capturing = True
    with pytest.raises(EngineError, match="must run once with these input shapes"):
        engine.run_bound(binding)
    engine.stream.capturing = False
    engine.run_bound(binding)
    engine.stream.capturing = True
    engine.run_bound(binding)  # warm now: may be captured
    with pytest.raises(EngineError, match="must run once"):
        engine.run_bound(engine.bind(*buffers(batch=1)))


# -- real device memory, streams, events and graphs -----------------------------------------
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("use_stream", [False, True])
def test_upload_download_roundtrip(use_stream):
    stream = cuda.Stream() if use_stream else None
    host = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    with DeviceArray.empty(host.shape, host.dtype) as array:
        array.upload(host, stream)
        np.testing.assert_array_equal(array.download(stream), host)
        row = DeviceArray.empty((3, 4), np.float16)
        row.copy_from(array.row(1), stream or cuda.Stream())
        np.testing.assert_array_equal(row.download(), host[1])
        row.free()
    info = cuda.device_info()
    assert re.fullmatch(r"\d+\.\d+", info.compute_capability) and info.total_memory > 0 and info.name


@pytest.mark.gpu
@needs_gpu
def test_graph_replays_copies_and_times_them():
    stream, start, end = cuda.Stream(), cuda.Event(), cuda.Event()
    src, dst = DeviceArray.empty((1024,), np.float32), DeviceArray.empty((1024,), np.float32)
    src.upload(np.zeros(1024, np.float32))
    with cuda.CudaGraph.capture(stream) as graph:
        start.record(stream)
        dst.copy_from(src, stream)
        end.record(stream)
    new = np.arange(1024, dtype=np.float32)
    src.upload(new, stream)
    graph.launch(stream)
    np.testing.assert_array_equal(dst.download(stream), new)
    assert end.elapsed_ms(start) >= 0.0
    graph.free()
    with pytest.raises(EngineError, match="after free"):
        graph.launch(stream)
    with pytest.raises(ValueError), cuda.CudaGraph.capture(stream):  # a failed body ends the capture
        raise ValueError
    assert not stream.capturing
    stream.synchronize()


@pytest.mark.gpu
@needs_gpu
def test_engine_runs_and_is_captured_on_the_device(plan, monkeypatch):
    def copy_kernel(context, stream_handle):  # "network": next_sample = sample
        rt = cuda.cudart()
        nbytes = int(np.prod(context.shapes["sample"])) * 4
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        check(rt.cudaMemcpyAsync(context.addresses["next_sample"], context.addresses["sample"], nbytes, kind,
                                 stream_handle), "copy")

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(copy_kernel))
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    with TrtEngine(plan) as engine:
        out = engine.run({"sample": x, "step": np.zeros(9, np.float32)})
        np.testing.assert_array_equal(out["next_sample"], x)
        inputs = {"sample": DeviceArray.empty(SHAPE, np.float32), "step": DeviceArray.empty((9,), np.float32)}
        outputs = {"next_sample": DeviceArray.empty(SHAPE, np.float32)}
        binding = engine.bind(inputs, outputs)
        inputs["sample"].upload(np.zeros(SHAPE, np.float32))
        engine.run_bound(binding)  # TensorRT runs once outside capture (runtime.denoise does the same)
        engine.stream.synchronize()
        with cuda.CudaGraph.capture(engine.stream) as graph:
            engine.run_bound(binding)
        inputs["sample"].upload(x)
        graph.launch(engine.stream)
        np.testing.assert_array_equal(outputs["next_sample"].download(engine.stream), x)
        graph.free()
