"""Tests of kvcomm.anchor_pool: staging, atomic versioned commits, eviction, byte budget, namespaces, threads."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from kvcomm.anchor_pool import AnchorPool, choose_victim
from kvcomm.anchor_records import Anchor
from kvcomm.config import KVCommConfig
from kvcomm.kv import KVSegment
from kvcomm.model_spec import PRESETS
from kvcomm.rope import Rope

SPEC = PRESETS["tiny-llama"]
LAYERS, HEADS, DIM = SPEC.num_layers, SPEC.num_kv_heads, SPEC.head_dim


def random_segment(tokens: int, start: int = 0, seed: int = 0) -> KVSegment:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(LAYERS, HEADS, tokens, DIM, generator=generator)    # [L, H, T, D]
    values = torch.randn(LAYERS, HEADS, tokens, DIM, generator=generator)  # [L, H, T, D]
    return KVSegment(keys, values, start)


def make_pool(**overrides) -> AnchorPool:
    return AnchorPool(KVCommConfig(**overrides), rope=Rope(SPEC))


def commit_anchor(pool: AnchorPool, namespace: str, placeholder: str, tokens: int = 4, seed: int = 0,
                  consumers: tuple[str, ...] = ()) -> str:
    """Commit one anchor with deltas for `consumers` (placeholder at 10, following segment of 3 tokens after it)."""
    txn = pool.begin(namespace)
    base = random_segment(tokens, seed=seed)
    anchor_id = txn.add_anchor(placeholder, base)
    for index, consumer in enumerate(consumers):
        ph_base = base.shifted(pool.rope, 10)
        ph_real = ph_base.plus(torch.full_like(base.keys, 0.1), torch.full_like(base.values, 0.2))
        pf_base = random_segment(3, start=ph_base.end, seed=seed + 1000 + index)
        pf_real = pf_base.plus(torch.full_like(pf_base.keys, 0.3), None)
        txn.add_deltas(anchor_id, consumer, ph_real, ph_base, pf_real, pf_base)
    pool.commit(txn)
    return anchor_id


def set_activations(pool: AnchorPool, namespace: str, counts: dict[str, int]) -> None:
    txn = pool.begin(namespace)
    for anchor_id, count in counts.items():
        for _ in range(count):
            txn.activate([anchor_id])
    pool.commit(txn)


# ---- eviction -------------------------------------------------------------------------------------------------
def test_eviction_victim_is_least_activated_among_window_oldest_first_on_ties():
    pool = make_pool(max_anchors=6, window=3)
    ids = [commit_anchor(pool, "ns", "user_question", seed=i) for i in range(6)]
    # window = ids[0:3] with counts 3, 1, 1 -> ids[1] (first of the tie); ids[3] has 0 but is outside the window
    set_activations(pool, "ns", {ids[0]: 3, ids[1]: 1, ids[2]: 1, ids[3]: 0, ids[4]: 5, ids[5]: 5})
    newest = commit_anchor(pool, "ns", "user_question", seed=99)
    remaining = [a.anchor_id for a in pool.snapshot("ns").anchors("user_question")]
    assert remaining == [ids[0], ids[2], ids[3], ids[4], ids[5], newest]
    assert pool.stats()["evictions"]["count"] == 1


def test_eviction_with_reference_sizes_v20_w5():
    pool = make_pool(max_anchors=20, window=5)
    ids = [commit_anchor(pool, "ns", "agent_1_current", tokens=2, seed=i) for i in range(20)]
    counts = {ids[0]: 2, ids[1]: 4, ids[2]: 0, ids[3]: 0, ids[4]: 1, ids[5]: 0}
    set_activations(pool, "ns", counts)
    commit_anchor(pool, "ns", "agent_1_current", tokens=2, seed=77)
    remaining = {a.anchor_id for a in pool.snapshot("ns").anchors("agent_1_current")}
    assert len(remaining) == 20
    assert ids[2] not in remaining and ids[3] in remaining  # first of the tied zeros among the 5 oldest
    activations = {a.anchor_id: a.activation_count for a in pool.snapshot("ns").anchors("agent_1_current")}
    assert activations[ids[1]] == 4 and activations[ids[0]] == 2


def test_choose_victim_passes_over_protected_until_nothing_else():
    pool = make_pool()
    ids = [commit_anchor(pool, "ns", "p", seed=i) for i in range(2)]
    set_activations(pool, "ns", {ids[0]: 2})
    anchors = pool.snapshot("ns").anchors("p")
    assert choose_victim(anchors, window=5) == 1
    assert choose_victim(anchors, window=5, protected_ids=frozenset({ids[1]})) == 0
    assert choose_victim(anchors, window=5, protected_ids=frozenset(ids)) == 1


# ---- byte budget ------------------------------------------------------------------------------------------------
def test_byte_budget_respected_after_many_commits():
    one_anchor_bytes = 2 * LAYERS * HEADS * 4 * DIM * 4  # K and V, 4 tokens, fp32
    budget = 7 * one_anchor_bytes + 100
    pool = make_pool(pool_byte_budget=budget, max_anchors=50)
    for i in range(40):
        commit_anchor(pool, f"ns{i % 2}", f"ph{i % 3}", tokens=2 + i % 5, seed=i, consumers=("a",) * (i % 2))
        stats = pool.stats()
        assert stats["total_bytes"] <= budget
        listed = sum(entry["bytes"] for lists in stats["namespaces"].values() for entry in lists.values())
        assert listed == stats["total_bytes"]
    assert pool.stats()["evictions"]["bytes"] > 0


def test_byte_budget_evicts_from_the_largest_list():
    per_token = 2 * LAYERS * HEADS * DIM * 4
    pool = make_pool(pool_byte_budget=per_token * 30)
    small = commit_anchor(pool, "a", "small", tokens=2, seed=1)
    big = [commit_anchor(pool, "b", "big", tokens=8, seed=10 + i) for i in range(3)]  # 2 + 24 tokens
    commit_anchor(pool, "a", "small", tokens=4, seed=2)                                # 30 tokens: fits
    assert pool.stats()["evictions"]["bytes"] == 0
    commit_anchor(pool, "a", "small", tokens=4, seed=3)                                # 34: evict from "big"
    assert [a.anchor_id for a in pool.snapshot("b").anchors("big")] == big[1:]
    assert pool.snapshot("a").anchors("small")[0].anchor_id == small
    assert pool.stats()["total_bytes"] == per_token * 26


# ---- staging, versions, namespaces ------------------------------------------------------------------------------
def test_staged_changes_invisible_until_commit():
    pool = make_pool()
    committed = commit_anchor(pool, "ns", "user_question", seed=1)
    txn = pool.begin("ns")
    staged = txn.add_anchor("user_question", random_segment(4, seed=2))
    base = random_segment(4, seed=1).shifted(pool.rope, 5)
    following = random_segment(2, start=9, seed=3)
    txn.add_deltas(committed, "agent_1", base, base, following, following)
    txn.activate([committed])
    for namespace in ("ns", "other"):
        view = pool.snapshot(namespace)
        assert staged not in {a.anchor_id for a in view.anchors("user_question")}
    before = pool.snapshot("ns").anchor(committed)
    assert dict(before.deltas) == {} and before.activation_count == 0
    version = pool.commit(txn)
    after = pool.snapshot("ns")
    assert after.version == version
    assert [a.anchor_id for a in after.anchors("user_question")] == [committed, staged]
    assert set(after.anchor(committed).deltas) == {"agent_1"} and after.anchor(committed).activation_count == 1
    assert dict(before.deltas) == {}  # the old snapshot's anchor is untouched (copy-on-write)


def test_abort_discards_and_closed_transactions_refuse_use():
    pool = make_pool()
    txn = pool.begin("ns")
    txn.add_anchor("p", random_segment(3))
    pool.abort(txn)
    assert len(pool.snapshot("ns")) == 0 and pool.version == 0
    with pytest.raises(RuntimeError, match="aborted"):
        pool.commit(txn)
    with pytest.raises(RuntimeError, match="aborted"):
        txn.add_anchor("p", random_segment(3))


def test_versions_increase_and_empty_commit_keeps_version():
    pool = make_pool()
    versions = [pool.version]
    for i in range(4):
        commit_anchor(pool, "ns", "p", seed=i)
        versions.append(pool.version)
    assert versions == sorted(set(versions)) and len(versions) == 5
    assert pool.commit(pool.begin("ns")) == versions[-1]
    assert pool.drop_namespace("ns") == versions[-1] + 1


def test_namespaces_isolated_and_unknown_namespace_is_empty():
    pool = make_pool()
    in_a = commit_anchor(pool, "tenant_a", "user_question", seed=1)
    unseen = pool.snapshot("never_seen")
    assert len(unseen) == 0 and unseen.anchors("user_question") == []
    assert pool.snapshot("tenant_b").anchor(in_a) is None
    # an id from another namespace can neither receive deltas nor activations there
    txn = pool.begin("tenant_b")
    seg = random_segment(4)
    with pytest.raises(KeyError, match="tenant_b"):
        txn.add_deltas(in_a, "agent_1", seg, seg, seg, seg)
    txn.activate([in_a])
    pool.commit(txn)
    assert pool.snapshot("tenant_a").anchor(in_a).activation_count == 0
    assert pool.stats()["stale_updates"] == 1
    pool.drop_namespace("tenant_a")
    assert len(pool.snapshot("tenant_a")) == 0 and pool.stats()["total_bytes"] == 0


# ---- stored deltas -----------------------------------------------------------------------------------------------
def test_corrected_mode_stores_key_deltas_at_canonical_positions():
    rope = Rope(SPEC)
    pool = AnchorPool(KVCommConfig(), rope=rope)
    base = random_segment(4, seed=5)
    txn = pool.begin("ns")
    anchor_id = txn.add_anchor("p", base.shifted(rope, 7))  # given away from 0: stored at 0
    ph_base = base.shifted(rope, 20)
    key_delta_at_0 = torch.randn(LAYERS, HEADS, 4, DIM)                    # [L, H, T, D] at positions 0..3
    ph_real = ph_base.plus(rope.shift_keys(key_delta_at_0, 20), None)
    pf = random_segment(2, start=24, seed=6)
    txn.add_deltas(anchor_id, "agent_2", ph_real, ph_base, pf, pf)
    pool.commit(txn)
    anchor = pool.snapshot("ns").anchor(anchor_id)
    assert torch.allclose(anchor.base_keys, base.keys, atol=1e-5)
    deltas = anchor.deltas["agent_2"]
    assert deltas.keys_canonical and deltas.rotated_base_key is None
    assert (deltas.ph_start, deltas.pf_start) == (20, 24)
    assert torch.allclose(deltas.ph_key, key_delta_at_0, atol=1e-5)
    assert torch.count_nonzero(deltas.ph_value) == 0


def test_reference_mode_keeps_only_last_writers_rotated_key():
    rope = Rope(SPEC)
    pool = AnchorPool(KVCommConfig.reference(), rope=rope)
    base = random_segment(4, seed=5)
    txn = pool.begin("ns")
    anchor_id = txn.add_anchor("p", base)
    for consumer, start in (("agent_1", 11), ("agent_2", 30)):
        ph = base.shifted(rope, start)
        pf = random_segment(2, start=start + 4, seed=start)
        txn.add_deltas(anchor_id, consumer, ph.plus(torch.ones_like(ph.keys), None), ph, pf, pf)
    pool.commit(txn)
    anchor = pool.snapshot("ns").anchor(anchor_id)
    assert anchor.last_writer == "agent_2" and anchor.deltas["agent_1"].rotated_base_key is None
    assert torch.equal(anchor.reference_base_key, base.shifted(rope, 30).keys)
    assert not anchor.deltas["agent_2"].keys_canonical
    assert torch.allclose(anchor.deltas["agent_1"].ph_key, torch.ones(LAYERS, HEADS, 4, DIM))  # as observed


def test_add_deltas_rejects_mismatched_lengths_and_starts():
    pool = make_pool()
    txn = pool.begin("ns")
    anchor_id = txn.add_anchor("p", random_segment(4))
    good = random_segment(4, start=3)
    pf = random_segment(2, start=7)
    with pytest.raises(ValueError, match="5 tokens, the anchor has 4"):
        txn.add_deltas(anchor_id, "a", random_segment(5, start=3), random_segment(5, start=3), pf, pf)
    with pytest.raises(ValueError, match="starts at 3 but its base was rotated to 4"):
        txn.add_deltas(anchor_id, "a", good, random_segment(4, start=4), pf, pf)
    with pytest.raises(KeyError, match="neither staged"):
        txn.add_deltas("nope", "a", good, good, pf, pf)


def test_state_round_trip_separates_tensors_from_metadata():
    pool = make_pool()
    anchor_id = commit_anchor(pool, "ns", "p", seed=3, consumers=("a", "b"))
    set_activations(pool, "ns", {anchor_id: 2})
    anchor = pool.snapshot("ns").anchor(anchor_id)
    metadata, tensors = anchor.to_state()
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    assert not any(isinstance(v, torch.Tensor) for v in metadata.values())
    rebuilt = Anchor.from_state(metadata, {name: t.clone() for name, t in tensors.items()})
    assert (rebuilt.anchor_id, rebuilt.activation_count, rebuilt.inserted_seq, rebuilt.last_writer) == \
        (anchor.anchor_id, 2, anchor.inserted_seq, "b")
    assert rebuilt.nbytes == anchor.nbytes
    assert torch.equal(rebuilt.deltas["a"].pf_key, anchor.deltas["a"].pf_key)


# ---- concurrency -------------------------------------------------------------------------------------------------
def test_snapshots_are_never_torn_while_another_thread_commits():
    pool = make_pool(max_anchors=4, window=2)
    consumers = ("agent_1", "agent_2", "agent_3")
    stop = threading.Event()
    problems: list[str] = []
    committed_versions: list[int] = []

    def writer() -> None:
        previous = None
        seed = 0
        while not stop.is_set():
            txn = pool.begin("ns")
            base = random_segment(3, seed=seed % 7)
            new_id = txn.add_anchor("p", base)
            for consumer in consumers:
                ph = base.shifted(pool.rope, 4)
                pf = random_segment(1, start=7, seed=1)
                txn.add_deltas(new_id, consumer, ph, ph, pf, pf)
            if previous is not None:  # the same commit also touches the previous anchor: all or nothing
                ph = base.shifted(pool.rope, 4)
                txn.add_deltas(previous, f"late_{seed}", ph, ph, random_segment(1, 7), random_segment(1, 7))
                txn.activate([previous])
            committed_versions.append(pool.commit(txn))
            previous, seed = new_id, seed + 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        last_version, checked = -1, 0
        deadline = time.monotonic() + 10.0
        while (len(committed_versions) < 200 or checked < 200) and time.monotonic() < deadline:
            time.sleep(0)  # let the writer in
            view = pool.snapshot("ns")
            anchors = view.anchors("p")
            if view.version < last_version:
                problems.append(f"version went back: {last_version} -> {view.version}")
            last_version = view.version
            if len(anchors) > 4:
                problems.append(f"{len(anchors)} anchors > V")
            for older, newer in zip(anchors, anchors[1:]):
                if older.inserted_seq >= newer.inserted_seq:
                    problems.append("insertion order broken")
            for anchor in anchors:
                if not set(consumers) <= set(anchor.deltas):
                    problems.append(f"anchor {anchor.anchor_id} lacks committed deltas")
                late = [c for c in anchor.deltas if c.startswith("late_")]
                if len(late) != anchor.activation_count:
                    problems.append("activation and deltas of one commit seen apart")
            checked += 1
    finally:
        stop.set()
        thread.join()
    assert not problems, problems[:5]
    assert len(committed_versions) >= 200 and committed_versions == sorted(set(committed_versions))
