"""The two reuse gates: the entropy gate on new content, and the turn gate on a reused turn's predicted KL.

The entropy gate (reference `predict_as_anchor`, kvcomm-algorithm.md section 1.6) decides whether the anchors of a
placeholder kind can vouch for a candidate content, or whether its consumers must go dense and record it as a new
anchor (this is how the pool learns); and, when they can, which anchors get an activation.

* pool of <= 1 anchor -> new anchor ("cold_pool");
* fewer than 2 anchors covering the candidate (k tokens; an anchor covers it when it has at least
  ``config.min_anchor_coverage * k`` tokens) -> new anchor ("few_compatible");
* otherwise ``D_a = ||V_cand[:m_a] - V_a[:m_a]||_F * sqrt(k / m_a)`` over values (m_a = min(k, T_a): the tokens
  both have; m_a = k for anchors at least as long), ``p = softmax(-D / temperature)``,
  ``H = -sum p log2(p + 1e-40)``; new anchor iff ``H > gamma * log2(N)`` ("high_entropy"), else "matched" and the
  top-p set is activated: with ``exact_top_p`` the smallest prefix of p sorted descending whose cumulative sum
  reaches ``top_p``; without it the reference's quirk (entries while the cumulative sum is < top_p, and every
  compatible anchor when that set is empty).

The turn gate (`predict_kl`, `TurnForecast`) runs on a turn about to be reused: from the attention the prompt's last
token gives each cached token (`kvcomm.corrections.attention_mass`) and each token's expected error (the anchors'
own recorded offset errors, 0 where recomputed), it predicts the KL of the first token's distribution against a
dense prefill, ``KL ~ kl_scale * sum_t attention(t) * error(t)^2`` (a first-order model: a perturbation of the
attended values moves the logits in proportion, and KL is quadratic in that move). `kl_scale` and the threshold
``gate_max_kl`` come from the model's calibration (`kvcomm.calibration`); above the threshold the turn goes dense.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .anchor_records import Anchor
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
    [L, H, k, D] and each anchor's first m = min(k, T_a) value tokens, scaled by sqrt(k / m)."""
    tokens = candidate_values.shape[2]
    candidate = candidate_values.float()
    distances = torch.empty(len(anchors), dtype=torch.float64)                            # [N]
    for i, a in enumerate(anchors):
        overlap = min(tokens, a.num_tokens)
        diff = a.base_values[:, :, :overlap].float() - candidate[:, :, :overlap]         # [L, H, m, D]
        distances[i] = float(torch.linalg.vector_norm(diff)) * math.sqrt(tokens / overlap)
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
    shortest = max(1, math.ceil(config.min_anchor_coverage * candidate.num_tokens - 1e-9))
    compatible = [a for a in anchors if a.num_tokens >= shortest]
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
    threshold = config.with_calibration().gamma * math.log2(len(compatible))   # gamma None: uncalibrated 0.3
    if entropy > threshold:
        return GateDecision(True, "high_entropy", entropy, threshold, len(compatible))
    chosen = top_p_indices(probabilities, config.top_p, config.exact_top_p)
    return GateDecision(False, "matched", entropy, threshold, len(compatible),
                        tuple(compatible[i].anchor_id for i in chosen))


# ------------------------------------------------------------------------------------------------------------
# The turn gate
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TurnForecast:
    """What the turn gate predicted for one reused turn.

    predicted_kl: kl_scale * sum_t attention(t) * error(t)^2 over the reused tokens that are not recomputed.
    reused_attention: the attention (share of 1) the last prompt token gives those tokens.
    anchor_error: their attention-weighted rms expected error.
    threshold: the gate's ``gate_max_kl`` (inf: never falls back); dense: predicted_kl > threshold.
    """
    predicted_kl: float
    reused_attention: float
    anchor_error: float
    threshold: float

    @property
    def dense(self) -> bool:
        return self.predicted_kl > self.threshold


def predict_kl(attention: torch.Tensor, errors: torch.Tensor, recomputed: torch.Tensor, kl_scale: float,
               threshold: float) -> TurnForecast:
    """The turn gate's forecast. attention, errors: [n] per cached token (`kvcomm.corrections.attention_mass`,
    `token_errors`); recomputed: [r] int64 positions that will be recomputed (their error is 0)."""
    weight = attention.float().clone()                                                      # [n]
    weight[recomputed.to(torch.int64)] = 0.0
    reused = weight * (errors.float() > 0)                                                  # [n]
    mass = float(reused.sum())
    squared = float((reused * errors.float().pow(2)).sum())
    return TurnForecast(predicted_kl=kl_scale * squared, reused_attention=mass,
                        anchor_error=math.sqrt(squared / mass) if mass > 0 else 0.0, threshold=threshold)


def first_token_margin(logits: torch.Tensor) -> float:
    """The fidelity gate's signal: top-1 minus top-2 probability of the first token's distribution ([vocab]
    logits). A reused turn below the calibrated ``gate_min_margin`` goes dense."""
    top = torch.softmax(logits.double(), dim=-1).topk(2).values                             # [2]
    return float(top[0] - top[1])


def first_token_signals(logits: torch.Tensor) -> dict[str, float]:
    """What a reused turn's own first-token distribution says about its fragility, from its logits ([vocab]):
    margin (top-1 minus top-2 probability), logit_gap (top-1 minus top-2 logit), entropy (nats), top1_prob."""
    logits = logits.double()
    log_p = torch.log_softmax(logits, dim=-1)                                               # [vocab]
    top_logits = logits.topk(2).values                                                      # [2]
    top_p = log_p.topk(2).values.exp()                                                      # [2]
    return {"margin": float(top_p[0] - top_p[1]), "logit_gap": float(top_logits[0] - top_logits[1]),
            "entropy": float(-(log_p.exp() * log_p).sum()), "top1_prob": float(top_p[0])}
