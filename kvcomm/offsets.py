"""Offset estimation: predict the KV change a consumer's prefix causes in a placeholder and the segment after it.

This module owns the formulas of kvcomm-algorithm.md section 1.4, with no Python loops over tokens or layers
(distances are computed on anchors stacked to ``[N, ...]`` in one fp32 buffer, differenced in place; the weighted
sums are accumulated one anchor at a time, so no ``[N, ...]`` copy of the deltas is ever made):

* length filter: an anchor takes part iff it covers at least ``config.min_anchor_coverage`` of the current
  placeholder's T tokens (1.0: the reference's rule, at least as long) and holds deltas for this consumer whose
  following segment has the current length (S);
* placeholder weights, per token, shared across layers/heads/channels, anchor aligned at its start:
  ``w_a(t) = softmax_a(-mean_{l,h,c} |B[l,h,t,c] - E_a[l,h,t,c]| / tau)``, separately for K and V; an anchor
  shorter than T has no say on the tokens past its end (a token no anchor covers gets no placeholder offset);
* prefix weights, per (layer, head, channel), anchor aligned at its tail over the m = min(T, T_a) tokens both have:
  ``w_a(l,h,c) = softmax_a(-||B[l,h,-m:,c] - E_a[l,h,-m:,c]||_2 * sqrt(T/m) / tau)`` (m = T: the reference's
  formula), separately for K and V;
* offsets ``sum_a w_a * delta_a``, with layer 0 forced to zero (layer-0 KV depends only on token and position).

Modes. Corrected (``config.rerotate_deltas``): keys are compared at canonical positions (the current base is
de-rotated by ``-base.start`` and compared with the anchors' position-0 base keys) and the stored position-0 key
deltas are rotated to the current starts. Reference: the rotated current base is compared with the anchor's last
writer's rotated base key, and key deltas are added as observed (the reference's quirk).
Weights are cached in the caller's `weight_cache` mapping keyed by (placeholder, content key, anchor ids) and,
only where they depend on the consumer, the consumer. Corrected mode compares canonical keys, so its weights depend
on the content and the anchors alone: every consumer of one content shares one computation (the anchors are
combined once per content, not once per consumer). Reference mode compares keys rotated for the consumer's own
positions: with ``config.per_consumer_weights`` each consumer gets its own, without it the first consumer's are
reused by all (the reference's quirk). The cache's lifetime and bound are the caller's.

`recorded_error` measures how far an estimate is from the offsets a dense prefill actually observed (the relative
V error over the placeholder and its following segment): the engine records it with every new anchor's deltas, as
the pool's own track record for that placeholder kind and consumer (the turn gate reads it).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Hashable, MutableMapping, Sequence

import torch

from .anchor_records import Anchor, ConsumerDeltas
from .config import KVCommConfig
from .kv import KVSegment
from .rope import Rope


@dataclass(frozen=True, eq=False)
class AnchorWeights:
    """Softmax weights over N compatible anchors (each sums to 1 over dim 0).

    ph_k, ph_v: [N, T], one weight per anchor and placeholder token.
    pf_k, pf_v: [N, layers, kv_heads, head_dim], one weight per anchor and (layer, head, channel).
    """
    ph_k: torch.Tensor
    ph_v: torch.Tensor
    pf_k: torch.Tensor
    pf_v: torch.Tensor


@dataclass(frozen=True, eq=False)
class OffsetEstimate:
    """Offsets to add to the rotated base placeholder and the rotated following segment.

    ph_key, ph_value: [layers, kv_heads, T, head_dim]; pf_key, pf_value: [layers, kv_heads, S, head_dim]; fp32
    whatever the KV's dtype (`KVSegment.plus` adds them in fp32 and rounds once); layer 0 of each is exactly zero. Weights as in `AnchorWeights`, over `anchor_ids` (in pool order).
    effective_anchors: 1 / sum_a w_a^2, averaged over positions, then over the four weight sets.
    """
    ph_key: torch.Tensor
    ph_value: torch.Tensor
    pf_key: torch.Tensor
    pf_value: torch.Tensor
    anchor_ids: list[str]
    ph_weights_k: torch.Tensor
    ph_weights_v: torch.Tensor
    pf_weights_k: torch.Tensor
    pf_weights_v: torch.Tensor
    effective_anchors: float
    weights_from_cache: bool = False


def min_covered_tokens(placeholder_tokens: int, min_coverage: float) -> int:
    """The fewest tokens an anchor must have to vouch for a placeholder of `placeholder_tokens` tokens."""
    return max(1, math.ceil(min_coverage * placeholder_tokens - 1e-9))


def compatible_anchors(anchors: Sequence[Anchor], consumer: str, placeholder_tokens: int,
                       following_tokens: int, min_coverage: float = 1.0) -> list[Anchor]:
    """The anchors that can vouch for a placeholder of T tokens followed by S tokens in `consumer`'s prompt: at
    least `min_coverage` * T tokens long, with deltas for this consumer over a following segment of S tokens."""
    shortest = min_covered_tokens(placeholder_tokens, min_coverage)
    return [a for a in anchors
            if a.num_tokens >= shortest and consumer in a.deltas
            and a.deltas[consumer].pf_tokens == following_tokens]


def content_fingerprint(values: torch.Tensor) -> str:
    """A key for placeholder content: a hash of its values (position-independent) and their shape/dtype."""
    raw = values.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
    digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
    return f"{tuple(values.shape)}:{values.dtype}:{digest}"


def _softmax_over_anchors(distances: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax_a(-distances / temperature) over dim 0; an entry at +inf distance gets weight 0, and a position
    no anchor covers (every distance +inf) gets all-zero weights."""
    weights = torch.softmax(-distances / temperature, dim=0)
    return torch.nan_to_num(weights, nan=0.0)


def _anchor_distances(current: torch.Tensor, anchors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Placeholder and prefix distances of N anchors from the current base, one side (K or V).

    current: [L, H, T, D]; anchors: N tensors [L, H, T_a, D]. With m = min(T, T_a) the tokens both have, returns
    (mean_{l,h,c} |B - E_a| per token over the first m tokens, +inf past them: [N, T];
     ||B[-m:] - E_a[-m:]||_2 over tokens per (l, h, c), scaled by sqrt(T / m): [N, L, H, D]).
    One anchor at a time in fp32 (no [N, ...] buffer); when T_a == T the two alignments coincide and share one
    difference.
    """
    layers, heads, tokens, dim = current.shape
    current32 = current.float()                                                       # [L, H, T, D]
    placeholder_dist = torch.full((len(anchors), tokens), math.inf, dtype=torch.float32, device=current.device)
    prefix_dist = torch.empty((len(anchors), layers, heads, dim), dtype=torch.float32, device=current.device)
    for i, anchor in enumerate(anchors):
        overlap = min(tokens, anchor.shape[2])
        head = anchor[:, :, :overlap].float() - current32[:, :, :overlap]             # [L, H, m, D] start-aligned
        if anchor.shape[2] == tokens:
            tail = head
        else:
            tail = anchor[:, :, anchor.shape[2] - overlap:].float() - current32[:, :, tokens - overlap:]  # tail
        # the L2 norm over tokens as sqrt(sum of squares): vector_norm over a middle dim is ~5x slower on a CPU
        prefix_dist[i] = tail.square().sum(dim=2).sqrt_() * math.sqrt(tokens / overlap)       # [L, H, D]
        placeholder_dist[i, :overlap] = head.abs_().mean(dim=(0, 1, 3))                       # [m]
    return placeholder_dist, prefix_dist


def anchor_weights(current_keys: torch.Tensor, current_values: torch.Tensor, anchor_keys: Sequence[torch.Tensor],
                   anchor_values: Sequence[torch.Tensor], temperature: float) -> AnchorWeights:
    """Weights of N anchors for a placeholder of T tokens.

    current_keys, current_values: [L, H, T, D], the current base as it is compared (see the module docstring).
    anchor_keys, anchor_values: N tensors [L, H, T_a, D], in the same frame as current_keys (an anchor shorter than
    T weighs only on the tokens it has).
    """
    ph_dist_k, pf_dist_k = _anchor_distances(current_keys, anchor_keys)              # [N, T], [N, L, H, D]
    ph_dist_v, pf_dist_v = _anchor_distances(current_values, anchor_values)          # [N, T], [N, L, H, D]
    return AnchorWeights(ph_k=_softmax_over_anchors(ph_dist_k, temperature),
                         ph_v=_softmax_over_anchors(ph_dist_v, temperature),
                         pf_k=_softmax_over_anchors(pf_dist_k, temperature),
                         pf_v=_softmax_over_anchors(pf_dist_v, temperature))


def _weighted_sum(weights: torch.Tensor, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_a weights[a] * deltas[a] in fp32. weights: [N, ...] broadcastable against each delta [L, H, X, D]."""
    total = deltas[0].float() * weights[0]
    for weight, delta in zip(weights[1:], deltas[1:]):
        total.addcmul_(delta.float(), weight)
    return total


def _weighted_placeholder_sum(weights: torch.Tensor, deltas: Sequence[torch.Tensor], tokens: int) -> torch.Tensor:
    """sum_a w_a(t) * delta_a[..., t, :] over the T placeholder tokens in fp32; an anchor shorter than T adds
    nothing past its end (its weight there is 0). weights: [N, T]; deltas: N tensors [L, H, T_a, D]."""
    layers, heads, _, dim = deltas[0].shape
    total = None                                                                         # [L, H, T, D] fp32
    for weight, delta in zip(weights, deltas):
        overlap = min(tokens, delta.shape[2])
        term = delta[:, :, :overlap].float()
        scale = weight[None, None, :overlap, None]
        if total is None and overlap == tokens:
            total = term * scale                                     # the first full-length anchor starts the sum
            continue
        if total is None:
            total = torch.zeros((layers, heads, tokens, dim), dtype=torch.float32, device=delta.device)
        total[:, :, :overlap].addcmul_(term, scale)
    return total


def _effective_count(weights: torch.Tensor) -> float:
    """1 / sum_a w_a^2 per position (weights [N, ...]), averaged over the positions some anchor covers."""
    if not weights[0].numel():
        return float(weights.shape[0])
    mass = weights.pow(2).sum(dim=0)
    covered = mass > 0
    return float((1.0 / mass[covered]).mean()) if bool(covered.any()) else 0.0


def _check_geometry(base: KVSegment, following: KVSegment, anchors: Sequence[Anchor]) -> None:
    layers, heads, _, dim = base.keys.shape
    if (following.keys.shape[0], following.keys.shape[1], following.keys.shape[3]) != (layers, heads, dim):
        raise ValueError(f"following segment {tuple(following.keys.shape)} does not match the placeholder's "
                         f"[layers, kv_heads, *, head_dim] = {tuple(base.keys.shape)}")
    for a in anchors:
        shape = a.base_keys.shape
        if (shape[0], shape[1], shape[3]) != (layers, heads, dim):
            raise ValueError(f"anchor {a.anchor_id} has KV {tuple(shape)}; the current placeholder has "
                             f"{tuple(base.keys.shape)} (different model?)")


def _check_mode(anchors: Sequence[Anchor], deltas: Sequence[ConsumerDeltas], config: KVCommConfig) -> None:
    for anchor, d in zip(anchors, deltas):
        if d.keys_canonical != config.rerotate_deltas:
            raise ValueError(f"anchor {anchor.anchor_id} stored key deltas with rerotate_deltas="
                             f"{d.keys_canonical}, but offsets are estimated with rerotate_deltas="
                             f"{config.rerotate_deltas}; the pool and the estimator must share one config")
        if not config.rerotate_deltas and anchor.reference_base_key is None:
            raise ValueError(f"anchor {anchor.anchor_id} has no rotated base key; reference mode needs one")


@dataclass(frozen=True, eq=False)
class OffsetPlan:
    """What one placeholder's offsets combine: the compatible anchors' deltas for this consumer (pool order) and
    their weights, with where the placeholder (`ph_start`, T tokens) and its following segment (`pf_start`, S
    tokens) sit in the consumer's prompt. `offset_layers` turns it into offsets for any range of layers."""
    deltas: list[ConsumerDeltas]
    anchor_ids: list[str]
    weights: AnchorWeights
    tokens: int
    ph_start: int
    pf_start: int
    rerotate: bool
    weights_from_cache: bool


def plan_offsets(base: KVSegment, following: KVSegment, anchors: Sequence[Anchor], consumer: str, rope: Rope,
                 config: KVCommConfig, weight_cache: MutableMapping[Hashable, AnchorWeights] | None = None,
                 content_key: str | None = None) -> OffsetPlan | None:
    """The anchors and weights `estimate_offsets` combines (arguments as there); None when no anchor is
    compatible or the placeholder is empty. Weights come from `weight_cache` when it holds them."""
    tokens, following_tokens = base.num_tokens, following.num_tokens
    if tokens == 0:
        return None
    _check_geometry(base, following, anchors)
    usable = compatible_anchors(anchors, consumer, tokens, following_tokens, config.min_anchor_coverage)
    if not usable:
        return None
    deltas = [a.deltas[consumer] for a in usable]
    _check_mode(usable, deltas, config)
    anchor_ids = [a.anchor_id for a in usable]

    cache_key = None
    weights = None
    if weight_cache is not None:
        content = content_key if content_key is not None else content_fingerprint(base.values)
        cache_key = (usable[0].placeholder, content, tuple(anchor_ids),
                     consumer if weights_depend_on_consumer(config) else None)
        weights = weight_cache.get(cache_key)
    from_cache = weights is not None
    if weights is None:
        if config.rerotate_deltas:
            current_keys = rope.shift_keys(base.keys, -base.start)   # [L, H, T, D] at positions 0..T-1
            anchor_keys = [a.base_keys for a in usable]               # [L, H, T_a, D] at positions 0..T_a-1
        else:
            current_keys = base.keys                                  # rotated for this consumer's positions
            anchor_keys = [a.reference_base_key for a in usable]      # rotated for the last writer's positions
        weights = anchor_weights(current_keys, base.values, anchor_keys, [a.base_values for a in usable],
                                 config.temperature)
        if cache_key is not None:
            weight_cache[cache_key] = weights
    return OffsetPlan(deltas, anchor_ids, weights, tokens, base.start, following.start, config.rerotate_deltas,
                      from_cache)


def offset_layers(plan: OffsetPlan, rope: Rope, layers: slice) -> tuple[torch.Tensor, ...]:
    """The plan's fp32 offsets for `layers` (a slice of layers from `layers.start`): (ph_key, ph_value
    [l, H, T, D]; pf_key, pf_value [l, H, S, D]), layer 0 exactly zero. Each element is computed by the same
    operations whatever the slice, so offsets computed a few layers at a time equal those computed at once."""
    weights, deltas, tokens = plan.weights, plan.deltas, plan.tokens
    # Weighted sums over anchors, accumulated one anchor at a time into fp32 outputs (no [N, ...] stack).
    # ph weights [N, T]; deltas [l, H, T_a, D], each over its first min(T, T_a) tokens -> [l, H, T, D]
    ph_key = _weighted_placeholder_sum(weights.ph_k, [d.ph_key[layers] for d in deltas], tokens)
    ph_value = _weighted_placeholder_sum(weights.ph_v, [d.ph_value[layers] for d in deltas], tokens)
    # Prefix weights differ per channel and RoPE mixes channel c with c +- D/2, so (corrected mode) rotate each
    # anchor's delta to the current start before weighting. Placeholder weights are per token only, so rotating
    # the sum is exact.
    pf_deltas_k = [rope.shift_keys(d.pf_key[layers].float(), plan.pf_start) if plan.rerotate else d.pf_key[layers]
                   for d in deltas]
    # pf weights [N, L, H, D] -> [N, l, H, 1, D]; deltas [l, H, S, D]
    pf_key = _weighted_sum(weights.pf_k[:, layers, :, None, :], pf_deltas_k)          # [l, H, S, D]
    pf_value = _weighted_sum(weights.pf_v[:, layers, :, None, :], [d.pf_value[layers] for d in deltas])
    if plan.rerotate:
        ph_key = rope.shift_keys(ph_key, plan.ph_start)
    if (layers.start or 0) == 0:
        for offset in (ph_key, ph_value, pf_key, pf_value):
            offset[0] = 0.0                                                        # layer 0: base is exact
    return ph_key, ph_value, pf_key, pf_value


def add_offsets(plan: OffsetPlan, rope: Rope, placeholder: KVSegment, following: KVSegment,
                chunk_elements: int = 1 << 18) -> None:
    """Add the plan's offsets in place to `placeholder` and `following` (views into the turn's KV buffer, at the
    positions the plan was made for): the very sums `estimate_offsets` returns, added as `KVSegment.plus` adds
    them (in fp32, rounded once), but computed a few layers at a time (about `chunk_elements` placeholder
    elements), so no full-size fp32 offset is ever allocated and each chunk stays in cache while it is added."""
    layers, heads, tokens, dim = placeholder.keys.shape
    step = max(1, chunk_elements // max(1, heads * tokens * dim))
    targets = (placeholder.keys, placeholder.values, following.keys, following.values)
    for begin in range(0, layers, step):
        chunk = slice(begin, min(layers, begin + step))
        for target, offset in zip(targets, offset_layers(plan, rope, chunk)):
            _add_rounded_once(target[chunk], offset)


def _add_rounded_once(target: torch.Tensor, offset: torch.Tensor) -> None:
    """target += offset, the sum taken in fp32 and rounded once into target's dtype (`KVSegment.plus`'s rule)."""
    if target.dtype == torch.float32:
        target.add_(offset)
    else:
        target.copy_(target.float().add_(offset))


def estimate_offsets(base: KVSegment, following: KVSegment, anchors: Sequence[Anchor], consumer: str, rope: Rope,
                     config: KVCommConfig, weight_cache: MutableMapping[Hashable, AnchorWeights] | None = None,
                     content_key: str | None = None) -> OffsetEstimate | None:
    """Estimate the offsets of a placeholder (`base`, rotated to its actual start in `consumer`'s prompt) and of
    the consumer's fixed segment after it (`following`, rotated to its actual start) from `anchors` (one
    placeholder kind, pool order).

    Returns None when no anchor is compatible (or the placeholder is empty): the caller then uses the bases as
    they are. `content_key` identifies the placeholder content for `weight_cache`; by default a hash of its values.
    A turn's assembly adds the same offsets in place instead (`plan_offsets`, `add_offsets`).
    """
    plan = plan_offsets(base, following, anchors, consumer, rope, config, weight_cache, content_key)
    if plan is None:
        return None
    ph_key, ph_value, pf_key, pf_value = offset_layers(plan, rope, slice(0, None))
    weights = plan.weights
    effective = sum(_effective_count(w) for w in (weights.ph_k, weights.ph_v, weights.pf_k, weights.pf_v)) / 4
    return OffsetEstimate(
        ph_key=ph_key, ph_value=ph_value, pf_key=pf_key, pf_value=pf_value,   # fp32: rounded once, when added
        anchor_ids=plan.anchor_ids, ph_weights_k=weights.ph_k, ph_weights_v=weights.ph_v,
        pf_weights_k=weights.pf_k, pf_weights_v=weights.pf_v, effective_anchors=effective,
        weights_from_cache=plan.weights_from_cache)


def apply_offsets(base: KVSegment, following: KVSegment, estimate: OffsetEstimate | None
                  ) -> tuple[KVSegment, KVSegment]:
    """(base + placeholder offsets, following + prefix offsets); the segments unchanged when `estimate` is None."""
    if estimate is None:
        return base, following
    if estimate.ph_key.shape != base.keys.shape or estimate.pf_key.shape != following.keys.shape:
        raise ValueError(f"offsets {tuple(estimate.ph_key.shape)} / {tuple(estimate.pf_key.shape)} do not match "
                         f"the segments {tuple(base.keys.shape)} / {tuple(following.keys.shape)}")
    return (base.plus(estimate.ph_key, estimate.ph_value), following.plus(estimate.pf_key, estimate.pf_value))


def weights_depend_on_consumer(config: KVCommConfig) -> bool:
    """Whether anchor weights must be computed per consumer: only in reference mode (rotated keys compared at the
    consumer's own positions) with ``per_consumer_weights``; corrected-mode weights depend on the content alone."""
    return config.per_consumer_weights and not config.rerotate_deltas


def recorded_error(estimate: OffsetEstimate | None, ph_real: KVSegment, ph_base: KVSegment, pf_real: KVSegment,
                   pf_base: KVSegment) -> float:
    """Relative V error, over a placeholder and its following segment, of `estimate` against what a dense
    prefill observed: ``sqrt(sum ||base + offset - real||^2 / sum ||real||^2)`` over both parts, in fp32 (without
    an estimate the offset is zero: the error of reusing the bases as they are). ph_*: [L, H, T, D] at the
    placeholder's positions; pf_*: [L, H, S, D]."""
    error, norm = 0.0, 0.0
    for real, base, offset in ((ph_real, ph_base, None if estimate is None else estimate.ph_value),
                               (pf_real, pf_base, None if estimate is None else estimate.pf_value)):
        predicted = base.values.float() if offset is None else base.values.float() + offset.float()
        error += float((predicted - real.values.float()).pow(2).sum())
        norm += float(real.values.float().pow(2).sum())
    return math.sqrt(error / norm) if norm > 0 else 0.0
