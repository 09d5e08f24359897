"""``artrt info``: describe a package."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

from artrt.runtime.package import graph_sizes

log = logging.getLogger("artrt")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a package", description="Validate a package and print "
                       "its components, experts, defaults and export checks.")
    p.add_argument("model", type=Path, help="package directory")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks of the package files")


def run(args: argparse.Namespace) -> None:
    from artrt.runtime.package import package_root, read_manifest

    m = read_manifest(args.model, verify_hashes=not args.no_verify)
    d = m.defaults
    lines = [
        f"package   {package_root(args.model)}  (family {m.family}, artrt {m.artrt_version})",
        f"defaults  steps {d.steps}, guidance {d.guidance}, switch {d.switch}, sampler {d.sampler}, "
        f"size {d.width}x{d.height} (multiple of {m.size_multiple})",
        f"schedule  {m.schedule}",
        f"runs on   {_targets(m)}",
    ]
    if m.max_latent is not None:  # the experts' position tables (Wan's RoPE) bound sizes and frames
        frames, height, width = m.max_latent
        lines.append(f"limits    at most {width * m.latent_scale}x{height * m.latent_scale} px, "
                     f"{(frames - 1) * 4 + 1} frames")
    lines.append("experts:")
    lines += [f"  {e.name:<12} {e.component}  text: {', '.join(e.conditioning.text_encoders)}"
              + (f"  time ids: {e.conditioning.time_ids}" if e.conditioning.time_ids else "") for e in m.experts]
    lines.append("components:")
    sizes = {f.path: f.size for f in m.files}
    for c in m.components.values():
        graphs = graph_sizes(m, c.name)
        lines.append(f"  {c.name:<24} {c.kind:<13} {sum(graphs.values()) / 1e6:9.1f} MB  "
                     + ", ".join(f"{label} {size / 1e6:.1f} MB" for label, size in graphs.items()))
        checks = []
        if c.onnx is not None:
            checks.append(("fp32", c.export_check, "max |ONNX - PyTorch|"))
        if c.onnx_fp16 is not None:
            checks.append(("fp16", c.export_check_fp16, "max |ONNX fp16 - PyTorch fp32|"))
        for label, check, what in checks:
            text = ", ".join(f"{k} {v:.1e}" for k, v in check.items())
            lines.append(f"      {what} ({label}): {text or 'n/a'}")
        for t in (*c.inputs, *c.outputs):
            lines.append(f"      {t.name:<22} {t.dtype:<8} {_shape(t.shape)}")
    lines += _engine_lines(m)
    total, engines = sum(sizes.values()), sum(e.get("size", 0) for e in m.engines)
    lines.append(f"size      {total / 1e6:.1f} MB: graphs {(total - engines) / 1e6:.1f} MB, "
                 f"engines {engines / 1e6:.1f} MB")
    lines.append(f"files     {len(m.files)}, "
                 f"{'sha256 verified' if not args.no_verify else 'sizes checked'}")
    print("\n".join(lines))


def _shape(shape: Any) -> str:
    """``[batch, 77, 2048]``: named dimensions as named at export; the names an exporter made up
    for a dimension it could not name (``Mulhidden_states_dim_1``, ``unk__3``) as ``?``."""
    dims = [d if isinstance(d, int) or not _AUTO_DIM.search(d) else "?" for d in shape]
    return "[" + ", ".join(str(d) for d in dims) + "]"


_AUTO_DIM = re.compile(r"_dim_\d+$|^unk__\d+$")


def _targets(m: Any) -> str:
    """Where the package's graphs run: ``cpu`` when every component has a graph for ``ort-cpu``,
    ``cuda`` always (GPU backends build from the fp16 graph, else the fp32 one), and the export's
    ``--targets`` / ``--precision`` when the manifest records them (older packages do not)."""
    fp32 = [c.name for c in m.components.values() if c.onnx_fp16 is None]
    cuda = "fp32" if len(fp32) == len(m.components) else f"fp16, {', '.join(fp32)} fp32" if fp32 else "fp16"
    if all(c.cpu_graph is not None for c in m.components.values()):
        text = f"cpu, cuda ({cuda})"
    else:
        text = f"cuda ({cuda}); no CPU graphs: ort-cpu cannot run it"
    if m.targets:
        text += f"  (exported with --targets {','.join(m.targets)} --precision {m.precision}"
        text += "; GPU backends build from those graphs)" if "cuda" not in m.targets else ")"
    return text


def _engine_lines(m: Any) -> list[str]:
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
