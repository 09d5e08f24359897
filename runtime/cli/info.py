"""``artrt info``: describe a package."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from artrt.runtime.package import graph_bytes

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
        "experts:",
    ]
    lines += [f"  {e.name:<12} {e.component}  text: {', '.join(e.conditioning.text_encoders)}"
              f"  time ids: {e.conditioning.time_ids}" for e in m.experts]
    lines.append("components:")
    sizes = {f.path: f.size for f in m.files}
    for c in m.components.values():
        graphs = graph_sizes(m, c.name)
        lines.append(f"  {c.name:<24} {c.kind:<13} {sum(graphs.values()) / 1e6:9.1f} MB  "
                     + ", ".join(f"{label} {size / 1e6:.1f} MB" for label, size in graphs.items()))
        checks = [("fp32", c.export_check, "max |ONNX - PyTorch|")]
        if c.onnx_fp16 is not None:
            checks.append(("fp16", c.export_check_fp16, "max |ONNX fp16 - PyTorch fp32|"))
        for label, check, what in checks:
            text = ", ".join(f"{k} {v:.1e}" for k, v in check.items())
            lines.append(f"      {what} ({label}): {text or 'n/a'}")
        for t in (*c.inputs, *c.outputs):
            lines.append(f"      {t.name:<22} {t.dtype:<8} {list(t.shape)}")
    lines += _engine_lines(m)
    total, engines = sum(sizes.values()), sum(e.get("size", 0) for e in m.engines)
    lines.append(f"size      {total / 1e6:.1f} MB: graphs {(total - engines) / 1e6:.1f} MB, "
                 f"engines {engines / 1e6:.1f} MB")
    lines.append(f"files     {len(m.files)}, "
                 f"{'sha256 verified' if not args.no_verify else 'sizes checked'}")
    print("\n".join(lines))


def graph_sizes(m: Any, component: str) -> dict[str, int]:
    """Bytes of each graph the package holds for ``component`` (external data included), by kind."""
    c = m.components[component]
    kinds = {"fp32": c.onnx, "fp16": c.onnx_fp16, "cpu": c.onnx_cpu}
    return {label: graph_bytes(m, path) for label, path in kinds.items() if path is not None}


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
