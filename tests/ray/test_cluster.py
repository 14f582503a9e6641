"""The Ray cluster: config, the anchor-pool actor, agent workers with continuous batching, and the job runner.

Everything runs for real: a local Ray cluster (the session `ray_cluster` fixture), two `AgentWorker` replicas of
tiny-llama with random weights and the embedded tokenizer (half a CPU each, so another small runner still fits on
a 2-CPU cluster), and the single-process engine (`kvcomm.job_runner.run_job`) as the oracle.
"""
from __future__ import annotations

import dataclasses
import random
import threading
import time
import uuid

import pytest
import torch

from kvcomm.anchor_pool import AnchorPool
from kvcomm.config import KVCommConfig
from kvcomm.harness.jobs import GenerationParams
from kvcomm.harness.topologies import build_job
from kvcomm.job_runner import run_job
from kvcomm.kv import KVSegment
from kvcomm.calibration import resolve as resolve_calibration
from kvcomm.engine import build_engine

from actors.anchor_pool_actor import PoolSpec, get_or_create_pool_actor
from actors.pool_client import RemoteAnchorPool
from actors.pool_state import AnchorPoolState, transaction_payload
from actors.worker_load import WorkerLoad
from cluster.config import ClusterConfig, KVCommSettings


GAMMA = 1.0          # as in the TTFT benchmark: two anchors per placeholder are enough to reuse
NEW_TOKENS = 8       # every response exactly this long, so later contents fit earlier anchors
MAX_PROMPT_TOKENS = 2048   # the module cluster's memory plan admits prompts this long (the tiny model's context: 4096)
TASKS = [f"Tom has {a} apples and buys {b} more. How many apples does Tom have?"
         for a, b in [(3, 5), (4, 2), (6, 1), (2, 7), (5, 5), (8, 1), (1, 9), (7, 2), (9, 3), (2, 2), (3, 3), (4, 4),
                      (6, 6), (7, 7), (8, 8), (9, 9)]]


def make_job(index: int, mode: str, namespace: str, job_id: str | None = None, topology: str = "fully_connected"):
    return build_job("math", TASKS[index], num_agents=3, mode=mode, job_id=job_id or f"job{index}-{mode}",
                     namespace=namespace, topology=topology, decision=topology == "star",
                     generation=GenerationParams(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS))


def token_ids(result) -> list[list[int]]:
    turns = result["turns"] if isinstance(result, dict) else [t.to_dict() for t in result.turns]
    return [t["token_ids"] for t in turns]


def cluster_config(model_dir: str, **changes) -> ClusterConfig:
    base = dict(model=model_dir, random_weights=True, num_workers=2, cpus_per_worker=0.5, threads_per_worker=1,
                max_batch_size=16, pool_actor_name=f"test-pool-{uuid.uuid4().hex[:8]}", ray_namespace="kvcomm-test",
                kvcomm={"gamma": GAMMA})
    base.update(changes)
    return ClusterConfig(**base)


@pytest.fixture(scope="module")
def cluster(ray_cluster, tiny_model_dir):
    from cluster.batch.runner import ClusterRunner
    runner = ClusterRunner(cluster_config(tiny_model_dir, worker_max_restarts=-1,
                                          memory={"max_prompt_tokens": MAX_PROMPT_TOKENS})).start()
    yield runner
    runner.shutdown()


def oracle_engine(model_dir: str):
    return build_engine(model_dir, random_weights=True, config=KVCommConfig(gamma=GAMMA))


def worker_stats(cluster, index: int) -> dict:
    import ray
    return ray.get(cluster.workers[index].stats.remote())


# ------------------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------------------
def test_kvcomm_settings_mirror_the_dataclass_defaults_and_validation() -> None:
    assert KVCommSettings().to_kvcomm() == KVCommConfig()
    assert KVCommSettings(gamma=0.7).to_kvcomm() == KVCommConfig(gamma=0.7)
    with pytest.raises(ValueError, match="max_anchors must be >= 1"):
        KVCommSettings(max_anchors=0)   # the dataclass's own rule
    with pytest.raises(ValueError, match="tail_policy"):
        KVCommSettings(tail_policy="everything")


def test_cluster_config_from_yaml_names_unknown_keys(tmp_path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("num_workers: 3\nplacement_strategy: SPREAD\nkvcomm:\n  gamma: 0.5\n  window: 3\n")
    config = ClusterConfig.from_yaml(good)
    assert (config.num_workers, config.placement_strategy) == (3, "SPREAD")
    assert config.kvcomm.to_kvcomm() == KVCommConfig(gamma=0.5, window=3)
    assert config.bundle() == {"CPU": 1.0}
    # the unset pool budget follows the model (SmolLM2-135M fp32: 4 questions of ~0.6 GB, more than the 2 GiB floor)
    budget = config.budgets()["pool_byte_budget"]
    assert budget == 4 * config.anchor_bytes_per_question() > KVCommConfig().pool_byte_budget
    # workers get it, with the model's calibration filling the per-model knobs the config leaves unset
    want = KVCommConfig(gamma=0.5, window=3, pool_byte_budget=budget)
    assert config.worker_settings().kvcomm == resolve_calibration(want, config.model)[0]
    assert config.worker_settings().kvcomm.gamma == 0.5 and config.worker_settings().kvcomm.calibrated

    bad = tmp_path / "bad.yaml"
    bad.write_text("num_workers: 2\nnum_wrokers: 3\n")
    with pytest.raises(ValueError, match="num_wrokers"):
        ClusterConfig.from_yaml(bad)
    bad.write_text("kvcomm:\n  gama: 0.5\n")
    with pytest.raises(ValueError, match=r"kvcomm\.gama"):
        ClusterConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="gpus_per_worker"):
        ClusterConfig(device="cuda")
    gpu = ClusterConfig(device="cuda", gpus_per_worker=1, cpus_per_worker=4)
    assert gpu.bundle() == {"CPU": 4.0, "GPU": 1.0} and gpu.worker_threads == 4


# ------------------------------------------------------------------------------------------------------------
# the pool actor's state: AnchorPool's own rules on a metadata mirror
# ------------------------------------------------------------------------------------------------------------
def _random_segment(rng: random.Random, tokens: int) -> KVSegment:
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    return KVSegment(torch.randn(2, 1, tokens, 4, generator=g), torch.randn(2, 1, tokens, 4, generator=g), 0)


def test_pool_state_applies_anchor_pool_rules_exactly() -> None:
    """Same transactions (some left open while others commit) into an in-process AnchorPool and into the actor's
    state: same anchors, counts, bytes, evictions (by count and by bytes), stale updates, versions; and the
    actor's parts hold exactly the staged tensors, and only for anchors still in the pool."""
    config = KVCommConfig(max_anchors=3, window=2, pool_byte_budget=6000, rerotate_deltas=False)
    local = AnchorPool(config)
    parts: dict = {}
    state = AnchorPoolState(config, put=lambda tensors: parts.setdefault(uuid.uuid4().hex, tensors))
    rng = random.Random(7)
    staged_bases: dict[str, KVSegment] = {}
    pending = []
    for step in range(60):
        namespace = rng.choice(["a", "b"])
        txn = local.begin(namespace)
        snapshot = local.snapshot(namespace)
        staged = []
        for _ in range(rng.randint(0, 2)):
            base = _random_segment(rng, rng.randint(1, 4))
            anchor_id = txn.add_anchor(rng.choice(["p", "q"]), base)
            staged_bases[anchor_id] = base
            staged.append(anchor_id)
        known = [a for ph in snapshot.placeholders for a in snapshot.anchors(ph)]
        for anchor_id in staged + [a.anchor_id for a in rng.sample(known, min(len(known), 2))]:
            base = staged_bases[anchor_id]
            txn.add_deltas(anchor_id, rng.choice(["c1", "c2"]), ph_real=_random_segment(rng, base.num_tokens),
                           ph_base_rotated=base, pf_real=_random_segment(rng, 2), pf_base=_random_segment(rng, 2))
        if known:
            txn.activate(a.anchor_id for a in rng.sample(known, 1))
        pending.append(txn)
        if rng.random() < 0.4:
            continue        # left open: commits in between may evict what it updates (stale updates)
        txn = pending.pop(rng.randrange(len(pending)))
        assert state.commit(transaction_payload(txn)) == local.commit(txn)
        expected, got = local.stats(), state.stats()
        for key in ("version", "total_bytes", "evictions", "stale_updates", "namespaces"):
            assert got[key] == expected[key], (step, key)
        live_anchors = 0
        for ns in ("a", "b"):
            wire, mine = state.snapshot(ns), local.snapshot(ns)
            assert set(wire["lists"]) == set(mine.placeholders)
            for ph, entries in wire["lists"].items():
                assert [e["metadata"]["anchor_id"] for e in entries] == [a.anchor_id for a in mine.anchors(ph)]
                for entry, anchor in zip(entries, mine.anchors(ph)):
                    live_anchors += 1
                    assert entry["metadata"]["activation_count"] == anchor.activation_count
                    base = entry["parts"]["base"].ref
                    assert torch.equal(torch.from_numpy(base["base_keys"]), anchor.base_keys)
                    for consumer, d in anchor.deltas.items():
                        stored = entry["parts"]["deltas"][consumer].ref
                        assert torch.equal(torch.from_numpy(stored["ph_value"]), d.ph_value)
                        assert (consumer in entry["parts"]["rbk"]) == (d.rotated_base_key is not None)
        assert got["parts"]["base"] == live_anchors     # evicted anchors' objects are released
    assert expected["evictions"]["count"] > 0 and expected["evictions"]["bytes"] > 0   # both rules exercised
    assert expected["stale_updates"] > 0


# ------------------------------------------------------------------------------------------------------------
# the pool actor over Ray
# ------------------------------------------------------------------------------------------------------------
def test_remote_pool_round_trips_tensors_and_caches_them(ray_cluster) -> None:
    import ray
    config = KVCommConfig(rerotate_deltas=False)
    actor, created = get_or_create_pool_actor(PoolSpec(name=f"rt-{uuid.uuid4().hex[:8]}", ray_namespace="kvcomm-test", kvcomm=config))
    try:
        assert created
        client = RemoteAnchorPool(actor, config, rope=None, cache_bytes=1 << 20)
        base = _random_segment(random.Random(1), 5)
        txn = client.begin("ns")
        anchor_id = txn.add_anchor("user_question", base)
        version = client.commit(txn)
        snap = client.snapshot("ns")
        assert snap.version == version and len(snap) == 1
        anchor = snap.anchor(anchor_id)
        assert torch.equal(anchor.base_keys, base.keys) and torch.equal(anchor.base_values, base.values)
        assert client.snapshot("other").anchors("user_question") == []   # namespaces never mix
        again = client.snapshot("ns")
        assert again is snap                      # unchanged pool: no rebuild, no fetch
        stats = client.stats()
        assert stats["snapshots_unchanged"] == 1 and stats["fetched_bytes"] == base.nbytes
        txn = client.begin("ns")
        txn.activate([anchor_id])
        client.commit(txn)
        bumped = client.snapshot("ns")
        assert bumped.anchor(anchor_id).activation_count == 1
        assert client.stats()["fetched_bytes"] == base.nbytes   # new version, same parts: served from the cache
        assert ray.get(actor.stats.remote())["commits"] == 2
    finally:
        ray.kill(actor)


def test_pool_snapshots_never_see_a_partial_commit(ray_cluster) -> None:
    """Writers commit two anchors per transaction (placeholders p and q, tensors filled with one tag) while
    readers snapshot: every snapshot holds both anchors of a transaction or neither, with the right tensors."""
    import ray
    config = KVCommConfig(max_anchors=1000, rerotate_deltas=False)
    actor, _ = get_or_create_pool_actor(PoolSpec(name=f"tear-{uuid.uuid4().hex[:8]}", ray_namespace="kvcomm-test", kvcomm=config))
    problems: list[str] = []
    writers_done = threading.Event()
    seen_versions: list[int] = []

    def write(writer: int) -> None:
        client = RemoteAnchorPool(actor, config, rope=None)
        for k in range(12):
            tag = float(writer * 100 + k)
            txn = client.begin("tear")
            for ph in ("p", "q"):
                txn.add_anchor(ph, KVSegment(torch.full((2, 1, 3, 4), tag), torch.full((2, 1, 3, 4), -tag), 0))
            if client.commit(txn) is None:
                problems.append(f"writer {writer}: commit dropped")

    def read() -> None:
        client = RemoteAnchorPool(actor, config, rope=None)
        last = -1
        while not writers_done.is_set() or last < 0:
            snap = client.snapshot("tear")
            if snap.version < last:
                problems.append(f"version went back from {last} to {snap.version}")
            last = snap.version
            tags = {}
            for ph in ("p", "q"):
                values = []
                for anchor in snap.anchors(ph):
                    tag = float(anchor.base_keys.flatten()[0])
                    if not (torch.all(anchor.base_keys == tag) and torch.all(anchor.base_values == -tag)):
                        problems.append(f"anchor {anchor.anchor_id} holds mixed tensors")
                    values.append(tag)
                tags[ph] = sorted(values)
            if tags["p"] != tags["q"]:
                problems.append(f"torn snapshot at version {snap.version}: p {tags['p']} vs q {tags['q']}")
            seen_versions.append(snap.version)

    writers = [threading.Thread(target=write, args=(w,)) for w in range(3)]
    readers = [threading.Thread(target=read) for _ in range(2)]
    try:
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join(60)
        writers_done.set()
        for t in readers:
            t.join(60)
        final = RemoteAnchorPool(actor, config, rope=None).snapshot("tear")
        assert not problems, problems[:5]
        assert len(final.anchors("p")) == len(final.anchors("q")) == 36
        assert len(set(seen_versions)) > 3          # readers really saw the pool change under them
    finally:
        ray.kill(actor)


# ------------------------------------------------------------------------------------------------------------
# workers and the runner
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["dense", "kvcomm"])
def test_jobs_through_two_workers_equal_the_single_process_engine(cluster, tiny_model_dir, mode) -> None:
    """The runner drives each job's DAG, its turns routed on their own across both workers (a star: three agents
    in parallel, then the decision agent reading all three)."""
    namespace = f"parity-{mode}-{uuid.uuid4().hex[:8]}"
    jobs = [make_job(i, mode, namespace, topology="star") for i in range(4)]
    engine = oracle_engine(tiny_model_dir)
    expected = [run_job(engine, job) for job in jobs]
    got = [cluster.run_job(job) for job in jobs]
    assert all(sorted(g["workers"]) == ["worker-0", "worker-1"] for g in got)   # a level's agents share both
    for job, want, have in zip(jobs, expected, got):
        assert token_ids(have) == token_ids(want), job.id
        assert [t["reason"] for t in have["turns"]] == [t.reason for t in want.turns], job.id
        assert have["final_answer"] == want.final_answer
    if mode == "kvcomm":
        # jobs 0 and 1 recorded anchors from turns on both workers; jobs 2 and 3 reuse them on both workers
        assert [g["reuse_rate"] for g in got] == [w.reuse_rate for w in expected]
        assert got[3]["reuse_rate"] == 1.0


@pytest.mark.parametrize("mode", ["dense", "kvcomm"])
def test_pinned_jobs_on_alternating_workers_equal_the_single_process_engine(cluster, tiny_model_dir, mode) -> None:
    """Each job's turns all pinned to one worker (0, 1, 0, 1): anchors recorded on one are reused on the other."""
    namespace = f"whole-{mode}-{uuid.uuid4().hex[:8]}"
    jobs = [make_job(i, mode, namespace) for i in range(4)]
    engine = oracle_engine(tiny_model_dir)
    expected = [run_job(engine, job) for job in jobs]
    got = [cluster.run_job(job, worker=i % 2) for i, job in enumerate(jobs)]
    assert [g["workers"] for g in got] == [["worker-0"], ["worker-1"], ["worker-0"], ["worker-1"]]
    for job, want, have in zip(jobs, expected, got):
        assert token_ids(have) == token_ids(want), job.id
        assert [t["reason"] for t in have["turns"]] == [t.reason for t in want.turns], job.id
    if mode == "kvcomm":
        assert [g["reuse_rate"] for g in got] == [w.reuse_rate for w in expected]
        assert got[3]["reuse_rate"] == 1.0


def test_a_judge_forced_dense_on_workers_is_dense_as_in_the_single_process_engine(cluster, tiny_model_dir) -> None:
    """`force_dense` in a job spec reaches the workers' engines: the star's decision agent prefills densely in
    every job (its reason says so) while the other agents learn to reuse, turn for turn as in process."""
    namespace = f"judge-{uuid.uuid4().hex[:8]}"
    jobs = []
    for i in range(3):
        job = make_job(i, "kvcomm", namespace, topology="star")
        judge = job.agents[-1]
        jobs.append(dataclasses.replace(job, agents=(*job.agents[:-1], dataclasses.replace(judge, force_dense=True))))
    engine = oracle_engine(tiny_model_dir)
    expected = [run_job(engine, job) for job in jobs]
    got = [cluster.run_job(job) for job in jobs]
    for job, want, have in zip(jobs, expected, got):
        assert token_ids(have) == token_ids(want), job.id
        assert [t["reason"] for t in have["turns"]] == [t.reason for t in want.turns], job.id
        assert have["turns"][-1]["reason"] == "forced_dense" and not have["turns"][-1]["reused"], job.id
    assert any(t["reused"] for t in got[-1]["turns"][:-1])          # the others reuse by the third job


def test_a_job_whose_input_no_prompt_can_hold_fails_at_its_input_naming_the_knob(cluster) -> None:
    """A task longer than the workers' memory plan admits in a prompt (within the model's context) fails before
    its base KV is computed, naming memory.max_prompt_tokens; the workers go on serving."""
    task = " ".join(["Tom has 3 apples."] * 400)                                   # ~2,400 tokens
    job = build_job("math", task, num_agents=3, mode="kvcomm", job_id="too-long-input", namespace="too-long",
                    generation=GenerationParams(max_new_tokens=NEW_TOKENS))
    with pytest.raises(Exception, match=rf"input content: \d+ tokens; this replica admits prompts of at most "
                                        rf"memory.max_prompt_tokens = {MAX_PROMPT_TOKENS}"):
        cluster.run_job(job, timeout_s=120)
    assert cluster.run_job(make_job(0, "dense", "too-long"), timeout_s=120)["turns"]


def test_stop_strings_cut_responses_on_workers_as_in_the_single_process_engine(cluster, tiny_model_dir) -> None:
    namespace = f"stop-{uuid.uuid4().hex[:8]}"
    engine = oracle_engine(tiny_model_dir)
    plain = run_job(engine, make_job(0, "dense", namespace))
    head = plain.turns[0].text
    stop = head[len(head) // 2: len(head) // 2 + 2]          # occurs mid-answer (random weights: any text)
    assert stop.strip(), head
    job = build_job("math", TASKS[0], num_agents=3, mode="dense", job_id="stop-job", namespace=namespace,
                    generation=GenerationParams(max_new_tokens=NEW_TOKENS, stop=(stop,)))
    want = run_job(engine, job)
    have = cluster.run_job(job)
    assert want.turns[0].text == head[:head.find(stop)]
    assert token_ids(have) == token_ids(want)
    assert [t["text"] for t in have["turns"]] == [t.text for t in want.turns]
    assert all(stop not in t["text"] for t in have["turns"])


def test_sampled_jobs_on_workers_equal_the_single_process_engine(cluster, tiny_model_dir) -> None:
    """Temperature and top-p with seeds: two jobs at once (star: their turns share both workers' decode batches)
    each equal their in-process runs draw for draw, since every sequence owns its seeded generator."""
    namespace = f"sampled-{uuid.uuid4().hex[:8]}"
    engine = oracle_engine(tiny_model_dir)
    jobs = [build_job("math", TASKS[12 + i], num_agents=3, mode="dense", job_id=f"sampled-{i}", namespace=namespace,
                      topology="star", decision=True,
                      generation=GenerationParams(max_new_tokens=NEW_TOKENS, temperature=0.9, top_p=0.9, seed=seed))
            for i, seed in enumerate((7, 8))]
    expected = [run_job(engine, job) for job in jobs]
    greedy = run_job(engine, build_job("math", TASKS[12], num_agents=3, mode="dense", namespace=namespace,
                                       topology="star", decision=True,
                                       generation=GenerationParams(max_new_tokens=NEW_TOKENS)))
    assert token_ids(expected[0]) != token_ids(greedy)          # the sampler really draws
    tickets = [cluster.submit(job) for job in jobs]
    got = [cluster.result(ticket) for ticket in tickets]
    for job, want, have in zip(jobs, expected, got):
        assert token_ids(have) == token_ids(want), job.id
    assert {w for g in got for w in g["workers"]} == {"worker-0", "worker-1"}


def test_anchor_recorded_on_one_worker_is_reused_on_the_other(cluster) -> None:
    namespace = f"handoff-{uuid.uuid4().hex[:8]}"
    for i in (4, 5):
        first = cluster.run_job(make_job(i, "kvcomm", namespace), worker=0)
        assert first["reuse_rate"] == 0.0                       # cold pool: dense prefill, anchors recorded
    fetched_before = worker_stats(cluster, 1)["pool"]["fetched_bytes"]
    result = cluster.run_job(make_job(6, "kvcomm", namespace), worker=1)
    assert result["workers"] == ["worker-1"]
    assert [t["reason"] for t in result["turns"]] == ["reused"] * 3
    assert worker_stats(cluster, 1)["pool"]["fetched_bytes"] > fetched_before   # worker 0's anchors, fetched


def test_sixteen_concurrent_jobs_on_one_worker_equal_sequential_runs(cluster) -> None:
    """Batched decode changes nothing in the answers; the speed of batching is `kvcomm bench throughput`'s to
    measure (a wall-clock comparison on a shared CPU is not a test), so this checks that batching happened."""
    namespace = f"batch-{uuid.uuid4().hex[:8]}"
    jobs = [make_job(i, "dense", namespace, job_id=f"batch{i}") for i in range(16)]
    sequential = [cluster.run_job(job, worker=0) for job in jobs]
    before = worker_stats(cluster, 0)["scheduler"]
    tickets = [cluster.submit(job, worker=0) for job in jobs]
    concurrent = [cluster.result(t) for t in tickets]
    after = worker_stats(cluster, 0)["scheduler"]
    for job, one, many in zip(jobs, sequential, concurrent):
        assert token_ids(many) == token_ids(one), job.id
    mean_batch = (after["step_sequences"] - before["step_sequences"]) / (after["steps"] - before["steps"])
    assert mean_batch > 4, f"turns of concurrent jobs were not batched (mean batch {mean_batch:.1f})"
    loads = cluster.loads()                         # typed `WorkerLoad`s; idle again once every job is done
    assert all(isinstance(load, WorkerLoad) for load in loads)
    assert [(load.orders, load.tokens, load.queued, load.active) for load in loads] == [(0, 0, 0, 0)] * 2
    assert loads[0].to_dict()["worker"] == loads[0].worker and loads[0].max_batch_size == 16


def test_routing_keeps_a_namespace_on_its_worker_and_spreads_new_ones(cluster) -> None:
    counts = cluster.inflight_per_worker()
    assert counts == [0, 0]
    namespace = f"route-{uuid.uuid4().hex[:8]}"
    [home] = cluster.run_job(make_job(7, "dense", namespace))["workers"]   # one at a time: every turn at home
    assert cluster.run_job(make_job(8, "dense", namespace))["workers"] == [home]
    tickets = [cluster.submit(make_job(i, "dense", f"spread-{uuid.uuid4().hex[:6]}-{i}", job_id=f"s{i}"))
               for i in range(4)]
    spread = {w for ticket in tickets for w in cluster.result(ticket)["workers"]}
    assert spread == {"worker-0", "worker-1"}                  # concurrent work goes to the least loaded worker
    results = list(cluster.run_jobs([make_job(i, "dense", namespace, job_id=f"r{i}") for i in range(3)]
                                    + [{"id": "broken", "task": "x", "agents": []}], concurrency=2))
    by_id = {r["id"] if "error" in r else r["job_id"]: r for r in results}
    assert "agents" in by_id["broken"]["error"] and {"r0", "r1", "r2"} <= set(by_id)
    assert cluster.inflight_per_worker() == [0, 0]              # every routed unit was released


def test_turns_go_to_the_worker_holding_their_contents_when_loads_tie(cluster) -> None:
    namespace = f"hold-{uuid.uuid4().hex[:8]}"
    assert cluster.choose_worker(namespace, holders=["worker-1", "worker-1", "worker-0"]) == 1
    assert cluster.choose_worker(namespace, holders=["worker-0"]) == 0
    assert cluster.choose_worker(namespace, holders=["worker-0"], exclude=[0]) == 1


def test_work_whose_worker_dies_is_rerun_on_another_worker(cluster) -> None:
    """Kill worker 0 mid-job: the job still completes on worker 1 with the answers of a fault-free run."""
    import ray
    from ray.exceptions import ActorUnavailableError
    job = build_job("math", TASKS[11], num_agents=3, mode="dense", job_id="survivor", namespace="die",
                    generation=GenerationParams(max_new_tokens=200, min_new_tokens=200))
    fault_free = cluster.run_job(job, worker=1)
    resubmitted = cluster.jobs_resubmitted
    ticket = cluster.submit(job, worker=0)
    ray.kill(cluster.workers[0], no_restart=False)    # worker 0 dies (Ray restarts it: worker_max_restarts=1)
    result = cluster.result(ticket)
    assert "worker-1" in result["workers"]
    assert token_ids(result) == token_ids(fault_free)
    assert cluster.jobs_resubmitted > resubmitted
    deadline = time.monotonic() + 120
    while True:                                       # back, with a fresh model (calls fail while it restarts)
        try:
            assert ray.get(cluster.workers[0].ping.remote(), timeout=120) == "worker-0"
            break
        except ActorUnavailableError:
            assert time.monotonic() < deadline, "worker 0 did not come back"
            time.sleep(0.5)


def test_lost_pool_costs_speed_never_answers_and_shutdown_leaves_nothing(ray_cluster, tiny_model_dir) -> None:
    """A second, one-worker runner: kill its pool actor mid-way; a kvcomm job still answers exactly like dense.
    Then shutdown: the worker, the pool and the placement group are gone and the CPUs are free again."""
    import ray
    from ray.exceptions import RayActorError
    from cluster.batch.runner import ClusterRunner
    free_before = ray.available_resources().get("CPU", 0)
    config = cluster_config(tiny_model_dir, num_workers=1, pool_call_timeout_s=5.0)
    runner = ClusterRunner(config).start()
    try:
        namespace = f"lost-{uuid.uuid4().hex[:8]}"
        dense = runner.run_job(make_job(9, "dense", namespace))
        runner.run_job(make_job(10, "kvcomm", namespace))
        ray.kill(runner.pool_actor)
        after_loss = runner.run_job(make_job(9, "kvcomm", namespace))
        assert token_ids(after_loss) == token_ids(dense)
        assert {t["reason"] for t in after_loss["turns"]} == {"new_anchor:cold_pool"}
        pool_stats = ray.get(runner.workers[0].stats.remote())["pool"]
        assert pool_stats["snapshots_failed"] + pool_stats["commits_dropped"] >= 1
        worker = runner.workers[0]
    finally:
        runner.shutdown()
    with pytest.raises(RayActorError):
        ray.get(worker.ping.remote(), timeout=30)
    with pytest.raises(ValueError):
        ray.get_actor(config.pool_actor_name, namespace=config.ray_namespace)
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < free_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == free_before


def test_throughput_benchmark_reports_batching_workers_and_transfer(ray_cluster, tiny_model_dir, tmp_path) -> None:
    from cluster.bench import throughput as bench_throughput
    base = cluster_config(tiny_model_dir, kvcomm={"gamma": GAMMA})
    report = bench_throughput.run(workers=(1, 2), jobs=6, model=tiny_model_dir, random_weights=True, agents=2,
                                  new_tokens=6, max_batch_size=8, transfer_tokens=(64,), transfer_repeats=2,
                                  reuse_jobs=4, reuse_warmup=2, config=base, modes=("dense", "kvcomm"),
                                  mode_warmup=2)
    settings = {(s["mode"], s["workers"], s["max_batch_size"]): s for s in report["settings"]}
    assert set(settings) == {("dense", 1, 1), ("dense", 1, 8), ("kvcomm", 1, 8), ("kvcomm", 1, 1), ("dense", 2, 8)}
    assert settings[("dense", 1, 1)]["mean_batch"] == 1.0 and settings[("dense", 1, 8)]["mean_batch"] > 1.5
    assert settings[("dense", 2, 8)]["used_workers"] == ["worker-0", "worker-1"]
    for s in settings.values():
        assert s["turns"] == 12 and s["decode_tok_per_s"] > 0
    assert settings[("kvcomm", 1, 1)]["reuse_rate"] > 0                 # warmed: the measured kvcomm jobs reuse
    assert settings[("dense", 1, 8)]["reuse_rate"] == 0
    [transfer] = report["transfer"]
    assert transfer["tokens"] == 64 and transfer["get_mb_per_s"] > 0
    assert report["reuse"]["reuse_rate"] == 1.0                      # gamma 1: the measured jobs all reuse
    assert 0 < report["ratios"]["transfer_share_of_reused_ttft"]
    assert {"batching_speedup", "batching_speedup_kvcomm"} <= set(report["ratios"])
    table = bench_throughput.markdown_table(report)
    assert "| dense | 2 | 8 |" in table and "continuous batching vs batch-1" in table and "kvcomm mode" in table
    png = bench_throughput.plot(report, str(tmp_path / "throughput.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
