"""The demo model's text head: the identity when added, padding kept zero, tokens mixed once trained."""

from __future__ import annotations

import torch
from conftest import random_text_head

from artrt.demo.text_head import EncoderWithHead, TextHead


def padded_states(batch: int = 3, tokens: int = 24, width: int = 384, used: int = 9) -> torch.Tensor:
    states = torch.randn(batch, tokens, width, generator=torch.Generator().manual_seed(0))
    states[:, used:] = 0  # padding, zeroed as TextEncoderGraph writes it
    return states


def test_new_head_is_the_identity():
    states = padded_states()
    assert torch.equal(TextHead()(states), states)


def test_trained_head_mixes_tokens_and_keeps_padding_zero():
    head, states = random_text_head(), padded_states()
    out = head(states)
    assert not torch.allclose(out[:, :9], states[:, :9], atol=1e-3)
    assert not out[:, 9:].any()  # padding stays zero
    other = states.clone()
    other[:, 5] = torch.randn(384)  # another word at token 5 changes what token 2 carries
    assert not torch.allclose(head(other)[:, 2], out[:, 2], atol=1e-4)
    more = head(torch.cat([states, torch.zeros(2, 24, 384)]))  # two rows of padding only
    assert torch.allclose(more[:3], out, atol=1e-5) and not more[3:].any()  # rows independent, no NaN


def test_save_and_load_round_trip(tmp_path):
    head = random_text_head(width=32, tokens=6, heads=2, head_dim=8, hidden=16)
    head.save(tmp_path / "head")
    loaded = TextHead.load(tmp_path / "head")
    assert loaded.config == head.config
    states = padded_states(2, 6, 32, used=4)
    assert torch.allclose(loaded(states), head(states), atol=1e-2)  # stored in fp16


def test_encoder_with_head_zeroes_padding_before_the_head():
    class Encoder(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return (torch.ones(*input_ids.shape, 384),)  # non-zero everywhere, padding included

    head = random_text_head()
    ids = torch.tensor([[101, 7, 102, 0, 0] + [0] * 19])
    mask = (ids != 0).long()
    out = EncoderWithHead(Encoder(), head)(ids, attention_mask=mask)[0]
    states = torch.ones(1, 24, 384) * mask.unsqueeze(-1)
    assert torch.allclose(out, head(states)) and not out[:, 3:].any()
