"""Engine records in the manifest: round trip, validation, every staleness reason, and
which file each backend loads."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest

from artrt.runtime.engine_records import (
    EngineRecord,
    StaleEngineError,
    SystemInfo,
    component_file,
    engine_file_name,
    find_record,
    make_record,
    staleness,
    with_record,
)
from artrt.runtime.errors import PackageError
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
    with pytest.raises(StaleEngineError, match=f"no TensorRT engine built for expert_detail: run artrt build {root}$"):
        component_file(root, m, "expert_detail", "trt", SYSTEM)

    m, _ = _add_engine(root, "expert_detail", "ort-cuda", SystemInfo(onnxruntime_version="1.31.1"))
    fused = component_file(root, m, "expert_detail", "ort-cuda", SystemInfo(onnxruntime_version="1.31.1"))
    assert fused == root / "engines/expert_detail.cuda.onnx"
    with caplog.at_level(logging.WARNING):
        fallback = component_file(root, m, "expert_detail", "ort-cuda", SystemInfo(onnxruntime_version="1.32.0"))
    assert fallback == root / "expert_detail/model_fp16.onnx" and "--backend ort-cuda --rebuild" in caplog.text

    m, _ = _add_engine(root, "expert_detail")
    assert component_file(root, m, "expert_detail", "trt", SYSTEM) == root / "engines/expert_detail.plan"
    with pytest.raises(StaleEngineError, match="no TensorRT engine built for text_encoder: run artrt build "
                       f"{root} --height 32 --width 32 --batch 1"):  # the size the other plans were built for
        component_file(root, m, "text_encoder", "trt", SYSTEM)
    with pytest.raises(StaleEngineError, match="stale: built for compute capability 8.9, this GPU is 9.0; "
                       f"run: artrt build {root} --rebuild --height 32 --width 32 --batch 1"):
        component_file(root, m, "expert_detail", "trt", SystemInfo("10.13.0.35", "9.0"))
    with pytest.raises(StaleEngineError, match="outside profile .* --rebuild --height 64 --width 48 --batch 2"):
        component_file(root, m, "expert_detail", "trt", SYSTEM, {"sample": (2, 4, 32, 24)})
