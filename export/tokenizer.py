"""Tokenization with the `tokenizers` library alone, from the tokenizer.json `save_pretrained` wrote.

tokenizer.json carries the model and the pre/post-processing but not transformers' call options,
so padding (with the checkpoint's pad token: to the longest prompt, or to the full length for a
family whose `text_padding` is "max_length", as SigLIP's) and truncation (to what the text tower's
position embeddings allow) are configured here to give the same ids and attention mask as the
family's `tokenize`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flora.errors import ConfigError


class ClipTokenizer:
    def __init__(self, model_dir: str | Path, *, max_length: int | None = None, padding: str = "longest"):
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(
                f"{model_dir} has no tokenizer.json, which the text tower needs; copy it from the `flora export` "
                "output (it is saved beside the ONNX files), or classify with the zero-shot head's own labels"
            )
        self.tokenizer = Tokenizer.from_file(str(path))
        settings = _read_json(model_dir / "tokenizer_config.json")
        pad_token = _token_text(settings.get("pad_token")) or "<|endoftext|>"
        pad_id = self.tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ConfigError(f"pad token {pad_token!r} of tokenizer_config.json is not in {path}'s vocabulary")
        model_max = settings.get("model_max_length")
        limits = [n for n in (max_length, model_max) if isinstance(n, int) and 0 < n < 1_000_000]
        self.max_length = min(limits) if limits else None
        if padding == "max_length" and self.max_length is None:
            raise ConfigError(f"{model_dir}: padding to max_length needs a model_max_length in tokenizer_config.json")
        fixed = self.max_length if padding == "max_length" else None
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, length=fixed)
        if self.max_length is not None:
            self.tokenizer.enable_truncation(self.max_length)
        else:
            self.tokenizer.no_truncation()

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch(list(texts))
        return {
            "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
        }


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(token) -> str | None:
    # transformers writes special tokens either as plain strings or as AddedToken dicts.
    if isinstance(token, dict):
        return token.get("content")
    return token
