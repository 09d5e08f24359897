"""``artrt export``: diffusers folders to an artrt package."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from artrt.errors import InputError

log = logging.getLogger("artrt")


PRECISIONS = ("fp32", "fp16")


def add_parser(sub: argparse._SubParsersAction) -> None:
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


def run(args: argparse.Namespace) -> None:
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
