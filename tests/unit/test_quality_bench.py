"""The quality benchmark (kvcomm.bench.quality) on a tiny random-weight Llama with the embedded tokenizer: report
structure, dense against dense is exact, a mode on identical prefixes (dense-prefix) agrees with dense, diverged
turns are measured teacher-forced on dense's prompt, and `job_runner.run_jobs` equals `run_job` in dense mode."""
from __future__ import annotations

import json

import pytest

from kvcomm.anchor_pool import AnchorPool
from kvcomm.bench import quality
from kvcomm.config import KVCommConfig
from kvcomm.engine import KVCommEngine
from kvcomm.harness.scoring import score_gsm8k
from kvcomm.job_runner import run_job, run_jobs
from kvcomm.runner import ModelRunner

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: torch on one thread for the module

QUESTIONS = [
    ("Tom has 3 apples and buys 5 more. How many apples does he have?", 8),
    ("A train travels 60 miles per hour for 2 hours. How far does it go?", 120),
    ("A box holds 6 eggs. How many eggs are in 9 boxes?", 54),
    ("Sara reads 12 pages a day for 4 days. How many pages did she read?", 48),
    ("There are 30 students and 12 go home. How many students stay?", 18),
]
MODES = ("dense", "dense-prefix", "naive", "kvcomm")


def _records(items):
    return [quality.Record(f"gsm8k-{i}", q, {"question": q, "answer": f"#### {a}", "target": float(a)})
            for i, (q, a) in enumerate(items)]


SETTING = quality.Setting(limit=3, agents=3, modes=MODES, max_new_tokens=6, group_size=2, warmup=2,
                          warmup_group_size=1)


@pytest.fixture(scope="module")
def report(tiny_model):
    records = _records(QUESTIONS)
    return quality.run(setting=SETTING, loaded=tiny_model, progress=False, records=(records[:3], records[3:]))


def test_report_structure(report):
    assert report["benchmark"] == "quality"
    assert list(report["modes"]) == list(MODES)
    assert report["setting"]["max_new_tokens"] == 6 and report["setting"]["roles"] == [
        "Math Solver", "Mathematical Analyst", "Inspector"]
    assert report["records"]["measured"] == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
    assert not set(report["records"]["measured"]) & set(report["records"]["warmup"])
    assert set(report["warmup"]) == {"kvcomm"} and report["warmup"]["kvcomm"]["jobs"] == 2
    assert report["pools"]["kvcomm"]["anchors"], "warm-up recorded no anchors"
    for mode, m in report["modes"].items():
        assert m["jobs"] == 3 and m["turns"] == 9
        assert m["turns_identical_prompt"] + m["turns_teacher_forced"] == 9
        # the summary is its jobs' own figures, and each job's score is its final text's number against the
        # reference (rescored here with the scorer's public function): a miscount or a wrong field would differ
        rows = [job["modes"][mode] for job in report["jobs"]]
        for job, row in zip(report["jobs"], rows):
            assert row["correct"] == score_gsm8k(row["final"], f"#### {int(job['target'])}"), (mode, job["id"])
        assert m["correct"] == sum(r["correct"] for r in rows) and m["accuracy"] == m["correct"] / 3
        turns = [t for r in rows for t in r["turns"]]
        assert m["reuse_rate"] == sum(t["reused"] for t in turns) / 9
        assert m["kl_mean"] == pytest.approx(sum(t["kl"] for t in turns) / 9)
        assert m["wall_s"] > 0 and m["cpu_s"] > 0 and set(m["by_agent"]) == {"1", "2", "3"}
        assert m["by_agent"]["1"]["identical_prompt"] == 3   # agent 1 reads only the question
    assert len(report["jobs"]) == 3 and all(set(j["modes"]) == set(MODES) for j in report["jobs"])
    json.dumps(report)   # JSON-able
    table = quality.markdown_table(report)
    assert all(f"| {m} |" in table for m in MODES) and "| mode | accuracy | reuse rate |" in table


def test_dense_is_the_oracle_and_dense_prefix_agrees(report):
    dense = report["modes"]["dense"]
    assert dense["kl_mean"] == 0.0 and dense["first_token_agree"] == dense["turns"] == 9
    assert dense["same_answer"] == dense["same_final_text"] == 3 and dense["reuse_rate"] == 0.0
    assert dense["turns_teacher_forced"] == 0
    prefix = report["modes"]["dense-prefix"]   # exact prefix caching: the very same prompts and tokens
    assert prefix["turns_identical_prompt"] == 9 and prefix["turns_same_tokens"] == 9
    assert prefix["first_token_agree"] == 9 and prefix["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert prefix["same_answer"] == prefix["same_final_text"] == 3
    assert report["modes"]["naive"]["reuse_rate"] == 1.0
    # naive reuse under another prefix cannot be exact: a KL of 0 would mean dense was compared with itself
    assert report["modes"]["naive"]["kl_mean"] > 1e-6


def test_dense_rerun_agrees_exactly_and_diverged_turns_are_teacher_forced(tiny_model):
    runner = ModelRunner(tiny_model.spec, tiny_model.state_dict)
    config = KVCommConfig()
    engine = KVCommEngine(runner, tiny_model.tokenizer, config, AnchorPool(config, runner.rope))
    records = _records(QUESTIONS[:2])
    jobs = [quality.build_job(SETTING, r) for r in records]
    dense = quality.run_group(engine, "dense", jobs, keep_contents=True)
    dense.forced = [{}, {}]
    again = quality.run_group(engine, "dense", jobs, dense=dense)
    scorer = quality.Scorer("gsm8k")
    for row in quality.compare_group(dense, again, records, scorer):
        assert row["same_final_text"] and row["same_answer"]
        assert all(t["identical_prompt"] and t["kl"] == 0.0 and t["first_token_agree"] for t in row["turns"])
    naive = quality.run_group(engine, "naive", jobs, dense=dense)
    rows = quality.compare_group(dense, naive, records, scorer)
    for index, row in enumerate(rows):
        for t in row["turns"]:
            key = (t["agent"], t["round"])
            assert t["identical_prompt"] == (naive.turns[index][key].prompt_ids == dense.turns[index][key].prompt_ids)
            if not t["identical_prompt"]:   # measured on dense's prompt, in naive mode (reused)
                assert naive.forced[index][key].prompt_ids == dense.turns[index][key].prompt_ids
                assert t["forced_reused"] is True


def test_run_jobs_equals_run_job_in_dense_mode(tiny_model):
    runner = ModelRunner(tiny_model.spec, tiny_model.state_dict)
    engine = KVCommEngine(runner, tiny_model.tokenizer)
    jobs = [quality.build_job(SETTING, r) for r in _records(QUESTIONS[:2])]
    together = run_jobs(engine, jobs, mode="dense")
    for job, result in zip(jobs, together):
        alone = run_job(engine, job, mode="dense")
        assert [(t.agent_id, t.round) for t in result.turns] == [(t.agent_id, t.round) for t in alone.turns]
        assert [t.token_ids for t in result.turns] == [t.token_ids for t in alone.turns]
        assert result.final_answer == alone.final_answer


def test_humaneval_roles_end_with_code_and_setting_checks():
    assert [r.name for r in quality.agent_roles("humaneval", 3)] == ["Algorithm Designer", "Programmer", "Bug Fixer"]
    assert [r.name for r in quality.agent_roles("humaneval", 1)] == ["Programmer"]
    with pytest.raises(ValueError, match="unknown mode"):
        quality.Setting(modes=("dense", "fast"))
    with pytest.raises(ValueError, match="do not fit"):
        quality.load_records(quality.Setting(dataset="humaneval", limit=160, warmup=10))
