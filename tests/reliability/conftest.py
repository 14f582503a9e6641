"""One Serve app for every test in tests/reliability (package scope: started once, shut down after the last).

The app is built through `app_builder` as ``serve run`` builds it: tiny-llama with random weights and the embedded
tokenizer (as tests/http/test_serve.py), one worker replica on half a CPU, two API keys, and small limits so that the
fuzz test's valid requests stay cheap and the overload test can fill the in-flight slots (`LIMITS`).
Serve is shut down, and the anchor pool actor removed, after the package's last test.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvcomm.config import KVCommConfig
from kvcomm.harness.jobs import GenerationParams
from kvcomm.harness.topologies import build_job
from kvcomm.engine import build_engine

from tests.support.serve_app import running_app, tiny_app_args

MODEL_NAME = "tiny-reliability"
KEY, OTHER_KEY = "rel-key-" + uuid.uuid4().hex, "rel-other-" + uuid.uuid4().hex
LIMITS = {"max_in_flight": 32, "retry_after_s": 2, "max_body_bytes": 64 * 1024, "max_prompt_chars": 4000,
          "max_output_tokens": 16, "default_max_tokens": 4, "max_job_agents": 6, "max_job_turns": 12,
          "max_jobs_kept": 40}
REPORT_ENV = "KVCOMM_RELIABILITY_OUT"   # a directory: each test's figures also go there as <name>.json


@dataclass(frozen=True)
class App:
    url: str
    key: str
    other_key: str
    limits: dict[str, int]

    def client(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kwargs)

    def wait_idle(self, timeout_s: float = 120.0) -> None:
        """Until no job or chat is in flight (the previous test's background jobs have finished)."""
        deadline = time.monotonic() + timeout_s
        while True:
            in_flight = httpx.get(f"{self.url}/healthz", timeout=30).json()["jobs_in_flight"]
            if in_flight == 0:
                return
            assert time.monotonic() < deadline, f"{in_flight} jobs/chats still in flight after {timeout_s} s"
            time.sleep(0.2)


def math_job(task: str, mode: str = "dense", job_id: str = "rel-job", *, agents: int = 3,
             new_tokens: int = 4) -> dict[str, Any]:
    return build_job("math", task, num_agents=agents, mode=mode, job_id=job_id,
                     generation=GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)).to_dict()


def chat_request(content: str = "hi", max_tokens: int = 2) -> dict[str, Any]:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}


def report(name: str, data: dict[str, Any]) -> None:
    """Print a test's figures (one line, ``[reliability] name: {json}``) and, when KVCOMM_RELIABILITY_OUT names a
    directory, write them there as ``name.json`` for a benchmark to pick up."""
    print(f"\n[reliability] {name}: {json.dumps(data, sort_keys=True)}", flush=True)
    out = os.environ.get(REPORT_ENV)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


@pytest.fixture(scope="package")
def app_args(tiny_model_dir) -> dict[str, Any]:
    return tiny_app_args(tiny_model_dir, "reliability-pool",
                         {"served_model_name": MODEL_NAME, "api_keys": [KEY, OTHER_KEY], **LIMITS})


@pytest.fixture(scope="package")
def app(ray_cluster, app_args) -> App:
    with running_app(app_args, "kvcomm-reliability") as url:
        yield App(url, KEY, OTHER_KEY, dict(LIMITS))


@pytest.fixture(scope="package")
def oracle(tiny_model_dir):
    """tests/conftest.py's `oracle` (the in-process engine the app must reproduce in dense mode), built once for
    the package rather than once per module."""
    return build_engine(tiny_model_dir, random_weights=True, config=KVCommConfig(gamma=1.0))
