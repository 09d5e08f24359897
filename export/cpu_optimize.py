"""Rewrite a component's fp32 ONNX graph for ONNX Runtime's CPU execution provider.

The exporter (``torch.onnx``, opset 17) writes diffusers' ``scaled_dot_product_attention``
as separate nodes: per head ``Reshape``/``Transpose`` of q, k and v, ``Mul`` by
``sqrt(scale)`` on q and k, ``MatMul``, ``Softmax``, ``MatMul``, ``Transpose``, ``Reshape``.
On the CPU that materialises the whole ``[B, heads, S, L]`` score tensor (1.3 GB per
self-attention of SDXL at 1024 px: 2 x 10 heads x 4096^2 floats) and makes separate
passes over it. :func:`fuse_attention` replaces each such chain by one ``com.microsoft``
``MultiHeadAttention`` node (one CPU kernel; the shape arithmetic that fed the chain goes
too), and :func:`optimize_for_cpu` writes the result after checking it against the
original graph with ONNX Runtime.

The onnxruntime.transformers UNet optimizer does not match this form of attention (it
expects the older exporter output), which is why the pattern is matched here. The fused
graph runs on ORT's CPU (and CUDA) EP only, never on TensorRT: it is a separate file.
Imports no torch (only onnx, numpy and onnxruntime).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from artrt.errors import CpuOptimizeError, OutputError
from artrt.runtime.package import Manifest, file_record, resolve

from .onnx_files import has_external_data, write_graph

log = logging.getLogger(__name__)

CONTRIB_DOMAIN = "com.microsoft"
CPU_KINDS = ("fused_step", "vae_decoder")  # the components with SDPA attention (CLIP's is masked)
TOLERANCE = 1e-4  # max abs difference of fused vs original outputs, relative to max(1, |output|)



class _Graph:
    """Producer/consumer maps and constant lookup over an ``onnx.GraphProto``."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.constants = {t.name: t for t in graph.initializer}
        self._to_array = numpy_helper.to_array

    def single(self, name: str, op: str) -> Any | None:
        """The node producing ``name`` if it is an ``op`` whose output only one node reads."""
        node = self.producer.get(name)
        if node is None or node.op_type != op or len(self.consumers.get(name, [])) != 1:
            return None
        return node

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is an initializer or a ``Constant`` node's output."""
        if name in self.constants:
            return self._to_array(self.constants[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return self._to_array(attr.t)
        return None

    def int_constant(self, name: str) -> int | None:
        value = self.constant(name)
        if value is None or value.size != 1:
            return None
        return int(value.reshape(-1)[0])


def _perm(node: Any) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _split_heads(g: _Graph, name: str, perm: list[int]) -> tuple[str, int] | None:
    """``Transpose(perm)(Reshape(x, [B, -1, heads, D]))`` -> ``(x, heads)``. These nodes are left
    in place: once the attention is fused nothing reads them and :func:`remove_dead_nodes` drops them."""
    transpose = g.producer.get(name)
    if transpose is None or transpose.op_type != "Transpose" or _perm(transpose) != perm:
        return None
    reshape = g.producer.get(transpose.input[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    shape = g.constant(reshape.input[1])
    if shape is not None:
        heads = int(shape[2]) if shape.size == 4 else None
    else:
        concat = g.producer.get(reshape.input[1])
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
            return None
        heads = g.int_constant(concat.input[2])
    if not heads or heads < 1:
        return None
    return reshape.input[0], heads


def _scaled(g: _Graph, name: str) -> tuple[str, str | None]:
    """``Mul(x, s)`` -> ``(x, s)``; anything else -> ``(name, None)``."""
    mul = g.single(name, "Mul")
    return (mul.input[0], mul.input[1]) if mul is not None else (name, None)


def _scale_of(g: _Graph, factors: list[str | None]) -> float | None | bool:
    """The attention scale: the product of constant factors (1 without any); None when both
    factors are the exporter's default-scale chain (``sqrt(1/sqrt(D))`` computed from a
    shape), which is also MultiHeadAttention's default; False when it cannot be told."""
    if all(f is None for f in factors):
        return 1.0
    values = [g.constant(f) if f is not None else np.ones(()) for f in factors]
    if all(v is not None and v.size == 1 for v in values):
        return float(np.prod([float(v.reshape(-1)[0]) for v in values]))
    if all(f is not None and _is_default_scale(g, f) for f in factors):
        return None
    return False


def _is_default_scale(g: _Graph, name: str) -> bool:
    """Whether ``name`` is ``Sqrt(Cast(1 / Sqrt(Cast(Slice(Shape(.))))))``: torch's SDPA export of
    the default scale ``1/sqrt(head_dim)``, split as ``sqrt`` of it on q and on k."""
    node = g.producer.get(name)
    for op, index in (("Sqrt", 0), ("Cast", 0), ("Div", 1), ("Sqrt", 0), ("Cast", 0), ("Slice", 0), ("Shape", 0)):
        if node is None or node.op_type != op:
            return False
        one = g.constant(node.input[0]) if op == "Div" else None
        if op == "Div" and (one is None or one.size != 1 or float(one.reshape(-1)[0]) != 1.0):  # 1 / sqrt(D)
            return False
        if op == "Slice" and g.int_constant(node.input[1]) not in (-1, 3):  # the last dim: head_dim
            return False
        node = g.producer.get(node.input[index]) if op != "Shape" else node
    return True


def fuse_attention(model: Any) -> int:
    """Replace every exported SDPA chain of ``model`` by ``MultiHeadAttention``; returns how many."""
    from onnx import helper

    g = _Graph(model.graph)
    replaced: dict[int, Any] = {}  # id(Softmax node) -> the fused node, inserted in its place
    removed: set[int] = set()
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        fused = _match(g, softmax)
        if fused is None:
            continue
        nodes, inputs, output, heads, scale = fused
        attrs: dict[str, Any] = {"num_heads": heads}
        if scale is not None:
            attrs["scale"] = scale
        replaced[id(softmax)] = helper.make_node(
            "MultiHeadAttention", inputs, [output], name=f"{softmax.name}_MultiHeadAttention",
            domain=CONTRIB_DOMAIN, **attrs,
        )
        removed |= {id(n) for n in nodes}
    if not replaced:
        return 0
    kept = []
    for node in model.graph.node:
        if id(node) in replaced:
            kept.append(replaced[id(node)])
        elif id(node) not in removed:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    if not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    remove_dead_nodes(model)
    return len(replaced)


def _match(g: _Graph, softmax: Any) -> tuple[list[Any], list[str], str, int, float | None] | None:
    """The nodes of one SDPA chain around ``softmax``, MHA inputs, output, heads and scale."""
    if next((a.i for a in softmax.attribute if a.name == "axis"), -1) not in (-1, 3):
        return None
    scores = g.single(softmax.input[0], "MatMul")
    users = g.consumers.get(softmax.output[0], [])
    if scores is None or len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != softmax.output[0]:
        return None
    context = users[0]
    q_name, q_factor = _scaled(g, scores.input[0])
    k_name, k_factor = _scaled(g, scores.input[1])
    q = _split_heads(g, q_name, [0, 2, 1, 3])
    k = _split_heads(g, k_name, [0, 2, 3, 1])
    v = _split_heads(g, context.input[1], [0, 2, 1, 3])
    if q is None or k is None or v is None or not q[1] == k[1] == v[1]:
        return None
    scale = _scale_of(g, [q_factor, k_factor])
    if scale is False:
        return None
    merge = g.consumers.get(context.output[0], [])
    if len(merge) != 1 or merge[0].op_type != "Transpose" or _perm(merge[0]) != [0, 2, 1, 3]:
        return None
    reshape = g.consumers.get(merge[0].output[0], [])
    if len(reshape) != 1 or reshape[0].op_type != "Reshape" or _rank(g, reshape[0].input[1]) != 3:
        return None  # heads merged back into [B, S, heads * D], as MultiHeadAttention outputs
    nodes = [softmax, scores, context, merge[0], reshape[0]]
    nodes += [g.producer[n] for n, f in zip(scores.input, (q_factor, k_factor)) if f is not None]
    return nodes, [q[0], k[0], v[0]], reshape[0].output[0], q[1], scale


def _rank(g: _Graph, shape: str) -> int | None:
    """Length of a Reshape's target shape given as a constant or a Concat of scalars."""
    value = g.constant(shape)
    if value is not None:
        return int(value.size)
    node = g.producer.get(shape)
    return len(node.input) if node is not None and node.op_type == "Concat" else None


def remove_dead_nodes(model: Any) -> int:
    """Drop nodes (and initializers) no graph output depends on; returns the nodes removed.
    Graphs with control flow are left alone (subgraphs read outer names implicitly)."""
    graph = model.graph
    if any(a.type in (a.GRAPH, a.GRAPHS) for node in graph.node for a in node.attribute):
        return 0
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    removed = len(graph.node) - len(kept)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    for tensor in [t for t in graph.initializer if t.name not in needed]:
        graph.initializer.remove(tensor)
    return removed


def optimize_for_cpu(
    src: Path, dst: Path, check_dims: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Write ``src`` with its attention fused for ONNX Runtime CPU to ``dst`` and check it
    against ``src`` on random inputs (symbolic dimensions sized by ``check_dims``).

    Weights stay where they are: embedded graphs are written whole, and a graph with
    external data refers to the same ``.data`` file (so ``dst`` must be beside ``src``); its
    weights are never loaded here. ``dst`` is written atomically.
    Returns the count of each fused operator written (empty: nothing matched, nothing written).
    """
    import onnx

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    if has_external_data(model) and dst.parent.resolve() != src.parent.resolve():
        raise CpuOptimizeError(f"{dst}: a graph with external weights must be written beside {src}")
    before = _interface(model)
    fused = fuse_attention(model)
    if not fused:
        return {}
    if _interface(model) != before:
        raise CpuOptimizeError(f"{src.name}: fusing changed the graph's inputs/outputs")
    counts = dict(Counter(n.op_type for n in model.graph.node if n.domain == CONTRIB_DOMAIN))
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_graph(model, dst)  # atomic; external weights stay in src's .data file
    del model
    try:
        check_fused(src, dst, check_dims or CHECK_DIMS)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return counts


def add_cpu_graphs(root: Path, manifest: Manifest) -> Manifest:
    """Write ``<component>/model_cpu.onnx`` for every expert step and decoder of the package
    in ``root`` whose fp32 graph has attention to fuse; returns the manifest that lists them
    (``Component.onnx_cpu``, which ``ort-cpu`` loads instead of ``onnx``). A graph that cannot
    be fused or fails its check gets no CPU graph (logged), not a failed export. Components
    without an fp32 graph (exported for cuda only) are left as they are."""
    latent = manifest.size_multiple // manifest.latent_scale
    dims = {"batch": 1, "cond_batch": 2, "latent_height": latent, "latent_width": 2 * latent}
    components, files = dict(manifest.components), list(manifest.files)
    for name, comp in manifest.components.items():
        if comp.kind not in CPU_KINDS or comp.onnx is None:
            continue
        rel = str(Path(comp.onnx).with_name("model_cpu.onnx"))
        started = time.perf_counter()
        try:
            counts = optimize_for_cpu(resolve(root, comp.onnx), resolve(root, rel), dims)
        except (OutputError, OSError):  # a full disk fails the export, as for any other file
            raise
        except Exception as exc:  # an optimisation, never a reason to fail an export
            log.warning("%s: no CPU graph (%s: %s); ort-cpu will run %s", name, type(exc).__name__, exc, comp.onnx)
            continue
        if counts:
            fused = ", ".join(f"{n} {op}" for op, n in counts.items())
            log.info("%s: CPU graph with %s, checked (%.1f s)", name, fused, time.perf_counter() - started)
            components[name] = replace(comp, onnx_cpu=rel)
            files = [f for f in files if f.path != rel] + [file_record(root, rel)]
    return replace(manifest, components=components, files=tuple(files))


def _interface(model: Any) -> list[tuple[str, str, int]]:
    initializers = {i.name for i in model.graph.initializer}
    inputs = [("input", v.name, v.type.tensor_type.elem_type) for v in model.graph.input if v.name not in initializers]
    return inputs + [("output", v.name, v.type.tensor_type.elem_type) for v in model.graph.output]


# Sizes of symbolic dimensions for the check when none are given (one SDXL size multiple, 2:1).
CHECK_DIMS = {"batch": 1, "cond_batch": 2, "latent_height": 4, "latent_width": 8}


def check_fused(original: Path, fused: Path, dims: Mapping[str, int] = CHECK_DIMS) -> dict[str, float]:
    """Max abs difference per output of ``fused`` vs ``original`` on the same random inputs
    (ONNX Runtime CPU); raises :class:`CpuOptimizeError` when one is too large."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False

    def run(path: Path, feeds: dict[str, np.ndarray] | None) -> tuple[list[str], dict[str, np.ndarray], list]:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = feeds if feeds is not None else random_inputs(session, dims)
        return [o.name for o in session.get_outputs()], feeds, session.run(None, feeds)

    # one session at a time: a large graph's weights are in memory once
    names, feeds, reference = run(original, None)
    _, _, got = run(fused, feeds)
    errors = {}
    for name, ref, value in zip(names, reference, got):
        error = float(np.max(np.abs(ref - value))) if ref.size else 0.0
        errors[name] = error
        scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
        if not error <= TOLERANCE * scale:
            raise CpuOptimizeError(f"{fused.name}: output {name} differs from {original.name} by {error:.3g}")
    log.debug("%s: max abs difference vs %s: %s", fused.name, original.name, errors)
    return errors


def random_inputs(session: Any, dims: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Random feeds for an ORT session: unit normal floats, token ids in ``[0, 256)``; a
    fused step's ``step`` gets plausible scalars (timestep 500, guidance 5)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for node in session.get_inputs():
        shape = [d if isinstance(d, int) else dims.get(str(d), 1) for d in node.shape]
        if node.type == "tensor(int64)":
            feeds[node.name] = rng.integers(0, 256, shape, dtype=np.int64)
        else:
            feeds[node.name] = rng.standard_normal(shape).astype(np.float32)
    if "step" in feeds and feeds["step"].shape == (9,):  # STEP_SCALARS order
        feeds["step"] = np.array([0.1, 500.0, 1.0, -5.0, 5.0, 0.9, 0.1, 0.05, 0.01], np.float32)
    return feeds


__all__ = [
    "CpuOptimizeError", "add_cpu_graphs", "check_fused", "fuse_attention", "optimize_for_cpu", "remove_dead_nodes",
]
