"""Offset estimation: predict the KV change a consumer's prefix causes in a placeholder and the segment after it.

This module owns the formulas of kvcomm-algorithm.md section 1.4, with no Python loops over tokens or layers
(distances are computed on anchors stacked to ``[N, ...]`` in one fp32 buffer, differenced in place; the weighted
sums are accumulated one anchor at a time, so no ``[N, ...]`` copy of the deltas is ever made):

* length filter: an anchor takes part iff it is at least as long as the current placeholder (T) and holds deltas
  for this consumer whose following segment has the current length (S);
* placeholder weights, per token, shared across layers/heads/channels, anchor aligned at its start:
  ``w_a(t) = softmax_a(-mean_{l,h,c} |B[l,h,t,c] - E_a[l,h,t,c]| / tau)``, separately for K and V;
* prefix weights, per (layer, head, channel), anchor aligned at its tail:
  ``w_a(l,h,c) = softmax_a(-||B[l,h,:,c] - E_a[l,h,-T:,c]||_2 / tau)``, separately for K and V;
* offsets ``sum_a w_a * delta_a``, with layer 0 forced to zero (layer-0 KV depends only on token and position).

Modes. Corrected (``config.rerotate_deltas``): keys are compared at canonical positions (the current base is
de-rotated by ``-base.start`` and compared with the anchors' position-0 base keys) and the stored position-0 key
deltas are rotated to the current starts. Reference: the rotated current base is compared with the anchor's last
writer's rotated base key, and key deltas are added as observed (the reference's quirk).
Weights are cached in the caller's `weight_cache` dict keyed by (placeholder, content key, anchor ids) and, only
when ``config.per_consumer_weights``, the consumer; without it the first consumer's weights are reused by all
(the reference's quirk). The cache's lifetime is the caller's (scope it to one job or request).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Hashable, MutableMapping, Sequence

import torch

from .anchor_pool import Anchor, ConsumerDeltas
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


def compatible_anchors(anchors: Sequence[Anchor], consumer: str, placeholder_tokens: int,
                       following_tokens: int) -> list[Anchor]:
    """The anchors that can vouch for a placeholder of T tokens followed by S tokens in `consumer`'s prompt."""
    return [a for a in anchors
            if a.num_tokens >= placeholder_tokens and consumer in a.deltas
            and a.deltas[consumer].pf_tokens == following_tokens]


def content_fingerprint(values: torch.Tensor) -> str:
    """A key for placeholder content: a hash of its values (position-independent) and their shape/dtype."""
    raw = values.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
    digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
    return f"{tuple(values.shape)}:{values.dtype}:{digest}"


def _softmax_over_anchors(distances: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(-distances / temperature, dim=0)


def _anchor_distances(current: torch.Tensor, anchors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Placeholder and prefix distances of N anchors from the current base, one side (K or V).

    current: [L, H, T, D]; anchors: N tensors [L, H, T_a, D] with T_a >= T. Returns
    (mean_{l,h,c} |B - E_a| per token, anchor aligned at its start: [N, T];
     ||B - E_a||_2 over tokens per (l, h, c), anchor aligned at its tail: [N, L, H, D]).
    One fp32 buffer per alignment, differenced in place; when every anchor has exactly T tokens the two
    alignments coincide and the buffer is shared.
    """
    layers, heads, tokens, dim = current.shape
    current32 = current.float()                                                       # [L, H, T, D]
    head = torch.empty((len(anchors), layers, heads, tokens, dim), dtype=torch.float32,
                       device=current.device)                                         # [N, L, H, T, D]
    for i, anchor in enumerate(anchors):
        head[i].copy_(anchor[:, :, :tokens])                                          # start-aligned
    head.sub_(current32)                                                              # E_a - B
    if all(anchor.shape[2] == tokens for anchor in anchors):
        prefix_dist = torch.linalg.vector_norm(head, dim=3)                           # [N, L, H, D]
    else:
        tail = torch.empty_like(head)                                                 # [N, L, H, T, D]
        for i, anchor in enumerate(anchors):
            tail[i].copy_(anchor[:, :, anchor.shape[2] - tokens:])                    # tail-aligned
        prefix_dist = torch.linalg.vector_norm(tail.sub_(current32), dim=3)           # [N, L, H, D]
        del tail
    placeholder_dist = head.abs_().mean(dim=(1, 2, 4))                                # [N, T]
    return placeholder_dist, prefix_dist


def anchor_weights(current_keys: torch.Tensor, current_values: torch.Tensor, anchor_keys: Sequence[torch.Tensor],
                   anchor_values: Sequence[torch.Tensor], temperature: float) -> AnchorWeights:
    """Weights of N anchors for a placeholder of T tokens.

    current_keys, current_values: [L, H, T, D], the current base as it is compared (see the module docstring).
    anchor_keys, anchor_values: N tensors [L, H, T_a, D] with T_a >= T, in the same frame as current_keys.
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


def _effective_count(weights: torch.Tensor) -> float:
    """1 / sum_a w_a^2 per position (weights [N, ...]), averaged over positions."""
    return float((1.0 / weights.pow(2).sum(dim=0)).mean()) if weights[0].numel() else float(weights.shape[0])


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


def estimate_offsets(base: KVSegment, following: KVSegment, anchors: Sequence[Anchor], consumer: str, rope: Rope,
                     config: KVCommConfig, weight_cache: MutableMapping[Hashable, AnchorWeights] | None = None,
                     content_key: str | None = None) -> OffsetEstimate | None:
    """Estimate the offsets of a placeholder (`base`, rotated to its actual start in `consumer`'s prompt) and of
    the consumer's fixed segment after it (`following`, rotated to its actual start) from `anchors` (one
    placeholder kind, pool order).

    Returns None when no anchor is compatible (or the placeholder is empty): the caller then uses the bases as
    they are. `content_key` identifies the placeholder content for `weight_cache`; by default a hash of its values.
    """
    tokens, following_tokens = base.num_tokens, following.num_tokens
    if tokens == 0:
        return None
    _check_geometry(base, following, anchors)
    usable = compatible_anchors(anchors, consumer, tokens, following_tokens)
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
                     consumer if config.per_consumer_weights else None)
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

    # Weighted sums over anchors, accumulated one anchor at a time into fp32 outputs (no [N, ...] stack).
    # ph weights [N, T] -> [N, 1, 1, T, 1]; deltas [L, H, T_a, D] cut to their first T tokens -> [L, H, T, D]
    ph_key = _weighted_sum(weights.ph_k[:, None, None, :, None], [d.ph_key[:, :, :tokens] for d in deltas])
    ph_value = _weighted_sum(weights.ph_v[:, None, None, :, None], [d.ph_value[:, :, :tokens] for d in deltas])
    # Prefix weights differ per channel and RoPE mixes channel c with c +- D/2, so (corrected mode) rotate each
    # anchor's delta to the current start before weighting. Placeholder weights are per token only, so rotating
    # the sum is exact.
    pf_deltas_k = [rope.shift_keys(d.pf_key.float(), following.start) if config.rerotate_deltas else d.pf_key
                   for d in deltas]
    # pf weights [N, L, H, D] -> [N, L, H, 1, D]; deltas [L, H, S, D]
    pf_key = _weighted_sum(weights.pf_k[:, :, :, None, :], pf_deltas_k)              # [L, H, S, D]
    pf_value = _weighted_sum(weights.pf_v[:, :, :, None, :], [d.pf_value for d in deltas])
    if config.rerotate_deltas:
        ph_key = rope.shift_keys(ph_key, base.start)
    for offset in (ph_key, ph_value, pf_key, pf_value):
        offset[0] = 0.0                                                            # layer 0: base is exact

    effective = sum(_effective_count(w) for w in (weights.ph_k, weights.ph_v, weights.pf_k, weights.pf_v)) / 4
    return OffsetEstimate(
        ph_key=ph_key, ph_value=ph_value, pf_key=pf_key, pf_value=pf_value,   # fp32: rounded once, when added
        anchor_ids=anchor_ids, ph_weights_k=weights.ph_k, ph_weights_v=weights.ph_v,
        pf_weights_k=weights.pf_k, pf_weights_v=weights.pf_v, effective_anchors=effective,
        weights_from_cache=from_cache)


def apply_offsets(base: KVSegment, following: KVSegment, estimate: OffsetEstimate | None
                  ) -> tuple[KVSegment, KVSegment]:
    """(base + placeholder offsets, following + prefix offsets); the segments unchanged when `estimate` is None."""
    if estimate is None:
        return base, following
    if estimate.ph_key.shape != base.keys.shape or estimate.pf_key.shape != following.keys.shape:
        raise ValueError(f"offsets {tuple(estimate.ph_key.shape)} / {tuple(estimate.pf_key.shape)} do not match "
                         f"the segments {tuple(base.keys.shape)} / {tuple(following.keys.shape)}")
    return (base.plus(estimate.ph_key, estimate.ph_value), following.plus(estimate.pf_key, estimate.pf_value))
