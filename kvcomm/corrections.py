"""Cheap corrections for a reused cache: which reused tokens a kvcomm turn recomputes, and the per-token signals
(attention and expected error) from which the turn gate (`kvcomm.gate.predict_kl`) predicts the turn's KL.

Query-driven selection (ProphetKV-style). What the first generated token depends on most is what the prompt's last
token attends to. That token is always the same template token (the end of the agent's assistant header), so its
queries are measured once per agent template, on the template itself (`probe_queries`, de-rotated to position 0),
and stand in for the turn's own: rotated to the turn's last position they score every cached token by the
attention it would get, averaged over layers and heads (`attention_mass`; no extra forward pass, one small
matmul per layer). Measured on GSM8K turns of the embedded model, the template's queries pick tokens as well as
the turn's exact queries do, and attention summed over all layers picks better than early or late layers alone.

EPIC-style span starts: the first k tokens of every placeholder (each reused span's own attention sink).

The runner recomputes the chosen tokens together with the tail (`ModelRunner.recompute_prefill`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .rope import Rope
from .runner import ModelRunner
from .templates import PromptLayout


def probe_queries(runner: ModelRunner, template_ids: Sequence[int], template_kv) -> torch.Tensor:
    """[layers, heads, head_dim] fp32: the last template token's queries at every layer, de-rotated to position 0.

    `template_kv`: the template's own KV (a `SequenceKV` or `KVSegment` holding at least all but its last token,
    from position 0), so only the last token is computed here."""
    ids = torch.as_tensor(list(template_ids), dtype=torch.int64)
    if ids.numel() < 2:
        raise ValueError("a query probe needs a template of at least two tokens")
    context = template_kv.segment(0, ids.numel() - 1) if hasattr(template_kv, "segment") else template_kv.slice(
        0, ids.numel() - 1)
    _, _, queries = runner.recompute_prefill(context, ids[:-1], ids[-1:], torch.empty(0, dtype=torch.int64),
                                             keep_queries=True)
    return runner.rope.shift_keys(queries, -(ids.numel() - 1))


def attention_mass(queries: torch.Tensor, keys: torch.Tensor, position: int, rope: Rope, scale: float
                   ) -> torch.Tensor:
    """[n] fp32: the attention a token at `position` with canonical `queries` [L, H, D] gives each of the cached
    tokens whose post-RoPE `keys` are [L, Hkv, n, D], averaged over layers and heads (sums to 1)."""
    layers, heads, dim = queries.shape
    kv_heads = keys.shape[1]
    rotated = rope.shift_keys(queries, position).to(keys.dtype)                              # [L, H, D]
    grouped = rotated.view(layers, kv_heads, heads // kv_heads, dim)                         # [L, Hkv, G, D]
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale                   # [L, Hkv, G, n]
    return torch.softmax(scores, dim=-1).mean(dim=(0, 1, 2))                                 # [n]


def span_starts(layout: PromptLayout, tokens: int, end: int) -> list[int]:
    """The first `tokens` positions of every placeholder span, below `end`."""
    return [t for begin, stop in layout.placeholder_spans for t in range(begin, min(stop, begin + tokens, end))]


def select_recompute(mass: torch.Tensor, begin: int, end: int, ratio: float, extra: Sequence[int] = (),
                     max_count: float = math.inf) -> torch.Tensor:
    """[r] int64 sorted positions to recompute: `extra` (positions in [begin, end)) plus the
    ceil(ratio * (end - begin)) positions of [begin, end) with the most attention `mass` ([n] with n >= end), no
    more than `max_count` in all: `extra` first (in its order), then the most attended."""
    extra = list(extra)
    chosen = torch.as_tensor(extra[:int(min(len(extra), max_count))], dtype=torch.int64)
    count = math.ceil(ratio * max(0, end - begin) - 1e-9) if ratio > 0 else 0
    count = int(min(count, end - begin, max(0, max_count - chosen.numel())))
    if count:
        top = torch.topk(mass[begin:end], count).indices + begin
        chosen = torch.cat([chosen, top.to(torch.int64).cpu()])
    return torch.unique(chosen)


def token_errors(layout: PromptLayout, placeholder_errors: Sequence[float | None], length: int) -> torch.Tensor:
    """[length] fp32: each prompt token's expected relative error when reused: 0 in the leading fixed segment
    (exact), placeholder i's error on its tokens and on the fixed segment right after it (whose offsets come from
    the same anchors). None: nothing is known (no anchor); counted as 0 here, the caller decides."""
    errors = torch.zeros(length, dtype=torch.float32)
    for i, error in enumerate(placeholder_errors):
        if error is None:
            continue
        begin, _ = layout.placeholder_spans[i]
        _, stop = layout.fixed_spans[i + 1]
        errors[begin:min(stop, length)] = error
    return errors
