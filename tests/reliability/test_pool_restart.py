"""The anchor-pool actor with snapshots on, on the session's Ray cluster: killed, restarted by Ray, it comes back
with the anchors it saved (same ids, same part keys, same tensor bytes) and kvcomm jobs reuse them at once.

A one-worker `ClusterRunner` (tiny-llama, random weights, embedded tokenizer) with ``pool_snapshot_path`` set and
``pool_snapshot_every_commits: 1``. Without the snapshot a restarted pool is empty and the same job would go dense
(``new_anchor:cold_pool``, see tests/ray/test_cluster.py).
"""
from __future__ import annotations

import time
import uuid

import numpy as np

from kvcomm.harness.jobs import GenerationParams
from kvcomm.harness.topologies import build_job

from cluster.config import ClusterConfig

TASKS = [f"Tom has {a} apples and buys {b} more. How many apples does Tom have?" for a, b in [(3, 5), (4, 2), (6, 1)]]


def make_job(index: int, namespace: str):
    return build_job("math", TASKS[index], num_agents=3, mode="kvcomm", job_id=f"snap-{index}", namespace=namespace,
                     generation=GenerationParams(max_new_tokens=8, min_new_tokens=8))


def pool_contents(pool, namespace: str) -> dict:
    """anchor id -> (metadata, {part name: (part key, {tensor name: (dtype, shape, bytes)})}), fetched from the
    pool actor's own objects."""
    import ray
    wire = ray.get(pool.snapshot.remote(namespace), timeout=60)
    out = {}
    for entries in wire["lists"].values():
        for entry in entries:
            parts = entry["parts"]
            named = {"base": parts["base"], **{f"deltas/{c}": p for c, p in parts["deltas"].items()},
                     **{f"rbk/{c}": p for c, p in parts["rbk"].items()}}
            arrays = ray.get([p.ref for p in named.values()], timeout=60)
            out[entry["metadata"]["anchor_id"]] = (entry["metadata"], {
                name: (p.key, {k: (a.dtype.str, a.shape, np.ascontiguousarray(a).tobytes()) for k, a in got.items()})
                for (name, p), got in zip(named.items(), arrays)})
    return out, wire["epoch"]


def test_a_killed_pool_comes_back_with_its_saved_anchors_and_jobs_reuse_them(ray_cluster, tiny_model_dir,
                                                                              tmp_path) -> None:
    import ray
    from cluster.batch.runner import ClusterRunner
    path = tmp_path / "pool.snapshot"
    config = ClusterConfig(model=tiny_model_dir, random_weights=True, num_workers=1, cpus_per_worker=0.5,
                           threads_per_worker=1, pool_actor_name=f"snap-pool-{uuid.uuid4().hex[:8]}",
                           ray_namespace="kvcomm-test", pool_snapshot_path=str(path), pool_snapshot_every_commits=1,
                           pool_retry_after_s=0.5, kvcomm={"gamma": 1.0})
    namespace = f"snap-{uuid.uuid4().hex[:8]}"
    with ClusterRunner(config) as runner:
        pool = runner.pool_actor
        for i in (0, 1):                              # cold pool: dense prefills record anchors
            assert runner.run_job(make_job(i, namespace))["reuse_rate"] == 0.0
        deadline = time.monotonic() + 60
        while True:                                   # the saver thread writes after each commit
            stats = ray.get(pool.stats.remote(), timeout=30)
            if stats["snapshot"]["saved_version"] == stats["version"]:
                break
            assert time.monotonic() < deadline, stats["snapshot"]
            time.sleep(0.1)
        assert stats["snapshot"]["loaded"] == {"loaded": False, "reason": "no snapshot file"}
        before, epoch = pool_contents(pool, namespace)
        assert len(before) >= 2 and path.stat().st_size == stats["snapshot"]["last_save"]["bytes"]

        ray.kill(pool, no_restart=False)              # the process dies; Ray restarts it (max_restarts=-1)
        deadline = time.monotonic() + 120
        while True:
            try:
                restarted = ray.get(pool.stats.remote(), timeout=30)
                if restarted["epoch"] != epoch:
                    break
            except Exception:  # noqa: BLE001 - unavailable while it restarts
                pass
            assert time.monotonic() < deadline, "the pool actor did not come back"
            time.sleep(0.2)
        loaded = restarted["snapshot"]["loaded"]
        assert loaded["loaded"] and loaded["anchors"] == len(before) and loaded["version"] == stats["version"]
        after, _ = pool_contents(pool, namespace)
        assert after == before                        # same ids, metadata, part keys and tensor bytes

        result = runner.run_job(make_job(2, namespace))
        assert [t["reason"] for t in result["turns"]] == ["reused"] * 3
        print(f"\n[reliability] pool snapshot: {len(before)} anchors, {path.stat().st_size / 1e3:.0f} kB, "
              f"saved in {stats['snapshot']['last_save']['seconds'] * 1e3:.1f} ms, "
              f"loaded in {loaded['seconds'] * 1e3:.1f} ms")
