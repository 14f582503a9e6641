"""The shipped Serve config file works with Ray Serve's own CLI: ``serve run configs/local-2replicas.yaml``.

The file, with the model swapped for a tiny random-weight one and a free port, is run by ``serve run`` in a
process of its own (it starts its own local Ray cluster): Serve applies the file's ``deployments:`` (two ingress
replicas, two worker replicas from ``num_workers``), the app answers jobs and health checks, and Ctrl-C stops it;
whatever of its session is left afterwards is killed.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from kvcomm.harness.jobs import GenerationParams
from kvcomm.harness.topologies import build_job

from tests.support.procfs import running_processes
from tests.support.serve_app import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow             # a Ray cluster of its own and four replicas: ~40 s on 2 cores
def test_serve_run_honours_the_config_files_deployments(tmp_path, tiny_model_dir) -> None:
    config = yaml.safe_load((ROOT / "configs" / "local-2replicas.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["cluster"].update(model=tiny_model_dir, random_weights=True, cpus_per_worker=0.5, threads_per_worker=1,
                           pool_actor_name=f"serve-run-pool-{uuid.uuid4().hex[:6]}")
    args["serve"].update(served_model_name="tiny", job_store_snapshot_path=str(tmp_path / "jobs.msgpack"))
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "KVCOMM_API_KEY")}
    # "local": its own cluster even when another runs on this machine (else Ray joins the one it last started)
    env.update(RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", RAY_ADDRESS="local")
    serve_cli = str(Path(sys.executable).parent / "serve")
    process = subprocess.Popen([serve_cli, "run", str(path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, "".join(lines)[-3000:]
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(1)
        with httpx.Client(base_url=url, timeout=300) as http:
            ingress: set[str] = set()                # replicas come up one by one: ask until both answered
            deadline = time.monotonic() + 120
            while len(ingress) < 2 and time.monotonic() < deadline:
                ingress.add(http.get("/healthz").json()["replica"])
                time.sleep(0.1)
            job = build_job("math", "Tom has 3 apples and buys 5 more. How many?", num_agents=3, mode="dense",
                            topology="star", decision=True, job_id="serve-run",
                            generation=GenerationParams(max_new_tokens=4, min_new_tokens=4)).to_dict()
            done = http.post("/v1/jobs", params={"wait": "true"}, json=job)
        assert done.status_code == 200, done.text
        assert len(ingress) == 2, ingress                        # deployments: KVCommIngress num_replicas: 2
        result = done.json()["result"]
        assert len(result["turns"]) == 4 and all(t["worker"].startswith("replica-") for t in result["turns"])
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        for pid, stat in running_processes().items():             # what its session left behind
            if stat.session == process.pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
