"""Messages a user trial found unclear: one plain line each, named as the user typed it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import DEMO
from cli_helpers import error_line as _error

from artrt.errors import EngineError, InputError
from artrt.runtime.cli import main
from artrt.runtime.cli.bench import parse_size
from artrt.runtime.package import read_manifest
from artrt.runtime.sampling.output import _check_same
from artrt.runtime.sampling.tasks import ImageTask
from artrt.runtime.text import PromptTokenizer


# -- ONNX Runtime's own log ------------------------------------------------------------------
def _failing_reshape(path: Path) -> Path:
    """A graph that loads but fails at run time when ``s`` does not fit ``x``."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6]),
         helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_engine_failure_prints_no_onnxruntime_log(tmp_path, capfd):
    from artrt.engines.ort import OrtCpuEngine

    engine = OrtCpuEngine(_failing_reshape(tmp_path / "bad.onnx"), "bad").activate()
    x, s, y = np.zeros(6, np.float32), np.array([4, 4], np.int64), np.zeros((4, 4), np.float32)
    with pytest.raises(EngineError, match="cannot be reshaped"):
        engine.run({"x": x, "s": s})
    with pytest.raises(EngineError, match="cannot be reshaped"):
        engine.run_bound(engine.bind({"x": x, "s": s}, {"y": y}))
    engine.release()
    err = capfd.readouterr().err  # ORT logs to file descriptor 2, not sys.stderr
    assert "onnxruntime:" not in err and "sequential_executor" not in err, err


# -- generate: frames, output suffix, flags ------------------------------------------------------
@pytest.mark.parametrize("output", ["x.png", "x.webp"])
def test_frames_on_an_image_package_says_so_first(capsys, tmp_path, output):
    line = _error(capsys, "generate", "a", "-m", DEMO, "--frames", 5, "-o", tmp_path / output)
    assert "makes single images" in line and "--frames must be 1, got 5" in line and ".webp" not in line


@pytest.mark.parametrize("frames", [0, -3])
def test_bad_frame_count_names_the_flag(capsys, tmp_path, frames):
    line = _error(capsys, "generate", "a", "-m", DEMO, "--frames", frames, "-o", tmp_path / "v.png")
    assert line.endswith(f"--frames must be >= 1, got {frames}")


def test_flags_are_named_as_typed(capsys, tmp_path):
    out = tmp_path / "x.png"
    assert _error(capsys, "generate", "a", "-m", DEMO, "--vae-tiles", 3, "-o", out).endswith(
        "--vae-tiles must be >= 64, got 3")
    assert _error(capsys, "generate", "a", "-m", DEMO, "--num-images", 0, "-o", out).endswith(
        "--num-images must be >= 1, got 0")
    assert _error(capsys, "bench", "-m", DEMO, "--vae-tiles", 3).endswith("--vae-tiles must be >= 64, got 3")
    assert not out.exists()


# -- sample: resuming with other LoRAs ---------------------------------------------------------------
def test_resume_with_other_loras_reads_plainly(tmp_path):
    lora = {"file": "/loras/style.safetensors", "scale": 0.5, "expert": "both", "sha256": "ab" * 32}
    task = ImageTask("000000", "a", 1, {"prompt": "a", "seed": 0})
    with pytest.raises(InputError) as caught:
        _check_same(task, {"prompt": "a", "seed": 0, "loras": [lora]}, tmp_path / "metadata.jsonl")
    message = str(caught.value)
    assert "with LoRAs style.safetensors:0.5@both, this job asks for no LoRAs: use --overwrite" in message
    assert "None" not in message and "\n" not in message
    with pytest.raises(InputError, match="with no LoRAs, this job asks for LoRAs style.safetensors:0.5@both"):
        _check_same(ImageTask("000000", "a", 1, {"prompt": "a", "seed": 0, "loras": [lora]}),
                    {"prompt": "a", "seed": 0}, tmp_path / "metadata.jsonl")
    changed = {**lora, "sha256": "cd" * 32}
    with pytest.raises(InputError, match="a LoRA file changed"):
        _check_same(ImageTask("000000", "a", 1, {"prompt": "a", "seed": 0, "loras": [changed]}),
                    {"prompt": "a", "seed": 0, "loras": [lora]}, tmp_path / "metadata.jsonl")
    with pytest.raises(InputError, match="with seed 0, this job asks for 5: use --overwrite"):
        _check_same(ImageTask("000000", "a", 1, {"prompt": "a", "seed": 5}), {"prompt": "a", "seed": 0},
                    tmp_path / "metadata.jsonl")


# -- info ------------------------------------------------------------------------------------
def test_info_leaves_out_time_ids_an_expert_does_not_take(capsys):
    assert main(["info", str(DEMO), "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "composition" in out and "time ids" not in out and "None" not in out


# -- long prompts ----------------------------------------------------------------------------
def test_long_prompt_warns_once_per_generation_with_a_short_quote(caplog):
    info = read_manifest(DEMO, verify_hashes=False).tokenizers["text_encoder"]
    path = DEMO / info.file
    first, second = PromptTokenizer(path, info), PromptTokenizer(path, info)  # as SDXL's two encoders
    prompt = " ".join(["lighthouse"] * (info.max_length + 40))

    def warnings() -> list[str]:
        found = [r.getMessage() for r in caplog.records if "cut off" in r.getMessage()]
        caplog.clear()
        return found

    with caplog.at_level(logging.WARNING, logger="artrt"):
        warned: set[str] = set()  # one generation: its tokenizers share the texts warned about
        first(["", prompt], warned)
        second(["", prompt], warned)
        once = warnings()
        assert len(once) == 1, once
        assert "…" in once[0] and len(once[0]) < 200 and "characters were cut off" in once[0]
        warned = set()  # the next generation (its negative prompt the same text) warns again, once
        first([prompt, prompt], warned)
        second([prompt, prompt], warned)
        assert len(warnings()) == 1
        first(["", "short"])
        second(["", "short"])
        assert warnings() == []


# -- bench --size ---------------------------------------------------------------------------
def test_bench_size_is_width_by_height(capsys, tmp_path):
    assert parse_size("48x32") == (48, 32)  # (width, height), as artrt info and the server write sizes
    report = tmp_path / "bench.json"
    assert main(["bench", "-m", str(DEMO), "--backend", "ort-cpu", "--steps", "2", "--size", "48x32", "--runs", "1",
                 "--warmup", "0", "--no-fit", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    config = json.loads(report.read_text())["config"]
    assert (config["width"], config["height"]) == (48, 32) and "2 steps  48x32" in out
