"""uvicorn with a drain: on the first SIGTERM or SIGINT the service refuses new requests (503) while
the queued and running ones finish, then the server stops and the process exits 0. A second signal
stops at once."""

from __future__ import annotations

import logging
from types import FrameType

import uvicorn

from .app import create_app
from .service import ImageService

log = logging.getLogger("artrt")


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose exit signals drain ``service`` before it stops listening."""

    def __init__(self, config: uvicorn.Config, service: ImageService) -> None:
        super().__init__(config)
        self.service = service
        self.drained = False  # True once the drain finished (not a forced exit)
        self._signalled = False
        service.on_failure = self._stop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's own handler also records the signal to raise it again after shutdown, which
        # would end the process by that signal instead of exit status 0.
        if self._signalled:
            log.warning("stopping now: %d request(s) still queued", self.service.batcher.depth
                        if self.service.batcher is not None else 0)
            self.should_exit = self.force_exit = True
            return
        self._signalled = True
        self.service.drain(then=self._drained)

    def _drained(self) -> None:
        self.drained = True
        self._stop()

    def _stop(self) -> None:
        self.should_exit = True


def serve(service: ImageService, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          quiet: bool = False) -> DrainingServer:
    """Run the server until it is drained or stopped (blocks); returns it for its state."""
    config = uvicorn.Config(create_app(service, api_key), host=host, port=port, log_level="warning" if quiet else
                            "info", access_log=not quiet, lifespan="on", workers=1)
    server = DrainingServer(config, service)
    server.run()
    return server
