"""The fidelity report as people read it: the markdown tables (methods, KV error by token group, by agent, the
gates and pools) and the plot (per-layer K/V error, KL with its CI). It reads a finished report dict and measures
nothing (`kvcomm.bench.fidelity` does).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..calibration import wilson
from .fidelity_setting import CONFIDENT_MARGIN, GATE_TRACED
from .turns import fmt


def markdown_table(report: dict[str, Any]) -> str:
    """The fidelity report as markdown: one row per method, then the gate, the pools and the setting."""
    turns = report["turns"]
    budget = report["setting"]["continuation_tokens"]
    lines = [
        f"{turns} turns ({report['setting']['questions']} questions x {len(report['agents'])} agents), "
        f"{report['setting']['warmup']} warm-up questions; prompts {report['prompt_tokens']['min']}-"
        f"{report['prompt_tokens']['max']} tokens, shared {report['shared_tokens']['min']}-"
        f"{report['shared_tokens']['max']} tokens; {report['model']}, {report['dtype']}, {report['device']}.",
        "",
        f"| method | KL(dense‖m) mean [95% CI] | top-1 agree | confident (margin ≥ {CONFIDENT_MARGIN}) | "
        f"greedy {budget}: exact / mean prefix | prepare ms | offset ms | recomputed tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, m in report["methods"].items():
        lo, hi = m["kl_ci95"]
        lines.append(
            f"| {method} | {m['kl_mean']:.3f} [{fmt(lo)}, {fmt(hi)}] | {m['top1_agree']}/{m['turns']} | "
            f"{m['confident_agree']}/{m['confident_turns']} | {m['greedy_exact']}/{m['turns']} / "
            f"{m['greedy_match_mean']:.1f} | {m['prepare_ms_mean']:.0f} | {fmt(m['offset_ms_mean'], '.1f')} | "
            f"{m['recomputed_tokens_mean']:.1f} |")
    lines += ["", "Relative error vs dense, mean over layers (and at the last layer), by token group:", "",
              "| method | K span | V span | V span, last layer | V question | V responses | V fixed segments |",
              "|---|---|---|---|---|---|---|"]
    for method, m in report["methods"].items():
        last_v = m["span_rel_err_v"][-1] if "span_rel_err_v" in m else None
        lines.append(
            f"| {method} | {fmt(m.get('span_rel_err_k_mean'))} | {fmt(m.get('span_rel_err_v_mean'))} | "
            f"{fmt(last_v)} | {fmt(m.get('question_rel_err_v_mean'))} | "
            f"{fmt(m.get('responses_rel_err_v_mean'))} | {fmt(m.get('fixed_rel_err_v_mean'))} |")
    agent_ids = list(next(iter(report["methods"].values()))["by_agent"])
    lines += ["", "By agent (agent 1 reads only the question): KL mean, top-1 agreement:", "",
              "| method | " + " | ".join(f"agent {a}" for a in agent_ids) + " |",
              "|---|" + "---|" * len(agent_ids)]
    for method, m in report["methods"].items():
        cells = [f"{m['by_agent'][a]['kl_mean']:.3f}, {m['by_agent'][a]['top1_agree']}/{m['by_agent'][a]['turns']}"
                 for a in agent_ids]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    probe = report.get("probe", {})
    if probe:
        lines += ["", "The probe (fidelity-probe.md; 48 turns of agents 2-3, its own prompts): " + "; ".join(
            f"{name} KL {p['kl']:.3f}, top-1 {p['top1'][0]}/{p['top1'][1]}, greedy exact {p['greedy_exact'][0]}/"
            f"{p['greedy_exact'][1]}" for name, p in probe.items()) + "."]
    lines += ["", f"Dense prefill (oracle) mean {report['dense_prepare_ms_mean']:.0f} ms.", "",
              "| pool | gate reuse rate on measured turns | KL on gate-reused turns | served KL [95% CI] | "
              "served top-1 | gate reasons | predicted KL mean (Spearman vs measured) | warm-up reuse | "
              "anchors per placeholder | pool MB | placeholders with offsets | compatible / effective anchors |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, pool_name in GATE_TRACED.items():
        if method not in report["methods"]:
            continue
        m, pool, warm, off = (report["methods"][method], report["pools"][pool_name], report["warmup"][pool_name],
                              report["offsets"][pool_name])
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(m["gate_reasons"].items()))
        anchors = ", ".join(f"{k} {v}" for k, v in pool["anchors"].items())
        lo, hi = m["served_kl_ci95"]
        predicted = (f"{m['predicted_kl_mean']:.3f} ({m['predicted_kl_spearman']:+.2f})"
                     if "predicted_kl_mean" in m else "-")
        lines.append(
            f"| {pool_name} | {m['gate_reuse_rate']:.0%} | {fmt(m['kl_mean_gate_reused'])} | "
            f"{m['served_kl_mean']:.3f} [{fmt(lo)}, {fmt(hi)}] | {m['served_top1_agree']}/{m['turns']} | "
            f"{reasons} | {predicted} | "
            f"{warm['reused']}/{warm['turns']} | {anchors} | {pool['bytes'] / 2**20:.0f} | "
            f"{off['with_offsets']}/{off['placeholders']} | {off['compatible_mean']:.1f} / "
            f"{off['effective_mean']:.1f} |")
    lines += ["", *served_table(report)]
    return "\n".join(lines)


NAIVE = "base-only+tail"     # the engine's naive mode: base KV re-rotated, the trailing segment recomputed


def served_table(report: dict[str, Any]) -> list[str]:
    """Per method, with 95% Wilson intervals: first-token agreement (forced reuse, and as served where the gates
    decide: a turn sent dense agrees), greedy exact matches, the gates' reuse, and preparation against naive reuse
    (forced; and as served, a fallback costing both of its attempts)."""
    methods = report["methods"]
    naive = methods.get(NAIVE, {}).get("prepare_ms_mean")
    lines = [f"| method | first token = dense | served first token | greedy {report['setting']['continuation_tokens']}"
             f" exact | reuse (both gates) | prepare vs naive | served prepare vs naive |",
             "|---|---|---|---|---|---|---|"]
    for method, m in methods.items():
        if method == "dense":
            continue
        n = m["turns"]
        gated = "gate_reuse_rate" in m
        reused = round(m["gate_reuse_rate"] * n) if gated else None
        served = m.get("served_prepare_ms_mean")
        lines.append(
            f"| {method} | {_count(m['top1_agree'], n)} | {_count(m['served_top1_agree'], n) if gated else '-'} | "
            f"{_count(m['greedy_exact'], n)} | {_count(reused, n) if gated else '-'} | "
            f"{_times(m['prepare_ms_mean'], naive)} | {_times(served, naive)} |")
    return lines


def _times(ms: float | None, naive: float | None) -> str:
    return f"{ms / naive:.2f}x" if ms and naive else "-"


def _count(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k}/{n} = {k / n:.0%} [{lo:.0%}, {hi:.0%}]"


def plot(report: dict[str, Any], path: str) -> None:
    """Per-layer relative V and K error over the reused span, per method, and KL with its CI."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_v, ax_k, ax_kl) = plt.subplots(1, 3, figsize=(17, 4.8))
    for method, m in report["methods"].items():
        if "span_rel_err_v" not in m or method == "dense":
            continue
        ax_v.plot(m["span_rel_err_v"], label=method)
        ax_k.plot(m["span_rel_err_k"], label=method)
    for ax, what in ((ax_v, "V"), (ax_k, "K")):
        ax.set_xlabel("layer")
        ax.set_ylabel(f"relative {what} error vs dense")
        ax.set_title(f"{what} error over the reused span")
        ax.grid(alpha=0.3)
    handles, labels = ax_v.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, max(1, len(labels))), fontsize=8)
    names = [n for n in report["methods"] if n != "dense"]
    means = [report["methods"][n]["kl_mean"] for n in names]
    errs = [[m - report["methods"][n]["kl_ci95"][0] for n, m in zip(names, means)],
            [report["methods"][n]["kl_ci95"][1] - m for n, m in zip(names, means)]]
    ax_kl.bar(range(len(names)), means, yerr=errs, capsize=4)
    ax_kl.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax_kl.set_ylabel("KL(dense ‖ method), mean, 95% CI")
    ax_kl.set_title(f"next-token KL over {report['turns']} turns")
    ax_kl.grid(alpha=0.3, axis="y")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
