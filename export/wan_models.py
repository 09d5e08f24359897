"""Random Wan 2.2 (A14B layout) pipelines built from configs, for tests and benchmarks.

:func:`make_wan_pair` writes a diffusers ``WanPipeline`` folder: ``transformer`` (high-noise
expert) and ``transformer_2`` (low-noise expert) of one config with different random weights,
``boundary_ratio`` in ``model_index.json``, a UMT5 text encoder, a Wan VAE and the
``UniPCMultistepScheduler`` configuration of the Wan 2.2 T2V-A14B folder (flow sigmas,
``flow_prediction``, ``flow_shift`` 3). Nothing is downloaded: the tokenizer is a Unigram
model over single characters (plus a few words) built with ``tokenizers`` and saved as the
``tokenizer.json`` of a ``T5TokenizerFast`` (UMT5's pad 0, eos 1, unk 2, with the ``</s>``
post-processor and the Metaspace pre-tokenizer), which ``AutoTokenizer`` loads.

Sizes (the transformer configs follow diffusers' own Wan 2.2 fast tests):

- ``tiny``: exports and runs in seconds (the tests): transformer 2 heads of 12 channels,
  2 layers, ffn 32, text width 32; UMT5 2 layers of width 32; VAE base_dim 3.
- ``small``: big enough that the network dominates a step on a CPU (4 heads of 32 channels,
  4 layers, ffn 256, text width 64; VAE base_dim 16).

Latents are ``[B, 16, (frames − 1)/4 + 1, height/8, width/8]``; height and width must be
multiples of 16 (the VAE's 8 times the transformer's 2×2 patches).
"""

from __future__ import annotations

import gc
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BOUNDARY_RATIO = 0.875  # Wan 2.2 T2V-A14B's model_index.json
FLOW_SHIFT = 3.0  # the T2V-A14B folder's scheduler (5.0 is the usual 720p value)
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default max_sequence_length (UMT5 tokens)

# UMT5's special ids (google/umt5-xxl): pad 0, eos 1, unk 2.
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
_WORDS = ("▁a", "▁the", "▁of", "▁and", "▁in", "▁on", "▁with", "▁cat", "▁dog", "▁red", "▁blue", "▁video")


@dataclass(frozen=True)
class WanSizes:
    """Constructor arguments of one size's transformer (both experts), UMT5 encoder and Wan VAE."""

    transformer: dict[str, Any]
    text_encoder: dict[str, Any]  # UMT5Config, without the vocabulary size (the tokenizer's)
    vae: dict[str, Any]
    defaults: dict[str, Any] = field(default_factory=dict)  # a generation size that runs quickly


def _transformer(heads: int, head_dim: int, text_dim: int, ffn: int, layers: int) -> dict[str, Any]:
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
        out_channels=16, text_dim=text_dim, freq_dim=256, ffn_dim=ffn, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32,
    )


def _umt5(width: int, heads: int, layers: int, ffn: int) -> dict[str, Any]:
    return dict(
        d_model=width, d_kv=width // heads, d_ff=ffn, num_layers=layers, num_decoder_layers=layers,
        num_heads=heads, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=True, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tokenizer_class="T5Tokenizer",
    )


def _vae(base_dim: int) -> dict[str, Any]:
    return dict(base_dim=base_dim, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[False, True, True])


SIZES = {
    "tiny": WanSizes(_transformer(2, 12, 32, 32, 2), _umt5(32, 4, 2, 64), _vae(3),
                     dict(height=32, width=48, num_frames=5)),
    "small": WanSizes(_transformer(4, 32, 64, 256, 4), _umt5(64, 4, 2, 128), _vae(16),
                      dict(height=64, width=96, num_frames=9)),
}


def umt5_tokenizer_object():
    """A ``tokenizers.Tokenizer`` laid out like UMT5's: Unigram pieces (every printable ASCII
    character, ``▁`` and a few ``▁word`` pieces), NFKC + space squeezing, Metaspace, ``</s>`` appended."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces = [(s, 0.0) for s in SPECIAL_TOKENS]
    pieces += [(c, -5.0) for c in ["▁", *string.ascii_letters, *string.digits, *string.punctuation]]
    pieces += [(w, -3.0) for w in _WORDS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=SPECIAL_TOKENS.index("<unk>"), byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    eos = SPECIAL_TOKENS.index("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])
    return tok


def make_umt5_tokenizer(folder: str | Path | None = None, max_length: int = MAX_SEQUENCE_LENGTH):
    """A ``T5TokenizerFast`` around :func:`umt5_tokenizer_object` (saved to ``folder`` when given)."""
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast(tokenizer_object=umt5_tokenizer_object(), eos_token="</s>", unk_token="<unk>",
                          pad_token="<pad>", extra_ids=0, model_max_length=max_length)
    if folder is not None:
        tok.save_pretrained(str(folder))
    return tok


def scheduler_config() -> dict[str, Any]:
    """Wan 2.2 T2V-A14B's ``UniPCMultistepScheduler`` settings (the keys that differ from its defaults)."""
    return dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT,
                num_train_timesteps=1000, solver_order=2, solver_type="bh2", predict_x0=True,
                lower_order_final=True, disable_corrector=[], final_sigmas_type="zero")


def _model_index(two_experts: bool, boundary_ratio: float | None) -> dict[str, Any]:
    import diffusers

    return {
        "_class_name": "WanPipeline", "_diffusers_version": diffusers.__version__,
        "boundary_ratio": boundary_ratio if two_experts else None, "expand_timesteps": False,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"] if two_experts else [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }


def write_wan_pair(out: str | Path, size: str = "tiny", seed: int = 0, two_experts: bool = True,
                   boundary_ratio: float = BOUNDARY_RATIO) -> Path:
    """Write a random ``WanPipeline`` folder at ``out`` (see the module docstring); returns ``out``.

    ``two_experts`` False writes the Wan 2.1 layout (one transformer, no boundary). Each model is
    built, written and freed before the next; the weights depend only on ``seed`` and ``size``.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    s, out = SIZES[size], Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_umt5_tokenizer(out / "tokenizer")
    torch.manual_seed(seed)
    builders = [  # in the order the random weights are drawn
        ("text_encoder", lambda: UMT5EncoderModel(UMT5Config(vocab_size=len(tok), **s.text_encoder))),
        ("vae", lambda: AutoencoderKLWan(**s.vae)),
        ("transformer", lambda: WanTransformer3DModel(**s.transformer)),
    ]
    if two_experts:
        builders.append(("transformer_2", lambda: WanTransformer3DModel(**s.transformer)))
    for name, build in builders:
        module = build().eval()
        module.save_pretrained(out / name)
        del module
        gc.collect()
    UniPCMultistepScheduler(**scheduler_config()).save_pretrained(out / "scheduler")
    index = _model_index(two_experts, boundary_ratio)
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


def make_wan_pair(out: str | Path, size: str = "tiny", seed: int = 0, two_experts: bool = True,
                  boundary_ratio: float = BOUNDARY_RATIO):
    """:func:`write_wan_pair`, then the ``WanPipeline`` loaded (offline) from what it wrote."""
    from diffusers import WanPipeline

    folder = write_wan_pair(out, size, seed, two_experts, boundary_ratio)
    return WanPipeline.from_pretrained(folder, local_files_only=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m artrt.export.wan_models OUT``: write a random Wan 2.2 two-expert pipeline folder."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", type=Path, help="folder to create (a diffusers WanPipeline folder)")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one-expert", action="store_true", help="Wan 2.1 layout: no transformer_2, no boundary")
    args = parser.parse_args(argv)
    write_wan_pair(args.out, args.size, args.seed, two_experts=not args.one_expert)
    print(f"wrote {args.out} (WanPipeline, {args.size}, {'one expert' if args.one_expert else 'two experts'})")


if __name__ == "__main__":
    main()
