"""Tests of kvcomm.offsets: self-reconstruction in both modes, zero offsets, layer 0, weights and their cache.

Synthetic "real" KV is built the way a model makes it: a pre-RoPE key tensor rotated for absolute positions, so
moving content to another start is meaningful. Layer 0 carries no delta (as in a real model).
"""
from __future__ import annotations

import math

import pytest
import torch

from kvcomm.anchor_pool import AnchorPool
from kvcomm.anchor_records import Anchor
from kvcomm.config import KVCommConfig
from kvcomm.kv import KVSegment
from kvcomm.model_spec import PRESETS
from kvcomm.offsets import (add_offsets, anchor_weights, apply_offsets, estimate_offsets, plan_offsets,
                            weights_depend_on_consumer)
from kvcomm.rope import Rope

SPEC = PRESETS["tiny-llama"]
LAYERS, HEADS, DIM = SPEC.num_layers, SPEC.num_kv_heads, SPEC.head_dim
ROPE = Rope(SPEC)
CORRECTED = KVCommConfig()
REFERENCE = KVCommConfig.reference()


def rotated(pre_rope_keys: torch.Tensor, start: int) -> torch.Tensor:
    """Rotate pre-RoPE keys [L, H, T, D] for positions start..start+T-1."""
    positions = torch.arange(start, start + pre_rope_keys.shape[2])
    cos, sin = ROPE.cos_sin(positions, torch.float32)                     # [T, D] each
    return ROPE.apply(pre_rope_keys, cos, sin)


class Content:
    """Pre-RoPE K and V of some tokens, placeable at any start."""

    def __init__(self, tokens: int, seed: int, scale: float = 1.0):
        generator = torch.Generator().manual_seed(seed)
        self.keys = scale * torch.randn(LAYERS, HEADS, tokens, DIM, generator=generator)    # [L, H, T, D] pre-RoPE
        self.values = scale * torch.randn(LAYERS, HEADS, tokens, DIM, generator=generator)  # [L, H, T, D]

    def at(self, start: int) -> KVSegment:
        return KVSegment(rotated(self.keys, start), self.values, start)

    def perturbed(self, seed: int, size: float = 0.3) -> "Content":
        """The same content as seen in another context: every layer but 0 shifted by a random delta."""
        generator = torch.Generator().manual_seed(seed)
        other = Content.__new__(Content)
        noise_k = size * torch.randn(self.keys.shape, generator=generator)
        noise_v = size * torch.randn(self.values.shape, generator=generator)
        noise_k[0] = 0.0
        noise_v[0] = 0.0
        other.keys, other.values = self.keys + noise_k, self.values + noise_v
        return other


def record_anchor(pool: AnchorPool, placeholder: Content, real_placeholder: Content, following: Content,
                  real_following: Content, consumer: str, ph_start: int, namespace: str = "ns") -> str:
    txn = pool.begin(namespace)
    anchor_id = txn.add_anchor("user_question", placeholder.at(0))
    pf_start = ph_start + placeholder.keys.shape[2]
    txn.add_deltas(anchor_id, consumer, real_placeholder.at(ph_start), placeholder.at(ph_start),
                   real_following.at(pf_start), following.at(pf_start))
    pool.commit(txn)
    return anchor_id


def anchors_of(pool: AnchorPool) -> list[Anchor]:
    return pool.snapshot("ns").anchors("user_question")


@pytest.mark.parametrize("config", [CORRECTED, REFERENCE], ids=["corrected", "reference"])
def test_single_own_anchor_reconstructs_real_kv(config):
    pool = AnchorPool(config, rope=ROPE)
    question, prefix_after = Content(6, seed=1), Content(4, seed=2)
    real_question, real_after = question.perturbed(seed=3), prefix_after.perturbed(seed=4)
    record_anchor(pool, question, real_question, prefix_after, real_after, "agent_2", ph_start=37)

    estimate = estimate_offsets(question.at(37), prefix_after.at(43), anchors_of(pool), "agent_2", ROPE, config)
    assert estimate is not None
    assert torch.equal(estimate.ph_weights_k, torch.ones(1, 6)) and torch.equal(estimate.pf_weights_v,
                                                                                  torch.ones(1, LAYERS, HEADS, DIM))
    rebuilt_ph, rebuilt_pf = apply_offsets(question.at(37), prefix_after.at(43), estimate)
    assert torch.allclose(rebuilt_ph.keys, real_question.at(37).keys, atol=1e-5)
    assert torch.allclose(rebuilt_ph.values, real_question.at(37).values, atol=1e-5)
    assert torch.allclose(rebuilt_pf.keys, real_after.at(43).keys, atol=1e-5)
    assert torch.allclose(rebuilt_pf.values, real_after.at(43).values, atol=1e-5)


def test_corrected_mode_reconstructs_at_a_different_start_and_reference_does_not():
    question, prefix_after = Content(6, seed=1), Content(4, seed=2)
    real_question, real_after = question.perturbed(seed=3), prefix_after.perturbed(seed=4)
    errors = {}
    for name, config in (("corrected", CORRECTED), ("reference", REFERENCE)):
        pool = AnchorPool(config, rope=ROPE)
        record_anchor(pool, question, real_question, prefix_after, real_after, "agent_2", ph_start=37)
        estimate = estimate_offsets(question.at(90), prefix_after.at(96), anchors_of(pool), "agent_2", ROPE, config)
        rebuilt_ph, rebuilt_pf = apply_offsets(question.at(90), prefix_after.at(96), estimate)
        errors[name] = (float((rebuilt_ph.keys - real_question.at(90).keys).abs().max()),
                        float((rebuilt_pf.keys - real_after.at(96).keys).abs().max()))
    assert errors["corrected"][0] < 1e-5 and errors["corrected"][1] < 1e-5
    assert errors["reference"][0] > 1e-2  # the reference's un-rotated key deltas: its known quirk


@pytest.mark.parametrize("config", [CORRECTED, REFERENCE], ids=["corrected", "reference"])
def test_zero_deltas_leave_the_base_bit_for_bit(config):
    pool = AnchorPool(config, rope=ROPE)
    question, prefix_after = Content(5, seed=1), Content(3, seed=2)
    record_anchor(pool, question, question, prefix_after, prefix_after, "agent_1", ph_start=12)
    record_anchor(pool, Content(7, seed=8), Content(7, seed=8), prefix_after, prefix_after, "agent_1", ph_start=12)
    base, following = question.at(20), prefix_after.at(25)
    estimate = estimate_offsets(base, following, anchors_of(pool), "agent_1", ROPE, config)
    assert estimate is not None and len(estimate.anchor_ids) == 2
    rebuilt_ph, rebuilt_pf = apply_offsets(base, following, estimate)
    for got, want in ((rebuilt_ph, base), (rebuilt_pf, following)):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)


def test_layer_zero_offset_is_exactly_zero_even_when_anchor_deltas_are_not():
    pool = AnchorPool(CORRECTED, rope=ROPE)
    question, prefix_after = Content(5, seed=1), Content(3, seed=2)
    noisy_question, noisy_after = Content(5, seed=1), Content(3, seed=2)
    noisy_question.keys = noisy_question.keys + 1.0      # layer 0 included
    noisy_after.values = noisy_after.values + 1.0
    record_anchor(pool, question, noisy_question, prefix_after, noisy_after, "agent_1", ph_start=9)
    estimate = estimate_offsets(question.at(9), prefix_after.at(14), anchors_of(pool), "agent_1", ROPE, CORRECTED)
    for offset in (estimate.ph_key, estimate.ph_value, estimate.pf_key, estimate.pf_value):
        assert torch.count_nonzero(offset[0]) == 0
    assert torch.count_nonzero(estimate.ph_key[1:]) > 0 and torch.count_nonzero(estimate.pf_value[1:]) > 0


def test_weight_shapes_and_normalization_with_length_filter():
    whole = KVCommConfig(min_anchor_coverage=1.0)              # the reference's length rule: at least as long
    pool = AnchorPool(whole, rope=ROPE)
    prefix_after = Content(3, seed=2)
    for seed, tokens in ((10, 5), (11, 8), (12, 3), (13, 6)):  # the 3-token anchor is too short for T = 5
        content = Content(tokens, seed=seed)
        record_anchor(pool, content, content.perturbed(seed + 100), prefix_after, prefix_after.perturbed(seed),
                      "agent_1", ph_start=20)
    other_consumer = Content(9, seed=14)                       # long enough, but deltas for another consumer
    record_anchor(pool, other_consumer, other_consumer, prefix_after, prefix_after, "agent_9", ph_start=20)
    estimate = estimate_offsets(Content(5, seed=1).at(30), prefix_after.at(35), anchors_of(pool), "agent_1",
                                ROPE, whole)
    assert len(estimate.anchor_ids) == 3
    assert estimate.ph_weights_k.shape == estimate.ph_weights_v.shape == (3, 5)
    assert estimate.pf_weights_k.shape == estimate.pf_weights_v.shape == (3, LAYERS, HEADS, DIM)
    for weights in (estimate.ph_weights_k, estimate.ph_weights_v, estimate.pf_weights_k, estimate.pf_weights_v):
        assert torch.allclose(weights.sum(dim=0), torch.ones(weights.shape[1:]), atol=1e-6)
    assert estimate.ph_key.shape == (LAYERS, HEADS, 5, DIM) and estimate.pf_key.shape == (LAYERS, HEADS, 3, DIM)
    assert 1.0 <= estimate.effective_anchors <= 3.0
    # a following segment of another length finds no compatible anchor
    assert estimate_offsets(Content(5, seed=1).at(30), Content(2, seed=2).at(35), anchors_of(pool), "agent_1",
                            ROPE, CORRECTED) is None
    # with coverage 0.5 the 3-token anchor vouches for T = 5 too, on its own 3 tokens only
    half = estimate_offsets(Content(5, seed=1).at(30), prefix_after.at(35), anchors_of(pool), "agent_1", ROPE,
                            KVCommConfig(min_anchor_coverage=0.5))
    short = half.anchor_ids.index(next(a.anchor_id for a in anchors_of(pool) if a.num_tokens == 3))
    assert len(half.anchor_ids) == 4
    for weights in (half.ph_weights_k, half.ph_weights_v):
        assert torch.all(weights[short, 3:] == 0) and torch.all(weights[short, :3] > 0)
        assert torch.allclose(weights.sum(dim=0), torch.ones(5), atol=1e-6)


def test_tokens_no_anchor_covers_get_no_placeholder_offset():
    config = KVCommConfig(min_anchor_coverage=0.5)
    pool = AnchorPool(config, rope=ROPE)
    prefix_after = Content(3, seed=2)
    for seed in (30, 31):                                      # two 4-token anchors for a 6-token placeholder
        content = Content(4, seed=seed)
        record_anchor(pool, content, content.perturbed(seed + 1), prefix_after, prefix_after.perturbed(seed),
                      "agent_1", ph_start=12)
    estimate = estimate_offsets(Content(6, seed=3).at(12), prefix_after.at(18), anchors_of(pool), "agent_1", ROPE,
                                config)
    assert torch.count_nonzero(estimate.ph_value[:, :, 4:]) == 0 and torch.count_nonzero(estimate.ph_key[:, :, 4:]) == 0
    assert torch.count_nonzero(estimate.ph_value[1:, :, :4]) > 0 and torch.count_nonzero(estimate.pf_value[1:]) > 0
    assert torch.all(estimate.ph_weights_v[:, 4:] == 0)


def test_distant_anchor_moves_weights_by_at_most_logistic_of_the_gap():
    pool = AnchorPool(CORRECTED, rope=ROPE)
    question, prefix_after = Content(4, seed=1), Content(3, seed=2)
    record_anchor(pool, question, question.perturbed(5), prefix_after, prefix_after.perturbed(6), "agent_1", 10)
    gap = 2.5
    distant = Content(4, seed=1)
    distant.values = distant.values + gap                       # every |V - V_a| = gap exactly
    record_anchor(pool, distant, distant.perturbed(7), prefix_after, prefix_after.perturbed(8), "agent_1", 10)
    estimate = estimate_offsets(question.at(10), prefix_after.at(14), anchors_of(pool), "agent_1", ROPE, CORRECTED)
    own_ph, own_pf = estimate.ph_weights_v[0], estimate.pf_weights_v[0]
    bound_ph = 1.0 / (1.0 + math.exp(gap))                      # per-token distance gap = mean |.| = gap
    bound_pf = 1.0 / (1.0 + math.exp(gap * math.sqrt(4)))       # L2 over 4 tokens of a constant gap
    assert torch.all(1.0 - own_ph <= bound_ph + 1e-6) and torch.allclose(1.0 - own_ph, torch.full((4,), bound_ph))
    assert torch.all(1.0 - own_pf <= bound_pf + 1e-6)
    assert torch.all(1.0 - own_ph > 0)  # the distant anchor does move them


def test_anchor_weights_are_a_softmax_of_negative_distance_over_temperature():
    current = torch.zeros(LAYERS, HEADS, 2, DIM)                 # [L, H, T, D]
    near, far = torch.full((LAYERS, HEADS, 3, DIM), 0.5), torch.full((LAYERS, HEADS, 3, DIM), 1.5)
    weights = anchor_weights(current, current, [near, far], [near, far], temperature=2.0)
    expected = torch.softmax(torch.tensor([-0.5, -1.5]) / 2.0, dim=0)
    assert torch.allclose(weights.ph_k[:, 0], expected)
    expected_pf = torch.softmax(-torch.tensor([0.5, 1.5]) * math.sqrt(2) / 2.0, dim=0)
    assert torch.allclose(weights.pf_v[:, 1, 0, 3], expected_pf)


def test_reference_weights_are_shared_across_consumers_and_corrected_ones_are_computed_once_per_content():
    question, prefix_after = Content(4, seed=1), Content(3, seed=2)
    results = {}
    for name, config in (("corrected", CORRECTED), ("reference", REFERENCE)):
        pool = AnchorPool(config, rope=ROPE)
        for seed in (20, 21):  # two anchors, each with deltas for both consumers at different starts
            content = question.perturbed(seed, size=0.5)
            txn = pool.begin("ns")
            anchor_id = txn.add_anchor("user_question", content.at(0))
            for consumer, start in (("agent_1", 10), ("agent_2", 50)):
                txn.add_deltas(anchor_id, consumer, content.perturbed(seed + start).at(start), content.at(start),
                               prefix_after.at(start + 4), prefix_after.at(start + 4))
            pool.commit(txn)
        cache: dict = {}
        first = estimate_offsets(question.at(10), prefix_after.at(14), anchors_of(pool), "agent_1", ROPE, config,
                                 weight_cache=cache)
        second = estimate_offsets(question.at(50), prefix_after.at(54), anchors_of(pool), "agent_2", ROPE, config,
                                  weight_cache=cache)
        uncached = estimate_offsets(question.at(50), prefix_after.at(54), anchors_of(pool), "agent_2", ROPE, config)
        results[name] = (first, second, uncached, len(cache))
    first, second, uncached, entries = results["reference"]
    assert entries == 1 and second.weights_from_cache and second.ph_weights_k is first.ph_weights_k
    assert not torch.allclose(uncached.ph_weights_k, first.ph_weights_k)  # agent_2 alone would weigh otherwise
    # corrected weights compare canonical keys: they depend on the content and the anchors, not on the consumer,
    # so the second consumer takes the first one's from the cache, and they equal its own uncached weights
    first, second, uncached, entries = results["corrected"]
    assert entries == 1 and second.weights_from_cache
    for name in ("ph_weights_k", "ph_weights_v", "pf_weights_k", "pf_weights_v"):
        assert torch.allclose(getattr(second, name), getattr(uncached, name), atol=1e-6), name
    reference_per_consumer = KVCommConfig.reference(per_consumer_weights=True)
    assert weights_depend_on_consumer(reference_per_consumer) and not weights_depend_on_consumer(CORRECTED)


def test_no_compatible_anchor_and_mode_mismatch():
    question, prefix_after = Content(4, seed=1), Content(3, seed=2)
    assert estimate_offsets(question.at(5), prefix_after.at(9), [], "agent_1", ROPE, CORRECTED) is None
    pool = AnchorPool(REFERENCE, rope=ROPE)
    record_anchor(pool, question, question, prefix_after, prefix_after, "agent_1", ph_start=5)
    with pytest.raises(ValueError, match="rerotate_deltas"):
        estimate_offsets(question.at(5), prefix_after.at(9), anchors_of(pool), "agent_1", ROPE, CORRECTED)


@pytest.mark.parametrize("config", [KVCommConfig(min_anchor_coverage=0.5), REFERENCE.with_(min_anchor_coverage=0.5)],
                         ids=["corrected", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offsets_added_in_place_a_few_layers_at_a_time_equal_the_estimate_added_bit_for_bit(config, dtype):
    """The turn's assembly adds offsets in place, a chunk of layers at a time (`add_offsets`); it must equal the
    whole estimate added by `KVSegment.plus` exactly: anchors shorter than, as long as and longer than the
    placeholder, layer 0 in the first chunk only, keys rotated, and the bf16 sum rounded once."""
    pool = AnchorPool(config, rope=ROPE)
    prefix_after = Content(3, seed=2)
    for seed, tokens in ((40, 4), (41, 6), (42, 9)):             # for a 6-token placeholder
        content = Content(tokens, seed=seed)
        record_anchor(pool, content, content.perturbed(seed + 1), prefix_after, prefix_after.perturbed(seed),
                      "agent_1", ph_start=11)
    question = Content(6, seed=3)
    base, following = question.at(17).to(dtype=dtype), prefix_after.at(23).to(dtype=dtype)
    estimate = estimate_offsets(base, following, anchors_of(pool), "agent_1", ROPE, config)
    want_ph, want_pf = apply_offsets(base, following, estimate)
    for chunk_elements in (1, HEADS * 6 * DIM * 2, 1 << 30):     # one layer, two layers, all at once
        got_ph = KVSegment(base.keys.clone(), base.values.clone(), base.start)
        got_pf = KVSegment(following.keys.clone(), following.values.clone(), following.start)
        plan = plan_offsets(got_ph, got_pf, anchors_of(pool), "agent_1", ROPE, config)
        assert plan.anchor_ids == estimate.anchor_ids and len(plan.anchor_ids) == 3
        add_offsets(plan, ROPE, got_ph, got_pf, chunk_elements=chunk_elements)
        for got, want in ((got_ph, want_ph), (got_pf, want_pf)):
            assert got.keys.dtype == dtype
            assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values), chunk_elements
        assert not torch.equal(got_ph.values, base.values)       # the offsets were added
