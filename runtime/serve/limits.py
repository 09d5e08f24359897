"""What one server accepts: its limits on a request's images, pixels, steps, body and time."""

from __future__ import annotations

from dataclasses import dataclass

from artrt.errors import InputError

from ..checks import check_float, check_int

MIN_BODY = 256  # bytes: room for a prompt and a few fields
MIN_TIMEOUT, MAX_TIMEOUT = 0.001, 86400.0  # seconds


@dataclass(frozen=True)
class Limits:
    """Per-server bounds; a request beyond one is refused with 400 (413 for the body) before any work.

    ``max_pixels`` bounds one image (width x height); the memory estimate of the whole request
    (:meth:`GenerationArguments.check_memory`) is checked on top of it.
    """

    max_n: int = 8
    max_pixels: int = 2048 * 2048
    max_steps: int = 150
    max_body: int = 1 << 20  # bytes
    max_queue: int = 64  # requests waiting for the worker
    timeout: float = 300.0  # seconds from arrival to response

    def __post_init__(self) -> None:
        check_int("max_n", self.max_n, 1)
        check_int("max_pixels", self.max_pixels, 1)
        check_int("max_steps", self.max_steps, 1)
        check_int("max_body", self.max_body, MIN_BODY)
        check_int("max_queue", self.max_queue, 1)
        check_float("timeout", self.timeout, MIN_TIMEOUT, MAX_TIMEOUT)

    def check_n(self, n: int) -> None:
        if n > self.max_n:
            raise InputError(f"n is {n}; this server makes at most {self.max_n} images per request")

    def check_size(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise InputError(f"size {width}x{height} has {width * height} pixels; this server allows at most "
                             f"{self.max_pixels} per image")

    def check_steps(self, steps: int) -> None:
        if steps > self.max_steps:
            raise InputError(f"steps is {steps}; this server runs at most {self.max_steps}")
