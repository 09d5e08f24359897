"""``artrt export``: diffusers folders to an artrt package."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from artrt.errors import InputError
from artrt.runtime.package import PRECISIONS, TARGETS

log = logging.getLogger("artrt")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export diffusers folders to an artrt package (ONNX + tokenizers + artrt.json)",
        description="Export two experts, their text encoder(s) and the VAE decoder of local diffusers "
        "folders to ONNX, check every graph against PyTorch and write a package directory: an SDXL base + "
        "refiner (--base, --refiner), a pipeline + a second UNet (--base, --detail-unet), or a Wan 2.2 "
        "WanPipeline folder, whose transformer and transformer_2 are the experts (--base alone; "
        "--detail-transformer for a one-expert Wan folder + a second transformer). "
        "Needs the 'export' extra (torch, diffusers, transformers). --targets and --precision choose "
        "which graphs the package holds: the default runs on every backend; for SDXL on a GPU only, "
        "--targets cuda writes about a third of the bytes (fp16 graphs only).",
    )
    p.add_argument("--base", required=True, type=Path, help="diffusers pipeline folder (composition expert; "
                   "a WanPipeline folder holds both experts)")
    second = p.add_mutually_exclusive_group()
    second.add_argument("--refiner", type=Path, help="SDXL refiner pipeline folder (detail expert)")
    second.add_argument("--detail-unet", type=Path, help="UNet folder with the base UNet's config (detail expert)")
    p.add_argument("--out", required=True, type=Path, help="package directory to write")
    second.add_argument("--detail-transformer", type=Path, help="WanTransformer3DModel folder with the "
                        "--base transformer's config (detail expert of a one-expert Wan folder)")
    p.add_argument("--switch", type=float, help="default switch recorded: for UNet pairs the fraction of the "
                   "schedule run by the composition expert (diffusers' denoising_end; default 0.8); for Wan the "
                   "boundary_ratio (default: the folder's)")
    p.add_argument("--steps", type=int, default=30, help="default number of steps recorded (default 30)")
    p.add_argument("--guidance", type=float, nargs="+", metavar="G", help="default guidance recorded: one "
                   "value or one per expert (default 5.0; Wan: 4.0 3.0, Wan 2.2 T2V-A14B's pair)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--targets", default=",".join(TARGETS), metavar="T[,T]",
                   help="where the package runs, comma-separated: cpu (--backend ort-cpu: fp32 graphs and "
                   "their CPU-optimized versions) and/or cuda (--backend trt / ort-cuda: graphs of --precision, "
                   "which artrt build turns into engines); default cpu,cuda (runs everywhere). "
                   "--targets cuda leaves out the CPU graphs and, at --precision fp16, every fp32 graph but the "
                   "VAE decoder's (unless --fp16-vae): for SDXL about a third of the default's bytes, but ort-cpu "
                   "cannot run it")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="precision of the cuda target's graphs: fp16 (default; the network runs in fp16, latents "
                   "and the sampler update stay fp32), fp32, or both (build engines of either). The cpu target "
                   "always writes fp32 graphs")
    p.add_argument("--fp16-vae", action="store_true", help="also write an fp16 VAE decoder for the cuda target "
                   "(only for an fp16-safe VAE: SDXL's original VAE overflows in fp16; without this GPU backends "
                   "decode with an fp32 decoder graph)")


def run(args: argparse.Namespace) -> None:
    try:
        from artrt.export import check_output_dir, export_package, load_same_arch, load_sdxl_ensemble
        from artrt.export.package_export import check_graphs
        from artrt.export.wan_package import is_wan_folder, load_wan
    except ImportError as exc:
        raise InputError(f"export needs the 'export' extra (pip install 'artrt[export]'): {exc}") from None
    for folder in (args.base, args.refiner, args.detail_unet, args.detail_transformer):
        if folder is not None and not folder.is_dir():
            raise InputError(f"folder not found: {folder}")
    check_graphs(args.targets, args.precision, args.fp16_vae)  # before loading any weights
    check_output_dir(args.out, args.overwrite)
    wan = is_wan_folder(args.base)
    if wan and (args.refiner or args.detail_unet):
        raise InputError(f"{args.base} is a WanPipeline folder: it holds both experts (or add "
                         "--detail-transformer); --refiner and --detail-unet are for UNet pipelines")
    if not wan and args.detail_transformer:
        raise InputError("--detail-transformer goes with a WanPipeline --base folder")
    if not wan and not (args.refiner or args.detail_unet):
        raise InputError(f"{args.base} is not a WanPipeline folder: give the detail expert with --refiner "
                         "(SDXL refiner pipeline) or --detail-unet (UNet folder)")
    if wan:
        sources = load_wan(args.base, args.detail_transformer)
    elif args.refiner is not None:
        sources = load_sdxl_ensemble(args.base, args.refiner)
    else:
        sources = load_same_arch(args.base, args.detail_unet)
    export_package(sources, args.out, switch=args.switch, steps=args.steps, guidance=args.guidance,
                   overwrite=args.overwrite, targets=args.targets, precision=args.precision,
                   fp16_vae=args.fp16_vae)
