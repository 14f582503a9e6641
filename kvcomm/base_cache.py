"""Base caches: the KV computed once and reused by every turn of one engine.

`AgentCache` holds each agent template's fixed-segment KV at its template positions (and the probe queries the
recompute selection uses), least recently used first out once over a byte budget. `InputEncoder` computes a
content's base KV in isolation at positions 0..n-1 (after a dropped user-turn lead-in). Neither knows about
modes, the anchor pool or offsets: that is `kvcomm.engine` and `kvcomm.alignment`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .corrections import probe_queries
from .kv import KVSegment, concat
from .runner import ModelRunner
from .templates import AgentTemplate, RenderedTemplate, render_template


@dataclass
class AgentState:
    """One agent template rendered, with its fixed segments' KV."""
    rendered: RenderedTemplate
    fixed_kv: list[KVSegment]        # each fixed segment's KV at its template positions
    probe: torch.Tensor | None       # [layers, heads, head_dim] the last template token's queries at position 0


def copy_segment(segment: KVSegment) -> KVSegment:
    """A segment with its own storage (copied out of a sequence's KV buffer)."""
    return KVSegment(segment.keys.clone(), segment.values.clone(), segment.start)


class AgentCache:
    """Agent templates -> `AgentState`, computed once per template (by content); the most recently used kept
    while their KV fits `budget_bytes` (the one just used always)."""

    def __init__(self, runner: ModelRunner, tokenizer: Any, budget_bytes: int,
                 check_fits: Callable[[int, int, str], None]):
        self.runner, self.tokenizer, self.budget_bytes = runner, tokenizer, budget_bytes
        self._check_fits = check_fits
        self._states: OrderedDict[AgentTemplate, AgentState] = OrderedDict()   # LRU order
        self.bytes = 0                                                            # fixed-segment KV held

    def __len__(self) -> int:
        return len(self._states)

    def templates(self) -> list[AgentTemplate]:
        """The cached templates, least recently used first."""
        return list(self._states)

    def clear(self) -> None:
        self._states.clear()
        self.bytes = 0

    def get(self, template: AgentTemplate) -> AgentState:
        state = self._states.get(template)
        if state is not None:
            self._states.move_to_end(template)
            return state
        rendered = render_template(template, self.tokenizer)
        ids = rendered.template_ids()
        self._check_fits(len(ids), 0, template.agent_id)
        _, kv = self.runner.prefill(ids)
        segments, cursor = [], 0
        spans = [len(rendered.fixed[0])]
        for marker, fixed in zip(rendered.marker_ids, rendered.fixed[1:]):
            spans += [len(marker), len(fixed)]
        for i, n in enumerate(spans):
            if i % 2 == 0:  # fixed segment (odd entries are placeholder markers)
                segments.append(copy_segment(kv.segment(cursor, cursor + n)))
            cursor += n
        probe = probe_queries(self.runner, ids, kv) if rendered.placeholders and len(ids) > 1 else None
        state = AgentState(rendered, segments, probe)
        self._states[template] = state
        self.bytes += sum(seg.nbytes for seg in segments)
        while self.bytes > self.budget_bytes and len(self._states) > 1:
            _, evicted = self._states.popitem(last=False)
            self.bytes -= sum(seg.nbytes for seg in evicted.fixed_kv)
        return state


class InputEncoder:
    """A content's base KV in isolation: prefilled after a lead-in (a user-turn header, so the content's first
    token is not the attention sink), the lead-in dropped, keys re-rotated to positions 0..n-1.

    Attention is causal, so the base of a content's first m tokens is the first m tokens of its base: a content
    that begins as a known one did (`known`) computes only what follows the tokens they share."""

    def __init__(self, runner: ModelRunner, tokenizer: Any):
        self.runner = runner
        self.lead_in = _input_lead_in(tokenizer)
        self._lead_in_kv: KVSegment | None = None

    def base(self, ids: Sequence[int], known: tuple[Sequence[int], KVSegment] | None = None) -> KVSegment:
        """[layers, kv_heads, len(ids), head_dim] at positions 0..n-1 (an empty segment for no tokens). `known`:
        another content's token ids and base KV; the tokens `ids` shares with its start are taken from it."""
        if not ids:
            spec = self.runner.spec
            return KVSegment.empty(spec.num_layers, spec.num_kv_heads, spec.head_dim, dtype=self.runner.dtype,
                                   device=self.runner.device)
        shared = shared_prefix(ids, known[0]) if known is not None else 0
        if shared == len(ids):                     # a prefix of the known content: nothing to compute
            part = known[1].slice(0, shared)
            return KVSegment(part.keys.clone(), part.values.clone(), 0)
        lead = len(self.lead_in)
        context = self._lead_in_cache()
        if shared:                                 # lead-in + the shared tokens' base at positions lead.. lead+shared
            prefix = known[1].slice(0, shared).shifted(self.runner.rope, lead)
            context = prefix if context is None else concat([context, prefix])
        _, kv = self.runner.prefill(list(ids[shared:]), context=context)
        seg = kv.segment(lead)
        return KVSegment(seg.keys.clone(), seg.values.clone(), seg.start).shifted(self.runner.rope, 0)

    def _lead_in_cache(self) -> KVSegment | None:
        if not self.lead_in:
            return None
        if self._lead_in_kv is None:
            _, kv = self.runner.prefill(self.lead_in)
            seg = kv.segment()
            self._lead_in_kv = KVSegment(seg.keys.clone(), seg.values.clone(), 0)
        return self._lead_in_kv


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` have in common."""
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def _input_lead_in(tokenizer: Any) -> tuple[int, ...]:
    """The tokens prepended when computing an input's base KV: the chat template's user-turn header, else BOS."""
    if getattr(tokenizer, "chat_template", None):
        marker = "\u2063KVCOMM\u2063"
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
        head = text.split(marker)[0]
        return tuple(tokenizer.encode(head, add_special_tokens=False))
    bos = getattr(tokenizer, "bos_token_id", None)
    return (bos,) if bos is not None else ()
