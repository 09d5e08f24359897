"""Pipeline behaviour beyond parity: ancestral noise, NaN guard, timings, batching."""

from __future__ import annotations

import numpy as np
import pytest

from artrt.errors import EngineError, InputError
from artrt.runtime.denoise import step_tables
from artrt.runtime.experts import Segment, plan_experts, switch_cutoff
from artrt.runtime.samplers import plan_steps
from artrt.runtime.schedules import Sampler, ScheduleConfig


def _pixels(out) -> np.ndarray:
    return np.stack([np.asarray(image) for image in out.images])


def test_euler_ancestral_is_seeded_and_differs_from_euler(sdxl_pipe):
    a = _pixels(sdxl_pipe.generate("p", steps=6, sampler="euler_a", seed=3))
    assert np.array_equal(a, _pixels(sdxl_pipe.generate("p", steps=6, sampler="euler_a", seed=3)))
    assert not np.array_equal(a, _pixels(sdxl_pipe.generate("p", steps=6, sampler="euler_a", seed=4)))
    assert not np.array_equal(a, _pixels(sdxl_pipe.generate("p", steps=6, sampler="euler", seed=3)))


def test_noise_table_only_for_ancestral_steps():
    config = ScheduleConfig()
    segments = [Segment(0, 0, 4, 5.0), Segment(1, 4, 6, 3.0)]
    table, noise = step_tables(plan_steps(config, Sampler.EULER, 6).scalars, segments, (1, 4, 2, 2),
                               np.random.default_rng(0))
    assert noise is None
    assert list(table[:, 4]) == [5.0] * 4 + [3.0] * 2
    _, noise = step_tables(plan_steps(config, Sampler.EULER_A, 6).scalars, segments, (1, 4, 2, 2),
                           np.random.default_rng(0))
    assert noise.shape == (6, 1, 4, 2, 2) and np.all(noise[:-1].std(axis=(1, 2, 3, 4)) > 0)


def test_batch_images_equal_single_images_with_same_latents(sdxl_pipe):
    latents = np.random.default_rng(1).standard_normal((2, 4, 16, 16), dtype=np.float32)
    both = _pixels(sdxl_pipe.generate("p", steps=4, latents=latents, num_images=2))
    second = _pixels(sdxl_pipe.generate("p", steps=4, latents=latents[1:], num_images=1))
    assert np.abs(both[1].astype(int) - second[0].astype(int)).max() <= 1


def test_nan_latents_are_refused(sdxl_pipe):
    latents = np.full((1, 4, 16, 16), np.nan, np.float32)
    with pytest.raises(InputError, match="latents contain NaN"):
        sdxl_pipe.generate("p", steps=2, latents=latents)


def test_overflow_in_the_loop_is_reported_with_what_ran(sdxl_pipe):
    """Finite but huge guidance overflows fp32 inside the graph: the error names the stage, the
    components, their precision and backend, and does not blame an fp16 VAE on an fp32 run."""
    with pytest.raises(EngineError) as caught:
        sdxl_pipe.generate("p", steps=2, guidance=3e38)
    message = str(caught.value)
    assert "NaN/Inf in the final latents" in message and "ran on ort-cpu" in message
    assert "expert_composition (fp32)" in message and "fp16" not in message


def test_wrong_latent_shape(sdxl_pipe):
    with pytest.raises(InputError, match="latents have shape"):
        sdxl_pipe.generate("p", steps=2, latents=np.zeros((1, 4, 8, 8), np.float32))


def test_timings_cover_every_stage(sdxl_pipe):
    out = sdxl_pipe.generate("p", steps=4, switch=0.5)
    assert {"tokenize", "text_encoder", "text_encoder_2", "expert:composition", "expert:detail",
            "decode", "total"} <= set(out.timings)
    assert out.timings["total"] >= out.timings["expert:composition"] > 0


@pytest.mark.parametrize("switch, first", [(1.0, 10), (0.0, 0), (0.8, 8)])
def test_expert_plan_edges(switch, first):
    timesteps = plan_steps(ScheduleConfig(), Sampler.EULER, 10).timesteps
    segments = plan_experts(timesteps, switch, 1000, (5.0, 5.0))
    assert sum(s.stop - s.start for s in segments) == 10
    assert (segments[0].stop if segments[0].expert == 0 else 0) == first
    assert all(timesteps[: first] >= switch_cutoff(switch, 1000))
