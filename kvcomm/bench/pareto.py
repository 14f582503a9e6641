"""`kvcomm bench pareto`: KL against reused-turn preparation time for every reuse method, with the recompute ratio
swept and the turn gate's threshold swept; and `measure`, the per-turn measurement `kvcomm calibrate` fits on.

The setting is the fidelity benchmark's (`kvcomm.bench.turns`: a split of a GSM8K file, fixed dense responses,
one corrected pool warmed on disjoint warm-up questions). On every measured turn, every variant prepares the turn's
cache with forced reuse (in an order rotated per turn, so machine drift hits all alike) and is compared with dense
prefill of the identical prompt at the first decode position:

==================  ==========================================================================================
naive               base KV re-rotated, no offsets, the last fixed segment recomputed (the cost baseline)
kvcomm@r            offsets, the last segment, and a share r of the reused span recomputed: the tokens the last
                    prompt token attends to most (`kvcomm.corrections`); r = 0 is offsets alone. Other recipes
                    (`--recompute-starts`, `--kvcomm-tails`): kvcomm@r+s2 also recomputes the first 2 tokens of
                    every placeholder; kvcomm@r+qtail reuses the last segment with its offsets and recomputes the
                    last token only, the query choosing among the segment's other tokens; kvcomm@r+t8 recomputes
                    the segment's last 8 tokens (`kvcomm_tail`)
kvcomm+starts@k     offsets, the last segment, and the first k tokens of every placeholder (EPIC)
hybrid@r            offsets, the last segment, and r of the tokens chosen by CacheBlend's layer-1 key deviation
cacheblend@r        no offsets, the last segment, and r chosen by CacheBlend's layer-1 key deviation
==================  ==========================================================================================

Per turn and variant: KL(dense || variant), first-token agreement, prepare time, recomputed tokens, the reused
first token's own signals (`kvcomm.gate.first_token_signals`: margin, logit gap, entropy; the margin is the fidelity
gate's), and for kvcomm variants the turn gate's raw forecast (predicted KL at kl_scale = 1). The entropy gate's own decision on each turn
is traced once (`turns.kvcomm_turns` on the uncalibrated engine, whose turn gate never falls back). The gate sweep
then replays, per kvcomm recipe, every threshold over the forecasts: the reuse rate, the KL on reused turns and the
served KL (dense turns count 0), and the fidelity gate's margin thresholds (`MARGINS`) alike. With a calibration,
its (ratio, thresholds) point is marked.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from . import publish
from ..calibration import Calibration, auc, find, model_key, recipe_label, spearman
from ..config import KVCommConfig
from ..engine import KVCommEngine, TurnRequest
from ..gate import first_token_signals, gate
from ..generation import Sampling
from ..model_loading import LoadedModel
from ..runner import ModelRunner
from ..templates import AgentTemplate
from .cli import apply_threads
from .pareto_plot import plot
from .turns import (BENCH_POOL_BYTE_BUDGET, DEFAULT_DATA, NAMESPACE, WARMUP_MODES, bootstrap_ci,
                    dense_cases, fmt, kl_divergence, kvcomm_turns, load_checked, load_questions, math_agents,
                    model_arguments, parse_lines, pool_summary, timed_prepare, top_margin, warmer)

RATIOS = (0.0, 0.05, 0.10, 0.20, 0.40)
SPAN_STARTS = (1, 2, 4, 8)
MARGINS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1)   # fidelity-gate thresholds the summary sweeps
METHOD_ORDER = ("naive", "kvcomm", "kvcomm+starts", "hybrid", "cacheblend")


@dataclass(frozen=True)
class Setting:
    questions: int = 32
    warmup: int = 15
    agents: int = 3
    response_tokens: int = 64
    continuation_tokens: int = 0          # unused here (first-token metrics only); kept for the shared options
    seed: int = 0
    bootstrap: int = 2000
    data: str = DEFAULT_DATA
    warmup_mode: str = "jobs"
    lines: tuple[int, int] | None = None
    ratios: tuple[float, ...] = RATIOS
    span_starts: tuple[int, ...] = SPAN_STARTS
    methods: tuple[str, ...] = METHOD_ORDER
    recompute_starts: tuple[int, ...] = (0,)          # kvcomm@r recipes: span starts added to every ratio
    kvcomm_tails: tuple[str | int, ...] = ("last_segment",)  # kvcomm@r recipes: each tail with every ratio

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHOD_ORDER]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; methods: {', '.join(METHOD_ORDER)}")
        if self.warmup_mode not in WARMUP_MODES:
            raise ValueError(f"warmup_mode must be one of {', '.join(WARMUP_MODES)}, got {self.warmup_mode!r}")
        if any(not 0 <= r <= 1 for r in self.ratios) or any(k < 1 for k in self.span_starts):
            raise ValueError(f"ratios must lie in [0, 1] and span starts be >= 1: {self.ratios}, {self.span_starts}")
        if any(k < 0 for k in self.recompute_starts):
            raise ValueError(f"recompute starts must be >= 0: {self.recompute_starts}")
        for tail in self.kvcomm_tails:
            KVCommConfig(kvcomm_tail=tail)           # its own check names a bad tail
        if self.questions < 1 or self.warmup < 0 or self.agents < 1:
            raise ValueError(f"need questions >= 1, warmup >= 0, agents >= 1; got {self.questions}, "
                             f"{self.warmup}, {self.agents}")


@dataclass(frozen=True)
class Variant:
    name: str
    method: str                       # one of METHOD_ORDER
    mode: str                         # the engine mode
    knob: float                       # the ratio (or k for span starts)
    overrides: dict[str, Any] = field(default_factory=dict)


def kvcomm_variant(ratio: float, span_starts: int = 0, kvcomm_tail: str | int = "last_segment") -> str:
    """The name of kvcomm's variant for one recompute recipe: kvcomm@20%, kvcomm@20%+s2, kvcomm@20%+s2+qtail."""
    return f"kvcomm@{recipe_label(ratio, span_starts, kvcomm_tail)}"


def variants(setting: Setting) -> list[Variant]:
    """The variants `setting` asks for (every recipe for kvcomm, every ratio for hybrid and cacheblend; every k for
    span starts)."""
    out: list[Variant] = []
    for method in setting.methods:
        if method == "naive":
            out.append(Variant("naive", "naive", "naive", 0.0))
        elif method == "kvcomm+starts":
            out += [Variant(f"kvcomm+starts@{k}", method, "kvcomm", k, {"recompute_span_starts": k})
                    for k in setting.span_starts]
        elif method == "kvcomm":
            out += [Variant(kvcomm_variant(r, k, tail), method, "kvcomm", r,
                            {"recompute_ratio": r, "recompute_span_starts": k, "kvcomm_tail": tail})
                    for tail in setting.kvcomm_tails for k in setting.recompute_starts for r in setting.ratios]
        else:
            knob = {"hybrid": "hybrid_recompute_ratio", "cacheblend": "blend_recompute_ratio"}[method]
            out += [Variant(f"{method}@{r:.0%}", method, method, r, {knob: r}) for r in setting.ratios if r > 0]
    return out


def measure(model: str, setting: Setting, *, agents: Sequence[AgentTemplate] | None = None, device: str = "cpu",
            dtype: str | None = None, random_weights: bool = False, loaded: LoadedModel | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Every variant on every measured turn (see the module docstring): a JSON-able report with the rows."""
    started = time.perf_counter()
    loaded = load_checked(model, device, dtype, random_weights, loaded)
    runner = ModelRunner(loaded.spec, loaded.state_dict)
    base = KVCommConfig(pool_byte_budget=BENCH_POOL_BYTE_BUDGET, calibration="none").with_calibration()
    dense_engine = KVCommEngine(runner, loaded.tokenizer, base)
    pool = dense_engine.pool
    chosen = variants(setting)
    engines = {v.name: KVCommEngine(runner, loaded.tokenizer, base.with_(**v.overrides), pool) for v in chosen}
    agents = list(agents) if agents is not None else math_agents(setting.agents)
    sampling = Sampling(max_new_tokens=setting.response_tokens, stop_token_ids=dense_engine.stop_token_ids)
    measured_q = load_questions(setting.data, setting.questions, seed=setting.seed, lines=setting.lines)
    warmup_q = load_questions(setting.data, setting.warmup, skip=setting.questions, seed=setting.seed,
                              lines=setting.lines)
    cases = dense_cases(dense_engine, agents, measured_q, sampling, progress=progress,
                        desc="dense responses (measured questions)")
    warmup = warmer(dense_engine, agents, warmup_q, setting.warmup_mode, setting.response_tokens, sampling,
                    progress)(dense_engine, "warm-up")

    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(cases) * len(agents), desc="measure", unit="turn", disable=not progress, file=sys.stderr)
    for case in cases:
        traces = kvcomm_turns(dense_engine, agents, case, sampling, mode="kvcomm", trace_gate=True)
        ratios = entropy_ratios(dense_engine, case.contents)
        for index, agent in enumerate(agents):
            contents = {n: case.contents[n] for n in agent.placeholders()}
            oracle, dense_s = timed_prepare(dense_engine, TurnRequest(agent, contents, "dense", sampling, NAMESPACE))
            # what a gate's fallback costs: the exact prefill after the agent's own prefix (the engine's dense turns)
            _, fallback_s = timed_prepare(dense_engine, TurnRequest(agent, contents, "dense-prefix", sampling,
                                                                    NAMESPACE))
            dense_logits = oracle.last_logits[-1].float()
            vouched = traces[index].reused or traces[index].reason == "new_anchor:high_entropy"
            entropy_ratio = max((ratios[n] for n in contents), default=0.0) if vouched else math.inf
            row: dict[str, Any] = {"line": case.line, "agent": agent.agent_id, "prompt_tokens": len(oracle.prompt_ids),
                                   "dense_margin": top_margin(dense_logits),
                                   "dense_prepare_ms": dense_s * 1e3, "fallback_prepare_ms": fallback_s * 1e3,
                                   "entropy_gate_dense": not traces[index].reused,
                                   "entropy_ratio": entropy_ratio, "gate_reason": traces[index].reason,
                                   "variants": {}}
            shift = len(rows) % len(chosen)
            for variant in chosen[shift:] + chosen[:shift]:
                prepared, seconds = timed_prepare(engines[variant.name], TurnRequest(
                    agent, contents, variant.mode, sampling, NAMESPACE), force_reuse=True)
                logits = prepared.last_logits[-1].float()
                row["variants"][variant.name] = {
                    "kl": kl_divergence(dense_logits, logits),
                    "top1_agree": int(logits.argmax()) == int(dense_logits.argmax()),
                    "prepare_ms": seconds * 1e3, "recomputed_tokens": prepared.recomputed,
                    "forecast": None if prepared.forecast is None else prepared.forecast.predicted_kl,
                    **first_token_signals(logits)}
            rows.append(row)
            bar.update(1)
    bar.close()
    return {"benchmark": "pareto", "model": loaded.source, "model_key": model_key(model),
            "dtype": str(loaded.dtype).replace("torch.", ""), "device": str(loaded.device),
            "threads": torch.get_num_threads(),
            "setting": {**asdict(setting), "variants": [asdict(v) for v in chosen]},
            "config": base.to_dict(),
            "questions": {"measured": [line for line, _ in measured_q], "warmup": [line for line, _ in warmup_q]},
            "warmup": warmup, "pool": pool_summary(pool), "turns": len(rows), "rows": rows,
            "timings": {"total_s": time.perf_counter() - started}}


def entropy_ratios(engine: KVCommEngine, contents: dict[str, Any]) -> dict[str, float]:
    """Per content: the entropy gate's entropy / log2(N compatible anchors) on the engine's pool (the gate sends its
    consumers dense at gamma iff this exceeds gamma); inf where the pool cannot vouch at any gamma (cold pool, too
    few compatible anchors); 0 for empty content (never gated)."""
    snapshot = engine.pool.snapshot(NAMESPACE)
    out = {}
    for name, content in contents.items():
        if not content.num_tokens:
            out[name] = 0.0
            continue
        decision = gate(content.base, snapshot.anchors(name), engine.config)
        vouches = decision.reason in ("matched", "high_entropy")
        out[name] = decision.entropy / math.log2(decision.compatible) if vouches else math.inf
    return out


# ------------------------------------------------------------------------------------------------------------
# Summaries: per variant, and the gate sweep
# ------------------------------------------------------------------------------------------------------------
def summarize(report: dict[str, Any], calibration: Calibration | None = None) -> dict[str, Any]:
    """Per variant: KL mean and CI, agreement, prepare ms, recomputed tokens, forecast quality; the gate sweep per
    kvcomm ratio (the forecasts scaled by the calibration's kl_scale, or 1); the calibrated point."""
    rows, setting = report["rows"], report["setting"]
    naive_ms = sum(r["variants"]["naive"]["prepare_ms"] for r in rows) / len(rows) if "naive" in rows[0][
        "variants"] else None
    out: dict[str, Any] = {"variants": {}, "gate_sweep": {}, "margin_sweep": {}, "signals": {},
                           "dense_prepare_ms": sum(r["dense_prepare_ms"] for r in rows) / len(rows),
                           "fallback_prepare_ms": sum(map(fallback_ms, rows)) / len(rows),
                           "naive_prepare_ms": naive_ms}
    scale = calibration.knobs["kl_scale"] if calibration is not None else 1.0
    gamma = calibration.knobs["gamma"] if calibration is not None else report["config"]["gamma"]
    out["gamma"] = gamma
    for spec in setting["variants"]:
        name = spec["name"]
        cells = [r["variants"][name] for r in rows]
        kls = [c["kl"] for c in cells]
        entry = {"method": spec["method"], "knob": spec["knob"], "turns": len(cells),
                 "kl_mean": sum(kls) / len(kls), "kl_ci95": list(bootstrap_ci(kls, setting["bootstrap"],
                                                                              setting["seed"])),
                 "top1_agree": sum(c["top1_agree"] for c in cells),
                 "prepare_ms": sum(c["prepare_ms"] for c in cells) / len(cells),
                 "recomputed_tokens": sum(c["recomputed_tokens"] for c in cells) / len(cells)}
        if naive_ms:
            entry["vs_naive"] = entry["prepare_ms"] / naive_ms
        forecasts = [c["forecast"] for c in cells]
        if all(f is not None for f in forecasts):
            entry["forecast_spearman"] = spearman(forecasts, kls)
            if spec["method"] == "kvcomm":
                out["gate_sweep"][name] = gate_sweep(rows, name, scale, gamma)
                if all("margin" in c for c in cells):
                    out["margin_sweep"][name] = [_gate_point(rows, name, scale, gamma, math.inf, m)
                                                 for m in MARGINS]
                    out["signals"][name] = signal_quality(cells)
        out["variants"][name] = entry
    if calibration is not None:
        k = calibration.knobs
        name = kvcomm_variant(k["recompute_ratio"], k["recompute_span_starts"], k["kvcomm_tail"])
        if name in out["variants"]:
            point = _gate_point(rows, name, scale, gamma, calibration.knobs["gate_max_kl"],
                                calibration.knobs["gate_min_margin"])
            out["calibrated"] = {"variant": name, **calibration.knobs, **point}
    return out


# candidate fidelity-gate signals, each oriented so that a higher score should mean a fragile first token
SIGNALS = {"margin": -1.0, "logit_gap": -1.0, "entropy": 1.0, "top1_prob": -1.0, "forecast": 1.0}


def signal_quality(cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How well each candidate signal of one variant's turns predicts what a gate guards: ROC AUC for first-token
    disagreement with dense, Spearman against KL."""
    wrong = [not c["top1_agree"] for c in cells]
    kls = [c["kl"] for c in cells]
    out: dict[str, Any] = {"disagreements": sum(wrong)}
    for signal, sign in SIGNALS.items():
        scores = [sign * c[signal] for c in cells]
        out[signal] = {"auc": auc(scores, wrong), "spearman": spearman(scores, kls)}
    return out


def _gate_point(rows: Sequence[dict[str, Any]], name: str, scale: float, gamma: float, threshold: float,
                min_margin: float = 0.0) -> dict[str, Any]:
    """The three gates replayed on one kvcomm variant: entropy gate at `gamma`, turn gate at `threshold` (on the
    scaled forecast), fidelity gate at `min_margin` (on the reused first token's margin)."""
    before = [r for r in rows
              if r["entropy_ratio"] <= gamma and scale * r["variants"][name]["forecast"] <= threshold]
    reused = [r for r in before if r["variants"][name].get("margin", math.inf) >= min_margin]
    kls = [r["variants"][name]["kl"] for r in reused]
    # per turn, fallbacks included: gated before the reused prefill -> dense; sent back after it -> both
    served_ms = (sum(map(fallback_ms, rows)) + sum(r["variants"][name]["prepare_ms"] for r in before)
                 - sum(map(fallback_ms, reused))) / len(rows)
    return {"threshold": threshold, "min_margin": min_margin, "reuse": len(reused) / len(rows),
            "served_ms": served_ms,
            "kl_reused": sum(kls) / len(kls) if kls else None, "served_kl": sum(kls) / len(rows),
            "top1_served": (sum(r["variants"][name]["top1_agree"] for r in reused) + len(rows) - len(reused))
            / len(rows),
            "prepare_ms_reused": (sum(r["variants"][name]["prepare_ms"] for r in reused) / len(reused)
                                  if reused else None)}


def fallback_ms(row: dict[str, Any]) -> float:
    """What a gate's fallback cost on a measured turn: the exact prefill after the agent's own leading segment
    (a report from before fallbacks reused that prefix has only the whole prompt's dense prefill)."""
    return row.get("fallback_prepare_ms", row["dense_prepare_ms"])


def gate_sweep(rows: Sequence[dict[str, Any]], name: str, scale: float, gamma: float, points: int = 12
               ) -> list[dict[str, Any]]:
    """The gates on one kvcomm variant (entropy gate at `gamma`) at turn-gate thresholds spread over the quantiles
    of its scaled forecasts, and inf."""
    forecasts = sorted(scale * r["variants"][name]["forecast"] for r in rows)
    picks = sorted({forecasts[min(len(forecasts) - 1, int(q * len(forecasts)))]
                    for q in [i / points for i in range(1, points)]}) + [math.inf]
    return [_gate_point(rows, name, scale, gamma, th) for th in picks]


# ------------------------------------------------------------------------------------------------------------
# Table and plot
# ------------------------------------------------------------------------------------------------------------
def markdown_table(report: dict[str, Any], summary: dict[str, Any]) -> str:
    span = report["setting"]["lines"]
    lines = [f"{report['turns']} measured turns (questions from lines {f'{span[0]}:{span[1]}' if span else 'all'} "
             f"of the data), {report['setting']['warmup']} warm-up questions; {report['model']}, {report['dtype']}, "
             f"{report['threads']} thread(s). Dense prefill {summary['dense_prepare_ms']:.0f} ms (a gate's "
             f"fallback, after the agent's own prefix: {summary['fallback_prepare_ms']:.0f} ms), naive "
             f"{fmt(summary['naive_prepare_ms'], '.0f')} ms.", "",
             "| variant | KL(dense‖m) mean [95% CI] | top-1 agree | prepare ms | vs naive | recomputed tokens | "
             "forecast Spearman |", "|---|---|---|---|---|---|---|"]
    for name, v in summary["variants"].items():
        lo, hi = v["kl_ci95"]
        lines.append(f"| {name} | {v['kl_mean']:.4f} [{lo:.4f}, {hi:.4f}] | {v['top1_agree']}/{v['turns']} | "
                     f"{v['prepare_ms']:.0f} | {fmt(v.get('vs_naive'), '.2f')}x | {v['recomputed_tokens']:.1f} | "
                     f"{fmt(v.get('forecast_spearman'), '+.2f')} |")
    if summary["gate_sweep"]:
        lines += ["", f"Turn gate swept (threshold on the predicted KL; the entropy gate's own fallbacks at gamma "
                      f"{summary['gamma']} included):",
                  "", "| variant | threshold | reuse | KL on reused turns | served KL | served top-1 |",
                  "|---|---|---|---|---|---|"]
        for name, points in summary["gate_sweep"].items():
            for p in points[::3] + ([points[-1]] if (len(points) - 1) % 3 else []):
                lines.append(f"| {name} | {fmt(p['threshold'], '.4f')} | {p['reuse']:.0%} | "
                             f"{fmt(p['kl_reused'], '.4f')} | {p['served_kl']:.4f} | {p['top1_served']:.0%} |")
    if summary.get("signals"):
        lines += ["", "Which signal predicts a fragile turn: ROC AUC for first-token disagreement with dense (0.5: "
                      "chance), Spearman against KL in brackets (a small margin, logit gap or top-1 probability and "
                      "a large entropy or forecast counted as fragile):", "",
                  "| variant | disagreements | " + " | ".join(SIGNALS) + " |", "|---|---|" + "---|" * len(SIGNALS)]
        for name, q in summary["signals"].items():
            lines.append(f"| {name} | {q['disagreements']} | " + " | ".join(
                f"{fmt(q[sig]['auc'], '.2f')} ({fmt(q[sig]['spearman'], '+.2f')})" for sig in SIGNALS) + " |")
        lines += ["", "Fidelity gate swept (dense when the reused first token's top-1/top-2 margin is below the "
                      "threshold; turn gate off):", "",
                  "| variant | min margin | reuse | KL on reused turns | served top-1 | ms per turn, fallbacks "
                  "included (vs naive) |", "|---|---|---|---|---|---|"]
        naive = summary["naive_prepare_ms"]
        for name, points in summary["margin_sweep"].items():
            for p in points:
                lines.append(f"| {name} | {p['min_margin']:.3f} | {p['reuse']:.0%} | {fmt(p['kl_reused'], '.4f')} | "
                             f"{p['top1_served']:.1%} | {p['served_ms']:.0f} "
                             f"({fmt(p['served_ms'] / naive if naive else None, '.2f')}x) |")
    if "calibrated" in summary:
        c = summary["calibrated"]
        lines += ["", f"Calibrated point ({c['variant']}, gamma {c['gamma']}, gate_max_kl "
                      f"{fmt(c['threshold'], '.4f')}, gate_min_margin {c['min_margin']:.4f}): reuse "
                      f"{c['reuse']:.0%}, KL on reused turns {fmt(c['kl_reused'], '.4f')}, served KL "
                      f"{c['served_kl']:.4f}, served top-1 {c['top1_served']:.1%}, reused-turn prepare "
                      f"{fmt(c['prepare_ms_reused'], '.0f')} ms, {c['served_ms']:.0f} ms per turn with fallbacks."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------
def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def add_arguments(parser: argparse.ArgumentParser, defaults: Setting = Setting()) -> None:
    """Arguments of `kvcomm bench pareto` (and, with other defaults, of `kvcomm calibrate`)."""
    model_arguments(parser, defaults)
    parser.add_argument("--ratios", default=",".join(str(r) for r in defaults.ratios),
                        help="recompute ratios swept (shares of the reused span)")
    parser.add_argument("--span-starts", default=",".join(str(k) for k in defaults.span_starts),
                        help="k values of kvcomm+starts (first k tokens of every placeholder recomputed)")
    parser.add_argument("--recompute-starts", default=",".join(str(k) for k in defaults.recompute_starts),
                        help="kvcomm recipes: first k tokens of every placeholder recomputed besides each ratio")
    parser.add_argument("--kvcomm-tails", default=",".join(str(t) for t in defaults.kvcomm_tails),
                        help="kvcomm recipes: last_segment (recomputed whole), last_token or a count N (only the "
                             "last 1 or N tokens recomputed, the query choosing among the segment's others)")
    parser.add_argument("--methods", default=",".join(defaults.methods))
    parser.add_argument("--calibration", default="auto",
                        help="mark this calibration's point: auto (the model's file), none, or a file")
    parser.add_argument("--report", default=None, metavar="JSON",
                        help="summarize and plot this earlier report (its rows) instead of measuring again")


def setting_from_args(args: argparse.Namespace, **overrides: Any) -> Setting:
    return Setting(**{**dict(questions=args.questions, warmup=args.warmup, agents=args.agents,
                             response_tokens=args.response_tokens, seed=args.seed, data=args.data,
                             warmup_mode=args.warmup_mode, lines=parse_lines(args.lines),
                             ratios=_floats(args.ratios),
                             span_starts=tuple(int(k) for k in args.span_starts.split(",") if k.strip()),
                             recompute_starts=tuple(int(k) for k in args.recompute_starts.split(",") if k.strip()),
                             kvcomm_tails=tuple(int(t) if t.strip().isdigit() else t.strip()
                                                for t in args.kvcomm_tails.split(",") if t.strip()),
                             methods=tuple(m.strip() for m in args.methods.split(",") if m.strip())), **overrides})


def cli_main(args: argparse.Namespace) -> int:
    """`kvcomm bench pareto`: measure, print the tables, write the JSON and the plot."""
    apply_threads(args)
    if args.report:
        report = json.loads(Path(args.report).read_text())
    else:
        report = measure(args.model, setting_from_args(args), device=args.device, dtype=args.dtype,
                         random_weights=args.random_weights, progress=not args.quiet)
    path = find(args.model, args.calibration)
    calibration = Calibration.load(path) if path is not None else None
    report["summary"] = summarize(report, calibration)
    publish(report, markdown_table(report, report["summary"]), args.json, args.plot,
            lambda path: plot(report, report["summary"], path))
    return 0
