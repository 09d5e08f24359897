"""Prompt tokenization with the ``tokenizers`` library (no transformers at run time)."""

from __future__ import annotations

import html
import logging
import re
from pathlib import Path

import numpy as np

from artrt.errors import PackageError

from .package import TokenizerInfo

log = logging.getLogger(__name__)


def clean_prompt(text: str) -> str:
    """WanPipeline's ``prompt_clean`` without ftfy (not installed with diffusers): HTML entities
    unescaped twice, whitespace runs squeezed to one space, ends stripped."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


CLEANERS = {"wan": clean_prompt}  # TokenizerInfo.clean -> what the pipeline does to a prompt first
CUT_SHOWN = 60  # characters of the cut-off text a truncation warning quotes

def _shorten(text: str, limit: int = CUT_SHOWN) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + "…"


class PromptTokenizer:
    """Turns prompts into fixed-length id arrays, padded and truncated like the pipeline."""

    def __init__(self, path: Path, info: TokenizerInfo) -> None:
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise PackageError(f"tokenizer {path} could not be read: {exc}") from None
        self._tokenizer.enable_truncation(info.max_length)
        self._tokenizer.enable_padding(length=info.max_length, pad_id=info.pad_id)
        self.max_length = info.max_length
        if info.clean is not None and info.clean not in CLEANERS:
            raise PackageError(f"tokenizer {path}: unknown prompt clean-up {info.clean!r} (this artrt knows "
                               f"{', '.join(CLEANERS)}); update artrt or re-export")
        self._clean = CLEANERS[info.clean] if info.clean else None

    def __call__(self, prompts: list[str], warned: set[str] | None = None) -> np.ndarray:
        """Token ids of shape ``[len(prompts), max_length]`` (int64).

        A prompt longer than ``max_length`` tokens is cut, with a warning quoting what was cut;
        ``warned``: texts already warned about (shared by a package's tokenizers, so a prompt gets
        one warning however many text encoders cut it), added to.

        Prompts are encoded one by one: ``encode_batch`` hands even two short prompts to
        the tokenizers thread pool, which then competes with ONNX Runtime's spinning
        threads for the cores (6-14 ms instead of 0.1 ms on a 2-core machine).
        """
        if self._clean is not None:
            prompts = [self._clean(p) for p in prompts]
        encodings = [self._tokenizer.encode(p) for p in prompts]
        warned = set() if warned is None else warned
        for prompt, encoding in zip(prompts, encodings):
            if encoding.overflowing and prompt not in warned:
                warned.add(prompt)  # also when the prompt and the negative prompt are the same text
                kept = max(end for _, end in encoding.offsets)  # offsets index the prompt; specials are (0, 0)
                dropped = prompt[kept:].strip()
                log.warning("warning: a prompt is longer than the %d tokens its text encoder takes; %d "
                            "characters were cut off: %r", self.max_length, len(dropped), _shorten(dropped))
        return np.array([e.ids for e in encodings], dtype=np.int64)
