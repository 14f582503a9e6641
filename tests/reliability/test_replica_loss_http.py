"""A worker replica that dies mid-job costs the job at most one turn, sent again to a live replica; not a 502,
not one finished turn run twice, and not a second commit of the job's anchors.

The package's Serve app (tests/reliability/conftest.py, one worker replica): two kvcomm jobs teach a fresh anchor
namespace, then a third is submitted in the background and its events followed; at its first finished turn the
replica's actor is killed. Serve starts a new replica; when the kill caught a turn in flight, the job's driver
sends that turn there (``cluster.job_retries``, 1 by default), announcing it with an ``event: retry``; the turns
already finished are not run again (their KV, owned by the ingress, outlived the replica), and the job succeeds
with exactly the turns of the in-process oracle's run of the same three jobs (tokens, gate reasons, reuse). The
pool actor, outside any replica, takes exactly one commit for the job and ends with the oracle's anchors. This
module runs last in the package (the app is back to one live replica afterwards).
"""
from __future__ import annotations

import json

from kvcomm.harness.jobs import GenerationParams, JobSpec
from kvcomm.harness.topologies import build_job
from kvcomm.job_runner import run_job

from .conftest import App, report


def _worker_replicas(ray) -> list[str]:
    return [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["namespace"] == "serve" and "AgentWorkerDeployment" in actor["name"]]


def test_a_kvcomm_job_whose_replica_dies_sends_only_the_lost_turn_and_commits_once(app: App, app_args, oracle,
                                                                                   ray_cluster) -> None:
    import uuid
    ray = ray_cluster
    tokens = app.limits["max_output_tokens"]
    header = {"X-KVCOMM-Namespace": f"loss-{uuid.uuid4().hex[:6]}"}
    jobs = [build_job("math", f"Lena has {a} shells and finds {b} more. How many shells?", num_agents=4, rounds=2,
                      mode="kvcomm", job_id=f"replica-loss-{i}",   # 8 turns: the kill lands long before the last
                      generation=GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)).to_dict()
            for i, (a, b) in enumerate([(7, 5), (4, 6), (8, 3)])]
    oracle_namespace = f"oracle-{uuid.uuid4().hex[:8]}"
    expected = [run_job(oracle, JobSpec.from_dict({**job, "namespace": oracle_namespace})) for job in jobs[:2]]
    version = oracle.pool.stats()["version"]
    expected.append(run_job(oracle, JobSpec.from_dict({**jobs[2], "namespace": oracle_namespace})))
    oracle_commits = oracle.pool.stats()["version"] - version
    assert any(t.reused for t in expected[2].turns)             # the killed job reads the anchors of the first two
    pool = ray.get_actor(app_args["cluster"]["pool_actor_name"], namespace=app_args["cluster"]["ray_namespace"])
    [replica] = _worker_replicas(ray)
    app.wait_idle()
    with app.client() as http:
        for job, want in zip(jobs[:2], expected):
            taught = http.post("/v1/jobs", params={"wait": "true"}, json=job, headers=header)
            assert taught.status_code == 200, taught.text
            assert _facts(taught.json()["result"]["turns"]) == _oracle_facts(want), job["id"]
        commits = ray.get(pool.stats.remote(), timeout=30)["commits"]
        accepted = http.post("/v1/jobs", json=jobs[2], headers=header)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        events, killed = [], False
        with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=header, timeout=300) as stream:
            name = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    name = line[len("event: "):]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[len("data: "):])))
                    if name == "turn" and not killed:      # mid-job: the replica's actor dies
                        ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
                        killed = True
        names = [name for name, _ in events]
        status = http.get(f"/v1/jobs/{job_id}", headers=header).json()
    pool_stats = ray.get(pool.stats.remote(), timeout=30)
    assert killed and names.count("retry") <= 1, names
    if "retry" in names:              # the kill caught a turn in flight (else it fell between two turns)
        retry = events[names.index("retry")][1]
        assert retry["scope"] == "turn" and "worker replica lost" in retry["reason"], retry
    assert names.count("turn") == len(expected[2].turns), names                # each turn exactly once
    assert names[-1] == "done"
    done = events[-1][1]
    assert done["status"] == "succeeded" and status["status"] == "succeeded", (done, status)
    assert status["turns_done"] == len(expected[2].turns) and status["attempts"] == 1
    assert _facts(done["result"]["turns"]) == _oracle_facts(expected[2])
    first, last = done["result"]["turns"][0]["worker"], done["result"]["turns"][-1]["worker"]
    assert first == f"replica-{replica.rsplit('#', 1)[1]}" and last != first   # a new replica ran the rest
    assert _worker_replicas(ray) and replica not in _worker_replicas(ray)
    # the job's anchors went to the pool once, and the pool holds what the oracle's holds
    assert pool_stats["commits"] - commits == oracle_commits == 1, (pool_stats["commits"], commits)
    served = {ph: entry["anchors"] for ph, entry in pool_stats["namespaces"][status["namespace"]].items()}
    assert served == {ph: entry["anchors"] for ph, entry in oracle.pool.stats()["namespaces"][oracle_namespace].items()}
    report("replica_loss_http", {"turns": len(expected[2].turns), "turn_resent": "retry" in names,
                                 "reused_turns": sum(t.reused for t in expected[2].turns)})


def _facts(turns: list[dict]) -> list[tuple]:
    return [(t["agent_id"], t["round"], t["token_ids"], t["reason"], t["reused"]) for t in turns]


def _oracle_facts(result) -> list[tuple]:
    return [(t.agent_id, t.round, t.token_ids, t.reason, t.reused) for t in result.turns]
