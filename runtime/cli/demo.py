"""``artrt demo``: draw with the embedded shapes model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from artrt.runtime.arguments import check_int

from .options import add_lora_option, add_memory_options, add_sampling_options, check_output, parse_loras

log = logging.getLogger("artrt")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from artrt.demo.cache import DEFAULT_PROMPT

    p = sub.add_parser(
        "demo",
        help="draw a prompt with the embedded shapes model (CPU, offline)",
        description="Generate with the model that ships with artrt: two pixel-space experts (composition, "
        "detail) trained by this project on the 'shapes world' (circles, squares and triangles; red, green, blue "
        "and yellow; one to three objects; left of, right of, above, below; solid, outlined or striped) with "
        "the frozen all-MiniLM-L6-v2 text encoder. The model ships as a ready package (checked against its "
        "sha256 on every run), so only the runtime is needed; --rebuild exports it again from its trained weights "
        "(needs the 'demo' extra: pip install 'artrt[demo]'). The model draws 32x32 images; they are saved enlarged "
        "(nearest neighbour) for viewing, with the model's resolution recorded.",
    )
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help=f"what to draw (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--output", "-o", type=Path, default=Path("demo.png"), help="output PNG (default demo.png)")
    add_sampling_options(p, seed_help="noise seed (default 0)", sizes=False)
    p.add_argument("--num-images", "-n", type=int, default=1, help="images, run as one batch (default 1)")
    p.add_argument("--scale", type=int, default=8, help="enlargement of the saved image (default 8: 256x256)")
    p.add_argument("--rebuild", action="store_true", help="export the model from its trained weights into the cache "
                   "and draw with that export instead of the shipped package (needs the 'demo' extra; about a minute)")
    p.add_argument("--cache", type=Path, help="where --rebuild keeps its export (default $ARTRT_CACHE, else "
                   "~/.cache/artrt)")
    p.add_argument("--backend", default="ort-cpu", help="ort-cpu (default), ort-cuda or auto")
    p.add_argument("--threads", type=int, help="CPU threads per engine (default: one per core)")
    add_memory_options(p)
    add_lora_option(p)


def run(args: argparse.Namespace) -> None:
    from artrt.demo.cache import demo_package, upscale
    from artrt.runtime.pipeline import GenerationResult, Pipeline

    check_output(args.output)
    check_int("--scale", args.scale, 1, 64)
    loras = parse_loras(args.lora)
    _warn_outside_world(args.prompt)
    package = demo_package(cache=args.cache, rebuild=args.rebuild)
    guidance = args.guidance[0] if args.guidance and len(args.guidance) == 1 else args.guidance
    # demo_package checked the shipped package's sha256; a cached export is artrt's own (sizes are checked).
    with Pipeline.load(package, backend=args.backend, threads=args.threads, verify_hashes=False, memory=args.memory,
                       vae_tile=args.vae_tiles, loras=loras) as pipe:
        result = pipe.generate(args.prompt, steps=args.steps, guidance=guidance, switch=args.switch,
                               sampler=args.sampler, seed=args.seed, num_images=args.num_images)
    images = [upscale(image, args.scale) for image in result.images]
    parameters = {**result.parameters, "model_resolution": [result.parameters["height"], result.parameters["width"]],
                  "upscale": args.scale}
    for path in GenerationResult(images, result.timings, parameters).save(args.output):
        log.info("wrote %s (%dx%d model output, shown x%d)", path, result.parameters["width"],
                 result.parameters["height"], args.scale)
    log.info("timings (s): %s", ", ".join(f"{k} {v:.3f}" for k, v in result.timings.items()))


def _warn_outside_world(prompt: str) -> None:
    """The demo model knows only its shapes world: say so when a prompt is outside it."""
    from artrt.demo.world import parse_prompt

    try:
        parse_prompt(prompt)
    except ValueError as exc:
        log.warning("warning: the demo model only knows the shapes world (%s); drawing anyway", exc)
