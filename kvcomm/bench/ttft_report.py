"""The report of `kvcomm bench ttft` as people read it: the markdown tables (one setting, the Table 3 grid) and
the TTFT/speedup figure. It reads a finished report dict and measures nothing (`kvcomm.bench.ttft` does).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..names import DENSE_MODES, POOL_MODES

SPLIT_KEYS = ("fetch", "align", "offset", "prefill")   # the engine's timing stages shown in kvcomm's split
GOALS = {"vs_dense": 10.0, "vs_dense_prefix": 4.0}   # agent N, kvcomm, on CPU with the embedded model


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.0f}" if value >= 100 else f"{value:.1f}")


def _fmt_x(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


def markdown_table(report: dict[str, Any]) -> str:
    """The report as markdown: TTFT per agent and mode (speedups vs dense / dense-prefix), the reuse split."""
    if report.get("benchmark") == "ttft-grid":
        return grid_markdown_table(report)
    modes = report["setting"]["modes"]
    lines = ["| agent | prompt tokens | " + " | ".join(f"{m} ms" for m in modes) + " |",
             "|---|---|" + "---|" * len(modes)]
    for a in report["agents"]:
        cells = []
        for m in modes:
            e = a["modes"][m]
            extra = ""
            if m != "dense" and e.get("speedup_vs_dense"):
                extra = f" ({_fmt_x(e['speedup_vs_dense'])}"
                extra += f" / {_fmt_x(e['speedup_vs_dense_prefix'])})" if e.get("speedup_vs_dense_prefix") else ")"
            cells.append(_fmt_ms(e["ttft_ms"]) + extra)
        lines.append(f"| {a['agent']} | {a['prompt_tokens']} | " + " | ".join(cells) + " |")
    first = report["agents"][0]["modes"]
    with_input = [m for m in modes if "ttft_with_input_prefill_ms" in first[m]]
    if with_input:
        cells = []
        for m in modes:
            e = first[m]
            if m in with_input:
                cells.append(f"{_fmt_ms(e['ttft_with_input_prefill_ms'])} "
                             f"({_fmt_x(e.get('speedup_vs_dense_with_input_prefill'))})")
            else:
                cells.append(_fmt_ms(e["ttft_ms"]))
        lines.append(f"| 1 + input prefill | {report['agents'][0]['prompt_tokens']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: median TTFT in ms (speedup vs dense / vs dense-prefix, same run). Isolated user-input "
                 f"prefill (once per question): {_fmt_ms(report['input_prefill_ms'])} ms.")
    split_modes = [m for m in modes if m in POOL_MODES]
    if split_modes:
        lines += ["", "| agent | mode | fetch ms | align ms | offset ms | tail prefill ms | other ms | reused |",
                  "|---|---|---|---|---|---|---|---|"]
        for a in report["agents"]:
            for m in split_modes:
                e = a["modes"][m]
                s = e["split_ms"]
                lines.append(f"| {a['agent']} | {m} | " + " | ".join(_fmt_ms(s[k]) for k in (*SPLIT_KEYS, "other"))
                             + f" | {e['reuse_rate']:.0%} |")
    goals = report.get("goals")
    if goals:
        lines.append("")
        parts = [f"{name.replace('_', ' ')} >= {g['target']:.0f}x: {_fmt_x(g['measured'])} "
                 f"({'met' if g['met'] else 'missed'})" for name, g in goals.items() if isinstance(g, dict)]
        lines.append(f"Goals, agent {goals['agent']} {goals['mode']}: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def grid_markdown_table(report: dict[str, Any]) -> str:
    """Table 3: the last agent's kvcomm speedup vs dense / vs dense-prefix, prefix (rows) x output (columns)."""
    cells = {(c["prefix"], c["output"]): c for c in report["cells"]}
    outputs = report["outputs"]
    lines = ["| prefix \\ output | " + " | ".join(str(o) for o in outputs) + " |", "|---|" + "---|" * len(outputs)]
    for p in report["prefixes"]:
        row = []
        for o in outputs:
            c = cells.get((p, o))
            e = (c or {}).get("modes", {}).get("kvcomm", {})
            row.append("-" if not e else f"{_fmt_x(e.get('speedup_vs_dense'))} / "
                                         f"{_fmt_x(e.get('speedup_vs_dense_prefix'))} ({_fmt_ms(e.get('ttft_ms'))} ms)")
        lines.append(f"| {p} | " + " | ".join(row) + " |")
    lines += ["", f"Agent {report['agents']} kvcomm: speedup vs dense / vs dense-prefix (kvcomm median TTFT); "
                  f"input {report['input']} tokens, {report['samples']} sample(s) per cell."]
    return "\n".join(lines)


def plot(report: dict[str, Any], png_path: str | Path) -> Path:
    """TTFT per agent per mode (log scale) and the reuse modes' speedups vs dense and dense-prefix."""
    from matplotlib.figure import Figure   # no pyplot: no global backend state
    from matplotlib.ticker import ScalarFormatter

    modes = report["setting"]["modes"]
    agents = [a["agent"] for a in report["agents"]]
    fig = Figure(figsize=(13, 5), dpi=110)
    ax_ttft, ax_speed = fig.subplots(1, 2)
    width = 0.8 / len(modes)
    for i, m in enumerate(modes):
        ys = [a["modes"][m]["ttft_ms"] or float("nan") for a in report["agents"]]
        ax_ttft.bar([x + (i - (len(modes) - 1) / 2) * width for x in agents], ys, width, label=m)
    ax_ttft.set_yscale("log")
    ax_ttft.yaxis.set_major_formatter(ScalarFormatter())
    ax_ttft.set_xticks(agents)
    ax_ttft.set_xlabel("agent")
    ax_ttft.set_ylabel("median TTFT (ms, log scale)")
    ax_ttft.set_title("TTFT per agent and mode")
    ax_ttft.legend(fontsize=8)
    ax_ttft.grid(axis="y", which="both", alpha=0.3)

    reuse_modes = [m for m in modes if m not in DENSE_MODES]
    series = [(m, "speedup_vs_dense", "vs dense", None) for m in reuse_modes]
    if "dense-prefix" in modes:
        series += [(m, "speedup_vs_dense_prefix", "vs dense-prefix", "//") for m in reuse_modes]
    width = 0.8 / max(1, len(series))
    colors = {m: f"C{modes.index(m)}" for m in modes}
    for i, (m, key, label, hatch) in enumerate(series):
        ys = [a["modes"][m].get(key) or float("nan") for a in report["agents"]]
        ax_speed.bar([x + (i - (len(series) - 1) / 2) * width for x in agents], ys, width, color=colors[m],
                     hatch=hatch, edgecolor="black", linewidth=0.3, label=f"{m} {label}")
    for name, target in GOALS.items():
        ax_speed.axhline(target, color="gray", linestyle="--" if name == "vs_dense" else ":", linewidth=0.8)
    ax_speed.set_yscale("log")
    ax_speed.yaxis.set_major_formatter(ScalarFormatter())
    ax_speed.yaxis.set_minor_formatter(ScalarFormatter())
    ax_speed.set_xticks(agents)
    ax_speed.set_xlabel("agent")
    ax_speed.set_ylabel("speedup (x, log scale)")
    ax_speed.set_title("speedup vs dense (plain) and dense-prefix (hatched)")
    ax_speed.legend(fontsize=7, ncol=2)
    ax_speed.grid(axis="y", which="both", alpha=0.3)
    s = report["setting"]
    model = str(report.get("model", "")).split(" (")[0]   # the label, without a local path
    fig.suptitle(f"{model} on {report['device']} ({report['dtype']}): {s['agents']} agents, "
                 f"prefix {s['prefix']}, input {s['input']}, output {s['output']} (teacher-forced), "
                 f"{s['samples']} samples", fontsize=9)
    fig.tight_layout()
    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
