"""The expert plan: which expert runs which steps, with which guidance.

The split follows diffusers' ``denoising_end`` / ``denoising_start``: with ``T``
training timesteps, ``cutoff = round(T - switch * T)``; the composition expert runs
every step whose timestep is ``>= cutoff`` and the detail expert the rest. The plan is
computed once, before the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .checks import check_switch


@dataclass(frozen=True)
class Segment:
    """Steps ``[start, stop)`` run by ``experts[expert]`` with classifier-free ``guidance``."""

    expert: int
    start: int
    stop: int
    guidance: float


def switch_cutoff(switch: float, num_train_timesteps: int) -> int:
    """diffusers' discrete timestep cutoff for a switch fraction in [0, 1]."""
    switch = check_switch(switch)
    return int(round(num_train_timesteps - switch * num_train_timesteps))


def plan_experts(
    timesteps: np.ndarray,
    switch: float,
    num_train_timesteps: int,
    guidance: Sequence[float],
) -> list[Segment]:
    """Split the (decreasing) timesteps between one or two experts; empty segments are dropped."""
    if len(guidance) == 1:
        return [Segment(0, 0, len(timesteps), float(guidance[0]))]
    cutoff = switch_cutoff(switch, num_train_timesteps)
    first = int(np.sum(timesteps >= cutoff))
    segments = [Segment(0, 0, first, float(guidance[0])), Segment(1, first, len(timesteps), float(guidance[1]))]
    return [s for s in segments if s.stop > s.start]


def history_resets(segments: Sequence[Segment]) -> tuple[int, ...]:
    """Steps where a multistep solver starts afresh: the first step of every later expert.

    diffusers' SDXL ensemble runs the refiner with its own scheduler, whose solver
    history is empty; artrt does the same, so a DPM-Solver++(2M) step never mixes two
    experts' denoised estimates.
    """
    return tuple(s.start for s in segments[1:])
