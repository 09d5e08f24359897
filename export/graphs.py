"""The torch modules that become the package's ONNX graphs.

- :class:`TextEncoderGraph`: token ids -> the hidden states the pipeline uses (+ pooled).
- :class:`FusedStepGraph`: one whole sampling step of an expert (DESIGN.md, "The fused
  step"): network on the duplicated batch, classifier-free guidance, the denoised
  estimate and the generic sampler update, all in fp32 around the network.
- :class:`DecoderGraph`: latents -> image in [0, 1] (VAE scaling, decode, denormalise).
"""

from __future__ import annotations

import torch
from torch import nn

# Column order of the fused step's ``step`` input; must match artrt.runtime.samplers.
STEP_SCALARS = ("c_in", "t", "c_skip", "c_out", "guidance", "a", "b", "c", "d")


class TextEncoderGraph(nn.Module):
    """Text encoder returning ``hidden_states`` (and ``pooled`` when projected).

    ``hidden_layer`` None takes the final (layer-normed) state, as Stable Diffusion
    1.x does; -2 takes the penultimate layer's output, as SDXL does. ``mask_pad_id``
    (bidirectional encoders such as BERT/MiniLM): padding tokens with this id are
    masked out of attention and their states zeroed, so the graph still takes only
    ``input_ids`` (CLIP's causal attention needs no mask).
    """

    def __init__(self, encoder: nn.Module, hidden_layer: int | None, pooled: bool,
                 mask_pad_id: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.hidden_layer = hidden_layer
        self.pooled = pooled
        self.mask_pad_id = mask_pad_id

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.mask_pad_id is not None:
            mask = (input_ids != self.mask_pad_id).long()
            hidden = self.encoder(input_ids, attention_mask=mask)[0]
            return (hidden * mask.unsqueeze(-1).to(hidden.dtype),)
        out = self.encoder(input_ids, output_hidden_states=self.hidden_layer is not None)
        hidden = out[0] if self.hidden_layer is None else out.hidden_states[self.hidden_layer]
        if self.pooled:
            return hidden, out.text_embeds
        return (hidden,)


class FusedStepGraph(nn.Module):
    """One sampling step: ``(sample, denoised_prev, noise, step, conditioning) -> (next, denoised)``.

    ``step`` holds the per-step scalars in :data:`STEP_SCALARS` order. The
    conditioning inputs carry the unconditional half first, as diffusers does.
    ``patch`` > 1: the network sees ``sample`` rearranged space-to-depth (pixel-space
    models whose UNet runs at 1/patch of the image size on patch² × C channels);
    everything around the network stays in the sample's own layout.
    """

    def __init__(self, unet: nn.Module, added_conditioning: bool, patch: int = 1) -> None:
        super().__init__()
        self.unet = unet
        self.added_conditioning = added_conditioning
        self.patch = patch

    def forward(
        self,
        sample: torch.Tensor,
        denoised_prev: torch.Tensor,
        noise: torch.Tensor,
        step: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c_in, t, c_skip, c_out, guidance, a, b, c, d = step.unbind(0)
        net_dtype = next(self.unet.parameters()).dtype
        x_in = (c_in * sample).to(net_dtype)
        added = None
        if self.added_conditioning:
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        if self.patch > 1:
            x_in = nn.functional.pixel_unshuffle(x_in, self.patch)
        out = self.unet(
            torch.cat([x_in, x_in]),
            t,  # fp32: diffusers keeps timesteps fp32 and casts the embedding itself
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        if self.patch > 1:
            out = nn.functional.pixel_shuffle(out, self.patch)
        out = out.float()
        uncond, cond = out.chunk(2)
        guided = uncond + guidance * (cond - uncond)
        denoised = c_skip * sample + c_out * guided
        next_sample = a * sample + b * denoised + c * denoised_prev + d * noise
        return next_sample, denoised


class DecoderGraph(nn.Module):
    """VAE decoder from raw latents to an image in [0, 1] (diffusers' scaling and postprocess)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        config = vae.config
        self.scaling_factor = float(config.scaling_factor)
        shift = getattr(config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        mean = getattr(config, "latents_mean", None)
        std = getattr(config, "latents_std", None)
        self.has_stats = mean is not None and std is not None
        if self.has_stats:
            self.register_buffer("latents_mean", torch.tensor(mean).view(1, -1, 1, 1))
            self.register_buffer("latents_std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if self.has_stats:
            latents = latents * self.latents_std / self.scaling_factor + self.latents_mean
        else:
            latents = latents / self.scaling_factor + self.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)
