"""Export a torch module to ONNX and check the ONNX graph against PyTorch.

Where weights go on disk (external data past :data:`onnx_files.EXTERNAL_DATA_THRESHOLD`,
atomic writes) is :mod:`.onnx_files`' job.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from artrt.errors import ExportError

from . import onnx_files

log = logging.getLogger(__name__)

OPSET = 17
TRACED = "graph.onnx"  # the exporter's output in its scratch folder


def export_onnx(
    module: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    outputs: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    path: Path,
) -> list[Path]:
    """Trace ``module`` with ``inputs`` (passed positionally, in order) and write ``path``.

    Returns the files written: the ``.onnx`` and, for graphs whose weights exceed
    :data:`onnx_files.EXTERNAL_DATA_THRESHOLD`, one ``.onnx.data`` file holding them.
    :func:`trace_onnx` then :func:`place_onnx`; callers that can free ``module`` in between
    should call those two themselves.
    """
    return place_onnx(trace_onnx(module, inputs, outputs, dynamic_axes, path), path)


def trace_onnx(
    module: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    outputs: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    path: Path,
) -> Path:
    """Export ``module`` into a new scratch folder beside ``path`` (the same disk, never a
    RAM-backed /tmp) and return the folder, for :func:`place_onnx`.

    The weights go straight from the module's tensors to ``<scratch>/<path name>.data``, one
    tensor at a time: left to itself, the exporter builds a graph under 2 GiB in memory with
    every weight in it and serializes it (about three copies of the weights at once).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.trace-"))
    traced = scratch / TRACED
    weights: dict[str, torch.Tensor] = {}
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), _weights_apart(weights):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                tuple(inputs.values()),
                str(traced),
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        if weights:
            model = onnx.load(str(traced), load_external_data=False)
            _attach_weights(model, weights, scratch / onnx_files.data_path(path).name)
            onnx_files.write_graph(model, traced)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        weights.clear()
    gc.collect()  # the exporter's folded copies of weights
    return scratch


@contextlib.contextmanager
def _weights_apart(weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """While active, the TorchScript exporter writes its graph without initializers (they stay
    graph inputs) and hands them to ``weights`` by name. Patches the private
    ``torch._C.Graph._export_onnx``; where that is missing, the exporter runs as it is."""
    graph = torch._C.Graph
    original = getattr(graph, "_export_onnx", None)
    if original is None:
        yield
        return

    def export(self, initializers, *args, **kwargs):
        weights.update(initializers)
        return original(self, {}, *args, **kwargs)

    graph._export_onnx = export
    try:
        yield
    finally:
        graph._export_onnx = original


_ONNX_TYPES = {
    torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
    torch.bfloat16: onnx.TensorProto.BFLOAT16, torch.float64: onnx.TensorProto.DOUBLE,
    torch.int64: onnx.TensorProto.INT64, torch.int32: onnx.TensorProto.INT32, torch.int16: onnx.TensorProto.INT16,
    torch.int8: onnx.TensorProto.INT8, torch.uint8: onnx.TensorProto.UINT8, torch.bool: onnx.TensorProto.BOOL,
}


def _attach_weights(model: onnx.ModelProto, weights: Mapping[str, torch.Tensor], data: Path) -> None:
    """Turn the graph inputs named in ``weights`` into initializers: tensors of at least
    ``onnx_files.MIN_EXTERNAL_TENSOR`` bytes written to ``data`` (aligned; location: its name),
    smaller ones embedded."""
    graph = model.graph
    used = {i.name for i in graph.input} & set(weights)
    kept = [i for i in graph.input if i.name not in used]
    del graph.input[:]
    graph.input.extend(kept)
    with open(data, "wb") as out:
        for name in [n for n in weights if n in used]:
            tensor = weights[name].detach().cpu().contiguous()
            if tensor.dtype not in _ONNX_TYPES:
                raise ExportError(f"{name}: weights of dtype {tensor.dtype} cannot be written to ONNX")
            raw = tensor.reshape(-1).view(torch.uint8).numpy()
            proto = onnx.TensorProto(name=name, data_type=_ONNX_TYPES[tensor.dtype], dims=list(tensor.shape))
            if raw.nbytes < onnx_files.MIN_EXTERNAL_TENSOR:
                proto.raw_data = raw.tobytes()
            else:
                onnx_files.append_external(proto, raw, out, data.name)
            graph.initializer.append(proto)


def place_onnx(scratch: Path, path: Path) -> list[Path]:
    """Move the graph :func:`trace_onnx` wrote in ``scratch`` to ``path`` and delete ``scratch``;
    returns the files written (atomically, the data first). A graph whose weights exceed
    :data:`onnx_files.EXTERNAL_DATA_THRESHOLD` keeps them in ``path.data`` (renamed into place,
    or copied in chunks); a smaller one gets them embedded (which holds about twice their size
    in memory: call this after freeing the module)."""
    try:
        model = onnx.load(str(scratch / TRACED), load_external_data=False)
        data = scratch / onnx_files.data_path(path).name
        large = onnx_files.weight_bytes(model) > onnx_files.EXTERNAL_DATA_THRESHOLD
        if large and data.is_file() and onnx_files.locations(model) == {data.name}:
            moved = onnx_files.move_file(data, onnx_files.data_path(path))
            return [onnx_files.write_graph(model, path), moved]
        return onnx_files.save_onnx(model, path, source_dir=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_module(module: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> list[np.ndarray]:
    """The outputs of ``module`` on ``inputs`` (passed positionally) as fp32 numpy arrays."""
    with torch.inference_mode(False), torch.no_grad():
        outputs = module(*inputs.values())
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    return [t.float().numpy() for t in outputs]


def compare_onnx(
    path: Path,
    inputs: Mapping[str, torch.Tensor],
    reference: Sequence[np.ndarray],
    outputs: Sequence[str],
    tolerance: float,
) -> dict[str, float]:
    """Run the ONNX file (and its external data) with ONNX Runtime (CPU) on ``inputs``.

    Returns the max abs error per output against ``reference``; raises :class:`ExportError`
    when one exceeds ``tolerance`` times the output's scale (max(1, max |reference|)).
    The session is released before returning.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False
    # Basic optimizations only: at "all", ORT CPU folds the Casts it puts around fp16 weights into
    # fp32 copies of them (an fp16 UNet check then takes 3x its weights); the arithmetic checked is the same.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    try:
        got = session.run(list(outputs), {name: t.numpy() for name, t in inputs.items()})
    finally:
        del session
        gc.collect()
    errors = {}
    for name, ref_np, value in zip(outputs, reference, got):
        if ref_np.shape != value.shape:
            raise ExportError(f"{path.name}: output {name} has shape {value.shape}, PyTorch gives {ref_np.shape}")
        error = float(np.max(np.abs(ref_np - value))) if ref_np.size else 0.0
        scale = max(1.0, float(np.max(np.abs(ref_np)))) if ref_np.size else 1.0
        errors[name] = error
        if not error <= tolerance * scale:
            raise ExportError(
                f"{path.name}: ONNX output {name!r} differs from PyTorch by {error:.3g} "
                f"(allowed {tolerance * scale:.3g})"
            )
    log.debug("%s: max abs error vs PyTorch %s", path.name, {k: f"{v:.2e}" for k, v in errors.items()})
    return errors


def check_onnx(
    module: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    outputs: Sequence[str],
    path: Path,
    tolerance: float,
) -> dict[str, float]:
    """:func:`compare_onnx` against ``module``'s outputs on the same inputs."""
    return compare_onnx(path, inputs, run_module(module, inputs), outputs, tolerance)


def tensor_info(path: Path) -> tuple[list[dict], list[dict]]:
    """Names, dtypes and (symbolic) shapes of an ONNX file's inputs and outputs."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
            out.append({"name": v.name, "dtype": dtype, "shape": dims})
        return out

    return describe(model.graph.input), describe(model.graph.output)
