"""A worker replica that dies mid-job costs the job one turn, sent again to a live replica; not a 502, and not
one finished turn run twice.

The package's Serve app (tests/reliability/conftest.py, one worker replica): a dense job is submitted in the
background and its events followed; at its first finished turn the replica's actor is killed. Serve starts a new
replica; the job's driver sends the lost turn there (``cluster.job_retries``, 1 by default), announcing it with an
``event: retry``; the turns already finished are not run again (their KV, owned by the ingress, outlived the
replica), and the job succeeds with exactly the tokens of its in-process sequential run. This module runs last in
the package (the app is back to one live replica afterwards).
"""
from __future__ import annotations

import json

import pytest

from kvcomm.harness.jobs import GenerationParams, JobSpec
from kvcomm.harness.topologies import build_job
from kvcomm.job_runner import run_job

from .conftest import App, report

pytestmark = [pytest.mark.ray, pytest.mark.reliability]


def _worker_replicas(ray) -> list[str]:
    return [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["namespace"] == "serve" and "AgentWorkerDeployment" in actor["name"]]


def test_a_job_whose_replica_dies_sends_only_the_lost_turn_to_a_live_replica(app: App, oracle, ray_cluster) -> None:
    ray = ray_cluster
    tokens = app.limits["max_output_tokens"]
    job = build_job("math", "Lena has 7 shells and finds 5 more. How many shells?", num_agents=4, rounds=2,
                    mode="dense", job_id="replica-loss",   # 8 turns: the kill lands long before the last
                    generation=GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)).to_dict()
    expected = run_job(oracle, JobSpec.from_dict(job))
    [replica] = _worker_replicas(ray)
    app.wait_idle()
    with app.client() as http:
        accepted = http.post("/v1/jobs", json=job)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        events, killed = [], False
        with http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=300) as stream:
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
        status = http.get(f"/v1/jobs/{job_id}").json()
    assert killed and names.count("retry") <= 1, names
    if "retry" in names:              # the kill caught a turn in flight (else it fell between two turns)
        retry = events[names.index("retry")][1]
        assert retry["scope"] == "turn" and "worker replica lost" in retry["reason"], retry
    assert names.count("turn") == len(expected.turns), names                   # each turn exactly once
    assert names[-1] == "done"
    done = events[-1][1]
    assert done["status"] == "succeeded" and status["status"] == "succeeded", (done, status)
    assert status["turns_done"] == len(expected.turns) and status["attempts"] == 1
    got = [(t["agent_id"], t["round"], t["token_ids"]) for t in done["result"]["turns"]]
    assert got == [(t.agent_id, t.round, t.token_ids) for t in expected.turns]
    first, last = done["result"]["turns"][0]["worker"], done["result"]["turns"][-1]["worker"]
    assert first == f"replica-{replica.rsplit('#', 1)[1]}" and last != first   # a new replica ran the rest
    assert _worker_replicas(ray) and replica not in _worker_replicas(ray)
    report("replica_loss_http", {"turns": len(expected.turns), "turn_resent": "retry" in names})
