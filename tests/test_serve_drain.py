"""``artrt serve`` as a process: SIGTERM / SIGINT drain (in-flight requests finish, new ones get 503,
exit 0), and the command's one-line errors."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from artrt.runtime.cli import main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_flight(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("artrt_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no artrt_requests_in_flight metric")


HEADERS = {"Authorization": "Bearer k"}


@contextmanager
def server_process(*options: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """``artrt serve --demo [options]`` in its own process on a free port, ready (loaded and warm)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "artrt.runtime.cli", "serve", "--demo", "--port", str(port),
                                "--api-key", "k", "--batch-window-ms", "0", *options],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.1)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def send_long_request(pool: ThreadPoolExecutor, url: str, n: int, steps: int) -> Future:
    """A request of ``n`` images, returned once the server has it in flight."""
    long = pool.submit(httpx.post, f"{url}/v1/images/generations", headers=HEADERS, timeout=120,
                       content=json.dumps({"prompt": "a red circle", "n": n, "steps": steps, "seed": 1}))
    while in_flight(url) < 1:
        assert not long.done(), long.result().text
        time.sleep(0.01)
    return long


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_then_exits_0(sig):
    with server_process() as (process, url), ThreadPoolExecutor(1) as pool:
        long = send_long_request(pool, url, n=4, steps=100)
        process.send_signal(sig)
        time.sleep(0.2)
        late = httpx.post(f"{url}/v1/images/generations", headers=HEADERS, json={"prompt": "p"})
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        finished = long.result()
        assert finished.status_code == 200 and len(finished.json()["data"]) == 4
        output = process.communicate(timeout=60)[0]
        assert process.returncode == 0, output
        assert "draining" in output and "drained and stopped" in output


def test_a_second_signal_stops_at_once_with_exit_1():
    with server_process() as (process, url), ThreadPoolExecutor(1) as pool:
        long = send_long_request(pool, url, n=8, steps=150)  # about 10 s
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
        assert process.returncode == 1, output
        try:
            status = long.result().status_code
        except httpx.TransportError:
            status = None
        assert status != 200  # cut off: a 500, or no answer at all
        assert "artrt: error: stopped before every queued request was answered" in output
        assert "Traceback" not in output and "CancelledError" not in output, output


def test_missing_package_is_one_line(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("artrt: error:") and "\n" not in err


def test_model_or_demo_is_required(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--demo", "--model", "x"])
    assert exc.value.code == 2


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--host", "--port", "--api-key", "ARTRT_API_KEY", "--max-batch", "--batch-window-ms",
                   "--max-queue", "--timeout", "--max-n", "--max-pixels", "--max-steps", "--max-body", "127.0.0.1"):
        assert option in out, option


def test_without_the_extra_it_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", "--demo"]) == 1
    assert "pip install 'artrt[serve]'" in capsys.readouterr().err


def test_a_package_that_fails_to_load_exits_1_with_the_reason(capsys, tmp_path):
    """The manifest reads (the server starts), loading verifies the hashes and fails: one line, exit 1."""
    from artrt.demo.cache import shipped_dir

    package = Path(shutil.copytree(shipped_dir(), tmp_path / "demo"))
    graph = next(package.rglob("*.onnx"))
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    assert main(["serve", "--model", str(package), "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert "artrt: error:" in err and "sha256" in err


def test_a_504_stops_the_running_request_and_the_server_goes_on():
    """The user trial: ``--timeout 2``, a heavy request (about 10 s) gets 504 and is cancelled, so the
    next small request is answered within its deadline; /health and /metrics show the worker idle."""
    with server_process("--timeout", "2") as (process, url), ThreadPoolExecutor(1) as pool:
        long = send_long_request(pool, url, n=8, steps=150)
        assert httpx.get(f"{url}/health").json()["running"] == 1
        response = long.result()
        assert response.status_code == 504 and response.json()["error"]["code"] == "deadline_exceeded"
        small = httpx.post(f"{url}/v1/images/generations", headers=HEADERS, timeout=30,
                           json={"prompt": "a blue square", "steps": 2})
        assert small.status_code == 200, small.text
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ready" and health["running"] == 0 and health["queued"] == 0
        assert "artrt_requests_running 0.0" in httpx.get(f"{url}/metrics").text


def test_signal_during_a_request_past_its_deadline_drains_promptly_and_exits_0():
    """SIGTERM while a heavy request runs: it is cancelled at its deadline (504), then the drain ends,
    exit status 0, no traceback (without cancellation the drain would wait for the whole request)."""
    with server_process("--timeout", "3") as (process, url), ThreadPoolExecutor(1) as pool:
        long = send_long_request(pool, url, n=8, steps=150)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert long.result().status_code == 504
        output = process.communicate(timeout=30)[0]
        assert process.returncode == 0, output
        assert time.monotonic() - started < 8, output  # the request alone runs about 10 s
        assert "drained and stopped" in output and "Traceback" not in output, output


def test_a_port_in_use_is_one_line_before_loading(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        assert main(["serve", "--demo", "--port", str(port)]) == 1
        assert time.monotonic() - started < 5  # refused before the model loads
    err = capsys.readouterr().err.strip()
    assert err == f"artrt: error: cannot listen on 127.0.0.1:{port}: address already in use"


def test_an_unknown_host_is_one_line(capsys):
    assert main(["serve", "--demo", "--host", "no-such-host.invalid", "--port", str(free_port())]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("artrt: error: cannot listen on no-such-host.invalid:") and "\n" not in err


def test_a_package_whose_default_size_the_engines_refuse_exits_1_in_one_line(capsys, tmp_path):
    """The warm-up generation at the package's default size fails in ONNX Runtime (12x12: the UNet's
    down and up paths disagree): the server stops with one line naming the warm-up and the engine."""
    from artrt.demo.cache import shipped_dir

    package = Path(shutil.copytree(shipped_dir(), tmp_path / "demo"))
    manifest = json.loads((package / "artrt.json").read_text())
    manifest["size_multiple"] = 4
    manifest["defaults"].update(height=12, width=12)
    (package / "artrt.json").write_text(json.dumps(manifest))
    assert main(["serve", "--model", str(package), "--port", str(free_port())]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if "error" in line.lower()]
    assert len(errors) == 1, err
    assert errors[0].startswith("artrt: error: the warm-up generation at the package's default size (12x12, 4 steps) "
                                "failed: expert_composition: onnxruntime failed:"), errors[0]
