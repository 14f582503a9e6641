"""The entropy gate (reference `predict_as_anchor`, kvcomm-algorithm.md section 1.6).

This module owns one decision: can the anchors of a placeholder kind vouch for a candidate content, or must the
consumers go dense and record it as a new anchor? And, when they can, which anchors get an activation.

* pool of <= 1 anchor -> new anchor ("cold_pool");
* fewer than 2 anchors at least as long as the candidate (k tokens) -> new anchor ("few_compatible");
* otherwise ``D_a = ||V_cand - V_a[..., :k, :]||_F`` over values, ``p = softmax(-D / temperature)``,
  ``H = -sum p log2(p + 1e-40)``; new anchor iff ``H > gamma * log2(N)`` ("high_entropy"), else "matched" and the
  top-p set is activated: with ``exact_top_p`` the smallest prefix of p sorted descending whose cumulative sum
  reaches ``top_p``; without it the reference's quirk (entries while the cumulative sum is < top_p, and every
  compatible anchor when that set is empty).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .anchor_pool import Anchor
from .config import KVCommConfig
from .kv import KVSegment

_LOG_EPSILON = 1e-40


@dataclass(frozen=True)
class GateDecision:
    """new_anchor: go dense and record the candidate. reason: "cold_pool" | "few_compatible" | "high_entropy" |
    "matched". entropy/threshold: NaN when not computed (cold_pool, few_compatible). compatible: anchors at least as
    long as the candidate. activated_ids: anchors to activate (only when matched), by decreasing weight."""
    new_anchor: bool
    reason: str
    entropy: float
    threshold: float
    compatible: int
    activated_ids: tuple[str, ...] = ()


def match_probabilities(candidate_values: torch.Tensor, anchors: Sequence[Anchor], temperature: float) -> torch.Tensor:
    """[N] fp64 softmax(-D / temperature) of the Frobenius distances between the candidate's values
    [L, H, k, D] and each anchor's first k value tokens."""
    tokens = candidate_values.shape[2]
    stacked = torch.stack([a.base_values[:, :, :tokens].float() for a in anchors])        # [N, L, H, k, D]
    distances = torch.linalg.vector_norm(stacked - candidate_values.float().unsqueeze(0),
                                         dim=(1, 2, 3, 4)).double()                      # [N]
    return torch.softmax(-distances / temperature, dim=0)


def top_p_indices(probabilities: torch.Tensor, top_p: float, exact: bool) -> list[int]:
    """Indices (into `probabilities`, [N]) of the activated set, by decreasing probability."""
    sorted_p, order = torch.sort(probabilities, descending=True, stable=True)              # [N], [N]
    cumulative = torch.cumsum(sorted_p, dim=0)                                              # [N]
    if exact:
        before = torch.cat([cumulative.new_zeros(1), cumulative[:-1]])  # [N] mass ranked above each entry
        count = int((before < top_p).sum())               # smallest prefix whose cumulative sum reaches top_p
    else:
        count = int((cumulative < top_p).sum())           # reference: one short of top-p
        if count == 0:
            return list(range(probabilities.shape[0]))    # reference: empty set -> every compatible anchor
    return order[:count].tolist()


def gate(candidate: KVSegment, anchors: Sequence[Anchor], config: KVCommConfig) -> GateDecision:
    """Decide whether `candidate` (a placeholder content's base KV) becomes a new anchor among `anchors` (one
    placeholder kind, in pool order)."""
    if len(anchors) <= 1:
        return GateDecision(True, "cold_pool", math.nan, math.nan, len(anchors))
    tokens = candidate.num_tokens
    compatible = [a for a in anchors if a.num_tokens >= tokens]
    if len(compatible) < 2:
        return GateDecision(True, "few_compatible", math.nan, math.nan, len(compatible))
    layers, heads, _, dim = candidate.values.shape
    for a in compatible:
        shape = a.base_values.shape
        if (shape[0], shape[1], shape[3]) != (layers, heads, dim):
            raise ValueError(f"anchor {a.anchor_id} has KV {tuple(shape)}; the candidate has "
                             f"{tuple(candidate.values.shape)} (different model?)")
    probabilities = match_probabilities(candidate.values, compatible, config.temperature)   # [N]
    entropy = float(-(probabilities * torch.log2(probabilities + _LOG_EPSILON)).sum())
    threshold = config.gamma * math.log2(len(compatible))
    if entropy > threshold:
        return GateDecision(True, "high_entropy", entropy, threshold, len(compatible))
    chosen = top_p_indices(probabilities, config.top_p, config.exact_top_p)
    return GateDecision(False, "matched", entropy, threshold, len(compatible),
                        tuple(compatible[i].anchor_id for i in chosen))
