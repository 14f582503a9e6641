"""Tests of kvcomm.gate: the entropy rule, its early exits, and the two top-p activation sets."""
from __future__ import annotations

import math

import torch

from kvcomm.anchor_records import Anchor
from kvcomm.config import KVCommConfig
from kvcomm.gate import gate, match_probabilities, top_p_indices
from kvcomm.kv import KVSegment

LAYERS, HEADS, DIM = 2, 2, 8


def candidate_of(tokens: int) -> KVSegment:
    values = torch.zeros(LAYERS, HEADS, tokens, DIM)  # [L, H, k, D]
    return KVSegment(torch.zeros_like(values), values, 0)


def anchor_at_distance(name: str, distance: float, tokens: int = 4, channel: int = 0) -> Anchor:
    """An anchor whose first tokens' values sit at Frobenius `distance` from a zero candidate."""
    values = torch.zeros(LAYERS, HEADS, tokens, DIM)  # [L, H, T, D]
    values[1, 0, 0, channel] = distance
    return Anchor(anchor_id=name, placeholder="agent_1_current", base_keys=torch.zeros_like(values),
                  base_values=values)


def test_equal_distances_give_log2_n_entropy_and_a_new_anchor_whenever_gamma_below_one():
    anchors = [anchor_at_distance(f"a{i}", 3.0, channel=i) for i in range(4)]
    for gamma in (0.3, 0.99):
        decision = gate(candidate_of(3), anchors, KVCommConfig(gamma=gamma))
        assert decision.new_anchor and decision.reason == "high_entropy"
        assert math.isclose(decision.entropy, 2.0, rel_tol=1e-9) and decision.compatible == 4
        assert decision.activated_ids == ()


def test_one_hot_distances_match_and_activate_the_close_anchor():
    anchors = [anchor_at_distance("far1", 100.0), anchor_at_distance("close", 0.0), anchor_at_distance("far2", 90.0)]
    decision = gate(candidate_of(4), anchors, KVCommConfig())
    assert not decision.new_anchor and decision.reason == "matched"
    assert decision.entropy < 1e-6 and math.isclose(decision.threshold, 0.3 * math.log2(3))
    assert decision.activated_ids == ("close",)
    # the reference's set is empty when p_max >= top_p, so it activates every compatible anchor
    reference = gate(candidate_of(4), anchors, KVCommConfig.reference())
    assert reference.activated_ids == ("far1", "close", "far2")


def test_pool_of_at_most_one_takes_a_new_anchor():
    assert gate(candidate_of(2), [], KVCommConfig()).reason == "cold_pool"
    decision = gate(candidate_of(2), [anchor_at_distance("only", 0.0)], KVCommConfig(gamma=10.0))
    assert decision.new_anchor and decision.reason == "cold_pool" and math.isnan(decision.entropy)


def test_candidate_longer_than_all_but_one_takes_a_new_anchor():
    anchors = [anchor_at_distance("long", 0.0, tokens=9), anchor_at_distance("s1", 0.0, tokens=5),
               anchor_at_distance("s2", 0.0, tokens=6)]
    whole = KVCommConfig(gamma=10.0, min_anchor_coverage=1.0)        # the reference's rule: at least as long
    decision = gate(candidate_of(7), anchors, whole)
    assert decision.new_anchor and decision.reason == "few_compatible" and decision.compatible == 1
    assert not gate(candidate_of(6), anchors, whole).new_anchor  # two compatible now


def test_shorter_anchors_vouch_down_to_the_coverage_and_are_compared_on_the_tokens_they_have():
    anchors = [anchor_at_distance("long", 0.0, tokens=9), anchor_at_distance("s1", 0.0, tokens=5),
               anchor_at_distance("s2", 0.0, tokens=6)]
    half = KVCommConfig(gamma=10.0, min_anchor_coverage=0.5)
    assert gate(candidate_of(10), anchors, half).compatible == 3                  # 5 >= ceil(0.5 * 10)
    assert gate(candidate_of(11), anchors, half).compatible == 2                  # 5 < 6 = ceil(0.5 * 11)
    assert gate(candidate_of(13), anchors, half).reason == "few_compatible"       # only "long" covers 7 of 13
    # a short anchor is compared on its own tokens, scaled to the candidate's length: an anchor that differs
    # from a 10-token candidate by `distance` in its single shared differing token sits at distance * sqrt(10/5)
    near_long, short = anchor_at_distance("near", 1.0, tokens=10), anchor_at_distance("short", 1.0, tokens=5)
    probabilities = match_probabilities(candidate_of(10).values, [near_long, short], temperature=1.0)
    expected = torch.softmax(-torch.tensor([1.0, math.sqrt(2.0)], dtype=torch.float64), dim=0)
    assert torch.allclose(probabilities, expected)


def test_exact_and_reference_top_p_sets_differ_by_one():
    target = [0.5, 0.3, 0.15, 0.05]                 # exact top-0.9: 3 entries; reference (< 0.9): 2 entries
    anchors = [anchor_at_distance(f"a{i}", 10.0 - math.log(p), channel=i) for i, p in enumerate(target)]
    order = [2, 0, 3, 1]                            # pool order differs from rank order
    anchors = [anchors[i] for i in order]
    exact = gate(candidate_of(4), anchors, KVCommConfig(gamma=0.9))
    reference = gate(candidate_of(4), anchors, KVCommConfig.reference(gamma=0.9))
    assert not exact.new_anchor and not reference.new_anchor
    assert exact.activated_ids == ("a0", "a1", "a2")
    assert reference.activated_ids == ("a0", "a1")


def test_top_p_indices_boundaries():
    probabilities = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    assert top_p_indices(probabilities, 0.6, exact=True) == [1]        # 0.6 reaches 0.6: one entry
    assert top_p_indices(probabilities, 0.6, exact=False) == [0, 1, 2]  # nothing < 0.6 strictly: all
    assert top_p_indices(probabilities, 1.0, exact=True) == [1, 2, 0]
