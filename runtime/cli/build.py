"""``artrt build``: GPU engines for a package."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from artrt.errors import InputError

log = logging.getLogger("artrt")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="build GPU engines for a package (TensorRT plans or fused ONNX Runtime CUDA graphs)",
        description="Build one engine per component of a package for this machine and record it in the "
        "package's artrt.json. trt: a TensorRT plan from the fp16 ONNX (strongly typed), for one optimization "
        "profile, static by default; plans are tied to the TensorRT version and GPU they were built with. "
        "ort-cuda: graphs fused by the ONNX Runtime transformers optimizer. Engines that already fit the "
        "request are kept unless --rebuild is given. Video packages (Wan): the experts are built for --frames "
        "(latent frames (N-1)/4+1) and text_length = the tokenizer's max_length (512); the VAE decoders take one "
        "latent frame per call, so they serve any frame count.",
    )
    p.add_argument("model", type=Path, help="package directory")
    p.add_argument("--backend", choices=("trt", "ort-cuda"), default="trt", help="engine kind (default trt)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the package's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the package's)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--frames", type=int, default=1, help="video packages (Wan): frames per video, 4k+1; the "
                   "experts' latent frames are (N-1)/4+1 (default 1: single images)")
    p.add_argument("--dynamic", action="store_true", help="build for ranges of sizes and batches instead of "
                   "exactly --height/--width/--batch (one build serves many requests; TensorRT tunes for "
                   "--height/--width/--batch)")
    p.add_argument("--min-size", type=int, help="with --dynamic: smallest height/width (default: half the smaller)")
    p.add_argument("--max-size", type=int, help="with --dynamic: largest height/width (default: 1.5x the larger)")
    p.add_argument("--max-batch", type=int, help="with --dynamic: largest batch (default --batch)")
    p.add_argument("--max-frames", type=int, help="with --dynamic, video packages: most frames per video "
                   "(default --frames; the range starts at 1 frame)")
    p.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="{0-5}",
                   help="TensorRT builder optimization level: higher builds longer, may run faster (default 3)")
    p.add_argument("--timing-cache", type=Path,
                   help="TensorRT timing cache, read and updated (default PKG/engines/timing.cache)")
    p.add_argument("--rebuild", action="store_true", help="rebuild engines even when they are up to date")
    p.add_argument("--refittable", action="store_true", help="trt: build plans whose weights can be replaced "
                   "in place, so --lora applies to them without a rebuild (docs/lora.md)")


def run(args: argparse.Namespace) -> None:
    try:
        from artrt.export.build import BuildRequest, DynamicRange, build_engines
    except ImportError as exc:
        raise InputError(f"build needs the 'export' extra (pip install 'artrt[export]'): {exc}") from None
    bounds = {"--min-size": args.min_size, "--max-size": args.max_size, "--max-batch": args.max_batch,
              "--max-frames": args.max_frames}
    given = [flag for flag, value in bounds.items() if value is not None]
    if given and not args.dynamic:
        raise InputError(f"{', '.join(given)} only apply with --dynamic")
    dynamic = DynamicRange(args.min_size, args.max_size, args.max_batch, args.max_frames) if args.dynamic else None
    request = BuildRequest(
        height=args.height, width=args.width, batch=args.batch, dynamic=dynamic, backend=args.backend,
        opt_level=args.opt_level, timing_cache=args.timing_cache, rebuild=args.rebuild, refittable=args.refittable,
        frames=args.frames,
    )
    build_engines(args.model, request)
