"""Find, read and replace the weights (initializers) of an ONNX file, without the ``onnx`` package.

The runtime has no ``onnx`` dependency, yet LoRA needs a graph's base weights and, on ONNX
Runtime, a copy of the graph with some weights replaced. An ONNX file is a protobuf
``ModelProto``; this module walks its wire format just far enough to find each initializer
of the main graph (``ModelProto.graph`` = field 7, ``GraphProto.initializer`` = field 5)
and where its bytes are: in the file itself (``raw_data``, or packed ``float_data``) or in
an external data file (``location``, ``offset``, ``length``). Field numbers are those of
onnx/onnx.proto, stable since ONNX 1.0. The weights are read with ``numpy.fromfile`` at
their offset, and replaced by writing the same number of bytes at the same offset of a
copy of the file's bytes, so a patched graph is byte for byte the one a re-export with
those weights would give.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artrt.errors import EngineError

# TensorProto.DataType -> numpy (BFLOAT16 = 16 and the 8-bit floats have no numpy type: None)
DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
          9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}

_GRAPH, _INITIALIZER = 7, 5  # ModelProto.graph, GraphProto.initializer
_DIMS, _DATA_TYPE, _FLOAT_DATA, _NAME, _RAW_DATA, _EXTERNAL, _LOCATION = 1, 2, 4, 8, 9, 13, 14


@dataclass(frozen=True)
class Initializer:
    """Where one initializer's bytes are. ``file`` is the ONNX file itself or its external data
    file; ``offset`` is None when the values are stored in a form that cannot be read in place
    (e.g. fp16 as ``int32_data``)."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    file: Path
    offset: int | None
    nbytes: int
    external: bool

    @property
    def dtype(self) -> np.dtype | None:
        kind = DTYPES.get(self.data_type)
        return None if kind is None else np.dtype(kind)

    def read(self) -> np.ndarray:
        """The values as a new array (``file`` is read at ``offset``)."""
        dtype = self.dtype
        if dtype is None or self.offset is None:
            raise EngineError(f"initializer {self.name!r} of {self.file.name} is stored in a form artrt cannot "
                              f"read in place (ONNX data type {self.data_type})")
        count = int(np.prod(self.dims, dtype=np.int64))
        if count * dtype.itemsize != self.nbytes:
            raise EngineError(f"initializer {self.name!r} of {self.file.name} holds {self.nbytes} bytes, its "
                              f"shape {list(self.dims)} of {dtype.name} needs {count * dtype.itemsize}")
        values = np.fromfile(self.file, dtype=dtype, count=count, offset=self.offset)
        if values.size != count:
            raise EngineError(f"{self.file} ends inside initializer {self.name!r}")
        return values.reshape(self.dims)


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field number, wire type, value or payload start, payload end)`` of each field in ``data[start:end]``."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, wire, value, pos
        elif wire == 2:
            length, pos = _varint(data, pos)
            yield number, wire, pos, pos + length
            pos += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield number, wire, pos, pos + size
            pos += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")
    if pos != end:
        raise ValueError("a protobuf field runs past its message")


def _tensor(data: memoryview, start: int, end: int, path: Path) -> Initializer:
    name, data_type, dims = "", 0, []
    offset, nbytes, external = None, 0, False
    entries: dict[str, str] = {}
    for number, wire, a, b in _fields(data, start, end):
        if number == _DIMS:
            if wire == 0:
                dims.append(a)
            else:  # packed
                pos = a
                while pos < b:
                    dim, pos = _varint(data, pos)
                    dims.append(dim)
        elif number == _DATA_TYPE:
            data_type = a
        elif number == _NAME:
            name = bytes(data[a:b]).decode()
        elif number in (_RAW_DATA, _FLOAT_DATA) and wire == 2:
            offset, nbytes = a, b - a
        elif number == _EXTERNAL:
            key = value = ""
            for field, _, c, d in _fields(data, a, b):
                text = bytes(data[c:d]).decode()
                key, value = (text, value) if field == 1 else (key, text)
            entries[key] = value
        elif number == _LOCATION:
            external = a == 1
    if external:
        location = path.parent / entries.get("location", "")
        count = int(np.prod(dims, dtype=np.int64))
        itemsize = np.dtype(DTYPES.get(data_type, np.uint8)).itemsize
        return Initializer(name, data_type, tuple(dims), location, int(entries.get("offset", 0)),
                           int(entries.get("length", count * itemsize)), True)
    return Initializer(name, data_type, tuple(dims), path, offset, nbytes, False)


def read_initializers(path: str | Path) -> dict[str, Initializer]:
    """Every initializer of the main graph of the ONNX file ``path``, by name (nothing is loaded)."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            data = memoryview(mapped)
            try:
                return _initializers(data, path)
            finally:
                data.release()
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise EngineError(f"cannot read the initializers of {path}: {exc}") from None


def _initializers(data: memoryview, path: Path) -> dict[str, Initializer]:
    found: dict[str, Initializer] = {}
    for number, wire, start, end in _fields(data, 0, len(data)):
        if number != _GRAPH or wire != 2:
            continue
        for field, kind, a, b in _fields(data, start, end):
            if field == _INITIALIZER and kind == 2:
                tensor = _tensor(data, a, b, path)
                found[tensor.name] = tensor
    return found


def check_weights(path: Path, index: Mapping[str, Initializer], weights: Mapping[str, np.ndarray]) -> None:
    """Refuse weights that do not name an initializer of ``path`` or differ from it in dtype or shape."""
    for name, array in weights.items():
        init = index.get(name)
        if init is None:
            raise EngineError(f"{path.name} has no initializer {name!r} to replace")
        if init.dtype != array.dtype or init.dims != tuple(array.shape):
            raise EngineError(f"{path.name}: initializer {name!r} is {init.dtype}{list(init.dims)}, the "
                              f"replacement {array.dtype}{list(array.shape)}")
        if not init.external and (init.offset is None or init.nbytes != array.nbytes):
            raise EngineError(f"{path.name}: initializer {name!r} is not stored as raw bytes; it cannot be replaced")


def patched_bytes(path: Path, index: Mapping[str, Initializer], weights: Mapping[str, np.ndarray]) -> bytes:
    """The bytes of the ONNX file ``path`` with the embedded initializers in ``weights`` replaced
    (checked with :func:`check_weights`; external ones are not in the file and are skipped)."""
    data = bytearray(path.read_bytes())
    for name, array in weights.items():
        init = index[name]
        if not init.external:
            data[init.offset : init.offset + init.nbytes] = np.ascontiguousarray(array).tobytes()
    return bytes(data)


__all__ = ["Initializer", "check_weights", "patched_bytes", "read_initializers"]
