"""``artrt sample --out`` writes only into a new or empty folder or one of its own runs: a folder
of the user's (files but no run.json) is refused before anything in it changes, with or without
--overwrite; a run killed before it wrote run.json (lock file, empty images/) resumes."""

from __future__ import annotations

import pytest

from artrt.demo.cache import shipped_package
from artrt.runtime.cli import main


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_the_users_is_refused_and_left_as_it_was(tmp_path, capsys, overwrite):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "mine"
    (out / "images").mkdir(parents=True)
    (out / "images" / "000000.png").write_bytes(b"my picture")
    (out / "metadata.jsonl").write_text("my notes\n")
    args = ["sample", str(prompts), "--model", str(shipped_package()), "--out", str(out), "--steps", "2"]
    assert main(args + (["--overwrite"] if overwrite else [])) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"artrt: error: --out {out} holds files but no artrt sample run (run.json)")
    assert err.count("\n") == 1
    assert (out / "images" / "000000.png").read_bytes() == b"my picture"
    assert (out / "metadata.jsonl").read_text() == "my notes\n"
    assert sorted(p.name for p in out.iterdir()) == ["images", "metadata.jsonl"]


def test_what_a_run_leaves_before_run_json_resumes(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "run"
    (out / "images").mkdir(parents=True)
    (out / ".lock").touch()
    (out / "images" / ".000000.png.tmp").write_bytes(b"torn")
    assert main(["sample", str(prompts), "--model", str(shipped_package()), "--out", str(out), "--steps", "2"]) == 0
    assert (out / "run.json").is_file() and (out / "images" / "000000.png").is_file()
