"""``artrt serve``'s batching: requests run as one batched loop get the images they get alone, and the
batcher groups, bounds, retries and drains as documented (``Pipeline.generate_many(batch=True)``,
runtime/batching.py, runtime/serve/batching.py)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import psnr

from artrt.errors import InputError
from artrt.runtime.arguments import GenerationArguments
from artrt.runtime.batching import StackedNoise
from artrt.runtime.pipeline import GenerationResult
from artrt.runtime.serve.batching import Batcher, Batching
from artrt.runtime.serve.protocol import ImageRequest


@pytest.fixture(scope="module")
def demo_pipe():
    from artrt.demo.cache import demo_package
    from artrt.runtime import Pipeline

    with Pipeline.load(demo_package(), backend="ort-cpu", verify_hashes=False) as pipe:
        yield pipe


def requests_of(manifest, calls: list[dict]) -> list[ImageRequest]:
    return [ImageRequest(GenerationArguments.check(manifest, **call)) for call in calls]


def assert_alone_equals_batched(pipe, calls: list[dict]) -> None:
    """Each request's images from one batched loop equal (bytes) those of its own generate()."""
    requests = requests_of(pipe.manifest, calls)
    batched = pipe.generate_many([r.generate_kwargs() for r in requests], batch=True)
    total = sum(r.args.num_images for r in requests)
    assert [result.batch for result in batched] == [total] * len(requests)  # one engine batch
    for k, (request, result) in enumerate(zip(requests, batched)):
        alone = pipe.generate(**request.generate_kwargs())
        assert result.parameters == alone.parameters
        assert len(result.images) == len(alone.images) == request.args.num_images
        for got, want in zip(result.images, alone.images):
            got, want = np.asarray(got), np.asarray(want)
            assert psnr(got, want) >= 40, f"request {k}: {psnr(got, want):.1f} dB"
            assert np.array_equal(got, want), f"request {k} differs from its lone run ({psnr(got, want):.1f} dB)"


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a", "ddim"])
def test_batched_demo_requests_get_their_lone_images(demo_pipe, sampler):
    """Three prompts, 1-3 images each, own seeds, empty and non-empty negative prompts; euler_a
    draws fresh noise every step from each request's own generator."""
    settings = dict(steps=6, sampler=sampler, switch=0.5)
    calls = [dict(prompt="a red circle", seed=1, **settings),
             dict(prompt="two blue squares", negative_prompt="green", seed=5, num_images=2, **settings),
             dict(prompt="a yellow triangle above a green circle", seed=9, num_images=3, **settings)]
    assert_alone_equals_batched(demo_pipe, calls)


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
def test_batched_sdxl_requests_get_their_lone_images(sdxl_pipe, sampler):
    """The SDXL pair: two text encoders, pooled embeddings, micro-conditioning, a VAE decoder, both experts."""
    settings = dict(steps=4, sampler=sampler, switch=0.5, height=64, width=64)
    calls = [dict(prompt="a lighthouse", seed=3, **settings),
             dict(prompt="a harbour at dusk", negative_prompt="fog", seed=4, num_images=2, **settings)]
    assert_alone_equals_batched(sdxl_pipe, calls)


def test_requests_that_cannot_batch_run_one_after_another(demo_pipe):
    requests = requests_of(demo_pipe.manifest, [dict(prompt="a red circle", steps=3, seed=1),
                                                dict(prompt="a red circle", steps=4, seed=1),
                                                dict(prompt="a blue square", steps=3, seed=2)])
    results = demo_pipe.generate_many([r.generate_kwargs() for r in requests], batch=True)
    assert [r.parameters["steps"] for r in results] == [3, 4, 3]  # in the order asked
    assert [r.parameters["prompt"] for r in results] == ["a red circle", "a red circle", "a blue square"]
    assert [r.batch for r in results] == [2, 1, 2]  # the two 3-step requests ran as one batch


def test_stacked_noise_draws_each_requests_rows_from_its_own_generator():
    noise = StackedNoise([np.random.default_rng(1), np.random.default_rng(2)], [1, 2])
    got = noise.standard_normal((3, 4), dtype=np.float32)
    assert np.array_equal(got[:1], np.random.default_rng(1).standard_normal((1, 4), dtype=np.float32))
    assert np.array_equal(got[1:], np.random.default_rng(2).standard_normal((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="batch 2"):
        noise.standard_normal((2, 4))


# The batcher, with a runner that records its groups instead of running engines.

@pytest.fixture(scope="module")
def manifest():
    from artrt.demo.cache import demo_package
    from artrt.runtime.package import read_manifest

    return read_manifest(demo_package(), verify_hashes=False)


class Recorder:
    """A runner: records each group's prompts; fails a group containing ``fail``; waits on ``gate``."""

    def __init__(self, fail: str | None = None) -> None:
        self.groups: list[list[str]] = []
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, requests, cancels):
        assert len(cancels) == len(requests) and not any(c.is_set() for c in cancels)
        self.entered.set()
        self.gate.wait(30)
        self.groups.append([r.args.prompt for r in requests])
        if any(r.args.prompt == self.fail for r in requests):
            raise InputError(f"{self.fail} cannot be drawn")
        return [GenerationResult([], {"total": 0.0}, {"prompt": r.args.prompt}) for r in requests]


def request(manifest, prompt: str, steps: int = 4, n: int = 1) -> ImageRequest:
    return requests_of(manifest, [dict(prompt=prompt, steps=steps, num_images=n, seed=0)])[0]


def submit_all(batcher: Batcher, requests: list[ImageRequest]) -> list:
    return [batcher.submit(r, time.monotonic() + 30) for r in requests]


def test_batcher_groups_requests_of_one_key_up_to_max_batch(manifest):
    runner = Recorder()
    runner.gate.clear()
    batcher = Batcher(runner, Batching(window=0.05, max_batch=4))
    batcher.start()
    first = batcher.submit(request(manifest, "first"), time.monotonic() + 30)
    assert runner.entered.wait(10)  # the worker holds "first"; the rest queue behind it
    jobs = submit_all(batcher, [request(manifest, "a"), request(manifest, "other", steps=5),
                                request(manifest, "b", n=2), request(manifest, "c", n=2), request(manifest, "d")])
    runner.gate.set()
    for job in [first, *jobs]:
        job.future.result(10)
    batcher.close()
    assert runner.groups == [["first"], ["a", "b", "d"], ["other"], ["c"]]


def test_a_request_over_max_batch_runs_alone_and_whole(manifest):
    """--max-batch bounds merging, not one request: n=8 under max_batch=2 is one group of its own
    (one engine call of 8 images), and the requests after it still merge up to 2 images."""
    runner = Recorder()
    runner.gate.clear()
    batcher = Batcher(runner, Batching(window=0.05, max_batch=2))
    batcher.start()
    first = batcher.submit(request(manifest, "first"), time.monotonic() + 30)
    assert runner.entered.wait(10)
    jobs = submit_all(batcher, [request(manifest, "big", n=8), request(manifest, "a"), request(manifest, "b"),
                                request(manifest, "c")])
    runner.gate.set()
    for job in [first, *jobs]:
        job.future.result(10)
    batcher.close()
    assert runner.groups == [["first"], ["big"], ["a", "b"], ["c"]]
    assert jobs[0].images == 8


def test_max_batch_1_runs_every_request_alone_in_order(manifest):
    runner = Recorder()
    batcher = Batcher(runner, Batching(window=0.05, max_batch=1))
    batcher.start()
    jobs = submit_all(batcher, [request(manifest, p) for p in "abc"])
    for job in jobs:
        job.future.result(10)
    batcher.close()
    assert runner.groups == [["a"], ["b"], ["c"]]


def test_a_failing_batch_is_retried_one_request_at_a_time(manifest):
    runner = Recorder(fail="boom")
    runner.gate.clear()
    batcher = Batcher(runner, Batching(window=0.2, max_batch=8))
    batcher.start()
    jobs = submit_all(batcher, [request(manifest, p) for p in ("a", "boom", "b")])
    runner.gate.set()
    assert jobs[0].future.result(10).parameters["prompt"] == "a"
    assert jobs[2].future.result(10).parameters["prompt"] == "b"
    with pytest.raises(InputError, match="boom cannot be drawn"):
        jobs[1].future.result(10)
    batcher.close()
    assert runner.groups == [["a", "boom", "b"], ["a"], ["boom"], ["b"]]


def test_queue_bound_deadline_withdraw_and_close(manifest):
    runner = Recorder()
    runner.gate.clear()
    batcher = Batcher(runner, Batching(window=0.0, max_batch=1), max_queue=2)
    batcher.start()
    running = batcher.submit(request(manifest, "running"), time.monotonic() + 30)
    assert runner.entered.wait(10)
    expired = batcher.submit(request(manifest, "expired"), time.monotonic() + 0.05)
    withdrawn = batcher.submit(request(manifest, "withdrawn"), time.monotonic() + 30)
    assert batcher.depth == 2
    assert batcher.submit(request(manifest, "refused"), time.monotonic() + 30) is None  # full
    assert batcher.retry_after() >= 1
    batcher.withdraw(withdrawn)
    assert batcher.depth == 1 and withdrawn.future.cancelled()
    queued = batcher.submit(request(manifest, "queued"), time.monotonic() + 30)
    time.sleep(0.1)
    runner.gate.set()
    batcher.close()  # runs what is queued, then stops
    assert batcher.submit(request(manifest, "late"), time.monotonic() + 30) is None
    assert running.future.result(0).parameters["prompt"] == "running"
    assert queued.future.result(0).parameters["prompt"] == "queued"
    with pytest.raises(TimeoutError):
        expired.future.result(0)
    assert runner.groups == [["running"], ["queued"]]


# Cancellation: withdraw (the app's 504, or a client that went away) and deadlines stop a running job.

class UntilCancelled:
    """A runner that runs until every request's cancel event is set, then raises Cancelled (as
    generate_many does); fails with ``fail`` instead when that prompt is in the group."""

    def __init__(self, fail: str | None = None) -> None:
        self.groups: list[list[str]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.fail = fail

    def __call__(self, requests, cancels):
        from artrt.errors import Cancelled

        prompts = [r.args.prompt for r in requests]
        self.groups.append(prompts)
        self.entered.set()
        if self.fail in prompts:
            self.gate.wait(30)
            raise InputError(f"{self.fail} cannot be drawn")
        if all(r.args.steps == 1 for r in requests):  # a quick request: answered at once
            return [GenerationResult([], {"total": 0.0}, {"prompt": p}) for p in prompts]
        deadline = time.monotonic() + 30
        while not all(c.is_set() for c in cancels):
            assert time.monotonic() < deadline, "never cancelled"
            time.sleep(0.01)
        raise Cancelled(f"cancelled by the caller ({len(requests)} request(s))")


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_withdrawing_a_running_group_stops_it_without_rerunning_or_logging(manifest, caplog):
    runner = UntilCancelled()
    batcher = Batcher(runner, Batching(window=0.2, max_batch=8))
    batcher.start()
    jobs = submit_all(batcher, [request(manifest, p) for p in ("a", "b")])
    assert runner.entered.wait(10)
    assert batcher.running == 2 and batcher.depth == 0
    batcher.withdraw(jobs[0])
    time.sleep(0.1)
    assert not jobs[1].future.done()  # one of two withdrawn: the group runs on
    batcher.withdraw(jobs[1])
    for job in jobs:
        with pytest.raises(TimeoutError):
            job.future.result(10)
    wait_for(lambda: batcher.running == 0)
    quick = batcher.submit(request(manifest, "quick", steps=1), time.monotonic() + 30)
    assert quick.future.result(10).parameters["prompt"] == "quick"  # the worker went on
    batcher.close()
    assert runner.groups == [["a", "b"], ["quick"]]  # not run again one at a time
    assert not [r for r in caplog.records if r.levelno >= 30], caplog.text  # no warning, no error


def test_a_running_job_past_its_deadline_is_cancelled_by_the_worker(manifest):
    """Nobody withdraws it: its cancel event reads as set once its deadline passes."""
    runner = UntilCancelled()
    batcher = Batcher(runner, Batching(window=0.0, max_batch=1))
    batcher.start()
    started = time.monotonic()
    job = batcher.submit(request(manifest, "slow"), started + 0.3)
    with pytest.raises(TimeoutError):
        job.future.result(10)
    assert 0.3 <= time.monotonic() - started < 5 and job.cancel.is_set()
    batcher.close()
    assert runner.groups == [["slow"]]


def test_a_failing_batch_reruns_only_the_jobs_not_withdrawn(manifest):
    runner = UntilCancelled(fail="boom")
    batcher = Batcher(runner, Batching(window=0.2, max_batch=8))
    batcher.start()
    jobs = submit_all(batcher, [request(manifest, p, steps=1) for p in ("a", "boom", "b")])
    assert runner.entered.wait(10)
    batcher.withdraw(jobs[0])
    runner.gate.set()
    with pytest.raises(TimeoutError):
        jobs[0].future.result(10)
    with pytest.raises(InputError, match="boom cannot be drawn"):
        jobs[1].future.result(10)
    assert jobs[2].future.result(10).parameters["prompt"] == "b"
    batcher.close()
    assert runner.groups == [["a", "boom", "b"], ["boom"], ["b"]]  # "a" was not run again
