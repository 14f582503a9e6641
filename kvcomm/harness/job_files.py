"""Job files: `load_jobs` reads one or many jobs from JSON, JSONL or YAML and validates each (`JobSpec.from_dict`).

Errors are `JobSpecError`s located by file and line (JSONL) or job index, then field. What a job is lives in
`kvcomm.harness.jobs`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .jobs import JobSpec, JobSpecError

__all__ = ["load_jobs"]


def load_jobs(path: str | Path) -> list[JobSpec]:
    """Every job in a job file: ``.json`` (one job or a list of jobs), ``.jsonl`` (one job per line; blank lines
    are skipped) or ``.yaml``/``.yml`` (one job or a list of jobs per document). Errors name the file and the
    line (JSONL) or the job's index, then the field. Job ids must be unique within the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"job file {path} does not exist")
    suffix = path.suffix.lower()
    text = path.read_text()
    located: list[tuple[str, Any]] = []   # (where, raw job)
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                located.append((where, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise JobSpecError("", f"invalid JSON: {exc.msg} (column {exc.colno})", where) from None
    elif suffix == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JobSpecError("", f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
                               str(path)) from None
        located.extend(_documents_jobs(document, str(path)))
    elif suffix in (".yaml", ".yml"):
        import yaml
        try:
            documents = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise JobSpecError("", f"invalid YAML: {exc}", str(path)) from None
        for index, document in enumerate(d for d in documents if d is not None):
            where = str(path) if len(documents) == 1 else f"{path} document {index}"
            located.extend(_documents_jobs(document, where))
    else:
        raise JobSpecError("", f"unknown job file type {suffix!r}; use .json, .jsonl, .yaml or .yml", str(path))
    if not located:
        raise JobSpecError("", "no jobs in the file", str(path))
    jobs: list[JobSpec] = []
    first_seen: dict[str, str] = {}
    for where, raw in located:
        try:
            job = JobSpec.from_dict(raw)
        except JobSpecError as exc:
            raise exc.located(where) from None
        except TypeError as exc:   # a dataclass constructor refused a value's shape
            raise JobSpecError("", str(exc), where) from None
        if job.id in first_seen:
            raise JobSpecError("id", f"duplicate job id {job.id!r} (first at {first_seen[job.id]})", where)
        first_seen[job.id] = where
        jobs.append(job)
    return jobs


def _documents_jobs(document: Any, where: str) -> list[tuple[str, Any]]:
    if isinstance(document, list):
        return [(f"{where} job [{index}]", raw) for index, raw in enumerate(document)]
    return [(where, document)]
