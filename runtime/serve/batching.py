"""The dynamic batcher: a bounded queue of requests and the one worker thread that runs them.

The worker takes the oldest waiting request and, with it, every waiting request of the same key
(:attr:`ImageRequest.key`: size, steps, guidance, switch, sampler, frames) up to ``max_batch``
images. ``max_batch`` bounds how many images requests are merged into, not one request: a request
of more images (``n``, bounded by the server's ``max_n``) runs alone and whole, as one engine call.
When it finds the queue short of a full batch, it waits until ``window`` seconds after
the oldest request arrived for more to join; under load the queue fills while the worker is busy,
so batches form without waiting. ``max_batch=1`` runs every request alone, in arrival order.
A group that fails is run again one request at a time, so one bad request fails only itself.

Every job has a cancel event, passed to the pipeline (``generate_many``'s ``cancel``): it is set when
the caller gives up (:meth:`Batcher.withdraw`: past the deadline, or the client went away) and reads
as set once the job's deadline has passed. A running group stops at its next step once every job of
it is cancelled; its jobs then fail with :class:`TimeoutError` (504), and nothing is run again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from artrt.errors import ArtrtError, Cancelled

from ..checks import check_float, check_int
from ..pipeline import GenerationResult
from .protocol import ImageRequest, one_line

log = logging.getLogger(__name__)

# The requests of one key and, for each, its cancel event (pass it on as generate_many's "cancel").
MAX_WINDOW = 10.0  # seconds a request may wait for others to join its batch

Runner = Callable[[Sequence[ImageRequest], Sequence[threading.Event]], list[GenerationResult]]


@dataclass(frozen=True)
class Batching:
    """How requests are grouped: merged up to ``max_batch`` images, waiting at most ``window`` seconds
    after the oldest request arrived for others to join (``max_batch=1``: no batching). A request of
    more than ``max_batch`` images is never split: it runs alone, whole."""

    window: float = 0.015
    max_batch: int = 8

    def __post_init__(self) -> None:
        check_float("window (seconds)", self.window, 0.0, MAX_WINDOW)
        check_int("max_batch", self.max_batch, 1)


class CancelEvent(threading.Event):
    """A job's cancel event: set by :meth:`Batcher.withdraw` when the caller gives up, and by itself
    when read after ``deadline`` (``time.monotonic()``), so a job whose deadline passes while it runs
    stops at the pipeline's next check even if no one withdrew it."""

    def __init__(self, deadline: float) -> None:
        super().__init__()
        self.deadline = deadline

    def is_set(self) -> bool:
        if not super().is_set() and time.monotonic() > self.deadline:
            self.set()
        return super().is_set()


@dataclass(eq=False)
class Job:
    """One queued request, its deadline (``time.monotonic()``), the future of its result and its
    cancel event (set once it is withdrawn or past its deadline)."""

    request: ImageRequest
    deadline: float
    arrived: float = field(default_factory=time.monotonic)
    future: Future[GenerationResult] = field(default_factory=Future)
    started: float | None = None  # when the worker took it
    cancel: CancelEvent = field(init=False)

    def __post_init__(self) -> None:
        self.cancel = CancelEvent(self.deadline)

    @property
    def images(self) -> int:
        return self.request.args.num_images


class Batcher:
    """Queue requests (:meth:`submit`) and run them in groups on one worker thread.

    ``run`` gets requests of one key and their cancel events and returns their results in order
    (raising :class:`~artrt.errors.Cancelled` once every event is set, as ``generate_many`` does); it
    is only ever called from the worker thread, so it may own state that is not thread-safe (the engines).
    """

    def __init__(self, run: Runner, batching: Batching | None = None, max_queue: int = 64) -> None:
        self.run = run
        batching = batching or Batching()
        self.window, self.max_batch = batching.window, batching.max_batch
        self.max_queue = check_int("max_queue", max_queue, 1)
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._closing = False
        self._running: list[Job] = []  # the jobs of the group the worker runs, until each is answered
        self._seconds_per_image = 0.0  # moving average, for Retry-After
        self._worker = threading.Thread(target=self._work, name="artrt-serve-worker", daemon=True)

    def start(self) -> None:
        self._worker.start()

    @property
    def depth(self) -> int:
        """Requests waiting for the worker (not counting the group it runs)."""
        return len(self._pending)

    @property
    def running(self) -> int:
        """Requests the worker is running now (its current group, less those already answered)."""
        return len(self._running)

    @property
    def closed(self) -> bool:
        return self._closing

    def submit(self, request: ImageRequest, deadline: float) -> Job | None:
        """Queue ``request``; None when the queue is full or the batcher is closed."""
        with self._cond:
            if self._closing or len(self._pending) >= self.max_queue:
                return None
            job = Job(request, deadline)
            self._pending.append(job)
            self._cond.notify()
            return job

    def withdraw(self, job: Job) -> None:
        """Give up on a job (past its deadline, or its client went away): take it out of the queue if it
        is still there, else set its cancel event, so that the engine call running it stops at its next
        step (once every request of that call is withdrawn) and the worker moves on."""
        job.cancel.set()
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
        job.future.cancel()

    def retry_after(self) -> int:
        """Whole seconds until the queue likely has room again: the worker's recent time for the next
        group (for 429's Retry-After)."""
        with self._cond:
            images = sum(job.images for job in self._pending)
        return max(1, math.ceil(self._seconds_per_image * min(images, self.max_batch)))

    def close(self, wait: bool = True) -> None:
        """Accept nothing more; the worker runs what is queued, then stops. ``wait``: until it has."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if wait and self._worker.is_alive():
            self._worker.join()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to stop (after :meth:`close`); True when it has."""
        if self._worker.is_alive():
            self._worker.join(timeout)
        return not self._worker.is_alive()

    def _work(self) -> None:
        while (group := self._next_group()) is not None:
            self._run_group(group)

    def _next_group(self) -> list[Job] | None:
        """The oldest job and the jobs of its key, after the batching window; None once closed and empty."""
        with self._cond:
            while not self._pending:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._pending[0]
            while True:
                group = self._group_of(first)
                wait = first.arrived + self.window - time.monotonic()
                if sum(job.images for job in group) >= self.max_batch or wait <= 0 or self._closing:
                    break
                self._cond.wait(wait)
            for job in group:
                self._pending.remove(job)
            return group

    def _group_of(self, first: Job) -> list[Job]:
        group, images = [first], first.images
        for job in self._pending[1:]:
            if job.request.key == first.request.key and images + job.images <= self.max_batch:
                group.append(job)
                images += job.images
        return group

    def _run_group(self, group: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in group:
            if not job.future.set_running_or_notify_cancel():
                continue  # its caller gave up
            if job.cancel.is_set():
                job.future.set_exception(TimeoutError("the request's deadline passed while it waited"))
                continue
            job.started = now
            live.append(job)
        if not live:
            return
        with self._cond:
            self._running = list(live)
        try:
            self._run_live(live, now)
        finally:
            with self._cond:
                self._running = []

    def _run_live(self, live: list[Job], started: float) -> None:
        try:
            results = self.run([job.request for job in live], [job.cancel for job in live])
        except Cancelled:  # every job was withdrawn or is past its deadline: answered, none run again
            log.info("stopped %d request(s): past the deadline, or the client went away", len(live))
            for job in live:
                self._run_group_of_one(job)  # answers a cancelled job without running it
            return
        except Exception as exc:
            if len(live) == 1:
                self._finish(live[0], error=exc)
                return
            log.warning("a batch of %d requests failed (%s); running them one at a time", len(live),
                        one_line(str(exc)))
            for job in live:
                self._run_group_of_one(job)  # but not those withdrawn or past their deadline meanwhile
            return
        for job, result in zip(live, results):
            self._finish(job, result)
        self._note(time.monotonic() - started, sum(job.images for job in live))

    def _run_group_of_one(self, job: Job) -> None:
        if job.cancel.is_set():  # withdrawn or past its deadline: not run again
            self._finish(job, error=_stopped())
            return
        started = time.monotonic()
        try:
            result = self.run([job.request], [job.cancel])[0]
        except Exception as exc:
            self._finish(job, error=exc)
            return
        self._finish(job, result)
        self._note(time.monotonic() - started, job.images)

    def _finish(self, job: Job, result: GenerationResult | None = None, error: Exception | None = None) -> None:
        """Answer a running job: its result, or its error (a stop for a cancelled job; a bug is logged)."""
        with self._cond:
            if job in self._running:
                self._running.remove(job)
        if error is None:
            job.future.set_result(result)  # type: ignore[arg-type]
            return
        if isinstance(error, Cancelled):
            error = _stopped()
        elif not isinstance(error, (ArtrtError, TimeoutError)):
            log.error("a request failed: %r", error, exc_info=error)
        job.future.set_exception(error)

    def _note(self, seconds: float, images: int) -> None:
        per_image = seconds / max(images, 1)
        self._seconds_per_image = per_image if not self._seconds_per_image else (
            0.8 * self._seconds_per_image + 0.2 * per_image)


def _stopped() -> TimeoutError:
    return TimeoutError("the request was stopped: past its deadline, or its client went away")
