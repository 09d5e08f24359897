"""Prompt tokenization with the ``tokenizers`` library (no transformers at run time)."""

from __future__ import annotations

import html
import logging
import re
import threading
from collections import OrderedDict
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

# Cut-off texts recently warned about -> ids of the tokenizers that cut them since: a package's
# tokenizers each see every prompt (SDXL has two), so the first to cut a text warns and the others
# keep quiet until a tokenizer cuts it again (the next generation).
_warned: OrderedDict[tuple[int, str], set[int]] = OrderedDict()
_warned_lock = threading.Lock()


def _first_to_cut(tokenizer: object, key: tuple[int, str]) -> bool:
    """Whether ``tokenizer`` cutting ``key`` (max length, cut text) starts a new round of warnings."""
    with _warned_lock:
        seen = _warned.pop(key, None)
        first = seen is None or id(tokenizer) in seen
        _warned[key] = {id(tokenizer)} if first else seen | {id(tokenizer)}
        while len(_warned) > 64:
            _warned.popitem(last=False)
        return first


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

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """Token ids of shape ``[len(prompts), max_length]`` (int64).

        Prompts are encoded one by one: ``encode_batch`` hands even two short prompts to
        the tokenizers thread pool, which then competes with ONNX Runtime's spinning
        threads for the cores (6-14 ms instead of 0.1 ms on a 2-core machine).
        """
        if self._clean is not None:
            prompts = [self._clean(p) for p in prompts]
        encodings = [self._tokenizer.encode(p) for p in prompts]
        cut: set[tuple[int, str]] = set()  # one warning per text, also when prompt and negative prompt match
        for prompt, encoding in zip(prompts, encodings):
            if encoding.overflowing:
                kept = max(end for _, end in encoding.offsets)  # offsets index the prompt; specials are (0, 0)
                dropped = prompt[kept:].strip()
                key = (self.max_length, dropped)
                if key not in cut and _first_to_cut(self, key):
                    log.warning("warning: a prompt is longer than the %d tokens its text encoder takes; %d "
                                "characters were cut off: %r", self.max_length, len(dropped), _shorten(dropped))
                cut.add(key)
        return np.array([e.ids for e in encodings], dtype=np.int64)
