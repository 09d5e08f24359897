"""Which ONNX initializer holds each weight a LoRA may target: ``<component>/lora_targets.json``.

A LoRA names its weights by the PyTorch module that owns them (``down_blocks.1.attentions.0.
transformer_blocks.0.attn1.to_q``); the exported graph names them as the exporter did:
Linear weights usually become ``onnx::MatMul_<n>``, transposed by constant folding, and
identical tensors are stored once. So the map is made by value, not by name: before export,
:func:`lora_fingerprints` samples every Linear and Conv weight of the module (64 values at
fixed positions, and the sum and sum of squares of the whole tensor, in fp32 and as fp16);
after export, :func:`write_lora_targets` finds, in each graph of the component, the one
initializer whose values match a weight as stored or transposed, and writes the map:

```
{"format": "artrt-lora-targets", "version": 1, "component": "expert_composition",
 "network": {"class": "UNet2DConditionModel", "layers_per_block": 2},
 "graphs": {"fp32": "expert_composition/model.onnx", "fp16": "expert_composition/model_fp16.onnx"},
 "targets": {"<module>": {"shape": [out, in, ...],
                          "fp32": {"name": "onnx::MatMul_1774", "transposed": true}, "fp16": {...}}},
 "unused": ["<module>", ...]}
```

A module in ``unused`` has no initializer in any graph: the graph does not depend on it (the
last layer of a text encoder read at its penultimate layer), so a LoRA on it changes nothing.
A target whose initializer other modules share lists them in ``shared_with``; the runtime
refuses to change it. The runtime (``artrt.runtime.lora``) reads base weights and replaces
them by these names; it finds the file by this fixed path beside the graphs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from artrt.engines.onnx_weights import read_initializers
from artrt.files import write_atomic
from artrt.runtime.package import file_record, read_manifest, write_manifest

log = logging.getLogger(__name__)

FORMAT = "artrt-lora-targets"
VERSION = 1
FILE_NAME = "lora_targets.json"
SAMPLES = 64  # values compared per weight before the whole-tensor sums
LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
SUM_TOLERANCE = 1e-6  # relative: float64 sums of the same values in another order


@dataclass(frozen=True)
class Fingerprint:
    """What identifies one weight ``W`` among a graph's initializers."""

    shape: tuple[int, ...]
    positions: tuple[np.ndarray, ...]  # multi-index of the sampled values in W
    samples: np.ndarray  # fp32 values at ``positions``
    sums: dict[str, tuple[float, float]]  # "float32" / "float16" -> (sum, sum of squares) in float64


@dataclass(frozen=True)
class LoraFingerprints:
    """Every LoRA-targetable weight of one module, and what the runtime needs of its config."""

    weights: dict[str, Fingerprint]
    network: dict[str, Any]


def lora_targets_path(component: str) -> str:
    """Package path of a component's map: ``<component>/lora_targets.json``."""
    return f"{component}/{FILE_NAME}"


def lora_fingerprints(module: torch.nn.Module) -> LoraFingerprints:
    """Fingerprints of every Linear and Conv weight of ``module`` (a diffusers UNet or transformer,
    or a transformers text encoder), by module name. Call it before the module is exported
    (and before it is converted to fp16 in place); it holds no reference to the weights."""
    weights = {}
    with torch.no_grad():
        for name, layer in module.named_modules():
            if isinstance(layer, LAYERS) and isinstance(getattr(layer, "weight", None), torch.Tensor):
                weights[name] = _fingerprint(layer.weight.detach())
    config = getattr(module, "config", None)
    network: dict[str, Any] = {"class": type(module).__name__}
    if config is not None and hasattr(config, "layers_per_block"):
        layers = config.layers_per_block
        network["layers_per_block"] = int(layers if isinstance(layers, int) else layers[0])
    return LoraFingerprints(weights, network)


def _fingerprint(weight: torch.Tensor) -> Fingerprint:
    w32 = weight.float().cpu()
    # fixed pseudo-random positions: evenly spaced ones can all lie on the diagonal of a square W
    flat = np.sort(np.random.default_rng(0).choice(w32.numel(), min(SAMPLES, w32.numel()), replace=False))
    positions = np.unravel_index(flat, tuple(w32.shape))
    samples = w32.numpy()[positions].copy()
    sums = {}
    for dtype, values in (("float32", w32), ("float16", w32.half())):
        as64 = values.double()
        sums[dtype] = (float(as64.sum()), float((as64 * as64).sum()))
    return Fingerprint(tuple(w32.shape), positions, samples, sums)


def _matches(fp: Fingerprint, values: np.ndarray, transposed: bool) -> bool:
    dtype = values.dtype.name
    if dtype not in fp.sums:
        return False
    positions = fp.positions[::-1] if transposed else fp.positions
    if not np.array_equal(values[positions], fp.samples.astype(dtype)):
        return False
    as64 = values.astype(np.float64)
    total, squares = fp.sums[dtype]
    scale = max(1.0, abs(squares))
    return abs(float(as64.sum()) - total) <= SUM_TOLERANCE * scale and \
        abs(float((as64 * as64).sum()) - squares) <= SUM_TOLERANCE * scale


def match_graph(fingerprints: LoraFingerprints, onnx_path: Path) -> dict[str, list[tuple[str, bool]]]:
    """For each weight, the initializers of ``onnx_path`` that hold it: ``[(name, transposed)]``.
    Each initializer is read once; only those shaped like some weight (or its transpose) are read."""
    by_shape: dict[tuple[int, ...], list[tuple[str, bool]]] = {}
    for module, fp in fingerprints.weights.items():
        by_shape.setdefault(fp.shape, []).append((module, False))
        if len(fp.shape) == 2 and fp.shape[0] != fp.shape[1]:
            by_shape.setdefault(fp.shape[::-1], []).append((module, True))
        elif len(fp.shape) == 2:
            by_shape[fp.shape].append((module, True))
    found: dict[str, list[tuple[str, bool]]] = {module: [] for module in fingerprints.weights}
    for init in read_initializers(onnx_path).values():
        candidates = by_shape.get(init.dims)
        if not candidates or init.dtype is None or init.dtype.kind != "f":
            continue
        values = init.read()
        for module, transposed in candidates:
            held = [name for name, _ in found[module]]
            if init.name not in held and _matches(fingerprints.weights[module], values, transposed):
                found[module].append((init.name, transposed))  # a symmetric W matches both ways: the first
    return found


def targets_document(fingerprints: LoraFingerprints, root: Path, component: str,
                     graphs: Mapping[str, str]) -> dict[str, Any]:
    """The ``lora_targets.json`` document of one component (see the module docstring)."""
    targets: dict[str, dict[str, Any]] = {m: {"shape": list(fp.shape)} for m, fp in fingerprints.weights.items()}
    for precision, relative in graphs.items():
        found = match_graph(fingerprints, root / relative)
        holders: dict[str, list[str]] = {}
        for module, hits in found.items():
            if len(hits) > 1:
                log.warning("%s: %s matches %d initializers of %s (%s); LoRA cannot target it", component, module,
                            len(hits), relative, ", ".join(h[0] for h in hits))
                continue
            if hits:
                name, transposed = hits[0]
                targets[module][precision] = {"name": name, "transposed": transposed}
                holders.setdefault(name, []).append(module)
        for modules in holders.values():
            for module in modules if len(modules) > 1 else ():
                targets[module][precision]["shared_with"] = [m for m in modules if m != module]
        _warn_unmatched(component, relative, fingerprints, found, root / relative, set(holders))
    unused = sorted(m for m, t in targets.items() if not set(t) & set(graphs))
    return {"format": FORMAT, "version": VERSION, "component": component, "network": fingerprints.network,
            "graphs": dict(graphs), "targets": {m: t for m, t in targets.items() if m not in unused},
            "unused": unused}


def _warn_unmatched(component: str, relative: str, fingerprints: LoraFingerprints,
                    found: Mapping[str, list], path: Path, matched: set[str]) -> None:
    """A weight-shaped initializer nothing matched, beside a weight of that shape with no initializer,
    may be a weight the exporter changed: say so (a LoRA on that module would be ignored)."""
    missing = {fingerprints.weights[m].shape for m, hits in found.items() if not hits}
    shapes = missing | {s[::-1] for s in missing if len(s) == 2}
    odd = [i for i in read_initializers(path).values() if i.name not in matched and i.dims in shapes]
    if odd:
        log.warning("%s: %d weight-shaped initializers of %s hold no module's weight (e.g. %s %s); LoRA "
                    "weights of the modules without one will be ignored", component, len(odd), relative,
                    odd[0].name, list(odd[0].dims))


def write_lora_targets(fingerprints: LoraFingerprints, root: Path, component: str,
                       graphs: Mapping[str, Any]) -> str:
    """Write ``<component>/lora_targets.json`` under the package directory ``root`` for the graphs
    just exported (``{precision: path relative to root}``, or the ``(path, errors)`` pairs the
    exporter keeps); returns its path relative to ``root``, to be listed in the manifest's files."""
    paths = {p: (g[0] if isinstance(g, (tuple, list)) else g) for p, g in graphs.items() if g}
    document = targets_document(fingerprints, Path(root), component, paths)
    relative = lora_targets_path(component)
    (Path(root) / component).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(root) / relative, json.dumps(document, indent=1).encode())
    counts = {p: sum(p in t for t in document["targets"].values()) for p in paths}
    log.info("%s: LoRA targets: %s of %d weights (%d unused by the graph)", component,
             ", ".join(f"{n} in {p}" for p, n in counts.items()), len(fingerprints.weights), len(document["unused"]))
    return relative


def add_lora_targets(package: str | Path, modules: Mapping[str, torch.nn.Module]) -> list[str]:
    """Add ``lora_targets.json`` to an exported package from the modules it was exported from
    (``{component: module}``: the UNet of ``expert_composition``, the text encoder of
    ``text_encoder``, ...), and list the files in its manifest. Returns the files written."""
    root = Path(package)
    manifest = read_manifest(root, verify_hashes=False)
    written = []
    for component, module in modules.items():
        comp = manifest.components[component]
        graphs = {"fp32": comp.onnx, "fp16": comp.onnx_fp16}
        written.append(write_lora_targets(lora_fingerprints(module), root, component, graphs))
    files = [f for f in manifest.files if f.path not in written] + [file_record(root, f) for f in written]
    write_manifest(root, replace(manifest, files=tuple(files)))
    return written


__all__ = ["LoraFingerprints", "add_lora_targets", "lora_fingerprints", "lora_targets_path",
           "match_graph", "targets_document", "write_lora_targets"]
