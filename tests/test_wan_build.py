"""``artrt build`` for Wan packages, without a GPU: profiles of every component (the experts'
``latent_frames`` from ``--frames``, ``text_length`` from the tokenizer, the decoder caches'
``latent_height_xK``), plans built through the stand-in TensorRT of tests/test_build.py (its
parser reads the real ONNX inputs, so a profile that misses a graph input, a rank or a fixed size
fails the build), static fused ONNX Runtime CUDA steps fixed to the frames, and the runtime's
check of a request's frames against the recorded profiles."""

from __future__ import annotations

import re
import shutil
import sys
import types
from pathlib import Path

import onnx
import pytest
from test_build import _fake_tensorrt  # the stand-in TensorRT (and its parser of the real ONNX)

from artrt.errors import BuildError, InputError, StaleEngineError
from artrt.export.build import BuildRequest, DynamicRange, build_engines, plan_profiles
from artrt.runtime.engine_records import (
    SystemInfo,
    build_command,
    check_profiles,
    component_file,
    find_record,
    request_shapes,
    text_length,
)
from artrt.runtime.package import read_manifest

HEIGHT, WIDTH = 32, 48  # latents 4 x 6 (scale 8)
STEP_INPUTS = ("sample", "sample_prev", "denoised_prev", "noise")


@pytest.fixture(scope="module")
def wan_package(tmp_path_factory):
    """The tiny random Wan 2.2 pair, exported lean for GPUs (--targets cuda: fp16 text encoder and
    experts, fp32 VAE decoders), as a GPU user builds it."""
    from artrt.export import export_package
    from artrt.export.wan_models import write_wan_pair
    from artrt.export.wan_package import load_wan

    root = tmp_path_factory.mktemp("wan-build")
    folder = write_wan_pair(root / "pair", size="tiny", seed=0)
    out = root / "pkg"
    export_package(load_wan(folder), out, steps=4, targets=("cuda",))
    return out


@pytest.fixture()
def wan_copy(wan_package, tmp_path):
    return Path(shutil.copytree(wan_package, tmp_path / "pkg"))


@pytest.fixture()
def fake_gpu(monkeypatch):
    """A stand-in TensorRT 10.13 and an sm_89 GPU (as tests/test_build.py's fixture)."""
    cuda = types.ModuleType("artrt.engines.cuda")
    cuda.device_info = lambda: types.SimpleNamespace(compute_capability=(8, 9), name="fake GPU")
    monkeypatch.setitem(sys.modules, "artrt.engines.cuda", cuda)
    trt = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


@pytest.fixture()
def fake_fuser(monkeypatch):
    """``optimize_for_cuda`` stand-in that keeps the input shapes of every graph it was given."""
    seen: dict[str, dict[str, list]] = {}

    def optimize_for_cuda(src: Path, dst: Path, model_type: str) -> Path:
        graph = onnx.load(str(src), load_external_data=False).graph
        seen[dst.name] = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                          for v in (*graph.input, *graph.output)}
        dst.write_bytes(src.read_bytes() + model_type.encode())
        return dst

    fake = types.ModuleType("artrt.export.ort_optimize")
    fake.optimize_for_cuda = optimize_for_cuda
    monkeypatch.setitem(sys.modules, "artrt.export.ort_optimize", fake)
    return seen


def test_manifest_dims_are_the_ones_build_sizes(wan_package):
    """What this file relies on: the Wan graphs' symbolic dimensions as exported."""
    m = read_manifest(wan_package)
    shapes = {(c, t.name): tuple(t.shape) for c, comp in m.components.items() for t in comp.inputs}
    assert shapes["text_encoder", "input_ids"] == ("batch", 512)
    assert shapes["expert_composition", "sample"] == ("batch", 16, "latent_frames", "latent_height", "latent_width")
    assert shapes["expert_detail", "encoder_hidden_states"] == ("cond_batch", "text_length", 32)
    assert shapes["vae_decoder", "latents"] == ("batch", 16, 1, "latent_height", "latent_width")
    axes = {d for c in ("vae_decoder_chunk",) for t in m.components[c].inputs for d in t.shape if isinstance(d, str)}
    assert {"latent_height_x2", "latent_width_x8"} <= axes
    assert text_length(m, "expert_composition") == text_length(m, "text_encoder") == 512


@pytest.mark.parametrize("frames, latent", [(1, 1), (5, 2), (9, 3)])
def test_static_profiles(wan_package, frames, latent):
    m = read_manifest(wan_package)
    step = plan_profiles(m, "expert_composition", HEIGHT, WIDTH, 2, frames=frames)
    for name in STEP_INPUTS:
        assert step[name] == ((2, 16, latent, 4, 6),) * 3
    assert step["step"] == ((13,),) * 3
    assert step["encoder_hidden_states"] == ((4, 512, 32),) * 3  # [uncond, cond] x 2 by the tokenizer's 512
    assert plan_profiles(m, "text_encoder", HEIGHT, WIDTH, 2, frames=frames) == {"input_ids": ((2, 512),) * 3}
    # the decoders take one latent frame per call whatever the frames
    assert plan_profiles(m, "vae_decoder", HEIGHT, WIDTH, 2, frames=frames) == {"latents": ((2, 16, 1, 4, 6),) * 3}
    chunk = plan_profiles(m, "vae_decoder_chunk", HEIGHT, WIDTH, 2, frames=frames)
    assert set(chunk) == {t.name for t in m.components["vae_decoder_chunk"].inputs}
    assert chunk["latents"] == ((2, 16, 1, 4, 6),) * 3
    assert chunk["cache_00"] == ((2, 16, 2, 4, 6),) * 3
    assert chunk["cache_10"] == ((2, 1, 2, 8, 12),) * 3  # latent_height_x2, latent_width_x2
    assert chunk["cache_19"] == ((2, 1, 2, 32, 48),) * 3  # x8: the full-size caches
    assert all(min(shape) >= 1 for shapes in chunk.values() for shape in shapes)


def test_dynamic_profiles(wan_package):
    m = read_manifest(wan_package)
    ranges = DynamicRange(min_size=16, max_size=64, max_batch=2, max_frames=9)
    step = plan_profiles(m, "expert_detail", HEIGHT, WIDTH, 1, ranges, frames=5)
    assert step["sample"] == ((1, 16, 1, 2, 2), (1, 16, 2, 4, 6), (2, 16, 3, 8, 8))
    assert step["encoder_hidden_states"] == ((2, 512, 32), (2, 512, 32), (4, 512, 32))
    chunk = plan_profiles(m, "vae_decoder_chunk", HEIGHT, WIDTH, 1, ranges, frames=5)
    assert chunk["cache_19"] == ((1, 1, 2, 16, 16), (1, 1, 2, 32, 48), (2, 1, 2, 64, 64))
    default = plan_profiles(m, "expert_detail", HEIGHT, WIDTH, 1, DynamicRange(), frames=5)
    assert default["sample"][0][2] == 1 and default["sample"][2][2] == 2  # 1 .. --frames


@pytest.mark.parametrize("frames, dynamic, message", [
    (4, None, "--frames must be 4k+1 (1, 5, 9, ...), got 4"),
    (0, None, "--frames must be 4k+1"),
    (9, DynamicRange(max_frames=5), "--max-frames 5 is smaller than --frames 9"),
    (5, DynamicRange(max_frames=10), "--max-frames must be 4k+1"),
])
def test_bad_frames(wan_package, frames, dynamic, message):
    with pytest.raises(InputError, match=re.escape(message)):
        plan_profiles(read_manifest(wan_package), "expert_composition", HEIGHT, WIDTH, 1, dynamic, frames=frames)


def test_frames_of_an_image_package_are_refused(sdxl_package):
    with pytest.raises(InputError, match=r"--frames applies to video packages \(wan\); this sdxl-ensemble package"):
        plan_profiles(read_manifest(sdxl_package), "expert_composition", 32, 32, 1, frames=5)
    plan_profiles(read_manifest(sdxl_package), "expert_composition", 32, 32, 1, frames=1)  # the default is fine


def test_request_shapes_are_the_shapes_plans_are_built_for(wan_package):
    m = read_manifest(wan_package)
    for name in m.components:
        for height, width, batch, frames in ((32, 48, 1, 1), (64, 32, 3, 9)):
            opt = {t: p[1] for t, p in plan_profiles(m, name, height, width, batch, frames=frames).items()}
            assert request_shapes(m, name, batch, height, width, frames) == opt, name
    # frames not known: the experts' latents are left out, everything else is still sized
    unknown = request_shapes(m, "expert_composition", 1, 32, 48)
    assert set(unknown) == {"step", "encoder_hidden_states"}
    assert len(request_shapes(m, "vae_decoder_chunk", 1, 32, 48)) == len(m.components["vae_decoder_chunk"].inputs)


def test_trt_build_of_every_component_and_the_frames_check(wan_copy, fake_gpu):
    root = wan_copy
    m = build_engines(root, BuildRequest(height=HEIGHT, width=WIDTH, frames=5))
    assert len(fake_gpu.builds) == 5  # text encoder, two experts, two decoders: every profile fit its graph
    composition = find_record(m, "expert_composition", "trt")
    assert composition.precision == "fp16" and composition.source == "expert_composition/model_fp16.onnx"
    assert composition.profile["sample"] == ((1, 16, 2, 4, 6),) * 3
    assert composition.profile["encoder_hidden_states"] == ((2, 512, 32),) * 3
    chunk = find_record(m, "vae_decoder_chunk", "trt")
    assert chunk.precision == "fp32" and chunk.profile["cache_23"] == ((1, 3, 2, 32, 48),) * 3
    assert find_record(m, "text_encoder", "trt").profile == {"input_ids": ((2, 512),) * 3}
    system = SystemInfo("10.13.0.35", (8, 9))
    assert component_file(root, m, "vae_decoder_chunk", "trt", system) == root / chunk.file

    check_profiles(root, m, "trt", 1, HEIGHT, WIDTH, num_frames=5)
    check_profiles(root, m, "trt", 1, HEIGHT, WIDTH)  # frames not known: the rest fits
    with pytest.raises(StaleEngineError) as info:
        check_profiles(root, m, "trt", 1, HEIGHT, WIDTH, num_frames=9)
    assert str(info.value) == (
        "TensorRT engine engines/expert_composition.plan was built for 32x48 batch 1, 5 frames, requested 32x48 "
        "batch 1, 9 frames (sample shape sample [1, 16, 3, 4, 6] outside profile [min [1, 16, 2, 4, 6], "
        "max [1, 16, 2, 4, 6]]); nor do engines/expert_detail.plan fit; "
        f"run: artrt build {root} --backend trt --height 32 --width 48 --batch 1 --frames 9"
    )
    with pytest.raises(StaleEngineError, match=r"engines/expert_composition.plan was built for 32x48 batch 1, "
                       r"5 frames, requested 32x48 batch 1, 1 frame .*--batch 1$"):
        check_profiles(root, m, "trt", 1, HEIGHT, WIDTH, num_frames=1)
    with pytest.raises(StaleEngineError, match=r"engines/vae_decoder.plan was built for 32x48 batch 1, requested "
                       r"64x48 batch 1 \(latents shape .*; nor do engines/vae_decoder_chunk.plan fit; run: .* "
                       r"--height 64 --width 48 --batch 1 --frames 5$"):
        check_profiles(root, m, "trt", 1, 64, 48)  # frames not known: the decoders catch the size, frames kept

    # The suggested command rebuilds the experts only: the text encoder and decoders do not depend on frames.
    words = str(info.value).split("run: ")[1].split()
    flags = dict(zip(words[3::2], words[4::2]))
    m = build_engines(root, BuildRequest(height=int(flags["--height"]), width=int(flags["--width"]),
                                         batch=int(flags["--batch"]), frames=int(flags["--frames"])))
    assert len(fake_gpu.builds) == 7
    check_profiles(root, m, "trt", 1, HEIGHT, WIDTH, num_frames=9)
    assert build_command(root, m, rebuild=True) == (
        f"artrt build {root} --backend trt --rebuild --height 32 --width 48 --batch 1 --frames 9")


def test_dynamic_trt_build_serves_a_range_of_frames(wan_copy, fake_gpu):
    root = wan_copy
    ranges = DynamicRange(min_size=16, max_size=64, max_batch=2, max_frames=9)
    m = build_engines(root, BuildRequest(height=HEIGHT, width=WIDTH, frames=5, dynamic=ranges))
    for batch, height, width, frames in ((1, 32, 48, 1), (2, 64, 64, 9), (1, 16, 16, 5)):
        check_profiles(root, m, "trt", batch, height, width, num_frames=frames)
    with pytest.raises(StaleEngineError, match=r"built for 16..64x16..64 batch 1..2, 1..9 frames, requested "
                       r"32x48 batch 1, 13 frames .*--frames 13$"):
        check_profiles(root, m, "trt", 1, HEIGHT, WIDTH, num_frames=13)
    assert build_command(root, m, rebuild=True) == (
        f"artrt build {root} --backend trt --rebuild --height 32 --width 48 --batch 1 --frames 5 "
        "--dynamic --min-size 16 --max-size 64 --max-batch 2 --max-frames 9")


def test_ort_cuda_static_steps_are_fixed_to_the_frames(wan_copy, fake_fuser):
    root = wan_copy
    m = build_engines(root, BuildRequest(backend="ort-cuda", height=HEIGHT, width=WIDTH, frames=9))
    static = fake_fuser["expert_detail.cuda.onnx"]  # what the fuser was given: every dimension fixed
    assert static["sample"] == [1, 16, 3, 4, 6] and static["next_sample"] == [1, 16, 3, 4, 6]
    assert static["encoder_hidden_states"] == [2, 512, 32] and static["step"] == [13]
    assert fake_fuser["vae_decoder_chunk.cuda.onnx"]["cache_10"][3] == "latent_height_x2"  # decoders stay dynamic
    record = find_record(m, "expert_detail", "ort-cuda")
    assert record.profile["sample"] == ((1, 16, 3, 4, 6),) * 3
    assert record.profile["encoder_hidden_states"] == ((2, 512, 32),) * 3
    assert not find_record(m, "vae_decoder_chunk", "ort-cuda").profile
    check_profiles(root, m, "ort-cuda", 1, HEIGHT, WIDTH, num_frames=9)
    with pytest.raises(StaleEngineError, match=r"fused ONNX Runtime CUDA graph engines/expert_composition.cuda.onnx "
                       r"was built for 32x48 batch 1, 9 frames, requested 32x48 batch 1, 5 frames .*"
                       rf"run: artrt build {re.escape(str(root))} --backend ort-cuda --rebuild --height 32 "
                       "--width 48 --batch 1 --frames 5$"):
        check_profiles(root, m, "ort-cuda", 1, HEIGHT, WIDTH, num_frames=5)


def test_dynamic_fused_graphs_run_any_frames(wan_copy, fake_fuser):
    root = wan_copy
    m = build_engines(root, BuildRequest(backend="ort-cuda", dynamic=DynamicRange(), height=HEIGHT, width=WIDTH))
    assert all(not find_record(m, name, "ort-cuda").profile for name in m.components)
    assert fake_fuser["expert_composition.cuda.onnx"]["sample"][2] == "latent_frames"
    check_profiles(root, m, "ort-cuda", 2, 64, 96, num_frames=17)


def test_a_dimension_nobody_sizes_is_one_build_error(wan_copy, fake_gpu):
    import json

    path = wan_copy / "artrt.json"
    data = json.loads(path.read_text())
    data["components"]["vae_decoder"]["inputs"][0]["shape"][2] = "mystery_axis"
    path.write_text(json.dumps(data))
    with pytest.raises(BuildError, match="vae_decoder: input latents has a dimension 'mystery_axis' artrt cannot "
                       "size"):
        build_engines(wan_copy, BuildRequest(height=HEIGHT, width=WIDTH))
    assert not fake_gpu.builds  # refused before any engine was built


def test_cli_frames(capsys, wan_copy, sdxl_package, monkeypatch):
    from artrt.runtime.cli import main

    with pytest.raises(SystemExit):
        main(["build", "--help"])
    out = capsys.readouterr().out
    assert "--frames" in out and "--max-frames" in out and "text_length" in out
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without TensorRT
    for argv, message in ((["--frames", "6"], "--frames must be 4k+1"),
                          (["--max-frames", "9"], "--max-frames only apply with --dynamic"),
                          (["--frames", "5"], "TensorRT is not installed")):
        assert main(["build", str(wan_copy), *argv]) == 1
        assert message in capsys.readouterr().err
    assert main(["build", str(sdxl_package), "--frames", "5"]) == 1
    assert "--frames applies to video packages" in capsys.readouterr().err
