"""More messages a user trial found late or unclear: each bad input is one line, before any slow work."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
from cli_helpers import DEMO
from cli_helpers import error_line as _error

from artrt.errors import ArtrtError, InputError, OutputError
from artrt.export.package_export import check_output_dir, export_package
from artrt.runtime.cli import main
from artrt.runtime.cli.bench import stage_values, switch_step
from artrt.runtime.cli.bench_report import format_table

EXPERTS = [("composition", "expert_composition"), ("detail", "expert_detail")]


@pytest.fixture()
def no_load(monkeypatch):
    """Fail the test if a command loads the package's engines."""
    from artrt.runtime.pipeline import Pipeline

    def load(cls, *args, **kwargs):
        raise AssertionError("the package was loaded before the options were checked")

    monkeypatch.setattr(Pipeline, "load", classmethod(load))


# -- 1. sample --ray without Ray ---------------------------------------------------------------
def test_sample_ray_without_the_extra_is_one_line_before_out_is_made(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as without the extra
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "r1"
    line = _error(capsys, "sample", prompts, "--model", DEMO, "--out", out, "--ray", "local", "--steps", 2)
    assert line == "artrt: error: --ray needs the 'ray' extra (pip install 'artrt[ray]')"
    assert not out.exists()


# -- 2. bench --json ---------------------------------------------------------------------------
@pytest.mark.parametrize("where, message", [
    ("missing/x.json", "does not exist"),
    ("folder", "is a directory"),
])
def test_bench_json_path_is_checked_before_any_work(capsys, no_load, tmp_path, where, message):
    (tmp_path / "folder").mkdir()
    line = _error(capsys, "bench", "-m", DEMO, "--backend", "ort-cpu", "--json", tmp_path / where)
    assert "--json" in line and message in line


def test_bench_json_that_fails_late_is_one_line_after_the_table(capsys, monkeypatch, tmp_path):
    from artrt.runtime.cli import bench

    report = tmp_path / "gone" / "bench.json"
    report.parent.mkdir()
    run_bench = bench.run_bench

    def then_remove_the_folder(cfg):
        result = run_bench(cfg)
        report.parent.rmdir()  # e.g. cleaned up while the benchmark ran
        return result

    monkeypatch.setattr(bench, "run_bench", then_remove_the_folder)
    code = main(["bench", "-m", str(DEMO), "--backend", "ort-cpu", "--steps", "2", "--runs", "1", "--warmup", "0",
                 "--no-fit", "--threads", "1", "--json", str(report)])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("artrt: error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert f"cannot write --json {report}" in lines[0]
    assert "end to end" in captured.out  # the results were printed first


# -- 3. sample options -------------------------------------------------------------------------
@pytest.mark.parametrize("option, message", [
    (["--steps", 0], "--steps must be >= 1, got 0"),
    (["-n", 0], "--num-images must be >= 1, got 0"),
    (["--sampler", "bogus"], "unknown --sampler 'bogus'; choose from"),
    (["--guidance", 1, 2, 3], "--guidance takes 1 or 2 values"),
    (["--switch", 2], "--switch must be in [0, 1], got 2"),
    (["--height", 33], "--height 33 must be a positive multiple of 8"),
    (["--width", 0], "--width must be >= 1, got 0"),
    (["--frames", 5], "--frames must be 1, got 5"),
])
def test_sample_option_is_one_line_naming_the_flag_before_the_file(capsys, no_load, tmp_path, option, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "out"
    line = _error(capsys, "sample", prompts, "--model", DEMO, "--out", out, *option)
    assert message in line, line
    assert not out.exists()
    missing = tmp_path / "missing.txt"  # the option is refused before the prompt file is read
    assert message in _error(capsys, "sample", missing, "--model", DEMO, "--out", out, *option)


def test_sample_valid_options_still_run(capsys, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "out"
    assert main(["sample", str(prompts), "--model", str(DEMO), "--out", str(out), "--steps", "2", "--sampler",
                 "euler", "--guidance", "2", "1", "--switch", "0.5", "--height", "32", "--width", "40"]) == 0
    record = json.loads((out / "metadata.jsonl").read_text())
    assert (record["steps"], record["sampler"], record["width"], record["height"]) == (2, "euler", 40, 32)


# -- 4. bench: options before loading; load time in low memory ---------------------------------
@pytest.mark.parametrize("option, message", [
    (["--size", "33"], "--size 33x33: height 33 must be a positive multiple of 8"),
    (["--size", "40x33"], "--size 40x33: height 33 must be a positive multiple of 8"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--fit-runs", "0"], "--fit-runs must be >= 1, got 0"),
])
def test_bench_options_are_checked_before_loading(capsys, no_load, option, message):
    assert message in _error(capsys, "bench", "-m", DEMO, "--backend", "ort-cpu", *option)


def test_low_memory_loads_are_not_host_overhead():
    calls = [("expert_composition", 0.2, 0.5), ("expert_composition", 0.5, 0.8), ("expert_detail", 1.4, 1.5)]
    opened = [("expert_composition", 0.15), ("expert_detail", 1.3)]
    sample = {"e2e": 2.0, "calls": calls, "opened": opened,
              "timings": {"expert:composition": 0.6, "expert:detail": 0.1, "load": 0.6, "total": 1.9}}
    v = stage_values(sample, EXPERTS)
    assert v["load"] == pytest.approx(0.6) and v["floor"] == pytest.approx(0.7)
    assert v["host_overhead"] == pytest.approx(2.0 - 0.7 - 0.6)
    assert v["switch_step"] == pytest.approx(1.5 - 1.3)  # from the detail expert's load, not the last step
    assert switch_step(calls, ["expert_composition", "expert_detail"]) == pytest.approx(1.5 - 0.8)


def test_bench_low_memory_reports_loads_on_their_own_line(capsys, tmp_path):
    report = tmp_path / "b.json"
    assert main(["bench", "-m", str(DEMO), "--backend", "ort-cpu", "--steps", "4", "--runs", "1", "--warmup", "0",
                 "--no-fit", "--threads", "1", "--memory", "low", "--json", str(report)]) == 0  # both experts run
    table = capsys.readouterr().out
    assert "engine loads (low memory)" in table and "step at the switch (after load)" in table
    data = json.loads(report.read_text())
    s = {k: v["p50"] for k, v in data["stages"].items()}
    assert s["load"] > 0 and s["host_overhead"] == pytest.approx(s["e2e"] - s["floor"] - s["load"])
    assert "load" in data["method"] and format_table(data) in table


# -- 5. build -q hides the optimizer's progress bars -------------------------------------------
def _tiny_graph(path: Path) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor("b", TensorProto.FLOAT, [4], np.ones(4, np.float32))],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_build_shows_no_fusion_progress_bars(capfd, tmp_path, quiet):
    pytest.importorskip("onnxruntime.transformers.optimizer")
    tqdm = pytest.importorskip("tqdm")
    from artrt.export.ort_optimize import optimize_for_cuda

    bar, logger = tqdm.tqdm, logging.getLogger("artrt")
    level = logger.level
    logger.setLevel(logging.WARNING if quiet else logging.INFO)  # -q, or not
    try:
        optimize_for_cuda(_tiny_graph(tmp_path / "g.onnx"), tmp_path / "g.cuda.onnx", "vae")  # bars, as a UNet's
    finally:
        logger.setLevel(level)
    err = capfd.readouterr().err
    assert ("fusion" in err) is not quiet, err
    assert tqdm.tqdm is bar  # put back


# -- 6. export --out: a folder of the user's -------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_into_a_users_folder_gives_the_final_answer_at_once(tmp_path, overwrite):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")
    with pytest.raises(InputError) as caught:
        check_output_dir(out, overwrite)
    message = str(caught.value)
    assert "neither an artrt package" in message and "will not replace it" in message
    assert "choose another --out" in message and "pass --overwrite" not in message
    assert (out / "thesis.txt").read_text() == "years of work"


# -- 7. export: the work folder cannot be made ---------------------------------------------------
class _Sources:
    """Sources the export never reaches: it stops at the work folder."""

    family = "same-arch"
    experts = ((), ())


def test_work_folder_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.name.endswith(".partial"):
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(OutputError) as caught:
        export_package(_Sources(), tmp_path / "pkg", targets=("cpu",))
    assert f"cannot create {tmp_path / 'pkg.partial'}: No such file or directory" in str(caught.value)
    assert "\n" not in str(caught.value) and not list(tmp_path.iterdir())


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_export_into_proc_is_one_line():
    with pytest.raises(ArtrtError) as caught:  # root passes the writability check; others do not
        export_package(_Sources(), "/proc/artrt-pk", targets=("cpu",))
    assert "/proc/artrt-pk" in str(caught.value) and not os.path.lexists("/proc/artrt-pk.partial")
