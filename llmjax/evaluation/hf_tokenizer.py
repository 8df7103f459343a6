"""The tokenizer saved next to a Hugging Face model, behind llmjax's Tokenizer interface.

    tok = hf_tokenizer.load("path/to/hf_dir", hf_config)   # encode, decode, bos_id, eos_id

`tokenizer.model` (SentencePiece: LLaMA, T5) is read with the sentencepiece package llmjax already
needs; otherwise `tokenizer.json` (GPT-2, RoBERTa, BART, BERT: a fast tokenizer) with the
`tokenizers` package, when it is installed. Text is encoded without special tokens, as
lm-evaluation-harness encodes it; the start and stop ids come from config.json (bos_token_id,
eos_token_id, pad_token_id), else from the tokenizer's own special tokens (-1: none).
"""

from __future__ import annotations

import json
import os


def _first(value):
    """config.json may give a list of eos ids (LLaMA 3); the first is the one written."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


class SentencePieceTokenizer:
    def __init__(self, path: str, hf_config: dict):
        import sentencepiece as spm
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        bos, eos = _first(hf_config.get("bos_token_id")), _first(hf_config.get("eos_token_id"))
        self.bos_id = self._sp.bos_id() if bos is None else int(bos)
        self.eos_id = self._sp.eos_id() if eos is None else int(eos)
        pad = _first(hf_config.get("pad_token_id"))
        self.pad_id = self._sp.pad_id() if pad is None else int(pad)
        self.vocab_size = self._sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


class FastTokenizer:
    def __init__(self, path: str, hf_config: dict):
        import tokenizers
        self.path = path
        self._tok = tokenizers.Tokenizer.from_file(path)
        special = {}
        config_file = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.isfile(config_file):
            with open(config_file) as f:
                special = json.load(f)

        def token_id(key: str) -> int:
            given = _first(hf_config.get(f"{key}_token_id"))
            if given is not None:
                return int(given)
            token = special.get(f"{key}_token")
            token = token.get("content") if isinstance(token, dict) else token
            found = self._tok.token_to_id(token) if token else None
            return -1 if found is None else int(found)

        self.bos_id, self.eos_id, self.pad_id = token_id("bos"), token_id("eos"), token_id("pad")
        mask = token_id("mask")
        if mask >= 0:
            self.mask_id = mask
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load(directory: str, hf_config: dict):
    """The tokenizer of a Hugging Face model directory (see the module docstring)."""
    sp = os.path.join(directory, "tokenizer.model")
    if os.path.isfile(sp):
        return SentencePieceTokenizer(sp, hf_config)
    fast = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(fast):
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            raise ValueError(f"{fast} needs the `tokenizers` package to be read; install it (pip "
                             "install tokenizers) or save a SentencePiece tokenizer.model there."
                             ) from None
        return FastTokenizer(fast, hf_config)
    raise ValueError(f"{directory} has no tokenizer.model or tokenizer.json; save the model's "
                     "tokenizer there with tokenizer.save_pretrained(directory).")
