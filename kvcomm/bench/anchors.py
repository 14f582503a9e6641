"""`kvcomm bench anchors`: the anchor-pool size V against memory, reuse rate, KL and offset time.

For each V a fresh pool (corrected config by default, ``max_anchors=V``) is warmed on the same warm-up questions
(replay by default: one dense pass serves every V), then on the measured turns: pool bytes, the entropy gate's reuse
rate, KL(dense || kvcomm) with forced reuse, and the offset step's time. Runnable as ``python -m kvcomm.bench.anchors``.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from . import publish
from ..config import KVCommConfig
from ..engine import TurnRequest
from ..generation import Sampling
from ..names import EMBEDDED_MODEL
from ..model_loading import LoadedModel
from ..runner import ModelRunner
from ..templates import AgentTemplate
from .fidelity import Setting, setting_from_args
from .cli import apply_threads, standalone_main
from .turns import (BENCH_POOL_BYTE_BUDGET, NAMESPACE, bootstrap_ci, dense_cases,
                    engine_for, fmt, kl_divergence, kvcomm_turns, load_checked, load_questions, math_agents,
                    model_arguments, pool_summary, warmer)

SWEEP_ANCHORS = (1, 5, 10, 20, 40)
DEFAULTS = Setting(warmup=40, warmup_mode="replay")
CORRECTED = KVCommConfig(calibration="none").with_calibration()   # offsets alone: no recompute, no turn gate


def sweep_anchors(model: str = EMBEDDED_MODEL, *, anchors: Sequence[int] = SWEEP_ANCHORS,
                  setting: Setting | None = None, agents: Sequence[AgentTemplate] | None = None,
                  base_config: KVCommConfig | None = None, device: str = "cpu", dtype: str | None = None,
                  random_weights: bool = False,
                  loaded: LoadedModel | None = None, progress: bool = True) -> dict[str, Any]:
    """For each V in `anchors`: a fresh pool with ``max_anchors=V`` warmed on the same warm-up jobs, then on the
    measured turns the pool bytes, the gate's reuse rate, KL(dense || kvcomm) with forced reuse, and the time of
    the offset step. `base_config` defaults to the corrected config (with a byte budget that never binds)."""
    setting = setting or DEFAULTS
    started = time.perf_counter()
    loaded = load_checked(model, device, dtype, random_weights, loaded)
    runner = ModelRunner(loaded.spec, loaded.state_dict)
    base_config = (base_config or CORRECTED).with_(pool_byte_budget=BENCH_POOL_BYTE_BUDGET)
    dense_engine = engine_for(runner, loaded.tokenizer, base_config)
    agents_source = "caller" if agents is not None else "kvcomm.harness.roles.fully_connected_math_agents"
    agents = list(agents) if agents is not None else math_agents(setting.agents)
    sampling = Sampling(max_new_tokens=setting.response_tokens, stop_token_ids=dense_engine.stop_token_ids)
    measured_q = load_questions(setting.data, setting.questions, seed=setting.seed, lines=setting.lines)
    warmup_q = load_questions(setting.data, setting.warmup, skip=setting.questions, seed=setting.seed,
                              lines=setting.lines)
    warm = warmer(dense_engine, agents, warmup_q, setting.warmup_mode, setting.response_tokens, sampling, progress)
    cases = dense_cases(dense_engine, agents, measured_q, sampling, progress=progress,
                        desc="dense responses (measured questions)")
    oracle_logits = []
    for case in cases:
        for agent in agents:
            prepared = dense_engine.prepare(TurnRequest(agent, {n: case.contents[n] for n in agent.placeholders()},
                                                        "dense", sampling, NAMESPACE))
            oracle_logits.append(prepared.last_logits[-1].float())

    rows = []
    for v in anchors:
        engine = engine_for(runner, loaded.tokenizer, base_config.with_(max_anchors=v))
        warm_started = time.perf_counter()
        warmup = warm(engine, f"V={v}: warm-up")
        warm_s = time.perf_counter() - warm_started
        traces = []
        for case in tqdm(cases, desc=f"V={v}: measure", unit="job", disable=not progress, file=sys.stderr):
            traces.extend(kvcomm_turns(engine, agents, case, sampling))
        kls = [kl_divergence(d, t.forced.last_logits) for d, t in zip(oracle_logits, traces)]
        agree = sum(int(d.argmax()) == int(t.forced.last_logits.argmax()) for d, t in zip(oracle_logits, traces))
        gated_kls = [k for k, t in zip(kls, traces) if t.reused]
        offsets = [t.forced.offset_s for t in traces if t.forced.offset_s is not None]
        pool = pool_summary(engine.pool)
        rows.append({
            "max_anchors": v, "pool_bytes": pool["bytes"], "anchors": pool["anchors"], "evictions": pool["evictions"],
            "warmup_reuse_rate": warmup["reused"] / max(1, warmup["turns"]),
            "gate_reuse_rate": sum(t.reused for t in traces) / len(traces),
            "gate_reasons": dict(Counter(t.reason for t in traces)),
            "kl_mean": sum(kls) / len(kls), "kl_ci95": list(bootstrap_ci(kls, setting.bootstrap, setting.seed)),
            "kl_mean_gate_reused": sum(gated_kls) / len(gated_kls) if gated_kls else None,
            "top1_agree": agree, "turns": len(traces),
            "offset_ms_mean": sum(offsets) / len(offsets) * 1e3 if offsets else None,
            "prepare_ms_mean": sum(t.forced.prepare_s for t in traces) / len(traces) * 1e3,
            "warmup_s": warm_s,
        })
    return {
        "benchmark": "anchors",
        "model": loaded.source, "dtype": str(loaded.dtype).replace("torch.", ""), "device": str(loaded.device),
        "threads": torch.get_num_threads(),
        "setting": {**asdict(setting), "methods": ["kvcomm"], "anchors": list(anchors)},
        "config": base_config.to_dict(), "config_mode": base_config.mode, "agents_source": agents_source,
        "questions": {"measured": [line for line, _ in measured_q], "warmup": [line for line, _ in warmup_q]},
        "rows": rows,
        "timings": {"total_s": time.perf_counter() - started},
    }


def markdown_table(report: dict[str, Any]) -> str:
    lines = [f"Anchor sweep ({report['config_mode']} config, {report['setting']['warmup']} warm-up questions, "
             f"{report['rows'][0]['turns']} measured turns; {report['model']}, {report['dtype']}).", "",
             "| V | anchors (per placeholder) | pool MB | gate reuse | KL mean [95% CI] | KL on gate-reused | "
             "top-1 agree | offset ms | evictions |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        anchors = ", ".join(str(n) for n in r["anchors"].values())
        lo, hi = r["kl_ci95"]
        lines.append(f"| {r['max_anchors']} | {anchors} | {r['pool_bytes'] / 2**20:.0f} | {r['gate_reuse_rate']:.0%} | "
                     f"{r['kl_mean']:.3f} [{lo:.3f}, {hi:.3f}] | {fmt(r['kl_mean_gate_reused'])} | "
                     f"{r['top1_agree']}/{r['turns']} | {fmt(r['offset_ms_mean'], '.1f')} | "
                     f"{r['evictions']['count']} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    """KL, gate reuse rate, pool MB and offset time against V."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["rows"]
    v = [r["max_anchors"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    series = [("KL(dense ‖ kvcomm)", [r["kl_mean"] for r in rows]),
              ("gate reuse rate", [r["gate_reuse_rate"] for r in rows]),
              ("pool MB", [r["pool_bytes"] / 2**20 for r in rows]),
              ("offset step ms", [r["offset_ms_mean"] or 0.0 for r in rows])]
    for ax, (label, ys) in zip(axes, series):
        ax.plot(v, ys, marker="o")
        ax.set_xscale("log")
        ax.set_xticks(v, [str(x) for x in v])
        ax.set_xlabel("V (max anchors per placeholder)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    lo = [r["kl_ci95"][0] for r in rows]
    hi = [r["kl_ci95"][1] for r in rows]
    axes[0].fill_between(v, lo, hi, alpha=0.2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `kvcomm bench anchors` (defaults: 40 warm-up questions, replayed: one dense pass for every V)."""
    model_arguments(parser, DEFAULTS)
    parser.add_argument("--v", default=",".join(str(v) for v in SWEEP_ANCHORS), help="anchor counts V")
    parser.add_argument("--reference", action="store_true", help="sweep the reference config instead")


def cli_main(args: argparse.Namespace) -> int:
    """`kvcomm bench anchors`: run the sweep, print the table, write the JSON and the plot."""
    apply_threads(args)
    anchors = tuple(int(v) for v in args.v.split(","))
    report = sweep_anchors(args.model, anchors=anchors, setting=setting_from_args(args, ("kvcomm-corrected",)),
                           base_config=KVCommConfig.reference() if args.reference else CORRECTED,
                           device=args.device, dtype=args.dtype, random_weights=args.random_weights,
                           progress=not args.quiet)
    publish(report, markdown_table(report), args.json, args.plot, lambda path: plot(report, path))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return standalone_main("anchors", add_arguments, cli_main, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
