"""A stand-in tokenizer for random-weight models where the embedded model's tokenizer is not installed (a bare GPU
machine with only torch and transformers): one token per whitespace-led word, ids given out in order of first sight.

With random weights any id is as good as another; what the benchmarks and the GPU check need is that text splits
into tokens deterministically, that a one-symbol word (" α") is one token, and that decode inverts encode. Once
the vocabulary is used up, new words share ids (by hash) and decode to the first word that took the id.
"""
from __future__ import annotations

import re
import threading
import zlib
from typing import Sequence

_PIECES = re.compile(r"\s*\S+|\s+")


class WordTokenizer:
    """encode / decode over a growing word table, with the model's special ids reserved."""

    chat_template = None        # no chat template: agent templates use their plain "role: text" layout
    add_bos_token = False

    def __init__(self, vocab_size: int, bos_token_id: int | None = None, eos_token_id: int | None = None):
        specials = [i for i in (bos_token_id, eos_token_id) if i is not None]
        self.first_id = max(specials, default=-1) + 1
        if self.first_id >= vocab_size:
            raise ValueError(f"a vocabulary of {vocab_size} leaves no ids after the special ids {specials}")
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self._ids: dict[str, int] = {}
        self._words: dict[int, str] = {}
        self._lock = threading.Lock()

    def _id(self, word: str) -> int:
        found = self._ids.get(word)
        if found is None:
            with self._lock:
                found = self._ids.get(word)
                if found is None:
                    free = self.first_id + len(self._words)
                    room = self.vocab_size - self.first_id
                    found = free if free < self.vocab_size else \
                        self.first_id + zlib.crc32(word.encode()) % room
                    self._ids[word] = found
                    self._words.setdefault(found, word)
        return found

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [self._id(piece) for piece in _PIECES.findall(text)]
        if add_special_tokens and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        special = {self.bos_token_id, self.eos_token_id}
        parts = []
        for token in token_ids:
            token = int(token)
            if token in special:
                if not skip_special_tokens:
                    parts.append(f"<{token}>")
                continue
            parts.append(self._words.get(token, f" <{token}>"))
        return "".join(parts)
