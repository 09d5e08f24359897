"""Export at scale, exercised on the tiny models on every run (docs/export-scale.md).

- Graphs past protobuf's 2 GiB limit: ``EXTERNAL_DATA_THRESHOLD`` lowered to a few KiB, so every
  tiny graph (fp32, fp16, the CPU-fused one) takes the external-data path through export, the
  package checks, loading and generation; images equal the normal package's.
- Bounded memory: sources are lazy (configs only until a component is exported).
- Faults: a full disk ends with one ``artrt: error:`` line, no package, and a rerun completes;
  weights that cannot fit in memory are refused in one line before loading.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from artrt.errors import ExportError, OutputError, PackageError
from artrt.export import onnx_files, sources, weights
from artrt.export.package_export import export_package
from artrt.export.sources import load_same_arch, load_sdxl_ensemble
from artrt.export.weights import LazyModule
from artrt.runtime import Pipeline
from artrt.runtime.cli import main
from artrt.runtime.package import read_manifest

SMALL_THRESHOLD = 4096  # bytes: every tiny graph gets external data


@pytest.fixture(scope="module")
def external_package(models_dir, tmp_path_factory):
    """The SDXL package of conftest's ``sdxl_package`` exported with external data everywhere,
    and the progress lines the export logged."""
    out = tmp_path_factory.mktemp("scale") / "sdxl-external"
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("artrt")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(onnx_files, "EXTERNAL_DATA_THRESHOLD", SMALL_THRESHOLD)
            export_package(load_sdxl_ensemble(models_dir / "base", models_dir / "refiner"), out, switch=0.8, steps=8)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, [r.getMessage() for r in records]


def test_every_graph_has_its_weights_in_external_data_listed_with_hashes(external_package):
    out, _ = external_package
    m = read_manifest(out)  # sizes and sha256 of every listed file, .data included
    listed = {f.path for f in m.files}
    for comp in m.components.values():
        for graph in (comp.onnx, comp.onnx_fp16, comp.onnx_cpu):
            if graph is None:
                continue
            model = onnx.load(str(out / graph), load_external_data=False)
            locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
            assert locations, graph
            for location in locations:  # the CPU graph shares the fp32 graph's weights
                data = str(Path(graph).parent / location)
                assert data in listed and (out / data).stat().st_size > SMALL_THRESHOLD, (graph, data)
            offsets = [int(e.value) for t in model.graph.initializer for e in t.external_data if e.key == "offset"]
            assert all(o % onnx_files.ALIGNMENT == 0 for o in offsets), graph  # so ORT can map them
    assert any(c.onnx_cpu for c in m.components.values())
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no scratch or temporary file left


def test_external_data_package_generates_the_same_images(external_package, sdxl_pipe):
    out, _ = external_package
    kwargs = dict(steps=6, seed=3, height=32, width=48)
    with Pipeline.load(out, backend="ort-cpu", threads=1) as pipe:
        images = pipe.generate("a lighthouse at dusk", **kwargs).images
    reference = sdxl_pipe.generate("a lighthouse at dusk", **kwargs).images
    np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(reference[0]))


def test_a_modified_data_file_is_refused(external_package, tmp_path):
    import shutil

    out = Path(shutil.copytree(external_package[0], tmp_path / "pkg"))
    data = out / "expert_detail" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(PackageError, match="expert_detail/model.onnx.data does not match its sha256"):
        read_manifest(out)


def test_export_logs_each_stage_of_each_component_with_its_time(external_package):
    _, lines = external_package
    for name in ("text_encoder", "text_encoder_2", "expert_composition", "expert_detail", "vae_decoder"):
        for stage in ("loading", "exported fp32 (", "checked fp32 against PyTorch", "done ("):
            assert any(line.startswith(f"{name}: {stage}") for line in lines), (name, stage, lines)
    assert any(line.startswith("expert_detail: exported fp16 (") for line in lines), lines
    assert any(line.startswith("expert_detail: CPU graph with") for line in lines), lines


# -- onnx_files ---------------------------------------------------------------------------------
def _graph_with_weights(n: int = 4096) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.arange(n, dtype=np.float32), "w")
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])], [weights])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(path: Path, n: int = 4096) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.ones(n, np.float32)})[0]


def test_save_onnx_moves_weights_out_and_back(tmp_path):
    files = onnx_files.save_onnx(_graph_with_weights(), tmp_path / "a" / "model.onnx", external=True)
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"]
    assert (tmp_path / "a" / "model.onnx").stat().st_size < 1024
    np.testing.assert_array_equal(_run(files[0]), np.arange(4096) + 1)
    # copied chunk by chunk into another graph's data, then read back into one file
    model = onnx.load(str(files[0]), load_external_data=False)
    copied = onnx_files.save_onnx(model, tmp_path / "b" / "model.onnx", source_dir=tmp_path / "a", external=True)
    np.testing.assert_array_equal(_run(copied[0]), np.arange(4096) + 1)
    model = onnx.load(str(copied[0]), load_external_data=False)
    embedded = onnx_files.save_onnx(model, tmp_path / "c" / "model.onnx", source_dir=tmp_path / "b", external=False)
    assert [f.name for f in embedded] == ["model.onnx"]
    np.testing.assert_array_equal(_run(embedded[0]), np.arange(4096) + 1)


def test_save_onnx_decides_by_the_threshold(tmp_path, monkeypatch):
    assert len(onnx_files.save_onnx(_graph_with_weights(), tmp_path / "small.onnx")) == 1
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_THRESHOLD", 1000)
    assert len(onnx_files.save_onnx(_graph_with_weights(), tmp_path / "large.onnx")) == 2


def test_an_interrupted_write_leaves_no_file_under_its_final_name(tmp_path, monkeypatch):
    def full(out, *args):
        out.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx_files, "_copy_range", lambda src, offset, length, out: full(out))
    first = onnx_files.save_onnx(_graph_with_weights(), tmp_path / "a" / "model.onnx", external=True)
    model = onnx.load(str(first[0]), load_external_data=False)
    with pytest.raises(OutputError, match="No space left on device"):
        onnx_files.save_onnx(model, tmp_path / "b" / "model.onnx", source_dir=tmp_path / "a", external=True)
    assert list((tmp_path / "b").iterdir()) == []


def test_external_data_outside_the_source_folder_is_refused(tmp_path):
    files = onnx_files.save_onnx(_graph_with_weights(), tmp_path / "a" / "model.onnx", external=True)
    model = onnx.load(str(files[0]), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../a/model.onnx.data"
    (tmp_path / "b").mkdir()
    with pytest.raises(ExportError, match="points outside"):
        onnx_files.save_onnx(model, tmp_path / "c" / "model.onnx", source_dir=tmp_path / "b", external=True)


# -- lazy sources and memory -------------------------------------------------------------------
def test_sources_load_no_weights_until_export(models_dir, monkeypatch):
    def refuse(cls, folder):
        raise AssertionError(f"{folder} loaded while reading the sources")

    monkeypatch.setattr(sources, "_from_pretrained", refuse)
    pair = load_sdxl_ensemble(models_dir / "base", models_dir / "refiner")
    same = load_same_arch(models_dir / "base", models_dir / "detail_unet")
    for s in (pair, same):
        models = [e.model for e in s.text_encoders.values()] + [e.unet for e in s.experts] + [s.vae]
        assert all(isinstance(m, LazyModule) for m in models)
    assert list(pair.text_encoders) == ["text_encoder", "text_encoder_2"]  # the refiner's is the same file
    assert pair.experts[0].unet.config.sample_size == 16 and pair.latent_scale == 2
    assert pair.text_encoders["text_encoder_2"].model.config.projection_dim == 16


def test_a_refiner_text_encoder_with_other_weights_is_exported_too(models_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    refiner = Path(shutil.copytree(models_dir / "refiner", tmp_path / "refiner"))
    weights = refiner / "text_encoder_2" / "model.safetensors"
    state = load_file(weights)
    state["text_model.final_layer_norm.bias"] = state["text_model.final_layer_norm.bias"] + 1
    save_file({k: v.contiguous() for k, v in state.items()}, weights, metadata={"format": "pt"})
    pair = load_sdxl_ensemble(models_dir / "base", refiner)
    assert list(pair.text_encoders) == ["text_encoder", "text_encoder_2", "refiner_text_encoder_2"]
    assert isinstance(pair.text_encoders["refiner_text_encoder_2"].model(), torch.nn.Module)


@pytest.mark.parametrize("swap, fails", [(0, True), (10**12, False)])
def test_weights_larger_than_memory_are_refused_in_one_line_before_loading(models_dir, monkeypatch, caplog, swap,
                                                                           fails):
    loaded = []
    monkeypatch.setattr(weights, "memory_available", lambda: (1000, swap))
    monkeypatch.setattr(sources, "_from_pretrained", lambda cls, folder: loaded.append(folder))
    monkeypatch.setattr(logging.getLogger("artrt"), "propagate", True)
    model = load_sdxl_ensemble(models_dir / "base", models_dir / "refiner").experts[0].unet
    if fails:
        with pytest.raises(ExportError) as exc:
            model()
        message = str(exc.value)
        assert "\n" not in message and "unet: its weights need" in message and "available" in message, message
        assert loaded == []
    else:
        with caplog.at_level(logging.WARNING, logger="artrt"):
            model()
        assert loaded and any("will swap" in r.getMessage() for r in caplog.records)


def test_cli_refuses_weights_larger_than_memory(models_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(weights, "memory_available", lambda: (1000, 0))
    code = main(["export", "--base", str(models_dir / "base"), "--refiner", str(models_dir / "refiner"),
                 "--out", str(tmp_path / "pkg"), "--precision", "fp32"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("artrt: error:")]
    assert code == 1 and len(errors) == 1 and "weights need" in errors[0] and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- a full disk ---------------------------------------------------------------------------------
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fill_the_disk_while_writing_weights(monkeypatch):
    """Writing an expert's weights (a tensor at a time, from the module) stops with ENOSPC."""
    append = onnx_files.append_external

    def append_some(tensor, raw, out, location):
        if "expert" in out.name:
            out.write(b"\0" * 4096)
            _disk_full()
        append(tensor, raw, out, location)

    monkeypatch.setattr(onnx_files, "append_external", append_some)


def _exporter_write_fails(monkeypatch):
    """torch.onnx.export's own write of a graph fails (Python's write raises OSError)."""
    import torch

    export = torch.onnx.export

    def export_some(module, args, f, **kwargs):
        if "expert_detail" in str(f):
            _disk_full()
        return export(module, args, f, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export_some)


@pytest.mark.parametrize("fault, existing", [(_fill_the_disk_while_writing_weights, False),
                                             (_exporter_write_fails, True)])
def test_full_disk_ends_in_one_line_keeps_the_old_package_and_a_rerun_completes(
        models_dir, tmp_path, monkeypatch, capsys, fault, existing):
    out = tmp_path / "pkg"
    args = ["export", "--base", str(models_dir / "base"), "--refiner", str(models_dir / "refiner"),
            "--out", str(out), "--precision", "fp32", "--switch", "0.7"]
    if existing:
        assert main([*args[:-1], "0.6"]) == 0  # an older package that --overwrite would replace
        args.append("--overwrite")
    capsys.readouterr()
    with monkeypatch.context() as patch:
        fault(patch)
        code = main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("artrt: error:")]
    assert code == 1 and len(errors) == 1 and "No space left on device" in errors[0], err
    assert "Traceback" not in err and "run it again" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == (["pkg"] if existing else [])  # no .partial, no temp
    if existing:
        assert read_manifest(out).defaults.switch == 0.6  # the old package, whole
    else:
        with pytest.raises(PackageError):
            read_manifest(out)
    assert main(args) == 0
    assert read_manifest(out).defaults.switch == 0.7
    with Pipeline.load(out, backend="ort-cpu", threads=1) as pipe:
        assert np.asarray(pipe.generate("a lighthouse", steps=2).images[0]).std() > 0


# -- the random model sizes ------------------------------------------------------------------------
def _parameters(build) -> int:
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def test_large_unets_cross_protobufs_limit_and_xl_is_sdxl():
    """Counted on the meta device (no memory): ``large`` has > 2 GiB of fp32 weights per UNet;
    ``xl`` has the parameter counts of the released SDXL base (2.567 B), refiner (2.260 B) and
    text encoders (CLIP ViT-L 123 M, OpenCLIP bigG 695 M)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from artrt.export.random_models import pair_configs

    large, xl = pair_configs("large"), pair_configs("xl")
    for config in (large.base_unet, large.refiner_unet):
        assert 4 * _parameters(lambda c=config: UNet2DConditionModel(**c)) > 2 * 2**30
    assert large.base_unet["block_out_channels"] == (320, 640, 1280) and large.base_unet["cross_attention_dim"] == 2048
    assert large.vae["block_out_channels"] == (128, 256, 512, 512)
    counts = {
        "base": _parameters(lambda: UNet2DConditionModel(**xl.base_unet)),
        "refiner": _parameters(lambda: UNet2DConditionModel(**xl.refiner_unet)),
        "clip_l": _parameters(lambda: CLIPTextModel(CLIPTextConfig(**xl.text_encoder))),
        "clip_g": _parameters(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**xl.text_encoder_2))),
    }
    expected = {"base": 2.567e9, "refiner": 2.260e9, "clip_l": 123.1e6, "clip_g": 694.7e6}
    for name, count in counts.items():
        assert abs(count / expected[name] - 1) < 0.002, (name, count)


def test_too_little_disk_is_refused_before_any_work(models_dir, tmp_path, monkeypatch):
    import shutil

    from artrt.export import package_export

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(package_export.shutil, "disk_usage", lambda path: usage._replace(free=10**6))
    monkeypatch.setattr(sources, "_from_pretrained", lambda cls, folder: pytest.fail(f"{folder} loaded"))
    with pytest.raises(OutputError) as exc:
        export_package(load_sdxl_ensemble(models_dir / "base", models_dir / "refiner"), tmp_path / "pkg")
    assert "GB of disk" in str(exc.value) and "\n" not in str(exc.value), exc.value
    assert sorted(tmp_path.iterdir()) == []


def test_build_writers_keep_external_data(external_package, tmp_path, monkeypatch):
    """``artrt build --backend ort-cuda``'s static copy and fused graph of a graph with external data
    (the optimizer runs on the CPU; the fused graph itself only on the CUDA EP)."""
    from artrt.export.build import _fix_dims
    from artrt.export.ort_optimize import interface, optimize_for_cuda

    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_THRESHOLD", SMALL_THRESHOLD)
    out, _ = external_package
    source = out / "expert_detail" / "model_fp16.onnx"
    dims = {"batch": 1, "cond_batch": 2, "latent_height": 4, "latent_width": 4}
    static = _fix_dims(source, dims, tmp_path / "static" / "model.onnx")
    fused = optimize_for_cuda(static, tmp_path / "fused" / "step.cuda.onnx", "unet")
    for path in (static, fused):
        assert onnx_files.data_path(path).is_file(), path
        model = onnx.load(str(path), load_external_data=True)  # every reference resolves
        assert onnx_files.locations(onnx.load(str(path), load_external_data=False)) == {path.name + ".data"}
    assert interface(model) == interface(onnx.load(str(source), load_external_data=False))
    assert sorted(p.name for p in (tmp_path / "fused").iterdir()) == ["step.cuda.onnx", "step.cuda.onnx.data"]
