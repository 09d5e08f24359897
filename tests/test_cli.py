"""The command line: every bad input ends with one clear line and a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from artrt.runtime.cli import main
from artrt.runtime.images import read_parameters


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int, err: str, pattern: str) -> None:
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("artrt: error:")]
    assert len(lines) == 1, err
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in err


def test_generate_writes_png_with_parameters(capsys, sdxl_package, tmp_path):
    out = tmp_path / "img.png"
    code, _, err = _run(capsys, "generate", "a lighthouse", "--model", sdxl_package, "-o", out,
                        "--steps", 4, "--seed", 7, "--num-images", 2, "--guidance", 4, 6)
    assert code == 0, err
    params = read_parameters(out)
    assert params["prompt"] == "a lighthouse" and params["seed"] == 7 and params["guidance"] == [4.0, 6.0]
    assert read_parameters(tmp_path / "img-1.png")["index"] == 1
    assert "timings" in err


def test_same_seed_same_image_other_seed_differs(sdxl_pipe):
    a = sdxl_pipe.generate("x", steps=3, seed=1).images[0].tobytes()
    assert sdxl_pipe.generate("x", steps=3, seed=1).images[0].tobytes() == a
    assert sdxl_pipe.generate("x", steps=3, seed=2).images[0].tobytes() != a


def test_info(capsys, sdxl_package):
    code, out, _ = _run(capsys, "info", sdxl_package)
    assert code == 0
    assert "sdxl-ensemble" in out and "expert_detail" in out and "sha256 verified" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--height", "34"], "multiple of"),
        (["--width", "30"], "multiple of"),
        (["--steps", "0"], "steps must be"),
        (["--switch", "1.5"], "switch must be in [0, 1]"),
        (["--switch", "-0.1"], "switch must be in [0, 1]"),
        (["--sampler", "heun"], "unknown sampler 'heun'"),
        (["--guidance", "1", "2", "3"], "guidance takes 1 or 2 values"),
        (["--num-images", "0"], "--num-images must be"),
        (["--backend", "tpu"], "unknown backend 'tpu'"),
    ],
)
def test_bad_generation_arguments(capsys, sdxl_package, tmp_path, extra, message):
    code, _, err = _run(capsys, "generate", "p", "--model", sdxl_package, "-o", tmp_path / "o.png", *extra)
    _assert_one_line_error(code, err, message)
    assert not (tmp_path / "o.png").exists()


def test_missing_package(capsys, tmp_path):
    code, _, err = _run(capsys, "generate", "p", "--model", tmp_path / "none", "-o", tmp_path / "o.png")
    _assert_one_line_error(code, err, "not found")
    code, _, err = _run(capsys, "info", tmp_path)
    _assert_one_line_error(code, err, "not an artrt package")


def test_corrupt_package(capsys, package_copy, tmp_path):
    onnx = package_copy / "expert_composition" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[-10] ^= 0xFF
    onnx.write_bytes(bytes(data))
    code, _, err = _run(capsys, "generate", "p", "--model", package_copy, "-o", tmp_path / "o.png")
    _assert_one_line_error(code, err, "sha256")


def test_manifest_pointing_outside(capsys, package_copy, tmp_path):
    path = package_copy / "artrt.json"
    data = json.loads(path.read_text())
    record = next(f for f in data["files"] if f["path"] == data["tokenizers"]["text_encoder"]["file"])
    data["tokenizers"]["text_encoder"]["file"] = record["path"] = "../../etc/passwd"
    path.write_text(json.dumps(data))
    code, _, err = _run(capsys, "info", package_copy)
    _assert_one_line_error(code, err, "outside the package")


def test_unwritable_output(capsys, sdxl_package, tmp_path):
    code, _, err = _run(capsys, "generate", "p", "--model", sdxl_package, "-o", tmp_path / "no" / "o.png")
    _assert_one_line_error(code, err, "does not exist")
    code, _, err = _run(capsys, "generate", "p", "--model", sdxl_package, "-o", tmp_path / "o.jpg")
    _assert_one_line_error(code, err, "must end in .png")
    not_a_directory = tmp_path / "notes.txt"  # a file where the directory should be: unwritable for root too
    not_a_directory.write_text("kept")
    code, _, err = _run(capsys, "generate", "p", "--model", sdxl_package, "-o", not_a_directory / "o.png")
    _assert_one_line_error(code, err, f"directory {not_a_directory} does not exist")
    assert not_a_directory.read_text() == "kept"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only directory (CI runs as root)")
def test_output_in_a_read_only_directory(capsys, sdxl_package, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = _run(capsys, "generate", "p", "--model", sdxl_package, "-o", locked / "o.png")
    _assert_one_line_error(code, err, "not writable")


def test_export_errors(capsys, models_dir, tmp_path):
    code, _, err = _run(capsys, "export", "--base", tmp_path / "x", "--refiner", tmp_path / "y",
                        "--out", tmp_path / "p")
    _assert_one_line_error(code, err, "folder not found")
    code, _, err = _run(capsys, "export", "--base", models_dir / "base", "--refiner", models_dir / "refiner",
                        "--out", tmp_path / "p", "--switch", "2")
    _assert_one_line_error(code, err, "switch must be in [0, 1]")
    code, _, err = _run(capsys, "export", "--base", models_dir / "detail_unet", "--detail-unet",
                        models_dir / "detail_unet", "--out", tmp_path / "p")
    _assert_one_line_error(code, err, "not a diffusers pipeline folder")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate"])
    assert exc.value.code == 2


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "artrt.runtime.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("export", "build", "generate", "info"):
        assert command in out.stdout


@pytest.mark.parametrize("command, options", [
    ("build", ["--backend", "--height", "--batch", "--dynamic", "--min-size", "--max-size", "--max-batch",
               "--opt-level", "--timing-cache", "--rebuild", "TensorRT"]),
    ("export", ["--precision", "--fp16-vae", "fp16"]),
])
def test_subcommand_help(capsys, command, options):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in options:
        assert option in out


def test_build_errors(capsys, package_copy, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without TensorRT
    code, _, err = _run(capsys, "build", package_copy, "--height", 32, "--width", 32)
    _assert_one_line_error(code, err, "TensorRT is not installed")
    code, _, err = _run(capsys, "build", package_copy, "--min-size", 16)
    _assert_one_line_error(code, err, "--min-size only apply with --dynamic")
    code, _, err = _run(capsys, "build", package_copy, "--height", 30)
    _assert_one_line_error(code, err, "--height must be a positive multiple of 4")
    code, _, err = _run(capsys, "build", tmp_path / "none")
    _assert_one_line_error(code, err, "not found")
    assert not (package_copy / "engines").exists()


def test_info_lists_fp16_graphs_and_engines(capsys, package_copy):
    code, out, _ = _run(capsys, "info", package_copy)
    assert code == 0 and "ONNX fp16 - PyTorch fp32" in out and "none built" in out


def test_export_cli_end_to_end(capsys, models_dir, tmp_path):
    out = tmp_path / "pkg"
    code, _, err = _run(capsys, "export", "--base", models_dir / "base", "--detail-unet",
                        models_dir / "detail_unet", "--out", out, "--switch", "0.7", "--precision", "fp32")
    assert code == 0, err
    assert "max abs error" in err
    manifest = json.loads((out / "artrt.json").read_text())
    assert all(c["onnx_fp16"] is None for c in manifest["components"].values())
    assert not list(out.glob("*/model_fp16.onnx"))
    code, _, err = _run(capsys, "export", "--base", models_dir / "base", "--detail-unet",
                        models_dir / "detail_unet", "--out", out)
    _assert_one_line_error(code, err, "already exists")
    assert not Path(str(out) + ".partial").exists()


def test_info_shows_component_and_package_sizes(capsys, sdxl_package):
    from artrt.runtime.package import read_manifest

    m = read_manifest(sdxl_package, verify_hashes=False)
    assert main(["info", str(sdxl_package), "--no-verify"]) == 0
    out = capsys.readouterr().out
    total = sum(f.size for f in m.files)
    assert f"size      {total / 1e6:.1f} MB: graphs {total / 1e6:.1f} MB, engines 0.0 MB" in out
    unet = next(line for line in out.splitlines() if line.strip().startswith("expert_composition "))
    assert "fp32 " in unet and "fp16 " in unet and "cpu " in unet
