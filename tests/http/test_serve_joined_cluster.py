"""`kvcomm serve` joined to a running Ray cluster (``--address``, how it is deployed on a shared cluster) leaves the
cluster as it found it: on the way out it deletes its own applications, not the others on the cluster (Serve's
``shutdown`` would delete every one), and its anchor pool and job store save their snapshots before they are
killed (``ray.kill`` skips an actor's own shutdown hook). Here the cluster is the session's, with a neighbouring
Serve application on the same proxy, and `run_server` joins it in this process (as ``--address`` would)."""
from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import yaml

from kvcomm.harness.jobs import GenerationParams
from kvcomm.harness.topologies import build_job

from tests.support.serve_app import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_kvcomm_serve_on_a_joined_cluster_deletes_only_its_app_and_saves_its_state(ray_cluster, tiny_model_dir,
                                                                                    tmp_path) -> None:
    from ray import serve

    from cluster.serve.app import run_server
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Neighbour:
        def __call__(self, request) -> str:
            return "still here"

    serve.run(Neighbour.bind(), name="neighbour", route_prefix="/neighbour")
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    app = config["applications"][0]
    app["route_prefix"] = "/kv"
    pool_file, jobs_file = tmp_path / "pool.snapshot", tmp_path / "jobs.msgpack"
    app["args"]["cluster"].update(   # periodic saves far off: a snapshot file can only be the final save
        model=tiny_model_dir, random_weights=True, cpus_per_worker=0.5, threads_per_worker=1,
        pool_actor_name=f"joined-pool-{uuid.uuid4().hex[:6]}", pool_snapshot_path=str(pool_file),
        pool_snapshot_every_commits=1000, pool_snapshot_every_s=3600.0)
    app["args"]["serve"].update(served_model_name="tiny", job_store_name=f"joined-jobs-{uuid.uuid4().hex[:6]}",
                                job_store_snapshot_path=str(jobs_file), job_store_snapshot_every_s=3600.0)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    served: dict = {}

    def use(urls: list[str]) -> int:
        job = build_job("math", "Tom has 3 apples and buys 5 more. How many?", num_agents=2, mode="kvcomm",
                        job_id="joined", generation=GenerationParams(max_new_tokens=3, min_new_tokens=3)).to_dict()
        with httpx.Client(timeout=300) as http:
            served["job"] = http.post(f"{urls[0]}/v1/jobs", params={"wait": "true"}, json=job)
        served["saved_early"] = pool_file.exists() or jobs_file.exists()
        return 0

    try:
        assert run_server(path, host="127.0.0.1", port=port, ready=use) == 0
        assert served["job"].status_code == 200, served["job"].text
        assert any(turn["reason"].startswith("new_anchor") for turn in served["job"].json()["result"]["turns"])
        applications = serve.status().applications
        assert "kvcomm" not in applications and applications["neighbour"].status == "RUNNING", applications
        assert httpx.get(f"http://127.0.0.1:{port}/neighbour", timeout=30).text == "still here"
        # the anchors the job committed and its record were saved on the way out, not lost with the actors
        assert not served["saved_early"] and pool_file.stat().st_size > 0 and jobs_file.stat().st_size > 0
    finally:
        serve.shutdown()
