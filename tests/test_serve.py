"""``artrt serve`` end to end: a real uvicorn server on 127.0.0.1 serving the demo model, called
with the official ``openai`` client and plain HTTP (httpx). Signals and the CLI: test_serve_drain.py."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

import uvicorn  # noqa: E402

from artrt.runtime.images import PNG_KEY  # noqa: E402
from artrt.runtime.serve.app import create_app  # noqa: E402
from artrt.runtime.serve.batching import Batching  # noqa: E402
from artrt.runtime.serve.limits import Limits  # noqa: E402
from artrt.runtime.serve.service import ImageService  # noqa: E402

KEY = "test-key"
MODEL = "artrt-demo"


@pytest.fixture(scope="module")
def demo_pipe():
    from artrt.demo.cache import demo_package
    from artrt.runtime import Pipeline

    with Pipeline.load(demo_package(), backend="ort-cpu", verify_hashes=False) as pipe:
        yield pipe


class SharedPipeline:
    """The module's pipeline as one server's: closing it is a no-op (every server closes its own at
    shutdown); ``gate`` holds generate() and generate_many() until set; a prompt equal to ``fail``
    raises ``error`` (default: a bug)."""

    def __init__(self, pipe, fail: str | None = None, error: Exception | None = None) -> None:
        self._pipe = pipe
        self.fail = fail
        self.error = error
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def generate(self, prompt, **kwargs):
        self._enter([prompt])
        return self._pipe.generate(prompt, **kwargs)

    def generate_many(self, requests, batch=False):
        self._enter([r["prompt"] for r in requests])
        return self._pipe.generate_many(requests, batch=batch)

    def _enter(self, prompts) -> None:
        self.entered.set()
        self.gate.wait(60)
        if self.fail in prompts:
            raise self.error or RuntimeError("a bug in one request")

    def close(self) -> None:
        pass


@contextmanager
def serving(pipe, api_key: str | None = KEY, load_gate: threading.Event | None = None, window: float = 0.02,
            max_batch: int = 8, **limits) -> Iterator[tuple[str, ImageService]]:
    """A server on a free port of 127.0.0.1 in a thread; yields its URL and service."""

    def load():
        if load_gate is not None:
            load_gate.wait(60)
        return pipe

    service = ImageService(pipe.manifest, load, MODEL, Limits(**limits), Batching(window, max_batch))
    config = uvicorn.Config(create_app(service, api_key), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the server did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        server.should_exit = True
        thread.join(60)


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/health").status_code != 200:
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(demo_pipe):
    with serving(SharedPipeline(demo_pipe)) as (url, service):
        wait_ready(url)
        yield url, service


def client(url: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def post(url: str, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{url}/v1/images/generations", content=content, headers=headers, timeout=60, **kwargs)


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB")) for image in images])


def test_openai_client_gets_the_images_of_a_lone_generate(server, demo_pipe):
    url, _ = server
    fields = dict(seed=7, steps=8, sampler="euler_a", negative_prompt="green", guidance=3.0, switch=0.5)
    response = client(url).images.generate(model=MODEL, prompt="two blue squares", n=2, size="32x32",
                                           response_format="b64_json", extra_body=fields)
    assert response.created > 0 and len(response.data) == 2
    images = [decode(item.b64_json) for item in response.data]
    alone = demo_pipe.generate("two blue squares", num_images=2, **fields)
    assert np.array_equal(pixels(images), pixels(alone.images))
    parameters = json.loads(images[1].info[PNG_KEY])
    assert parameters["seed"] == 7 and parameters["index"] == 1 and parameters["sampler"] == "euler_a"


def test_plain_http_without_model_or_seed(server):
    url, _ = server
    response = post(url, {"prompt": "a red circle"})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    image = decode(data[0]["b64_json"])
    assert image.size == (32, 32) and image.format == "PNG"
    assert json.loads(image.info[PNG_KEY])["seed"] >= 0  # a fresh seed, recorded


def test_models_and_health(server):
    url, _ = server
    models = client(url).models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]
    assert card["artrt"]["defaults"]["size"] == "32x32" and card["artrt"]["size_multiple"] == 8
    assert httpx.get(f"{url}/health").json() == {"status": "ready", "model": MODEL, "running": 0, "queued": 0}


@pytest.mark.parametrize("body, status, param, words", [
    ({"prompt": "p", "size": "33x32"}, 400, "size", "multiple of 8"),
    ({"prompt": "p", "size": "big"}, 400, "size", "WIDTHxHEIGHT"),
    ({"prompt": "p", "size": "4096x4096"}, 400, "size", "at most 4194304"),
    ({"prompt": "p", "n": 9}, 400, "n", "at most 8"),
    ({"prompt": "p", "n": 0}, 400, "n", ">= 1"),
    ({"prompt": "p", "steps": 151}, 400, "steps", "at most 150"),
    ({"prompt": "p", "steps": 2.5}, 400, "steps", "whole number"),
    ({"prompt": "p", "sampler": "heun"}, 400, "sampler", "unknown sampler"),
    ({"prompt": "p", "switch": 2}, 400, "switch", "[0, 1]"),
    ({"prompt": "p", "guidance": [1, 2, 3]}, 400, "guidance", "1 or 2 values"),
    ({"prompt": "p", "seed": -1}, 400, "seed", ">= 0"),
    ({"prompt": "p", "negative_prompt": 3}, 400, "negative_prompt", "string"),
    ({"prompt": "p", "response_format": "url"}, 400, "response_format", "b64_json"),
    ({"prompt": "p", "output_format": "jpeg"}, 400, "output_format", "images are PNG"),
    ({"prompt": "p", "num_frames": 5}, 400, "num_frames", "single images"),
    ({"prompt": "p", "stepz": 4}, 400, "stepz", "unknown parameter"),
    ({"n": 1}, 400, "prompt", "required"),
    ({"prompt": "p", "n": 8, "size": "2048x2048"}, 400, None, "GiB"),  # the memory estimate
    ({"prompt": "p", "model": "dall-e-3"}, 404, "model", "not served here"),
    ([1, 2], 400, None, "JSON object"),
    ("{not json", 400, None, "not valid JSON"),
])
def test_bad_requests_get_openai_errors(server, body, status, param, words):
    url, _ = server
    response = post(url, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_openai_client_raises_the_matching_errors(server):
    url, _ = server
    with pytest.raises(openai.BadRequestError) as bad:
        client(url).images.generate(prompt="p", size="33x32")
    assert bad.value.status_code == 400 and bad.value.param == "size"
    with pytest.raises(openai.AuthenticationError) as denied:
        client(url, key="wrong").images.generate(prompt="p")
    assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError):
        client(url).images.generate(prompt="p", model="dall-e-3")


def test_key_is_required_on_v1_routes_only(server):
    url, _ = server
    for response in (post(url, {"prompt": "p"}, key=None), httpx.get(f"{url}/v1/models")):
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_body_over_the_limit_is_413(server):
    url, _ = server
    response = post(url, json.dumps({"prompt": "x" * (1 << 20)}))
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_load_32_requests_from_8_clients(server, demo_pipe):
    """Zero errors, every image a valid PNG equal to its lone generate, and batches formed."""
    url, service = server
    runs_before, images_before = batch_runs(service)
    calls = [dict(prompt=["a red circle", "two green triangles", "a blue square below a yellow circle"][k % 3],
                  seed=100 + k, n=1 + k % 2, **([dict(steps=6, sampler="euler")] * 2 + [dict(steps=5)])[k % 3])
             for k in range(32)]

    def call(body: dict) -> list[Image.Image]:
        response = post(url, body)
        assert response.status_code == 200, response.text
        return [decode(item["b64_json"]) for item in response.json()["data"]]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, calls))
    for body, images in zip(calls, results):
        assert len(images) == body["n"] and all(image.size == (32, 32) for image in images)
        settings = {k: v for k, v in body.items() if k not in ("prompt", "n")}
        alone = demo_pipe.generate(body["prompt"], num_images=body["n"], **settings)
        assert np.array_equal(pixels(images), pixels(alone.images)), body
    runs_after, images_after = batch_runs(service)
    assert images_after - images_before == sum(body["n"] for body in calls)
    assert runs_after - runs_before < 32  # some runs were batches of several requests


def batch_runs(service) -> tuple[float, float]:
    """Engine runs so far and the images they made."""
    samples = {s.name: s.value for s in service.metrics.batch_images.collect()[0].samples}
    return samples["artrt_batch_images_count"], samples["artrt_batch_images_sum"]


def test_metrics_in_prometheus_format(server):
    url, _ = server
    post(url, {"prompt": "a red circle", "steps": 4})
    post(url, {"prompt": "p", "size": "33x32"})
    text = httpx.get(f"{url}/metrics").text
    for line in ("artrt_queue_depth 0.0", 'artrt_stage_seconds_count{stage="expert:composition"}',
                 'artrt_stage_seconds_count{stage="total"}', "artrt_request_seconds_bucket", "artrt_images_total",
                 'artrt_errors_total{type="invalid_value"}', 'artrt_requests_total{status="200"}',
                 "artrt_batch_images_bucket", "artrt_queue_wait_seconds_count", "artrt_requests_in_flight"):
        assert line in text, line


def test_loading_is_503_until_loaded_and_warm(demo_pipe):
    gate = threading.Event()
    with serving(SharedPipeline(demo_pipe), load_gate=gate) as (url, _):
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        response = post(url, {"prompt": "p"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "loading"
        assert response.headers["retry-after"] == "1"
        gate.set()
        wait_ready(url)
        assert post(url, {"prompt": "p", "steps": 2}).status_code == 200


def test_full_queue_is_429_with_retry_after(demo_pipe):
    pipe = SharedPipeline(demo_pipe)
    with serving(pipe, max_batch=1, max_queue=2) as (url, service), ThreadPoolExecutor(4) as pool:
        wait_ready(url)
        pipe.gate.clear()
        pipe.entered.clear()
        waiting = [pool.submit(post, url, {"prompt": "p", "steps": 2, "seed": k}) for k in range(3)]
        deadline = time.monotonic() + 30
        while not (pipe.entered.is_set() and service.batcher.depth == 2):  # one runs, two wait
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = post(url, {"prompt": "p", "steps": 2})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
        pipe.gate.set()
        assert [f.result().status_code for f in waiting] == [200, 200, 200]


def test_past_the_deadline_is_504_and_the_server_goes_on(demo_pipe):
    pipe = SharedPipeline(demo_pipe)
    with serving(pipe, max_batch=1, timeout=0.5) as (url, _):
        wait_ready(url)
        pipe.gate.clear()
        started = time.monotonic()
        response = post(url, {"prompt": "p", "steps": 2})
        assert response.status_code == 504 and response.json()["error"]["code"] == "deadline_exceeded"
        assert time.monotonic() - started < 5
        pipe.gate.set()
        assert post(url, {"prompt": "p", "steps": 2}).status_code == 200


def test_a_request_that_fails_fails_alone(demo_pipe):
    with serving(SharedPipeline(demo_pipe, fail="boom"), max_batch=1) as (url, _):
        wait_ready(url)
        response = post(url, {"prompt": "boom", "steps": 2})
        assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
        assert post(url, {"prompt": "fine", "steps": 2}).status_code == 200


def test_no_key_set_means_no_key_needed(demo_pipe):
    with serving(SharedPipeline(demo_pipe), api_key=None) as (url, _):
        wait_ready(url)
        assert post(url, {"prompt": "p", "steps": 2}, key=None).status_code == 200


def test_a_package_that_fails_to_load_says_why(demo_pipe):
    from starlette.testclient import TestClient

    from artrt.errors import PackageError

    def load():
        raise PackageError("text_encoder/model.onnx: sha256 mismatch")

    service = ImageService(demo_pipe.manifest, load, MODEL)
    stopped = threading.Event()
    service.on_failure = stopped.set
    http = TestClient(create_app(service))  # outside a with block: no lifespan, the test starts the service
    service.start()
    assert stopped.wait(10)
    health = http.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "failed"
    assert "sha256 mismatch" in health.json()["error"]
    response = http.post("/v1/images/generations", json={"prompt": "p"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "load_failed"


# Faults found in a user trial: a 504 or a client that goes away stops the running request; 404 and
# 405 in OpenAI's shape; error messages on one line.

HEAVY = {"prompt": "a red circle", "n": 8, "steps": 150, "seed": 1}  # about 10 s on 2 CPU cores


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} metric")


def wait_until(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_504_stops_the_running_request_so_the_next_one_is_answered(demo_pipe):
    """A heavy request past --timeout gets 504 and its engine call stops at the next step: a small
    request sent right after is answered within its own deadline (not stuck behind the heavy one)."""
    with serving(SharedPipeline(demo_pipe), max_batch=1, timeout=2) as (url, service), ThreadPoolExecutor(1) as pool:
        wait_ready(url)
        started = time.monotonic()
        heavy = pool.submit(post, url, HEAVY)
        wait_until(lambda: health(url)["running"] == 1 or heavy.done())
        assert metric(url, "artrt_requests_running") == 1.0 and health(url)["queued"] == 0
        response = heavy.result()
        assert response.status_code == 504 and response.json()["error"]["code"] == "deadline_exceeded"
        assert time.monotonic() - started < 6
        small = post(url, {"prompt": "a blue square", "steps": 2})
        assert small.status_code == 200, small.text
        assert time.monotonic() - started < 6  # the heavy request alone runs about 10 s
        assert health(url) == {"status": "ready", "model": MODEL, "running": 0, "queued": 0}
        assert metric(url, "artrt_requests_running") == 0.0


def test_a_client_that_goes_away_has_its_request_stopped(demo_pipe):
    with serving(SharedPipeline(demo_pipe), max_batch=1) as (url, service):
        wait_ready(url)
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/images/generations", json=HEAVY, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=1.5)
        wait_until(lambda: health(url)["running"] == 0, 10)
        assert time.monotonic() - started < 6  # stopped, not run to its end
        assert post(url, {"prompt": "p", "steps": 2}).status_code == 200
        wait_until(lambda: 'artrt_errors_total{type="client_closed"} 1.0' in httpx.get(f"{url}/metrics").text, 10)


@pytest.mark.parametrize("method, path, status, code", [
    ("GET", "/v1/nothing", 404, "not_found"),
    ("POST", "/nothing", 404, "not_found"),
    ("GET", "/v1/images/generations", 405, "method_not_allowed"),
    ("DELETE", "/v1/models", 405, "method_not_allowed"),
    ("POST", "/health", 405, "method_not_allowed"),
])
def test_unknown_routes_and_methods_get_openai_errors(server, method, path, status, code):
    url, _ = server
    response = httpx.request(method, f"{url}{path}", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status and response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["type"] == "invalid_request_error" and path in error["message"]
    if status == 405:
        assert "allow" in response.headers and response.headers["allow"] in error["message"]


def test_an_engine_failure_is_500_with_one_line(demo_pipe):
    from artrt.errors import EngineError

    ort = ("expert_composition: onnxruntime failed: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid "
           "dimensions for input: sample for the following indices\n index: 2 Got: 16 Expected: 8\n Please fix "
           "either the inputs/outputs or the model.\n")
    pipe = SharedPipeline(demo_pipe, fail="boom", error=EngineError(ort + "x" * 5000))
    with serving(pipe, max_batch=1) as (url, _):
        wait_ready(url)
        response = post(url, {"prompt": "boom", "steps": 2})
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "EngineError" and error["type"] == "server_error"
        message = error["message"]
        assert "\n" not in message and "  " not in message and len(message) <= 600
        assert message.startswith("expert_composition: onnxruntime failed: [ONNXRuntimeError]")
        assert "index: 2 Got: 16 Expected: 8 Please fix" in message and message.endswith("...")
        assert post(url, {"prompt": "fine", "steps": 2}).status_code == 200


def test_a_failing_warm_up_says_why_in_one_line(demo_pipe):
    """The warm-up generation at the package's default size fails (an engine refuses it): /health and
    the service's problem (the CLI's exit line) say so in one line."""
    from starlette.testclient import TestClient

    from artrt.errors import EngineError

    pipe = SharedPipeline(demo_pipe, fail="warm-up", error=EngineError(
        "expert_composition: onnxruntime failed: Non concat axis dimensions must match:\n Axis 2 has mismatched "
        "dimensions of 3 and 4\n"))
    service = ImageService(demo_pipe.manifest, lambda: pipe, MODEL)
    stopped = threading.Event()
    service.on_failure = stopped.set
    http = TestClient(create_app(service))
    service.start()
    assert stopped.wait(30)
    assert isinstance(service.problem, EngineError)
    problem = str(service.problem)
    assert problem == ("the warm-up generation at the package's default size (32x32, 4 steps) failed: "
                       "expert_composition: onnxruntime failed: Non concat axis dimensions must match: Axis 2 has "
                       "mismatched dimensions of 3 and 4")
    body = http.get("/health").json()
    assert body["status"] == "failed" and body["error"] == problem
    response = http.post("/v1/images/generations", json={"prompt": "p"})
    assert response.status_code == 503 and "\n" not in response.json()["error"]["message"]


def test_a_bug_in_a_route_is_500_in_openai_shape(demo_pipe, monkeypatch):
    from starlette.testclient import TestClient

    service = ImageService(demo_pipe.manifest, lambda: demo_pipe, MODEL)
    monkeypatch.setattr(service.metrics, "render", lambda: 1 / 0)
    response = TestClient(create_app(service), raise_server_exceptions=False).get("/metrics")
    assert response.status_code == 500
    assert response.json()["error"] == {"message": "internal error: ZeroDivisionError('division by zero')",
                                        "type": "server_error", "param": None, "code": "internal_error"}


def test_one_line():
    from artrt.runtime.serve.protocol import error_body, one_line

    assert one_line("a\n  b\tc\n") == "a b c"
    long = one_line("word " * 1000)
    assert len(long) == 600 and long.endswith("...")
    assert error_body("x\ny", "server_error")["error"]["message"] == "x y"


def test_sizes_past_the_transformers_reach_are_400_on_size_and_attention_counts_on_the_cpu():
    """A package with ``max_latent`` (Wan's RoPE reach) refuses larger sizes under ``size``; the
    memory estimate counts attention scores only where the engines run on the CPU."""
    import dataclasses

    from artrt.demo.cache import shipped_package
    from artrt.errors import InputError
    from artrt.runtime.package import read_manifest
    from artrt.runtime.serve.protocol import Field, parse_generation

    demo = read_manifest(shipped_package())
    limited = dataclasses.replace(demo, max_latent=(1, 32, 32))
    field = Field()
    with pytest.raises(InputError, match=r"^64x32 is larger than this package's transformers can place"):
        parse_generation({"prompt": "x", "size": "64x32"}, limited, Limits(), field)
    assert field.name == "size"
    big = {"prompt": "x", "size": "1024x1024"}  # 512 GiB of attention scores on the CPU (docs/requests.md)
    with pytest.raises(InputError, match=r"attention 512\.0"):
        parse_generation(big, demo, Limits(), Field())
    assert parse_generation(big, demo, Limits(), Field(), device="cuda").args.width == 1024
