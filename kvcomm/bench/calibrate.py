"""`kvcomm calibrate`: fit a model's calibration on a development split and write the file configs point at.

It measures kvcomm with forced reuse at every candidate recompute ratio on every turn of the development split
(`kvcomm.bench.pareto.measure`, kvcomm variants only), traces the entropy gate's own decisions, then
`kvcomm.calibration.fit` chooses gamma, the recompute ratio, the turn gate's threshold and scale and the fidelity
gate's margin for `--target-kl`, `--min-top1` and `--min-reuse`, and the file is written to
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

from ..calibration import Calibration, TurnMeasurement, calibration_dir, fit, model_key
from . import pareto
from .cli import apply_threads
from .turns import fmt

# 64 questions = 192 turns: at 97% the fit's 95% lower bound on first-token agreement needs about that many
DEFAULTS = pareto.Setting(questions=64, warmup=15, lines=(0, 500), methods=("kvcomm",), ratios=(0.1, 0.2, 0.3, 0.4))


def measurements(report: dict[str, Any]) -> list[TurnMeasurement]:
    """`pareto.measure`'s rows as the fit's input: one per (turn, kvcomm ratio)."""
    out = []
    for spec in report["setting"]["variants"]:
        if spec["method"] != "kvcomm":
            continue
        for row in report["rows"]:
            cell = row["variants"][spec["name"]]
            out.append(TurnMeasurement(ratio=spec["knob"], kl=cell["kl"], forecast=cell["forecast"],
                                       top1_agree=cell["top1_agree"], prepare_ms=cell["prepare_ms"],
                                       entropy_ratio=row["entropy_ratio"], margin=cell.get("margin", math.inf),
                                       dense_ms=row["dense_prepare_ms"]))
    return out


def calibrate(report: dict[str, Any], *, model: str, target_kl: float, min_reuse: float,
              min_top1: float = 0.97) -> Calibration:
    setting = report["setting"]
    data = {"path": setting["data"], "lines": setting["lines"], "questions": setting["questions"],
            "warmup": setting["warmup"], "warmup_mode": setting["warmup_mode"], "seed": setting["seed"],
            "turns": report["turns"], "measured_lines": report["questions"]["measured"],
            "warmup_lines": report["questions"]["warmup"], "dtype": report["dtype"]}
    return fit(measurements(report), model=model, target_kl=target_kl, min_reuse=min_reuse, min_top1=min_top1,
               data=data)


def describe(calibration: Calibration) -> str:
    k = calibration.knobs
    dev = calibration.dev
    predictor = calibration.predictor
    lines = [f"calibration for {calibration.model}: gamma {k['gamma']}, recompute_ratio {k['recompute_ratio']:.2f}, "
             f"gate_max_kl {fmt(k['gate_max_kl'], '.4f')}, kl_scale {k['kl_scale']:.3f}, gate_min_margin "
             f"{k['gate_min_margin']:.4f} ({calibration.why}; targets {'met' if calibration.met else 'NOT met'} on "
             f"the development turns)",
             f"  development turns: reuse {dev['reuse']:.0%} (fidelity gate sent {dev['margin_gated']:.0%} back), KL "
             f"on reused turns {dev['kl_reused']:.4f} (95% bound {dev['kl_reused_upper95']:.4f}), served top-1 "
             f"{dev['top1_served']:.1%} (95% bound {dev['top1_served_lower95']:.1%}), reused-turn prepare {fmt(dev['prepare_ms_reused'], '.0f')} ms, per turn "
             f"with fallbacks {dev['cost_ms']:.0f} ms",
             f"  forecast vs measured KL: Spearman {predictor['spearman']:+.2f} over {predictor['turns']} (turn, "
             f"ratio) pairs; first-token margin vs disagreement, AUC per ratio: " + ", ".join(
                 f"{r}: {fmt(a, '.2f')}" for r, a in predictor.get("margin_auc_per_ratio", {}).items()),
             "  cheapest choice per ratio (or its best try): " + "; ".join(
                 f"{c['ratio']:.2f} (gamma {c['gamma']}, margin {c['min_margin']:.3f}): reuse {c['reuse']:.0%} KL "
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
                            min_top1=args.min_top1)
    path = calibration.save(Path(args.out) if args.out else calibration_dir() / f"{model_key(args.model)}.json")
    print(describe(calibration))
    print(f"wrote {path}", file=sys.stderr)
    if args.json:
        from . import write_json_report
        write_json_report(args.json, report)
    return 0
