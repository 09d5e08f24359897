"""uvicorn with a drain: on the first SIGTERM or SIGINT the service refuses new requests (503) while
the queued and running ones finish (a request past its deadline is stopped at its next step), then
the server stops and the process exits 0. A second signal ends the process at once, exit status 1.

The listening sockets are bound before the model loads (:func:`bind`), so a port in use is one
``cannot listen on HOST:PORT: address already in use`` error, not a failure after loading."""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from types import FrameType

import uvicorn

from artrt.errors import InputError

from .app import create_app
from .service import ImageService

log = logging.getLogger("artrt")


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose exit signals drain ``service`` before it stops listening."""

    def __init__(self, config: uvicorn.Config, service: ImageService) -> None:
        super().__init__(config)
        self.service = service
        self.drained = False  # True once the drain finished
        self._signalled = False
        service.on_failure = self._stop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's own handler also records the signal to raise it again after shutdown, which
        # would end the process by that signal instead of exit status 0.
        if self._signalled:
            self._exit_now()
        self._signalled = True
        self.service.drain(then=self._drained)

    def _exit_now(self) -> None:
        """End the process now, exit status 1. The worker may be inside an engine call, which cannot be
        interrupted, and the tasks of the requests still waiting would only be cancelled with
        tracebacks: neither is waited for (an interpreter exit would abort on the running native thread)."""
        log.warning("stopping now: %d request(s) running, %d queued", self.service.running, self.service.queued)
        print("artrt: error: stopped before every queued request was answered", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    def _drained(self) -> None:
        self.drained = True
        self._stop()

    def _stop(self) -> None:
        self.should_exit = True


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of ``host`` on ``port``, as asyncio's ``create_server`` binds them
    (``SO_REUSEADDR``; IPv6 sockets IPv6 only; an address whose family is off skipped); an
    :class:`InputError` of one line when one cannot be bound."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except OSError as exc:  # an unknown host name
        raise InputError(f"cannot listen on {where}: {_reason(exc)}") from None
    sockets: list[socket.socket] = []
    problem: OSError | None = None
    for family, kind, proto, _, address in dict.fromkeys(infos):
        sock = socket.socket(family, kind, proto)
        try:
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            problem = exc
            if exc.errno == errno.EADDRNOTAVAIL:  # e.g. ::1 where IPv6 is off: as asyncio, skip it
                continue
            break
        sockets.append(sock)
    if problem is not None and (problem.errno != errno.EADDRNOTAVAIL or not sockets):
        for sock in sockets:
            sock.close()
        raise InputError(f"cannot listen on {where}: {_reason(problem)}")
    return sockets


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def serve(service: ImageService, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          quiet: bool = False, sockets: list[socket.socket] | None = None) -> DrainingServer:
    """Run the server until it is drained or stopped (blocks); returns it for its state. ``sockets``:
    those :func:`bind` returned (default: bound here)."""
    sockets = bind(host, port) if sockets is None else sockets
    config = uvicorn.Config(create_app(service, api_key), host=host, port=port, log_level="warning" if quiet else
                            "info", access_log=not quiet, lifespan="on", workers=1)
    server = DrainingServer(config, service)
    for sock in sockets:  # uvicorn names no address when given sockets
        address = sock.getsockname()
        name = f"[{address[0]}]" if sock.family == socket.AF_INET6 else address[0]
        log.info("listening on http://%s:%d (SIGTERM or Ctrl-C: drain and stop)", name, address[1])
    try:
        server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
    return server
