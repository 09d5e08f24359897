"""``artrt serve``: a package as an OpenAI-compatible image service (the ``serve`` extra)."""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from artrt.errors import InputError
from artrt.runtime.checks import check_float, check_int

from .options import add_memory_options

if TYPE_CHECKING:
    from artrt.runtime.serve.batching import Batching
    from artrt.runtime.serve.limits import Limits

log = logging.getLogger("artrt")

API_KEY_ENV = "ARTRT_API_KEY"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a package over HTTP (OpenAI's POST /v1/images/generations)",
        description="Serve a package as a local HTTP service speaking OpenAI's images API (POST "
        "/v1/images/generations with artrt's own fields: negative_prompt, steps, guidance, switch, sampler, seed, "
        "and num_frames for video packages), with GET /v1/models, /health (200 once loaded and warm) and /metrics "
        "(Prometheus). Concurrent requests with the same size and settings are merged into one batched engine call "
        "of up to --max-batch images; a request of more images (up to --max-n) runs alone, whole. A request not "
        "answered within --timeout gets 504 and its generation stops at its next step (so does one whose client "
        "goes away). SIGTERM or Ctrl-C drains: queued and running requests finish, new ones get 503, then the "
        "server exits 0. Needs the 'serve' extra (pip install 'artrt[serve]'). See docs/serving.md.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", "-m", type=Path, help="package directory")
    what.add_argument("--demo", action="store_true", help="serve the embedded demo model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"require 'Authorization: Bearer KEY' on "
                   f"/v1 routes (default: ${API_KEY_ENV}; none: no key)")
    p.add_argument("--backend", default="auto", help="auto (default), trt, ort-cuda or ort-cpu")
    p.add_argument("--threads", type=int, help="CPU threads per engine (default: one per core)")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks of the package files")
    add_memory_options(p)
    b = p.add_argument_group("batching and limits")
    b.add_argument("--max-batch", type=int, default=8, help="most images that concurrent requests are merged into "
                   "per batched engine call (default 8; 1: no batching); a request of more images, up to --max-n, "
                   "runs alone and whole")
    b.add_argument("--batch-window-ms", type=float, default=15.0, help="how long the oldest waiting request waits "
                   "for others of its size and settings to join its batch (default 15)")
    b.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 429 (default 64)")
    b.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take from arrival to "
                   "response; later gets 504 and its generation is stopped (default 300)")
    b.add_argument("--max-n", type=int, default=8, help="images per request at most (default 8)")
    b.add_argument("--max-pixels", default="2048x2048", metavar="WxH|N", help="pixels per image at most: "
                   "WIDTHxHEIGHT or a pixel count (default 2048x2048)")
    b.add_argument("--max-steps", type=int, default=150, help="steps per request at most (default 150)")
    b.add_argument("--max-body", default="1MiB", metavar="SIZE", help="request body at most: bytes, or with a "
                   "KiB, MiB, KB or MB suffix, e.g. 512KiB (default 1MiB)")


_PIXELS = re.compile(r"(\d+)\s*[xX]\s*(\d+)|(\d+)")
_BYTES = re.compile(r"(\d+)\s*(b|kb|kib|mb|mib)?", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kb": 1000, "kib": 1 << 10, "mb": 1000 ** 2, "mib": 1 << 20}


def parse_pixels(value: str | int, flag: str = "--max-pixels") -> int:
    """``WIDTHxHEIGHT`` or a pixel count as a pixel count >= 1 (one InputError line naming ``flag``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return check_int(flag, value, 1)
    match = _PIXELS.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise InputError(f"{flag} must be WIDTHxHEIGHT (e.g. 2048x2048) or a pixel count, got {value!r}")
    if match[3] is not None:
        return check_int(flag, int(match[3]), 1)
    width, height = int(match[1]), int(match[2])
    if width < 1 or height < 1:
        raise InputError(f"{flag} must have a width and a height >= 1, got {value!r}")
    return width * height


def parse_bytes(value: str | int, flag: str = "--max-body", minimum: int = 1) -> int:
    """A byte count, optionally with a KiB, MiB (1024-based), KB or MB (1000-based) suffix, as bytes
    >= ``minimum`` (one InputError line naming ``flag``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return check_int(flag, value, minimum)
    match = _BYTES.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise InputError(f"{flag} must be a byte count, optionally with a KiB, MiB, KB or MB suffix (e.g. 1MiB), "
                         f"got {value!r}")
    return check_int(flag, int(match[1]) * _UNITS[match[2] and match[2].lower()], minimum)


def settings(args: argparse.Namespace) -> tuple[Limits, Batching]:
    """The server's limits and batching from the options, each bad value one InputError line naming its flag."""
    from artrt.engines import BACKENDS
    from artrt.runtime.serve.batching import MAX_WINDOW, Batching
    from artrt.runtime.serve.limits import MAX_TIMEOUT, MIN_BODY, MIN_TIMEOUT, Limits

    check_int("--port", args.port, 0, 65535)
    if args.backend not in ("auto", *BACKENDS):  # else Pipeline.load would say so once the server listens
        raise InputError(f"--backend must be one of auto, {', '.join(BACKENDS)}, got {args.backend!r}")
    window_ms = check_float("--batch-window-ms", args.batch_window_ms, 0.0, MAX_WINDOW * 1000)
    limits = Limits(max_n=check_int("--max-n", args.max_n, 1),
                    max_pixels=parse_pixels(args.max_pixels),
                    max_steps=check_int("--max-steps", args.max_steps, 1),
                    max_body=parse_bytes(args.max_body, minimum=MIN_BODY),
                    max_queue=check_int("--max-queue", args.max_queue, 1),
                    timeout=check_float("--timeout", args.timeout, MIN_TIMEOUT, MAX_TIMEOUT))
    batching = Batching(window=window_ms / 1000, max_batch=check_int("--max-batch", args.max_batch, 1))
    return limits, batching


def run(args: argparse.Namespace) -> None:
    limits, batching = settings(args)  # bad options first: one line each, before anything loads
    _check_extra()
    from artrt.runtime.package import read_manifest
    from artrt.runtime.serve.server import bind, serve
    from artrt.runtime.serve.service import ImageService

    package, model_id, verify = _package(args)
    manifest = read_manifest(package, verify_hashes=False)  # a bad path fails here, before the server starts
    sockets = bind(args.host, args.port)  # so does a port in use, before the model loads

    def load():  # type: ignore[no-untyped-def]
        from artrt.runtime.pipeline import Pipeline

        return Pipeline.load(package, backend=args.backend, threads=args.threads, verify_hashes=verify,
                             memory=args.memory, vae_tile=args.vae_tiles)

    service = ImageService(manifest, load, model_id, limits, batching)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("warning: listening on %s: other machines can reach this server%s", args.host,
                    "" if args.api_key else "; set --api-key or $" + API_KEY_ENV)
    server = serve(service, args.host, args.port, args.api_key, quiet=getattr(args, "quiet", False), sockets=sockets)
    if service.problem is not None:
        raise service.problem  # one line: loading or the warm-up generation failed
    if server.drained:
        log.info("drained and stopped")


def _package(args: argparse.Namespace) -> tuple[Path, str, bool]:
    """The package to serve, the model id it is served as, and whether to verify its hashes at load."""
    if args.demo:
        from artrt.demo.cache import demo_package

        return demo_package(), "artrt-demo", False  # demo_package checked the shipped package's sha256
    return args.model, Path(args.model).resolve().name, not args.no_verify


def _check_extra() -> None:
    """One line naming the extra when the server's libraries are missing."""
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise InputError(f"artrt serve needs the 'serve' extra (pip install 'artrt[serve]'): {exc}") from None
