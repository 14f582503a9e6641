"""Drills on a Ray cluster of several simulated nodes (`cluster.bench.simcluster`), each run in a process of its own
by tests/multinode/test_multinode.py (this test session's own local Ray cluster cannot share a process with another
cluster). A drill asserts what it checks and prints one ``RESULT {json}`` line with its figures.

    python tests/support/multinode_drills.py DRILL MODEL_DIR WORKDIR
"""
from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kvcomm.config import KVCommConfig  # noqa: E402
from kvcomm.harness.jobs import GenerationParams  # noqa: E402
from kvcomm.harness.topologies import build_job  # noqa: E402
from kvcomm.job_runner import run_job  # noqa: E402
from kvcomm.engine import build_engine  # noqa: E402

from cluster.bench.simcluster import SimulatedCluster, actor_node  # noqa: E402
from cluster.config import ClusterConfig  # noqa: E402
from tests.support.serve_app import free_port  # noqa: E402

NAMESPACE = "kvcomm-multinode"
TASKS = [f"Tom has {a} apples and buys {b} more. How many apples does Tom have?"
         for a, b in [(3, 5), (4, 2), (6, 1), (2, 7), (5, 5), (8, 1), (1, 9), (7, 2), (9, 3), (2, 2), (3, 3), (4, 4),
                      (6, 6), (7, 7), (8, 8), (9, 9), (5, 3), (6, 2), (2, 9), (8, 4)]]


def job(index: int, mode: str, *, tokens: int = 6, namespace: str = "multinode", topology: str = "star"):
    return build_job("math", TASKS[index], num_agents=3, mode=mode, job_id=f"{mode}-{index}-{uuid.uuid4().hex[:4]}",
                     namespace=namespace, topology=topology, decision=topology == "star",
                     generation=GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens))


def tokens_of(result) -> list[list[int]]:
    turns = result["turns"] if isinstance(result, dict) else [t.to_dict() for t in result.turns]
    return [t["token_ids"] for t in turns]


def config(model_dir: str, **changes) -> ClusterConfig:
    base = dict(model=model_dir, random_weights=True, device="cpu", simulate_gpus=True, gpus_per_worker=1,
                cpus_per_worker=0.5, threads_per_worker=1, num_workers=2, max_batch_size=16,
                pool_actor_name=f"multinode-pool-{uuid.uuid4().hex[:6]}", ray_namespace=NAMESPACE,
                worker_max_restarts=-1, kvcomm={"gamma": 1.0})
    base.update(changes)
    return ClusterConfig(**base)


# ------------------------------------------------------------------------------------------------------------
def drill_spread(model_dir: str, workdir: Path) -> dict:
    """Jobs from `kvcomm submit` (worker actors, SPREAD) and over HTTP (Serve replicas) run on two nodes, with the
    oracle's tokens. Each node has one (fake) GPU, so two GPU-shaped replicas cannot share a node."""
    import ray
    oracle = build_engine(model_dir, random_weights=True, config=KVCommConfig(gamma=1.0))
    jobs = [job(i, "dense") for i in range(4)]
    expected = {j.id: tokens_of(run_job(oracle, j)) for j in jobs}
    out: dict = {}
    with SimulatedCluster(worker_nodes=2, gpus_per_node=1):
        # kvcomm submit, joining the cluster this process is connected to
        from cluster.batch.submit import main as submit
        cfg_path = workdir / "cluster.yaml"
        cfg_path.write_text(yaml.safe_dump(json.loads(config(model_dir, placement_strategy="SPREAD")
                                                      .model_dump_json())))
        jobs_path = workdir / "jobs.jsonl"
        jobs_path.write_text("".join(json.dumps(j.to_dict()) + "\n" for j in jobs))
        results_path = workdir / "results.jsonl"
        assert submit([str(jobs_path), "--out", str(results_path), "--config", str(cfg_path), "--no-progress"]) == 0
        records = [json.loads(line) for line in results_path.read_text().splitlines()]
        assert {r["id"]: tokens_of(r) for r in records} == expected
        used = {w for r in records for w in r["workers"]}
        assert used == {"worker-0", "worker-1"}, used
        out["submit_workers"] = sorted(used)

        # over HTTP: a worker replica per node (one GPU each), every turn routed on its own
        import httpx
        from ray import serve

        from cluster.serve.app import build_app, kill_service_actors
        from cluster.serve.config import ServeAppConfig
        app = ServeAppConfig.from_args({"cluster": json.loads(config(model_dir).model_dump_json()),
                                        "serve": {"served_model_name": "tiny"}})
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(app), name="multinode", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        answers = {}

        def post(spec):
            with httpx.Client(base_url=url, timeout=300) as http:
                answers[spec.id] = http.post("/v1/jobs", params={"wait": "true"}, json=spec.to_dict()).json()

        threads = [threading.Thread(target=post, args=(j,)) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert {k: tokens_of(v["result"]) for k, v in answers.items()} == expected
        replicas = {t["worker"] for v in answers.values() for t in v["result"]["turns"]}
        nodes = {a["name"]: actor_node(ray.get_actor(a["name"], namespace="serve"))
                 for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == "serve" and "#AgentWorkerDeployment#" in a["name"]}
        used_nodes = {node for name, node in nodes.items() if "replica-" + name.rsplit("#", 1)[1] in replicas}
        assert len(used_nodes) == 2, (replicas, nodes)
        out["http_nodes"] = len(used_nodes)
        serve.shutdown()
        kill_service_actors(app)
    return out


# ------------------------------------------------------------------------------------------------------------
def drill_node_lost(model_dir: str, workdir: Path) -> dict:
    """A node holding the anchor pool and two workers is lost without warning while 16 dense jobs run: every job
    completes with the oracle's tokens (lost outputs are made again from the driver's record, lost workers'
    turns go to live ones); the pool restarts on a surviving node from its snapshot, and reuse comes back."""
    import ray

    from actors.anchor_pool_actor import POOL_MAX_CONCURRENCY, AnchorPoolActor
    from cluster.batch.runner import ClusterRunner
    oracle = build_engine(model_dir, random_weights=True, config=KVCommConfig(gamma=1.0))
    dense = [job(i, "dense", tokens=160, topology="star" if i % 2 else "fully_connected") for i in range(16)]
    # (a star's two level-0 agents read the question at once: a lost input is missed by both)
    expected = {j.id: tokens_of(run_job(oracle, j)) for j in dense}
    cfg = config(model_dir, num_workers=4, placement_strategy="PACK", job_retries=16,
                 pool_snapshot_path=str(workdir / "pool.msgpack"), pool_snapshot_every_commits=1)
    out: dict = {}
    with SimulatedCluster(worker_nodes=0) as sim:
        # the pool asks for a resource that only the node to be lost and, later, a spare node have (test placement)
        doomed, _ = sim.add(resources={"pool_home": 1}), sim.add()
        pool = ray.remote(AnchorPoolActor).options(
            name=cfg.pool_actor_name, namespace=cfg.ray_namespace, num_cpus=0, resources={"pool_home": 0.01},
            max_restarts=-1, max_concurrency=POOL_MAX_CONCURRENCY).remote(cfg.pool_spec())
        assert actor_node(pool) == doomed.node_id
        with ClusterRunner(cfg) as runner:
            worker_nodes = [actor_node(w) for w in runner.workers]
            assert worker_nodes.count(doomed.node_id) == 2, worker_nodes       # PACK: two workers per node
            spare = sim.add(resources={"pool_home": 1})                         # room for them to come back
            namespace = f"lost-{uuid.uuid4().hex[:6]}"
            for i in range(16, 20):                                             # anchors, saved in the snapshot
                runner.run_job(job(i, "kvcomm", namespace=namespace, tokens=6))
            ray.get(pool.save_snapshot.remote())
            tickets = [runner.submit(j) for j in dense]
            doomed_workers = {f"worker-{i}" for i, node in enumerate(worker_nodes) if node == doomed.node_id}
            deadline = time.monotonic() + 300
            while not any(r.worker in doomed_workers for t in tickets for r in t.dag.records[:2]):
                assert time.monotonic() < deadline, "no turn finished on the node to be lost"
                time.sleep(0.05)                          # until outputs that later turns read sit on that node
            started = time.monotonic()
            sim.remove(doomed, graceful=False)
            lost_while_running = sum(not t.future.done() for t in tickets)
            results = {t.job_id: runner.result(t, timeout_s=600) for t in tickets}
            recovered_s = time.monotonic() - started
            assert {k: tokens_of(v) for k, v in results.items()} == expected
            assert actor_node(runner.pool_actor) == spare.node_id               # restarted on the spare node
            after = [runner.run_job(job(i, "kvcomm", namespace=namespace, tokens=6)) for i in (0, 1)]
            reuse = sum(r["reuse_rate"] for r in after) / len(after)
            assert reuse > 0, [r["turns"] for r in after]                       # the snapshot's anchors serve
            assert lost_while_running > 0                                       # the loss hit running jobs
            remade = sum(t.dag.reruns for t in tickets)
            assert remade > 0                                    # lost outputs were made again from the record
            out.update(jobs=len(results), running_at_loss=lost_while_running, recovered_s=round(recovered_s, 1),
                       reuse_after=reuse, turns_resent=runner.jobs_resubmitted, outputs_made_again=remade)
    return out


# ------------------------------------------------------------------------------------------------------------
def drill_store_per_node(model_dir: str, workdir: Path) -> dict:
    """The pool's byte budget is checked against each node's object store, not their sum."""
    import ray

    from cluster.placement import pool_store_problem
    with SimulatedCluster(worker_nodes=2, object_store_mb=96) as sim:
        sim.add(object_store_memory=300 << 20)
        nodes = ray.nodes()
        total = sum(n["Resources"].get("object_store_memory", 0) for n in nodes if n["Alive"])
        budget = 200 << 20                                   # below the sum of the stores, above the smallest
        assert budget < total
        problem = pool_store_problem(budget, nodes)
        assert problem is not None and "pool_byte_budget" in problem, problem
        assert pool_store_problem(64 << 20, nodes) is None
    return {"budget_mb": budget >> 20, "sum_mb": int(total) >> 20, "problem": problem}


DRILLS = {"spread": drill_spread, "node_lost": drill_node_lost, "store_per_node": drill_store_per_node}

if __name__ == "__main__":
    name, model_dir, workdir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    result = DRILLS[name](model_dir, workdir)
    print("RESULT " + json.dumps(result), flush=True)
