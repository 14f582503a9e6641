"""`kvcomm calibrate`: fit a model's calibration on a development split and write the file configs point at.

It measures kvcomm with forced reuse with every candidate recompute recipe on every turn of the development split
(`kvcomm.bench.pareto.measure`: kvcomm at each ratio with span starts and each tail, and naive reuse, the
preparation cap's yardstick), traces the entropy gate's own decisions, then `kvcomm.calibration.fit` chooses gamma,
the recompute recipe, the turn gate's threshold and scale and the fidelity gate's margin for `--target-kl`,
`--min-top1`, `--min-reuse` and `--max-vs-naive`, and the file is written to
``<calibration dir>/<model>.json`` (where ``calibration: auto`` finds it) or to `--out`; `--report` fits again from
an earlier measurement. The default split is lines 0:500 of the GSM8K file: keep the figures you report on other
lines.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..calibration import FOLDS, Calibration, TurnMeasurement, calibration_dir, fit, model_key, recipe_label
from ..tail_prefill import tail_tokens
from . import pareto
from .cli import apply_threads
from .turns import fmt

# 64 questions = 192 turns: at 97% the fit's 95% lower bound on first-token agreement needs about that many.
# The recipes (chosen on an earlier development run, results in the README): every placeholder's first 2 tokens
# (they helped at every ratio), 10-30% chosen by the query, the last fixed segment recomputed whole or only its
# last 4, 8 or 12 tokens (the last token alone lost first tokens).
DEFAULTS = pareto.Setting(questions=64, warmup=15, lines=(0, 500), methods=("naive", "kvcomm"),
                          ratios=(0.1, 0.15, 0.2, 0.25, 0.3), recompute_starts=(2,),
                          kvcomm_tails=("last_segment", 4, 8, 12))


def measurements(report: dict[str, Any]) -> list[TurnMeasurement]:
    """`pareto.measure`'s rows as the fit's input: one per (turn, kvcomm recipe)."""
    out = []
    for spec in report["setting"]["variants"]:
        if spec["method"] != "kvcomm":
            continue
        recipe = spec["overrides"]
        tail = recipe.get("kvcomm_tail", "last_segment")
        for row in report["rows"]:
            cell = row["variants"][spec["name"]]
            out.append(TurnMeasurement(ratio=spec["knob"], kl=cell["kl"], forecast=cell["forecast"],
                                       top1_agree=cell["top1_agree"], prepare_ms=cell["prepare_ms"],
                                       entropy_ratio=row["entropy_ratio"], margin=cell.get("margin", math.inf),
                                       dense_ms=pareto.fallback_ms(row),
                                       naive_ms=row["variants"].get("naive", {}).get("prepare_ms", 0.0),
                                       group=row["line"],
                                       span_starts=recipe.get("recompute_span_starts", 0),
                                       kvcomm_tail=tail, chosen_tokens=chosen_tokens(cell, row, tail)))
    return out


def chosen_tokens(cell: dict[str, Any], row: dict[str, Any], kvcomm_tail: str | int) -> int:
    """The cached tokens a kvcomm variant recomputed on a turn: its recomputed tokens less its tail
    (`tail_prefill.tail_tokens`, the last fixed segment's length being what naive recomputed); -1 where naive was
    not measured."""
    naive = row["variants"].get("naive")
    if naive is None:
        return -1
    return cell["recomputed_tokens"] - tail_tokens(kvcomm_tail, naive["recomputed_tokens"], row["prompt_tokens"])


def calibrate(report: dict[str, Any], *, model: str, target_kl: float, min_reuse: float,
              min_top1: float = 0.97, max_vs_naive: float | None = None) -> Calibration:
    setting = report["setting"]
    data = {"path": setting["data"], "lines": setting["lines"], "questions": setting["questions"],
            "warmup": setting["warmup"], "warmup_mode": setting["warmup_mode"], "seed": setting["seed"],
            "turns": report["turns"], "measured_lines": report["questions"]["measured"],
            "warmup_lines": report["questions"]["warmup"], "dtype": report["dtype"]}
    if max_vs_naive is not None and not all("naive" in row["variants"] for row in report["rows"]):
        raise ValueError("a preparation cap against naive needs naive measured on every turn (--methods naive,...)")
    return fit(measurements(report), model=model, target_kl=target_kl, min_reuse=min_reuse, min_top1=min_top1,
               max_vs_naive=max_vs_naive, data=data)


def describe(calibration: Calibration) -> str:
    k = calibration.knobs
    dev = calibration.dev
    predictor = calibration.predictor
    lines = [f"calibration for {calibration.model}: gamma {k['gamma']}, recompute "
             f"{recipe_label(k['recompute_ratio'], k['recompute_span_starts'], k['kvcomm_tail'])} (at most "
             f"{fmt(k['recompute_max_tokens'], '.0f')} tokens), "
             f"gate_max_kl {fmt(k['gate_max_kl'], '.4f')}, kl_scale {k['kl_scale']:.3f}, gate_min_margin "
             f"{k['gate_min_margin']:.4f} ({calibration.why}; targets {'met' if calibration.met else 'NOT met'} on "
             f"the development turns)",
             f"  development turns: reuse {dev['reuse']:.0%} (fidelity gate sent {dev['margin_gated']:.0%} back), KL "
             f"on reused turns {dev['kl_reused']:.4f} (95% bound {dev['kl_reused_upper95']:.4f}), served top-1 "
             f"{dev['top1_served']:.1%} (95% bound {dev['top1_served_lower95']:.1%}), reused-turn prepare "
             f"{fmt(dev['prepare_ms_reused'], '.0f')} ms ({fmt(dev.get('prepare_vs_naive'), '.2f')}x naive's), "
             f"per turn "
             f"with fallbacks {dev['cost_ms']:.0f} ms"
             + (f"; the fidelity gate out of sample ({FOLDS} folds): reuse {dev['cv']['reuse']:.0%}, served top-1 "
                f"{dev['cv']['top1_served']:.1%} (95% bound {dev['cv']['top1_served_lower95']:.1%})"
                if "cv" in dev else ""),
             f"  forecast vs measured KL: Spearman {predictor['spearman']:+.2f} over {predictor['turns']} (turn, "
             f"recipe) pairs; first-token margin vs disagreement, AUC per recipe: " + ", ".join(
                 f"{r}: {fmt(a, '.2f')}" for r, a in predictor.get("margin_auc_per_recipe", {}).items()),
             "  cheapest choice per recipe (or its best try): " + "; ".join(
                 f"{recipe_label(c['ratio'], c['span_starts'], c['kvcomm_tail'])} (gamma {c['gamma']}, margin "
                 f"{c['min_margin']:.3f}): reuse {c['reuse']:.0%} {fmt(c.get('prepare_vs_naive'), '.2f')}x naive, KL "
                 f"{c['kl_reused']:.4f} top-1 {c['top1_served']:.1%} (>= {c['top1_served_lower95']:.1%}) "
                 f"{c['cost_ms']:.0f} ms/turn"
                 for c in calibration.candidates)]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pareto.add_arguments(parser, DEFAULTS)
    parser.set_defaults(lines="0:500", calibration="none")
    parser.add_argument("--target-kl", type=float, default=0.01, help="mean KL on reused turns to stay under")
    parser.add_argument("--min-reuse", type=float, default=0.85, help="reuse rate to reach (both gates)")
    parser.add_argument("--min-top1", type=float, default=0.97,
                        help="first-token agreement with dense to keep on the served turns")
    parser.add_argument("--max-vs-naive", type=float, default=1.3,
                        help="a reused turn's preparation cap, a multiple of naive reuse's on the same turns (0: none)")
    parser.add_argument("--out", default=None,
                        help="write the calibration here (default: <calibration dir>/<model>.json, where "
                             "`calibration: auto` finds it)")


def cli_main(args: argparse.Namespace) -> int:
    """`kvcomm calibrate`: measure on the development split, fit, write the file, print what was chosen."""
    apply_threads(args)
    if args.report:             # fit again from an earlier measurement (its --json)
        report = json.loads(Path(args.report).read_text())
    else:
        report = pareto.measure(args.model, pareto.setting_from_args(args), device=args.device, dtype=args.dtype,
                                random_weights=args.random_weights, progress=not args.quiet)
    calibration = calibrate(report, model=args.model, target_kl=args.target_kl, min_reuse=args.min_reuse,
                            min_top1=args.min_top1, max_vs_naive=args.max_vs_naive or None)
    path = calibration.save(Path(args.out) if args.out else calibration_dir() / f"{model_key(args.model)}.json")
    print(describe(calibration))
    print(f"wrote {path}", file=sys.stderr)
    if args.json:
        from . import write_json_report
        write_json_report(args.json, report)
    return 0
