"""Prompt tokenization with the ``tokenizers`` library (no transformers at run time)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import PackageError
from .package import TokenizerInfo


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

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """Token ids of shape ``[len(prompts), max_length]`` (int64)."""
        encodings = self._tokenizer.encode_batch(prompts)
        return np.array([e.ids for e in encodings], dtype=np.int64)
