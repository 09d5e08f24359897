"""OpenAI's images API on artrt: the body of ``POST /v1/images/generations`` into checked generation
arguments, and the JSON of responses and errors.

The body takes OpenAI's ``prompt``, ``n``, ``size`` (``"WxH"``), ``response_format`` (``b64_json``
only), ``output_format`` (``png`` only) and ``model``, and artrt's own ``negative_prompt``,
``steps``, ``guidance``, ``switch``, ``sampler``, ``seed`` and (video models only) ``num_frames``.
Every value goes through the checks of :mod:`artrt.runtime.arguments`; an unknown field is refused,
so a typo never passes silently.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from artrt.errors import InputError

from ..arguments import (
    GenerationArguments,
    check_frames,
    check_guidance,
    check_latent_limit,
    check_seed,
    check_side,
)
from ..checks import check_int, check_steps, check_switch
from ..package import Manifest
from .limits import Limits

ARTRT_FIELDS = ("negative_prompt", "steps", "guidance", "switch", "sampler", "seed", "num_frames")
OPENAI_FIELDS = ("prompt", "model", "n", "size", "response_format", "output_format")
IGNORED_FIELDS = ("user", "quality", "style")  # OpenAI's, meaningless here: accepted and ignored
_SIZE = re.compile(r"(\d{1,6})x(\d{1,6})")
MAX_MESSAGE = 600  # characters of an error message (ONNX Runtime's may run to pages)

BatchKey = tuple[Any, ...]


@dataclass(frozen=True)
class ImageRequest:
    """One checked request: its generation arguments, the seed drawn when none was given."""

    args: GenerationArguments

    @property
    def key(self) -> BatchKey:
        """What requests must share to run as one batch: everything but prompts, seeds and counts."""
        a = self.args
        return (a.height, a.width, a.steps, a.guidance, a.switch, a.sampler, a.num_frames)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`Pipeline.generate` for this request."""
        a = self.args
        kwargs = dict(prompt=a.prompt, negative_prompt=a.negative_prompt, steps=a.steps, guidance=list(a.guidance),
                      switch=a.switch, sampler=a.sampler.value, seed=a.seed, height=a.height, width=a.width,
                      num_images=a.num_images)
        if a.num_frames != 1:
            kwargs["num_frames"] = a.num_frames
        return kwargs


class Field:
    """The body field being checked; when a check raises, the error names it as ``param``."""

    def __init__(self) -> None:
        self.name: str | None = None

    def at(self, name: str | None) -> None:
        self.name = name


def parse_generation(body: Any, manifest: Manifest, limits: Limits, field: Field,
                     device: str = "cpu") -> ImageRequest:
    """Check the JSON body of an image request against the package and the server's limits.

    Raises :class:`InputError` with one line; ``field.name`` is then the offending field (None when
    the request as a whole is refused, e.g. it would not fit in memory). ``device``: where the
    engines run (``cpu`` counts attention scores in the memory estimate).
    """
    if not isinstance(body, Mapping):
        raise InputError(f"the body must be a JSON object, got {type(body).__name__}")
    for name in body:
        if name not in (*OPENAI_FIELDS, *ARTRT_FIELDS, *IGNORED_FIELDS):
            field.at(str(name))
            raise InputError(f"unknown parameter {name!r}")
    get = body.get
    field.at("prompt")
    if not isinstance(get("prompt"), str):
        raise InputError(f"prompt is required: a string, got {type(get('prompt')).__name__}")
    field.at("response_format")
    if get("response_format") not in (None, "b64_json"):
        raise InputError(f"response_format {get('response_format')!r} is not supported; use 'b64_json' (this "
                         "server keeps no files to link to)")
    field.at("output_format")
    if get("output_format") not in (None, "png"):
        raise InputError(f"output_format {get('output_format')!r} is not supported; images are PNG")
    d = manifest.defaults
    field.at("n")
    n = check_int("n", 1 if get("n") is None else get("n"), 1)
    limits.check_n(n)
    field.at("size")
    width, height = _size(get("size"), d.width, d.height, manifest.size_multiple)
    limits.check_size(width, height)
    field.at("steps")
    steps = check_steps(d.steps if get("steps") is None else get("steps"))
    limits.check_steps(steps)
    field.at("guidance")
    if get("guidance") is not None:
        check_guidance(get("guidance"), len(manifest.experts))
    field.at("switch")
    if get("switch") is not None:
        check_switch(get("switch"))
    field.at("seed")
    seed = check_seed(get("seed"))
    field.at("num_frames")
    frames = check_frames(1 if get("num_frames") is None else get("num_frames"), manifest)
    field.at("size" if get("num_frames") is None else "num_frames")
    check_latent_limit(manifest, height, width, frames)
    field.at("negative_prompt")
    if get("negative_prompt") is not None and not isinstance(get("negative_prompt"), str):
        raise InputError(f"negative_prompt must be a string, got {type(get('negative_prompt')).__name__}")
    field.at("sampler")  # the one argument not checked above
    args = GenerationArguments.check(manifest, get("prompt"), get("negative_prompt"), steps, get("guidance"),
                                     get("switch"), get("sampler"), seed, height, width, n, frames)
    field.at(None)
    args.check_memory(manifest, device)
    return ImageRequest(args)


def _size(value: Any, width: int, height: int, multiple: int) -> tuple[int, int]:
    """``"WxH"`` (or None / ``"auto"``: the package's default size) as checked (width, height)."""
    if value is None or value == "auto":
        return width, height
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise InputError(f"size must be 'WIDTHxHEIGHT' in pixels, e.g. '{width}x{height}', got {value!r}")
    return check_side("width", int(match[1]), multiple), check_side("height", int(match[2]), multiple)


def images_response(created: int, pngs: list[bytes]) -> dict[str, Any]:
    """OpenAI's image response: ``{created, data: [{b64_json}]}``."""
    return {"created": created, "data": [{"b64_json": base64.b64encode(png).decode("ascii")} for png in pngs]}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``, the message on one line."""
    return {"error": {"message": one_line(message), "type": type, "param": param, "code": code}}


def one_line(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message`` on one line (every run of whitespace, newlines included, one space) and at most
    ``limit`` characters, its end replaced by ``...`` when longer."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."
