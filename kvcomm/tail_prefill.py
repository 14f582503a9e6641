"""Tail prefill: what a reused turn still runs through the model before its first token.

`tail_length` says how many trailing prompt tokens are recomputed, `plan_correction` which cached tokens kvcomm
recomputes too (query-driven) and what the turn gate forecasts for the rest, and `prefill_rest` runs the model on
the assembled cache: the tail alone, the tail plus the chosen tokens, or CacheBlend's selection. It does not align
or offset the cache (`kvcomm.alignment`) and does not act on the forecast (the engine's turn gate does).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .base_cache import AgentState
from .config import KVCommConfig
from .corrections import attention_mass, select_recompute, span_starts, token_errors
from .gate import TurnForecast, predict_kl
from .kv import KVSegment
from .runner import ModelRunner, SequenceKV
from .templates import PromptLayout, RenderedTemplate


def tail_length(mode: str, rendered: RenderedTemplate, prompt_len: int, config: KVCommConfig) -> int:
    """How many trailing prompt tokens a `mode` turn recomputes whatever else it chooses (at least one): the last
    fixed segment, the last token, or (kvcomm) the last N tokens within that segment, by `config.kvcomm_tail` in
    kvcomm mode and `config.tail_policy` otherwise."""
    policy = config.kvcomm_tail if mode == "kvcomm" else config.tail_policy
    return tail_tokens(policy, len(rendered.fixed[-1]), prompt_len) if rendered.placeholders else 1


def tail_tokens(policy: str | int, segment: int, prompt_len: int) -> int:
    """The rule of `tail_length` for a template with placeholders whose last fixed segment has `segment` tokens:
    1 for "last_token", the segment for "last_segment", the last N (at most the segment) for a count N."""
    if policy == "last_token":
        return 1
    return max(1, min(segment if policy == "last_segment" else int(policy), segment, prompt_len))


def plan_correction(mode: str, state: AgentState, layout: PromptLayout, whole: KVSegment,
                    errors: Sequence[float | None], tail_len: int, runner: ModelRunner,
                    config: KVCommConfig) -> tuple[TurnForecast, torch.Tensor]:
    """For a reused kvcomm/hybrid turn: the cached tokens kvcomm recomputes (query-driven, plus span starts; with a
    short kvcomm tail the query chooses among the rest of the last fixed segment too) and the turn gate's forecast
    for what is left reused (hybrid: for its offsets and tail alone; its CacheBlend selection happens later).
    `whole`: [layers, kv_heads, prompt, head_dim], the assembled prompt."""
    length = whole.num_tokens                                    # prompt tokens; the last one is recomputed
    attention = attention_mass(state.probe, whole.keys[:, :, :length - 1], length - 1, runner.rope,
                               1.0 / math.sqrt(runner.spec.head_dim))                              # [length - 1]
    begin, end = len(state.rendered.fixed[0]), length - tail_len
    chosen = torch.empty(0, dtype=torch.int64)
    if mode == "kvcomm":
        starts = span_starts(layout, config.recompute_span_starts, end) if config.recompute_span_starts else ()
        chosen = select_recompute(attention, begin, end, config.recompute_ratio, [t for t in starts if t >= begin],
                                  config.recompute_max_tokens)
    forecast = predict_kl(attention, token_errors(layout, errors, length - 1),
                          torch.cat([chosen, torch.arange(end, length - 1)]), config.kl_scale, config.gate_max_kl)
    return forecast, chosen


def prefill_rest(mode: str, runner: ModelRunner, config: KVCommConfig, rendered: RenderedTemplate,
                 kv: SequenceKV, prompt_ids: Sequence[int], tail_ids: torch.Tensor, chosen: torch.Tensor,
                 extra_capacity: int) -> tuple[torch.Tensor, SequenceKV, int]:
    """Run the model on the turn's buffer `kv` (the whole prompt assembled in it; its last `len(tail_ids)` tokens,
    `tail_ids` [tail] int64, are dropped and computed) and the chosen cached tokens: logits, the turn's KV buffer
    (kvcomm and naive: `kv` itself, extended in place), and how many prompt tokens went through the model."""
    tail_len = int(tail_ids.numel())
    kv.truncate(len(prompt_ids) - tail_len)
    assembled = kv.segment()                                           # [L, H, prompt - tail, D], a view
    if mode in ("cacheblend", "hybrid"):
        ratio = config.blend_recompute_ratio if mode == "cacheblend" else config.hybrid_recompute_ratio
        logits, kv, selected = runner.blend_prefill(
            assembled, _cached_ids(prompt_ids, assembled), tail_ids, recompute_ratio=ratio,
            check_layer=min(config.blend_check_layer, runner.spec.num_layers - 1),
            protected_prefix=len(rendered.fixed[0]), extra_capacity=extra_capacity)
        return logits, kv, tail_len + int(selected.numel())
    # the tail alone is the recompute with nothing chosen (it equals runner.prefill after the cache)
    logits, kv, _ = runner.recompute_prefill(kv, _cached_ids(prompt_ids, assembled), tail_ids, chosen,
                                             extra_capacity=extra_capacity)
    return logits, kv, tail_len + int(chosen.numel())


def _cached_ids(prompt_ids: Sequence[int], assembled: KVSegment) -> torch.Tensor:
    """[assembled tokens] int64: the ids of the prompt tokens whose KV is cached."""
    return torch.tensor(list(prompt_ids[:assembled.num_tokens]))
