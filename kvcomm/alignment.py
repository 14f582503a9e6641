"""Alignment and offsets: cached KV moved to where a consumer's prompt puts it, and the offsets learned from it.

`align_and_offset` writes every placeholder's base KV and every fixed segment into the turn's KV buffer at its
prompt positions (keys re-rotated) and, with an anchor-pool snapshot, adds the offsets interpolated from the anchors
there (`kvcomm.offsets`). `record_deltas` is the other side: after a dense prefill, stage each new anchor's
real-minus-base deltas for this consumer. Neither decides whether a turn reuses (the gates, `kvcomm.engine`) nor which tokens are recomputed (`kvcomm.tail_prefill`).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

from .base_cache import AgentState, copy_segment
from .config import KVCommConfig
from .kv import KVSegment
from .offsets import OffsetEstimate, OffsetPlan, add_offsets, estimate_offsets, plan_offsets, recorded_error
from .rope import Rope
from .runner import SequenceKV
from .stages import StageTimes
from .templates import PromptLayout

WEIGHT_CACHE_ENTRIES = 32    # anchor weights shared by the consumers of one content (oldest dropped)


def align_and_offset(state: AgentState, layout: PromptLayout, contents: Sequence[Any], bases: Sequence[KVSegment],
                     snapshot: Any, rope: Rope, config: KVCommConfig, weight_cache: OrderedDict,
                     times: StageTimes, into: SequenceKV) -> list[float | None]:
    """Write the prompt's cached KV into the turn's own buffer `into` (empty, from position 0, with room for the
    whole prompt), piece by piece at its prompt positions: the leading fixed segment, then each placeholder's base
    KV (`bases`) and the fixed segment after it, keys re-rotated on the way in; with a `snapshot` (kvcomm/hybrid)
    the offsets interpolated from the anchors are added in place (`kvcomm.offsets.add_offsets`). Nothing is built
    and then copied: the buffer is what the tail prefill extends and the decode reads. Afterwards `into` holds
    `layout.length` tokens. Returns per placeholder its anchors' recorded offset error (None without offsets).
    Times the "align" and "offset" stages."""
    if into.length or into.start or into.capacity < layout.length:
        raise ValueError(f"the turn's buffer must be empty, from position 0, with room for {layout.length} tokens "
                         f"(holds {into.length} from {into.start}, capacity {into.capacity})")
    rendered = state.rendered
    errors: list[float | None] = []
    with times.stage("align"):
        _place(into, state.fixed_kv[0], 0, rope)
    for i, (name, content) in enumerate(zip(rendered.placeholders, contents)):
        with times.stage("align"):
            ph = _place(into, bases[i], layout.placeholder_spans[i][0], rope)
            pf = _place(into, state.fixed_kv[i + 1], layout.fixed_spans[i + 1][0], rope)
        errors.append(None)
        if snapshot is not None and content.num_tokens:
            with times.stage("offset"):
                anchors = snapshot.anchors(name)
                plan = plan_offsets(ph, pf, anchors, rendered.key, rope, config, weight_cache=weight_cache,
                                    content_key=content.content_key)
                if plan is not None:
                    add_offsets(plan, rope, ph, pf)
                errors[-1] = anchor_error(anchors, plan, rendered.key, config)
    into.length = layout.length
    while len(weight_cache) > WEIGHT_CACHE_ENTRIES:
        weight_cache.popitem(last=False)
    return errors


def _place(into: SequenceKV, segment: KVSegment, begin: int, rope: Rope) -> KVSegment:
    """Write `segment` into `into` at buffer index (= position) `begin`, keys re-rotated to it; return the view
    [layers, kv_heads, tokens, head_dim] of the buffer it now occupies."""
    end = begin + segment.num_tokens
    view = KVSegment(into.keys[:, :, begin:end], into.values[:, :, begin:end], begin)
    rope.shift_keys(segment.keys, begin - segment.start, out=view.keys)
    view.values.copy_(segment.values)
    return view


def anchor_error(anchors: Sequence[Any], estimate: OffsetPlan | OffsetEstimate | None, consumer: str,
                 config: KVCommConfig) -> float:
    """The mean recorded offset error of the anchors an estimate (or plan) used (`unknown_anchor_error` where an
    anchor recorded none, or when there was no estimate at all)."""
    if estimate is None:
        return config.unknown_anchor_error
    by_id = {a.anchor_id: a for a in anchors}
    recorded = [by_id[i].deltas[consumer].offset_error for i in estimate.anchor_ids]
    known = [config.unknown_anchor_error if e is None else e for e in recorded]
    return sum(known) / len(known)


def record_deltas(state: AgentState, contents: Sequence[Any], kv: SequenceKV, snapshot: Any, transaction: Any,
                  rope: Rope, config: KVCommConfig) -> None:
    """Stage real-minus-base deltas for every placeholder of this dense turn that is a new anchor, each with the
    error the pool's other anchors would have made on it (`ConsumerDeltas.offset_error`)."""
    rendered = state.rendered
    layout = rendered.layout([c.num_tokens for c in contents])
    for i, (name, content) in enumerate(zip(rendered.placeholders, contents)):
        anchor_id = content.anchor_ids.get(name)
        if anchor_id is None or content.num_tokens == 0:
            continue
        ph_start, ph_end = layout.placeholder_spans[i]
        pf_start, pf_end = layout.fixed_spans[i + 1]
        ph_real, pf_real = copy_segment(kv.segment(ph_start, ph_end)), copy_segment(kv.segment(pf_start, pf_end))
        ph_base = content.base.shifted(rope, ph_start)
        pf_base = state.fixed_kv[i + 1].shifted(rope, pf_start)
        others = [a for a in snapshot.anchors(name) if a.anchor_id != anchor_id]
        estimate = estimate_offsets(ph_base, pf_base, others, rendered.key, rope, config)
        transaction.add_deltas(
            anchor_id, rendered.key, ph_real=ph_real, ph_base_rotated=ph_base, pf_real=pf_real,
            pf_base=pf_base, offset_error=recorded_error(estimate, ph_real, ph_base, pf_real, pf_base))
