"""Lean packages: ``export_package(targets=, precision=)`` / ``artrt export --targets --precision``
write only the graphs a package needs, keep hashes for what is there, and refuse what it lacks.

Three tiny exports (about 10 s each on 2 cores): ``--targets cuda`` (the lean GPU package),
``--targets cuda --precision both`` and ``--targets cpu``; the default export is the session's
``sdxl_package``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from artrt.errors import InputError
from artrt.runtime.package import MANIFEST_NAME, graph_sizes, read_manifest

FP16_ONLY = ("text_encoder", "text_encoder_2", "expert_composition", "expert_detail")


def _export(models_dir, out, **kwargs):
    from artrt.export import export_package, load_sdxl_ensemble

    return export_package(load_sdxl_ensemble(models_dir / "base", models_dir / "refiner"), out, switch=0.8,
                          steps=8, **kwargs)


def _files(root) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME}


def _hashes(root) -> dict[str, str]:
    return {f.path: f.sha256 for f in read_manifest(root, verify_hashes=False).files}


@pytest.fixture(scope="module")
def cuda_package(models_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lean") / "sdxl-cuda"
    _export(models_dir, out, targets=("cuda",))
    return out


@pytest.mark.parametrize("targets, precision, fp16_vae, text, decoder, cpu", [
    (("cpu", "cuda"), None, False, ("fp32", "fp16"), ("fp32",), True),  # the default: every backend
    (("cpu", "cuda"), None, True, ("fp32", "fp16"), ("fp32", "fp16"), True),
    (("cpu", "cuda"), "fp32", False, ("fp32",), ("fp32",), True),
    (("cuda",), None, False, ("fp16",), ("fp32",), False),  # SDXL's VAE decodes in fp32 on the GPU
    (("cuda",), "fp16", True, ("fp16",), ("fp16",), False),
    (("cuda",), "fp32", False, ("fp32",), ("fp32",), False),
    (("cuda",), "both", False, ("fp32", "fp16"), ("fp32",), False),
    (("cpu",), None, False, ("fp32",), ("fp32",), True),
    (("cpu",), "fp32", False, ("fp32",), ("fp32",), True),
    ("cuda,cpu", None, False, ("fp32", "fp16"), ("fp32",), True),  # the CLI's text, in any order
])
def test_graphs_written_for_each_choice(targets, precision, fp16_vae, text, decoder, cpu):
    from artrt.export.package_export import check_graphs

    choice = check_graphs(targets, precision, fp16_vae)
    assert choice.precisions("text_encoder") == choice.precisions("fused_step") == text
    assert choice.precisions("vae_decoder") == decoder
    assert choice.cpu == cpu


@pytest.mark.parametrize("kwargs, message", [
    ({"targets": ("gpu",)}, "unknown target(s) 'gpu'; --targets is a comma-separated subset of cpu,cuda"),
    ({"targets": ()}, "unknown target(s) none given"),
    ({"targets": "cpu,"}, "unknown target(s) ''"),
    ({"precision": "int8"}, "unknown precision 'int8'; choose from fp32, fp16, both"),
    ({"targets": ("cpu",), "precision": "fp16"}, "--precision applies to the cuda target's graphs; "
                                                 "--targets cpu writes fp32 graphs only"),
    ({"targets": ("cpu",), "precision": "both"}, "--targets cpu writes fp32 graphs only"),
    ({"targets": ("cpu",), "fp16_vae": True}, "--fp16-vae needs fp16 graphs"),
    ({"precision": "fp32", "fp16_vae": True}, "--fp16-vae needs fp16 graphs"),
])
def test_bad_choices_are_refused_before_any_work(tmp_path, kwargs, message):
    from artrt.export import export_package

    with pytest.raises(InputError) as exc:  # the sources are never touched
        export_package(None, tmp_path / "pkg", **kwargs)  # type: ignore[arg-type]
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_bad_choices_before_loading_weights(capsys, models_dir, tmp_path, monkeypatch):
    from artrt.export import sources
    from artrt.runtime.cli import main

    monkeypatch.setattr(sources, "_from_pretrained", lambda cls, folder: pytest.fail(f"{folder} loaded"))
    capsys.readouterr()
    for flags, message in [(["--targets", "cpu,tpu"], "unknown target(s) 'tpu'"),
                           (["--targets", "cpu", "--precision", "fp16"], "--targets cpu writes fp32 graphs only"),
                           (["--targets", "cuda", "--precision", "fp32", "--fp16-vae"], "--fp16-vae needs fp16")]:
        code = main(["export", "--base", str(models_dir / "base"), "--refiner", str(models_dir / "refiner"),
                     "--out", str(tmp_path / "pkg"), *flags])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("artrt: error:")]
        assert code == 1 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_export_help_explains_the_choice(capsys):
    from artrt.runtime.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["export", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0
    for text in ("--targets T[,T]", "default cpu,cuda (runs everywhere)", "--precision {fp32,fp16,both}",
                 "fp16 (default;", "ort-cpu cannot run it", "The cpu target always writes fp32 graphs"):
        assert text in out, text


def test_cuda_target_writes_fp16_graphs_only(cuda_package):
    m = read_manifest(cuda_package)  # every file's sha256 verified
    assert (m.targets, m.precision) == (("cuda",), "fp16")
    for name in FP16_ONLY:
        comp = m.components[name]
        assert (comp.onnx, comp.onnx_cpu, comp.export_check) == (None, None, {})
        assert comp.onnx_fp16 == f"{name}/model_fp16.onnx" and comp.export_check_fp16
    decoder = m.components["vae_decoder"]  # no --fp16-vae: the GPU decodes in fp32
    assert (decoder.onnx, decoder.onnx_fp16, decoder.onnx_cpu) == ("vae_decoder/model.onnx", None, None)
    assert _files(cuda_package) == {f.path for f in m.files} == {
        *(f"{n}/model_fp16.onnx" for n in FP16_ONLY), "vae_decoder/model.onnx",
        *(f"{n}/lora_targets.json" for n in FP16_ONLY),  # which initializers LoRA adapters may change
        "text_encoder/tokenizer.json", "text_encoder_2/tokenizer.json"}
    data = json.loads((cuda_package / MANIFEST_NAME).read_text())
    assert data["components"]["expert_detail"]["onnx"] is None and data["targets"] == ["cuda"]


def test_leaving_graphs_out_does_not_change_the_others(cuda_package, sdxl_package, models_dir, tmp_path):
    """The fp16 graphs of a ``--targets cuda`` export, and the fp32 and fp16 graphs of ``--precision
    both``, are byte for byte those of the default export."""
    import dataclasses

    from artrt.export import export_package, load_sdxl_ensemble

    default = _hashes(sdxl_package)
    lean = _hashes(cuda_package)
    assert all(default[path] == sha for path, sha in lean.items() if not path.endswith("lora_targets.json")), lean
    # --precision both on the composition expert and its text encoders (a package may have one expert)
    # with no decoder: the rule is per component, and three components export in half the time of five
    sources = load_sdxl_ensemble(models_dir / "base", models_dir / "refiner")
    sources = dataclasses.replace(sources, experts=sources.experts[:1], vae=None)
    m = export_package(sources, tmp_path / "both", targets=("cuda",), precision="both")
    assert (m.targets, m.precision) == (("cuda",), "both")
    assert list(m.components) == ["text_encoder", "text_encoder_2", "expert_composition"]
    for comp in m.components.values():
        assert (comp.onnx, comp.onnx_fp16, comp.onnx_cpu) == (f"{comp.name}/model.onnx",
                                                              f"{comp.name}/model_fp16.onnx", None)
    graphs = {f.path: f.sha256 for f in m.files if not f.path.endswith("lora_targets.json")}  # they list the graphs
    assert graphs == {p: sha for p, sha in default.items() if p.split("/")[0] in m.components and "model_cpu" not in p
                      and not p.endswith("lora_targets.json")}
    assert not list((tmp_path / "both").glob("*/model_cpu.onnx"))


def test_cuda_package_is_about_a_third_of_the_default(cuda_package, sdxl_package):
    lean, full = (sum(f.size for f in read_manifest(p, verify_hashes=False).files)
                  for p in (cuda_package, sdxl_package))
    assert lean < 0.4 * full, (lean, full)  # 26 % for the tiny pair (docs/package-format.md)


def test_info_shows_targets_and_sizes_of_what_is_there(capsys, cuda_package):
    from artrt.runtime.cli import main

    m = read_manifest(cuda_package, verify_hashes=False)
    capsys.readouterr()
    assert main(["info", str(cuda_package)]) == 0
    out = capsys.readouterr().out
    assert ("runs on   cuda (fp16, vae_decoder fp32); no CPU graphs: ort-cpu cannot run it  "
            "(exported with --targets cuda --precision fp16)") in out
    total = sum(f.size for f in m.files)
    assert f"size      {total / 1e6:.1f} MB: graphs {total / 1e6:.1f} MB, engines 0.0 MB" in out
    unet = next(line for line in out.splitlines() if line.strip().startswith("expert_composition "))
    assert "fp16 " in unet and "fp32 " not in unet and "cpu " not in unet
    assert "max |ONNX - PyTorch| (fp32)" not in out.split("vae_decoder")[0]  # no fp32 check without fp32 graph
    assert "sha256 verified" in out
    assert "      sample                 float32  [batch, 4, latent_height, latent_width]" in out  # fp32 latents
    assert "      hidden_states          float16  [batch, ?, 16]" in out  # the exporter's made-up name as ?
    assert "_dim_" not in out


def test_ort_cpu_refuses_a_cuda_only_package_before_loading(cuda_package, monkeypatch, capsys, tmp_path):
    import artrt.engines
    from artrt.engines.ort import OrtCpuEngine
    from artrt.runtime import Pipeline
    from artrt.runtime.cli import main

    monkeypatch.setattr(OrtCpuEngine, "activate", lambda self: pytest.fail("an engine was loaded"))
    line = (f"{cuda_package} was exported for cuda only (--targets cuda): no CPU graph for "
            f"{', '.join(FP16_ONLY)}; run it on a GPU backend or re-export with --targets cpu")
    with pytest.raises(InputError) as exc:
        Pipeline.load(cuda_package, backend="ort-cpu")
    assert str(exc.value) == line
    gpu_missing = "no CUDA GPU (or driver, or cuda-python) found"
    monkeypatch.setattr(artrt.engines, "backend_problems",
                        lambda: {"trt": gpu_missing, "ort-cuda": gpu_missing, "ort-cpu": None})
    with pytest.raises(InputError) as exc:  # auto on a machine without a GPU picks ort-cpu, which refuses
        Pipeline.load(cuda_package)
    assert str(exc.value) == line
    capsys.readouterr()  # what was logged so far (an earlier main() left its handler on a closed stream)
    code = main(["generate", "a boat", "--model", str(cuda_package), "-o", str(tmp_path / "x.png"), "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 1 and f"artrt: error: {line}" in err.splitlines() and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_cuda_package_graphs_compute(cuda_package, sdxl_pipe):
    """The lean package's graphs (what GPU backends build from; ONNX Runtime CPU runs fp16 graphs
    too) draw the fp32 package's images within fp16 error."""
    from conftest import psnr

    from artrt.engines.ort import OrtCpuEngine
    from artrt.runtime import Pipeline
    from artrt.runtime.engine_records import source_onnx
    from artrt.runtime.loading import OpenEngines

    m = read_manifest(cuda_package)
    engines = {n: OrtCpuEngine(cuda_package / source_onnx(m, n), name=n, threads=1).activate() for n in m.components}
    args = dict(steps=6, seed=3, num_images=2)
    with Pipeline(cuda_package, m, OpenEngines.of("ort-cpu", engines)) as lean:
        for a, b in zip(sdxl_pipe.generate("a red boat", **args).images, lean.generate("a red boat", **args).images):
            assert psnr(np.asarray(a), np.asarray(b)) >= 30.0


def test_cli_cpu_target_writes_no_fp16_graphs(capsys, models_dir, tmp_path):
    from artrt.runtime.cli import main

    out = tmp_path / "same-arch-cpu"
    capsys.readouterr()
    code = main(["export", "--base", str(models_dir / "base"), "--detail-unet", str(models_dir / "detail_unet"),
                 "--out", str(out), "--targets", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    m = read_manifest(out)
    assert (m.targets, m.precision) == (("cpu",), "fp32")
    assert not list(out.glob("*/model_fp16.onnx"))
    assert all(c.onnx == f"{c.name}/model.onnx" and c.onnx_fp16 is None for c in m.components.values())
    assert {n for n, c in m.components.items() if c.onnx_cpu} == {"expert_composition", "expert_detail",
                                                                  "vae_decoder"}
    assert _files(out) == {f.path for f in m.files}
    total = sum(f.size for f in m.files)  # the export ends with the size of each component and the total
    assert f"{total / 1e6:.1f} MB (--targets cpu --precision fp32)" in err, err
    detail = sum(graph_sizes(m, "expert_detail").values())
    assert any(line.split()[1:3] == ["expert_detail", f"{detail / 1e6:.1f}"] for line in err.splitlines()), err


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(onnx=None, onnx_fp16=None, onnx_cpu=None), "component 'expert_detail' has no graph"),
    (lambda c: c.pop("onnx"), None),  # a missing "onnx" reads as null: the fp16 graph remains
])
def test_manifest_needs_one_graph_per_component(cuda_package, tmp_path, edit, message):
    import shutil

    from artrt.errors import PackageError

    root = shutil.copytree(cuda_package, tmp_path / "pkg")
    data = json.loads((root / MANIFEST_NAME).read_text())
    edit(data["components"]["expert_detail"])
    (root / MANIFEST_NAME).write_text(json.dumps(data))
    if message is None:
        assert read_manifest(root).components["expert_detail"].onnx is None
        return
    with pytest.raises(PackageError, match=message):
        read_manifest(root)
