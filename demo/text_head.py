"""A small trained text head on a frozen text encoder's token states (the demo model's).

A frozen encoder's token states reach a UNet's cross-attention as keys that are linear in each
token's own state, so the UNet cannot compute facts that combine tokens, such as which object
of "a red circle left of a blue square" goes left: that is the relation word crossed with word
order ("a blue square right of a red circle" says the same). One self-attention block over the
tokens, trained with the denoiser, gives every token that context. Its residual branches start
at zero, so a trained model is unchanged when the head is added and training continues from it.
Padding (all-zero states, as ``TextEncoderGraph`` writes them) is masked and stays zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class TextHead(nn.Module):
    """Pre-norm transformer block over ``[B, tokens, width]`` states: self-attention, then an MLP."""

    def __init__(self, width: int = 384, tokens: int = 24, heads: int = 4, head_dim: int = 16,
                 hidden: int = 128) -> None:
        super().__init__()
        self.config = {"width": width, "tokens": tokens, "heads": heads, "head_dim": head_dim, "hidden": hidden}
        self.heads, self.head_dim = heads, head_dim
        self.position = nn.Parameter(torch.zeros(tokens, width))
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * heads * head_dim, bias=False)
        self.attention_out = nn.Linear(heads * head_dim, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        for layer in (self.attention_out, self.mlp[-1]):  # the identity at initialisation
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        keep = (states.abs().amax(dim=-1, keepdim=True) > 0).to(states.dtype)  # [B, T, 1]; 0 on padding
        x = states + self.position
        b, t, _ = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / self.head_dim**0.5  # [B, heads, T, T]
        logits = logits + (keep.transpose(1, 2).unsqueeze(1) - 1) * 1e4  # padding keys masked
        mixed = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        x = x + self.attention_out(mixed)
        x = x + self.mlp(self.mlp_norm(x))
        return x * keep

    def save(self, folder: Path) -> None:
        """fp16 safetensors + config.json."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().half().contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS_NAME)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> TextHead:
        """A head written by :meth:`save`, in fp32, in eval mode."""
        from safetensors.torch import load_file

        head = cls(**json.loads((folder / CONFIG_NAME).read_text()))
        head.load_state_dict({k: v.float() for k, v in load_file(folder / WEIGHTS_NAME).items()})
        return head.eval()


class EncoderWithHead(nn.Module):
    """A transformers encoder followed by a :class:`TextHead`, called as the encoder is (``[0]``: states)."""

    def __init__(self, encoder: nn.Module, head: TextHead) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    @property
    def config(self):  # the encoder's (transformers) config: vocabulary, width, heads
        return self.encoder.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        hidden = self.encoder(input_ids, attention_mask=attention_mask)[0]
        return (self.head(hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)),)
