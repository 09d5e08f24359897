"""LoRA adapters: what a user asks for (:class:`Lora`) and what a LoRA file holds (:func:`read_lora_file`).

Two file formats, both safetensors (read here with numpy: bf16 files too, which
``safetensors.numpy`` cannot load):

- diffusers / PEFT, as ``save_lora_weights`` writes them: ``<network>.<module>.lora_A.weight`` and
  ``lora_B.weight`` (or the older ``lora.down`` / ``lora.up``), ``<network>`` one of ``unet``,
  ``transformer``, ``text_encoder``, ``text_encoder_2``. Alpha from the ``lora_adapter_metadata``
  header (``<network>.lora_alpha``, ``alpha_pattern``, ``use_rslora``), else from
  ``<network>.<module>.alpha`` tensors (network alphas), else alpha = rank.
- kohya / A1111: ``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``
  (``lora_te_``/``lora_te1_``: text_encoder, ``lora_te2_``: text_encoder_2); module names have
  ``_`` for ``.`` and SDXL files use the original (SGM) block names: both are resolved against
  the package's targets (:mod:`artrt.runtime.lora_weights`).

A layer's update is ``scaling · up @ down`` with ``scaling = alpha / rank`` (``alpha / √rank``
for rsLoRA), times the user's scale. DoRA, LoRA biases and LyCORIS (LoHa, LoKr) are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from artrt.errors import InputError

EXPERTS = ("composition", "detail", "both")
NETWORKS = ("unet", "transformer", "text_encoder", "text_encoder_2")
KOHYA_NETWORKS = {"unet": "unet", "transformer": "transformer", "te": "text_encoder", "te1": "text_encoder",
                  "te2": "text_encoder_2"}
METADATA_KEY = "lora_adapter_metadata"

_PEFT = re.compile(r"^(?P<net>unet|transformer|text_encoder|text_encoder_2)\.(?P<module>.+?)\."
                   r"(?P<part>lora_A|lora_B|lora\.down|lora\.up)(?:\.default)?\.weight$")
_PEFT_ALPHA = re.compile(r"^(?P<net>unet|transformer|text_encoder|text_encoder_2)\.(?P<module>.+)\.alpha$")
_KOHYA = re.compile(r"^lora_(?P<net>unet|transformer|te|te1|te2)_(?P<module>[^.]+)\."
                    r"(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
_UNSUPPORTED = {"lora_magnitude_vector": "DoRA", "dora_scale": "DoRA", "hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr",
                "lora_B.bias": "LoRA with biases", "lora_up.bias": "LoRA with biases"}
_DOWN = ("lora_A", "lora.down", "lora_down.weight")
_SAFETENSORS = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "bf16", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                "I8": "i1", "U8": "u1", "BOOL": "?"}


@dataclass(frozen=True)
class Lora:
    """One adapter to apply: a LoRA file, its strength and the expert(s) it changes.

    ``expert``: ``composition``, ``detail`` or ``both``. Text-encoder weights in the file are applied
    only with ``both``: the text encoders serve both experts (they are skipped, with a warning, for one).
    ``scale`` 0 leaves the weights exactly as they are."""

    file: Path
    scale: float = 1.0
    expert: str = "both"

    def __post_init__(self) -> None:
        if not isinstance(self.file, (str, os.PathLike)):
            raise InputError(f"a LoRA file must be a path, got {self.file!r}")
        object.__setattr__(self, "file", Path(self.file))
        scale = self.scale
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale < 0:
            raise InputError(f"LoRA {self.file.name}: scale must be a finite number >= 0, got {scale!r}")
        object.__setattr__(self, "scale", float(scale))
        if self.expert not in EXPERTS:
            raise InputError(f"LoRA {self.file.name}: unknown expert {self.expert!r}; choose from {', '.join(EXPERTS)}")

    @classmethod
    def parse(cls, spec: str) -> Lora:
        """``FILE[:SCALE][@EXPERT]`` (the CLI's ``--lora``): ``style.safetensors:0.8@composition``."""
        text, expert, scale = spec, "both", 1.0
        head, at, tail = text.rpartition("@")
        if at and tail and not re.search(r"[./\\]", tail):
            text, expert = head, tail
        head, colon, tail = text.rpartition(":")
        if colon and not re.search(r"[/\\]", tail):
            if not head:
                raise InputError(f"--lora {spec}: no file (FILE[:SCALE][@EXPERT])")
            try:
                scale = float(tail)
            except ValueError:
                raise InputError(f"--lora {spec}: scale {tail!r} is not a number (FILE[:SCALE][@EXPERT])") from None
            text = head
        if not text:
            raise InputError(f"--lora {spec}: no file (FILE[:SCALE][@EXPERT])")
        return cls(Path(text), scale, expert)

    def describe(self) -> str:
        return f"{self.file.name}:{self.scale:g}@{self.expert}"


@dataclass(frozen=True)
class LoraLayer:
    """One adapted weight: ``update = scaling · up @ down`` (fp32), in the module's layout."""

    network: str  # unet, transformer, text_encoder or text_encoder_2
    module: str  # diffusers module name (diffusers/PEFT files) or the kohya name after its prefix
    down: np.ndarray  # [rank, in, *kernel]
    up: np.ndarray  # [out, rank, *ones]
    scaling: float  # alpha / rank (rsLoRA: alpha / sqrt(rank))

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the weight it adapts: ``(out, in, *kernel)``."""
        return (int(self.up.shape[0]), *(int(d) for d in self.down.shape[1:]))

    def update(self) -> np.ndarray:
        rank = self.down.shape[0]
        product = self.up.reshape(self.up.shape[0], rank) @ self.down.reshape(rank, -1)
        return (self.scaling * product).reshape(self.shape).astype(np.float32, copy=False)


@dataclass(frozen=True)
class LoraFile:
    path: Path
    format: str  # "diffusers" or "kohya"
    layers: tuple[LoraLayer, ...]
    sha256: str


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """Tensors (floats as fp32), header metadata and sha256 of a safetensors file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read LoRA file {path}: {exc.strerror or exc}") from None
    try:
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 or size > len(data) - 8:
            raise ValueError("no safetensors header")
        header = json.loads(data[8 : 8 + size])
        metadata = header.pop("__metadata__", None) or {}
        tensors = {key: _tensor(data, 8 + size, info) for key, info in header.items()}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not a LoRA file artrt can read (a safetensors file is expected): {exc}") from None
    return tensors, metadata, hashlib.sha256(data).hexdigest()


def _tensor(data: bytes, base: int, info: dict[str, Any]) -> np.ndarray:
    kind = _SAFETENSORS[info["dtype"]]
    start, end = (int(v) for v in info["data_offsets"])
    if not 0 <= start <= end <= len(data) - base:
        raise ValueError(f"tensor data {start}..{end} outside the file")
    raw = np.frombuffer(data, np.uint8, end - start, base + start)
    if kind == "bf16":
        values = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        values = raw.view(np.dtype(kind))
        values = values.astype(np.float32) if values.dtype.kind == "f" else values
    return values.reshape([int(d) for d in info["shape"]])


def read_lora_file(path: str | Path) -> LoraFile:
    """The layers of a diffusers/PEFT or kohya LoRA file; one :class:`InputError` line when it is neither."""
    path = Path(path)
    tensors, metadata, sha = read_safetensors(path)
    if not tensors:
        raise InputError(f"{path} holds no tensors: not a LoRA file")
    for key in tensors:
        for marker, what in _UNSUPPORTED.items():
            if marker in key:
                raise InputError(f"{path.name}: {what} is not supported (key {key!r}); only plain LoRA is")
    if all(_PEFT.match(k) or _PEFT_ALPHA.match(k) for k in tensors):
        return LoraFile(path, "diffusers", _peft_layers(path, tensors, metadata), sha)
    if all(_KOHYA.match(k) for k in tensors):
        return LoraFile(path, "kohya", _kohya_layers(path, tensors), sha)
    unknown = [k for k in tensors if not (_PEFT.match(k) or _PEFT_ALPHA.match(k) or _KOHYA.match(k))]
    if not unknown:
        raise InputError(f"{path.name}: unknown LoRA format: it mixes diffusers/PEFT and kohya keys")
    raise InputError(f"{path.name}: unknown LoRA format: key {unknown[0]!r} is neither diffusers/PEFT "
                     "(unet.<module>.lora_A.weight) nor kohya (lora_unet_<module>.lora_down.weight)")


def _peft_layers(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> tuple[LoraLayer, ...]:
    pairs: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    alphas: dict[tuple[str, str], float] = {}
    for key, value in tensors.items():
        match = _PEFT.match(key)
        if match:
            part = "down" if match["part"] in _DOWN else "up"
            pairs.setdefault((match["net"], match["module"]), {})[part] = value
        else:
            match = _PEFT_ALPHA.match(key)
            alphas[(match["net"], match["module"])] = _scalar(path, key, value)
    configs = _adapter_configs(path, metadata)
    layers = []
    for (net, module), pair in pairs.items():
        down, up = _pair(path, f"{net}.{module}", pair)
        rank = down.shape[0]
        config = configs.get(net)
        if config is not None:
            alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)))
            scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        else:
            scaling = alphas.get((net, module), rank) / rank
        layers.append(LoraLayer(net, module, down, up, scaling))
    return tuple(layers)


def _adapter_configs(path: Path, metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The PEFT ``LoraConfig`` of each network, from diffusers' ``lora_adapter_metadata`` header entry."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except ValueError as exc:
        raise InputError(f"{path.name}: unreadable {METADATA_KEY}: {exc}") from None
    configs: dict[str, dict[str, Any]] = {}
    for key, value in packed.items():
        net, _, name = key.partition(".")
        configs.setdefault(net, {})[name] = value
    for net, config in configs.items():
        if config.get("use_dora"):
            raise InputError(f"{path.name}: DoRA is not supported ({net}.use_dora); only plain LoRA is")
    return configs


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``alpha_pattern`` lookup: a key matches the module name or a dotted suffix of it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _kohya_layers(path: Path, tensors: dict[str, np.ndarray]) -> tuple[LoraLayer, ...]:
    groups: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _KOHYA.match(key)
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[match["part"]]
        groups.setdefault((KOHYA_NETWORKS[match["net"]], match["module"]), {})[part] = value
    layers = []
    for (net, module), group in groups.items():
        down, up = _pair(path, module, group)
        alpha = _scalar(path, f"{module}.alpha", group["alpha"]) if "alpha" in group else down.shape[0]
        layers.append(LoraLayer(net, module, down, up, alpha / down.shape[0]))
    return tuple(layers)


def _pair(path: Path, name: str, pair: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if "down" not in pair or "up" not in pair:
        raise InputError(f"{path.name}: {name} has only its {'up' if 'up' in pair else 'down'} matrix")
    down, up = pair["down"], pair["up"]
    if down.ndim < 2 or up.ndim != down.ndim or up.shape[1] != down.shape[0] or any(d != 1 for d in up.shape[2:]):
        raise InputError(f"{path.name}: {name} has down {list(down.shape)} and up {list(up.shape)}, which do not "
                         "make a low-rank update")
    if not (np.isfinite(down).all() and np.isfinite(up).all()):
        raise InputError(f"{path.name}: {name} holds NaN or Inf values")
    return down, up


def _scalar(path: Path, key: str, value: np.ndarray) -> float:
    if value.size != 1 or not np.isfinite(value).all():
        raise InputError(f"{path.name}: {key} must be one finite number, got shape {list(value.shape)}")
    return float(value.reshape(-1)[0])


def check_loras(loras: Any) -> tuple[Lora, ...]:
    """``loras`` as a tuple of :class:`Lora` (a list or tuple of them; one InputError line otherwise)."""
    if isinstance(loras, (Lora, str, os.PathLike)) or not isinstance(loras, (list, tuple)):
        raise InputError(f"loras must be a list of artrt.runtime.Lora, got {loras!r}")
    for lora in loras:
        if not isinstance(lora, Lora):
            raise InputError(f"loras must be a list of artrt.runtime.Lora, got an item {lora!r}")
    return tuple(loras)


def lora_record(loras: list[Lora] | tuple[Lora, ...], sha256: dict[Path, str] | None = None) -> list[dict[str, Any]]:
    """How the LoRAs appear in image parameters and sampling metadata: file, scale, expert, sha256."""
    record = []
    for lora in loras:
        digest = (sha256 or {}).get(lora.file) or _file_sha256(lora.file)
        record.append({"file": str(lora.file), "scale": lora.scale, "expert": lora.expert, "sha256": digest})
    return record


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    except OSError as exc:
        raise InputError(f"cannot read LoRA file {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


__all__ = ["EXPERTS", "Lora", "LoraFile", "LoraLayer", "check_loras", "lora_record", "read_lora_file",
           "read_safetensors"]
