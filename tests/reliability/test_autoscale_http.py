"""Serve's standard autoscaling on the worker deployment: up under load, down when it drops, and a scale-down in the
middle of a job reruns none of its finished turns; the anchor pool (outside every replica's placement group) lives
through it without a restart.

An app of its own on the session's Ray cluster: worker replicas autoscaled by Serve (``autoscaling_config`` in
the deployment options, as a Serve config file's ``deployments:`` gives it; each request is one turn, so
``target_ongoing_requests: 1`` asks for a replica per turn in flight), 1 to 2 replicas. Three long chain jobs start
together: the turns in flight scale the deployment up to two replicas and the turns of the first job land on
both. The other two jobs are then cancelled; the load drops and Serve removes a replica while the first job goes
on. The first job must finish without a ``retry`` (no turn sent twice: the KV its finished turns produced, owned
by the ingress, outlived the replica that computed it), with the in-process oracle's tokens, and with turns on the
replica that is gone.
"""
from __future__ import annotations

import uuid

import httpx

from kvcomm.config import KVCommConfig
from kvcomm.harness.jobs import GenerationParams, JobSpec
from kvcomm.harness.topologies import build_job
from kvcomm.job_runner import run_job
from kvcomm.engine import build_engine

from tests.support.serve_app import free_port

from .conftest import report


APP = "kvcomm-autoscale-test"
SCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0.0,
           "downscale_delay_s": 2.0, "metrics_interval_s": 0.5, "look_back_period_s": 1.0}


def chain_job(task: str, agents: int, tokens: int, job_id: str) -> dict:
    return build_job("math", task, num_agents=agents, topology="chain", mode="dense", job_id=job_id,
                     generation=GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)).to_dict()


def worker_replicas(ray) -> set[str]:
    return {"replica-" + a["name"].rsplit("#", 1)[1] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and f"{APP}#AgentWorkerDeployment#" in a["name"]}


def wait_for(predicate, timeout_s: float, what: str):
    import time
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_a_scale_down_mid_job_reruns_no_finished_turn(ray_cluster, tiny_model_dir) -> None:
    from ray import serve

    from cluster.serve.app import build_app, kill_service_actors
    from cluster.serve.config import ServeAppConfig
    ray = ray_cluster
    port = free_port()
    store = f"autoscale-store-{uuid.uuid4().hex[:6]}"
    config = ServeAppConfig.from_args({
        "cluster": {"model": tiny_model_dir, "random_weights": True, "cpus_per_worker": 0.5, "threads_per_worker": 1,
                    "pool_actor_name": f"autoscale-pool-{uuid.uuid4().hex[:8]}", "ray_namespace": "kvcomm-test"},
        "serve": {"served_model_name": "tiny", "route_slack_tokens": 0, "job_store_name": store,
                  "max_output_tokens": 4000}})
    # the first job is long enough (32 turns of 600 tokens) to outlast the scale-down on a quiet machine (at 20 it
    # once finished first)
    jobs = [chain_job(f"Question {i}: Ben has {i + 3} cards. How many cards?", 32 if i == 0 else 12, 600,
                      f"chain-{i}-{uuid.uuid4().hex[:4]}") for i in range(3)]
    expected = run_job(build_engine(tiny_model_dir, random_weights=True, config=KVCommConfig()),
                       JobSpec.from_dict(jobs[0]))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config, deployments={"AgentWorkerDeployment": {"autoscaling_config": SCALING}}),
              name=APP, route_prefix="/")
    handle = ray.get_actor(store, namespace="kvcomm-test")
    pool = ray.get_actor(config.cluster.pool_actor_name, namespace="kvcomm-test")
    pool_before = ray.get(pool.stats.remote())
    try:
        assert len(worker_replicas(ray)) == 1
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            ids = [http.post("/v1/jobs", json=job).json()["id"] for job in jobs]

            def first_job_workers() -> set[str]:
                record = ray.get(handle.get.remote(ids[0], True))
                return {data["worker"] for _, name, data in record["events"] if name == "turn"}

            both = wait_for(lambda: len(worker_replicas(ray)) == 2 and len(first_job_workers()) == 2 and
                            first_job_workers(), 120, "two replicas, both running turns of the first job")
            for job_id in ids[1:]:                   # the load drops to the first job's one turn at a time
                assert http.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
            survivors = wait_for(lambda: len(worker_replicas(ray)) == 1 and worker_replicas(ray), 120,
                                 "Serve to scale down to one replica")
            removed = both - survivors
            pool_after = ray.get(pool.stats.remote(), timeout=30)      # the pool outlived the scale-down ...
            assert ray.get(handle.get.remote(ids[0]))["status"] == "running"     # the scale-down came mid-job
            done = wait_for(lambda: (r := http.get(f"/v1/jobs/{ids[0]}").json())["status"] != "running" and r,
                            300, "the first job to finish")
        record = ray.get(handle.get.remote(ids[0], True))
    finally:
        serve.shutdown()
        kill_service_actors(config)
    assert done["status"] == "succeeded", done
    assert pool_after["epoch"] == pool_before["epoch"]                 # ... without a restart
    assert pool_before["placement_group"] is None                      # it lives in no replica's placement group
    names = [name for _, name, _ in record["events"]]
    assert "retry" not in names and names.count("turn") == len(expected.turns), names   # no turn ran twice
    result = done["result"]
    assert [t["token_ids"] for t in result["turns"]] == [t.token_ids for t in expected.turns]
    assert removed and removed <= set(result["workers"]), (removed, result["workers"])   # it had run turns
    report("autoscale_http", {"replicas_before": sorted(both), "removed": sorted(removed),
                              "turns_on_removed": sum(t["worker"] in removed for t in result["turns"]),
                              "turns": len(result["turns"])})
