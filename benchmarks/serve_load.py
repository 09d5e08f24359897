"""`artrt serve` under load: N concurrent clients x M requests each, with batching on and off.

    python benchmarks/serve_load.py --demo --clients 8 --requests 4 --out benchmarks/results/
    python benchmarks/serve_load.py --small --size 64 --steps 8 --clients 8 --requests 2 --out benchmarks/results/

For each ``--max-batch`` value (default ``1 8``: batching off, then on) a fresh ``artrt serve``
process is started on 127.0.0.1, becomes ready (loaded and warm), gets one untimed round of
``--clients`` concurrent requests (so the batched shapes are warm too), then the timed round:
every client sends its requests one after another (a closed loop), each with its own prompt and
seed and the same size and settings, so requests can share a batch. Every response must be 200
with valid PNGs of the requested size. Reported: throughput (images per second of the round),
p50 and p99 latency (client side, request sent to response read), and the mean images per
engine run (from the server's ``/metrics``). The server is then stopped with SIGTERM and must
exit 0. ``--small`` builds the random small SDXL pair and exports it under ``--work`` (needs the
``export`` extra). Writes ``serve-<workload>-<size>px-<steps>steps.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from artrt.runtime.cli.bench_report import machine_info

PROMPTS = ["a red circle", "two green triangles", "a blue square below a yellow circle", "three striped squares",
           "a lighthouse at dusk", "a yellow triangle left of a red square", "an outlined green circle",
           "two blue circles above a red triangle"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--demo", action="store_true", help="the embedded demo model (32 px)")
    what.add_argument("--small", action="store_true", help="the random small SDXL pair (built and exported once)")
    what.add_argument("--model", type=Path, help="a package directory")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="requests per client in the timed round")
    p.add_argument("--max-batch", type=int, nargs="+", default=[1, 8], help="settings to compare (1: no batching)")
    p.add_argument("--batch-window-ms", type=float, default=15.0)
    p.add_argument("--steps", type=int, help="default: the package's")
    p.add_argument("--size", type=int, help="pixels per side (default: the package's)")
    p.add_argument("--threads", type=int, help="CPU threads per engine (default: one per core)")
    p.add_argument("--work", type=Path, default=Path("build/bench"), help="where --small keeps its models")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return p.parse_args(argv)


def small_package(work: Path) -> Path:
    """The random small SDXL pair as a package (built and exported on first use)."""
    package = work / "small" / "artrt-serve"
    if not (package / "artrt.json").is_file():
        from artrt.export import export_package, load_sdxl_ensemble
        from artrt.export.random_models import make_sdxl_pair

        models = work / "small" / "models"
        if not (models / "base" / "model_index.json").is_file():
            make_sdxl_pair(models, size="small", seed=0)
        export_package(load_sdxl_ensemble(models / "base", models / "refiner"), package, switch=0.8, steps=20)
    return package


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(target: list[str], max_batch: int, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "artrt.runtime.cli", "-q", "serve", *target, "--port", str(port),
               "--max-batch", str(max_batch), "--batch-window-ms", str(args.batch_window_ms),
               "--max-queue", str(4 * args.clients)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            raise SystemExit(f"serve_load.py: the server exited: {process.communicate()[0]}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit("serve_load.py: the server did not become ready in 600 s")
        time.sleep(0.1)


def one_request(url: str, body: dict, size: tuple[int, int]) -> float:
    """Send one request; its latency in seconds (every image checked)."""
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=600)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {response.text}")
    for item in response.json()["data"]:
        image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        image.load()
        if image.format != "PNG" or image.size != size:
            raise RuntimeError(f"bad image: {image.format} {image.size}")
    return seconds


def engine_runs(url: str) -> tuple[float, float]:
    """(engine runs, images) so far, from the server's metrics."""
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("artrt_batch_images_count", "artrt_batch_images_sum"):
            values[name] = float(value)
    return values["artrt_batch_images_count"], values["artrt_batch_images_sum"]


def round_of(url: str, settings: dict, clients: int, requests: int, size: tuple[int, int], offset: int) -> dict:
    """Every client sends ``requests`` requests in turn; all clients at once."""

    def client(c: int) -> list[float]:
        return [one_request(url, {**settings, "prompt": PROMPTS[(c + i) % len(PROMPTS)],
                                  "seed": offset + 1000 * c + i}, size) for i in range(requests)]

    runs_before, images_before = engine_runs(url)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [s for per_client in pool.map(client, range(clients)) for s in per_client]
    wall = time.perf_counter() - started
    runs, images = engine_runs(url)
    return {"requests": len(latencies), "images": len(latencies), "wall_s": wall,
            "images_per_s": len(latencies) / wall, "p50_s": float(np.percentile(latencies, 50)),
            "p99_s": float(np.percentile(latencies, 99)), "mean_s": float(np.mean(latencies)),
            "images_per_engine_run": (images - images_before) / max(runs - runs_before, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.demo:
        target, workload = ["--demo"], "demo"
    elif args.small:
        target, workload = ["--model", str(small_package(args.work)), "--no-verify"], "small"
    else:
        target, workload = ["--model", str(args.model)], args.model.resolve().name
    settings: dict = {"n": 1}
    if args.steps:
        settings["steps"] = args.steps
    if args.size:
        settings["size"] = f"{args.size}x{args.size}"
    machine, results = machine_info(), []  # the load average before the runs; after: below
    for max_batch in args.max_batch:
        process, url = start_server(target, max_batch, args)
        try:
            card = httpx.get(f"{url}/v1/models").json()["data"][0]["artrt"]["defaults"]
            width, height = map(int, settings.get("size", card["size"]).split("x"))
            steps = settings.get("steps", card["steps"])
            round_of(url, settings, args.clients, 1, (width, height), offset=10**6)  # untimed warm-up
            timed = round_of(url, settings, args.clients, args.requests, (width, height), offset=0)
            timed.update(max_batch=max_batch, window_ms=args.batch_window_ms if max_batch > 1 else 0.0)
            results.append(timed)
            print(f"max-batch {max_batch}: {timed['images_per_s']:.2f} images/s, p50 {timed['p50_s']:.3f} s, "
                  f"p99 {timed['p99_s']:.3f} s, {timed['images_per_engine_run']:.2f} images per engine run",
                  flush=True)
        finally:
            process.send_signal(signal.SIGTERM)
            output = process.communicate(timeout=300)[0]
        if process.returncode != 0:
            raise SystemExit(f"serve_load.py: the server exited {process.returncode} after SIGTERM: {output}")
    record = {"workload": workload, "size": f"{width}x{height}", "steps": steps, "clients": args.clients,
              "requests_per_client": args.requests, "machine": machine,
              "load_average_after": machine_info()["load_average"], "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serve-{workload}-{width}px-{steps}steps.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
