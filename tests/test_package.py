"""Package writing and validation: hashes, sizes, paths inside the package, references."""

from __future__ import annotations

import json

import pytest

from artrt.errors import PackageError
from artrt.runtime.package import MANIFEST_NAME, read_manifest


def _edit_manifest(root, change) -> None:
    path = root / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_manifest_lists_every_file_with_its_hash(sdxl_package):
    m = read_manifest(sdxl_package)
    names = {f.path for f in m.files}
    assert {c.onnx for c in m.components.values()} <= names
    assert {c.onnx_fp16 for c in m.components.values() if c.kind != "vae_decoder"} <= names  # fp16 by default
    assert {t.file for t in m.tokenizers.values()} <= names
    assert m.family == "sdxl-ensemble"
    assert [e.name for e in m.experts] == ["composition", "detail"]
    assert m.experts[1].conditioning.text_encoders == ("text_encoder_2",)  # shared, not exported twice
    assert m.experts[1].conditioning.time_ids == "aesthetic"
    assert set(m.components) == {"text_encoder", "text_encoder_2", "expert_composition", "expert_detail", "vae_decoder"}


def test_missing_package(tmp_path):
    with pytest.raises(PackageError, match="not found"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(PackageError, match="artrt.json is missing"):
        read_manifest(tmp_path)


def test_corrupt_file_same_size_is_caught_by_hash(package_copy):
    onnx = package_copy / "vae_decoder" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="sha256"):
        read_manifest(package_copy)
    read_manifest(package_copy, verify_hashes=False)  # sizes still agree


def test_truncated_or_missing_file(package_copy):
    onnx = package_copy / "expert_detail" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:100])
    with pytest.raises(PackageError, match="bytes"):
        read_manifest(package_copy, verify_hashes=False)
    onnx.unlink()
    with pytest.raises(PackageError, match="missing"):
        read_manifest(package_copy, verify_hashes=False)


@pytest.mark.parametrize("bad_path", ["../outside.onnx", "/etc/passwd", "text_encoder/../../x.onnx"])
def test_paths_must_stay_inside_the_package(package_copy, bad_path):
    def point_outside(data):
        data["files"][0]["path"] = bad_path
        data["components"]["text_encoder"]["onnx"] = bad_path

    _edit_manifest(package_copy, point_outside)
    with pytest.raises(PackageError, match="outside the package|absolute"):
        read_manifest(package_copy)


def test_manifest_that_is_not_json(package_copy):
    (package_copy / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        read_manifest(package_copy)


def test_unknown_format_version(package_copy):
    _edit_manifest(package_copy, lambda d: d.update(format_version=99))
    with pytest.raises(PackageError, match="format_version 99"):
        read_manifest(package_copy)


def test_dangling_reference(package_copy):
    _edit_manifest(package_copy, lambda d: d["experts"][0].update(component="nothing"))
    with pytest.raises(PackageError, match="unknown component 'nothing'"):
        read_manifest(package_copy)


def test_missing_key(package_copy):
    _edit_manifest(package_copy, lambda d: d.pop("experts"))
    with pytest.raises(PackageError, match="malformed manifest"):
        read_manifest(package_copy)
