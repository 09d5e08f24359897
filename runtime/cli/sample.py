"""``artrt sample``: a prompt file to an image set (resumable; locally or on Ray)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from artrt.errors import InputError

from .options import add_lora_option, add_runtime_options, add_sampling_options, as_flag, parse_loras

log = logging.getLogger("artrt")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="sample a prompt file to an image set (resumable; locally or on Ray)",
        description="Generate every item of a prompt file (.txt: one prompt a line; .jsonl: one object a line "
        "with prompt and optional id, negative_prompt, seed, steps, guidance, switch, sampler, height, width, n, "
        "frames; .csv: the same as columns) into OUT/images/<id>.png (videos of a Wan package: <id>.webp), one "
        "OUT/metadata.jsonl record per image and "
        "OUT/run.json. Per-item values override the options. Item i gets seed --seed + i unless it sets one. "
        "Run the same command again to finish a stopped run.",
    )
    p.add_argument("prompts", type=Path, help="prompt file (.txt, .jsonl or .csv)")
    p.add_argument("--model", "-m", required=True, type=Path, help="package directory")
    p.add_argument("--out", required=True, type=Path, help="output directory (created; resumed if it has a run)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default: none)")
    add_sampling_options(p, seed_help="base seed: item i gets seed + i (default 0)", sizes=True)
    p.add_argument("--num-images", "-n", type=int, default=1, help="images per item (default 1)")
    p.add_argument("--frames", type=int, default=1, metavar="N", help="frames per video for video packages "
                   "(Wan): 4k+1, e.g. 5, 17; default 1 (images); an item's frames overrides it")
    p.add_argument("--batch", type=int, default=1, help="images per engine call, at most, from items with the "
                   "same settings (default 1; GPU engines must be built for it)")
    p.add_argument("--overwrite", action="store_true", help="redo the whole set (deletes OUT's earlier images)")
    p.add_argument("--strict", action="store_true", help="stop before generating anything if a line is bad "
                   "(default: report and skip bad lines)")
    p.add_argument("--ray", metavar="ADDRESS", help="run on Ray: a cluster address, 'auto' (the running "
                   "cluster) or 'local' (start one here); needs the 'ray' extra")
    p.add_argument("--actors", type=int, help="with --ray: pipelines to run (default: one per GPU, else one "
                   "per --threads CPUs)")
    add_runtime_options(p)
    add_lora_option(p)


def run(args: argparse.Namespace) -> None:
    from artrt.runtime.sampling import SampleConfig, SampleOptions, run_sample

    if args.actors is not None and args.ray is None:
        raise InputError("--actors only applies with --ray")
    if args.seed < 0 or args.batch < 1 or (args.actors is not None and args.actors < 1):
        raise InputError("--seed must be >= 0, --batch and --actors >= 1")
    check_options(args)
    options = SampleOptions(
        negative_prompt=args.negative_prompt, steps=args.steps,
        guidance=tuple(args.guidance) if args.guidance else None, switch=args.switch, sampler=args.sampler,
        height=args.height, width=args.width, seed=args.seed, n=args.num_images, frames=args.frames,
    )
    run_sample(SampleConfig(
        args.prompts, args.model, args.out, options, batch=args.batch, overwrite=args.overwrite, strict=args.strict,
        backend=args.backend, threads=args.threads, verify=not args.no_verify, ray=args.ray, actors=args.actors,
        memory=args.memory, vae_tile=args.vae_tiles, loras=tuple(parse_loras(args.lora)),
    ))


def check_options(args: argparse.Namespace) -> None:
    """The values every item starts from, checked against the package and named as their flags,
    before the prompt file is read (a bad option is one line, not a bad line per item)."""
    from artrt.runtime.arguments import check_frames, check_guidance, check_latent_limit, check_side, parse_sampler
    from artrt.runtime.checks import MAX_STEPS, check_float, check_int
    from artrt.runtime.package import read_manifest
    from artrt.runtime.sampling.tasks import MAX_ITEM_IMAGES

    m = read_manifest(args.model, verify_hashes=False)
    if args.steps is not None:
        check_int("--steps", args.steps, 1, MAX_STEPS)
    check_int("--num-images", args.num_images, 1, MAX_ITEM_IMAGES)
    if args.sampler is not None:
        as_flag("--sampler", "sampler", parse_sampler, m.family, args.sampler)
    if args.guidance:
        as_flag("--guidance", "guidance", check_guidance, tuple(args.guidance), len(m.experts))
    if args.switch is not None:
        check_float("--switch", args.switch, 0.0, 1.0)
    height, width = args.height or m.defaults.height, args.width or m.defaults.width
    if args.height is not None:
        height = check_side("--height", args.height, m.size_multiple)
    if args.width is not None:
        width = check_side("--width", args.width, m.size_multiple)
    frames = as_flag("--frames", "num_frames", check_frames, args.frames, m)
    check_latent_limit(m, height, width, frames)

