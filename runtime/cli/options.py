"""Options, checks and the logging set-up that several commands share."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from artrt.errors import InputError

log = logging.getLogger("artrt")


SAMPLERS = ("euler", "euler_a", "ddim", "dpmpp_2m")
FLOW_SAMPLERS = ("unipc", "euler")  # Wan packages (flow matching)


def add_sampling_options(p: argparse.ArgumentParser, seed_help: str, sizes: bool) -> None:
    """Options that override a package's defaults, shared by generate, sample and demo."""
    p.add_argument("--steps", type=int, help="sampling steps (default: the package's)")
    p.add_argument("--guidance", type=float, nargs="+", metavar="G",
                   help="classifier-free guidance: one value, or one per expert")
    p.add_argument("--switch", type=float,
                   help="UNet pairs: fraction of the schedule run by the composition expert, in [0, 1]; Wan "
                   "packages: boundary_ratio, the high-noise expert runs while t >= switch x 1000 (as diffusers)")
    p.add_argument("--sampler", help=f"one of {', '.join(SAMPLERS)} (UNet pairs) or {', '.join(FLOW_SAMPLERS)} "
                   "(Wan packages)")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    if sizes:
        p.add_argument("--height", type=int, help="image height in pixels")
        p.add_argument("--width", type=int, help="image width in pixels")


def add_lora_option(p: argparse.ArgumentParser) -> None:
    """``--lora FILE[:SCALE][@EXPERT]``, repeatable (parsed by :func:`parse_loras`)."""
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE][@EXPERT]",
                   help="apply a LoRA (diffusers/PEFT or kohya safetensors) at SCALE (default 1) to EXPERT: "
                   "composition, detail or both (default); repeatable, the updates add up (docs/lora.md)")


def parse_loras(specs: list[str] | None) -> list:
    """The ``--lora`` values as :class:`artrt.runtime.lora.Lora` (one InputError line for a bad one)."""
    from artrt.runtime.lora import Lora

    return [Lora.parse(spec) for spec in specs or ()]


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", help="auto (default: trt when the package has TensorRT engines "
                   "and a GPU is present, else ort-cuda, else ort-cpu), trt, ort-cuda or ort-cpu")
    p.add_argument("--threads", type=int, help="CPU threads per engine (default: one per core)")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks of the package files")
    add_memory_options(p)


def add_memory_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", choices=("default", "low"), default="default",
                   help="default: every component resident (fastest); low: each stage loads the component it "
                   "runs and releases it after (text encoders, each expert, the decoder): same images, a fraction "
                   "of the memory, a load per stage")
    p.add_argument("--vae-tiles", type=int, metavar="PX", help="decode in overlapping tiles of PX pixels (bounds "
                   "the decoder's memory on large images; slightly different pixels, see docs/requests.md)")


MIN_VAE_TILE = 64  # pixels; Pipeline.load refuses smaller tiles


def check_memory_options(args: argparse.Namespace) -> None:
    """``--vae-tiles`` checked under the flag's name (Pipeline.load would name it ``vae_tile``)."""
    from artrt.runtime.checks import check_int

    if args.vae_tiles is not None:
        check_int("--vae-tiles", args.vae_tiles, MIN_VAE_TILE)


def check_output(path: Path, video: bool = False) -> None:
    """Refuse an output path that cannot be written: PNG for images, animated WebP for videos."""
    suffix = ".webp" if video else ".png"
    if path.suffix.lower() != suffix:
        raise InputError(f"output {path} must end in {suffix}" + (" (videos are animated WebP)" if video else ""))
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {path}: directory {parent} is not writable")


def configure_logging(quiet: bool = False) -> None:
    """Progress to stderr as ``artrt: message`` lines (only warnings with --quiet)."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("artrt: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def as_flag(flag: str, name: str, check: Callable[..., Any], *values: Any) -> Any:
    """``check(*values)``, its :class:`InputError` naming the option ``flag`` where it says ``name``."""
    try:
        return check(*values)
    except InputError as exc:
        raise InputError(str(exc).replace(name, flag, 1)) from None
