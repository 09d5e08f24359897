"""Write a package: every graph exported to ONNX and checked, tokenizers, manifest."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import artrt
from artrt.errors import InputError, OutputError
from artrt.runtime.arguments import check_guidance, check_steps, check_switch
from artrt.runtime.package import (
    FORMAT_NAME,
    MANIFEST_NAME,
    PRECISIONS,
    TARGETS,
    Component,
    Defaults,
    Expert,
    Manifest,
    TokenizerInfo,
    file_record,
    graph_sizes,
    write_manifest,
)
from artrt.runtime.video import WAN_FAMILY

from .components import export_decoder, export_expert, export_text_encoder, latent_shape
from .cpu_optimize import add_cpu_graphs
from .sources import ModelSources
from .wan_package import DEFAULT_GUIDANCE, default_switch, write_wan_graphs
from .wan_package import DEFAULT_SIZE as WAN_DEFAULT_SIZE
from .wan_package import default_size as wan_default_size
from .weights import LazyModule, check_memory, weight_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphChoice:
    """Which graphs a package holds, from the export's ``targets`` and ``precision`` (checked by
    :func:`check_graphs`). ``precision`` is that of the graphs written for the cuda target."""

    targets: tuple[str, ...]
    precision: str
    fp16_vae: bool

    def precisions(self, kind: str) -> tuple[str, ...]:
        """The graphs a component of ``kind`` gets: ``fp16`` (``model_fp16.onnx``) for the cuda
        target at fp16 or both (the VAE decoder only with ``fp16_vae``); ``fp32`` (``model.onnx``)
        for the cpu target, for cuda at fp32 or both, and for a cuda decoder that has no fp16 graph."""
        cuda = "cuda" in self.targets
        fp16 = cuda and self.precision != "fp32" and (kind != "vae_decoder" or self.fp16_vae)
        fp32 = "cpu" in self.targets or self.precision != "fp16" or not fp16
        return tuple(p for p, wanted in (("fp32", fp32), ("fp16", fp16)) if wanted)

    @property
    def cpu(self) -> bool:
        """Whether CPU-optimized graphs (``model_cpu.onnx``) are written."""
        return "cpu" in self.targets


def check_graphs(targets: Sequence[str] | str = TARGETS, precision: str | None = None,
                 fp16_vae: bool = False) -> GraphChoice:
    """Validate the graph choice of an export (``targets``: a sequence or comma-separated text);
    refuses with one :class:`InputError` line. ``precision`` None: fp16 for the cuda target."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise InputError(f"unknown target(s) {', '.join(map(repr, unknown)) or 'none given'}; "
                         f"--targets is a comma-separated subset of {','.join(TARGETS)}")
    chosen = tuple(t for t in TARGETS if t in names)
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if "cuda" not in chosen and precision in ("fp16", "both"):
        raise InputError("--precision applies to the cuda target's graphs; --targets cpu writes fp32 graphs only")
    choice = GraphChoice(chosen, precision or ("fp16" if "cuda" in chosen else "fp32"), bool(fp16_vae))
    if fp16_vae and "fp16" not in choice.precisions("vae_decoder"):
        raise InputError("--fp16-vae needs fp16 graphs: --targets with cuda and --precision fp16 or both")
    return choice


def export_package(
    sources: ModelSources, out: str | Path, switch: float | None = None, steps: int = 30,
    guidance: float | Sequence[float] | None = None, overwrite: bool = False, targets: Sequence[str] | str = TARGETS,
    precision: str | None = None, fp16_vae: bool = False,
) -> Manifest:
    """Export ``sources`` into the package directory ``out`` and return its manifest.

    ``targets`` says where the package runs: ``cpu`` (ONNX Runtime CPU) writes every component's
    fp32 graph (``model.onnx``) and the CPU-optimized graphs (``model_cpu.onnx``); ``cuda`` (the
    GPU backends, which build engines from them) writes graphs of ``precision``: ``fp16``
    (default; ``model_fp16.onnx``), ``fp32`` or ``both``. The VAE decoder gets an fp16 graph only
    when ``fp16_vae`` says it is fp16-safe (SDXL's original VAE overflows in fp16), else the cuda
    target decodes with its fp32 graph. See :meth:`GraphChoice.precisions`; the default (cpu and
    cuda, fp16) runs on every backend, ``targets=("cuda",)`` is the lean GPU-only package (about
    a third of the bytes). The package is assembled in
    ``out.partial`` and renamed into place at the end, so an interrupted export never
    leaves a half-written package behind; a failed one (e.g. a full disk: one
    :class:`OutputError` line) deletes ``out.partial`` and leaves ``out`` as it was. ``out`` is
    checked first (see :func:`check_output_dir`): ``overwrite`` replaces only an artrt package or
    an empty directory; a work folder that cannot be made is one :class:`OutputError` line. Models
    that are :class:`LazyModule` (what ``load_*`` return) are loaded one at a time, so memory is
    set by the largest component (docs/export-scale.md).
    """
    graphs = check_graphs(targets, precision, fp16_vae)
    out = check_output_dir(out, overwrite)
    switch, guidance = _family_defaults(sources, switch, guidance)
    if sources.family == WAN_FAMILY and fp16_vae:
        raise InputError("the Wan VAE decoder is exported in fp32 (as Wan runs it): drop --fp16-vae")
    switch, steps = check_switch(switch), check_steps(steps)
    work = _beside(out, ".partial")
    try:
        if work.exists():
            log.warning("removing %s, left by an interrupted export", work)
            shutil.rmtree(work)
        work.mkdir(parents=True)
    except OSError as exc:  # e.g. --out /proc/pkg: a parent that looks writable but is not
        raise OutputError(f"cannot create {exc.filename or work}: {exc.strerror or exc}; "
                          "choose another --out") from None
    started = time.perf_counter()
    try:
        _check_resources(sources, work, graphs)
        manifest = _write_package(sources, work, graphs, switch, steps, guidance)
    except BaseException as exc:  # out is left as it was; what was written goes (a full disk needs the space)
        shutil.rmtree(work, ignore_errors=True)
        if not isinstance(exc, (OutputError, OSError)):
            raise
        reason = exc if isinstance(exc, OutputError) else f"cannot write {exc.filename or work}: {exc.strerror or exc}"
        raise OutputError(f"{reason}; the export stopped, removed {work.name} and left {out} as it was: "
                          "make room (or fix the cause) and run it again") from None
    _move_into_place(work, out, overwrite)
    log.info("package written to %s in %.1f s: %.1f MB (--targets %s --precision %s)", out,
             time.perf_counter() - started, sum(f.size for f in manifest.files) / 1e6,
             ",".join(graphs.targets), graphs.precision)
    for name in manifest.components:
        sizes = graph_sizes(manifest, name)
        log.info("  %-24s %9.1f MB  %s", name, sum(sizes.values()) / 1e6,
                 ", ".join(f"{kind} {size / 1e6:.1f} MB" for kind, size in sizes.items()))
    return manifest


def _family_defaults(sources: ModelSources, switch: Any, guidance: Any) -> tuple[float, float | list[float]]:
    """The defaults a package records when the export does not set them: Wan's boundary_ratio from
    its folder and Wan 2.2's guidance pair; 0.8 and 5.0 for UNet pairs. ``guidance``: one value or one
    per expert (recorded as a list)."""
    wan = sources.family == WAN_FAMILY
    if switch is None:
        switch = default_switch(sources) if wan else 0.8
    if guidance is None:
        guidance = list(DEFAULT_GUIDANCE) if wan else 5.0
    values = check_guidance(guidance, len(sources.experts))
    return switch, values[0] if len(set(values)) == 1 else list(values)


@dataclass
class _Written:
    """What one family's exporter wrote into the work directory, and the layout it implies."""

    components: dict[str, Component]
    tokenizers: dict[str, TokenizerInfo]
    experts: list[Expert]
    files: list[str]
    latent_channels: int
    size_multiple: int
    decoder: str | None
    size: tuple[int, int]  # default height, width
    max_latent: tuple[int, ...] | None = None  # Manifest.max_latent


def _write_package(sources: ModelSources, work: Path, graphs: GraphChoice, switch: float, steps: int,
                   guidance: float | list[float]) -> Manifest:
    """Export every component into ``work``, one at a time, and write its manifest."""
    write = _write_wan_graphs if sources.family == WAN_FAMILY else _write_unet_graphs
    w = write(sources, work, graphs)
    manifest = Manifest(
        family=sources.family,
        components=w.components,
        tokenizers=w.tokenizers,
        schedule=sources.schedule.to_dict(),
        experts=tuple(w.experts),
        defaults=Defaults(steps, guidance, switch, sources.default_sampler, *w.size),
        latent_channels=w.latent_channels,
        latent_scale=sources.latent_scale,
        size_multiple=w.size_multiple,
        decoder=w.decoder,
        files=tuple(file_record(work, f) for f in w.files),
        source=sources.info,
        artrt_version=artrt.__version__,
        targets=graphs.targets,
        precision=graphs.precision,
        max_latent=w.max_latent,
    )
    if graphs.cpu:
        manifest = add_cpu_graphs(work, manifest)  # ort-cpu graphs with fused attention
    write_manifest(work, manifest)
    return manifest


def _write_unet_graphs(sources: ModelSources, work: Path, graphs: GraphChoice) -> _Written:
    """UNet pairs: every text encoder, the two fused-step experts, the VAE decoder."""
    components: dict[str, Component] = {}
    tokenizers: dict[str, TokenizerInfo] = {}
    files: list[str] = []
    for enc in sources.text_encoders.values():
        comp, tok, written = export_text_encoder(enc, work, graphs.precisions("text_encoder"))
        components[comp.name], tokenizers[enc.name] = comp, tok
        files += written
    latent = latent_shape(sources)
    experts = []
    for expert in sources.experts:
        comp, written = export_expert(expert, sources, work, latent, graphs.precisions("fused_step"))
        components[comp.name] = comp
        files += written
        experts.append(Expert(expert.name, comp.name, expert.conditioning))
    decoder = None
    if sources.vae is not None:
        comp, written = export_decoder(sources.vae, work, latent, graphs.precisions("vae_decoder"))
        components[comp.name], decoder = comp, comp.name
        files += written
    config, patch = sources.experts[0].unet.config, sources.experts[0].patch
    size = int(config.sample_size) * sources.latent_scale * patch
    return _Written(components, tokenizers, experts, files, int(config.in_channels) // patch**2,
                    sources.latent_scale * patch * 2 ** (len(config.block_out_channels) - 1), decoder, (size, size))


def _write_wan_graphs(sources: ModelSources, work: Path, graphs: GraphChoice) -> _Written:
    """The Wan family: UMT5, two flow-step experts, the VAE's first and chunk decoders (wan_package)."""
    components, experts, layout, files = write_wan_graphs(sources, work, graphs)
    size = wan_default_size(WAN_DEFAULT_SIZE, layout["max_latent"], sources.latent_scale, layout["size_multiple"])
    return _Written(components, layout["tokenizers"], experts, files, layout["latent_channels"],
                    layout["size_multiple"], layout["decoder"], size, layout["max_latent"])


def _check_resources(sources: ModelSources, work: Path, graphs: GraphChoice) -> None:
    """Refuse, before loading anything, an export that cannot fit: the largest component's fp32
    weights in memory (:func:`check_memory`; each load checks again; also when only fp16 graphs
    are written, since the fp32 module is the reference), and on the disk of ``work`` the graphs
    chosen (fp32 weights for an fp32 graph, half of that for an fp16 one) and the exporter's scratch
    copies of the largest component's graphs (the VAE's encoder, not exported, makes it an
    overestimate)."""
    models = [(enc.model, "text_encoder") for enc in sources.text_encoders.values()]
    models += [(e.unet, "fused_step") for e in sources.experts] + [(sources.vae, "vae_decoder")]
    sizes = [weight_bytes(m) for m, _ in models]
    largest = max((m for m, _ in models), key=weight_bytes)
    if isinstance(largest, LazyModule):
        check_memory(str(largest.folder), largest.fp32_bytes)
    written = [size * sum({"fp32": 1.0, "fp16": 0.5}[p] for p in graphs.precisions(kind))
               for size, (_, kind) in zip(sizes, models)]
    need = sum(written) + max(written)
    free = shutil.disk_usage(work).free
    if need > free:
        raise OutputError(f"the package needs about {need / 1e9:.1f} GB of disk while it is written, "
                          f"{free / 1e9:.1f} GB are free in {work.parent}")
    log.info("exporting %d components (%.2f GB of fp32 weights, the largest %.2f GB) for --targets %s "
             "--precision %s", len(sizes) - (sources.vae is None), sum(sizes) / 1e9, max(sizes) / 1e9,
             ",".join(graphs.targets), graphs.precision)


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
        if not _replaceable(out):  # the final answer, with or without --overwrite
            raise InputError(f"{out} is neither an artrt package ({MANIFEST_NAME}) nor empty, so export will not "
                             "replace it (not even with --overwrite); choose another --out or empty it yourself")
        if not overwrite:
            raise InputError(f"{out} already exists; pass --overwrite to replace it")
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


__all__ = ["GraphChoice", "check_graphs", "check_output_dir", "export_package"]
