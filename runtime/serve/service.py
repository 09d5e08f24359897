"""The service behind the HTTP routes: loads and warms the pipeline in the background, says whether
it is ready, queues requests on the batcher, drains and closes.

States: ``loading`` (engines loading, then one warm-up generation), ``ready``, ``draining`` (after
SIGTERM / SIGINT: queued and running requests finish, new ones are refused), ``failed`` (the package
did not load), ``closed``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence

from artrt.errors import ArtrtError, EngineError

from ..arguments import GenerationArguments
from ..package import Manifest
from ..pipeline import GenerationResult, Pipeline
from .batching import Batcher, Batching, Job
from .limits import Limits
from .metrics import Metrics
from .protocol import ImageRequest, one_line

log = logging.getLogger("artrt")

LOADING, READY, DRAINING, FAILED, CLOSED = "loading", "ready", "draining", "failed", "closed"
WARMUP_STEPS = 4


class ImageService:
    """One package served: ``load()`` returns its :class:`Pipeline` (called once, in the background)."""

    def __init__(self, manifest: Manifest, load: Callable[[], Pipeline], model_id: str, limits: Limits | None = None,
                 batching: Batching | None = None) -> None:
        self.manifest = manifest
        self.model_id = model_id
        self.limits = limits or Limits()
        self.batching = batching or Batching()
        self.metrics = Metrics()
        self.state = LOADING
        self.problem: ArtrtError | None = None  # why loading failed, in one line
        self.on_failure: Callable[[], None] | None = None  # called once loading has failed
        self.batcher: Batcher | None = None
        self._load = load
        self._pipe: Pipeline | None = None
        self._lock = threading.Lock()

    @property
    def device(self) -> str:
        """Where the engines run: ``cpu`` or ``cuda`` (``cpu`` until they are loaded)."""
        pipe = self._pipe
        return pipe.device if pipe is not None else "cpu"

    def start(self) -> None:
        """Load and warm up in a background thread; :attr:`state` becomes ``ready`` (or ``failed``)."""
        threading.Thread(target=self._start, name="artrt-serve-load", daemon=True).start()

    @property
    def running(self) -> int:
        """Requests the worker is running now."""
        return self.batcher.running if self.batcher is not None else 0

    @property
    def queued(self) -> int:
        """Requests waiting for the worker."""
        return self.batcher.depth if self.batcher is not None else 0

    def submit(self, request: ImageRequest, deadline: float) -> Job | None:
        """Queue a checked request; None when the queue is full or the service is not ready."""
        batcher = self.batcher
        if self.state != READY or batcher is None:
            return None
        return batcher.submit(request, deadline)

    def drain(self, then: Callable[[], None]) -> None:
        """Refuse new requests, let the queued and running ones finish, then call ``then()`` (from
        another thread; returns at once, so it may be called from a signal handler)."""
        with self._lock:
            if self.state in (LOADING, READY):
                self.state = DRAINING
            batcher = self.batcher
        log.info("draining: new requests get 503; finishing the running request(s) and %d queued",
                 batcher.depth if batcher is not None else 0)

        def wait() -> None:
            if batcher is not None:
                batcher.close(wait=True)
            then()

        threading.Thread(target=wait, name="artrt-serve-drain", daemon=True).start()

    def close(self) -> None:
        """Drain (waiting), then release the engines."""
        with self._lock:
            if self.state != FAILED:
                self.state = CLOSED
            batcher = self.batcher
        if batcher is not None:
            batcher.close(wait=True)
        with self._lock:
            pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.close()

    def _start(self) -> None:
        started = time.perf_counter()
        try:
            pipe = self._load()
        except Exception as exc:
            self._failed(_problem(exc))
            return
        d = self.manifest.defaults
        steps = min(d.steps, WARMUP_STEPS)
        try:
            warm_up = ImageRequest(GenerationArguments.check(self.manifest, "warm-up", steps=steps, seed=0))
            pipe.generate(**warm_up.generate_kwargs())
        except Exception as exc:
            with contextlib.suppress(Exception):
                pipe.close()
            self._failed(_problem(exc, f"the warm-up generation at the package's default size ({d.width}x"
                                       f"{d.height}, {steps} steps) failed"))
            return
        with self._lock:
            if self.state != LOADING:  # drained or closed while loading
                pipe.close()
                return
            self._pipe = pipe
            self.batcher = Batcher(self._run, self.batching, self.limits.max_queue)
            self.batcher.start()
            self.metrics.watch_queue(lambda: self.queued, lambda: self.running)
            self.state = READY
        log.info("%s ready on %s (loaded and warmed up in %.1f s)", self.model_id, pipe.backend,
                 time.perf_counter() - started)

    def _failed(self, problem: ArtrtError) -> None:
        """Loading or warming up failed: /health says why; the CLI exits with it."""
        self.state, self.problem = FAILED, problem
        if self.on_failure is None:
            log.error("error: loading %s failed: %s", self.model_id, problem)
        else:
            log.info("loading %s failed; stopping", self.model_id)
            self.on_failure()

    def _run(self, requests: Sequence[ImageRequest], cancels: Sequence[threading.Event]) -> list[GenerationResult]:
        """The batcher's runner (on its worker thread): requests with one key as one engine batch, which
        stops (:class:`~artrt.errors.Cancelled`) at the next step once every request's event is set."""
        assert self._pipe is not None
        results = self._pipe.generate_many([{**r.generate_kwargs(), "cancel": cancel}
                                            for r, cancel in zip(requests, cancels)], batch=True)
        self.metrics.observe_results(results)
        return results


def _problem(exc: Exception, context: str | None = None) -> ArtrtError:
    """Why loading failed as an :class:`ArtrtError` with a one-line message (an engine's may hold
    several lines, or pages): ``"context: message"``; the class of ``exc`` where it is an ArtrtError,
    else (a bug) an EngineError with its repr."""
    if not isinstance(exc, ArtrtError):
        return EngineError(one_line(f"{context or 'loading failed'}: {exc!r}"))
    message = one_line(f"{context}: {exc}" if context else str(exc))
    if message == str(exc):
        return exc
    try:
        return type(exc)(message)
    except Exception:  # a subclass that takes other arguments
        return EngineError(message)
