"""Regression tests for bad or unusual input: each ends in one clear error before any work, or is
accepted the way diffusers accepts it (None, numpy scalars)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from artrt.errors import InputError, PackageError
from artrt.runtime.arguments import check_guidance
from artrt.runtime.budget import ACTIVATION_BYTES_PER_PIXEL, check_fits, request_cost
from artrt.runtime.cli import main
from artrt.runtime.package import read_manifest


def _pixels(out) -> np.ndarray:
    return np.stack([np.asarray(image) for image in out.images])


def _one_line_error(capsys, argv, pattern: str) -> None:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("artrt: error:")]
    assert code == 1 and len(errors) == 1 and pattern in errors[0], err
    assert "Traceback" not in err


# -- Python API ------------------------------------------------------------------------------
def test_diffusers_idioms_are_accepted(sdxl_pipe):
    """negative_prompt=None is no negative prompt; numpy scalars are numbers."""
    plain = _pixels(sdxl_pipe.generate("p", steps=3, seed=5, guidance=3.0))
    same = sdxl_pipe.generate("p", negative_prompt=None, steps=np.int64(3), seed=np.uint32(5),
                              guidance=np.float32(3), switch=np.float64(0.8), num_images=np.int32(1))
    assert np.array_equal(_pixels(same), plain)
    assert same.parameters["negative_prompt"] == "" and same.parameters["steps"] == 3


def test_seed_none_draws_a_recorded_seed(sdxl_pipe):
    out = sdxl_pipe.generate("p", steps=2, seed=None)
    seed = out.parameters["seed"]
    assert isinstance(seed, int) and seed >= 0
    assert np.array_equal(_pixels(sdxl_pipe.generate("p", steps=2, seed=seed)), _pixels(out))


@pytest.mark.parametrize("kwargs, message", [
    ({"seed": 1.5}, "seed must be a whole number"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"num_images": 1.7}, "num_images must be a whole number"),
    ({"num_images": 0}, "num_images must be >= 1"),
    ({"height": "32"}, "height must be a whole number"),
    ({"switch": "0.5"}, "switch must be a number"),
    ({"guidance": "12"}, "guidance must be a number or a list"),
    ({"guidance": float("nan")}, "guidance must be finite"),
    ({"guidance": [1.0, float("inf")]}, "guidance must be finite"),
    ({"guidance": [1.0, 2.0, 3.0]}, "guidance takes 1 or 2 values"),
    ({"steps": True}, "steps must be a whole number"),
    ({"steps": 2.0}, "steps must be a whole number"),
    ({"steps": 100_000}, "steps must be <= 1000"),
    ({"negative_prompt": 3}, "negative_prompt must be a string or None"),
    ({"sampler": 1}, "sampler must be a string"),
    ({"sampler": "plms"}, "unknown sampler 'plms'"),
    ({"latents": np.full((1, 4, 16, 16), np.inf, np.float32)}, "latents contain NaN or Inf"),
    ({"latents": "noise"}, "latents must be an array of numbers"),
])
def test_bad_arguments_raise_input_error(sdxl_pipe, kwargs, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        sdxl_pipe.generate("p", steps=kwargs.pop("steps", 2), **kwargs)


def test_prompt_must_be_a_string(sdxl_pipe):
    with pytest.raises(InputError, match="prompt must be a string"):
        sdxl_pipe.generate(["a", "b"], steps=2)


def test_guidance_forms():
    assert check_guidance(np.float32(3), 2) == (3.0, 3.0)
    assert check_guidance(np.array([1, 2]), 2) == (1.0, 2.0)
    assert check_guidance((4, 5.5), 2) == (4.0, 5.5)


def test_long_prompt_warns_what_was_cut(sdxl_pipe, caplog):
    limit = sdxl_pipe.tokenizers["text_encoder"].max_length
    with caplog.at_level(logging.WARNING, logger="artrt"):
        sdxl_pipe.generate(" ".join(["lighthouse"] * (limit + 5)) + " ENDWORD", steps=2)
    warnings = [r.getMessage() for r in caplog.records if "cut off" in r.getMessage()]
    # one warning for SDXL's two text encoders, quoting the start of the cut-off text only
    assert len(warnings) == 1 and "characters were cut off" in warnings[0] and warnings[0].endswith("…'")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="artrt"):
        sdxl_pipe.generate("a short prompt", steps=2)
    assert not [r for r in caplog.records if "cut off" in r.getMessage()]


# -- memory estimate -------------------------------------------------------------------------
def test_request_cost_counts_buffers_pixels_and_activations():
    cost = request_cost((2, 4, 16, 16), 32, 32, steps=10, noisy=False)
    latent = 2 * 4 * 16 * 16 * 4
    assert cost.buffers == latent * 8 + latent // 2 * 2
    assert cost.pixels == 2 * 32 * 32 * 3 * 6
    assert cost.activations == 2 * 32 * 32 * ACTIVATION_BYTES_PER_PIXEL
    assert request_cost((2, 4, 16, 16), 32, 32, steps=10, noisy=True).buffers == cost.buffers + latent * 10


def test_check_fits_refuses_with_one_line():
    cost = request_cost((1, 4, 128, 128), 1024, 1024, steps=30, noisy=False)
    check_fits(cost, "x", available=cost.total * 2)
    with pytest.raises(InputError, match=r"needs about .* GiB of memory .* GiB is available"):
        check_fits(cost, "1 image(s) of 1024x1024", available=cost.total)


@pytest.mark.parametrize("argv, message", [
    (["-n", "100000"], "100000 image(s) of 32x32 needs about"),
    (["--height", "100000", "--width", "100000"], "height must be <= 16384"),
    (["--height", "16384", "--width", "16384"], "of memory"),
    (["--seed", "-1"], "seed must be >= 0"),
    (["--guidance", "nan"], "guidance must be finite"),
    (["--guidance", "inf"], "guidance must be finite"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--threads", "100000"], "--threads must be <="),
])
def test_generate_refuses_before_loading(capsys, sdxl_package, tmp_path, argv, message):
    _one_line_error(capsys, ["generate", "p", "-m", sdxl_package, "-o", tmp_path / "x.png", *argv], message)
    assert not list(tmp_path.iterdir())


# -- manifests -------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, message", [
    (lambda data: [1, 2], "a JSON list, not an object"),
    (lambda data: {**data, "size_multiple": 0}, "'size_multiple' must be a whole number >= 1"),
    (lambda data: {**data, "latent_scale": "8"}, "'latent_scale' must be a whole number >= 1"),
    (lambda data: {**data, "experts": [{**data["experts"][0], "conditioning": {
        **data["experts"][0]["conditioning"], "colour": 1}}]}, "unknown key(s) 'colour'"),
])
def test_malformed_manifest_is_one_package_error(package_copy, capsys, edit, message):
    path = package_copy / "artrt.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(PackageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_manifest(package_copy, verify_hashes=False)
    _one_line_error(capsys, ["info", package_copy], message)


def test_info_accepts_the_manifest_path(capsys, sdxl_package):
    assert main(["info", str(sdxl_package / "artrt.json"), "--no-verify"]) == 0
    assert "sdxl-ensemble" in capsys.readouterr().out


# -- command line ----------------------------------------------------------------------------
def test_no_arguments_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: artrt") and "generate" in out and "export" in out


def test_quiet_works_after_the_subcommand(capsys, sdxl_package):
    assert main(["info", str(sdxl_package), "--no-verify", "-q"]) == 0
    assert main(["-q", "info", str(sdxl_package), "--no-verify"]) == 0
    assert main(["generate", "p", "-m", str(sdxl_package), "-o", "/nonexistent-dir/x.png", "-q"]) == 1
    assert "artrt: error:" in capsys.readouterr().err


def test_swapped_base_and_refiner_say_so(capsys, models_dir, tmp_path):
    _one_line_error(capsys, ["export", "--base", models_dir / "refiner", "--refiner", models_dir / "base",
                             "--out", tmp_path / "pkg"], "swap them")


def test_generate_logs_step_progress_on_long_runs(monkeypatch, capsys, sdxl_package, tmp_path):
    """With a period of 0 s every step counts as long, so every step is logged."""
    from artrt.runtime import pipeline

    original = pipeline.step_progress
    monkeypatch.setattr(pipeline, "step_progress", lambda total: original(total, every=0.0))
    assert main(["generate", "p", "-m", str(sdxl_package), "-o", str(tmp_path / "x.png"), "--steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "step 1/3" in err and "step 3/3" in err


# -- offline sampling ------------------------------------------------------------------------
def test_sample_refuses_oversized_items_alone(capsys, sdxl_package, tmp_path):
    """Items that ask for too much are reported and skipped before any work; the rest are made."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(item) for item in [
        {"prompt": "fine", "id": "ok"},
        {"prompt": "too many", "n": 100_000_000},
        {"prompt": "too many for memory", "n": 10_000, "height": 4096, "width": 4096},
        {"prompt": "too large", "height": 16384, "width": 16384},
    ]) + "\n")
    code = main(["sample", str(prompts), "--model", str(sdxl_package), "--out", str(tmp_path / "out"),
                 "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"{prompts}:2: n must be <= 10000" in err
    assert f"{prompts}:3: " in err and f"{prompts}:4: " in err and err.count("of memory") == 2
    assert [p.name for p in (tmp_path / "out" / "images").iterdir()] == ["ok.png"]


@pytest.mark.parametrize(("bounds", "value", "message"), [
    ((0.0, None), -1.0, "x must be >= 0, got -1"),
    ((None, 1.0), 2.0, "x must be <= 1, got 2"),
    ((0.0, 1.0), 2.0, r"x must be in \[0, 1\], got 2"),
])
def test_one_sided_float_bounds_are_one_line(bounds, value, message):
    from artrt.runtime.checks import check_float

    with pytest.raises(InputError, match=message):
        check_float("x", value, *bounds)
