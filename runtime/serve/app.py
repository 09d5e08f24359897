"""The Starlette application: OpenAI's images and models routes, health, metrics, auth, body limit.

Every error is OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with a message of
one line: 400 bad input, 401 missing or wrong key (where a key is set), 404 another model or no such
route, 405 a method the route does not take, 413 body too large, 429 queue full (with Retry-After),
503 loading or draining, 504 past the deadline, 500 an engine failure. A request answered 504, or
whose client goes away, is withdrawn: the engine call running it stops at its next step.
``/health`` and ``/metrics`` take no key; the ``/v1`` routes do.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from artrt.errors import ArtrtError, InputError

from ..images import encode_png
from ..pipeline import GenerationResult
from ..video import encode_webp
from .batching import Batcher, Job
from .protocol import Field, ImageRequest, error_body, images_response, one_line, parse_generation
from .service import DRAINING, FAILED, READY, ImageService

log = logging.getLogger("artrt")


def create_app(service: ImageService, api_key: str | None = None) -> Starlette:
    """The application serving ``service``; ``api_key``: the Bearer token the ``/v1`` routes require."""
    api = ImagesApi(service, api_key)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.start()
        yield
        await run_in_threadpool(service.close)

    routes = [
        Route("/v1/images/generations", api.generations, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
    ]
    handlers = {HTTPException: _http_error, Exception: _internal_error}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


class ImagesApi:
    """The route handlers; every refusal is counted in the metrics by its code."""

    def __init__(self, service: ImageService, api_key: str | None) -> None:
        self.service = service
        self.api_key = api_key

    async def generations(self, request: Request) -> Response:
        """``POST /v1/images/generations``."""
        started = time.monotonic()
        with self.service.metrics.in_flight.track_inprogress():
            admitted = await self._admit(request)
            if isinstance(admitted, Response):
                return self._counted(admitted, started)
            response = await self._answer(request, admitted, started + self.service.limits.timeout)
            return self._counted(response, started)

    async def models(self, request: Request) -> Response:
        """``GET /v1/models``: the one model this server serves."""
        if (denied := self._unauthorized(request)) is not None:
            return denied
        return JSONResponse({"object": "list", "data": [_model_card(self.service)]})

    async def health(self, request: Request) -> Response:
        """``GET /health``: 200 once loaded and warm, else 503 with the state; the requests the worker
        runs now and those waiting for it."""
        service = self.service
        body: dict[str, Any] = {"status": service.state, "model": service.model_id, "running": service.running,
                                "queued": service.queued}
        if service.state == FAILED:
            body["error"] = one_line(str(service.problem))
        return JSONResponse(body, 200 if service.state == READY else 503)

    async def metrics(self, request: Request) -> Response:
        """``GET /metrics`` in Prometheus' text format."""
        data, content_type = self.service.metrics.render()
        return Response(data, media_type=content_type)

    async def _admit(self, request: Request) -> ImageRequest | Response:
        """The checked request, or the response refusing it (auth, state, body, model, arguments)."""
        service = self.service
        if (denied := self._unauthorized(request)) is not None:
            return denied
        if service.state != READY:
            return self._unavailable()
        body = await _read_body(request, service.limits.max_body)
        if body is None:
            return _error(413, f"the body is larger than this server's limit of {service.limits.max_body} bytes",
                          "invalid_request_error", code="body_too_large")
        try:
            data = json.loads(body)
        except ValueError as exc:
            return _error(400, f"the body is not valid JSON: {exc}", "invalid_request_error", code="invalid_json")
        if isinstance(data, dict) and data.get("model") not in (None, service.model_id):
            return _error(404, f"model {data.get('model')!r} is not served here; this server serves "
                          f"{service.model_id!r}", "invalid_request_error", "model", "model_not_found")
        field = Field()
        try:
            return parse_generation(data, service.manifest, service.limits, field, service.device)
        except InputError as exc:
            return _error(400, str(exc), "invalid_request_error", field.name, "invalid_value")

    async def _answer(self, request: Request, image_request: ImageRequest, deadline: float) -> Response:
        """Queue the request and wait for its images until ``deadline`` (monotonic seconds); withdraw it
        (stopping its engine call) when the deadline passes or the client goes away."""
        service = self.service
        job = service.submit(image_request, deadline)
        batcher = service.batcher
        if job is None or batcher is None:
            if service.state != READY or batcher is None:
                return self._unavailable()
            retry = batcher.retry_after()
            return _error(429, f"the queue is full ({service.limits.max_queue} requests); retry in {retry} s",
                          "rate_limit_error", code="queue_full", headers={"Retry-After": str(retry)})
        answer = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            done, _ = await asyncio.wait({answer, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled (a forced shutdown): the worker need not run it on
            _give_up(batcher, job, answer)
            raise
        finally:
            gone.cancel()
        if answer not in done:
            _give_up(batcher, job, answer)
            if gone in done:
                log.info("a client went away before its answer; its request is withdrawn")
                return _error(499, "the client closed the connection before the answer", "invalid_request_error",
                              code="client_closed")
            return self._deadline_exceeded()
        try:
            result = answer.result()
        except TimeoutError:  # the worker found it past its deadline
            return self._deadline_exceeded()
        except InputError as exc:
            return _error(400, str(exc), "invalid_request_error", code="invalid_value")
        except ArtrtError as exc:
            return _error(500, str(exc), "server_error", code=type(exc).__name__)
        except Exception as exc:  # a bug; logged with its traceback by the batcher
            return _error(500, f"internal error: {exc!r}", "server_error", code="internal_error")
        if job.started is not None:
            service.metrics.queue_seconds.observe(job.started - job.arrived)
        pngs = await run_in_threadpool(_encode, result)
        return JSONResponse(images_response(int(time.time()), pngs))

    def _deadline_exceeded(self) -> Response:
        return _error(504, f"the request took longer than this server's limit of {self.service.limits.timeout:g} s",
                      "timeout", code="deadline_exceeded")

    def _unauthorized(self, request: Request) -> Response | None:
        if self.api_key is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return None
        return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_request_error",
                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _unavailable(self) -> Response:
        service = self.service
        if service.state == DRAINING:
            return _error(503, "the server is shutting down", "service_unavailable", code="draining")
        if service.state == FAILED:
            return _error(503, f"the model failed to load: {service.problem}", "service_unavailable",
                          code="load_failed")
        return _error(503, "the model is loading; retry shortly", "service_unavailable", code="loading",
                      headers={"Retry-After": "1"})

    def _counted(self, response: Response, started: float) -> Response:
        error = json.loads(response.body)["error"] if response.status_code != 200 else None
        self.service.metrics.observe_response(response.status_code, time.monotonic() - started,
                                              None if error is None else error["code"] or error["type"])
        return response


def _error(status: int, message: str, type: str, param: str | None = None, code: str | None = None,
           headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An error response in OpenAI's shape (its message on one line)."""
    return JSONResponse(error_body(message, type, param, code), status, headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route: 404, a method the route does not take: 405) in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        message, code = f"no such route: {where}", "not_found"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message, code = f"method not allowed: {where}" + (f"; this route takes {allowed}" if allowed else ""), (
            "method_not_allowed")
    else:
        message, code = f"{exc.detail} ({where})", None
    return _error(exc.status_code, message, "invalid_request_error" if exc.status_code < 500 else "server_error",
                  code=code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug in a route (Starlette logs its traceback) in OpenAI's shape, not plain text."""
    return _error(500, f"internal error: {exc!r}", "server_error", code="internal_error")


async def _client_gone(request: Request) -> None:
    """Return once the client has closed the connection (the body already read: the next ASGI message
    is ``http.disconnect``); never, if the server cannot tell."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # not this server's to judge: keep waiting for the answer
        await asyncio.Future()


def _give_up(batcher: Batcher, job: Job, answer: asyncio.Future[Any]) -> None:
    """Withdraw ``job``: out of the queue, or its engine call stopped at its next step."""
    batcher.withdraw(job)
    answer.cancel()


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None once it is longer than ``limit`` bytes (read no further)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _encode(result: GenerationResult) -> list[bytes]:
    """Each image as PNG with its parameters (seed included) in a ``parameters`` text chunk; each video
    (``num_frames > 1``) as an animated WebP with them."""
    if result.frames is not None:
        return [encode_webp(frames, {**result.parameters, "index": k}) for k, frames in enumerate(result.frames)]
    return [encode_png(image, {**result.parameters, "index": k}) for k, image in enumerate(result.images)]


def _model_card(service: ImageService) -> dict[str, Any]:
    m = service.manifest
    d = m.defaults
    return {
        "id": service.model_id, "object": "model", "created": 0, "owned_by": "artrt",
        "artrt": {"family": m.family, "experts": [e.name for e in m.experts], "size_multiple": m.size_multiple,
                  "defaults": {"size": f"{d.width}x{d.height}", "steps": d.steps, "guidance": d.guidance,
                               "switch": d.switch, "sampler": d.sampler},
                  "status": service.state},
    }
