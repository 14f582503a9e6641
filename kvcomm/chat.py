"""Chat completions as engine turns: a chat's messages as a template with placeholders, and its contents reused
across requests.

This module owns how an OpenAI-style chat becomes a `kvcomm.engine.TurnRequest` (nothing HTTP here: no Ray, no
pydantic), so a chat runs on the very path an agent turn of a job runs on, in any of the engine's modes:

* The template (`kvcomm.chat_template`): leading system messages are literal (with the first header they are the
  exact prefix, whose KV the engine keeps per template); every later non-empty message's content is a placeholder,
  or several where it quotes responses this replica generated.
* `ChatContents`: one replica's contents by (namespace, text): token ids, base KV and the entropy gate's state, in
  a byte-bounded LRU. A response this replica generated is kept with the producer's token ids and KV (as a job's
  response is), so when a later chat carries its text, as a message of its own or quoted inside a longer one, it
  enters the prompt as those very ids, in every mode: dense and reuse compare identical tokens.
* `ChatTurns`: `prepare` a chat's turn (each content looked up or computed, offered to the gate under its
  placeholder name the first time it is seen there, one pool transaction per chat), `finish` it (the response
  remembered, the transaction committed, the gate's state kept with the content). Single-threaded: a worker runs
  both on its model thread; `run` is the in-process path (prepare, `engine.run_turn`, finish).
* A chat none of whose contents has base KV yet (a new conversation's first message: agent 1 reading a new task)
  is a first read (`kvcomm.names.FIRST_READ_REASON`): prefilled as a prefix cache would, exact, and its contents
  take their KV in it as their base KV (the gate sees them when it ends). A chat that mixes kept and new contents
  computes each new one's base KV in isolation first (after a kept input's shared start, when one has it), and
  reuses.
* `kvcomm.text_stream.TextStream` sends a response's text as deltas while its tokens come.

Gate state across requests. In a job a content flagged as a new anchor sends every consumer of that job to a dense
prefill that records its deltas. A chat content lives longer, so the flag is kept per consumer: a consumer (one
chat template: system prompt, roles and senders) prefills densely and records once per anchor; later it reuses.
"""
from __future__ import annotations

import hashlib
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .base_cache import shared_prefix
from .chat_template import (CONTEXT_LENGTH_EXCEEDED, QUOTE_PROBE_CHARS, ChatMessage, ChatRequestError, ChatTemplate,
                            as_rendered, chat_template, quoted_suffix, trims_contents)
from .engine import ContextLengthError, KVCommEngine, SharedContent, TurnRequest, TurnResult, learn_gate_state
from .generation import Sampling
from .kv import KVSegment
from .names import BASE_MODES, MODES, POOL_MODES
from .templates import TemplateError, render_template
from .text_stream import TextStream

MIN_QUOTE_TOKENS = 4     # a response this short is never looked for inside a longer message (too little to reuse)


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion as the engine runs it (plain data)."""
    messages: tuple[ChatMessage, ...]
    mode: str = "kvcomm"
    namespace: str = "default"
    max_tokens: int | None = None       # None: default_max_tokens, capped by the context left
    default_max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    max_tokens_param: str = "max_tokens"   # the field errors about max_tokens name
    force_dense: bool = False           # a dense prefill in any mode (a judge kept exact); its turn still teaches


# ------------------------------------------------------------------------------------------------------------
# Contents across requests
# ------------------------------------------------------------------------------------------------------------
@dataclass
class ChatContent:
    """One content of a namespace as this replica knows it, with the gate's state for it (committed only)."""
    kind: str                                   # "input" (a message's text) | "response" (generated here)
    token_ids: tuple[int, ...]
    base: KVSegment | None                      # [layers, kv_heads, n, head_dim] at positions 0..n-1
    content_key: str
    anchor_ids: dict[str, str] = field(default_factory=dict)     # placeholder name -> the anchor it became there
    gate_reason: dict[str, str] = field(default_factory=dict)    # placeholder name -> the gate's reason
    recorded: dict[str, set[str]] = field(default_factory=dict)  # placeholder name -> consumers that recorded
                                                                 # deltas for its anchor
    text: str = ""                              # a response's text (what a later message may quote); "" for inputs
    boundaries: tuple[int, ...] = ()            # a response's token boundaries in `text` once it was looked for

    @property
    def nbytes(self) -> int:
        return (self.base.nbytes if self.base is not None else 0) + 8 * len(self.token_ids) + len(self.text)

    def for_turn(self, name: str, consumer: str) -> SharedContent:
        """A fresh `SharedContent` for one turn reading it as placeholder `name`: flagged as an anchor (so the turn
        prefills densely and records) only while `consumer` has not recorded its deltas for that anchor."""
        anchor = self.anchor_ids.get(name)
        pending = anchor is not None and consumer not in self.recorded.get(name, ())
        return SharedContent(self.kind, self.token_ids, base=self.base, content_key=self.content_key,
                             anchor_ids={name: anchor} if pending else {}, gate_reason=dict(self.gate_reason))


class ChatContents:
    """Chat contents by (namespace, text), least recently used evicted first once over `budget_bytes` (0 keeps
    nothing: no reuse, and a generated response is re-tokenized when a later chat carries it)."""

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[str, bytes], ChatContent] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0
        self.shared_start_tokens = 0        # tokens of new inputs whose base KV a kept input's start supplied

    @staticmethod
    def _key(namespace: str, text: str) -> tuple[str, bytes]:
        return namespace, hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()

    def holds(self, namespace: str, text: str) -> bool:
        """Whether `text` is kept for `namespace` (no use recorded: the LRU order and the counts stay)."""
        return self._key(namespace, text) in self._entries

    def has_base(self, namespace: str, text: str) -> bool:
        """Whether `text` is kept for `namespace` with its base KV (no use recorded)."""
        entry = self._entries.get(self._key(namespace, text))
        return entry is not None and entry.base is not None

    def get(self, namespace: str, text: str) -> ChatContent | None:
        entry = self._entries.get(self._key(namespace, text))
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(self._key(namespace, text))
        self.hits += 1
        return entry

    def put(self, namespace: str, text: str, content: ChatContent) -> None:
        """Keep `content` for `text` (replacing what was kept for it); evict the least recently used beyond the
        budget (the newest is kept even when it alone exceeds it)."""
        if self.budget_bytes == 0:
            return
        key = self._key(namespace, text)
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._entries[key] = content
        self.nbytes += content.nbytes
        self._evict()

    def set_base(self, namespace: str, text: str, content: ChatContent, base: KVSegment) -> None:
        """Give kept `content` (what `text` maps to, or a copy no longer kept) the base KV its first read made."""
        key = self._key(namespace, text)
        kept = self._entries.get(key) is content
        if kept:
            self.nbytes -= content.nbytes
        content.base = base
        if kept:
            self.nbytes += content.nbytes
            self._entries.move_to_end(key)      # just read: the newest, kept even when alone over the budget
            self._evict()

    def _evict(self) -> None:
        """The least recently used entries out until within the budget (the newest is kept, even over it)."""
        while self.nbytes > self.budget_bytes and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
            self.evictions += 1

    def responses(self, namespace: str) -> list[ChatContent]:
        """The responses of `namespace` kept here with at least `MIN_QUOTE_TOKENS` tokens (what a later message may
        quote), least recently used first."""
        return [entry for (space, _), entry in self._entries.items()
                if space == namespace and entry.kind == "response" and len(entry.token_ids) >= MIN_QUOTE_TOKENS]

    def __len__(self) -> int:
        return len(self._entries)

    def sharing_start(self, namespace: str, ids: Sequence[int]) -> tuple[Sequence[int], KVSegment] | None:
        """The kept input of `namespace` whose token ids share the longest start with `ids` (its ids and base KV),
        or None when none shares a token: a new input computes only what follows (`InputEncoder.base`)."""
        best, shared = None, 0
        for (space, _), entry in self._entries.items():
            if space != namespace or entry.kind != "input" or entry.base is None:
                continue
            count = shared_prefix(ids, entry.token_ids)
            if count > shared:
                best, shared = entry, count
        if best is None:
            return None
        self.shared_start_tokens += shared
        return best.token_ids, best.base

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "bytes": self.nbytes, "budget_bytes": self.budget_bytes,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "shared_start_tokens": self.shared_start_tokens}


# ------------------------------------------------------------------------------------------------------------
# Chats as turns
# ------------------------------------------------------------------------------------------------------------
@dataclass
class PreparedChat:
    """A chat whose turn is ready for the engine (or a scheduler); `finish` or `abort` it exactly once."""
    request: ChatRequest
    turn: TurnRequest
    consumer: str                               # the template's consumer key (anchors' deltas are kept per key)
    entries: dict[str, ChatContent]             # placeholder name -> the cached content it reads
    texts: dict[str, str]                       # placeholder name -> that content's text (its key in the cache)
    prompt_tokens: int
    arrived: float                              # time.perf_counter() when the chat reached this replica
    stream: TextStream | None = None
    first_token_at: float | None = None

    def on_token(self, token: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.stream is not None:
            self.stream.feed(token)


@dataclass
class ChatResult:
    text: str
    token_ids: list[int]
    finish_reason: str                          # "stop" | "length"
    mode: str
    reused: bool                                # skipped the prefill of every content and fixed segment
    reason: str                                 # the engine's decision: reused, dense_mode, new_anchor:<...>, ...
    prompt_ids: list[int]
    cached_tokens: int                          # prompt tokens whose KV was reused, not computed
    ttft_s: float                               # from reaching the replica to the first token
    first_logits: torch.Tensor                  # [vocab] fp32
    predicted_kl: float | None = None           # the turn gate's forecast when it saw the turn (engine docs)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def _messages_error(exc: TemplateError | ContextLengthError) -> ChatRequestError:
    """An engine's refusal of a chat's messages as the client's error naming ``messages``, with OpenAI's code
    `CONTEXT_LENGTH_EXCEEDED` when something is too long."""
    return ChatRequestError("messages", str(exc).removeprefix("messages: "),
                            CONTEXT_LENGTH_EXCEEDED if isinstance(exc, ContextLengthError) else None)


class ChatTurns:
    """Chats on one engine: `prepare` a chat's turn, `finish` it after the engine ran it (see the module docstring).
    Not thread-safe: a worker calls it on its model thread only."""

    def __init__(self, engine: KVCommEngine, contents: ChatContents):
        """A chat longer than the engine admits (`KVCommEngine.max_prompt_tokens`, the replica's memory plan's, or
        the model's context) is refused before any of its KV is computed."""
        self.engine = engine
        self.contents = contents
        self.trim = trims_contents(engine.tokenizer)
        self.decisions: Counter[str] = Counter()    # reason -> chats finished with it
        self.tokens_generated = 0                   # tokens decoded for chats, as they come (cancelled ones too)

    def prepare(self, request: ChatRequest, on_text: Callable[[str], None] | None = None,
                arrived: float | None = None) -> PreparedChat:
        """Build the chat's turn: its template (rendered and its fixed KV computed once per template), its
        contents, its sampling; `ChatRequestError` naming the field when it cannot run. `on_text` gets the
        response's text deltas as tokens come."""
        arrived = time.perf_counter() if arrived is None else arrived
        if request.mode not in MODES:
            raise ChatRequestError("kvcomm.mode", f"unknown mode {request.mode!r}; modes: {', '.join(MODES)}")
        template, slots = chat_template(as_rendered(request.messages, self.trim),
                                        lambda text: self._quotes(request.namespace, text))
        try:
            self._check_size(template, slots)
            state = self.engine.agent_state(template)
        except (TemplateError, ContextLengthError) as exc:
            raise _messages_error(exc) from None
        consumer = state.rendered.key
        first_read = request.mode in BASE_MODES and not any(
            self.contents.has_base(request.namespace, slots[name]) for name in template.names)
        txn = self.engine.pool.begin(request.namespace) if request.mode in POOL_MODES else None
        try:
            contents, entries = {}, {}
            for name in template.names:
                try:
                    entry, contents[name] = self._content(request, name, slots[name], consumer, txn, first_read)
                except (TemplateError, ContextLengthError) as exc:   # a message too long for its own prefill
                    raise _messages_error(exc) from None
                if entry is not None:
                    entries[name] = entry
            prompt_tokens = len(state.rendered.fill({n: c.token_ids for n, c in contents.items()}))
            sampling = Sampling(max_new_tokens=self._max_tokens(request, prompt_tokens),
                                temperature=request.temperature, top_p=request.top_p, seed=request.seed,
                                stop_token_ids=self.engine.stop_token_ids, stop=request.stop)
        except BaseException:
            if txn is not None:
                self.engine.pool.abort(txn)
            raise
        turn = TurnRequest(template, contents, mode=request.mode, sampling=sampling, namespace=request.namespace,
                           transaction=txn, force_dense=request.force_dense)
        prepared = PreparedChat(request, turn, consumer, entries, {name: slots[name] for name in entries},
                                prompt_tokens, arrived,
                                None if on_text is None else TextStream(self.engine.detokenize, request.stop, on_text))

        def on_token(token: int) -> None:
            self.tokens_generated += 1
            prepared.on_token(token)
        turn.on_token = on_token
        return prepared

    def _quotes(self, namespace: str, text: str) -> list[str]:
        """The texts of kept responses that a message's `text` quotes, whole or their end (`quoted_suffix`). A
        message kept whole (a response, or a text an earlier chat of the namespace carried) is never cut: it is
        found whole. Models repeat what they read (the question's last sentence, an earlier answer), and cutting a
        message seen before at such a repeat would only make new kinds of content."""
        if self.contents.holds(namespace, text):
            return []
        quotes = []
        for entry in self.contents.responses(namespace):
            if entry.text.rstrip()[-QUOTE_PROBE_CHARS:] not in text:   # before any tokenizer work
                continue
            quote = entry.text if entry.text in text else self._quoted_end(namespace, entry, text)
            if quote is not None:
                quotes.append(quote)
        return quotes

    def _quoted_end(self, namespace: str, entry: ChatContent, message: str) -> str | None:
        """The longest end of response `entry` that `message` quotes, kept as a response of its own (the producer's
        ids and base KV of those tokens, keys re-rotated to 0); None when there is none, or when those tokens do not
        decode to exactly that text."""
        ids = entry.token_ids
        if not entry.boundaries:
            entry.boundaries = tuple(len(self.engine.detokenize(ids[:k])) for k in range(len(ids))) + (len(entry.text),)
        span = quoted_suffix(message, entry.text, entry.boundaries, MIN_QUOTE_TOKENS)
        if span is None:
            return None
        i, j = span
        text = entry.text[entry.boundaries[i]:entry.boundaries[j]]
        if self.engine.detokenize(ids[i:j]) != text:
            return None
        if self.contents.get(namespace, text) is None:
            part = entry.base.slice(i, j).shifted(self.engine.runner.rope, 0)
            made = SharedContent("response", ids[i:j], base=part)
            self.contents.put(namespace, text, ChatContent("response", made.token_ids, part, made.content_key,
                                                           text=text))
        return text

    def _content(self, request: ChatRequest, name: str, text: str, consumer: str, txn: Any, first_read: bool
                 ) -> tuple[ChatContent | None, SharedContent]:
        """The content of placeholder `name` for this turn: kept from an earlier chat of the namespace, or made now;
        offered to the gate under `name` the first time. In the modes that assemble from base KV a content without
        one gets it now by an isolated prefill, unless the whole chat is a `first_read` (none of its contents has a
        base: the engine takes them from the chat's own prefill, and offers them to the gate then)."""
        entry = self.contents.get(request.namespace, text)
        if request.mode in BASE_MODES and not first_read and (entry is None or entry.base is None):
            made = self.engine.make_input(text, known=lambda ids: self.contents.sharing_start(request.namespace, ids))
            entry = ChatContent("input", made.token_ids, made.base, made.content_key)
            self.contents.put(request.namespace, text, entry)
        if entry is None:            # a dense mode or a first read: the tokens are all it needs now (kept: the text
            made = SharedContent("input", self.engine.encode(text))          # was seen whole)
            entry = ChatContent("input", made.token_ids, None, made.content_key)
            self.contents.put(request.namespace, text, entry)
        content = entry.for_turn(name, consumer)
        if txn is not None:
            for anchor_id in content.anchor_ids.values():    # committed by an earlier chat (or since evicted)
                txn.adopt_anchor(anchor_id, content.num_tokens)
            if name not in entry.gate_reason and content.base is not None:
                self.engine.offer_content(request.namespace, name, content, txn)
        return entry, content

    def _check_size(self, template: ChatTemplate, slots: dict[str, str]) -> None:
        """Refuse a chat too long to serve before any of its KV is computed (the template's fixed KV, the messages'
        base KV: a prompt over the memory plan would allocate it all first): its tokens, the template's fixed text
        and every message tokenized on their own (a quoted answer's producer tokens may differ by a few; the
        replica's admission checks the exact prompt), against the model's context and `max_prompt_tokens`.
        Tokenizes nothing when the text's UTF-8 bytes (at least its tokens) fit."""
        limit, admitted = int(self.engine.spec.max_position_embeddings) - 1, self.engine.max_prompt_tokens
        if admitted is not None:
            limit = min(limit, admitted)
        fixed_texts, _ = template.split(self.engine.tokenizer)
        if 1 + sum(len(text.encode()) for text in [*fixed_texts, *slots.values()]) <= limit:
            return                                # a token is at least one byte (and a BOS token at most one more)
        tokens = sum(len(f) for f in render_template(template, self.engine.tokenizer).fixed) + sum(
            len(self.engine.encode(text)) for text in slots.values())
        if tokens > limit:
            knob = "memory.max_prompt_tokens" if limit == admitted else "the model's context"
            raise ChatRequestError("messages", f"the prompt is {tokens} tokens; this replica admits at most {limit} "
                                               f"({knob})", CONTEXT_LENGTH_EXCEEDED)

    def _max_tokens(self, request: ChatRequest, prompt_tokens: int) -> int:
        context = int(self.engine.spec.max_position_embeddings)
        room = context - prompt_tokens
        if room < 1:
            raise ChatRequestError("messages", f"the prompt is {prompt_tokens} tokens; the model's context is "
                                               f"{context}", CONTEXT_LENGTH_EXCEEDED)
        if request.max_tokens is not None and request.max_tokens > room:
            raise ChatRequestError(request.max_tokens_param,
                                   f"{request.max_tokens} new tokens + {prompt_tokens} prompt tokens exceed the "
                                   f"model's context of {context} tokens (at most {room} for this prompt)",
                                   CONTEXT_LENGTH_EXCEEDED)
        return request.max_tokens or min(request.default_max_tokens, room)

    def finish(self, prepared: PreparedChat, result: TurnResult) -> ChatResult:
        """Send the rest of the text, remember the response (its tokens and KV, under its text), commit the chat's
        pool transaction and keep the gate's state with the contents it read."""
        request = prepared.request
        if prepared.stream is not None:
            prepared.stream.close(result.text)
        for name, entry in prepared.entries.items():     # a first read: the chat's prefill made the base KV
            base = prepared.turn.contents[name].base
            if entry.base is None and base is not None:
                self.contents.set_base(request.namespace, prepared.texts[name], entry, base)
        response = result.response
        if response is not None and self.engine.detokenize(response.token_ids) == result.text:
            self.contents.put(request.namespace, result.text,
                              ChatContent("response", response.token_ids, response.base, response.content_key,
                                          text=result.text))
        txn = prepared.turn.transaction
        if txn is not None and self.engine.pool.commit(txn) is not None:
            self._keep_gate_state(prepared, recorded=not result.reused)
        self.decisions[result.reason] += 1
        first_at = prepared.first_token_at if prepared.first_token_at is not None else time.perf_counter()
        return ChatResult(text=result.text, token_ids=list(result.token_ids), finish_reason=result.finish_reason,
                          mode=request.mode, reused=result.reused, reason=result.reason,
                          prompt_ids=list(result.prompt_ids),
                          cached_tokens=len(result.prompt_ids) - result.recomputed_tokens,
                          ttft_s=max(0.0, first_at - prepared.arrived), first_logits=result.first_logits,
                          predicted_kl=result.predicted_kl)

    def _keep_gate_state(self, prepared: PreparedChat, recorded: bool) -> None:
        """After a commit: each content keeps the gate's reasons and the anchor it became under each name; a turn
        that prefilled densely (`recorded`) recorded its deltas for every anchor its contents were flagged with."""
        for name, content in prepared.turn.contents.items():
            entry = prepared.entries.get(name)
            if entry is None:
                continue
            anchor = content.anchor_ids.get(name)
            turn_anchor = {name: anchor} if anchor is not None else {}
            if name in learn_gate_state(entry.anchor_ids, entry.gate_reason, turn_anchor, content.gate_reason):
                entry.recorded[name] = set()
            if anchor is not None and recorded:
                entry.recorded.setdefault(name, set()).add(prepared.consumer)

    def abort(self, prepared: PreparedChat) -> None:
        """The chat failed or was cancelled: nothing of it reaches the pool."""
        txn = prepared.turn.transaction
        if txn is not None and txn.state == "open":
            self.engine.pool.abort(txn)

    def run(self, request: ChatRequest, on_text: Callable[[str], None] | None = None) -> ChatResult:
        """One chat in this process: prepare, `engine.run_turn`, finish."""
        prepared = self.prepare(request, on_text)
        try:
            result = self.engine.run_turn(prepared.turn)
        except BaseException:
            self.abort(prepared)
            raise
        return self.finish(prepared, result)

    def stats(self) -> dict[str, Any]:
        return {"contents": self.contents.stats(), "decisions": dict(self.decisions),
                "tokens_generated": self.tokens_generated}
