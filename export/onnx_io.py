"""Export a torch module to ONNX and check the ONNX graph against PyTorch."""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from artrt.errors import ExportError

log = logging.getLogger(__name__)

OPSET = 17
# Above this many bytes of weights a graph is saved with external data (protobuf caps at 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30



def export_onnx(
    module: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    outputs: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    path: Path,
) -> list[Path]:
    """Trace ``module`` with ``inputs`` (passed positionally, in order) and write ``path``.

    Returns the files written: the ``.onnx`` and, for graphs over
    :data:`EXTERNAL_DATA_THRESHOLD`, one ``.onnx.data`` file holding the weights.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode(False), torch.no_grad():
        traced = Path(tmp) / "graph.onnx"
        with warnings.catch_warnings():
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
        model = onnx.load(str(traced), load_external_data=True)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    files = [path]
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        data = path.with_name(path.name + ".data")
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=data.name, size_threshold=1024,
        )
        files.append(data)
    else:
        onnx.save_model(model, str(path))
    return files


def check_onnx(
    module: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    outputs: Sequence[str],
    path: Path,
    tolerance: float,
) -> dict[str, float]:
    """Run the ONNX file with ONNX Runtime (CPU) and PyTorch on ``inputs``.

    Returns the max abs error per output; raises :class:`ExportError` when one
    exceeds ``tolerance`` times the output's scale (max(1, max |reference|)).
    """
    import onnxruntime as ort

    with torch.no_grad():
        reference = module(*inputs.values())
    if isinstance(reference, torch.Tensor):
        reference = (reference,)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: t.numpy() for name, t in inputs.items()}
    got = session.run(list(outputs), feeds)
    errors = {}
    for name, ref, value in zip(outputs, reference, got):
        ref_np = ref.float().numpy()
        if ref_np.shape != value.shape:
            raise ExportError(f"{path.name}: output {name} has shape {value.shape}, PyTorch gives {ref_np.shape}")
        error = float(np.max(np.abs(ref_np - value))) if ref_np.size else 0.0
        scale = max(1.0, float(np.max(np.abs(ref_np))))
        errors[name] = error
        if not error <= tolerance * scale:
            raise ExportError(
                f"{path.name}: ONNX output {name!r} differs from PyTorch by {error:.3g} "
                f"(allowed {tolerance * scale:.3g})"
            )
    log.debug("%s: max abs error vs PyTorch %s", path.name, {k: f"{v:.2e}" for k, v in errors.items()})
    return errors


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
