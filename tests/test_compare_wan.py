"""benchmarks/compare.py's Wan workload end to end at tiny size: artrt against diffusers'
``WanPipeline`` on one random tiny Wan 2.2 folder, same latents, for one frame and for 5.

Checks the harness, not speed: both peers ran the same settings on the same latents, the results
are written as JSON, Markdown and PNG, and artrt's frames agree with diffusers'.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def compare(monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import compare

    yield compare
    for name in ("compare", "peers", "report"):
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Shared by both cases: the random folder and the artrt package are made once."""
    return tmp_path_factory.mktemp("compare-wan")


@pytest.mark.parametrize("frames", [1, 5])
def test_wan_workload_runs_both_peers_on_the_same_frames(compare, work, frames):
    out = work / f"results-{frames}"
    argv = ["--workload", "wan-tiny", "--frames", str(frames), "--steps", "2", "--runs", "1", "--warmup", "0",
            "--threads", "1", "--pause", "0", "--peers", "artrt", "diffusers", "optimum", "--work", str(work / "work"),
            "--out", str(out)]
    assert compare.main(argv) == 0
    name = f"wan-tiny-32x48px-{frames}f-2steps"
    report = json.loads((out / f"{name}.json").read_text())
    s = report["settings"]
    assert (s["height"], s["width"], s["steps"], s["frames"], s["sampler"]) == (32, 48, 2, frames, "unipc")
    assert (s["switch"], s["guidance"], s["guidance_2"]) == (0.875, 4.0, 3.0) and s["negative_prompt"]
    peers = report["peers"]
    assert len(peers["artrt"]["times"]) == len(peers["diffusers"]["times"]) == 1
    assert peers["artrt"]["psnr_vs_diffusers_db"] >= 40.0  # every frame: PSNR needs equal shapes
    assert peers["diffusers"]["artrt_speedup"] > 0 and peers["artrt"]["floor"] > 0
    assert "no optimum peer for the wan-tiny workload" in peers["optimum"]["error"]
    assert report["machine"]["peak_rss_mib"] > 0 and "load_rss_mib" in peers["artrt"]
    table = (out / f"{name}.md").read_text()
    assert f"tiny Wan 2.2 pair, {frames} frame(s), 32x48 px" in table and "guidance 4/3" in table
    assert (out / f"{name}.png").stat().st_size > 0


def test_wan_frames_must_be_4k_plus_1(compare, tmp_path):
    with pytest.raises(SystemExit, match="--frames must be 4k"):
        compare.main(["--workload", "wan-tiny", "--frames", "4", "--work", str(tmp_path), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--frames applies to the wan"):
        compare.main(["--workload", "demo", "--frames", "5", "--work", str(tmp_path), "--out", str(tmp_path)])
