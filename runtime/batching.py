"""Several requests with the same settings as one engine batch, each getting the images it gets alone.

Requests are stacked along the batch axis. Each keeps its own prompt, negative prompt, seed and image
count: its initial noise was drawn from its own generator, and :class:`StackedNoise` draws a batch's
per-step noise (ancestral samplers) row block by row block from each request's generator, in the
order a lone request draws it. The fused step takes its conditioning as ``[unconditional x B,
conditional x B]``, so :func:`stack_conditioning` orders the rows ``[unconditional of each request,
conditional of each request]``. Used by :meth:`artrt.runtime.Pipeline.generate_many` (``batch=True``)
and the server's dynamic batching.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .arguments import GenerationArguments


def batch_key(args: GenerationArguments) -> GenerationArguments:
    """What requests must share to run as one batch: every argument but the prompts, the seed and the
    image count (size, frames, steps, guidance, switch, sampler)."""
    return dataclasses.replace(args, prompt="", negative_prompt="", seed=0, num_images=1)


class StackedNoise:
    """A batch's noise drawn as each request's own generator draws it alone: the rows of request ``k``
    come from ``rngs[k]``. Stands in for the ``numpy.random.Generator`` of a batched loop, which
    draws with ``standard_normal`` only."""

    def __init__(self, rngs: Sequence[np.random.Generator], counts: Sequence[int]) -> None:
        self.rngs, self.counts = list(rngs), list(counts)

    def standard_normal(self, shape: tuple[int, ...], dtype: Any = np.float64) -> np.ndarray:
        if shape[0] != sum(self.counts):
            raise ValueError(f"noise of batch {shape[0]} for requests of {self.counts} images")
        return np.concatenate([rng.standard_normal((n, *shape[1:]), dtype=dtype)
                               for rng, n in zip(self.rngs, self.counts)])


def stack_conditioning(feeds: Sequence[Mapping[str, np.ndarray]], counts: Sequence[int]) -> dict[str, np.ndarray]:
    """One expert's conditioning of several requests (``2 x count`` rows each, unconditional half
    first) as one batch's: ``[unconditional of each request, conditional of each request]``."""
    return {name: np.concatenate([f[name][:n] for f, n in zip(feeds, counts)] +
                                 [f[name][n:] for f, n in zip(feeds, counts)])
            for name in feeds[0]}


def split(items: Sequence[Any], counts: Sequence[int]) -> list[list[Any]]:
    """``items`` cut into consecutive runs of ``counts``."""
    bounds = np.cumsum([0, *counts])
    return [list(items[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
