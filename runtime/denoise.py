"""The sampling loop: one fused engine call per step, experts switched mid-loop.

All host buffers for one latent shape live in :class:`LoopBuffers` and are bound to
the expert engines once; a step only writes its nine scalars (and, for ancestral
samplers, fresh noise) into bound buffers and runs. Latents and denoised estimates
ping-pong between two buffers each, so no step allocates.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from artrt.engines import Engine

from .experts import Segment
from .samplers import STEP_SCALARS

_D_COLUMN = STEP_SCALARS.index("d")
_GUIDANCE_COLUMN = STEP_SCALARS.index("guidance")


class LoopBuffers:
    """Latent, noise, scalar and conditioning buffers for one ``(batch, C, h, w)`` shape."""

    def __init__(self, shape: tuple[int, int, int, int]) -> None:
        self.shape = shape
        self.samples = [np.zeros(shape, np.float32), np.zeros(shape, np.float32)]
        self.denoised = [np.zeros(shape, np.float32), np.zeros(shape, np.float32)]
        self.noise = np.zeros(shape, np.float32)
        self.step = np.zeros(len(STEP_SCALARS), np.float32)
        self.conditioning: dict[str, dict[str, np.ndarray]] = {}
        self._bindings: dict[tuple[str, int], Any] = {}

    def set_conditioning(self, expert: str, feeds: Mapping[str, np.ndarray]) -> None:
        """Copy an expert's conditioning into its persistent buffers (allocated on first use)."""
        current = self.conditioning.get(expert)
        if current is None or any(current[k].shape != v.shape for k, v in feeds.items()):
            self.conditioning[expert] = {k: np.ascontiguousarray(v, np.float32) for k, v in feeds.items()}
            self._bindings = {key: b for key, b in self._bindings.items() if key[0] != expert}
            return
        for name, value in feeds.items():
            np.copyto(current[name], value)

    def binding(self, expert: str, engine: Engine, parity: int) -> Any:
        """The engine binding that reads buffers ``parity`` and writes ``1 - parity``."""
        key = (expert, parity)
        if key not in self._bindings:
            inputs = {
                "sample": self.samples[parity],
                "denoised_prev": self.denoised[parity],
                "noise": self.noise,
                "step": self.step,
                **self.conditioning[expert],
            }
            outputs = {"next_sample": self.samples[1 - parity], "denoised": self.denoised[1 - parity]}
            self._bindings[key] = engine.bind(inputs, outputs)
        return self._bindings[key]


def denoise(
    engines: Sequence[Engine],
    names: Sequence[str],
    buffers: LoopBuffers,
    initial: np.ndarray,
    scalars: np.ndarray,
    segments: Sequence[Segment],
    rng: np.random.Generator,
    timings: dict[str, float],
) -> np.ndarray:
    """Run every step of ``segments``; returns the final latents (a view into ``buffers``).

    ``scalars`` is the ``[steps, 9]`` table of the step plan; each segment's guidance is
    written into its rows. Seconds spent per expert are added to ``timings``.
    """
    table = np.array(scalars, dtype=np.float32, copy=True)
    for segment in segments:
        table[segment.start : segment.stop, _GUIDANCE_COLUMN] = segment.guidance
    np.copyto(buffers.samples[0], initial)
    buffers.denoised[0].fill(0.0)
    parity = 0
    for segment in segments:
        engine, name = engines[segment.expert], names[segment.expert]
        bound = [buffers.binding(name, engine, 0), buffers.binding(name, engine, 1)]
        started = time.perf_counter()
        for i in range(segment.start, segment.stop):
            buffers.step[:] = table[i]
            if table[i, _D_COLUMN] != 0.0:
                rng.standard_normal(out=buffers.noise, dtype=np.float32)
            engine.run_bound(bound[parity])
            parity ^= 1
        key = f"expert:{name}"
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - started
    return buffers.samples[parity]
