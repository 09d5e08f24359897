"""Write a package: every graph exported to ONNX and checked, tokenizers, manifest."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import artrt
from artrt.errors import InputError, OutputError
from artrt.runtime.arguments import check_float, check_steps, check_switch
from artrt.runtime.package import (
    FORMAT_NAME,
    MANIFEST_NAME,
    Component,
    Defaults,
    Expert,
    Manifest,
    TokenizerInfo,
    file_record,
    write_manifest,
)

from .components import export_decoder, export_expert, export_text_encoder, latent_shape
from .cpu_optimize import add_cpu_graphs
from .sources import ModelSources
from .weights import LazyModule, check_memory, weight_bytes

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")


def export_package(
    sources: ModelSources, out: str | Path, switch: float = 0.8, steps: int = 30,
    guidance: float = 5.0, overwrite: bool = False, precisions: Sequence[str] = PRECISIONS,
    fp16_vae: bool = False,
) -> Manifest:
    """Export ``sources`` into the package directory ``out`` and return its manifest.

    Every component gets an fp32 graph (``model.onnx``); with ``"fp16"`` in
    ``precisions`` the text encoders and experts also get a half-precision graph
    (``model_fp16.onnx``), and so does the VAE decoder when ``fp16_vae`` says it is
    fp16-safe (SDXL's original VAE overflows in fp16). The package is assembled in
    ``out.partial`` and renamed into place at the end, so an interrupted export never
    leaves a half-written package behind; a failed one (e.g. a full disk: one
    :class:`OutputError` line) deletes ``out.partial`` and leaves ``out`` as it was. ``out`` is
    checked first (see :func:`check_output_dir`): ``overwrite`` replaces only an artrt package or
    an empty directory. Models that are :class:`LazyModule` (what ``load_*`` return) are loaded
    one at a time, so memory is set by the largest component (docs/export-scale.md).
    """
    out = check_output_dir(out, overwrite)
    fp16 = _check_precisions(precisions, fp16_vae)
    switch, steps, guidance = check_switch(switch), check_steps(steps), check_float("guidance", guidance)
    work = _beside(out, ".partial")
    if work.exists():
        log.warning("removing %s, left by an interrupted export", work)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    started = time.perf_counter()
    try:
        _check_resources(sources, work, fp16, fp16_vae)
        manifest = _write_package(sources, work, fp16, fp16_vae, switch, steps, guidance)
    except BaseException as exc:  # out is left as it was; what was written goes (a full disk needs the space)
        shutil.rmtree(work, ignore_errors=True)
        if not isinstance(exc, (OutputError, OSError)):
            raise
        reason = exc if isinstance(exc, OutputError) else f"cannot write {exc.filename or work}: {exc.strerror or exc}"
        raise OutputError(f"{reason}; the export stopped, removed {work.name} and left {out} as it was: "
                          "make room (or fix the cause) and run it again") from None
    _move_into_place(work, out, overwrite)
    log.info("package written to %s in %.1f s", out, time.perf_counter() - started)
    return manifest


def _write_package(sources: ModelSources, work: Path, fp16: bool, fp16_vae: bool, switch: float, steps: int,
                   guidance: float) -> Manifest:
    """Export every component into ``work``, one at a time, and write its manifest."""
    components: dict[str, Component] = {}
    tokenizers: dict[str, TokenizerInfo] = {}
    files: list[str] = []
    for enc in sources.text_encoders.values():
        comp, tok, written = export_text_encoder(enc, work, fp16)
        components[comp.name], tokenizers[enc.name] = comp, tok
        files += written
    latent = latent_shape(sources)
    experts = []
    for expert in sources.experts:
        comp, written = export_expert(expert, sources, work, latent, fp16)
        components[comp.name] = comp
        files += written
        experts.append(Expert(expert.name, comp.name, expert.conditioning))
    decoder = None
    if sources.vae is not None:
        comp, written = export_decoder(sources.vae, work, latent, fp16 and fp16_vae)
        components[comp.name], decoder = comp, comp.name
        files += written
    config, patch = sources.experts[0].unet.config, sources.experts[0].patch
    default_size = int(config.sample_size) * sources.latent_scale * patch
    manifest = Manifest(
        family=sources.family,
        components=components,
        tokenizers=tokenizers,
        schedule=sources.schedule.to_dict(),
        experts=tuple(experts),
        defaults=Defaults(steps, guidance, switch, sources.default_sampler, default_size, default_size),
        latent_channels=int(config.in_channels) // patch**2,
        latent_scale=sources.latent_scale,
        size_multiple=sources.latent_scale * patch * 2 ** (len(config.block_out_channels) - 1),
        decoder=decoder,
        files=tuple(file_record(work, f) for f in files),
        source=sources.info,
        artrt_version=artrt.__version__,
    )
    manifest = add_cpu_graphs(work, manifest)  # ort-cpu graphs with fused attention
    write_manifest(work, manifest)
    return manifest


def _check_resources(sources: ModelSources, work: Path, fp16: bool, fp16_vae: bool) -> None:
    """Refuse, before loading anything, an export that cannot fit: the largest component's fp32
    weights in memory (:func:`check_memory`; each load checks again), and on the disk of ``work``
    the fp32 weights of every component, half of that again for fp16 graphs and the exporter's
    scratch copies of the largest component's two graphs (the VAE's encoder, not exported, makes
    it an overestimate)."""
    models = [enc.model for enc in sources.text_encoders.values()] + [e.unet for e in sources.experts]
    sizes = [weight_bytes(m) for m in models]
    vae = weight_bytes(sources.vae)
    largest = max([*models, sources.vae], key=weight_bytes)
    if isinstance(largest, LazyModule):
        check_memory(str(largest.folder), largest.fp32_bytes)
    need = sum(sizes) * (1.5 if fp16 else 1) + vae * (1.5 if fp16_vae else 1) + 1.5 * max([*sizes, vae])
    free = shutil.disk_usage(work).free
    if need > free:
        raise OutputError(f"the package needs about {need / 1e9:.1f} GB of disk while it is written, "
                          f"{free / 1e9:.1f} GB are free in {work.parent}")
    log.info("exporting %d components (%.2f GB of fp32 weights, the largest %.2f GB)",
             len(sizes) + (sources.vae is not None), (sum(sizes) + vae) / 1e9, max([*sizes, vae]) / 1e9)


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an output directory that an export could not write or must not delete.

    Deletes and writes nothing, so callers can run it before any slow work; returns ``out``
    made absolute. ``out`` must not exist or, with ``overwrite``, be an artrt package or an
    empty directory: anything else may hold the user's own files. Its nearest existing
    parent must be a writable directory. ``OUT.partial`` (where the package is assembled)
    and ``OUT.old`` (where the replaced package waits to be deleted) may only be leftovers
    of an interrupted export: directories, ``OUT.old`` also a package or empty.
    """
    out = Path(os.path.abspath(out))
    if out.is_symlink():
        raise InputError(f"{out} is a symbolic link; give the directory itself or another --out")
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out} is a file, not a package directory; choose another --out")
        if not overwrite:
            raise InputError(f"{out} already exists; pass --overwrite to replace it")
        if not _replaceable(out):
            raise InputError(f"{out} is neither an artrt package ({MANIFEST_NAME}) nor empty, so --overwrite "
                             "will not delete it; choose another --out or empty it yourself")
    parent = out.parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"cannot create {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot create {out}: directory {parent} is not writable")
    partial, old = _beside(out, ".partial"), _beside(out, ".old")
    if os.path.lexists(partial) and (partial.is_symlink() or not partial.is_dir()):
        raise InputError(f"{partial} is not an interrupted export's directory but export needs that name; "
                         "move it away or choose another --out")
    if os.path.lexists(old) and not _replaceable(old):
        raise InputError(f"{old} is neither an artrt package nor empty but export needs that name; "
                         "move it away or choose another --out")
    return out


def _beside(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)


def _replaceable(path: Path) -> bool:
    """Whether ``path`` is a real directory that is empty or holds an artrt package (any
    format version; files are not verified)."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        if not any(path.iterdir()):
            return True
        data = json.loads((path / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT_NAME and {
        "format_version", "components", "experts", "files"} <= data.keys()


def _move_into_place(work: Path, out: Path, overwrite: bool) -> None:
    """Rename ``work`` to ``out``. What ``out`` held is first renamed to ``OUT.old`` and
    deleted last, so a failure in between leaves the old or the new package in place."""
    check_output_dir(out, overwrite)  # out may have changed during the export
    old = _beside(out, ".old")
    if os.path.lexists(old):
        log.warning("removing %s, left by an interrupted export", old)
        shutil.rmtree(old)
    moved = os.path.lexists(out)
    if moved:
        out.rename(old)
    try:
        work.rename(out)
    except OSError as exc:
        if moved:
            old.rename(out)
        raise InputError(f"cannot move the new package into {out} ({exc}); it is in {work}") from None
    if moved:
        shutil.rmtree(old, ignore_errors=True)
        if os.path.lexists(old):
            log.warning("could not delete the replaced package %s; delete it yourself", old)


def _check_precisions(precisions: Sequence[str], fp16_vae: bool) -> bool:
    """Validate ``precisions``; returns whether fp16 graphs are wanted."""
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise InputError(f"unknown precision(s) {', '.join(unknown)}; choose from {', '.join(PRECISIONS)}")
    if "fp32" not in precisions:
        raise InputError("fp32 graphs are always exported (ORT CPU runs them): use --precision fp32 [fp16]")
    if fp16_vae and "fp16" not in precisions:
        raise InputError("--fp16-vae needs fp16 in --precision")
    return "fp16" in precisions


__all__ = ["check_output_dir", "export_package"]
