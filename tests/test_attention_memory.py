"""The memory estimate counts attention scores, which grow with the square of the pixels on
ONNX Runtime CPU: export records each component's largest attention, and a request whose scores
cannot fit is refused with one line before any work (it used to fail inside ONNX Runtime)."""

from __future__ import annotations

import pytest

from artrt.demo.cache import shipped_package
from artrt.errors import InputError
from artrt.runtime import Pipeline
from artrt.runtime.budget import ATTENTION_COPIES, attention_bytes
from artrt.runtime.package import Attention, read_manifest


def test_export_records_the_largest_attention(sdxl_package):
    m = read_manifest(sdxl_package)
    # the tiny UNets: attention_head_dim (2, 4), cross-attention in down block 1 (stride 2); the VAE: one head
    assert {n: c.attention for n, c in m.components.items()} == {
        "text_encoder": None, "text_encoder_2": None,
        "expert_composition": Attention(heads=4, stride=2), "expert_detail": Attention(heads=4, stride=2),
        "vae_decoder": Attention(heads=1, stride=1),
    }


def test_attention_bytes_follow_the_square_of_the_tokens():
    m = read_manifest(shipped_package())  # demo: 4 heads at stride 4 (space-to-depth 2, then one downsample)
    assert m.components["expert_composition"].attention == Attention(heads=4, stride=4)
    one = attention_bytes(m, (1, 3, 64, 64))  # 256 px: 64 x 64 pixels, 16 x 16 = 256 tokens
    assert one == 2 * 4 * 256**2 * 4 * ATTENTION_COPIES  # guidance doubles the batch
    assert attention_bytes(m, (1, 3, 128, 128)) == 16 * one and attention_bytes(m, (3, 3, 64, 64)) == 3 * one


def test_a_request_whose_attention_cannot_fit_is_refused_before_any_work():
    with Pipeline.load(shipped_package(), backend="ort-cpu", threads=1) as pipe:
        with pytest.raises(InputError, match=r"^1 image\(s\) of 1024x1024 needs about 516\.1 GiB of memory "
                                             r"\(engines 4\.0, attention 512\.0, buffers 0\.1\); .* GiB is available"):
            pipe.generate("a red circle", height=1024, width=1024)
        assert pipe.generate("a red circle", steps=2).images[0].size == (32, 32)
