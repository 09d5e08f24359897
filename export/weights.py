"""What a model's weights take before it is loaded: its files, their size in fp32, and whether that
fits in memory; :class:`LazyModule`, a model loaded from its folder on demand. Reads safetensors
headers and /proc/meminfo only (no weights)."""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from artrt.errors import ExportError

log = logging.getLogger(__name__)


class LazyModule:
    """A model read from its folder when called: what export needs before that (its config and the
    size of its weights) is read without loading them. Each call loads a new copy, which the caller
    owns (may convert in place, must free); before loading, :func:`check_memory` refuses a model
    whose fp32 weights do not fit in the memory available."""

    def __init__(self, folder: Path, load: Callable[[], torch.nn.Module], config: Any, files: tuple[Path, ...]):
        self.folder, self._load, self.config, self.files = folder, load, config, files

    @property
    def fp32_bytes(self) -> int:
        return fp32_bytes(self.files)

    def __call__(self) -> torch.nn.Module:
        check_memory(str(self.folder), self.fp32_bytes)
        return self._load()

    def __repr__(self) -> str:
        return f"LazyModule({self.folder})"


def materialize(source: torch.nn.Module | LazyModule) -> tuple[torch.nn.Module, bool]:
    """The module of ``source`` and whether the caller owns it (a fresh load it may change and free)
    rather than borrows it (a module given in :class:`ModelSources`, left as it is)."""
    if isinstance(source, LazyModule):
        return source(), True
    return source, False


def weight_bytes(source: torch.nn.Module | LazyModule | None) -> int:
    """fp32 bytes of a source's weights (from file headers for a :class:`LazyModule`)."""
    if source is None:
        return 0
    if isinstance(source, LazyModule):
        return source.fp32_bytes
    return sum(4 * t.numel() if t.is_floating_point() else t.numel() * t.element_size()
               for t in itertools.chain(source.parameters(), source.buffers()))


def weight_files(folder: Path, stem: str, pickle_name: str) -> tuple[Path, ...]:
    """The files ``from_pretrained`` reads: ``stem.safetensors``, its shards, or a pickle checkpoint."""
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return (single,)
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return tuple(folder / shard for shard in shards)
    return (folder / pickle_name,) if (folder / pickle_name).is_file() else ()


_SAFETENSORS_BYTES = {"F64": 4, "F32": 4, "F16": 4, "BF16": 4, "I64": 8, "U64": 8, "I32": 4, "U32": 4,
                      "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}  # floats counted as fp32 (.float())


def safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size))


def fp32_bytes(files: tuple[Path, ...]) -> int:
    """Bytes the weights in ``files`` take once loaded and cast to fp32 (file size for pickles)."""
    total = 0
    for path in files:
        if path.suffix != ".safetensors":
            total += path.stat().st_size
            continue
        for name, info in safetensors_header(path).items():
            if name != "__metadata__":
                total += math.prod(info["shape"]) * _SAFETENSORS_BYTES.get(info["dtype"], 4)
    return total


def memory_available() -> tuple[int, int] | None:
    """(MemAvailable, SwapFree) in bytes from /proc/meminfo; None where there is none."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    info = {}
    for line in lines:
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            info[key] = int(parts[0]) * (1024 if parts[-1] == "kB" else 1)
    if "MemAvailable" not in info:
        return None
    return info["MemAvailable"], info.get("SwapFree", 0)


def check_memory(what: str, need: int) -> None:
    """Refuse, in one line, to load ``need`` bytes of weights that do not fit in memory plus free
    swap; warn when they fit only with swap."""
    memory = memory_available()
    if memory is None or need <= memory[0]:
        return
    available, swap = memory
    text = (f"{what}: its weights need {need / 1e9:.1f} GB of memory in fp32, this machine has "
            f"{available / 1e9:.1f} GB available")
    if need > available + swap:
        raise ExportError(f"{text} (and {swap / 1e9:.1f} GB of free swap); close other programs or export "
                          "on a machine with more memory")
    log.warning("%s: loading it will swap (%.1f GB of free swap)", text, swap / 1e9)


__all__ = [
    "LazyModule", "check_memory", "fp32_bytes", "materialize", "memory_available", "safetensors_header",
    "weight_bytes", "weight_files",
]
