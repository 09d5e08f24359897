"""Prometheus metrics of one server, in a registry of their own (``GET /metrics``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..pipeline import GenerationResult

SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
IMAGES = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """Queue depth, requests running, latency per request and per stage, batch sizes, images, errors by type."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("artrt_queue_depth", "Requests waiting for the worker", registry=r)
        self.running = Gauge("artrt_requests_running", "Requests the worker is running now (a request it runs "
                             "on after its answer, e.g. a 504, until its engine call stops, counts)", registry=r)
        self.in_flight = Gauge("artrt_requests_in_flight", "Image requests received and not yet answered",
                               registry=r)
        self.requests = Counter("artrt_requests", "Image requests answered, by HTTP status", ["status"], registry=r)
        self.request_seconds = Histogram("artrt_request_seconds", "Seconds from arrival to response of image requests "
                                         "answered 200", buckets=SECONDS, registry=r)
        self.queue_seconds = Histogram("artrt_queue_wait_seconds", "Seconds a request waited for the worker",
                                       buckets=SECONDS, registry=r)
        self.stage_seconds = Histogram("artrt_stage_seconds", "Seconds per stage of each engine run (a batch counts "
                                       "once): tokenize, text encoders, expert:<name>, decode, total", ["stage"],
                                       buckets=SECONDS, registry=r)
        self.batch_images = Histogram("artrt_batch_images", "Images per engine run", buckets=IMAGES, registry=r)
        self.images = Counter("artrt_images", "Images generated", registry=r)
        self.errors = Counter("artrt_errors", "Image requests refused or failed, by error type", ["type"], registry=r)

    def watch_queue(self, depth: Callable[[], int], running: Callable[[], int] | None = None) -> None:
        """Read the queue depth from ``depth()`` and the requests running from ``running()`` at every scrape."""
        self.queue_depth.set_function(depth)
        if running is not None:
            self.running.set_function(running)

    def observe_results(self, results: Sequence[GenerationResult]) -> None:
        """The results of one group of requests, in order; the requests merged into one engine batch
        are consecutive (one key per group) and counted as one run, with the batch's stage seconds."""
        i = 0
        while i < len(results):
            first, made = results[i], 0
            while True:  # at least this result, then the rest of its batch
                made += len(results[i].images)
                i += 1
                if i == len(results) or made >= first.batch:
                    break
            self.batch_images.observe(first.batch)
            self.images.inc(made)
            for stage, seconds in first.timings.items():
                self.stage_seconds.labels(stage).observe(seconds)

    def observe_response(self, status: int, seconds: float, error_type: str | None = None) -> None:
        self.requests.labels(str(status)).inc()
        if error_type is not None:
            self.errors.labels(error_type).inc()
        elif status == 200:
            self.request_seconds.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
