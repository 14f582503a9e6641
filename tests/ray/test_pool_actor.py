"""The anchor pool actor: calls served concurrently, a version per namespace, one pool per name (checked).

In-process (`AnchorPoolState`, no Ray): a commit's tensor copy and a save's tensor reads happen outside the
state's lock (a blocked `put` or `get` holds up no other call); a commit to one namespace leaves another's
"unchanged" shortcut valid, an eviction the byte budget makes in it does not. On a local Ray cluster: a ~100 MB
commit in flight does not hold up snapshots; a worker's client answers "unchanged" across another namespace's
commits; joining a pool built for another model or other settings is a `PoolMismatchError` naming both; a pool
created from inside a placement group is not captured by it and outlives it.
"""
from __future__ import annotations

import dataclasses
import threading
import uuid

import pytest
import torch

from actors.anchor_pool_actor import PoolMismatchError, PoolSnapshotSettings, PoolSpec, get_or_create_pool_actor
from actors.part_cache import AnchorPartCache
from actors.pool_client import RemoteAnchorPool
from actors.pool_state import AnchorPoolState, transaction_payload
from kvcomm.anchor_pool import AnchorPool
from kvcomm.config import KVCommConfig
from kvcomm.kv import KVSegment

CONFIG = KVCommConfig(rerotate_deltas=False, max_anchors=100)


def payload(namespace: str, tokens: int = 4, placeholder: str = "p", fill: float = 1.0, *,
            config: KVCommConfig = CONFIG) -> dict:
    """One new anchor of `tokens` tokens ([2 layers, 2 heads, tokens, 64] fp32 keys and values) as a commit."""
    txn = AnchorPool(config).begin(namespace)
    shape = (2, 2, tokens, 64)
    txn.add_anchor(placeholder, KVSegment(torch.full(shape, fill), torch.full(shape, -fill), 0))
    return transaction_payload(txn)


def activation(namespace: str, anchor_id: str) -> dict:
    return {"namespace": namespace, "anchors": [], "deltas": [], "activations": {anchor_id: 1}}


def known(wire: dict) -> tuple[str, int]:
    return wire["epoch"], wire["changed_at"]


# ------------------------------------------------------------------------------------------------------------
# in-process
# ------------------------------------------------------------------------------------------------------------
def test_a_commit_to_another_namespace_leaves_the_unchanged_shortcut_valid() -> None:
    state = AnchorPoolState(CONFIG, put=lambda arrays: arrays)
    state.commit(payload("a"))
    a = state.snapshot("a")
    state.commit(payload("b"))
    state.commit(payload("b", fill=2.0))
    assert state.version == 3
    assert state.snapshot("a", known(a)) is None                  # b's commits do not touch a
    b = state.snapshot("b")
    anchor_id = a["lists"]["p"][0]["metadata"]["anchor_id"]
    state.commit(activation("a", anchor_id))
    again = state.snapshot("a", known(a))
    assert again is not None and again["lists"]["p"][0]["metadata"]["activation_count"] == 1
    assert state.snapshot("b", known(b)) is None                  # ... nor a's commit b
    assert state.stats()["changed_at"] == {"a": 4, "b": 3}


def test_an_eviction_by_the_byte_budget_counts_as_a_change_of_the_namespace_it_hits() -> None:
    one = payload("a", tokens=8)["anchors"][0]["base"]
    anchor_bytes = sum(x.nbytes for x in one.values())
    config = dataclasses.replace(CONFIG, pool_byte_budget=int(2.5 * anchor_bytes))
    state = AnchorPoolState(config, put=lambda arrays: arrays)
    state.commit(payload("a", tokens=8))
    state.commit(payload("a", tokens=8, fill=2.0))
    a = state.snapshot("a")
    state.commit(payload("b", tokens=4))        # fits: a is untouched
    assert state.snapshot("a", known(a)) is None
    state.commit(payload("b", tokens=8))        # over budget: a's list is the largest, it loses an anchor
    changed = state.snapshot("a", known(a))
    assert changed is not None and len(changed["lists"]["p"]) == 1


def test_a_commit_copies_its_tensors_outside_the_lock() -> None:
    """A commit whose tensor copy (`put`, a ray.put in the actor) is blocked holds up no snapshot or other commit."""
    copying, release = threading.Event(), threading.Event()

    def put(arrays):
        if float(next(iter(arrays.values())).flat[0]) == 9.0:     # the big commit's tensors
            copying.set()
            assert release.wait(30)
        return arrays

    state = AnchorPoolState(CONFIG, put=put)
    state.commit(payload("a"))
    slow = threading.Thread(target=state.commit, args=(payload("big", fill=9.0),))
    slow.start()
    try:
        assert copying.wait(30)
        assert state.snapshot("a")["lists"]["p"]                  # answered while the copy is in flight
        assert state.commit(payload("c")) == 2                    # and another commit applied
    finally:
        release.set()
        slow.join(30)
    assert state.version == 3 and state.snapshot("big")["lists"]["p"]


def test_a_save_reads_its_tensors_outside_the_lock(tmp_path) -> None:
    reading, release = threading.Event(), threading.Event()

    def get(ref):
        reading.set()
        assert release.wait(30)
        return ref

    state = AnchorPoolState(CONFIG, put=lambda arrays: arrays, get=get)
    state.commit(payload("a"))
    saver = threading.Thread(target=state.save, args=(tmp_path / "pool.msgpack",))
    saver.start()
    try:
        assert reading.wait(30)
        assert state.commit(payload("b")) == 2
        assert state.snapshot("b")["lists"]["p"]
    finally:
        release.set()
        saver.join(30)
    assert (tmp_path / "pool.msgpack").exists()


# ------------------------------------------------------------------------------------------------------------
# on Ray
# ------------------------------------------------------------------------------------------------------------
def spec(**changes) -> PoolSpec:
    return PoolSpec(**{"name": f"pool-test-{uuid.uuid4().hex[:8]}", "ray_namespace": "kvcomm-test",
                       "model": "model=tiny random_weights=True", "kvcomm": CONFIG, **changes})


def test_snapshots_are_answered_while_a_100_mb_commit_is_in_flight(ray_cluster) -> None:
    ray = ray_cluster
    actor, created = get_or_create_pool_actor(spec())
    try:
        assert created
        ray.get(actor.commit.remote(payload("small")))
        big = ray.put(payload("big", tokens=100_000))         # 2 x 51 MB of keys and values
        in_flight = actor.commit.remote(big)
        answered = 0
        for _ in range(1000):
            snap = ray.get(actor.snapshot.remote("small"))
            assert snap["lists"]["p"]
            if ray.wait([in_flight], timeout=0)[0]:
                break
            answered += 1                       # returned while the commit had not
        ray.get(in_flight)
        assert answered >= 1, "no snapshot was answered while the large commit ran"
        stats = ray.get(actor.stats.remote())
        assert stats["bytes_received"] > 100e6 and stats["bytes_per_question"] > 50e6
    finally:
        ray.kill(actor)


def test_a_worker_client_keeps_its_snapshot_across_other_namespaces_commits(ray_cluster) -> None:
    ray = ray_cluster
    actor, _ = get_or_create_pool_actor(spec())
    try:
        ray.get(actor.commit.remote(payload("mine")))
        client = RemoteAnchorPool(actor, CONFIG, rope=None, prefetch=True)
        first = client.hold("mine")
        assert client.snapshot("mine") is first and len(first) == 1     # served from what was held
        for fill in (2.0, 3.0):
            ray.get(actor.commit.remote(payload("theirs", fill=fill)))
        assert client.hold("mine") is first                              # unchanged: no rebuild, no fetch
        stats = client.stats()
        assert stats["fetches"] == 2 and stats["snapshots_unchanged"] == 1
        assert stats["fetched_bytes"] == first.nbytes
        txn = client.begin("mine")
        txn.add_anchor("p", KVSegment(torch.ones(2, 2, 3, 64), torch.ones(2, 2, 3, 64), 0))
        pending = client.commit(txn)                                     # leaves on the committer thread
        assert pending.result(timeout=30) == 4
        assert len(client.hold("mine")) == 2
        client.release("mine")
        client.close()
    finally:
        ray.kill(actor)


def two_consumer_payload(namespace: str) -> tuple[dict, dict[str, str]]:
    """Anchors of placeholders "p" and "q" (8 tokens), each with deltas of consumers "c1" and "c2" over a following
    segment of 4 tokens; reference mode, so each anchor's last writer (p's: c1, q's: c2) keeps a rotated base key."""
    txn = AnchorPool(CONFIG).begin(namespace)
    ids = {}
    for placeholder, writers, fill in (("p", ("c2", "c1"), 1.0), ("q", ("c1", "c2"), 5.0)):
        base = KVSegment(torch.full((2, 2, 8, 64), fill), torch.full((2, 2, 8, 64), -fill), 0)
        ids[placeholder] = txn.add_anchor(placeholder, base)
        for k, consumer in enumerate(writers):
            shifted = KVSegment(base.keys + k + 1, base.values - k - 1, 10)
            following = KVSegment(torch.full((2, 2, 4, 64), fill + k), torch.zeros(2, 2, 4, 64), 18)
            zeros = torch.zeros(2, 2, 4, 64)
            txn.add_deltas(ids[placeholder], consumer, ph_real=shifted,
                           ph_base_rotated=KVSegment(base.keys, base.values, 10),
                           pf_real=following, pf_base=KVSegment(zeros, zeros, 18))
    return transaction_payload(txn), ids


def test_a_turn_fetches_only_the_parts_of_the_pairs_it_reads(ray_cluster) -> None:
    ray = ray_cluster
    actor, _ = get_or_create_pool_actor(spec())
    try:
        wire, ids = two_consumer_payload("ns")
        ray.get(actor.commit.remote(wire))
        full = RemoteAnchorPool(actor, CONFIG, rope=None).fetch("ns")         # every part: the reference
        everything = full.nbytes
        parts = ray.get(actor.snapshot.remote("ns"))["lists"]
        size = {name: {"base": e[0]["parts"]["base"].nbytes,
                       **{f"delta {c}": ref.nbytes for c, ref in e[0]["parts"]["deltas"].items()},
                       **{f"rbk {c}": ref.nbytes for c, ref in e[0]["parts"]["rbk"].items()}}
                for name, e in parts.items()}
        assert set(size["p"]) == {"base", "delta c1", "delta c2", "rbk c1"}   # p's last writer: c1

        client = RemoteAnchorPool(actor, CONFIG, rope=None, prefetch=True)
        snap = client.hold("ns", [("p", "c1")])                              # a turn of consumer c1 reading {p}
        stats = client.stats()
        assert stats["fetched_parts"] == 3                                   # p's base, c1's deltas, c1's rbk
        assert stats["fetched_bytes"] == size["p"]["base"] + size["p"]["delta c1"] + size["p"]["rbk c1"]
        assert snap.anchors("q") == [] and [set(a.deltas) for a in snap.anchors("p")] == [{"c1"}]
        mine, reference = snap.anchor(ids["p"]), full.anchor(ids["p"])
        for name in ("ph_key", "ph_value", "pf_key", "pf_value", "rotated_base_key"):
            assert torch.equal(getattr(mine.deltas["c1"], name), getattr(reference.deltas["c1"], name)), name
        assert torch.equal(mine.base_keys, reference.base_keys)
        assert torch.equal(mine.reference_base_key, reference.reference_base_key)
        assert client.snapshot("ns") is snap                                 # what the engine reads
        client.release("ns")

        gate = client.hold("ns", [("q", None)])                              # the gate on content offered as q
        assert client.stats()["fetched_parts"] == 4                          # + q's base only
        assert [set(a.deltas) for a in gate.anchors("q")] == [set()] and gate.anchors("q")[0].last_writer is None
        client.release("ns")

        # q read by c1: c1's deltas, and the last writer c2's deltas and rotated base key (reference mode reads
        # it with any consumer's deltas); q's base is already cached
        turn = client.hold("ns", [("q", "c1")])
        assert client.stats()["fetched_parts"] == 4 + 3
        q = turn.anchor(ids["q"])
        assert set(q.deltas) == {"c1", "c2"}
        assert torch.equal(q.reference_base_key, full.anchor(ids["q"]).reference_base_key)
        client.release("ns")
        assert client.stats()["fetched_bytes"] < everything
        assert client.stats()["fetched_bytes"] == everything - size["p"]["delta c2"]   # p's c2 deltas: never read

        client.hold("ns", [("p", "c1")])                                     # two turns at once on one namespace:
        both = client.hold("ns", [("q", None)])                              # one snapshot covers both turns' pairs
        assert client.snapshot("ns") is both and set(both.placeholders) == {"p", "q"}
        assert set(both.anchor(ids["p"]).deltas) == {"c1"}
        client.release("ns")
        client.release("ns")
        client.close()
    finally:
        ray.kill(actor)


def test_a_pool_spec_s_nice_lowers_the_pool_process_priority(ray_cluster) -> None:
    ray = ray_cluster
    plain, _ = get_or_create_pool_actor(spec())
    niced, _ = get_or_create_pool_actor(spec(nice=2))
    try:
        base = ray.get(plain.stats.remote())["nice"]              # Ray's workers start niced already (15 here)
        assert base < 19 and ray.get(niced.stats.remote())["nice"] == base + 2
    finally:
        ray.kill(plain)
        ray.kill(niced)


def test_joining_a_pool_built_for_another_model_or_settings_is_a_clear_error(ray_cluster, tmp_path) -> None:
    ray = ray_cluster
    built = spec(snapshot=PoolSnapshotSettings(path=str(tmp_path / "pool.msgpack")))
    actor, created = get_or_create_pool_actor(built)
    try:
        assert created
        again, created_again = get_or_create_pool_actor(built)
        assert not created_again and again._actor_id == actor._actor_id
        with pytest.raises(PoolMismatchError) as error:
            get_or_create_pool_actor(dataclasses.replace(built, model="model=other random_weights=False",
                                                         kvcomm=CONFIG.with_(max_anchors=3)))
        message = str(error.value)
        assert built.name in message and "model=tiny" in message and "model=other" in message
        assert "kvcomm.max_anchors: pool has 100, this deployment wants 3" in message
        with pytest.raises(PoolMismatchError, match="snapshot: pool has .*pool.msgpack.*wants None"):
            get_or_create_pool_actor(dataclasses.replace(built, snapshot=None))   # never silently dropped
    finally:
        ray.kill(actor)


def test_a_pool_created_inside_a_placement_group_lives_outside_it(ray_cluster) -> None:
    """What a Serve replica (or a worker) in a placement group does: the pool is not captured by the group, and
    removing the group (a downscale) leaves it running."""
    ray = ray_cluster
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pool_spec = spec(detached=True)   # as the Serve ingress creates it: it outlives its creator
    group = placement_group([{"CPU": 0.5}])
    ray.get(group.ready(), timeout=60)

    @ray.remote(num_cpus=0.5)
    def create(pool: PoolSpec) -> tuple[str | None, str | None]:
        handle, _ = get_or_create_pool_actor(pool)
        return ray.get_runtime_context().get_placement_group_id(), ray.get(handle.stats.remote())["placement_group"]

    creator_group, pool_group = ray.get(create.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_capture_child_tasks=True)).remote(pool_spec), timeout=120)
    try:
        assert creator_group == group.id.hex() and pool_group is None
        remove_placement_group(group)
        handle = ray.get_actor(pool_spec.name, namespace=pool_spec.ray_namespace)
        assert ray.get(handle.ping.remote(), timeout=30) == "ok"
    finally:
        ray.kill(ray.get_actor(pool_spec.name, namespace=pool_spec.ray_namespace))


# ------------------------------------------------------------------------------------------------------------
# a worker's part cache: host tier (pinned on CUDA) and device tier, each bounded by its own budget
# ------------------------------------------------------------------------------------------------------------
def part(fill: float) -> dict[str, torch.Tensor]:
    return {"k": torch.full((256,), fill)}                    # 1 KiB


def test_the_host_and_device_tiers_evict_by_their_own_budgets_on_mocked_cuda() -> None:
    """The accelerator branch on a CPU-only machine: "meta" stands for the device, `pin` records what is pinned."""
    pinned, evicted = [], []
    cache = AnchorPartCache(host_bytes=3 * 1024, device_bytes=2 * 1024, device="meta",
                            pin=lambda t: pinned.append(t) or t.clone(), on_evict=evicted.append)
    copies = {key: cache.put(key, part(i), 1024) for i, key in enumerate("abc")}
    assert len(pinned) == 3                                                   # every host part pinned
    assert all(t.device.type == "meta" for c in copies.values() for t in c.values())   # turns read device copies
    assert cache.stats()["cache_bytes"] == 3 * 1024 and cache.stats()["device_cache_bytes"] == 2 * 1024
    assert evicted == ["a"] and "a" in cache and not cache.holds_on_device("a")  # a's device copy went, host kept
    again = cache.get("a")                                                    # copied back from the host tier
    assert again["k"].device.type == "meta" and cache.holds_on_device("a") and not cache.holds_on_device("b")
    assert cache.host.misses == 0                                             # no fetch was needed
    cache.put("d", part(3), 1024)                                             # host over budget: LRU b leaves
    assert "b" not in cache and "a" in cache and cache.host.evictions == 1
    assert cache.stats()["device_cache_bytes"] <= 2 * 1024 and cache.stats()["cache_bytes"] == 3 * 1024
    cache.put("e", part(4), 1024)                                             # host evicts c: its device copy too
    assert "c" not in cache and not cache.holds_on_device("c") and evicted.count("c") >= 1


def test_a_cpu_worker_s_cache_is_one_tier_bounded_by_the_host_budget() -> None:
    cache = AnchorPartCache(host_bytes=2 * 1024, device_bytes=1, device="cpu", pin=lambda t: 1 / 0)
    tensors = part(1.0)
    assert cache.put("a", tensors, 1024) is tensors                           # no copy, no pinning on a CPU worker
    cache.put("b", part(2.0), 1024)
    assert cache.holds_on_device("a") and cache.stats()["device_cache_bytes"] == 2 * 1024   # the device budget: unused
    cache.put("c", part(3.0), 1024)
    assert "a" not in cache and cache.nbytes == 2 * 1024 and cache.evictions == 1


def test_a_worker_client_on_mocked_cuda_holds_device_copies_within_the_device_budget(ray_cluster) -> None:
    ray = ray_cluster
    actor, _ = get_or_create_pool_actor(spec())
    try:
        wire, ids = two_consumer_payload("ns")
        ray.get(actor.commit.remote(wire))
        pinned = []
        client = RemoteAnchorPool(actor, CONFIG, rope=None, prefetch=True, cache_bytes=1 << 20,
                                  device_cache_bytes=40_000, device="meta", pin=lambda t: pinned.append(t) or t)
        snap = client.hold("ns", [("p", "c1"), ("q", "c2")])
        tensors = [t for a in (snap.anchor(ids["p"]), snap.anchor(ids["q"])) for t in a.to_state()[1].values()]
        assert tensors and all(t.device.type == "meta" for t in tensors)
        stats = client.stats()
        assert stats["fetched_parts"] == 6 and len(pinned) == 2 * (2 + 4 + 1)   # per anchor: base, deltas, rbk
        assert stats["cache_bytes"] == stats["fetched_bytes"] > 40_000     # every part stays on the host ...
        assert stats["device_cache_bytes"] <= 40_000 and stats["device_cache_evictions"] > 0   # ... copies bounded
        client.release("ns")
        assert client.snapshot("ns") is not snap        # not kept: it held device copies the device tier let go
        client.close()
    finally:
        ray.kill(actor)


def test_the_device_tier_budget_has_one_home_in_the_cluster_config() -> None:
    from cluster.config import ClusterConfig
    config = ClusterConfig(anchor_device_cache_bytes=1 << 20)
    settings = config.worker_settings()
    assert settings.anchor_device_cache_bytes == 1 << 20 and settings.anchor_cache_bytes > 1 << 20
    assert config.budgets()["anchor_cache_on_device_bytes"] == settings.anchor_cache_bytes   # CPU: one tier
    gpu = config.with_(device="cuda", gpus_per_worker=1).budgets()
    assert gpu["anchor_cache_on_device_bytes"] == 1 << 20          # what `kvcomm plan` counts on the GPU
    unset = ClusterConfig().budgets()
    assert unset["anchor_device_cache_bytes"] == unset["anchor_cache_bytes"]
