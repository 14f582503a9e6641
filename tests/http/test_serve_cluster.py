"""The HTTP service as a cluster: a job's turns routed across two worker replicas, two stateless ingress replicas,
cancellation, and batch jobs (`kvcomm submit --url`) sharing the deployment with HTTP clients.

One Serve app for the module on the session's local Ray cluster: two worker replicas of tiny-llama with random
weights (half a CPU each), two ingress replicas, job leases of 2 s (a lost ingress replica's jobs are taken over
within seconds), and routing on load alone among replicas (``route_slack_tokens: 0``), so concurrent turns spread.
The in-process engine (`kvcomm.job_runner.run_job`) is the oracle: every job must equal it token for token.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import httpx
import pytest

from kvcomm.harness.jobs import GenerationParams, JobSpec
from kvcomm.harness.topologies import build_job
from kvcomm.job_runner import run_job

from tests.support.serve_app import running_app, tiny_app_args

APP = "kvcomm-cluster-test"
NAMESPACE = "kvcomm-test"


def job(task: str, mode: str, *, agents: int = 3, tokens: int = 4, job_id: str | None = None,
        namespace: str = "default", topology: str = "fully_connected") -> dict:
    return build_job("math", task, num_agents=agents, mode=mode, topology=topology, decision=topology == "star",
                     job_id=job_id or f"{mode}-{uuid.uuid4().hex[:6]}", namespace=namespace,
                     generation=GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)).to_dict()


def tokens_of(result: dict) -> list[tuple[str, int, list[int]]]:
    return [(t["agent_id"], t["round"], t["token_ids"]) for t in result["turns"]]


def expected_tokens(oracle_result) -> list[tuple[str, int, list[int]]]:
    return [(t.agent_id, t.round, t.token_ids) for t in oracle_result.turns]


def sse_events(text: str) -> list[tuple[int | None, str | None, dict]]:
    """(id, event name, data) per server-sent event; comments skipped."""
    events = []
    for block in text.split("\n\n"):
        number, name, data = None, None, None
        for line in block.split("\n"):
            if line.startswith("id: "):
                number = int(line[4:])
            elif line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
        if data is not None:
            events.append((number, name, data))
    return events


def wait_for(predicate, timeout_s: float, what: str, step_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def replica_actors(ray, deployment: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and f"{APP}#{deployment}#" in a["name"])


def replica_stats(ray) -> dict[str, dict]:
    """What each worker replica reports to the router (tokens and orders in flight), by replica id."""
    out = {}
    for name in replica_actors(ray, "AgentWorkerDeployment"):
        stats = ray.get(ray.get_actor(name, namespace="serve").record_routing_stats.remote(), timeout=30)
        out["replica-" + name.rsplit("#", 1)[1]] = stats
    return out


# ------------------------------------------------------------------------------------------------------------
# the routing policy (a pure function: no cluster)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("slack", [0, 100])
def test_routing_puts_load_first_then_kv_locality_then_the_namespace_home(slack) -> None:
    from cluster.serve.router import home_replica, rank_replicas
    nodes = {"a": "n1", "b": "n2", "c": "n2"}
    idle = {"a": 0.0, "b": 0.0, "c": 0.0}
    # idle replicas: the node holding most of the turn's KV wins, then the namespace's home among its replicas
    ranked = rank_replicas(idle, nodes, cost_bytes_by_node={"n2": 4000, "n1": 10}, namespace="ns",
                           slack_tokens=slack)
    assert set(ranked[:2]) == {"b", "c"}                  # the node holding the KV first
    home = home_replica("ns", ["a", "b", "c"])
    assert ranked[0] == (home if home in ("b", "c") else min("b", "c"))   # then the home, then the id
    # a busy replica loses to an idle one unless within the slack
    busy = {"a": 0.0, "b": 50.0, "c": 500.0}
    ranked = rank_replicas(busy, nodes, cost_bytes_by_node={"n2": 4000}, namespace="ns", slack_tokens=slack)
    assert ranked[0] == ("b" if slack >= 50 else "a") and ranked[-1] == "c"
    # no KV preference: the home replica, else the least loaded
    homes = {home_replica(f"ns{i}", ["a", "b", "c"]) for i in range(40)}
    assert homes == {"a", "b", "c"}                       # namespaces spread over the replicas
    for i in range(10):
        assert rank_replicas(idle, nodes, cost_bytes_by_node={}, namespace=f"ns{i}",
                             slack_tokens=slack)[0] == home_replica(f"ns{i}", ["a", "b", "c"])
    # a lost replica moves only the namespaces that were at home there
    moved = [i for i in range(40) if home_replica(f"ns{i}", ["a", "b"]) != home_replica(f"ns{i}", ["a", "b", "c"])]
    assert moved and all(home_replica(f"ns{i}", ["a", "b", "c"]) == "c" for i in moved)


def test_the_router_counts_a_turn_against_its_replica_as_soon_as_it_is_ranked() -> None:
    """Serve ranks a level's turns before the first acceptance comes back: each ranked turn's cost must already
    count, so 16 equal turns of one namespace alternate over two idle replicas instead of all going home; a
    completed turn gives its cost back."""
    import asyncio
    from types import SimpleNamespace

    from actors.turns import RoutingHint
    from ray.serve._private.common import DeploymentID
    from ray.serve.request_router import ReplicaID

    from cluster.serve.router import KVCommRouter

    router = KVCommRouter.__new__(KVCommRouter)         # the policy only: no Serve controller behind it
    router.initialize_state(slack_tokens=0)
    replicas = [SimpleNamespace(replica_id=ReplicaID(name, DeploymentID("w", "app")), node_id="n1", routing_stats={})
                for name in ("a", "b")]

    def pending(i: int) -> SimpleNamespace:
        order = SimpleNamespace(routing_hint=lambda: RoutingHint("ns", 100, {}))
        return SimpleNamespace(args=[order], metadata=SimpleNamespace(internal_request_id=f"r{i}"))

    async def rank_all() -> list[str]:
        return [(await router.choose_replicas(replicas, pending(i)))[0][0].replica_id.unique_id for i in range(16)]

    firsts = asyncio.run(rank_all())
    assert firsts.count("a") == firsts.count("b") == 8, firsts
    for i in range(16):
        router.on_request_completed(None, f"r{i}")
    assert router._sent_tokens == {}


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_model_dir, tmp_path_factory):
    from cluster.serve.config import ServeAppConfig
    store = f"test-job-store-{uuid.uuid4().hex[:6]}"
    args = tiny_app_args(tiny_model_dir, "cluster-test-pool", {
        "served_model_name": "tiny", "route_slack_tokens": 0, "job_lease_s": 2.0, "job_store_name": store,
        "max_output_tokens": 4000, "job_store_snapshot_path": str(tmp_path_factory.mktemp("store") / "jobs.msgpack")},
        namespace=NAMESPACE, num_workers=2)
    config = ServeAppConfig.from_args(args)
    with running_app(args, APP, deployments={"KVCommIngress": {"num_replicas": 2}}) as url:
        yield {"url": url, "config": config, "store": store}


def store_record(ray, app, job_id: str) -> dict:
    return ray.get(ray.get_actor(app["store"], namespace=NAMESPACE).get.remote(job_id, True), timeout=30)


# ------------------------------------------------------------------------------------------------------------
def test_sixteen_agent_jobs_run_turn_by_turn_on_both_replicas_with_the_oracles_tokens(app, oracle, ray_cluster
                                                                                     ) -> None:
    """A dense and a kvcomm 16-agent fully connected job at once, in two namespaces whose home replicas differ: each
    turn is routed on its own (each names its replica), the two jobs' turns use both replicas, and each job equals
    its in-process run. A fully connected job's turns run one after another (agent k reads agents 1..k-1), so its
    turns follow load, then the KV's node, then the namespace's home; a star's 16 workers form one level, sent at
    once, and load alone spreads them over both replicas."""
    from cluster.serve.router import home_replica

    replica_ids = [name.rsplit("#", 1)[1] for name in replica_actors(ray_cluster, "AgentWorkerDeployment")]
    assert len(replica_ids) == 2, replica_ids
    tag = uuid.uuid4().hex[:6]
    namespaces = {}                                         # home replica id -> a namespace at home there
    for i in range(200):
        namespaces.setdefault(home_replica(f"sixteen-{tag}-{i}", replica_ids), f"sixteen-{tag}-{i}")
    dense_ns, kvcomm_ns = (namespaces[rid] for rid in replica_ids)
    jobs = [job("Tom has 3 apples and buys 5 more. How many apples does Tom have?", "dense", agents=16,
                namespace=dense_ns),
            job("Tom has 3 apples and buys 5 more. How many apples does Tom have?", "kvcomm", agents=16,
                namespace=kvcomm_ns),
            job("Lena has 4 shells and finds 6 more. How many shells?", "dense", agents=16, topology="star",
                namespace=dense_ns)]
    expected = [run_job(oracle, JobSpec.from_dict(j)) for j in jobs]
    results: list = [None] * len(jobs)

    def post(index: int) -> None:
        with httpx.Client(base_url=app["url"], timeout=600) as http:
            results[index] = http.post("/v1/jobs", params={"wait": "true"}, json=jobs[index])

    for batch in ([0, 1], [2]):                             # the star alone: its level's spread is load's doing
        threads = [threading.Thread(target=post, args=(i,)) for i in batch]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    replicas = set()
    for response, want in zip(results, expected):
        assert response.status_code == 200, response.text
        result = response.json()["result"]
        assert tokens_of(result) == expected_tokens(want)
        assert [t["reason"] for t in result["turns"]] == [t.reason for t in want.turns]
        assert all(t["worker"].startswith("replica-") for t in result["turns"])
        assert result["workers"] == list(dict.fromkeys(t["worker"] for t in result["turns"]))
        replicas |= set(result["workers"])
    assert replicas == {f"replica-{rid}" for rid in replica_ids}   # the two jobs' turns used both replicas
    star_level = [t["worker"] for t in results[2].json()["result"]["turns"] if t["agent_id"] != "decision"]
    assert len(star_level) == 16 and len(set(star_level)) == 2, star_level   # one level, spread by load


def test_any_ingress_replica_serves_any_job_and_a_lost_one_loses_no_job(app, oracle, ray_cluster) -> None:
    """Kill the ingress replica driving a job: the other one takes it over (a ``retry`` event, attempt 2) and the
    job succeeds with the oracle's tokens; its events resume after ``Last-Event-ID``."""
    ray = ray_cluster
    spec = job("Ann has 4 pens and buys 9 more. How many pens?", "dense", agents=6, tokens=160)
    expected = run_job(oracle, JobSpec.from_dict(spec))
    with httpx.Client(base_url=app["url"], timeout=60) as http:
        accepted = http.post("/v1/jobs", json=spec)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        wait_for(lambda: store_record(ray, app, job_id)["turns_done"] >= 1, 120, "a first turn")
        driver = store_record(ray, app, job_id)["driver"]
        [victim] = [n for n in replica_actors(ray, "KVCommIngress") if n.endswith("#" + driver.split("-", 1)[1])]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        done = wait_for(lambda: (r := http.get(f"/v1/jobs/{job_id}")).status_code == 200
                        and r.json()["status"] == "succeeded" and r.json(), 180, "the job to finish elsewhere")
        assert done["attempts"] == 2
        assert tokens_of(done["result"]) == expected_tokens(expected)
        record = store_record(ray, app, job_id)
        assert record["driver"] != driver
        events = record["events"]
        assert [name for _, name, _ in events].count("retry") == 1
        resumed = sse_events(http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "2"}).text)
        for bad in ("two", "-1", "²"):            # "²".isdigit() is True; int("²") raised: a 500
            refused = http.get(f"/v1/jobs/{job_id}/events", params={"after": bad})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "Last-Event-ID", refused.text
    assert [n for n, _, _ in resumed[:-1]] == [number for number, _, _ in events if number > 2]
    assert resumed[-1][1] == "done" and resumed[-1][2]["status"] == "succeeded"


def test_a_restarted_job_store_gives_no_live_job_away(app, oracle, ray_cluster) -> None:
    """The job store dies mid-job and Ray restarts it from its snapshot: the job stays its driving replica's (a
    restored job is claimable only two leases after the restart, and its driver renews within a second), so it
    finishes there, attempt 1, no ``retry``, with the oracle's tokens; not rerun by whichever replica asked first."""
    ray = ray_cluster
    spec = job("Bo has 5 cards and gets 7 more. How many cards?", "dense", agents=6, tokens=160)
    expected = run_job(oracle, JobSpec.from_dict(spec))
    store = ray.get_actor(app["store"], namespace=NAMESPACE)
    with httpx.Client(base_url=app["url"], timeout=60) as http:
        accepted = http.post("/v1/jobs", json=spec)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        wait_for(lambda: store_record(ray, app, job_id)["turns_done"] >= 1, 120, "a first turn")
        saves = ray.get(store.stats.remote(), timeout=30)["saves"]
        wait_for(lambda: ray.get(store.stats.remote(), timeout=30)["saves"] > saves, 30, "a snapshot with the job")
        driver = store_record(ray, app, job_id)["driver"]
        ray.kill(store, no_restart=False)
        # the first to ask the restarted store (before the driver's next renewal) gets no live job
        assert ray.get(store.claim_orphans.remote("replica-first-to-ask", 2.0, 8), timeout=60) == []
        done = wait_for(lambda: (r := http.get(f"/v1/jobs/{job_id}")).status_code == 200
                        and r.json()["status"] == "succeeded" and r.json(), 180, "the job to finish")
    record = store_record(ray, app, job_id)
    assert done["attempts"] == 1 and record["driver"] == driver
    assert "retry" not in [name for _, name, _ in record["events"]]
    assert tokens_of(done["result"]) == expected_tokens(expected)


def test_an_orphan_whose_stored_spec_no_longer_reads_fails_and_holds_no_slot(app, ray_cluster) -> None:
    """A job left by a replica that stopped answering, whose stored spec this version cannot read (a replica of
    another version wrote it): the replica that claims it records it failed with the reason, and keeps no in-flight
    slot for it (it took one first and never gave it back, so every such orphan cost a slot for good)."""
    import ray
    store = ray.get_actor(app["store"], namespace=NAMESPACE)
    job_id = f"job-orphan-{uuid.uuid4().hex[:8]}"
    record = {"id": job_id, "owner": [None, "default"], "spec": {"id": "old", "agents": "not a list"},
              "spec_id": "old", "mode": "dense", "namespace": "default", "created_at": time.time()}
    ray.get(store.create.remote(record, "replica-that-stopped-answering", 0.0), timeout=30)
    failed = wait_for(lambda: (r := store_record(ray, app, job_id))["status"] == "failed" and r, 60, "the orphan taken")
    assert failed["error"]["status"] == 400 and "agents" in failed["error"]["message"], failed["error"]
    for _ in range(12):          # either ingress replica may have claimed it: each answers some of these
        lines = [line for line in httpx.get(f"{app['url']}/metrics", timeout=30).text.splitlines()
                 if line.startswith("kvcomm_queue_length")]
        assert lines and all(float(line.split()[-1]) == 0 for line in lines), lines   # no slot kept


def test_a_cancelled_job_stops_its_turns_and_commits_nothing(app, ray_cluster) -> None:
    ray = ray_cluster
    namespace = f"cancel-{uuid.uuid4().hex[:6]}"
    spec = job("Lena has 7 shells. How many shells?", "kvcomm", agents=1, tokens=3500, namespace=namespace)
    with httpx.Client(base_url=app["url"], timeout=60) as http:
        job_id = http.post("/v1/jobs", json=spec).json()["id"]
        wait_for(lambda: sum(s["orders"] for s in replica_stats(ray).values()) >= 1, 60, "a turn in flight")
        time.sleep(0.3)                                            # it is decoding its 3500 tokens
        cancelled = http.delete(f"/v1/jobs/{job_id}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
        started = time.monotonic()
        wait_for(lambda: sum(s["orders"] for s in replica_stats(ray).values()) == 0, 30, "the turn to stop")
        stopped_s = time.monotonic() - started
        status = http.get(f"/v1/jobs/{job_id}").json()
        again = http.delete(f"/v1/jobs/{job_id}")
    assert status["status"] == "cancelled" and status["turns_done"] == 0
    assert again.status_code == 200 and again.json()["status"] == "cancelled"      # idempotent
    assert stopped_s < 2, stopped_s                    # sooner than 3500 tokens would take
    pool = ray.get(ray.get_actor(app["config"].cluster.pool_actor_name, namespace=NAMESPACE).stats.remote())
    assert namespace not in pool.get("namespaces", {}), pool["namespaces"].keys()   # nothing committed


@pytest.mark.parametrize("how", ["wait", "stream"])
def test_a_client_that_goes_away_cancels_its_job(app, ray_cluster, how) -> None:
    """The client leaves only once its job is stored and running (no race with a loaded machine): a ``?wait=true``
    client closes its socket, a streaming one leaves after the ``job`` event; the job must end ``cancelled``, not
    decode its 24,000 tokens to the end (16 agents in a chain, 1,500 each, the tiny model's context holding one
    answer and the next). Alone the job is cancelled within 0.2 s of its start, before any turn ends; a job of 3,800
    tokens and then one of 9,000 finished first on a machine loaded with other work (3.4 s, 7.7 s)."""
    ray = ray_cluster
    spec = job("Sam has 2 kites. How many kites?", "dense", agents=16, tokens=1500, topology="chain")
    with httpx.Client(base_url=app["url"], timeout=60) as http:
        if how == "wait":
            body = json.dumps(spec).encode()
            host, port = app["url"].removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=30) as client:
                client.sendall(f"POST /v1/jobs?wait=true HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                               f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
                ids = wait_for(lambda: _jobs_of(ray, app, spec["id"]), 120, "the job record")
            # the socket is closed here, while the job runs
        else:
            with http.stream("POST", "/v1/jobs", params={"stream": "true"}, json=spec) as stream:
                assert stream.status_code == 200
                lines = stream.iter_lines()
                assert next(lines) == "event: job"         # the job, at once; then the client leaves
                assert json.loads(next(lines)[len("data: "):])["status"] == "running"
            ids = wait_for(lambda: _jobs_of(ray, app, spec["id"]), 120, "the job record")
        status = wait_for(lambda: (s := http.get(f"/v1/jobs/{ids[0]}").json())["status"] != "running" and s,
                          120, "the job to end")
    assert status["status"] == "cancelled", json.dumps(status)[:3000]


def _jobs_of(ray, app, spec_id: str) -> list[str]:
    """Ids of the stored jobs submitted with this spec id (a client that went away never saw its job's id)."""
    store = ray.get_actor(app["store"], namespace=NAMESPACE)
    found = ray.get(store.find.remote(spec_id), timeout=30)
    return found


def test_batch_jobs_from_kvcomm_submit_share_the_fleet_and_the_pool_with_http_clients(app, tmp_path) -> None:
    """`kvcomm submit --url` teaches the deployment's pool; an HTTP client's later jobs in the same namespace reuse
    what the batch learned."""
    from cluster.batch.submit import main
    namespace = f"shared-{uuid.uuid4().hex[:6]}"
    tasks = [f"A farm has {a} cows and buys {b} more. How many cows?" for a, b in [(3, 4), (5, 2), (6, 1), (2, 8)]]
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("".join(json.dumps(job(t, "kvcomm", namespace=namespace, job_id=f"batch-{i}")) + "\n"
                                 for i, t in enumerate(tasks)))
    out = tmp_path / "results.jsonl"
    assert main([str(jobs_file), "--out", str(out), "--url", app["url"], "--concurrency", "1", "--no-progress"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == [f"batch-{i}" for i in range(4)]
    assert all(r["workers"] and r["turns"] for r in records)
    with httpx.Client(base_url=app["url"], timeout=300) as http:
        response = http.post("/v1/jobs", params={"wait": "true"},
                             json=job("A farm has 7 cows and buys 3 more. How many cows?", "kvcomm",
                                      namespace=namespace))
    assert response.status_code == 200, response.text
    assert response.json()["result"]["reuse_rate"] > 0     # anchors the batch recorded, reused over HTTP
