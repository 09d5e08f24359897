"""Cancelling a running generation (``cancel=`` on generate and generate_many): it stops between
steps, raises Cancelled, and leaves the pipeline as it was (the next call gives the same images)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from artrt.errors import Cancelled, InputError
from artrt.runtime import Pipeline


class CancelAfter:
    """A cancel event that reads as set from its ``n``-th check on, counting the checks."""

    def __init__(self, n: int) -> None:
        self.n, self.checks = n, 0

    def is_set(self) -> bool:
        self.checks += 1
        return self.checks >= self.n


@pytest.fixture(scope="module", params=["default", "low"])
def pipe(request, sdxl_package):
    with Pipeline.load(sdxl_package, backend="ort-cpu", threads=1, memory=request.param) as loaded:
        yield loaded


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image) for image in result.images])


def test_a_cancelled_call_stops_between_steps_and_leaves_the_pipeline_intact(pipe):
    before = _pixels(pipe.generate("a cat", steps=8, seed=3))
    event = CancelAfter(4)  # checked before encoding, then after each step
    with pytest.raises(Cancelled, match="cancelled by the caller"):
        pipe.generate("a cat", steps=8, seed=3, cancel=event)
    assert event.checks == 4  # stopped at the check after step 3 of 8
    assert np.array_equal(_pixels(pipe.generate("a cat", steps=8, seed=3)), before)
    done = threading.Event()
    with pytest.raises(Cancelled):
        done.set()
        pipe.generate("a cat", steps=8, seed=3, cancel=done)  # set before the call: nothing runs
    assert np.array_equal(_pixels(pipe.generate("a cat", steps=8, seed=3, cancel=threading.Event())), before)


def test_generate_many_stops_only_when_every_request_is_cancelled(pipe):
    calls = [dict(prompt="a cat", seed=1, steps=4), dict(prompt="a dog", seed=2, steps=4)]
    alone = [_pixels(pipe.generate(**call)) for call in calls]
    cancelled = threading.Event()
    cancelled.set()
    for batch in (False, True):
        results = pipe.generate_many([{**calls[0], "cancel": cancelled}, {**calls[1], "cancel": threading.Event()}],
                                     batch=batch)
        assert all(np.array_equal(_pixels(r), a) for r, a in zip(results, alone))
        with pytest.raises(Cancelled):
            pipe.generate_many([{**call, "cancel": cancelled} for call in calls], batch=batch)


def test_cancel_must_be_an_event(pipe):
    with pytest.raises(InputError, match="cancel must be a threading.Event"):
        pipe.generate("a cat", steps=2, cancel=True)
