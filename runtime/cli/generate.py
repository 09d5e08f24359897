"""``artrt generate``: images from a prompt."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .options import (
    add_lora_option,
    add_runtime_options,
    add_sampling_options,
    as_flag,
    check_memory_options,
    check_output,
    parse_loras,
)

log = logging.getLogger("artrt")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images (or short videos, with Wan packages) from a prompt",
        description="Generate images with a package. Unset options take the package defaults "
        "(see 'artrt info'). Images are PNG with the parameters in a 'parameters' text chunk; videos "
        "(--frames N with a Wan package) are animated WebP with the parameters in its XMP chunk.",
    )
    p.add_argument("prompt")
    p.add_argument("--model", "-m", required=True, type=Path, help="package directory")
    p.add_argument("--output", "-o", type=Path,
                   help="output PNG (default out.png; with --frames N > 1 an animated WebP, default out.webp); "
                   "with --num-images N: out.png, out-1.png, ...")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default: none)")
    add_sampling_options(p, seed_help="noise seed (default 0)", sizes=True)
    p.add_argument("--num-images", "-n", type=int, default=1, help="images per prompt, run as one batch")
    p.add_argument("--frames", type=int, default=1, metavar="N",
                   help="frames per video for video packages (Wan): 4k+1, e.g. 5, 17, 81; default 1 (an image)")
    add_runtime_options(p)
    add_lora_option(p)


def run(args: argparse.Namespace) -> None:
    from artrt.runtime.arguments import GenerationArguments, check_frames
    from artrt.runtime.checks import check_int
    from artrt.runtime.package import read_manifest
    from artrt.runtime.pipeline import Pipeline

    manifest = read_manifest(args.model, verify_hashes=False)  # every argument checked before any engine loads
    check_int("--num-images", args.num_images, 1)
    # what the package makes decides the output's suffix, so it is checked first
    video = as_flag("--frames", "num_frames", check_frames, args.frames, manifest) != 1
    args.output = args.output or Path("out.webp" if video else "out.png")
    check_output(args.output, video)
    check_memory_options(args)
    guidance = args.guidance[0] if args.guidance and len(args.guidance) == 1 else args.guidance
    loras = parse_loras(args.lora)
    GenerationArguments.check(
        manifest, args.prompt, args.negative_prompt, args.steps, guidance, args.switch, args.sampler, args.seed,
        args.height, args.width, args.num_images, args.frames,
    ).check_memory(manifest, "cpu" if args.backend in ("auto", "ort-cpu") else "cuda")  # auto: as if on the CPU
    with Pipeline.load(args.model, backend=args.backend, threads=args.threads,
                       verify_hashes=not args.no_verify, loras=loras,
                       memory=args.memory, vae_tile=args.vae_tiles) as pipe:
        result = pipe.generate(
            args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, guidance=guidance,
            switch=args.switch, sampler=args.sampler, seed=args.seed, height=args.height,
            width=args.width, num_images=args.num_images, num_frames=args.frames,
        )
    for path in result.save(args.output):
        log.info("wrote %s", path)
    log.info("timings (s): %s", ", ".join(f"{k} {v:.3f}" for k, v in result.timings.items()))
