"""Engine records in the manifest: round trip, validation, every staleness reason, which
file each backend loads (a stale engine is refused on both GPU backends), and the request
size checked against the recorded profiles before any work."""

from __future__ import annotations

import json
import logging
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from artrt.errors import PackageError, StaleEngineError
from artrt.export.build import BuildRequest, DynamicRange, build_engines, plan_profiles
from artrt.runtime.engine_records import (
    EngineRecord,
    SystemInfo,
    build_command,
    check_profiles,
    component_file,
    engine_file_name,
    find_record,
    make_record,
    request_shapes,
    staleness,
    with_record,
)
from artrt.runtime.package import MANIFEST_NAME, read_manifest, write_manifest

PROFILE = {"sample": ((1, 4, 16, 16), (1, 4, 16, 16), (1, 4, 16, 16)), "step": ((9,),) * 3}
SYSTEM = SystemInfo("10.13.0.35", (8, 9))


def _add_engine(root, component="expert_composition", backend="trt", system=SYSTEM, profile=None):
    m = read_manifest(root)
    file = engine_file_name(component, backend)
    (root / "engines").mkdir(exist_ok=True)
    (root / file).write_bytes(f"{backend} engine of {component}".encode())
    profile = PROFILE if profile is None and backend == "trt" else profile
    record = make_record(root, m, component, backend, file, profile=profile, system=system, opt_level=3)
    write_manifest(root, with_record(root, m, record))
    return read_manifest(root), record


def test_manifest_round_trip_with_engines(package_copy):
    m, record = _add_engine(package_copy)
    assert find_record(m, "expert_composition", "trt") == record
    assert EngineRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert record.sha256 == next(f.sha256 for f in m.files if f.path == "engines/expert_composition.plan")
    assert record.compute_capability == "8.9" and record.onnxruntime_version is None
    m, again = _add_engine(package_copy)  # replaces, never duplicates
    assert len(m.engines) == 1 and sum(f.path == again.file for f in m.files) == 1


def test_engine_files_are_validated_with_a_rebuild_hint(package_copy):
    _add_engine(package_copy)
    (package_copy / "engines" / "expert_composition.plan").write_bytes(b"trt engine of expert_compositioX")
    with pytest.raises(PackageError, match="sha256.*rebuild it: artrt build .* --rebuild"):
        read_manifest(package_copy)
    read_manifest(package_copy, check_engines=False)  # what artrt build reads before replacing it


def test_engine_record_must_reference_listed_files_and_known_components(package_copy):
    _add_engine(package_copy)
    path = package_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["files"] = [f for f in data["files"] if not f["path"].startswith("engines/")]
    data["engines"][0]["component"] = "nothing"
    path.write_text(json.dumps(data))
    with pytest.raises(PackageError, match="unknown component 'nothing'.*engine file .* is not in 'files'"):
        read_manifest(package_copy)


def test_older_manifests_without_fp16_or_engines_still_read(package_copy):
    path = package_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data.pop("engines")
    for comp in data["components"].values():
        comp.pop("onnx_fp16"), comp.pop("export_check_fp16")
    path.write_text(json.dumps(data))
    m = read_manifest(package_copy)
    assert m.engines == () and all(c.onnx_fp16 is None and not c.export_check_fp16 for c in m.components.values())


def test_malformed_record():
    with pytest.raises(PackageError, match="malformed engine record"):
        EngineRecord.from_json({"component": "x", "backend": "trt"})
    assert issubclass(StaleEngineError, PackageError)


def test_every_staleness_reason(package_copy):
    m, record = _add_engine(package_copy)
    assert staleness(record, m, SYSTEM, {"sample": (1, 4, 16, 16)}) == []
    assert staleness(record, m, SystemInfo("11.4.0", "8.9")) == ["built with TensorRT 10.13.0.35, running 11.4.0"]
    assert staleness(record, m, SystemInfo("10.13.0.35", (9, 0))) == [
        "built for compute capability 8.9, this GPU is 9.0"]
    files = tuple(replace(f, sha256="0" * 64) if f.path == record.source else f for f in m.files)
    assert staleness(record, replace(m, files=files)) == [
        f"source ONNX changed (sha256 {record.onnx_sha256[:12]} at build, now 000000000000)"]
    comp = replace(m.components["expert_composition"], onnx_fp16=None)
    assert staleness(record, replace(m, components={**m.components, comp.name: comp})) == [
        "built from expert_composition/model_fp16.onnx, the package's graph is now expert_composition/model.onnx"]
    assert staleness(record, m, None, {"sample": (1, 4, 32, 16), "noise": (1, 4, 16, 16)}) == [
        "sample shape sample [1, 4, 32, 16] outside profile [min [1, 4, 16, 16], max [1, 4, 16, 16]]",
        "input noise has no optimization profile",
    ]
    _, fused = _add_engine(package_copy, backend="ort-cuda", system=SystemInfo(onnxruntime_version="1.20.0"))
    assert staleness(fused, m, SystemInfo(onnxruntime_version="1.31.1")) == [
        "made with onnxruntime 1.20.0, running 1.31.1"]


def test_component_file_per_backend(package_copy, caplog):
    root = package_copy
    m = read_manifest(root)
    assert component_file(root, m, "expert_detail", "ort-cpu") == root / "expert_detail/model_cpu.onnx"
    assert component_file(root, m, "text_encoder", "ort-cpu") == root / "text_encoder/model.onnx"  # no CPU graph
    assert component_file(root, m, "expert_detail", "ort-cuda") == root / "expert_detail/model_fp16.onnx"
    assert component_file(root, m, "vae_decoder", "ort-cuda") == root / "vae_decoder/model.onnx"  # no fp16 VAE
    with pytest.raises(StaleEngineError,
                       match=f"no TensorRT engine built for expert_detail: run artrt build {root} --backend trt$"):
        component_file(root, m, "expert_detail", "trt", SYSTEM)

    m, _ = _add_engine(root, "expert_detail", "ort-cuda", SystemInfo(onnxruntime_version="1.31.1"))
    fused = component_file(root, m, "expert_detail", "ort-cuda", SystemInfo(onnxruntime_version="1.31.1"))
    assert fused == root / "engines/expert_detail.cuda.onnx"

    m, _ = _add_engine(root, "expert_detail")
    assert component_file(root, m, "expert_detail", "trt", SYSTEM) == root / "engines/expert_detail.plan"
    with pytest.raises(StaleEngineError, match="no TensorRT engine built for text_encoder: run artrt build "
                       f"{root} --backend trt --height 32 --width 32 --batch 1$"):  # the size of the other plans
        component_file(root, m, "text_encoder", "trt", SYSTEM)
    with pytest.raises(StaleEngineError, match="stale: built for compute capability 8.9, this GPU is 9.0; "
                       f"run: artrt build {root} --backend trt --rebuild --height 32 --width 32 --batch 1$"):
        component_file(root, m, "expert_detail", "trt", SystemInfo("10.13.0.35", "9.0"))
    with pytest.raises(StaleEngineError, match="outside profile .* --rebuild --height 64 --width 48 --batch 2$"):
        component_file(root, m, "expert_detail", "trt", SYSTEM, {"sample": (2, 4, 32, 24)})


def test_stale_fused_graph_is_refused_with_the_rebuild_command(package_copy, caplog):
    root = package_copy
    m, record = _add_engine(root, "expert_detail", "ort-cuda", SystemInfo(onnxruntime_version="1.20.0"))
    with caplog.at_level(logging.WARNING), pytest.raises(StaleEngineError) as info:
        component_file(root, m, "expert_detail", "ort-cuda", SystemInfo(onnxruntime_version="1.31.1"))
    assert str(info.value) == (
        "fused ONNX Runtime CUDA graph engines/expert_detail.cuda.onnx is stale: made with onnxruntime 1.20.0, "
        f"running 1.31.1; run: artrt build {root} --backend ort-cuda --rebuild --dynamic"  # recorded without profile
    )
    assert "\n" not in str(info.value) and not caplog.records  # one line, and no silent fallback beside it

    # Another source ONNX (re-exported package), with a static fused step: the command rebuilds that size.
    static = {"sample": ((2, 4, 8, 12),) * 3}
    m, record = _add_engine(root, "expert_detail", "ort-cuda", SystemInfo(onnxruntime_version="1.31.1"), static)
    files = tuple(replace(f, sha256="0" * 64) if f.path == record.source else f for f in m.files)
    with pytest.raises(StaleEngineError, match=r"^fused ONNX Runtime CUDA graph engines/expert_detail.cuda.onnx is "
                       r"stale: source ONNX changed \(sha256 .*\); run: artrt build "
                       f"{root} --backend ort-cuda --rebuild --height 16 --width 24 --batch 2$"):
        component_file(root, replace(m, files=files), "expert_detail", "ort-cuda",
                       SystemInfo(onnxruntime_version="1.31.1"))
    # The running onnxruntime is the default system.
    import onnxruntime

    m, _ = _add_engine(root, "expert_detail", "ort-cuda", SystemInfo(onnxruntime_version="0.0.1"))
    with pytest.raises(StaleEngineError, match=f"made with onnxruntime 0.0.1, running {onnxruntime.__version__}"):
        component_file(root, m, "expert_detail", "ort-cuda")


def test_unbuilt_fused_graphs_run_the_package_onnx(package_copy, caplog):
    root = package_copy
    m = read_manifest(root)
    with caplog.at_level(logging.WARNING):
        for name in m.components:  # nothing built for ort-cuda: not stale, the fp16 (else fp32) ONNX runs
            comp = m.components[name]
            assert component_file(root, m, name, "ort-cuda") == root / (comp.onnx_fp16 or comp.onnx)
    assert not caplog.records
    m, _ = _add_engine(root, "expert_detail", "trt")  # plans do not count for ort-cuda
    assert component_file(root, m, "expert_detail", "ort-cuda") == root / "expert_detail/model_fp16.onnx"
    assert not caplog.records
    m, _ = _add_engine(root, "expert_detail", "ort-cuda", SystemInfo(onnxruntime_version="1.31.1"))
    with caplog.at_level(logging.WARNING):  # a partial build still runs, with a warning naming the command
        path = component_file(root, m, "expert_composition", "ort-cuda", SystemInfo(onnxruntime_version="1.31.1"))
    assert path == root / "expert_composition/model_fp16.onnx"
    assert f"no fused graph built (other components have one); running expert_composition/model_fp16.onnx; " \
           f"build it: artrt build {root} --backend ort-cuda --dynamic" in caplog.text


def _add_plans(root, height, width, batch, dynamic=None):
    """Record a plan for every component with the profile ``artrt build`` gives it."""
    m = read_manifest(root)
    (root / "engines").mkdir(exist_ok=True)
    for name in m.components:
        file = engine_file_name(name, "trt")
        (root / file).write_bytes(f"plan of {name}".encode())
        profile = plan_profiles(m, name, height, width, batch, dynamic)
        m = with_record(root, m, make_record(root, m, name, "trt", file, profile=profile, system=SYSTEM))
    write_manifest(root, m)
    return read_manifest(root)


def test_request_shapes_are_the_shapes_plans_are_built_for(sdxl_package):
    m = read_manifest(sdxl_package)
    for name in m.components:
        for height, width, batch in ((32, 32, 1), (48, 16, 3)):
            opt = {t: p[1] for t, p in plan_profiles(m, name, height, width, batch).items()}
            assert request_shapes(m, name, batch, height, width) == opt, name
    step = request_shapes(m, "expert_composition", 3, 48, 16)
    assert step["sample"] == (3, 4, 24, 8) and step["encoder_hidden_states"][0] == 6  # [uncond, cond] x 3
    assert request_shapes(m, "text_encoder", 3, 48, 16) == {"input_ids": (2, 77)}


def test_check_profiles_refuses_a_size_the_static_plans_were_not_built_for(package_copy):
    root = package_copy
    m = _add_plans(root, 32, 32, 1)
    check_profiles(root, m, "trt", 1, 32, 32)  # the built size passes
    with pytest.raises(StaleEngineError) as info:
        check_profiles(root, m, "trt", 1, 64, 48)
    assert str(info.value) == (
        "TensorRT engine engines/expert_composition.plan was built for 32x32 batch 1, requested 64x48 batch 1 "
        "(sample shape sample [1, 4, 32, 24] outside profile [min [1, 4, 16, 16], max [1, 4, 16, 16]]); "
        "nor do engines/expert_detail.plan, engines/vae_decoder.plan fit; "
        f"run: artrt build {root} --backend trt --height 64 --width 48 --batch 1"
    )
    with pytest.raises(StaleEngineError, match=r"built for 32x32 batch 1, requested 32x32 batch 2 \(sample shape "
                       rf"sample \[2, 4, 16, 16\].*; run: artrt build {root} --backend trt --height 32 --width 32 "
                       "--batch 2$"):
        check_profiles(root, m, "trt", 2, 32, 32)
    check_profiles(root, m, "ort-cpu", 2, 64, 48)  # plans do not matter to other backends
    check_profiles(root, m, "ort-cuda", 2, 64, 48)
    with pytest.raises(ValueError, match="unknown backend"):
        check_profiles(root, m, "cuda", 1, 32, 32)


def test_the_suggested_build_makes_the_request_fit(package_copy):
    """Rebuilt at the command's size (TensorRT stand-in: make_record with plan_profiles), the check passes."""
    root = package_copy
    m = _add_plans(root, 32, 32, 1)
    with pytest.raises(StaleEngineError) as info:
        check_profiles(root, m, "trt", 2, 64, 48)
    words = str(info.value).split("run: ")[1].split()
    flags = dict(zip(words[3::2], words[4::2]))
    assert words[:3] == ["artrt", "build", str(root)] and flags["--backend"] == "trt"
    m = _add_plans(root, int(flags["--height"]), int(flags["--width"]), int(flags["--batch"]))
    check_profiles(root, m, "trt", 2, 64, 48)


def test_check_profiles_accepts_sizes_inside_a_dynamic_range(package_copy):
    root = package_copy
    m = _add_plans(root, 32, 32, 1, DynamicRange(min_size=16, max_size=64, max_batch=3))
    for batch, height, width in ((1, 32, 32), (1, 16, 16), (3, 64, 64), (2, 16, 64), (3, 48, 20)):
        check_profiles(root, m, "trt", batch, height, width)
    for batch, height, width, tensor in ((4, 32, 32, "sample [4, 4, 16, 16]"), (1, 12, 32, "sample [1, 4, 6, 16]"),
                                         (1, 32, 68, "sample [1, 4, 16, 34]")):
        with pytest.raises(StaleEngineError, match=rf"built for 16..64x16..64 batch 1..3, requested {height}x{width} "
                           rf"batch {batch} \(sample shape {tensor.replace('[', '.').replace(']', '.')} outside .*; "
                           f"run: artrt build {root} --backend trt --height {height} --width {width} --batch {batch}$"):
            check_profiles(root, m, "trt", batch, height, width)
    # A stale dynamic plan is rebuilt with the same range.
    assert build_command(root, m, rebuild=True) == (
        f"artrt build {root} --backend trt --rebuild --height 32 --width 32 --batch 1 "
        "--dynamic --min-size 16 --max-size 64 --max-batch 3"
    )


@pytest.fixture()
def fake_fuser(monkeypatch):
    """``optimize_for_cuda`` stand-in (the real optimizer takes seconds per UNet), as in test_build."""
    def optimize_for_cuda(src: Path, dst: Path, model_type: str) -> Path:
        dst.write_bytes(src.read_bytes() + model_type.encode())
        return dst

    fake = types.ModuleType("artrt.export.ort_optimize")
    fake.optimize_for_cuda = optimize_for_cuda
    monkeypatch.setitem(sys.modules, "artrt.export.ort_optimize", fake)


def test_check_profiles_refuses_other_sizes_for_static_fused_graphs(package_copy, fake_fuser):
    root = package_copy
    m = build_engines(root, BuildRequest(backend="ort-cuda", height=32, width=48, batch=1))  # static steps
    assert find_record(m, "expert_detail", "ort-cuda").profile  # what the check relies on
    check_profiles(root, m, "ort-cuda", 1, 32, 48)
    with pytest.raises(StaleEngineError) as info:
        check_profiles(root, m, "ort-cuda", 2, 32, 48)
    assert str(info.value) == (
        "fused ONNX Runtime CUDA graph engines/expert_composition.cuda.onnx was built for 32x48 batch 1, requested "
        "32x48 batch 2 (sample shape sample [2, 4, 16, 24] outside profile [min [1, 4, 16, 24], max [1, 4, 16, 24]]); "
        "nor do engines/expert_detail.cuda.onnx fit; "  # the decoder's fused graph is dynamic
        f"run: artrt build {root} --backend ort-cuda --rebuild --height 32 --width 48 --batch 2"
    )
    check_profiles(root, m, "trt", 2, 32, 48)  # no plans: nothing to check


def test_dynamic_fused_graphs_run_any_size(package_copy, fake_fuser):
    root = package_copy
    m = build_engines(root, BuildRequest(backend="ort-cuda", dynamic=DynamicRange()))
    assert all(not find_record(m, name, "ort-cuda").profile for name in m.components)
    for batch, height, width in ((1, 32, 32), (4, 128, 16)):
        check_profiles(root, m, "ort-cuda", batch, height, width)
