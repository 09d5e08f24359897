"""Several requests that share shape and settings as one batched loop on a loaded ``Pipeline``.

The requests are stacked along the batch axis: each keeps its own prompt, negative prompt, seed
and image count. Its initial noise and (ancestral samplers) step noise are drawn from its own
``numpy.random.default_rng(seed)`` in the order a lone :meth:`Pipeline.generate` draws them, its
text is encoded alone, and the conditioning rows are ordered ``[unconditional of every request,
conditional of every request]`` as the fused step expects. One engine call per step then runs the
whole batch, and the decoder one call for it, so each request gets the images it gets alone up to
the engine's batched arithmetic (``tests/test_serve_batching.py``).

This is the pipeline's resident path applied to a batch; it uses the pipeline's engines, not its
lock or loop buffers, so the caller must be the only user of the pipeline (the server's worker).
Where a batch cannot run this way (low memory, tiled decode, engine profiles that exclude the
batch, not enough memory, video) the requests run through :meth:`Pipeline.generate_many`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from artrt.errors import ArtrtError, EngineError

from ..arguments import GenerationArguments
from ..budget import check_fits, request_cost
from ..conditioning import EncodedText, build_conditioning
from ..denoise import LoopBuffers, can_capture, denoise
from ..engine_records import check_profiles
from ..experts import Segment, history_resets, plan_experts
from ..images import to_pil
from ..pipeline import GenerationResult, Pipeline
from ..samplers import StepPlan, plan_steps
from ..video import is_flow
from .protocol import ImageRequest


class BatchRunner:
    """Runs groups of requests with one key (:attr:`ImageRequest.key`) on ``pipe``; owns its loop buffers."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self._buffers: LoopBuffers | None = None

    def run(self, requests: Sequence[ImageRequest]) -> list[GenerationResult]:
        """The results of ``requests`` (one key), in order: one batched loop where :meth:`can_batch`."""
        if len(requests) == 1:
            return [self.pipe.generate(**requests[0].generate_kwargs())]
        if not self.can_batch(requests):
            return self.pipe.generate_many([r.generate_kwargs() for r in requests])
        return self._run_batched(requests)

    def can_batch(self, requests: Sequence[ImageRequest]) -> bool:
        """Whether ``requests`` can run as one batched loop on this pipeline."""
        pipe, first = self.pipe, requests[0].args
        if pipe.memory != "default" or pipe.vae_tile is not None or len({r.key for r in requests}) != 1:
            return False
        if is_flow(pipe.manifest) or first.num_frames != 1:  # Wan plans its steps its own way
            return False
        images = sum(r.args.num_images for r in requests)
        try:
            check_profiles(pipe.root, pipe.manifest, pipe.backend, images, first.height, first.width)
            shape = (images, *first.latent_shape(pipe.manifest)[1:])
            cost = request_cost(shape, first.height, first.width, first.steps, first.sampler.draws_noise)
            check_fits(cost, f"a batch of {images} images")
        except ArtrtError:
            return False
        return True

    def _run_batched(self, requests: Sequence[ImageRequest]) -> list[GenerationResult]:
        started = time.perf_counter()
        pipe, m, first = self.pipe, self.pipe.manifest, requests[0].args
        timings: dict[str, float] = {}
        noise = StackedNoise([np.random.default_rng(r.args.seed) for r in requests],
                             [r.args.num_images for r in requests])
        images = sum(r.args.num_images for r in requests)
        initial = noise.standard_normal((images, *first.latent_shape(m)[1:]), dtype=np.float32)
        encoded = self._encode(requests, timings)
        plan, segments = self._plan(first)
        experts = m.experts
        engines = [pipe.engines[e.component] for e in experts]
        buffers = self._loop_buffers(initial.shape)
        for expert, engine in zip(experts, engines):
            feeds = [build_conditioning(expert.conditioning, enc, not r.args.negative_prompt, r.args.num_images,
                                        first.height, first.width) for r, enc in zip(requests, encoded)]
            buffers.set_conditioning(expert.name, engine, _stack_conditioning(feeds, requests))
        capture = pipe.cuda_graphs and can_capture(engines, buffers)
        final = denoise(engines, [e.name for e in experts], buffers, initial * np.float32(plan.init_noise_sigma),
                        plan.scalars, segments, noise, timings, capture=capture)  # type: ignore[arg-type]
        decoded = self._decode(final, timings)
        timings["total"] = time.perf_counter() - started
        loras = {"loras": pipe.loras} if pipe.loras else {}  # recorded as Pipeline.generate records them
        results, start = [], 0
        for r in requests:
            stop = start + r.args.num_images
            results.append(GenerationResult(decoded[start:stop], dict(timings), {**r.args.record(m), **loras}))
            start = stop
        return results

    def _encode(self, requests: Sequence[ImageRequest], timings: dict[str, float]) -> list[dict[str, EncodedText]]:
        """Each request's text, encoded alone (as :meth:`Pipeline.generate` encodes it)."""
        pipe = self.pipe
        tick = time.perf_counter()
        ids = [{name: tok([r.args.negative_prompt, r.args.prompt]) for name, tok in pipe.tokenizers.items()}
               for r in requests]
        timings["tokenize"] = time.perf_counter() - tick
        encoded: list[dict[str, EncodedText]] = [{} for _ in requests]
        for name, comp in pipe.manifest.components.items():
            if comp.kind != "text_encoder":
                continue
            tick = time.perf_counter()
            for request_ids, out in zip(ids, encoded):
                result = pipe.engines[name].run({"input_ids": request_ids[comp.tokenizer]})
                out[name] = EncodedText(result["hidden_states"], result.get("pooled"))
            timings[name] = time.perf_counter() - tick
        return encoded

    def _plan(self, args: GenerationArguments) -> tuple[StepPlan, list[Segment]]:
        """The step plan and expert segments shared by the batch (as the pipeline plans one request)."""
        schedule = self.pipe.schedule
        plan = plan_steps(schedule, args.sampler, args.steps)
        segments = plan_experts(plan.timesteps, args.switch, schedule.num_train_timesteps, args.guidance)
        if len(segments) > 1:
            plan = plan_steps(schedule, args.sampler, args.steps, history_resets(segments))
        return plan, segments

    def _decode(self, final: np.ndarray, timings: dict[str, float]) -> list[Image.Image]:
        m = self.pipe.manifest
        _check_finite(final, "the final latents")
        if m.decoder is None:
            return to_pil(final, pixel_space=True)
        tick = time.perf_counter()
        pixels = self.pipe.engines[m.decoder].run({"latents": final})["image"]
        _check_finite(pixels, "the decoded image")
        images = to_pil(pixels)
        timings["decode"] = time.perf_counter() - tick
        return images

    def _loop_buffers(self, shape: tuple[int, ...]) -> LoopBuffers:
        if self._buffers is None or self._buffers.shape != shape:
            if self._buffers is not None:
                self._buffers.release()
            memory = None
            if self.pipe.device == "cuda":
                from ..device_memory import DeviceMemory

                memory = DeviceMemory(self.pipe.stream)
            self._buffers = LoopBuffers(shape, memory)
        return self._buffers

    def close(self) -> None:
        """Free the loop buffers (before the pipeline closes)."""
        if self._buffers is not None:
            self._buffers.release()
            self._buffers = None


class StackedNoise:
    """A batch's noise drawn as each request's own generator draws it alone: the rows of request
    ``k`` come from ``rngs[k]``. Stands in for a ``numpy.random.Generator`` where the loop draws
    its initial and per-step noise (``standard_normal`` is the one method it calls)."""

    def __init__(self, rngs: Sequence[np.random.Generator], counts: Sequence[int]) -> None:
        self.rngs, self.counts = list(rngs), list(counts)

    def standard_normal(self, shape: tuple[int, ...], dtype: type = np.float64) -> np.ndarray:
        if shape[0] != sum(self.counts):
            raise ValueError(f"noise of batch {shape[0]} for requests of {self.counts} images")
        rows = shape[1:]
        return np.concatenate([rng.standard_normal((n, *rows), dtype=dtype) for rng, n in zip(self.rngs, self.counts)])


def _stack_conditioning(feeds: Sequence[dict[str, np.ndarray]], requests: Sequence[ImageRequest]
                        ) -> dict[str, np.ndarray]:
    """One expert's conditioning of several requests: ``[unconditional of each, conditional of each]``."""
    counts = [r.args.num_images for r in requests]
    return {name: np.concatenate([f[name][:n] for f, n in zip(feeds, counts)] +
                                 [f[name][n:] for f, n in zip(feeds, counts)])
            for name in feeds[0]}


def _check_finite(array: np.ndarray, what: str) -> None:
    if not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise EngineError(f"{bad} of {array.size} values are NaN/Inf in {what} of a batched run, from finite inputs")
