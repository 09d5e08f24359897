"""What a generation request costs in memory, estimated before any work, and the check that
refuses what cannot fit with one line.

The estimate adds up the host arrays the runtime allocates itself (exact: initial noise, the
loop's ping-pong buffers, the per-step noise table of ancestral samplers, decoded pixels and
8-bit images) and the engines' working memory, which grows with the pixels of a batch. The
latter is an upper-bound model, ``ACTIVATION_BYTES_PER_PIXEL`` bytes per output pixel, taken
from SDXL's VAE decoder at full resolution (128-channel fp32 feature maps, a few alive at once),
the largest per-pixel consumer among the components artrt runs; smaller models use less.
Measured calibration: ``docs/requests.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from artrt.errors import InputError

from .engine_records import check_cpu_graphs
from .package import Manifest, graph_bytes

ACTIVATION_BYTES_PER_PIXEL = 4096
# ONNX Runtime CPU holds about 4 score-sized tensors at an attention's peak (scores, scaled, softmax,
# ...): measured on the demo model's plain graph, 256 and 384 px (docs/requests.md)
ATTENTION_COPIES = 4
HEADROOM = 0.9  # of the available memory a request may plan to use
GIB = 2**30


@dataclass(frozen=True)
class RequestCost:
    """Estimated peak bytes of one request, by part."""

    buffers: int  # noise, loop buffers, step-noise table
    pixels: int  # decoded float pixels and 8-bit images
    activations: int  # engines' working memory (upper-bound model)
    attention: int = 0  # the largest attention's scores on the CPU (:func:`attention_bytes`)

    @property
    def total(self) -> int:
        return self.buffers + self.pixels + self.activations + self.attention


def attention_bytes(manifest: Manifest, latent_shape: tuple[int, ...]) -> int:
    """Peak bytes of the largest attention of any component for one engine batch of ``latent_shape``
    on ONNX Runtime CPU, which materializes ``[batch, heads, tokens, tokens]`` float scores and a few
    same-size intermediates (:data:`ATTENTION_COPIES`); experts run twice the batch (guidance).
    0 for packages exported before components recorded their attention."""
    batch, *_, height, width = (int(d) for d in latent_shape)
    frames = int(latent_shape[2]) if len(latent_shape) == 5 else 1
    largest = 0
    for comp in manifest.components.values():
        a = comp.attention
        if a is None:
            continue
        tokens = -(-height // a.stride) * -(-width // a.stride) * (frames if a.frames else 1)
        rows = batch * (2 if comp.kind == "fused_step" else 1)
        largest = max(largest, rows * a.heads * tokens * tokens * 4 * ATTENTION_COPIES)
    return largest


def request_cost(
    latent_shape: tuple[int, ...], height: int, width: int, steps: int, noisy: bool, noise_images: int | None = None,
    frames: int = 1, attention: int = 0,
) -> RequestCost:
    """The cost of one engine batch of ``latent_shape[0]`` images (videos of ``frames`` frames) of
    ``height`` x ``width``.

    ``noisy``: the sampler draws fresh noise every step (a ``[steps, *latent_shape]`` table).
    ``noise_images``: rows of initial noise drawn for the request when more than the batch
    (offline sampling draws an item's whole noise at once). ``attention``: :func:`attention_bytes`
    where the engines run on the CPU.
    """
    batch = int(latent_shape[0])
    per_image = 4
    for d in latent_shape[1:]:
        per_image *= int(d)
    latents = per_image * batch
    buffers = latents * 8 + per_image * max(noise_images or 0, batch)  # 2 samples, 2 denoised, noise, step, read
    if noisy:
        buffers += latents * steps
    pixels = batch * frames * height * width * 3 * (4 + 2)  # float32 decoder output, uint8 array and PIL image
    # a video decoder makes up to 4 frames per call (docs/wan-design.md) and carries its caches
    activations = batch * min(frames, 4) * height * width * ACTIVATION_BYTES_PER_PIXEL
    return RequestCost(buffers, pixels, activations, attention)


def available_memory() -> int | None:
    """Bytes the system can still give this process (Linux ``MemAvailable``), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _short(need: int, available: int | None) -> int | None:
    """The memory left (``available``, else :func:`available_memory`) when ``need`` does not fit in
    :data:`HEADROOM` of it; None when it fits or the memory left is unknown."""
    available = available_memory() if available is None else available
    return None if available is None or need <= HEADROOM * available else available


def check_fits(cost: RequestCost, what: str, available: int | None = None) -> None:
    """Raise :class:`InputError` when ``cost`` exceeds the memory this machine has left."""
    available = _short(cost.total, available)
    if available is None:
        return
    raise InputError(
        f"{what} needs about {cost.total / GIB:.1f} GiB of memory (engines {cost.activations / GIB:.1f}, "
        + (f"attention {cost.attention / GIB:.1f}, " if cost.attention else "")
        + f"buffers {(cost.buffers + cost.pixels) / GIB:.1f}); {available / GIB:.1f} GiB is available: "
        "ask for fewer images or a smaller size"
    )


def weight_bytes(manifest: Manifest, component: str) -> int:
    """Bytes of the graph ONNX Runtime CPU loads for ``component``, external data included
    (0 when the package has no CPU graph for it: exported with ``--targets cuda``)."""
    graph = manifest.components[component].cpu_graph
    return 0 if graph is None else graph_bytes(manifest, graph)


def check_load_fits(root: Path, manifest: Manifest, backend: str, memory: str, available: int | None = None,
                    lora_bytes: Mapping[str, int] | None = None) -> None:
    """Refuse, before loading, a package that ``ort-cpu`` cannot run: one without CPU graphs
    (:func:`check_cpu_graphs`), or whose CPU graphs cannot fit in the memory left: all of them
    in the default mode, the largest one with ``memory="low"`` (GPU backends hold weights on the device).
    ``lora_bytes``: per component, the weights LoRAs replace (held beside the graph's own)."""
    if backend != "ort-cpu":
        return
    check_cpu_graphs(root, manifest)
    extra = lora_bytes or {}
    sizes = {name: weight_bytes(manifest, name) + extra.get(name, 0) for name in manifest.components}
    need = sum(sizes.values()) if memory == "default" else max(sizes.values(), default=0)
    available = _short(need, available)
    if available is None:
        return
    hint = ("; try --memory low (one component resident at a time, about "
            f"{max(sizes.values()) / GIB:.1f} GiB)" if memory == "default" else "")
    with_loras = f" (LoRA weights {sum(extra.values()) / GIB:.1f} GiB)" if extra else ""
    raise InputError(f"{root} needs about {need / GIB:.1f} GiB of memory for its weights{with_loras}; "
                     f"{available / GIB:.1f} GiB is available{hint}")


def check_lora_swap_fits(lora_bytes: Mapping[str, int], available: int | None = None) -> None:
    """Refuse a LoRA swap whose largest component's new weights (computed one component at a
    time, beside the weights in use) cannot fit in the memory left."""
    need = max(lora_bytes.values(), default=0)
    available = _short(need, available)
    if available is None:
        return
    raise InputError(f"these LoRAs replace about {need / GIB:.1f} GiB of one component's weights, computed beside "
                     f"the weights in use; {available / GIB:.1f} GiB is available")
