"""The demo model in PyTorch with diffusers' own pieces: the parity reference of the tests and
the ``diffusers`` peer of the benchmarks (needs the ``demo`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from artrt.export.shapes_demo import EXPERTS, MAX_TOKENS, PATCH, SCHEDULER_CONFIG, WEIGHTS, load_demo_text_encoder


class TorchDemoPipeline:
    """The demo model sampled with diffusers' own pieces in PyTorch: the parity reference of
    the tests and the ``diffusers`` peer of the benchmarks.

    Two ``UNet2DConditionModel`` on space-to-depth pixels, classifier-free guidance, and
    ``DPMSolverMultistepScheduler`` (a fresh one at the switch, as a refiner pipeline has: no
    solver history crosses experts); MiniLM through transformers. The same network and noise
    as artrt's fused graphs, a different implementation of everything around them.
    """

    def __init__(self, weights: Path = WEIGHTS) -> None:
        from diffusers import UNet2DConditionModel

        from artrt.export.graphs import TextEncoderGraph

        encoder = load_demo_text_encoder(weights)
        self.tokenizer = encoder.tokenizer
        self.text_encoder = TextEncoderGraph(encoder.model, None, False, encoder.mask_pad_id)
        self.experts = {n: UNet2DConditionModel.from_pretrained(weights / n).float().eval() for n in EXPERTS}

    def __call__(self, prompt: str, latents: Any, steps: int, guidance: float, switch: float) -> Any:
        """Images ``[B, H, W, 3]`` in [0, 1] (numpy) from unit-variance pixel ``latents`` (torch)."""
        import torch
        import torch.nn.functional as F
        from diffusers import DPMSolverMultistepScheduler

        def scheduler(begin: int = 0) -> DPMSolverMultistepScheduler:
            s = DPMSolverMultistepScheduler.from_config(SCHEDULER_CONFIG)
            s.set_timesteps(steps)
            s.set_begin_index(begin)
            return s

        with torch.inference_mode():
            batch = latents.shape[0]
            ids = self.tokenizer([""] * batch + [prompt] * batch, padding="max_length", max_length=MAX_TOKENS,
                                 return_tensors="pt").input_ids
            states = self.text_encoder(ids)[0]
            cutoff = round(SCHEDULER_CONFIG["num_train_timesteps"] * (1 - switch))
            solver = scheduler()
            x = latents * solver.init_noise_sigma
            timesteps = solver.timesteps.clone()
            for i, t in enumerate(timesteps):
                name = EXPERTS[0] if t >= cutoff else EXPERTS[1]
                if name == EXPERTS[1] and i > 0 and timesteps[i - 1] >= cutoff:
                    solver = scheduler(i)
                x_in = F.pixel_unshuffle(torch.cat([x, x]), PATCH)
                out = F.pixel_shuffle(self.experts[name](x_in, t, encoder_hidden_states=states).sample, PATCH)
                uncond, cond = out.chunk(2)
                x = solver.step(uncond + guidance * (cond - uncond), t, x).prev_sample
            return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
