"""``artrt sample``: prompt files, deterministic and resumable image sets, Ray."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from artrt.runtime.cli import main
from artrt.runtime.images import read_parameters
from artrt.runtime.sampling.prompt_files import read_prompt_file

STEPS = ["--steps", "2"]


def _sample(capsys, prompts: Path, package: Path, out: Path, *extra) -> tuple[int, str]:
    code = main(["sample", str(prompts), "--model", str(package), "--out", str(out), *STEPS, *map(str, extra)])
    return code, capsys.readouterr().err


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


def _hashes(out: Path) -> dict[str, str]:
    return {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "images").glob("*.png"))}


def _assert_complete(out: Path, ids: set[str]) -> None:
    """Exactly one record per image, each image opens and has the sha256 of its record."""
    records = _records(out)
    assert sorted(r["id"] for r in records) == sorted(ids)
    for r in records:
        path = out / r["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r["sha256"]
        with Image.open(path) as image:
            image.load()
    assert {p.stem for p in (out / "images").iterdir()} == ids  # no stray or temporary files


def _prompts(path: Path, n: int) -> Path:
    path.write_text("".join(f"prompt number {i}\n" for i in range(n)))
    return path


def test_prompt_formats(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\n\n  a cat  \na dog\n")
    items, bad = read_prompt_file(txt)
    assert [(i.index, i.line, i.prompt) for i in items] == [(0, 3, "a cat"), (1, 4, "a dog")] and not bad
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "seed": 5, "guidance": [4, 6], "n": 2}\n\n{"prompt": "b", "steps": 3.0}\n')
    items, bad = read_prompt_file(jsonl)
    assert items[0].values == {"seed": 5, "guidance": [4.0, 6.0], "n": 2} and items[1].values == {"steps": 3}
    assert (items[1].index, items[1].line) == (1, 3)
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,seed,guidance,negative_prompt\n"a, quoted",7,4;6,\nb,,5,blurry\n')
    items, bad = read_prompt_file(csv)
    assert [(i.prompt, i.line) for i in items] == [("a, quoted", 2), ("b", 3)] and not bad
    assert items[0].values == {"seed": 7, "guidance": [4.0, 6.0]}
    assert items[1].values == {"guidance": [5.0], "negative_prompt": "blurry"}


def test_txt_jsonl_and_csv_give_the_same_images(capsys, sdxl_package, tmp_path):
    files = {"p.txt": "a cat\n\na dog\n", "p.csv": "prompt,seed\na cat,\na dog,1\n",
             "p.jsonl": '{"prompt": "a cat"}\n{"prompt": "a dog", "seed": 1}\n'}
    hashes = []
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        assert _sample(capsys, tmp_path / name, sdxl_package, tmp_path / name.replace(".", "-"))[0] == 0
        hashes.append(_hashes(tmp_path / name.replace(".", "-")))
    assert hashes[0] == hashes[1] == hashes[2] and set(hashes[0]) == {"000000", "000001"}


BAD_JSONL = "\n".join([
    '{"prompt": "good one"}',
    '{"prompt": "broken"',                        # 2: invalid JSON
    '{"negative_prompt": "no prompt"}',           # 3: missing prompt
    '{"prompt": "odd size", "height": 34}',       # 4: not a multiple of the size multiple
    '{"prompt": "typo", "step": 3}',              # 5: unknown field
    '{"prompt": "bad seed", "seed": -1}',         # 6
    '{"prompt": "bad type", "steps": "many"}',    # 7
    '{"prompt": "good two", "id": "two"}',
    '{"prompt": "same id", "id": "two"}',         # 9: duplicate id
]) + "\n"


def test_bad_lines_are_reported_skipped_and_listed(capsys, sdxl_package, tmp_path):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text(BAD_JSONL)
    code, err = _sample(capsys, prompts, sdxl_package, tmp_path / "out")
    assert code == 0, err
    for line, message in [(2, "invalid JSON"), (3, "missing prompt"), (4, "height 34 must be a positive multiple"),
                          (5, "unknown field(s) step"), (6, "seed must be >= 0"), (7, "steps must be a whole number"),
                          (9, "already used on line 8")]:
        reported = [entry for entry in err.splitlines() if f"{prompts}:{line}: " in entry]
        assert len(reported) == 1 and message in reported[0] and reported[0].endswith("(skipped)"), (line, err)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [b["line"] for b in run["bad_lines"]] == [2, 3, 4, 5, 6, 7, 9]
    assert run["counts"]["bad_lines"] == 7 and run["counts"]["complete"] == 2 and run["status"] == "complete"
    _assert_complete(tmp_path / "out", {"000000", "two"})
    # item indices count bad lines too: "good two" is item 7 and gets seed 0 + 7
    assert read_parameters(tmp_path / "out" / "images" / "two.png")["seed"] == 7


def test_strict_generates_nothing(capsys, sdxl_package, tmp_path):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text(BAD_JSONL)
    code, err = _sample(capsys, prompts, sdxl_package, tmp_path / "out", "--strict")
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("artrt: error:")]
    assert len(errors) == 1 and "7 bad line(s)" in errors[0] and f"{prompts}:2:" in errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [("", "no usable prompts"), ("prompt,colour\na,red\n", "CSV header")])
def test_unusable_files(capsys, sdxl_package, tmp_path, text, message):
    prompts = tmp_path / "p.csv"
    prompts.write_text(text)
    code, err = _sample(capsys, prompts, sdxl_package, tmp_path / "out")
    assert code == 1 and message in err and "Traceback" not in err


def test_rerun_is_byte_identical_and_matches_generate(capsys, sdxl_package, sdxl_pipe, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "n": 3}\n{"prompt": "a"}\n{"prompt": "b", "seed": 42}\n'
                       '{"prompt": "c", "sampler": "euler_a", "n": 2}\n')
    first, second = tmp_path / "first", tmp_path / "second"
    assert _sample(capsys, prompts, sdxl_package, first, "--seed", 100)[0] == 0
    assert _sample(capsys, prompts, sdxl_package, second, "--seed", 100, "--batch", 4)[0] == 0
    ids = {"000000-0", "000000-1", "000000-2", "000001", "000002", "000003-0", "000003-1"}
    _assert_complete(first, ids)
    assert _hashes(first) == _hashes(second)  # batching (4 rows of "a" in one call) changes no byte
    assert {r["batch_size"] for r in _records(second) if r["prompt"] == "a"} == {4}
    code, err = _sample(capsys, prompts, sdxl_package, second, "--seed", 100, "--batch", 4)
    assert code == 0 and "0 made now, 7 already there" in err
    code, err = _sample(capsys, prompts, sdxl_package, second, "--seed", 100, "--overwrite")
    assert code == 0 and "7 made now" in err and _hashes(second) == _hashes(first)
    # item 0 (seed 100, n 3) holds exactly the images of `generate --seed 100 -n 3`
    out = sdxl_pipe.generate("a", steps=2, seed=100, num_images=3)
    for k, image in enumerate(out.images):
        with Image.open(first / "images" / f"000000-{k}.png") as saved:
            assert np.array_equal(np.asarray(saved), np.asarray(image))


def test_changed_parameters_need_overwrite(capsys, sdxl_package, tmp_path):
    prompts = _prompts(tmp_path / "p.txt", 2)
    out = tmp_path / "out"
    assert _sample(capsys, prompts, sdxl_package, out)[0] == 0
    code, err = _sample(capsys, prompts, sdxl_package, out, "--seed", 5)
    assert code == 1 and "with seed 0, this job asks for 5: use --overwrite" in err
    assert _sample(capsys, prompts, sdxl_package, out, "--seed", 5, "--overwrite")[0] == 0
    assert {r["seed"] for r in _records(out)} == {5, 6}


def test_one_job_per_directory(capsys, sdxl_package, tmp_path):
    from artrt.runtime.sampling.output import OutputDir

    held = OutputDir(tmp_path / "out")
    held.prepare(overwrite=False)
    try:
        code, err = _sample(capsys, _prompts(tmp_path / "p.txt", 1), sdxl_package, tmp_path / "out")
    finally:
        held.close()
    assert code == 1 and "another artrt sample is writing" in err


def test_resume_repairs_every_kind_of_damage(capsys, sdxl_package, tmp_path):
    prompts = _prompts(tmp_path / "p.txt", 6)
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert _sample(capsys, prompts, sdxl_package, clean)[0] == 0
    assert _sample(capsys, prompts, sdxl_package, out)[0] == 0
    images = out / "images"
    lines = (out / "metadata.jsonl").read_text().splitlines(keepends=True)
    (images / "000001.png").unlink()                           # record without image
    (images / "000002.png").write_bytes(b"\x89PNG truncated")  # image that does not match its record
    (images / ".000003.png.123.tmp").write_bytes(b"partial")   # temporary file of a killed write
    kept = [line for line in lines if '"id": "000004"' not in line]  # image without record
    (out / "metadata.jsonl").write_text("".join(kept + [lines[0]]) + lines[5][:40])  # duplicate + torn tail
    code, err = _sample(capsys, prompts, sdxl_package, out)
    assert code == 0, err
    assert "3 made now, 3 already there" in err
    _assert_complete(out, {f"{i:06d}" for i in range(6)})
    assert _hashes(out) == _hashes(clean)


def test_sigkill_mid_run_then_resume(capsys, sdxl_package, tmp_path):
    n = 24
    prompts = _prompts(tmp_path / "p.txt", n)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "artrt.runtime.cli", "sample", str(prompts), "--model", str(sdxl_package),
           "--out", str(out), *STEPS, "--threads", "1", "--no-verify"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metadata = out / "metadata.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if metadata.exists() and metadata.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = metadata.read_bytes().count(b"\n")
    assert 3 <= done < n, f"killed after {done} of {n} images"
    code, err = _sample(capsys, prompts, sdxl_package, out)
    assert code == 0, err
    assert f"{n - done} made now, {done} already there" in err
    _assert_complete(out, {f"{i:06d}" for i in range(n)})
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and [h["status"] for h in run["history"]] == ["killed", "complete"]


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_makes_the_same_images_and_resumes(capsys, local_ray, sdxl_package, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "p{i}"}}\n' for i in range(5)) + '{"prompt": "q", "n": 3}\n')
    local, distributed = tmp_path / "local", tmp_path / "ray"
    assert _sample(capsys, prompts, sdxl_package, local, "--batch", 2)[0] == 0
    ids = set(_hashes(local))
    # a half-done local run, finished on Ray: only the missing images are made, none twice
    assert _sample(capsys, prompts, sdxl_package, distributed, "--batch", 2)[0] == 0
    records = (distributed / "metadata.jsonl").read_text().splitlines(keepends=True)
    (distributed / "metadata.jsonl").write_text("".join(records[:3]))
    code, err = _sample(capsys, prompts, sdxl_package, distributed, "--batch", 2, "--ray", "auto", "--actors", 2)
    assert code == 0, err
    assert f"{len(ids) - 3} made now, 3 already there" in err
    _assert_complete(distributed, ids)
    assert _hashes(distributed) == _hashes(local)
    run = json.loads((distributed / "run.json").read_text())
    assert run["ray"]["actors"] == 2 and run["backend"] == "ort-cpu"
    assert {r["backend"] for r in _records(distributed)} == {"ort-cpu"}


def test_ray_actor_that_cannot_load_stops_with_one_line(capsys, local_ray, sdxl_package, tmp_path):
    prompts = _prompts(tmp_path / "p.txt", 2)
    code, err = _sample(capsys, prompts, sdxl_package, tmp_path / "out", "--ray", "auto", "--backend", "trt")
    errors = [line for line in err.splitlines() if line.startswith("artrt: error:")]
    assert code == 1 and len(errors) == 1 and "a Ray actor cannot load" in errors[0], err
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "failed"
