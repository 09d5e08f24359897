"""``artrt bench`` on the tiny package: every field present, valid JSON, and the statistics
it is built from (percentiles, least-squares fits, overhead). Nothing here asserts a speed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from artrt.runtime.cli.bench import EngineTimer, main, parse_size, stage_values, switch_step
from artrt.runtime.cli.bench_report import fit_line, format_table, other_cores, percentile, summarize

EXPERTS = [("composition", "expert_composition"), ("detail", "expert_detail")]
STAGES = ("tokenize", "text_encoder", "text_encoder_2", "expert:composition", "expert:detail", "step:composition",
          "step:detail", "switch_step", "decode", "e2e", "floor", "host_overhead", "host_overhead_pct")


@pytest.fixture(scope="module")
def bench_json(sdxl_package, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["--model", str(sdxl_package), "--backend", "ort-cpu", "--steps", "5", "--runs", "2", "--warmup", "0",
            "--batch", "1", "2", "--fit-runs", "1", "--threads", "1", "--json", str(path)]
    assert main(argv) == 0
    return json.loads(path.read_text())


def test_bench_reports_every_field(bench_json):
    r = bench_json
    assert r["backend"] == "ort-cpu"
    assert r["config"]["height"] == r["config"]["width"] == 32  # the package's default size
    for stage in STAGES:
        stats = r["stages"][stage]
        assert stats["n"] == 2 and stats["min"] <= stats["p50"] <= stats["p90"], stage
    assert sum(r["steps_per_expert"].values()) == 5 and min(r["steps_per_expert"].values()) >= 1
    assert r["stages"]["floor"]["p50"] <= r["stages"]["e2e"]["p50"]
    assert 0 < r["cold_start"]["load_s"] < r["cold_start"]["first_image_s"]
    assert r["memory"]["method"] == "ru_maxrss" and r["memory"]["peak_rss_mib"] >= r["memory"]["before_load_rss_mib"]
    assert [t["batch"] for t in r["throughput"]] == [1, 2]
    assert all(t["images_per_s"] > 0 for t in r["throughput"])
    assert [p["x"] for p in r["fit_steps"]["points"]] == [2, 5]
    assert [p["x_label"] for p in r["fit_size"]["points"]] == ["16x16", "24x24", "32x32"]
    for fit in (r["fit_steps"], r["fit_size"]):
        assert {"fixed", "slope", "r2"} <= set(fit)
    assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"]


def test_table_names_the_stages(bench_json):
    table = format_table(bench_json)
    for label in ("end to end", "engine floor", "host overhead", "step at the switch", "cost vs steps",
                  "cost vs size", "throughput", "cold start", "peak host mem"):
        assert label in table


def test_bench_without_json_prints_the_table(sdxl_package, capsys):
    argv = ["--model", str(sdxl_package), "--backend", "ort-cpu", "--steps", "2", "--runs", "1", "--no-fit"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "end to end" in out and "cost vs steps   not measured" in out


def test_bad_size_is_one_clear_error(sdxl_package, capsys):
    assert main(["--model", str(sdxl_package), "--backend", "ort-cpu", "--size", "33", "--runs", "1"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("artrt: error:")]
    assert len(errors) == 1 and "multiple of" in errors[0], err


def test_overhead_is_end_to_end_minus_floor():
    calls = [("text_encoder", 0.0, 0.1), ("expert_composition", 0.2, 0.5), ("expert_composition", 0.5, 0.8),
             ("expert_detail", 0.9, 1.0), ("vae_decoder", 1.1, 1.3)]
    sample = {"e2e": 2.0, "calls": calls,
              "timings": {"tokenize": 0.05, "expert:composition": 0.6, "expert:detail": 0.1, "total": 1.9}}
    v = stage_values(sample, EXPERTS)
    assert v["floor"] == pytest.approx(0.1 + 0.6 + 0.1 + 0.2)
    assert v["host_overhead"] == pytest.approx(2.0 - 1.0)
    assert v["host_overhead_pct"] == pytest.approx(50.0)
    assert v["step:composition"] == pytest.approx(0.3) and v["step:detail"] == pytest.approx(0.1)
    assert v["switch_step"] == pytest.approx(1.0 - 0.8)
    assert "total" not in v


def test_switch_step_needs_two_experts():
    calls = [("expert_composition", 0.0, 1.0), ("expert_composition", 1.0, 2.0)]
    assert switch_step(calls, ["expert_composition", "expert_detail"]) is None
    assert switch_step(calls, ["expert_composition"]) is None


def test_percentiles_interpolate_linearly():
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([7.0], 90) == 7.0
    assert summarize([3.0, 1.0, 2.0]) == {"p50": 2.0, "p90": pytest.approx(2.8), "min": 1.0, "n": 3}
    with pytest.raises(ValueError):
        percentile([], 50)


def test_fit_recovers_known_coefficients():
    steps = np.array([5, 10, 20, 40])
    exact = fit_line(steps, 0.25 + 0.0125 * steps)
    assert exact["fixed"] == pytest.approx(0.25) and exact["slope"] == pytest.approx(0.0125)
    assert exact["r2"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noisy = fit_line(steps, 0.25 + 0.0125 * steps + rng.normal(0, 1e-4, steps.shape))
    assert noisy["fixed"] == pytest.approx(0.25, abs=1e-3) and noisy["slope"] == pytest.approx(0.0125, rel=1e-2)
    assert 0.99 < noisy["r2"] <= 1.0
    assert fit_line([20, 20], [1.0, 1.1]) is None


def test_engine_timer_wraps_and_restores(sdxl_pipe):
    timer = EngineTimer(sdxl_pipe)
    try:
        sdxl_pipe.generate("a", steps=3, height=16, width=16)
        calls = timer.take()
    finally:
        timer.restore()
    names = [c[0] for c in calls]
    assert names.count("expert_composition") + names.count("expert_detail") == 3
    assert names[-1] == "vae_decoder" and all(end >= start for _, start, end in calls)
    assert not any("_run_bound" in vars(e) or "_run" in vars(e) for e in sdxl_pipe.engines.values())


def test_other_cores_is_machine_cpu_minus_ours():
    import time

    started = time.perf_counter() - 2.0
    assert other_cores((100.0, 10.0), (104.0, 12.0), started) == pytest.approx(1.0, rel=0.05)
    assert other_cores((100.0, 10.0), (101.0, 12.0), started) == 0.0  # never negative
    assert other_cores(None, (1.0, 1.0), started) is None


@pytest.mark.parametrize("text, size", [("256", (256, 256)), ("192x256", (192, 256)), ("64X32", (64, 32))])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "axb", "1x2x3", "-32"])
def test_parse_size_rejects(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)
