"""`TextStream`: a response's text as deltas while its tokens come, cut at the first stop string and holding back
what may still become one (a chat's streamed text, `kvcomm.chat`)."""
from __future__ import annotations

from typing import Callable, Sequence

from .generation import first_stop_at


class TextStream:
    """A response's text as its tokens come, sent as deltas to `emit`: decoded incrementally (each token decoded
    after the tokens of the previous delta only, for the tokenizers whose pieces depend on what precedes them;
    an incomplete UTF-8 character waits for the next token), cut at the first stop string, and holding back the
    last characters that could still begin one. `close(text)` sends what is left of the final text. Each token
    costs a decode of a few tokens, not of the whole response (which on the model thread, for every chat in the
    batch, grew with the square of the response's length)."""

    def __init__(self, detokenize: Callable[[Sequence[int]], str], stops: Sequence[str],
                 emit: Callable[[str], None]):
        self.detokenize, self.stops, self.emit = detokenize, tuple(stops), emit
        self.hold = max((len(stop) - 1 for stop in self.stops), default=0)
        self.tokens: list[int] = []
        self.text = ""              # the text of tokens[:self._read_at]
        self.sent = ""
        self.stopped = False
        self._context_at = 0        # tokens[_context_at:_read_at]: the previous delta's, decoded again as context
        self._read_at = 0
        self._searched = 0          # characters of `text` searched for a stop string

    def feed(self, token: int) -> None:
        if self.stopped:
            return
        self.tokens.append(token)
        context = self.detokenize(self.tokens[self._context_at:self._read_at])
        text = self.detokenize(self.tokens[self._context_at:])
        if text.endswith("\ufffd") or len(text) <= len(context):
            return
        if text.startswith(context):
            self.text += text[len(context):]
        else:                       # a tokenizer that rewrote the context: decode the whole response once
            self.text = self.detokenize(self.tokens)
        self._context_at, self._read_at = self._read_at, len(self.tokens)
        start = max(0, self._searched - self.hold)
        at = first_stop_at(self.text[start:], self.stops)
        self._searched = len(self.text)
        if at is not None:
            self.stopped = True
            self._send(self.text[:start + at])
        else:
            self._send(self.text[:max(len(self.sent), len(self.text) - self.hold)])

    def close(self, text: str) -> None:
        self._send(text)

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.emit(text[len(self.sent):])
            self.sent = text
