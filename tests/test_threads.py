"""A Pipeline shared by threads: every concurrent call gets the images a sequential call gets."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from artrt.errors import InputError


def _pixels(out) -> np.ndarray:
    return np.stack([np.asarray(image) for image in out.images])


@pytest.mark.parametrize("sampler", ["euler", "euler_a"])
def test_concurrent_calls_match_sequential_calls(sdxl_pipe, sampler):
    """Six threads at once, each its own seed, image count and switch (so buffers are reallocated
    and both experts run in different splits while other calls are in flight)."""
    calls = [dict(seed=100 + k, num_images=1 + k % 3, switch=(0.5, 0.8, 1.0)[k % 3], steps=4, sampler=sampler)
             for k in range(6)]
    expected = [_pixels(sdxl_pipe.generate("a lighthouse", **c)) for c in calls]
    for _ in range(3):
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            results = list(pool.map(lambda c: _pixels(sdxl_pipe.generate("a lighthouse", **c)), calls))
        for k, (got, want) in enumerate(zip(results, expected)):
            assert got.shape == want.shape and np.array_equal(got, want), f"call {k} differs from its sequential run"


def test_generate_after_close_says_the_pipeline_is_closed(sdxl_package):
    from artrt.runtime import Pipeline

    pipe = Pipeline.load(sdxl_package, backend="ort-cpu", threads=1)
    pipe.close()
    with pytest.raises(InputError, match="Pipeline is closed"):
        pipe.generate("p", steps=2)
