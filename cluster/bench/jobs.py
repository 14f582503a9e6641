"""The jobs the reliability drills send (to worker actors and over HTTP): small star-shaped math jobs."""
from __future__ import annotations

from kvcomm.harness.jobs import GenerationParams, JobSpec
from kvcomm.harness.topologies import build_job

TASK = "A shop sells {a} pencils on Monday and {b} on Tuesday. How many pencils does it sell in total?"


def make_jobs(count: int, *, mode: str, tag: str, new_tokens: int, namespace: str | None = None) -> list[JobSpec]:
    """`count` star-shaped math jobs (three agents in parallel, then a decision agent), distinct numbers."""
    return [build_job("math", TASK.format(a=3 + i % 11, b=12 + i % 7), num_agents=3, topology="star", decision=True,
                      mode=mode, job_id=f"{tag}-{i}", namespace=namespace or f"rel-{tag}",
                      generation=GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens))
            for i in range(count)]
