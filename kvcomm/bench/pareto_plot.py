"""The Pareto benchmark's figure (docs/img/pareto.png) from its report and summary (`kvcomm.bench.pareto`): KL
against reused-turn preparation for every method, the turn gate's threshold swept per kvcomm recipe, and the
fidelity gate's margin swept per recipe (first tokens served against preparation per turn). Drawing only: the
numbers come from `pareto.summarize`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def plot(report: dict[str, Any], summary: dict[str, Any], path: str) -> None:
    """Left: KL against reused-turn prepare time, one curve per method (ratio or k along it). Right: the gate
    sweep, KL on reused turns against the reuse rate, one curve per kvcomm recipe."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gated = bool(summary.get("margin_sweep"))
    fig, axes = plt.subplots(1, 3 if gated else 2, figsize=(22 if gated else 15, 5.5))
    left, right = axes[0], axes[1]
    by_method: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, v in summary["variants"].items():   # one curve per method (kvcomm: per recipe shape), ratio along it
        by_method.setdefault(name.split("@")[0] + name.partition("%")[2], []).append((name, v))
    for method, entries in by_method.items():
        xs, ys = [v["prepare_ms"] for _, v in entries], [v["kl_mean"] for _, v in entries]
        lo = [v["kl_mean"] - v["kl_ci95"][0] for _, v in entries]
        hi = [v["kl_ci95"][1] - v["kl_mean"] for _, v in entries]
        left.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=method)
        for (name, v), x, y in zip(entries, xs, ys):
            left.annotate(name.split("@")[-1].split("+")[0], (x, y), textcoords="offset points", xytext=(4, 4),
                          fontsize=7)
    if summary.get("naive_prepare_ms"):
        left.axvline(1.3 * summary["naive_prepare_ms"], color="grey", linestyle=":", label="1.3x naive")
    left.axhline(0.01, color="grey", linestyle="--", label="KL 0.01")
    left.set_yscale("log")
    left.set_xlabel("reused-turn prepare time, ms (mean)")
    left.set_ylabel("KL(dense ‖ method), mean, 95% CI")
    left.set_title(f"every method, recompute swept ({report['turns']} held-out turns)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    style = _RecipeStyles(list(summary["gate_sweep"]) + list(summary.get("margin_sweep", {})))
    for name, points in summary["gate_sweep"].items():
        right.plot([p["reuse"] for p in points], [p["kl_reused"] or 0.0 for p in points], marker=".",
                   **style(name))
    if "calibrated" in summary and summary["calibrated"]["kl_reused"] is not None:
        c = summary["calibrated"]
        right.plot([c["reuse"]], [c["kl_reused"]], marker="*", markersize=14, color="black", linestyle="none",
                   label=f"calibrated ({c['variant']})")
    right.axhline(0.01, color="grey", linestyle="--")
    right.axvline(0.85, color="grey", linestyle=":")
    right.set_xlabel("reuse rate (both gates)")
    right.set_ylabel("KL on reused turns, mean")
    right.set_title("turn gate threshold swept, per kvcomm recompute recipe")
    right.grid(alpha=0.3)
    style.legend(right)
    if gated:
        _plot_margin_sweep(axes[2], summary, style)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


class _RecipeStyles:
    """One look per kvcomm recipe in the sweep panels: the colour says the query's share (light to dark), the line
    the recipe's shape (+s2, +t8, ...), so twenty curves stay apart and the legend needs one entry per share and
    per shape, not per curve."""

    SHAPES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)))

    def __init__(self, names: Sequence[str]):
        self.ratios = sorted({self.split(n)[0] for n in names})
        self.shapes = list(dict.fromkeys(self.split(n)[1] for n in names))

    @staticmethod
    def split(name: str) -> tuple[str, str]:
        """"kvcomm@10%+s2+t8" -> ("10%", "+s2+t8")."""
        ratio, _, shape = name.partition("@")[2].partition("%")
        return ratio + "%", shape

    def colour(self, ratio: str) -> Any:
        import matplotlib
        return matplotlib.colormaps["viridis"](0.85 - 0.75 * self.ratios.index(ratio) / max(1, len(self.ratios) - 1))

    def __call__(self, name: str) -> dict[str, Any]:
        ratio, shape = self.split(name)
        return {"color": self.colour(ratio), "linestyle": self.SHAPES[self.shapes.index(shape) % len(self.SHAPES)]}

    def legend(self, ax: Any) -> None:
        """A legend entry per share and per shape, then whatever else `ax` labelled (the calibrated point, ...)."""
        from matplotlib.lines import Line2D
        handles = [Line2D([], [], color=self.colour(r), marker="o", label=f"kvcomm@{r}") for r in self.ratios]
        handles += [Line2D([], [], color="grey", linestyle=self.SHAPES[i % len(self.SHAPES)],
                           label=f"recipe: share{shape or ' only'}") for i, shape in enumerate(self.shapes)]
        ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=7, ncol=2)


def _plot_margin_sweep(ax: Any, summary: dict[str, Any], style: _RecipeStyles) -> None:
    """Served first-token agreement against preparation per turn (fallbacks included), one curve per kvcomm recipe
    along the fidelity gate's margin thresholds (labelled on the calibrated recipe's curve only)."""
    naive = summary["naive_prepare_ms"] or 1.0
    calibrated = summary.get("calibrated", {}).get("variant")
    for name, points in summary["margin_sweep"].items():
        xs, ys = [p["served_ms"] / naive for p in points], [100 * p["top1_served"] for p in points]
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=2.5 if name == calibrated else 1.2, **style(name))
        for p, x, y in zip(points, xs, ys) if name == calibrated else ():
            ax.annotate(f"{p['min_margin']:g}", (x, y), textcoords="offset points", xytext=(3, -9), fontsize=7)
    if "calibrated" in summary:
        c = summary["calibrated"]
        ax.plot([c["served_ms"] / naive], [100 * c["top1_served"]], marker="*", markersize=14, color="black",
                linestyle="none", label=f"calibrated ({c['variant']}, margin {c['min_margin']:.3f})")
    ax.axhline(97, color="grey", linestyle="--", label="97%")
    ax.set_xlabel("preparation per turn, fallbacks included, x naive" if summary["naive_prepare_ms"]
                  else "preparation per turn, fallbacks included, ms")
    ax.set_ylabel("served first token = dense, %")
    ax.set_title("fidelity gate: margin swept (labelled on the calibrated recipe)")
    ax.grid(alpha=0.3)
    style.legend(ax)
