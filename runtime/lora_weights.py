"""Place LoRAs on a package's components and compute the weights they give.

Each component's ``lora_targets.json`` (written at export, :mod:`artrt.export.lora_targets`)
maps the diffusers module names a LoRA uses to the ONNX initializers that hold their weights,
with shapes. :func:`prepare_loras` checks every LoRA against it before anything changes (a
target that does not exist, or a shape that differs, is one :class:`InputError` line naming
the first such target and how many matched); :meth:`LoraPlan.weights` then computes, per
component, every adapted weight ``W' = W + Σ scale · scaling · up @ down`` in fp32 from the
**base** weight read from the graph file, cast to the graph's dtype. Deltas always start from the base weights, so a
new set of LoRAs replaces the last one and never stacks on it; an empty set gives no
replacements at all (the graph's own weights, exactly).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from artrt.engines.onnx_weights import read_initializers
from artrt.errors import InputError, PackageError

from .lora import Lora, LoraFile, LoraLayer, check_loras, lora_record, read_lora_file
from .package import Manifest, resolve

log = logging.getLogger(__name__)

TARGETS_FILE = "lora_targets.json"
TARGETS_FORMAT = "artrt-lora-targets"
EXPERT_NETWORKS = ("unet", "transformer")


@dataclass(frozen=True)
class ComponentTargets:
    """One component's ``lora_targets.json``: module -> {shape, fp32/fp16: {name, transposed}}."""

    component: str
    targets: dict[str, dict[str, Any]]
    unused: frozenset[str]
    layers_per_block: int | None = None
    kohya: dict[str, str] = field(default_factory=dict)  # module name with "_" for "." -> module name

    @classmethod
    def read(cls, root: Path, component: str, lean: bool = False) -> ComponentTargets:
        """``lean``: the package's graphs were rewritten by :mod:`artrt.export.lean_weights`."""
        path = resolve(root, f"{component}/{TARGETS_FILE}")
        if not path.is_file():
            fix = ("its lean graphs (fp16 weights behind casts) take no LoRA: use a full export (for the demo "
                   "model: python -m artrt.export.shapes_demo --fp32 --out DIR)" if lean
                   else "export the package with an artrt that writes them to use LoRA")
            raise InputError(f"{root} has no LoRA targets for {component} ({component}/{TARGETS_FILE}): {fix}")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != TARGETS_FORMAT or data.get("version") != 1:
                raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}")
            targets, unused = dict(data["targets"]), frozenset(data.get("unused", ()))
            layers = data.get("network", {}).get("layers_per_block")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PackageError(f"{path} is not a LoRA targets file: {exc}") from None
        names = [*targets, *unused]
        return cls(component, targets, unused, layers, {n.replace(".", "_"): n for n in names})

    def module(self, layer: LoraLayer, kohya: bool) -> str | None:
        """The module name ``layer`` adapts here, or None when the component has no such weight."""
        if not kohya:
            return layer.module if layer.module in self.targets or layer.module in self.unused else None
        name = self.kohya.get(layer.module)
        if name is None and self.layers_per_block is not None:
            name = self.kohya.get(sgm_to_diffusers(layer.module, self.layers_per_block))
        return name

    def problem(self, module: str | None, layer: LoraLayer, network: str) -> str | None:
        """Why ``layer`` cannot apply to ``module`` (None: it can)."""
        if module is None:
            return f"{network} {layer.module} is not a weight of {self.component}"
        if module in self.unused:
            return None
        target = self.targets[module]
        shape = tuple(target["shape"])
        if not _same_weight(shape, layer.shape):
            return (f"{module} is {list(layer.shape)} in the LoRA, {list(shape)} in {self.component} "
                    "(a LoRA for another model?)")
        shared = {m for p in ("fp32", "fp16") for m in (target.get(p) or {}).get("shared_with", ())}
        if shared:
            return f"{module} shares its stored weight with {sorted(shared)[0]} in {self.component}'s graph"
        return None


def _same_weight(shape: tuple[int, ...], update: tuple[int, ...]) -> bool:
    """Equal shapes, or a Linear update for a 1x1 convolution (or the reverse)."""
    if shape == update:
        return True
    trim = lambda s: tuple(s[:2]) if all(d == 1 for d in s[2:]) else s
    return trim(shape) == trim(update)


_SGM = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$")
_SGM_MIDDLE = re.compile(r"^middle_block_(\d+)_(.+)$")
_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut"}


def sgm_to_diffusers(name: str, layers_per_block: int) -> str:
    """A kohya SDXL module name in the original UNet's (SGM) blocks -> the diffusers one, both with
    ``_`` for ``.``: ``input_blocks_4_1_proj_in`` -> ``down_blocks_1_attentions_0_proj_in`` (as
    diffusers' ``_maybe_map_sgm_blocks_to_diffusers``). Names outside the blocks are returned as
    they are, but for the embedding layers diffusers also renames."""
    simple = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
              "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2",
              "input_blocks_0_0": "conv_in", "out_2": "conv_out"}
    if name in simple:
        return simple[name]
    middle = _SGM_MIDDLE.match(name)
    if middle is not None:
        part = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}.get(int(middle[1]))
        return name if part is None else f"mid_block_{part}_{_SGM_RESNET.get(middle[2], middle[2])}"
    match = _SGM.match(name)
    if match is None:
        return name
    kind, block, inner, rest = match[1], int(match[2]), int(match[3]), match[4]
    rest = _SGM_RESNET.get(rest, rest)
    per = layers_per_block + 1
    if kind == "input_blocks":
        if rest == "op":
            return f"down_blocks_{(block - 1) // per}_downsamplers_0_conv"
        part = ("resnets", "attentions")[min(inner, 1)]
        return f"down_blocks_{(block - 1) // per}_{part}_{(block - 1) % per}_{rest}"
    if inner == 2 or (inner == 1 and rest == "conv"):
        return f"up_blocks_{block // per}_upsamplers_0_{rest}"
    part = ("resnets", "attentions")[min(inner, 1)]
    return f"up_blocks_{block // per}_{part}_{block % per}_{rest}"


@dataclass(frozen=True)
class LoraPlan:
    """A checked set of LoRAs: the updates per component and module, and the record of the set.
    :meth:`weights` computes one component's new weights when asked, so a swap holds the new
    weights of one component at a time besides the engines' current ones."""

    updates: dict[str, dict[str, list[tuple[float, LoraLayer]]]]  # component -> module -> (scale, layer)
    targets: dict[str, ComponentTargets]
    files: Mapping[str, Path]
    precisions: Mapping[str, str]
    record: list[dict[str, Any]]

    def replaced_bytes(self) -> dict[str, int]:
        """Per component, the bytes of the new weights :meth:`weights` will compute (none read yet)."""
        out: dict[str, int] = {}
        for component, modules in self.updates.items():
            targets, itemsize = self.targets[component].targets, 4 if self.precisions[component] == "fp32" else 2
            out[component] = sum(int(np.prod(targets[m]["shape"])) * itemsize
                                 for m in modules if targets[m].get(self.precisions[component]) is not None)
        return out

    def weights(self, component: str) -> dict[str, np.ndarray]:
        """Initializer -> new values of ``component`` (``{}``: its file's own weights)."""
        terms = self.updates.get(component)
        if not terms:
            return {}
        return _merge(self.targets[component], self.files[component], self.precisions[component], terms)


def prepare_loras(root: Path, manifest: Manifest, loras: Sequence[Lora], files: Mapping[str, Path],
                  precisions: Mapping[str, str]) -> LoraPlan:
    """Read ``loras`` and check every one against the package (before any weight is computed).
    ``files``: per component, the ONNX file whose initializers its engine uses (the base weights
    are read from it); ``precisions``: ``fp32`` or ``fp16``, which graph of ``lora_targets.json``
    that file is."""
    read = [(lora, read_lora_file(lora.file)) for lora in check_loras(loras)]
    cache: dict[str, ComponentTargets] = {}
    updates: dict[str, dict[str, list[tuple[float, LoraLayer]]]] = {}
    for lora, file in read:
        for component, module, layer in _place(root, manifest, lora, file, cache):
            if lora.scale != 0 and module not in cache[component].unused:
                updates.setdefault(component, {}).setdefault(module, []).append((lora.scale, layer))
    record = lora_record([lora for lora, _ in read], {lora.file: file.sha256 for lora, file in read})
    return LoraPlan(updates, cache, files, precisions, record)


def _place(root: Path, manifest: Manifest, lora: Lora, file: LoraFile,
           cache: dict[str, ComponentTargets]) -> list[tuple[str, str, LoraLayer]]:
    """Every (component, module, layer) ``lora`` changes; raises if any of its layers does not fit."""
    experts = [e.component for e in manifest.experts if lora.expert in ("both", e.name)]
    if not experts:
        names = ", ".join(e.name for e in manifest.experts)
        raise InputError(f"LoRA {lora.file.name}: the package has no {lora.expert} expert (its experts: {names})")
    placed, problems, skipped, tried = [], [], 0, set()
    for layer in file.layers:
        if layer.network in EXPERT_NETWORKS:
            components = experts
        elif lora.expert != "both":
            skipped += 1
            continue
        else:
            components = [layer.network]
        for component in components:
            tried.add(component)
            if component not in manifest.components:
                problems.append(f"{layer.network} {layer.module}: the package has no {layer.network}")
                continue
            if component not in cache:
                cache[component] = ComponentTargets.read(root, component, lean="lean" in manifest.source)
            targets = cache[component]
            module = targets.module(layer, file.format == "kohya")
            problem = targets.problem(module, layer, layer.network)
            if problem is None:
                placed.append((component, module, layer))
            else:
                problems.append(problem)
    if skipped:
        log.warning("LoRA %s: %d text-encoder weights not applied: the text encoders serve both experts, so they "
                    "change only with expert 'both' (this LoRA is on %s)", lora.file.name, skipped, lora.expert)
    if problems:
        total = len(placed) + len(problems)
        raise InputError(f"LoRA {lora.file.name} ({lora.expert}): {len(placed)} of {total} weights match "
                         f"{', '.join(sorted(tried))}; the first that does not: {problems[0]}")
    if not placed:
        raise InputError(f"LoRA {lora.file.name}: nothing to apply on expert {lora.expert} (no weights for it)")
    return placed


def _merge(targets: ComponentTargets, file: Path, precision: str,
           terms: Mapping[str, list[tuple[float, LoraLayer]]]) -> dict[str, np.ndarray]:
    """Initializer -> base + the sum of the updates, in the stored layout and dtype."""
    index = read_initializers(file)
    out: dict[str, np.ndarray] = {}
    for module, parts in terms.items():
        stored = targets.targets[module].get(precision)
        if stored is None:  # the graph does not use this weight
            continue
        init = index.get(stored["name"])
        shape = tuple(targets.targets[module]["shape"])
        expected = shape[::-1] if stored["transposed"] else shape
        if init is None or init.dtype is None or init.dtype.kind != "f" or not _same_weight(init.dims, expected):
            found = "none" if init is None else f"{init.dtype}{list(init.dims)}"
            raise PackageError(f"{file.name} has no float initializer {stored['name']!r} of shape {list(expected)} "
                               f"for {module} (found: {found}), which {targets.component}/{TARGETS_FILE} lists for its "
                               f"{precision} graph: a fused or rebuilt graph renamed it; run the package's own graph")
        delta = np.zeros(shape, np.float32)
        for scale, layer in parts:
            delta += np.float32(scale) * layer.update().reshape(delta.shape)
        if stored["transposed"]:
            delta = delta.T
        base = init.read()
        out[stored["name"]] = (base.astype(np.float32) + delta.reshape(base.shape)).astype(base.dtype)
    return out


__all__ = ["ComponentTargets", "LoraPlan", "prepare_loras", "sgm_to_diffusers"]
