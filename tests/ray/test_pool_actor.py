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
