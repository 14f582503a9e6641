"""Memory stays bounded over many distinct tasks: the pool within its byte budget, each worker's anchor parts
within `anchor_cache_bytes`, its contents' KV within `content_cache_bytes`, and nothing of a finished job kept
outside those caches (the reference keeps every question's input cache forever).

The cluster's worker side runs in this process; only Ray itself is replaced: a client's calls to the pool actor
return their results directly and an object is the payload itself (`in_process_ray`).

* 1,000 distinct tasks, no model: two worker-side `RemoteAnchorPool` clients (each with its `PartCache`) and
  `ContentResolver`s take turns; each task reads its namespace's anchors, stages a new anchor (tiny-llama-shaped
  random KV of a random length), both consumers' deltas and activations of anchors it saw, commits them into an
  `AnchorPoolState`, and passes its input's and responses' KV from one worker to the other.
* 200 real jobs (`JOBS`) on tiny-llama with random weights, driven by the cluster's own driver (`cluster.driver.DagJob`)
  with an in-process executor: each order runs at once through `actors.turns.execute_content` / `execute_turn`,
  alternating between two `KVCommEngine`s over one model runner, so contents cross from one worker to the other;
  afterwards every content KV a job produced or fetched is either dead or in a content cache.
"""
from __future__ import annotations

import gc
import random
import time
import uuid
import weakref
from typing import Any

import pytest
import torch

from kvcomm.config import KVCommConfig
from kvcomm.engine import KVCommEngine
from kvcomm.harness.jobs import GenerationParams
from kvcomm.harness.topologies import build_job
from kvcomm.model_spec import PRESETS
from kvcomm.engine import build_engine

from kvcomm.kv import KVSegment
from kvcomm.rope import Rope

from actors.pool_client import RemoteAnchorPool
from actors.pool_state import AnchorPoolState, merge_payloads, transaction_payload
from actors.transfer import SegmentRef, segment_to_payload
from actors.turns import ContentHandle, ContentResolver, TurnOrder, execute_content, execute_turn
from cluster.driver import DagJob, Reply


TASKS = 1000                  # distinct tasks through the pool and the workers' caches (no model)
JOBS = 200                    # real jobs through the engine, turn by turn
TENANTS = 10                  # namespaces: more than a client keeps snapshots of (8)
POOL_BUDGET = 1 << 20         # kvcomm.pool_byte_budget
ANCHOR_CACHE = 384 << 10      # anchor_cache_bytes, per worker
CONTENT_CACHE = 256 << 10     # content_cache_bytes, per worker
LAYERS, KV_HEADS, HEAD_DIM = 3, 2, 16     # tiny-llama's KV shape
WORDS = "apples pears boxes trains coins marbles books pens cards shells stamps kites".split()


class _InProcessMethod:
    def __init__(self, fn):
        self.remote = fn


class InProcessPoolActor:
    """`AnchorPoolActor`'s calls as the client makes them (``actor.snapshot.remote(...)``), answered at once."""

    def __init__(self, state: AnchorPoolState):
        self.snapshot = _InProcessMethod(state.snapshot)
        self.commit = _InProcessMethod(state.commit)


@pytest.fixture
def in_process_ray(monkeypatch):
    """`ray.get` returns what it is given unless that is (a list of) real ObjectRefs: the clients' "refs" here are
    the objects themselves. Real refs (another fixture's cluster) still go to Ray."""
    import ray
    real_get = ray.get

    def get(value: Any, **kwargs: Any) -> Any:
        first = value[0] if isinstance(value, list) and value else value
        return real_get(value, **kwargs) if isinstance(first, ray.ObjectRef) else value

    monkeypatch.setattr(ray, "get", get)


class Worker:
    """One worker's side: a pool client with its part cache, a content resolver, and (for real jobs) an engine."""

    def __init__(self, index: int, config: KVCommConfig, actor: InProcessPoolActor, rope: Rope,
                 base: KVCommEngine | None = None):
        self.index = index
        self.pool = RemoteAnchorPool(actor, config, rope, cache_bytes=ANCHOR_CACHE)
        self.engine = None if base is None else KVCommEngine(base.runner, base.tokenizer, config, self.pool)
        self.contents = ContentResolver(self.engine, CONTENT_CACHE, "cpu")
        self.tracked: list[tuple[weakref.ref, int]] = []      # every content KV this worker produced or fetched
        remember = self.contents.remember

        def tracking_remember(key, segment):
            self.tracked.append((weakref.ref(segment.keys), segment.nbytes))
            remember(key, segment)

        self.contents.remember = tracking_remember

    def anchor_bytes_held(self) -> int:
        """Bytes of distinct tensor storage the pool client holds between turns (its cache and kept snapshots)."""
        tensors = self.pool.cache.tensors()
        for *_, snap in self.pool._snapshots.values():
            for anchors in snap.lists.values():
                for anchor in anchors:
                    _, named = anchor.to_state()
                    tensors += list(named.values())
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


class Bounds:
    """Checks every budget after each task or job and keeps the peaks."""

    def __init__(self, state: AnchorPoolState, workers: list[Worker]):
        self.state, self.workers = state, workers
        self.peaks = {"pool": 0, "anchor_cache": 0, "anchor_held": 0, "content_cache": 0}

    def check(self, step: int) -> None:
        stats = self.state.stats()
        parts = self.state._base_parts, self.state._delta_parts, self.state._rbk_parts
        pool_objects = sum(p.nbytes for kind in parts for p in kind.values())
        assert stats["total_bytes"] <= POOL_BUDGET, (step, stats["total_bytes"])
        assert pool_objects == stats["total_bytes"], step      # evicted anchors' objects are released with them
        self.peaks["pool"] = max(self.peaks["pool"], stats["total_bytes"])
        for w in self.workers:
            held = w.anchor_bytes_held()
            assert w.pool.cache.nbytes <= ANCHOR_CACHE, (step, w.index, w.pool.cache.nbytes)
            assert held <= ANCHOR_CACHE, (step, w.index, held)   # kept snapshots pin nothing the cache let go
            assert w.contents.cache.nbytes <= CONTENT_CACHE, (step, w.index, w.contents.cache.nbytes)
            self.peaks["anchor_cache"] = max(self.peaks["anchor_cache"], w.pool.cache.nbytes)
            self.peaks["anchor_held"] = max(self.peaks["anchor_held"], held)
            self.peaks["content_cache"] = max(self.peaks["content_cache"], w.contents.cache.nbytes)

    def all_reached(self) -> bool:
        evictions = self.state.stats()["evictions"]
        return evictions["bytes"] > 0 and all(w.pool.cache.evictions > 0 and w.contents.cache.evictions > 0
                                              for w in self.workers)

    def summary(self) -> str:
        stats = self.state.stats()
        anchors = sum(v["anchors"] for lists in stats["namespaces"].values() for v in lists.values())
        ev = stats["evictions"]
        return (f"pool peak {self.peaks['pool'] / 1024:.0f} of {POOL_BUDGET / 1024:.0f} KiB ({anchors} anchors "
                f"left, {ev['bytes']} evicted by bytes, {ev['count']} by count); worker anchor cache peak "
                f"{self.peaks['anchor_cache'] / 1024:.0f} KiB, held {self.peaks['anchor_held'] / 1024:.0f} of "
                f"{ANCHOR_CACHE / 1024:.0f} KiB; content cache peak {self.peaks['content_cache'] / 1024:.0f} of "
                f"{CONTENT_CACHE / 1024:.0f} KiB")


def leftover_contents(workers: list[Worker]) -> tuple[int, int, int]:
    """(content KVs tracked, still alive, their bytes); fails if one is alive outside its worker's cache."""
    gc.collect()
    tracked = alive = alive_bytes = 0
    for w in workers:
        cached = {id(t["keys"]) for t, _ in w.contents.cache._entries.values()}
        for ref, nbytes in w.tracked:
            tracked += 1
            tensor = ref()
            if tensor is not None:
                assert id(tensor) in cached, "a finished job's content KV is alive outside the content cache"
                alive += 1
                alive_bytes += nbytes
    return tracked, alive, alive_bytes


# ------------------------------------------------------------------------------------------------------------
# 1,000 distinct tasks through the pool and the workers' caches
# ------------------------------------------------------------------------------------------------------------
def _kv(g: torch.Generator, tokens: int) -> KVSegment:
    shape = (LAYERS, KV_HEADS, tokens, HEAD_DIM)
    return KVSegment(torch.randn(shape, generator=g), torch.randn(shape, generator=g), 0)


def _handle(segment: KVSegment, holder: int) -> ContentHandle:
    """A content as the driver holds it; its "object" is the payload itself."""
    ref = SegmentRef.describe(segment, segment_to_payload(segment))
    return ContentHandle("response", tuple(range(segment.num_tokens)), uuid.uuid4().hex, ref, uuid.uuid4().hex,
                         f"worker-{holder}")


def run_task(i: int, workers: list[Worker], state: AnchorPoolState, rng: random.Random, g: torch.Generator) -> None:
    namespace = f"tenant-{i % TENANTS}"
    reader, writer = workers[i % 2], workers[(i + 1) % 2]
    # the task's input and two responses: produced on one worker, read on the other (fetched, then cached)
    produced = [_handle(_kv(g, rng.randint(4, 40)), writer.index) for _ in range(3)]
    for handle in produced:
        writer.contents.remember(handle.cache_key, _kv(g, handle.num_tokens))
        reader.contents.content(handle)
    # the consumer reads the namespace's anchors, stages a new one with both consumers' deltas, activates others
    snap = reader.pool.snapshot(namespace)
    txn = reader.pool.begin(namespace)
    placeholder = rng.choice(["user_question", "agent_1_current"])
    tokens, following = rng.randint(4, 40), rng.randint(0, 12)
    anchor_id = txn.add_anchor(placeholder, _kv(g, tokens))
    targets = [(anchor_id, tokens)] + [(a.anchor_id, a.num_tokens) for a in snap.anchors(placeholder)[-1:]]
    for target, n in targets:
        for consumer in ("agent_2", "agent_3"):
            ph_real, ph_base = _kv(g, n).shifted(reader.pool.rope, 30), _kv(g, n).shifted(reader.pool.rope, 30)
            pf_real, pf_base = (_kv(g, following).shifted(reader.pool.rope, 30 + n) for _ in range(2))
            txn.add_deltas(target, consumer, ph_real, ph_base, pf_real, pf_base)
    txn.activate(a.anchor_id for a in snap.anchors(placeholder)[:2])
    state.commit(transaction_payload(txn))
    reader.pool.abort(txn)


def test_a_thousand_distinct_tasks_keep_the_pool_and_worker_caches_within_budget(in_process_ray) -> None:
    config = KVCommConfig(pool_byte_budget=POOL_BUDGET, max_anchors=2)
    rope = Rope(PRESETS["tiny-llama"])
    state = AnchorPoolState(config, put=lambda tensors: tensors)
    actor = InProcessPoolActor(state)
    workers = [Worker(i, config, actor, rope) for i in range(2)]
    bounds = Bounds(state, workers)
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for i in range(TASKS):
        run_task(i, workers, state, rng, g)
        bounds.check(i)
    elapsed = time.perf_counter() - started
    tracked, alive, alive_bytes = leftover_contents(workers)
    assert tracked == 6 * TASKS and alive <= sum(len(w.contents.cache) for w in workers)
    assert bounds.all_reached() and state.stats()["evictions"]["count"] > 0
    assert all(w.pool.stats()["snapshots_unchanged"] > 0 for w in workers)   # kept snapshots still serve
    print(f"\n[reliability] memory bounds, {TASKS} tasks in {elapsed:.1f} s: {bounds.summary()}; "
          f"{tracked} content KVs, {alive} alive at the end ({alive_bytes / 1024:.0f} KiB, all cached)")


# ------------------------------------------------------------------------------------------------------------
# real jobs on the engine, turn by turn
# ------------------------------------------------------------------------------------------------------------
class InProcessCalls:
    """The `TurnExecutor` of these jobs: each order runs at once, on the next worker in turn; "refs" are the
    payloads themselves; a job's staged payloads are merged and committed into the pool state."""

    def __init__(self, workers: list[Worker], state: AnchorPoolState):
        self.workers, self.state, self.sent = workers, state, 0

    def send(self, order: Any) -> Reply:
        self.sent += 1
        w = self.workers[self.sent % len(self.workers)]
        execute = execute_turn if isinstance(order, TurnOrder) else execute_content
        outcome, *payloads = execute(w.engine, order, w.contents, f"worker-{w.index}")
        return Reply(outcome, payloads)

    def wait(self, call: Reply) -> Reply:
        return call

    def cancel(self, call: Reply) -> None:
        pass

    def commit(self, staged: list[Any]) -> None:
        merged = merge_payloads(staged)
        if merged is not None:
            self.state.commit(merged)


@pytest.fixture
def one_thread():
    """One torch thread while the engine runs: tiny matmuls on a shared 2-core machine only lose with more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_finished_jobs_leave_only_bounded_caches_behind(tiny_model_dir, in_process_ray, one_thread) -> None:
    config = KVCommConfig(pool_byte_budget=POOL_BUDGET, max_anchors=4, gamma=1.0)
    base = build_engine(tiny_model_dir, random_weights=True, config=config)
    state = AnchorPoolState(config, put=lambda tensors: tensors)
    actor = InProcessPoolActor(state)
    workers = [Worker(i, config, actor, base.runner.rope, base) for i in range(2)]
    bounds = Bounds(state, workers)
    rng = random.Random(0)
    calls = InProcessCalls(workers, state)
    reasons: dict[str, int] = {}
    started = time.perf_counter()
    for i in range(JOBS):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.choice([4, 8, 12])))
        task = f"Question {i}: Tom counts {rng.randint(10, 99)} {words}. How many are there?"
        job = build_job("math", task, num_agents=2, mode="kvcomm", job_id=f"mem-{i}", namespace=f"tenant-{i % 4}",
                        generation=GenerationParams(max_new_tokens=1, min_new_tokens=1))
        for turn in DagJob(job, job.mode, calls).run()["turns"]:
            kind = turn["reason"].split(":")[0]
            reasons[kind] = reasons.get(kind, 0) + 1
        bounds.check(i)
    elapsed = time.perf_counter() - started
    del job
    tracked, alive, alive_bytes = leftover_contents(workers)
    assert tracked >= 3 * JOBS and alive <= sum(len(w.contents.cache) for w in workers)
    assert all(w.contents.cache.evictions > 0 for w in workers)
    assert reasons.get("reused", 0) > JOBS // 2 and reasons.get("new_anchor", 0) > 0
    print(f"\n[reliability] memory bounds, {JOBS} jobs ({3 * JOBS} orders) in {elapsed:.1f} s: {bounds.summary()}; "
          f"{tracked} content KVs produced or fetched, {alive} alive at the end ({alive_bytes / 1024:.0f} KiB, all "
          f"cached); reasons {reasons}")
