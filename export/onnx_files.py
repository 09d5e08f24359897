"""ONNX files on disk: weights beside the graph (external data) and atomic writes.

Protobuf cannot hold a message over 2 GiB, so a graph whose weights exceed
:data:`EXTERNAL_DATA_THRESHOLD` is written as two files: ``model.onnx`` (the graph) and
``model.onnx.data`` (every tensor of at least :data:`MIN_EXTERNAL_TENSOR` bytes, each at
an offset aligned to :data:`ALIGNMENT` so ONNX Runtime can map it instead of copying it).
Weights are copied between files in chunks, never all held in memory, and both files are
written with :func:`artrt.files.write_atomic`: an interrupted write never leaves a file
under its final name. Imports no torch (the CPU and CUDA optimizers use it too).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from artrt.errors import ExportError, OutputError
from artrt.files import sync_directory, write_atomic

# Above this many bytes of weights a graph's weights go to external data. The one owner of
# the rule: export, the CPU and CUDA optimizers and `artrt build` read it here at call time.
EXTERNAL_DATA_THRESHOLD = 1 << 30
MIN_EXTERNAL_TENSOR = 1024  # smaller tensors stay in the graph (shape constants the optimizers read)
ALIGNMENT = 4096  # offsets of external tensors: the page size, so ONNX Runtime can mmap them
PROTOBUF_LIMIT = (1 << 31) - 1
CHUNK = 64 << 20  # bytes copied at a time


def data_path(path: Path) -> Path:
    """The external data file of the graph ``path``: ``model.onnx`` -> ``model.onnx.data``."""
    return path.with_name(path.name + ".data")


def _tensors(model: Any) -> Iterator[Any]:
    """The initializers of the main graph and of every subgraph."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                graphs += ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)


def is_external(tensor: Any) -> bool:
    from onnx import TensorProto

    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def locations(model: Any) -> set[str]:
    """The external data files ``model``'s tensors refer to."""
    return {_external_info(t).get("location", "") for t in _tensors(model) if is_external(t)}


def has_external_data(model: Any) -> bool:
    """Whether any tensor of ``model`` refers to an external file."""
    return any(is_external(t) for t in _tensors(model))


def weight_bytes(model: Any) -> int:
    """Bytes of every initializer of ``model``, from shapes and dtypes (external data need not be loaded)."""
    import numpy as np
    from onnx import helper

    total = 0
    for tensor in model.graph.initializer:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def _external_info(tensor: Any) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _source_file(tensor: Any, source_dir: Path | None) -> Path:
    location = _external_info(tensor).get("location", "")
    if source_dir is None:
        raise ExportError(f"tensor {tensor.name!r} has external data ({location}) but no folder to read it from")
    path = (Path(source_dir) / location).resolve()
    if not path.is_relative_to(Path(source_dir).resolve()):
        raise ExportError(f"tensor {tensor.name!r}: external data {location!r} points outside {source_dir}")
    return path


def _copy_range(src: Path, offset: int, length: int, out: Any) -> None:
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            block = f.read(min(CHUNK, left))
            if not block:
                raise ExportError(f"{src} ends before byte {offset + length} that a tensor needs")
            out.write(block)
            left -= len(block)


def append_external(tensor: Any, raw: Any, out: Any, location: str) -> None:
    """Write ``raw`` (bytes-like: the tensor's data) to ``out`` at the next aligned offset and point
    ``tensor`` at it, as ``location``."""
    from onnx import TensorProto

    position = _align(out)
    out.write(raw)
    _point(tensor, location, position, out.tell() - position)
    tensor.data_location = TensorProto.EXTERNAL


def _align(out: Any) -> int:
    """Pad ``out`` to the next multiple of :data:`ALIGNMENT`; returns the position."""
    position = out.tell()
    if position % ALIGNMENT:
        out.write(b"\0" * (ALIGNMENT - position % ALIGNMENT))
    return out.tell()


def _point(tensor: Any, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _write_data(model: Any, location: str, source_dir: Path | None, out: Any) -> None:
    """Move or copy every tensor of at least MIN_EXTERNAL_TENSOR bytes into ``out`` and point the
    tensor at it (``location``): data held in the proto is cleared as it is written."""
    from onnx import TensorProto

    for tensor in _tensors(model):
        if is_external(tensor):
            info = _external_info(tensor)
            src, offset = _source_file(tensor, source_dir), int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else src.stat().st_size - offset
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= MIN_EXTERNAL_TENSOR:
            src, length = None, len(tensor.raw_data)
        else:
            continue
        position = _align(out)
        if src is None:
            out.write(tensor.raw_data)
            tensor.ClearField("raw_data")
        else:
            _copy_range(src, offset, length, out)
        _point(tensor, location, position, length)
        tensor.data_location = TensorProto.EXTERNAL


def _embed_data(model: Any, source_dir: Path | None) -> None:
    """Read every external tensor of ``model`` into the proto (for graphs written as one file)."""
    from onnx import TensorProto

    for tensor in _tensors(model):
        if is_external(tensor):
            info = _external_info(tensor)
            src, offset = _source_file(tensor, source_dir), int(info.get("offset", 0))
            with open(src, "rb") as f:
                f.seek(offset)
                tensor.raw_data = f.read(int(info["length"])) if "length" in info else f.read()
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT


def write_graph(model: Any, path: Path) -> Path:
    """Serialize ``model`` as it is (external references unchanged) to ``path``, atomically."""
    size = model.ByteSize()
    if size > PROTOBUF_LIMIT:
        raise ExportError(f"{path.name}: the graph is {size / 2**30:.1f} GiB, over protobuf's 2 GiB limit; "
                          "its weights must be saved as external data")
    return write_atomic(path, model.SerializeToString())


def save_onnx(model: Any, path: str | Path, source_dir: str | Path | None = None,
              external: bool | None = None) -> list[Path]:
    """Write ``model`` to ``path`` and, with ``external``, its weights to ``path.data``; returns the
    files written. ``external`` None decides by :data:`EXTERNAL_DATA_THRESHOLD` (a graph that already
    refers to external data over the threshold keeps it). Tensors the proto holds are moved out of it
    (``model`` is changed); tensors in external files (relative to ``source_dir``) are copied in
    chunks. Both files are written atomically, the data first: a graph file under its final name
    always has its data beside it."""
    path = Path(path)
    source = Path(source_dir) if source_dir is not None else None
    if external is None:
        external = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    if not external:
        _embed_data(model, source)
        return [write_graph(model, path)]
    data = data_path(path)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            _write_data(model, data.name, source, out)

    write_atomic(data, write)
    return [write_graph(model, path), data]


def move_file(src: Path, dst: Path) -> Path:
    """Rename ``src`` to ``dst`` (same file system) after making its bytes durable."""
    try:
        with open(src, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(src, dst)
    except OSError as exc:
        raise OutputError(f"cannot write {dst}: {exc.strerror or exc}") from None
    sync_directory(dst.parent)
    return dst


__all__ = [
    "ALIGNMENT", "EXTERNAL_DATA_THRESHOLD", "append_external", "data_path", "has_external_data", "locations",
    "move_file", "save_onnx", "weight_bytes", "write_graph",
]
