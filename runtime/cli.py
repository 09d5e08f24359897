"""``artrt`` command line: export, build, generate, info.

Arguments are parsed once here into plain values. Errors a user can cause end with
one ``artrt: error: ...`` line on stderr and exit status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import ArtrtError, InputError

log = logging.getLogger("artrt")

SAMPLERS = ("euler", "euler_a", "ddim", "dpmpp_2m")
PRECISIONS = ("fp32", "fp16")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export diffusers folders to an artrt package (ONNX + tokenizers + artrt.json)",
        description="Export two experts, their text encoder(s) and the VAE decoder of local diffusers "
        "folders to ONNX, check every graph against PyTorch and write a package directory. "
        "Needs the 'export' extra (torch, diffusers, transformers).",
    )
    p.add_argument("--base", required=True, type=Path, help="diffusers pipeline folder (composition expert)")
    second = p.add_mutually_exclusive_group(required=True)
    second.add_argument("--refiner", type=Path, help="SDXL refiner pipeline folder (detail expert)")
    second.add_argument("--detail-unet", type=Path, help="UNet folder with the base UNet's config (detail expert)")
    p.add_argument("--out", required=True, type=Path, help="package directory to write")
    p.add_argument("--switch", type=float, default=0.8, help="default fraction of the schedule run by the "
                   "composition expert (diffusers' denoising_end); default 0.8")
    p.add_argument("--steps", type=int, default=30, help="default number of steps recorded (default 30)")
    p.add_argument("--guidance", type=float, default=5.0, help="default guidance scale recorded (default 5.0)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS), metavar="P",
                   help="graphs to write per component: fp32 (always; ORT CPU runs it) and fp16 (built into GPU "
                   "engines; the network runs in fp16, latents and the sampler update stay fp32); default both")
    p.add_argument("--fp16-vae", action="store_true", help="also write an fp16 VAE decoder (only for an fp16-safe "
                   "VAE: SDXL's original VAE overflows in fp16; without this GPU backends decode in fp32)")


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="build GPU engines for a package (TensorRT plans or fused ONNX Runtime CUDA graphs)",
        description="Build one engine per component of a package for this machine and record it in the "
        "package's artrt.json. trt: a TensorRT plan from the fp16 ONNX (strongly typed), for one optimization "
        "profile, static by default; plans are tied to the TensorRT version and GPU they were built with. "
        "ort-cuda: graphs fused by the ONNX Runtime transformers optimizer. Engines that already fit the "
        "request are kept unless --rebuild is given.",
    )
    p.add_argument("model", type=Path, help="package directory")
    p.add_argument("--backend", choices=("trt", "ort-cuda"), default="trt", help="engine kind (default trt)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the package's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the package's)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--dynamic", action="store_true", help="build for ranges of sizes and batches instead of "
                   "exactly --height/--width/--batch (one build serves many requests; TensorRT tunes for "
                   "--height/--width/--batch)")
    p.add_argument("--min-size", type=int, help="with --dynamic: smallest height/width (default: half the smaller)")
    p.add_argument("--max-size", type=int, help="with --dynamic: largest height/width (default: 1.5x the larger)")
    p.add_argument("--max-batch", type=int, help="with --dynamic: largest batch (default --batch)")
    p.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="{0-5}",
                   help="TensorRT builder optimization level: higher builds longer, may run faster (default 3)")
    p.add_argument("--timing-cache", type=Path,
                   help="TensorRT timing cache, read and updated (default PKG/engines/timing.cache)")
    p.add_argument("--rebuild", action="store_true", help="rebuild engines even when they are up to date")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images from a prompt",
        description="Generate images with a package. Unset options take the package defaults "
        "(see 'artrt info'). Images are PNG with the parameters in a 'parameters' text chunk.",
    )
    p.add_argument("prompt")
    p.add_argument("--model", "-m", required=True, type=Path, help="package directory")
    p.add_argument("--output", "-o", type=Path, default=Path("out.png"),
                   help="output PNG (default out.png); with --num-images N: out.png, out-1.png, ...")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default: none)")
    _add_sampling_options(p, seed_help="noise seed (default 0)", sizes=True)
    p.add_argument("--num-images", "-n", type=int, default=1, help="images per prompt, run as one batch")
    _add_runtime_options(p)


def _add_sampling_options(p: argparse.ArgumentParser, seed_help: str, sizes: bool) -> None:
    """Options that override a package's defaults, shared by generate, sample and demo."""
    p.add_argument("--steps", type=int, help="sampling steps (default: the package's)")
    p.add_argument("--guidance", type=float, nargs="+", metavar="G",
                   help="classifier-free guidance: one value, or one per expert")
    p.add_argument("--switch", type=float,
                   help="fraction of the schedule run by the composition expert, in [0, 1]")
    p.add_argument("--sampler", help=f"one of {', '.join(SAMPLERS)}")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    if sizes:
        p.add_argument("--height", type=int, help="image height in pixels")
        p.add_argument("--width", type=int, help="image width in pixels")


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", help="auto (default: trt when the package has TensorRT engines "
                   "and a GPU is present, else ort-cuda, else ort-cpu), trt, ort-cuda or ort-cpu")
    p.add_argument("--threads", type=int, help="CPU threads per engine (default: one per core)")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks of the package files")


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a package", description="Validate a package and print "
                       "its components, experts, defaults and export checks.")
    p.add_argument("model", type=Path, help="package directory")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks of the package files")


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="sample a prompt file to an image set (resumable; locally or on Ray)",
        description="Generate every item of a prompt file (.txt: one prompt a line; .jsonl: one object a line "
        "with prompt and optional id, negative_prompt, seed, steps, guidance, switch, sampler, height, width, n; "
        ".csv: the same as columns) into OUT/images/<id>.png, one OUT/metadata.jsonl record per image and "
        "OUT/run.json. Per-item values override the options. Item i gets seed --seed + i unless it sets one. "
        "Run the same command again to finish a stopped run.",
    )
    p.add_argument("prompts", type=Path, help="prompt file (.txt, .jsonl or .csv)")
    p.add_argument("--model", "-m", required=True, type=Path, help="package directory")
    p.add_argument("--out", required=True, type=Path, help="output directory (created; resumed if it has a run)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default: none)")
    _add_sampling_options(p, seed_help="base seed: item i gets seed + i (default 0)", sizes=True)
    p.add_argument("--num-images", "-n", type=int, default=1, help="images per item (default 1)")
    p.add_argument("--batch", type=int, default=1, help="images per engine call, at most, from items with the "
                   "same settings (default 1; GPU engines must be built for it)")
    p.add_argument("--overwrite", action="store_true", help="redo the whole set (deletes OUT's earlier images)")
    p.add_argument("--strict", action="store_true", help="stop before generating anything if a line is bad "
                   "(default: report and skip bad lines)")
    p.add_argument("--ray", metavar="ADDRESS", help="run on Ray: a cluster address, 'auto' (the running "
                   "cluster) or 'local' (start one here); needs the 'ray' extra")
    p.add_argument("--actors", type=int, help="with --ray: pipelines to run (default: one per GPU, else one "
                   "per --threads CPUs)")
    _add_runtime_options(p)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from .demo import DEFAULT_PROMPT

    p = sub.add_parser(
        "demo",
        help="draw a prompt with the embedded shapes model (CPU, offline)",
        description="Generate with the model that ships with artrt: two pixel-space experts (composition, "
        "detail) trained by this project on the 'shapes world' (circles, squares and triangles; red, green, blue "
        "and yellow; one to three objects; left of, right of, above, below; solid, outlined or striped) with "
        "the frozen all-MiniLM-L6-v2 text encoder. The first run exports the model into the cache (needs the "
        "'demo' extra: pip install 'artrt[demo]'); later runs load it directly. The model draws 32x32 images; "
        "they are saved enlarged (nearest neighbour) for viewing, with the model's resolution recorded.",
    )
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help=f"what to draw (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--output", "-o", type=Path, default=Path("demo.png"), help="output PNG (default demo.png)")
    _add_sampling_options(p, seed_help="noise seed (default 0)", sizes=False)
    p.add_argument("--num-images", "-n", type=int, default=1, help="images, run as one batch (default 1)")
    p.add_argument("--scale", type=int, default=8, help="enlargement of the saved image (default 8: 256x256)")
    p.add_argument("--cache", type=Path, help="where the exported model is kept (default $ARTRT_CACHE, else "
                   "~/.cache/artrt)")
    p.add_argument("--backend", default="ort-cpu", help="ort-cpu (default), ort-cuda or auto")
    p.add_argument("--threads", type=int, help="CPU threads per engine (default: one per core)")


def _quiet_option() -> argparse.ArgumentParser:
    """``-q`` accepted after the subcommand too (SUPPRESS: it never resets one given before it)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="only print errors")
    return parent


class _SubParsers(argparse._SubParsersAction):
    """Every subcommand also takes ``-q``."""

    def add_parser(self, name: str, **kwargs):  # type: ignore[no-untyped-def, override]
        kwargs.setdefault("parents", []).append(_quiet_option())
        return super().add_parser(name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    import artrt

    parser = argparse.ArgumentParser(
        prog="artrt",
        description="Lean runtime for two-expert text-to-image diffusion models: a composition expert "
        "for high noise, a detail expert for low noise, switched mid-sampling.",
    )
    parser.add_argument("--version", action="version", version=f"artrt {artrt.__version__}")
    parser.add_argument("--quiet", "-q", action="store_true", help="only print errors")
    parser.register("action", "parsers", _SubParsers)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_export(sub)
    _add_build(sub)
    _add_generate(sub)
    _add_info(sub)
    _add_sample(sub)
    _add_demo(sub)
    from . import bench

    bench.add_parser(sub)
    return parser


def run_export(args: argparse.Namespace) -> None:
    try:
        from artrt.export import check_output_dir, export_package, load_same_arch, load_sdxl_ensemble
    except ImportError as exc:
        raise InputError(f"export needs the 'export' extra (pip install 'artrt[export]'): {exc}") from None
    for folder in (args.base, args.refiner, args.detail_unet):
        if folder is not None and not folder.is_dir():
            raise InputError(f"folder not found: {folder}")
    check_output_dir(args.out, args.overwrite)  # before loading any weights
    if args.refiner is not None:
        sources = load_sdxl_ensemble(args.base, args.refiner)
    else:
        sources = load_same_arch(args.base, args.detail_unet)
    export_package(sources, args.out, switch=args.switch, steps=args.steps, guidance=args.guidance,
                   overwrite=args.overwrite, precisions=tuple(args.precision), fp16_vae=args.fp16_vae)


def run_build(args: argparse.Namespace) -> None:
    try:
        from artrt.export.build import BuildRequest, DynamicRange, build_engines
    except ImportError as exc:
        raise InputError(f"build needs the 'export' extra (pip install 'artrt[export]'): {exc}") from None
    bounds = {"--min-size": args.min_size, "--max-size": args.max_size, "--max-batch": args.max_batch}
    given = [flag for flag, value in bounds.items() if value is not None]
    if given and not args.dynamic:
        raise InputError(f"{', '.join(given)} only apply with --dynamic")
    dynamic = DynamicRange(args.min_size, args.max_size, args.max_batch) if args.dynamic else None
    request = BuildRequest(
        height=args.height, width=args.width, batch=args.batch, dynamic=dynamic, backend=args.backend,
        opt_level=args.opt_level, timing_cache=args.timing_cache, rebuild=args.rebuild,
    )
    build_engines(args.model, request)


def _check_output(path: Path) -> None:
    if path.suffix.lower() != ".png":
        raise InputError(f"output {path} must end in .png")
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {path}: directory {parent} is not writable")


def run_generate(args: argparse.Namespace) -> None:
    from .arguments import GenerationArguments
    from .package import read_manifest
    from .pipeline import Pipeline

    _check_output(args.output)
    guidance = args.guidance[0] if args.guidance and len(args.guidance) == 1 else args.guidance
    manifest = read_manifest(args.model, verify_hashes=False)  # every argument checked before any engine loads
    GenerationArguments.check(
        manifest, args.prompt, args.negative_prompt, args.steps, guidance, args.switch, args.sampler, args.seed,
        args.height, args.width, args.num_images,
    ).check_memory(manifest)
    with Pipeline.load(args.model, backend=args.backend, threads=args.threads,
                       verify_hashes=not args.no_verify) as pipe:
        result = pipe.generate(
            args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, guidance=guidance,
            switch=args.switch, sampler=args.sampler, seed=args.seed, height=args.height,
            width=args.width, num_images=args.num_images,
        )
    for path in result.save(args.output):
        log.info("wrote %s", path)
    log.info("timings (s): %s", ", ".join(f"{k} {v:.3f}" for k, v in result.timings.items()))


def run_info(args: argparse.Namespace) -> None:
    from .package import read_manifest

    m = read_manifest(args.model, verify_hashes=not args.no_verify)
    d = m.defaults
    lines = [
        f"package   {args.model}  (family {m.family}, artrt {m.artrt_version})",
        f"defaults  steps {d.steps}, guidance {d.guidance}, switch {d.switch}, sampler {d.sampler}, "
        f"size {d.width}x{d.height} (multiple of {m.size_multiple})",
        f"schedule  {m.schedule}",
        "experts:",
    ]
    lines += [f"  {e.name:<12} {e.component}  text: {', '.join(e.conditioning.text_encoders)}"
              f"  time ids: {e.conditioning.time_ids}" for e in m.experts]
    lines.append("components:")
    sizes = {f.path: f.size for f in m.files}
    for c in m.components.values():
        check = ", ".join(f"{k} {v:.1e}" for k, v in c.export_check.items())
        lines.append(f"  {c.name:<24} {c.kind:<13} {sizes.get(c.onnx, 0) / 1e6:9.1f} MB  "
                     f"max |ONNX - PyTorch|: {check or 'n/a'}")
        if c.onnx_fp16 is not None:
            check = ", ".join(f"{k} {v:.1e}" for k, v in c.export_check_fp16.items())
            lines.append(f"  {'  fp16':<24} {'':<13} {sizes.get(c.onnx_fp16, 0) / 1e6:9.1f} MB  "
                         f"max |ONNX fp16 - PyTorch fp32|: {check or 'n/a'}")
        for t in (*c.inputs, *c.outputs):
            lines.append(f"      {t.name:<22} {t.dtype:<8} {list(t.shape)}")
    lines += _engine_lines(m)
    lines.append(f"files     {len(m.files)}, {sum(sizes.values()) / 1e6:.1f} MB, "
                 f"{'sha256 verified' if not args.no_verify else 'sizes checked'}")
    print("\n".join(lines))


def _engine_lines(m) -> list[str]:
    if not m.engines:
        return ["engines   none built (artrt build)"]
    lines = ["engines:"]
    for e in m.engines:
        built_for = (f"TensorRT {e.get('tensorrt_version')}, compute capability {e.get('compute_capability')}"
                     if e.get("backend") == "trt" else f"onnxruntime {e.get('onnxruntime_version')}")
        lines.append(f"  {e.get('component', '?'):<24} {e.get('backend', '?'):<9} {e.get('precision', '?'):<5} "
                     f"{e.get('size', 0) / 1e6:9.1f} MB  {e.get('file')}  ({built_for})")
        for tensor, (low, opt, high) in e.get("profile", {}).items():
            lines.append(f"      {tensor:<22} min {low}  opt {opt}  max {high}")
    return lines


def run_bench(args: argparse.Namespace) -> None:
    from . import bench

    bench.run(args)


def run_sample(args: argparse.Namespace) -> None:
    from .sample_tasks import SampleOptions
    from .sampling_job import SampleConfig
    from .sampling_job import run_sample as sample

    if args.actors is not None and args.ray is None:
        raise InputError("--actors only applies with --ray")
    if args.seed < 0 or args.batch < 1 or (args.actors is not None and args.actors < 1):
        raise InputError("--seed must be >= 0, --batch and --actors >= 1")
    options = SampleOptions(
        negative_prompt=args.negative_prompt, steps=args.steps,
        guidance=tuple(args.guidance) if args.guidance else None, switch=args.switch, sampler=args.sampler,
        height=args.height, width=args.width, seed=args.seed, n=args.num_images,
    )
    sample(SampleConfig(
        args.prompts, args.model, args.out, options, batch=args.batch, overwrite=args.overwrite, strict=args.strict,
        backend=args.backend, threads=args.threads, verify=not args.no_verify, ray=args.ray, actors=args.actors,
    ))


def run_demo(args: argparse.Namespace) -> None:
    from .demo import demo_package, upscale
    from .pipeline import GenerationResult, Pipeline

    _check_output(args.output)
    if args.scale < 1:
        raise InputError(f"--scale must be >= 1, got {args.scale}")
    _warn_outside_world(args.prompt)
    package = demo_package(cache=args.cache)
    guidance = args.guidance[0] if args.guidance and len(args.guidance) == 1 else args.guidance
    # The cache is artrt's own export: sizes are checked, the sha256 pass is left to 'artrt info'.
    with Pipeline.load(package, backend=args.backend, threads=args.threads, verify_hashes=False) as pipe:
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


COMMANDS = {"export": run_export, "build": run_build, "generate": run_generate, "info": run_info, "bench": run_bench,
            "sample": run_sample, "demo": run_demo}


def configure_logging(quiet: bool = False) -> None:
    """Progress to stderr as ``artrt: message`` lines (only warnings with --quiet)."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("artrt: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _check_common(args: argparse.Namespace) -> None:
    """Checks shared by every command that has the option."""
    from artrt.engines.ort import max_threads

    from .arguments import check_int

    if getattr(args, "threads", None) is not None:
        check_int("--threads", args.threads, 1, max_threads())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    configure_logging(args.quiet)
    try:
        _check_common(args)
        COMMANDS[args.command](args)
    except ArtrtError as exc:
        print(f"artrt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("artrt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. 'artrt info PKG | head': the reader has what it wanted
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
