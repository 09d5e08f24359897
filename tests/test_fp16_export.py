"""fp16 graphs in packages: their I/O dtypes, recorded errors, and images against fp32.

The fp16 graphs are what GPU backends build from; ONNX Runtime's CPU provider runs them
too (slowly), which is how they are checked here without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from artrt.engines.ort import OrtCpuEngine
from artrt.errors import InputError
from artrt.runtime.package import read_manifest

CONDITIONING = {"encoder_hidden_states", "text_embeds", "time_ids"}


def test_fp16_graphs_keep_latents_fp32_and_take_fp16_conditioning(sdxl_package, same_arch_package):
    m = read_manifest(sdxl_package)
    listed = {f.path for f in m.files}
    for comp in m.components.values():
        if comp.kind == "vae_decoder":
            assert comp.onnx_fp16 is None and not comp.export_check_fp16  # no --fp16-vae
            continue
        assert comp.onnx_fp16 == f"{comp.name}/model_fp16.onnx" and comp.onnx_fp16 in listed
        with OrtCpuEngine(sdxl_package / comp.onnx_fp16) as engine:
            dtypes = {t.name: t.dtype.name for t in (*engine.inputs, *engine.outputs)}
        if comp.kind == "fused_step":
            assert {n for n, d in dtypes.items() if d == "float16"} == CONDITIONING & set(dtypes)
            assert dtypes["sample"] == dtypes["step"] == dtypes["next_sample"] == dtypes["denoised"] == "float32"
        else:
            assert dtypes.pop("input_ids") == "int64" and set(dtypes.values()) == {"float16"}
    decoder = read_manifest(same_arch_package).components["vae_decoder"]
    with OrtCpuEngine(same_arch_package / decoder.onnx_fp16) as engine:
        assert [t.dtype.name for t in (*engine.inputs, *engine.outputs)] == ["float32", "float32"]


def test_fp16_export_errors_are_recorded_and_bounded(sdxl_package, same_arch_package):
    for package in (sdxl_package, same_arch_package):
        for comp in read_manifest(package).components.values():
            if comp.onnx_fp16 is None:
                continue
            assert comp.export_check_fp16.keys() == comp.export_check.keys()
            for output, error in comp.export_check_fp16.items():
                # fp16-sized (well above the fp32 graph's error) and within the 5e-2 bar
                assert comp.export_check[output] < error < 2e-2, (comp.name, output, error)


def test_fp16_expert_graph_matches_fp32_graph(sdxl_package):
    m = read_manifest(sdxl_package)
    rng = np.random.default_rng(0)
    latent = lambda: rng.standard_normal((2, 4, 8, 12), dtype=np.float32)
    feeds = {
        "sample": latent(), "denoised_prev": latent(), "noise": latent(),
        "step": np.array([0.3, 611.0, 1.0, -1.2, 5.0, 0.9, 0.1, 0.05, 0.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((4, 77, 16), dtype=np.float32),
        "text_embeds": rng.standard_normal((4, 16), dtype=np.float32),
        "time_ids": np.tile(np.array([32, 48, 0, 0, 6], np.float32), (4, 1)),
    }
    comp = m.components["expert_detail"]
    with OrtCpuEngine(sdxl_package / comp.onnx) as fp32, OrtCpuEngine(sdxl_package / comp.onnx_fp16) as fp16:
        want = fp32.run(feeds)
        got = fp16.run({k: v.astype(np.float16) if k in CONDITIONING else v for k, v in feeds.items()})
    for name in ("next_sample", "denoised"):
        scale = max(1.0, float(np.abs(want[name]).max()))
        assert got[name].dtype == np.float32
        assert np.abs(got[name] - want[name]).max() < 2e-2 * scale, name


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_a"])
def test_fp16_graphs_end_to_end_psnr(same_arch_package, sampler):
    """Every component on its fp16 graph (the ones GPU backends build from), run by ORT
    CPU in the real sampling loop, against the fp32 package: PSNR >= 30 dB."""
    from conftest import psnr

    from artrt.runtime import Pipeline
    from artrt.runtime.engine_records import source_onnx
    from artrt.runtime.loading import OpenEngines

    root, m = same_arch_package, read_manifest(same_arch_package)
    half = {n: OrtCpuEngine(root / source_onnx(m, n), name=n, threads=1).activate() for n in m.components}
    args = dict(steps=10, seed=5, sampler=sampler, num_images=2)
    fp16 = Pipeline(root, m, OpenEngines.of("ort-cpu", half))
    with Pipeline.load(root, backend="ort-cpu", threads=1) as fp32, fp16:
        for a, b in zip(fp32.generate("a red boat", **args).images, fp16.generate("a red boat", **args).images):
            assert psnr(np.asarray(a), np.asarray(b)) >= 30.0


def test_precision_arguments_are_checked(tmp_path):
    from artrt.export import export_package

    for kwargs, message in [
        ({"targets": ("cpu",), "precision": "fp16"}, "--targets cpu writes fp32 graphs only"),
        ({"precision": "int8"}, "unknown precision"),
        ({"precision": "fp32", "fp16_vae": True}, "--fp16-vae needs fp16 graphs"),
        ({"targets": ("cpu",), "fp16_vae": True}, "--fp16-vae needs fp16 graphs"),
    ]:
        with pytest.raises(InputError, match=message):  # checked before the sources are touched
            export_package(None, tmp_path / "p", **kwargs)  # type: ignore[arg-type]
