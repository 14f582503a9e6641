"""`kvcomm bench fidelity`: how close each reuse method's cache is to dense prefill, on identical tokens.

This module owns the fidelity benchmark (issues #3, #16): the per-turn comparison of every method against dense
prefill of the identical tokens and the report (a JSON-able dict); its methods and `Setting` are
`kvcomm.bench.fidelity_setting`, its tables and plot `kvcomm.bench.fidelity_report`. It owns no algorithm:
every method is the engine's own code path, except "naive-other" and the two diagnostic splices
(`kvcomm.bench.splices`). The GSM8K setting (questions, agents, fixed dense responses, warm-up, gate traces,
metrics) is `kvcomm.bench.turns`'; the anchor sweep is `kvcomm.bench.anchors`. Entry points: `add_arguments` /
`cli_main`, also runnable as ``python -m kvcomm.bench.fidelity``.

The setting, what is compared and what is timed: docs/benchmarks.md ("`kvcomm bench fidelity`").
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from tqdm import tqdm

from . import publish
from ..calibration import CalibrationWarning, resolve, spearman
from ..config import KVCommConfig
from ..engine import KVCommEngine, TurnRequest
from ..generation import Sampling
from ..names import EMBEDDED_MODEL
from ..model_loading import LoadedModel
from ..runner import ModelRunner, SequenceKV
from ..templates import AgentTemplate
from .cli import apply_threads, standalone_main
from .splices import (offset_diagnostics, oracle_fixed, oracle_placeholders, other_context_sources, prepare_spliced,
                      relative_errors, token_groups)
from .turns import (BENCH_POOL_BYTE_BUDGET, NAMESPACE, WARMUP_DETAIL, Case, GateTrace,
                    PreparedTurn, as_turn, bootstrap_ci, dense_cases, engine_for,
                    greedy_continuations, kl_divergence, kvcomm_turns, load_checked, load_questions, math_agents,
                    matching_prefix, model_arguments, parse_lines, pool_summary, timed_prepare, top_margin,
                    warmer)
from .fidelity_report import markdown_table, plot
from .fidelity_setting import (CONFIDENT_MARGIN, ERROR_GROUPS, GATE_TRACED, METHODS, POOL_METHODS, PROBE,
                               Setting)


@dataclass
class _Engines:
    """Engines over one runner: dense and baselines on `corrected`; each KVCOMM config its own pool;
    `corrected_lasttoken` shares `corrected`'s pool."""
    reference: KVCommEngine
    corrected: KVCommEngine
    corrected_lasttoken: KVCommEngine
    calibrated: KVCommEngine


def _measure_turn(engines: _Engines, agents: Sequence[AgentTemplate], index: int, case: Case,
                  oracle: PreparedTurn, dense_kv: Sequence[SequenceKV], traces: dict[str, list[GateTrace]],
                  setting: Setting, sampling: Sampling, continuation: Sampling) -> dict[str, Any]:
    """Every method on agent `index`'s turn of `case`: metrics against the dense oracle."""
    agent = agents[index]
    contents = {n: case.contents[n] for n in agent.placeholders()}
    dense_engine = engines.corrected
    turns: dict[str, PreparedTurn] = {}
    sources: dict[str, str] = {}
    for method in setting.methods:
        if method == "dense":
            turns[method] = as_turn(*timed_prepare(dense_engine, TurnRequest(agent, contents, "dense", sampling,
                                                                            NAMESPACE)))
        elif method == "base-only":
            turns[method] = as_turn(*timed_prepare(engines.reference, TurnRequest(agent, contents, "naive",
                                                                                 sampling, NAMESPACE)))
        elif method == "base-only+tail":
            turns[method] = as_turn(*timed_prepare(engines.corrected, TurnRequest(agent, contents, "naive",
                                                                                 sampling, NAMESPACE)))
        elif method == "naive-other":
            found = other_context_sources(dense_engine, agents, index, case, dense_kv)
            sources = {name: where for name, (_, where) in found.items()}
            turns[method] = prepare_spliced(dense_engine, agent, contents,
                                            {name: seg for name, (seg, _) in found.items()}, sampling)
        elif method == "diag-exact-placeholders":
            turns[method] = prepare_spliced(dense_engine, agent, contents,
                                            oracle_placeholders(dense_engine, agent, contents, oracle.kv), sampling)
        elif method == "diag-exact-fixed":
            turns[method] = prepare_spliced(dense_engine, agent, contents, {n: c.base for n, c in contents.items()},
                                            sampling, fixed_kv=oracle_fixed(dense_engine, agent, contents, oracle.kv))
        elif method == "cacheblend":
            turns[method] = as_turn(*timed_prepare(engines.corrected, TurnRequest(agent, contents, "cacheblend",
                                                                                 sampling, NAMESPACE)))
        else:   # the kvcomm methods and hybrid: prepared with the gate trace
            turns[method] = traces[method][index].forced

    groups = token_groups(dense_engine, agent, contents)
    dense_probs_margin = top_margin(oracle.last_logits)
    dense_top1 = int(oracle.last_logits.argmax())
    row: dict[str, Any] = {
        "line": case.line, "agent": agent.agent_id, "prompt_tokens": oracle.kv.length,
        "shared_tokens": sum(c.num_tokens for c in contents.values()), "dense_top1_margin": dense_probs_margin,
        "dense_prepare_ms": oracle.prepare_s * 1e3, "naive_other_sources": sources, "methods": {}}
    for method, turn in turns.items():
        errors = {}
        for group, index_tensor in groups.items():
            if index_tensor.numel():
                errors[group] = relative_errors(turn.kv, oracle.kv, index_tensor)
        row["methods"][method] = {
            "kl": kl_divergence(oracle.last_logits, turn.last_logits),
            "top1_agree": int(turn.last_logits.argmax()) == dense_top1,
            "prepare_ms": turn.prepare_s * 1e3,
            "offset_ms": None if turn.offset_s is None else turn.offset_s * 1e3,
            "recomputed_tokens": turn.recomputed,
            "predicted_kl": turn.predicted_kl,
            "_errors": errors,      # per group: ([layers] K, [layers] V); folded into the summary, then dropped
        }
        if method in traces and traces[method][index].reused is not None:
            trace = traces[method][index]
            row["methods"][method].update(gate_reused=trace.reused, gate_reason=trace.reason,
                                          served_prepare_ms=trace.served_s * 1e3)

    continuations = greedy_continuations(dense_engine.runner, {"oracle": oracle, **turns}, continuation)
    budget = continuation.max_new_tokens
    for method in turns:
        row["methods"][method]["greedy_match"] = matching_prefix(continuations[method], continuations["oracle"],
                                                                 budget)
    return row


def _summarize(rows: Sequence[dict[str, Any]], setting: Setting, num_layers: int) -> dict[str, Any]:
    """Per method: means over turns, the KL bootstrap CI, agreement counts, per-layer error arrays."""
    methods = {}
    budget = setting.continuation_tokens
    confident = [r for r in rows if r["dense_top1_margin"] >= CONFIDENT_MARGIN]
    for method in setting.methods:
        cells = [r["methods"][method] for r in rows]
        kls = [c["kl"] for c in cells]
        summary: dict[str, Any] = {
            "turns": len(cells),
            "kl_mean": sum(kls) / len(kls),
            "kl_ci95": list(bootstrap_ci(kls, setting.bootstrap, setting.seed)),
            "kl_median": float(torch.tensor(kls).median()),
            "top1_agree": sum(c["top1_agree"] for c in cells),
            "confident_agree": sum(r["methods"][method]["top1_agree"] for r in confident),
            "confident_turns": len(confident),
            "greedy_match_mean": sum(c["greedy_match"] for c in cells) / len(cells),
            "greedy_exact": sum(c["greedy_match"] == budget for c in cells),
            "prepare_ms_mean": sum(c["prepare_ms"] for c in cells) / len(cells),
            "recomputed_tokens_mean": sum(c["recomputed_tokens"] for c in cells) / len(cells),
        }
        by_agent: dict[str, dict[str, Any]] = {}
        for r in rows:
            entry = by_agent.setdefault(r["agent"], {"turns": 0, "kl_sum": 0.0, "top1_agree": 0})
            entry["turns"] += 1
            entry["kl_sum"] += r["methods"][method]["kl"]
            entry["top1_agree"] += r["methods"][method]["top1_agree"]
        summary["by_agent"] = {agent: {"turns": e["turns"], "kl_mean": e["kl_sum"] / e["turns"],
                                       "top1_agree": e["top1_agree"]} for agent, e in by_agent.items()}
        offsets = [c["offset_ms"] for c in cells if c["offset_ms"] is not None]
        summary["offset_ms_mean"] = sum(offsets) / len(offsets) if offsets else None
        for group in ERROR_GROUPS:
            present = [c["_errors"][group] for c in cells if group in c["_errors"]]
            if not present:
                continue
            k_layers = [sum(p[0][layer] for p in present) / len(present) for layer in range(num_layers)]
            v_layers = [sum(p[1][layer] for p in present) / len(present) for layer in range(num_layers)]
            summary[f"{group}_rel_err_k"] = k_layers
            summary[f"{group}_rel_err_v"] = v_layers
            summary[f"{group}_rel_err_k_mean"] = sum(k_layers) / num_layers
            summary[f"{group}_rel_err_v_mean"] = sum(v_layers) / num_layers
        if all("gate_reused" in c for c in cells):
            reused = [c["gate_reused"] for c in cells]
            summary["gate_reuse_rate"] = sum(reused) / len(reused)
            summary["gate_reasons"] = dict(Counter(c["gate_reason"] for c in cells))
            on_gated = [c["kl"] for c in cells if c["gate_reused"]]
            summary["kl_mean_gate_reused"] = sum(on_gated) / len(on_gated) if on_gated else None
            served = [c["kl"] if c["gate_reused"] else 0.0 for c in cells]   # a dense turn is exact
            summary["served_kl_mean"] = sum(served) / len(served)
            summary["served_kl_ci95"] = list(bootstrap_ci(served, setting.bootstrap, setting.seed))
            summary["served_top1_agree"] = sum(c["top1_agree"] or not c["gate_reused"] for c in cells)
            summary["served_prepare_ms_mean"] = sum(c["served_prepare_ms"] for c in cells) / len(cells)
        predicted = [(c["predicted_kl"], c["kl"]) for c in cells if c.get("predicted_kl") is not None]
        if predicted:
            summary["predicted_kl_mean"] = sum(p for p, _ in predicted) / len(predicted)
            summary["predicted_kl_spearman"] = spearman([p for p, _ in predicted], [k for _, k in predicted])
        methods[method] = summary
    dense_ms = [r["dense_prepare_ms"] for r in rows]
    return {"methods": methods, "dense_prepare_ms_mean": sum(dense_ms) / len(dense_ms)}


def run(model: str = EMBEDDED_MODEL, *, setting: Setting | None = None,
        agents: Sequence[AgentTemplate] | None = None, device: str = "cpu", dtype: str | None = None,
        random_weights: bool = False,
        loaded: LoadedModel | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the fidelity benchmark; returns a JSON-able report (see the module docstring)."""
    setting = setting or Setting()
    started = time.perf_counter()
    loaded = load_checked(model, device, dtype, random_weights, loaded)
    runner = ModelRunner(loaded.spec, loaded.state_dict)
    reference_config = KVCommConfig.reference(pool_byte_budget=BENCH_POOL_BYTE_BUDGET)
    corrected_config = KVCommConfig(pool_byte_budget=BENCH_POOL_BYTE_BUDGET, calibration="none").with_calibration()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        calibrated_config, calibration = resolve(KVCommConfig(pool_byte_budget=BENCH_POOL_BYTE_BUDGET,
                                                              calibration=setting.calibration), model)
    corrected = engine_for(runner, loaded.tokenizer, corrected_config)
    engines = _Engines(engine_for(runner, loaded.tokenizer, reference_config), corrected,
                       KVCommEngine(runner, loaded.tokenizer, corrected_config.with_(kvcomm_tail="last_token"),
                                    corrected.pool),
                       engine_for(runner, loaded.tokenizer, calibrated_config))
    agents_source = "caller" if agents is not None else "kvcomm.harness.roles.fully_connected_math_agents"
    agents = list(agents) if agents is not None else math_agents(setting.agents)
    dense_engine = engines.corrected
    sampling = Sampling(max_new_tokens=setting.response_tokens, stop_token_ids=dense_engine.stop_token_ids)
    continuation = Sampling(max_new_tokens=setting.continuation_tokens, stop_token_ids=dense_engine.stop_token_ids)

    measured_q = load_questions(setting.data, setting.questions, seed=setting.seed, lines=setting.lines)
    warmup_q = load_questions(setting.data, setting.warmup, skip=setting.questions, seed=setting.seed,
                              lines=setting.lines)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    cases = dense_cases(dense_engine, agents, measured_q, sampling, progress=progress,
                        desc="dense responses (measured questions)")
    timings["dense_responses_s"] = time.perf_counter() - t
    t = time.perf_counter()
    warm = warmer(dense_engine, agents, warmup_q, setting.warmup_mode, setting.response_tokens, sampling, progress)
    warmups = {name: warm(getattr(engines, name), f"warm-up, {name} pool") for name in setting.pools}
    timings["warmup_s"] = time.perf_counter() - t

    rows: list[dict[str, Any]] = []
    diagnostics: dict[str, list[dict[str, float]]] = {name: [] for name in setting.pools}
    t = time.perf_counter()
    bar = tqdm(total=len(cases) * len(agents), desc="measure", unit="turn", disable=not progress, file=sys.stderr)
    for case in cases:
        oracles = []
        for agent in agents:
            prepared, seconds = timed_prepare(dense_engine, TurnRequest(
                agent, {n: case.contents[n] for n in agent.placeholders()}, "dense", sampling, NAMESPACE))
            oracles.append(as_turn(prepared, seconds))
        traces: dict[str, list[GateTrace]] = {}
        for method, engine_name in POOL_METHODS.items():
            if method in setting.methods:
                engine = getattr(engines, engine_name)
                traces[method] = kvcomm_turns(engine, agents, case, sampling,
                                              mode="hybrid" if method == "hybrid" else "kvcomm",
                                              trace_gate=method in GATE_TRACED)
        for index, agent in enumerate(agents):
            for pool_name in setting.pools:
                diagnostics[pool_name].append(offset_diagnostics(
                    getattr(engines, pool_name), agent, {n: case.contents[n] for n in agent.placeholders()}))
            rows.append(_measure_turn(engines, agents, index, case, oracles[index], [o.kv for o in oracles],
                                      traces, setting, sampling, continuation))
            bar.update(1)
    bar.close()
    timings["measure_s"] = time.perf_counter() - t

    summary = _summarize(rows, setting, loaded.spec.num_layers)
    for row in rows:
        for cell in row["methods"].values():
            cell.pop("_errors")
    rendered = [dense_engine.agent_state(a).rendered for a in agents]
    offsets = {}
    for pool_name, entries in diagnostics.items():
        placeholders = sum(e["placeholders"] for e in entries)
        with_offsets = [e for e in entries if e["with_offsets"]]
        offsets[pool_name] = {
            "placeholders": placeholders, "with_offsets": sum(e["with_offsets"] for e in entries),
            "compatible_mean": sum(e["compatible"] for e in with_offsets) / max(1, len(with_offsets)),
            "effective_mean": sum(e["effective"] for e in with_offsets) / max(1, len(with_offsets))}
    prompt_tokens = [r["prompt_tokens"] for r in rows]
    shared_tokens = [r["shared_tokens"] for r in rows]
    return {
        "benchmark": "fidelity",
        "model": loaded.source, "dtype": str(loaded.dtype).replace("torch.", ""),
        "device": str(loaded.device), "threads": torch.get_num_threads(),
        "setting": {**asdict(setting), "methods": list(setting.methods), "confident_margin": CONFIDENT_MARGIN,
                    "warmup_mode_detail": WARMUP_DETAIL[setting.warmup_mode]},
        "configs": {"reference": reference_config.to_dict(), "corrected": corrected_config.to_dict(),
                    "calibrated": calibrated_config.to_dict()},
        "calibration": None if calibration is None else {"model": calibration.model, "knobs": calibration.knobs,
                                                         "data": calibration.data, "met": calibration.met},
        "calibration_warnings": [str(w.message) for w in caught],
        "agents_source": agents_source,
        "agents": [{"id": a.agent_id, "placeholders": list(a.placeholders()),
                    "template_tokens": len(r.template_ids())} for a, r in zip(agents, rendered)],
        "questions": {"measured": [line for line, _ in measured_q], "warmup": [line for line, _ in warmup_q]},
        "turns": len(rows),
        "prompt_tokens": {"min": min(prompt_tokens), "max": max(prompt_tokens),
                          "mean": sum(prompt_tokens) / len(prompt_tokens)},
        "shared_tokens": {"min": min(shared_tokens), "max": max(shared_tokens),
                          "mean": sum(shared_tokens) / len(shared_tokens)},
        "warmup": warmups,
        "pools": {name: pool_summary(getattr(engines, name).pool) for name in setting.pools},
        "offsets": offsets,
        **summary,
        "rows": rows,
        "timings": {**timings, "total_s": time.perf_counter() - started},
        "probe": PROBE,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `kvcomm bench fidelity`."""
    model_arguments(parser, Setting)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--calibration", default=Setting.calibration,
                        help="kvcomm-calibrated's calibration: auto (the model's file), none, or a file")


def setting_from_args(args: argparse.Namespace, methods: Sequence[str] = METHODS, **overrides: Any) -> Setting:
    """The `Setting` the shared command-line options describe."""
    return Setting(**{**dict(questions=args.questions, warmup=args.warmup, agents=args.agents,
                             response_tokens=args.response_tokens, continuation_tokens=args.continuation_tokens,
                             methods=tuple(methods), seed=args.seed, data=args.data, warmup_mode=args.warmup_mode,
                             lines=parse_lines(args.lines),
                             calibration=getattr(args, "calibration", Setting.calibration)), **overrides})


def cli_main(args: argparse.Namespace) -> int:
    """`kvcomm bench fidelity`: run, print the table, write the JSON and the plot."""
    apply_threads(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    report = run(args.model, setting=setting_from_args(args, methods), device=args.device, dtype=args.dtype,
                 random_weights=args.random_weights, progress=not args.quiet)
    publish(report, markdown_table(report), args.json, args.plot, lambda path: plot(report, path))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return standalone_main("fidelity", add_arguments, cli_main, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())


