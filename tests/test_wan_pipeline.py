"""The Wan 2.2 family end to end (issue 16): a random tiny ``WanPipeline`` folder exported with
``artrt export`` and run by the torch-free runtime, against diffusers' ``WanPipeline`` on the same
latents: text-to-image and 5 frames, unipc and euler, negative and empty prompts, guidance pairs,
boundary ratios, non-square sizes, low memory; plus a wrong-boundary control and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import psnr

from artrt.errors import InputError
from artrt.runtime import Pipeline
from artrt.runtime.package import Attention, read_manifest
from artrt.runtime.video import read_webp_parameters

PROMPT, NEGATIVE = "a red cat with a blue dog", "blurry, low quality"
HEIGHT, WIDTH = 32, 48  # 4 x 6 latents
BAR = 40.0  # dB, frames in [0, 1]
VAE_GAIN = 4.0


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    """The tiny random pair, its VAE's output scaled up: the tiny decoder's video has a std of about
    0.12, too flat for a 40 dB bar to tell trajectories apart (the wrong-boundary control)."""
    from diffusers import AutoencoderKLWan

    from artrt.export.wan_models import write_wan_pair

    folder = write_wan_pair(tmp_path_factory.mktemp("wan") / "pair", size="tiny", seed=0)
    vae = AutoencoderKLWan.from_pretrained(folder / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(VAE_GAIN)
        vae.decoder.conv_out.bias.mul_(VAE_GAIN)
    vae.save_pretrained(folder / "vae")
    return folder


@pytest.fixture(scope="module")
def wan_package(wan_dir, tmp_path_factory):
    from artrt.export import export_package
    from artrt.export.wan_package import load_wan

    out = tmp_path_factory.mktemp("wan-pkg") / "pkg"
    export_package(load_wan(wan_dir), out, steps=6)
    return out


@pytest.fixture(scope="module")
def pipe(wan_dir):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(wan_dir, local_files_only=True)


@pytest.fixture(scope="module")
def runtime(wan_package):
    with Pipeline.load(wan_package, backend="ort-cpu") as loaded:
        yield loaded


def _diffusers(pipe, latents, *, sampler="unipc", boundary=0.875, negative=NEGATIVE, guidance=(4.0, 3.0),
               steps=6, frames=1, height=HEIGHT, width=WIDTH) -> np.ndarray:
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    original = pipe.scheduler, pipe.config.boundary_ratio
    if sampler == "euler":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config.flow_shift)
    else:
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.register_to_config(boundary_ratio=boundary)
    try:
        with torch.no_grad():
            return pipe(PROMPT, negative_prompt=negative, height=height, width=width, num_frames=frames,
                        num_inference_steps=steps, guidance_scale=guidance[0], guidance_scale_2=guidance[1],
                        latents=torch.from_numpy(latents.copy()), output_type="np").frames[0]
    finally:
        pipe.scheduler = original[0]
        pipe.register_to_config(boundary_ratio=original[1])


def _latents(frames: int, height: int = HEIGHT, width: int = WIDTH, seed: int = 7) -> np.ndarray:
    shape = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _frames(result) -> np.ndarray:
    clips = result.frames if result.frames is not None else [result.images]
    return np.stack([np.asarray(f, np.float32) / 255 for f in clips[0]])


CASES = {
    "image-unipc": dict(),
    "video5-unipc": dict(frames=5),
    "image-euler": dict(sampler="euler"),
    "video5-euler-empty-negative": dict(sampler="euler", frames=5, negative=""),
    "empty-negative": dict(negative=""),
    "guidance-7-2": dict(guidance=(7.0, 2.0)),
    "boundary-0.5": dict(boundary=0.5),
    "boundary-0.95-nonsquare": dict(boundary=0.95, height=48, width=32),
}


@pytest.mark.parametrize("case", CASES)
def test_frames_match_wan_pipeline(runtime, pipe, case):
    options = {"sampler": "unipc", "boundary": 0.875, "negative": NEGATIVE, "guidance": (4.0, 3.0), "steps": 6,
               "frames": 1, "height": HEIGHT, "width": WIDTH, **CASES[case]}
    latents = _latents(options["frames"], options["height"], options["width"])
    expected = (np.round(_diffusers(pipe, latents, **options) * 255) / 255).astype(np.float32)
    result = runtime.generate(PROMPT, negative_prompt=options["negative"], steps=options["steps"],
                              guidance=list(options["guidance"]), switch=options["boundary"],
                              sampler=options["sampler"], height=options["height"], width=options["width"],
                              num_frames=options["frames"], latents=latents)
    got = _frames(result)
    assert got.shape == expected.shape
    assert psnr(got, expected, peak=1.0) >= BAR
    if options["frames"] > 1:
        assert len(result.frames[0]) == options["frames"] and result.images[0] == result.frames[0][0]


def test_a_wrong_boundary_fails_the_bar(runtime, pipe):
    latents = _latents(1)
    expected = _diffusers(pipe, latents, boundary=0.875)
    wrong = runtime.generate(PROMPT, negative_prompt=NEGATIVE, steps=6, guidance=[4.0, 3.0], switch=0.3,
                             height=HEIGHT, width=WIDTH, latents=latents)
    assert psnr(_frames(wrong), expected, peak=1.0) < BAR


def test_low_memory_gives_the_same_frames(wan_package, runtime):
    latents = _latents(5)
    kwargs = dict(steps=6, height=HEIGHT, width=WIDTH, num_frames=5, latents=latents)
    resident = runtime.generate(PROMPT, **kwargs)
    with Pipeline.load(wan_package, backend="ort-cpu", memory="low") as low:
        phased = low.generate(PROMPT, **kwargs)
    assert np.array_equal(_frames(resident), _frames(phased))


def test_package_manifest(wan_package):
    m = read_manifest(wan_package)
    assert m.family == "wan" and m.decoder == "vae_decoder" and "vae_decoder_chunk" in m.components
    assert m.defaults.switch == 0.875 and m.defaults.sampler == "unipc" and m.defaults.steps == 6
    assert [e.component for e in m.experts] == ["expert_composition", "expert_detail"]
    assert m.tokenizers["text_encoder"].max_length == 512 and m.tokenizers["text_encoder"].pad_id == 0
    assert m.latent_channels == 16 and m.latent_scale == 8 and m.size_multiple == 16
    assert m.schedule["shift"] == 3.0
    # rope_max_seq_len 32 patches per axis: WanPipeline's 832x480 is scaled to fit (512 px at most)
    assert m.max_latent == (32, 64, 64) and (m.defaults.width, m.defaults.height) == (512, 288)
    # attention for the memory estimate: the transformers attend across frames, the VAE per frame
    assert m.components["expert_composition"].attention == Attention(heads=2, stride=2, frames=True)
    assert m.components["vae_decoder_chunk"].attention == Attention(heads=1, stride=1, frames=False)


def test_info_shows_the_limits(wan_package, capsys):
    from artrt.runtime.cli import main

    assert main(["info", str(wan_package), "--no-verify"]) == 0
    assert "limits    at most 512x512 px, 125 frames" in capsys.readouterr().out


def test_sizes_and_frames_past_the_position_tables_are_one_line(runtime):
    """Past rope_max_seq_len the transformer cannot run (ONNX Runtime fails in a Reshape, diffusers
    too): refused before any work, naming the limit; the default size runs."""
    with pytest.raises(InputError, match=r"^528x288 is larger than this package's transformers can place: width "
                                         r"and height must be <= 512x512$"):
        runtime.generate(PROMPT, width=528, height=288)
    with pytest.raises(InputError, match=r"^num_frames 129 is more than this package's transformers can place: at "
                                         r"most 125$"):
        runtime.generate(PROMPT, height=HEIGHT, width=WIDTH, num_frames=129)
    assert runtime.generate(PROMPT, steps=1).images[0].size == (512, 288)


def test_video_is_saved_as_animated_webp(runtime, tmp_path):
    result = runtime.generate(PROMPT, steps=2, height=HEIGHT, width=WIDTH, num_frames=5, seed=3)
    (path,) = result.save(tmp_path / "clip.webp")
    from PIL import Image

    with Image.open(path) as image:
        assert image.n_frames == 5 and image.size == (WIDTH, HEIGHT)
        xmp = image.info["xmp"]  # an XMP packet (RDF/XML) with the parameters as one property
    assert xmp.startswith(b"<x:xmpmeta") and b"<rdf:Description" in xmp and b"<artrt:parameters>" in xmp
    assert read_webp_parameters(path)["num_frames"] == 5 and read_webp_parameters(path)["seed"] == 3
    with pytest.raises(InputError, match="must end in .webp"):
        result.save(tmp_path / "clip.png")


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(num_frames=6), r"num_frames must be 4k\+1 .* got 6 \(try 5 or 9\)"),
    (dict(num_frames=0), "num_frames must be >= 1"),
    (dict(sampler="dpmpp_2m"), "sampler"),
    (dict(height=40), "multiple of 16"),
    (dict(latents=np.zeros((1, 16, 1, 4, 6), np.float32), num_frames=5), "latents have shape"),
])
def test_bad_requests_are_refused_before_any_work(runtime, kwargs, message):
    with pytest.raises(InputError, match=message):
        runtime.generate(PROMPT, **{"height": HEIGHT, "width": WIDTH, **kwargs})


def test_frames_asked_of_an_image_package(sdxl_package):
    with Pipeline.load(sdxl_package, backend="ort-cpu") as sdxl:
        with pytest.raises(InputError, match="makes single images .* num_frames must be 1, got 5"):
            sdxl.generate(PROMPT, num_frames=5)


def test_unknown_transformer_class_is_one_line(wan_dir, tmp_path):
    import shutil

    from artrt.errors import ConfigError
    from artrt.export.wan_package import load_wan

    copy = shutil.copytree(wan_dir, tmp_path / "copy")
    config = json.loads((copy / "transformer" / "config.json").read_text())
    (copy / "transformer" / "config.json").write_text(json.dumps({**config, "_class_name": "MysteryModel"}))
    with pytest.raises(ConfigError, match="transformer class MysteryModel is not supported"):
        load_wan(copy)


def test_batched_requests_get_their_lone_frames(runtime):
    calls = [dict(prompt=PROMPT, seed=1, steps=3, height=HEIGHT, width=WIDTH, num_frames=5),
             dict(prompt="a blue dog", negative_prompt="", seed=2, num_images=2, steps=3, height=HEIGHT, width=WIDTH,
                  num_frames=5)]
    batched = runtime.generate_many(calls, batch=True)
    assert [r.batch for r in batched] == [3, 3]
    for call, result in zip(calls, batched):
        alone = runtime.generate(**call)
        for got, want in zip(result.frames, alone.frames):
            assert np.array_equal(np.stack([np.asarray(f) for f in got]), np.stack([np.asarray(f) for f in want]))


def test_sample_makes_videos_and_images_like_generate(wan_package, runtime, tmp_path, caplog):
    """``artrt sample`` on a Wan package: items with ``frames`` become animated WebP videos whose
    frames are exactly generate's (two batched into one engine call), an item without stays an image,
    a bad frame count is a skipped line, and a rerun finds everything done."""
    from PIL import Image

    from artrt.runtime.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(item) for item in [
        {"prompt": PROMPT, "id": "clip-a", "seed": 4, "frames": 5},
        {"prompt": PROMPT, "id": "clip-b", "seed": 5, "frames": 5},
        {"prompt": "a blue dog", "id": "still", "seed": 6},
        {"prompt": PROMPT, "id": "bad", "frames": 4},
    ]) + "\n")
    out = tmp_path / "out"
    args = ["sample", str(prompts), "--model", str(wan_package), "--out", str(out), "--steps", "3",
            "--height", str(HEIGHT), "--width", str(WIDTH), "--batch", "2", "--backend", "ort-cpu"]
    assert main(args) == 0
    records = {r["id"]: r for r in map(json.loads, (out / "metadata.jsonl").read_text().splitlines())}
    assert sorted(records) == ["clip-a", "clip-b", "still"]
    assert records["clip-a"]["batch_size"] == 2 and records["clip-a"]["file"] == "images/clip-a.webp"
    assert "num_frames must be 4k+1" in json.dumps(json.loads((out / "run.json").read_text())["bad_lines"])
    for image_id, seed in (("clip-a", 4), ("clip-b", 5)):
        want = runtime.generate(PROMPT, seed=seed, steps=3, height=HEIGHT, width=WIDTH, num_frames=5).frames[0]
        with Image.open(out / "images" / f"{image_id}.webp") as video:
            got = [np.asarray(video.seek(k) or video.convert("RGB")) for k in range(video.n_frames)]
        assert len(got) == 5 and all(np.array_equal(g, np.asarray(w)) for g, w in zip(got, want))
        assert read_webp_parameters(out / "images" / f"{image_id}.webp")["num_frames"] == 5
    still = runtime.generate("a blue dog", seed=6, steps=3, height=HEIGHT, width=WIDTH).images[0]
    with Image.open(out / "images" / "still.png") as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(still))
    assert main(args) == 0  # resumed: every video and image verified by its sha256, nothing redone
    assert json.loads((out / "run.json").read_text())["counts"]["generated"] == 0
    low = tmp_path / "low"  # phase-batched: each expert loaded once for the whole job, same bytes
    assert main([*args[:5], str(low), *args[6:], "--memory", "low"]) == 0
    assert {r["id"]: r["sha256"] for r in map(json.loads, (low / "metadata.jsonl").read_text().splitlines())} == \
        {i: r["sha256"] for i, r in records.items()}


def test_tiled_decoding_is_refused_for_the_wan_vae(wan_package):
    with pytest.raises(InputError, match=r"tiled decoding is for image VAE decoders; this package decodes video "
                                         r"frame by frame$"):
        Pipeline.load(wan_package, backend="ort-cpu", vae_tile=64)
