"""``memory="low"``: one component resident at a time, the same images as the default mode;
tiled decoding; refusing a package whose weights cannot fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import psnr

from artrt.errors import InputError
from artrt.runtime import Pipeline
from artrt.runtime.budget import check_load_fits, weight_bytes
from artrt.runtime.cli import main
from artrt.runtime.package import read_manifest
from artrt.runtime.tiles import decode_tiled, ramp, tile_starts


def _pixels(out) -> np.ndarray:
    return np.stack([np.asarray(image) for image in out.images])


@pytest.fixture(scope="module")
def low_pipe(sdxl_package):
    with Pipeline.load(sdxl_package, backend="ort-cpu", threads=1, memory="low") as pipe:
        yield pipe


@pytest.mark.parametrize("kwargs", [
    dict(sampler="euler", switch=0.5, num_images=2),
    dict(sampler="euler_a", switch=0.8),
    dict(sampler="dpmpp_2m", switch=0.6, negative_prompt="blurry"),
    dict(sampler="ddim", switch=1.0),
])
def test_low_memory_images_equal_the_default(sdxl_pipe, low_pipe, kwargs):
    want = _pixels(sdxl_pipe.generate("a lighthouse", steps=6, seed=11, **kwargs))
    got = low_pipe.generate("a lighthouse", steps=6, seed=11, **kwargs)
    assert np.array_equal(_pixels(got), want)
    assert got.timings["load"] > 0 and low_pipe.memory == "low"


def test_low_memory_loads_each_stage_and_releases_it_before_the_next(sdxl_package):
    events: list[str] = []
    with Pipeline.load(sdxl_package, backend="ort-cpu", threads=1, memory="low") as pipe:
        assert pipe.engines == {}  # nothing loaded up front

        def watch(name, engine):
            events.append(f"open {name}")
            release = engine.release
            engine.release = lambda: (events.append(f"release {name}"), release())[1]

        pipe.watch_engines(watch)
        pipe.generate("p", steps=4, switch=0.5)
        assert pipe.engines == {}
    assert events == [
        "open text_encoder", "release text_encoder", "open text_encoder_2", "release text_encoder_2",
        "open expert_composition", "release expert_composition", "open expert_detail", "release expert_detail",
        "open vae_decoder", "release vae_decoder",
    ]


def test_default_memory_keeps_every_engine_resident(sdxl_pipe):
    before = dict(sdxl_pipe.engines)
    sdxl_pipe.generate("p", steps=2)
    assert sdxl_pipe.engines == before and len(before) == 5 and "load" not in sdxl_pipe.generate("p", steps=2).timings


def test_bad_memory_mode_is_refused(sdxl_package):
    with pytest.raises(InputError, match="memory must be one of default, low"):
        Pipeline.load(sdxl_package, memory="tiny")


def test_load_refuses_weights_that_cannot_fit_and_suggests_low_memory(sdxl_package):
    m = read_manifest(sdxl_package, verify_hashes=False)
    sizes = [weight_bytes(m, name) for name in m.components]
    assert all(size > 0 for size in sizes)
    just_short = int(sum(sizes) / 0.9) - 1
    with pytest.raises(InputError, match="try --memory low"):
        check_load_fits(sdxl_package, m, "ort-cpu", "default", available=just_short)
    check_load_fits(sdxl_package, m, "ort-cpu", "low", available=just_short)  # the largest alone fits
    with pytest.raises(InputError, match="for its weights"):
        check_load_fits(sdxl_package, m, "ort-cpu", "low", available=int(max(sizes) / 0.9) - 1)


# -- tiled decoding --------------------------------------------------------------------------
def test_tiles_cover_the_axis_with_overlap():
    assert tile_starts(16, 32, 8) == [0]
    starts = tile_starts(100, 32, 8)
    assert starts[0] == 0 and starts[-1] == 68 and all(b - a <= 24 for a, b in zip(starts, starts[1:]))
    weights = ramp(16, 4, 6)
    assert weights.min() > 0 and weights[4:10].tolist() == [1.0] * 6 and weights[0] < weights[3]


def test_tiled_decode_of_a_local_decoder_is_exact():
    """A decoder that looks at one latent pixel per output pixel has no seams to hide: the weighted
    blend must reproduce it exactly, whatever the tiling."""
    latents = np.random.default_rng(0).standard_normal((2, 4, 37, 53)).astype(np.float32)

    def decode(z):
        return np.repeat(np.repeat(np.tanh(z[:, :3] * 2 + z[:, 3:4]), 8, axis=2), 8, axis=3)

    np.testing.assert_allclose(decode_tiled(decode, latents, 16, 8), decode(latents), atol=1e-6)


def test_tiled_decode_of_the_real_decoder_is_close(sdxl_pipe, capsys):
    engine = sdxl_pipe.engines["vae_decoder"]
    latents = np.random.default_rng(1).standard_normal((1, 4, 48, 48)).astype(np.float32)
    full = engine.run({"latents": latents})["image"]
    tiled = decode_tiled(lambda z: engine.run({"latents": z})["image"], latents, 16, sdxl_pipe.manifest.latent_scale)
    quality = psnr((np.clip(full, -1, 1) + 1) * 127.5, (np.clip(tiled, -1, 1) + 1) * 127.5)
    with capsys.disabled():
        print(f"\ntiled vs untiled decode (tiny VAE, 96 px, 32 px tiles): {quality:.1f} dB")
    assert quality >= 30


def test_cli_low_memory_and_tiles(capsys, sdxl_package, tmp_path):
    argv = ["generate", "p", "-m", str(sdxl_package), "--steps", "3", "--seed", "4"]
    assert main([*argv, "-o", str(tmp_path / "a.png")]) == 0
    assert main([*argv, "-o", str(tmp_path / "b.png"), "--memory", "low"]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert main([*argv, "-o", str(tmp_path / "c.png"), "--vae-tiles", "8"]) == 1
    assert "--vae-tiles must be >= 64" in capsys.readouterr().err
    assert main([*argv, "-o", str(tmp_path / "c.png"), "--vae-tiles", "64", "--height", "128", "--width", "128"]) == 0


def test_bench_times_engines_in_low_memory(capsys, sdxl_package, tmp_path):
    assert main(["bench", "--model", str(sdxl_package), "--steps", "3", "--runs", "1", "--warmup", "0", "--no-fit",
                 "--memory", "low", "--json", str(tmp_path / "b.json")]) == 0


    stages = json.loads((tmp_path / "b.json").read_text())["stages"]
    assert stages["load"]["p50"] > 0 and stages["floor"]["p50"] > 0  # engines opened per stage are timed too
    assert stages["step:composition"]["p50"] > 0 and stages["step:detail"]["p50"] > 0


# -- phase batching --------------------------------------------------------------------------
REQUESTS = [
    dict(prompt="a lighthouse", steps=5, seed=1, switch=0.5),
    dict(prompt="a red barn", steps=6, seed=2, switch=0.8, sampler="euler_a", num_images=2),
    dict(prompt="fog", steps=4, seed=3, switch=1.0, sampler="dpmpp_2m", height=48, width=40),
]


def test_generate_many_equals_one_call_each(sdxl_pipe, low_pipe):
    want = [_pixels(sdxl_pipe.generate(**r)) for r in REQUESTS]
    for pipe in (sdxl_pipe, low_pipe):
        got = pipe.generate_many(REQUESTS)
        assert [out.parameters["seed"] for out in got] == [1, 2, 3]
        for g, w in zip(got, want):
            assert np.array_equal(_pixels(g), w)
    assert low_pipe.generate_many([]) == []


def test_low_memory_loads_each_component_once_for_many_requests(sdxl_package):
    opened: list[str] = []
    with Pipeline.load(sdxl_package, backend="ort-cpu", threads=1, memory="low") as pipe:
        pipe.watch_engines(lambda name, engine: opened.append(name))
        pipe.generate_many(REQUESTS)
    assert opened == ["text_encoder", "text_encoder_2", "expert_composition", "expert_detail", "vae_decoder"]


def test_generate_many_checks_every_request_first(low_pipe):
    with pytest.raises(InputError, match="steps must be >= 1"):
        low_pipe.generate_many([REQUESTS[0], {**REQUESTS[1], "steps": 0}])


def test_sample_low_memory_makes_the_same_images(capsys, sdxl_package, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a", "seed": 5}, {"prompt": "b", "n": 3}, {"prompt": "c", "sampler": "euler_a", "n": 2},
        {"prompt": "d", "height": 48, "width": 40}]) + "\n")
    hashes = {}
    for memory in ("default", "low"):
        out = tmp_path / memory
        assert main(["sample", str(prompts), "--model", str(sdxl_package), "--out", str(out), "--steps", "3",
                     "--batch", "2", "--memory", memory]) == 0, capsys.readouterr().err
        hashes[memory] = {p.name: p.read_bytes() for p in sorted((out / "images").iterdir())}
    assert len(hashes["low"]) == 7 and hashes["low"] == hashes["default"]
