"""Tenant isolation over HTTP: one API key cannot read, or learn of, another key's jobs; keys never reach the logs;
concurrent kvcomm jobs in separate anchor namespaces each equal their own in-process oracle.

tests/http/test_serve.py already checks that ``GET /v1/jobs/{id}`` is 404 for another key or another namespace header;
this adds the events stream, that the 404 for someone else's job is the very answer an unknown id gets (ids do not
leak existence), that the same namespace name under two keys is two anchor namespaces, and that neither key appears
in any log file of the Ray session (Serve's proxy and replica logs, the workers' stdout/stderr) after this package's
traffic (the fuzz test, run before this module, sends the keys in every header shape it can think of).
"""
from __future__ import annotations

import time
from pathlib import Path

from .conftest import App, math_job


UNKNOWN_ID = "job-0123456789abcdef"


def _error_for(response, job_id: str) -> dict:
    assert response.status_code == 404, response.text
    error = dict(response.json()["error"])
    error["message"] = error["message"].replace(job_id, "<id>")
    return error


def test_one_key_cannot_read_or_detect_another_keys_job_or_its_events(app: App) -> None:
    app.wait_idle()
    namespace = {"X-KVCOMM-Namespace": "shared-name"}
    with app.client() as mine, app.client(app.other_key) as theirs:
        submitted = mine.post("/v1/jobs", params={"wait": "true"}, json=math_job("Ann has 2 cats. How many cats?"),
                              headers=namespace)
        assert submitted.status_code == 200 and submitted.json()["status"] == "succeeded", submitted.text
        job_id = submitted.json()["id"]
        for suffix in ("", "/events"):
            own = mine.get(f"/v1/jobs/{job_id}{suffix}", headers=namespace)
            assert own.status_code == 200
            for headers in (namespace, {}, {"X-KVCOMM-Namespace": "other-name"}):
                foreign = theirs.get(f"/v1/jobs/{job_id}{suffix}", headers=headers)
                unknown = theirs.get(f"/v1/jobs/{UNKNOWN_ID}{suffix}", headers=headers)
                assert _error_for(foreign, job_id) == _error_for(unknown, UNKNOWN_ID)   # nothing tells them apart
                assert "events" not in foreign.text and "result" not in foreign.json()
            # the right key with the wrong namespace header is someone else too
            assert mine.get(f"/v1/jobs/{job_id}{suffix}").status_code == 404
        # the same namespace name under the other key is another anchor namespace
        their_job = theirs.post("/v1/jobs", json=math_job("Bo has 1 dog. How many dogs?", job_id="theirs"),
                                headers=namespace)
        assert their_job.status_code == 202
        mine_ns, theirs_ns = submitted.json()["namespace"], their_job.json()["namespace"]
        assert mine_ns.endswith(".shared-name") and theirs_ns.endswith(".shared-name") and mine_ns != theirs_ns
        assert mine.get(f"/v1/jobs/{their_job.json()['id']}", headers=namespace).status_code == 404
    app.wait_idle()


def test_api_keys_never_appear_in_logs_or_error_bodies(app: App, ray_cluster) -> None:
    with app.client() as mine:
        for header in (f"Basic {app.key}", app.key, f"Bearer {app.key}x", f"Token {app.other_key}"):
            wrong = mine.get("/v1/models", headers={"Authorization": header})
            assert wrong.status_code == 401 and app.key not in wrong.text and app.other_key not in wrong.text
        bad = mine.post("/v1/jobs", content=b'{"agents": [', headers={"content-type": "application/json"})
        assert bad.status_code == 400 and app.key not in bad.text
    time.sleep(1.0)                                         # let the replicas' log handlers write
    logs = Path(ray_cluster._private.worker._global_node.get_logs_dir_path())
    files = [path for path in logs.rglob("*") if path.is_file()]
    serve_logs = [path for path in files if "serve" in path.parts]
    assert any(b"/v1/models" in path.read_bytes() for path in serve_logs), \
        f"no Serve access log under {logs}: the check below would be vacuous"
    leaks = [str(path) for path in files
             if any(key.encode() in path.read_bytes() for key in (app.key, app.other_key))]
    assert not leaks, f"an API key appears in {leaks}"


def test_concurrent_kvcomm_jobs_in_separate_namespaces_each_equal_their_own_oracle(app: App, oracle) -> None:
    """Three streams of kvcomm jobs at once (two keys sending the same namespace header, and another namespace),
    each stream's jobs one after another. Each must equal its own in-process run in a namespace of its own: an
    anchor leaking between namespaces would change a gate decision (a reason, a reuse) or the tokens."""
    import threading
    import uuid

    from kvcomm.harness.jobs import JobSpec
    from kvcomm.job_runner import run_job
    app.wait_idle()
    streams = [(app.key, "team"), (app.other_key, "team"), (app.key, f"solo-{uuid.uuid4().hex[:6]}")]
    tasks = ["Kim has {} beads and buys {} more. How many beads?", "Lou has {} cards and wins {} more. How many?"]
    jobs = {s: [math_job(tasks[i % 2].format(3 + i + j, 2 + j), "kvcomm", job_id=f"iso-{i}-{j}")
                for j in range(3)] for i, s in enumerate(streams)}
    expected = {}
    for stream, stream_jobs in jobs.items():          # each stream in a fresh oracle namespace
        namespace = f"oracle-{uuid.uuid4().hex[:8]}"
        expected[stream] = [run_job(oracle, JobSpec.from_dict({**job, "namespace": namespace})) for job in stream_jobs]
    assert any(t.reused for results in expected.values() for r in results for t in r.turns)
    got: dict = {}

    def run(stream) -> None:
        key, header = stream
        with app.client(key) as http:
            got[stream] = [http.post("/v1/jobs", params={"wait": "true"}, json=job,
                                     headers={"X-KVCOMM-Namespace": header}) for job in jobs[stream]]

    threads = [threading.Thread(target=run, args=(stream,)) for stream in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    for stream in streams:
        assert len(got.get(stream, [])) == 3, stream
        for response, want in zip(got[stream], expected[stream]):
            assert response.status_code == 200, response.text
            result = response.json()["result"]
            facts = [(t["agent_id"], t["token_ids"], t["reason"], t["reused"]) for t in result["turns"]]
            assert facts == [(t.agent_id, t.token_ids, t.reason, t.reused) for t in want.turns], (stream, want.job_id)
    namespaces = {response.json()["namespace"] for stream in streams for response in got[stream]}
    assert len(namespaces) == 3, namespaces                    # one anchor namespace per (key, header)
