"""Lean packages: one graph per component, weights stored in fp16 and computed in fp32.

An exported package holds, per component, the plain fp32 graph (``onnx``) and often a copy
rewritten for ONNX Runtime CPU (``onnx_cpu``) and an fp16 graph (``onnx_fp16``), each with
its own copy of the weights. :func:`lean_package` writes a package with only the plain
graph of each component, its large fp32 initializers stored as float16 and followed by a
``Cast`` to float32 (:func:`store_weights_fp16`). Compute stays fp32 on every backend:
ONNX Runtime folds the casts into fp32 constants when it creates the session, so the lean
graph runs as fast as the fp32 one and, where the weights were already fp16 values (the demo
experts, trained and saved in fp16), computes exactly the same numbers.

Imports no torch (onnx and numpy only); ships the demo model (``artrt.demo`` ``package/``).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from artrt.errors import InputError
from artrt.runtime.package import Manifest, file_record, read_manifest, write_manifest

log = logging.getLogger(__name__)

MIN_ELEMENTS = 1024  # smaller initializers (biases, norms, shape constants) stay fp32: no gain
FP16_MAX = float(np.finfo(np.float16).max)
GRAPH_FILE = "model.onnx"


@dataclass(frozen=True)
class Fp16Storage:
    """What :func:`store_weights_fp16` did to one graph."""

    tensors: int  # initializers now stored as float16
    elements: int  # their elements
    lossless: int  # of those tensors, how many were exactly representable in float16
    max_abs_rounding: float  # the largest change of a weight by the rounding (0.0: lossless)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def store_weights_fp16(model: Any, min_elements: int = MIN_ELEMENTS) -> Fp16Storage:
    """Rewrite ``model`` (an ``onnx.ModelProto``, in place): every float32 initializer of at least
    ``min_elements`` values within float16's range becomes a float16 initializer read through a
    ``Cast`` to float32 under the original name, so no consumer changes."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {
        o for n in graph.node for o in n.output}
    graph_inputs = {v.name for v in graph.input}
    casts, tensors, elements, lossless, rounding = [], 0, 0, 0, 0.0
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or init.name in graph_inputs:
            continue  # an initializer that is also a graph input may be overridden by the caller
        value = numpy_helper.to_array(init)
        if value.size < min_elements or not np.all(np.isfinite(value)) or np.abs(value).max() > FP16_MAX:
            continue
        half = value.astype(np.float16)
        change = float(np.abs(half.astype(np.float32) - value).max())
        stored = _unique(f"{init.name}_fp16", names)
        names.add(stored)
        casts.append(helper.make_node("Cast", [stored], [init.name], name=_unique(f"{init.name}_cast", names),
                                      to=TensorProto.FLOAT))
        init.CopyFrom(numpy_helper.from_array(half, stored))
        tensors, elements, lossless = tensors + 1, elements + value.size, lossless + (change == 0.0)
        rounding = max(rounding, change)
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return Fp16Storage(tensors, elements, lossless, rounding)


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def lean_package(src: str | Path, out: str | Path, min_elements: int = MIN_ELEMENTS) -> Manifest:
    """Write the lean form of the package ``src`` into the new directory ``out``.

    Each component keeps one graph, its plain fp32 ``onnx`` (which every backend can run: the
    CPU-optimized copy uses ONNX Runtime contrib ops, the fp16 copy is for GPUs), saved as
    ``<component>/model.onnx`` with fp16 weight storage; tokenizers are copied; built engines
    are dropped (they were built from other graphs). The manifest lists every file with its
    sha256 and records what was done in ``source["lean"]``.
    """
    import onnx

    src, out = Path(src), Path(out)
    manifest = read_manifest(src)
    if out.exists():
        raise InputError(f"{out} already exists; lean_package writes a new directory")
    out.mkdir(parents=True)
    files: list[str] = []
    components, storage = {}, {}
    latent = manifest.size_multiple // manifest.latent_scale
    dims = {"batch": 1, "cond_batch": 2, "latent_height": latent, "latent_width": 2 * latent}
    for name, comp in manifest.components.items():
        relative = f"{name}/{GRAPH_FILE}"
        (out / name).mkdir(exist_ok=True)
        model = onnx.load(str(src / comp.onnx))
        storage[name] = store_weights_fp16(model, min_elements).to_json()
        onnx.checker.check_model(model)
        onnx.save_model(model, str(out / relative))
        storage[name]["max_abs_vs_fp32"] = _difference(src / comp.onnx, out / relative, dims)
        files.append(relative)
        components[name] = dataclasses.replace(comp, onnx=relative, onnx_cpu=None, onnx_fp16=None,
                                               export_check_fp16={})
        log.info("%s: %d weights stored in fp16 (%d exactly), %.1f MB; max abs difference vs fp32: %s", name,
                 storage[name]["tensors"], storage[name]["lossless"], (out / relative).stat().st_size / 1e6,
                 ", ".join(f"{k} {v:.1e}" for k, v in storage[name]["max_abs_vs_fp32"].items()))
    tokenizers = {}
    for name, tok in manifest.tokenizers.items():
        relative = f"{name}/{Path(tok.file).name}"
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / tok.file, out / relative)
        files.append(relative)
        tokenizers[name] = dataclasses.replace(tok, file=relative)
    lean = {"weights": f"fp16 storage (initializers of >= {min_elements} values), fp32 compute",
            "graphs": "the plain fp32 graph of each component (onnx); no onnx_cpu, onnx_fp16 or engines",
            "components": storage}
    result = dataclasses.replace(
        manifest, components=components, tokenizers=tokenizers, engines=(),
        files=tuple(file_record(out, f) for f in files), source={**manifest.source, "lean": lean})
    write_manifest(out, result)
    return read_manifest(out)


def _difference(original: Path, lean: Path, dims: dict[str, int]) -> dict[str, float]:
    """Max abs difference per output of ``lean`` vs ``original`` on the same random inputs (ONNX
    Runtime CPU, the inputs of :func:`artrt.export.cpu_optimize.random_inputs`)."""
    import onnxruntime as ort

    from .cpu_optimize import random_inputs

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in (original, lean)]
    feeds = random_inputs(sessions[0], dims)
    reference, got = (s.run(None, feeds) for s in sessions)
    return {o.name: float(np.max(np.abs(r - g))) if r.size else 0.0
            for o, r, g in zip(sessions[0].get_outputs(), reference, got)}


def compare_packages(a: str | Path, b: str | Path, prompts: list[str], seeds: tuple[int, ...] = (0, 1),
                     backend: str = "ort-cpu", **generate: Any) -> dict[str, Any]:
    """Generate every prompt x seed with both packages (at their defaults unless ``generate`` says
    otherwise) and compare the 8-bit images: the lowest PSNR in dB (``inf``: all identical), how many
    images are identical, the largest pixel difference, and each package's seconds per image."""
    import time

    from artrt.runtime import Pipeline

    images, seconds = [], []
    for path in (a, b):
        with Pipeline.load(path, backend=backend) as pipe:
            pipe.generate(prompts[0], seed=seeds[0], **generate)  # warm-up, not timed
            started = time.perf_counter()
            images.append([np.asarray(pipe.generate(p, seed=s, **generate).images[0], np.float64)
                           for p in prompts for s in seeds])
            seconds.append((time.perf_counter() - started) / len(images[-1]))
    values = [_psnr(x, y) for x, y in zip(*images)]
    return {"images": len(values), "identical": sum(v == float("inf") for v in values),
            "min_psnr_db": min(values), "mean_psnr_db": float(np.mean([min(v, 100.0) for v in values])),
            "max_pixel_difference": int(max(np.abs(x - y).max() for x, y in zip(*images))),
            "seconds_per_image": seconds}


def _psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))
