"""`kvcomm bench agents`: unmodified agent frameworks against the OpenAI chat API: no reuse, prefix caching, KVCOMM.

The frameworks' drivers and the recording of what they send live in `cluster.bench.frameworks`; this module owns
the benchmark:

* `run`: the Serve app (``configs/local.yaml``: the embedded model on the CPU, one replica), every question
  through each framework with reuse off (``mode: dense``), with exact prefix caching only (``dense-prefix``: each
  chat template's leading segment, the system prompt and first header, kept exact, as a prefix cache serves it)
  and with KVCOMM (``kvcomm``), in namespaces of their own, the three alternating question by question; then, in
  this process, a dense prefill of every reused prompt's very tokens:
  first-token agreement and KL. `warmup` questions first teach the anchor pool (the entropy gate turns a
  namespace's first two contents of each kind into anchors) and are not counted. `markdown_table` and `plot`
  (docs/img/agents.png) show TTFT per agent position, reuse rate and wall time per conversation.

TTFT is the server's: from the chat reaching its worker replica to its first token (the content lookups, the gate
and the prefill or reuse included; the HTTP hop, ~13 ms here, not).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from kvcomm.cli_args import add_model_args
from kvcomm.harness.datasets import DEFAULT_GSM8K_PATH as DEFAULT_DATA
from kvcomm.names import EMBEDDED_MODEL, FIRST_READ_REASON

from .frameworks import NEEDS, RUNNERS, Conversation, need

FRAMEWORKS = ("autogen", "langgraph")   # the default; `RUNNERS` has every framework
MODES = ("dense", "dense-prefix", "kvcomm")   # reuse off, exact prefix caching, KVCOMM


# ------------------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------------------
def app_config(model: str, random_weights: bool, gamma: float | None = None) -> Any:
    """``configs/local.yaml``'s application with the model (and the gate's gamma) overridden and an anchor pool of
    its own."""
    from ..serve.command import DEFAULT_CONFIG
    from ..serve.config import load_serve_config_file
    app = load_serve_config_file(DEFAULT_CONFIG).applications[0].config
    changes: dict[str, Any] = {"kvcomm": {"gamma": gamma}} if gamma is not None else {}
    cluster = app.cluster.with_(model=model, random_weights=random_weights,
                                pool_actor_name=f"bench-agents-pool-{uuid.uuid4().hex[:8]}", **changes)
    serve = app.serve.model_copy(update={"served_model_name": "bench-model"})
    return app.model_copy(update={"cluster": cluster, "serve": serve})


def fidelity(engine: Any, conversations: Sequence[Conversation]) -> None:
    """For every turn of a reuse-on conversation: the dense prefill of its very prompt tokens (in this process),
    the first-token agreement and KL(dense || served) (in place: ``dense_first``, ``agree``, ``kl``)."""
    import numpy as np
    import torch
    for conversation in conversations:
        if conversation.mode != "kvcomm":             # the others are exact
            continue
        for turn in conversation.turns:
            logits, _ = engine.runner.prefill(turn["prompt_ids"])
            dense = torch.log_softmax(logits[-1].double(), dim=-1)                       # [vocab]
            served = torch.from_numpy(np.frombuffer(turn["first_logprobs"], dtype="<f4").copy()).double()
            turn["agree"] = int(dense.argmax()) == int(served.argmax())
            turn["kl"] = float((dense.exp() * (dense - served)).sum().clamp_min(0.0))


def summarize(conversations: Sequence[Conversation]) -> dict[str, Any]:
    """Per framework: TTFT per agent position in each mode, kvcomm's speedup over no reuse and over prefix caching,
    reuse rate, first-token agreement and KL of reused turns, wall time per conversation (measured questions
    only)."""
    out: dict[str, Any] = {}
    for framework in sorted({c.framework for c in conversations}):
        measured = [c for c in conversations if c.framework == framework and not c.warmup]
        by_mode = {mode: [c for c in measured if c.mode == mode] for mode in MODES}
        positions = []
        for index in range(max(len(c.turns) for c in measured)):
            row: dict[str, Any] = {"agent": index + 1}
            for mode in MODES:
                turns = [c.turns[index] for c in by_mode[mode] if index < len(c.turns)]
                row[f"ttft_ms_{mode}"] = 1e3 * statistics.median(t["ttft_s"] for t in turns)
                row[f"prompt_tokens_{mode}"] = statistics.fmean(t["prompt_tokens"] for t in turns)
            turns = [c.turns[index] for c in by_mode["kvcomm"] if index < len(c.turns)]
            reused = [t for t in turns if t["reused"]]
            row.update(speedup=row["ttft_ms_dense"] / row["ttft_ms_kvcomm"],
                       speedup_vs_prefix=row["ttft_ms_dense-prefix"] / row["ttft_ms_kvcomm"],
                       reuse_rate=len(reused) / len(turns),
                       cached_share=sum(t["cached_tokens"] for t in turns) / sum(t["prompt_tokens"] for t in turns),
                       agreement=(sum(t["agree"] for t in reused) / len(reused)) if reused else None,
                       kl_mean=statistics.fmean(t["kl"] for t in reused) if reused else None,
                       reasons=dict(sorted(_count(t["reason"] for t in turns).items())))
            positions.append(row)
        kv_turns = [t for c in by_mode["kvcomm"] for t in c.turns]
        reused = [t for t in kv_turns if t["reused"]]
        out[framework] = {
            "questions": len(by_mode["kvcomm"]), "agents": positions,
            "reuse_rate": len(reused) / len(kv_turns),
            "agreement": sum(t["agree"] for t in reused) / len(reused) if reused else None,
            "kl_mean": statistics.fmean(t["kl"] for t in reused) if reused else None,
            "wall_s": {mode: statistics.fmean(c.wall_s for c in by_mode[mode]) for mode in MODES}}
    return out


def _count(items: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def run(*, frameworks: Sequence[str] = FRAMEWORKS, questions: int = 8, warmup: int = 2, data: str = DEFAULT_DATA,
        skip: int = 0, seed: int = 0, max_tokens: int = 32, model: str = EMBEDDED_MODEL,
        random_weights: bool = False, gamma: float | None = None, num_cpus: int | None = None,
        progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """The benchmark (module docstring): returns the summary, the setting and every conversation's turns."""
    from kvcomm.bench.turns import load_questions
    from kvcomm.engine import build_engine

    from .http import run_with_app
    unknown = [f for f in frameworks if f not in RUNNERS]
    if unknown:
        raise ValueError(f"--framework: unknown {', '.join(unknown)}; frameworks: {', '.join(RUNNERS)}")
    for framework in frameworks:
        need(NEEDS[framework])
    picked = load_questions(data, warmup + questions, skip=skip, seed=seed)
    config = app_config(model, random_weights, gamma)
    tag = uuid.uuid4().hex[:8]

    def drills(url: str) -> dict[str, Any]:
        done: list[Conversation] = []
        for framework in frameworks:
            for number, (line, question) in enumerate(picked):
                for mode in MODES:
                    [conversation] = RUNNERS[framework](url, [question], mode=mode, max_tokens=max_tokens,
                                                        namespace=f"bench-{framework}-{mode}-{tag}",
                                                        model=config.model_name)
                    conversation.warmup = number < warmup
                    done.append(conversation)
                reasons = " ".join(t["reason"] for t in done[-1].turns)
                walls = ", ".join(f"{c.mode} {c.wall_s:.1f} s" for c in done[-len(MODES):])
                progress(f"[agents] {framework} question {number + 1}/{len(picked)} (line {line})"
                         f"{' warm-up' if number < warmup else ''}: {walls} [{reasons}]")
        return {"conversations": done}

    conversations = run_with_app(config, drills, num_cpus=num_cpus)["conversations"]
    progress("[agents] dense prefill of every reused prompt, in process")
    fidelity(build_engine(model, random_weights=random_weights), [c for c in conversations if not c.warmup])
    return {"setting": {"frameworks": list(frameworks), "questions": questions, "warmup": warmup, "data": data,
                        "skip": skip, "seed": seed, "max_tokens": max_tokens, "model": model,
                        "gamma": config.cluster.kvcomm.gamma,
                        "lines": [line for line, _ in picked]},
            "summary": summarize(conversations),
            "conversations": [{**vars(c), "turns": [{k: v for k, v in t.items() if k != "first_logprobs"}
                                                    for t in c.turns]} for c in conversations]}


def markdown_table(report: dict[str, Any]) -> str:
    lines = ["| framework | agent | prompt tokens | TTFT reuse off (ms) | TTFT prefix cache (ms) | TTFT kvcomm (ms) "
             "| kvcomm vs off | kvcomm vs prefix cache | reuse rate | reused tokens | first-token agreement "
             "| KL (reused) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for framework, summary in report["summary"].items():
        for row in summary["agents"]:
            agreement = "-" if row["agreement"] is None else f"{row['agreement']:.0%}"
            kl = "-" if row["kl_mean"] is None else f"{row['kl_mean']:.3f}"
            lines.append(f"| {framework} | {row['agent']} | {row['prompt_tokens_dense']:.0f} | "
                         f"{row['ttft_ms_dense']:.0f} | {row['ttft_ms_dense-prefix']:.0f} | "
                         f"{row['ttft_ms_kvcomm']:.0f} | "
                         f"{row['speedup']:.2f}x | {row['speedup_vs_prefix']:.2f}x | {row['reuse_rate']:.0%} | "
                         f"{row['cached_share']:.0%} | {agreement} | {kl} |")
    lines.append("")
    for framework, summary in report["summary"].items():
        wall = summary["wall_s"]
        lines.append(f"{framework}: {summary['questions']} questions; wall time per conversation {wall['dense']:.1f} s "
                     f"off, {wall['dense-prefix']:.1f} s with the prefix cache, {wall['kvcomm']:.1f} s with kvcomm; "
                     f"reuse rate {summary['reuse_rate']:.0%}")
    return "\n".join(lines)


def plot(report: dict[str, Any], png_path: str) -> str:
    """TTFT per agent position in each mode, one panel per framework."""
    from matplotlib.figure import Figure   # no pyplot: no global backend state

    summaries = report["summary"]
    fig = Figure(figsize=(4.2 * len(summaries), 3.6), layout="constrained")
    axes = fig.subplots(1, len(summaries), squeeze=False)[0]
    for ax, (framework, summary) in zip(axes, summaries.items()):
        rows = summary["agents"]
        xs = range(len(rows))
        for offset, mode, label, color in ((-0.27, "dense", "reuse off (dense)", "#999999"),
                                           (0.0, "dense-prefix", "prefix cache (dense-prefix)", "#bbbb77"),
                                           (0.27, "kvcomm", "kvcomm", "#1f77b4")):
            ax.bar([x + offset for x in xs], [r[f"ttft_ms_{mode}"] for r in rows], 0.27, label=label, color=color)
        for x, row in zip(xs, rows):
            agree = "" if row["agreement"] is None else f"\nagree {row['agreement']:.0%}"
            speedups = f"{row['speedup']:.1f}x / {row['speedup_vs_prefix']:.1f}x"      # vs off / vs prefix cache
            first_reads = row["reasons"].get(FIRST_READ_REASON, 0) / sum(row["reasons"].values())
            read = f"\nfirst read {first_reads:.0%}" if first_reads else ""
            ax.annotate(f"{speedups}\nreuse {row['reuse_rate']:.0%}{read}{agree}",
                        (x + 0.27, row["ttft_ms_kvcomm"]), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(xs), [f"agent {r['agent']}" for r in rows])
        ax.set_ylabel("TTFT (ms, median)")
        ax.set_ylim(0, 1.3 * max(r[f"ttft_ms_{m}"] for r in rows for m in MODES))   # room for the labels
        ax.set_title(f"{framework}: {summary['questions']} GSM8K questions")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8,
               title="labels: kvcomm's speedup over no reuse / over the prefix cache", title_fontsize=8)
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    return png_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--framework", default=",".join(FRAMEWORKS),
                        help=f"comma list of {', '.join(RUNNERS)} (default: {','.join(FRAMEWORKS)})")
    parser.add_argument("--questions", type=int, default=8, help="measured GSM8K questions per framework")
    parser.add_argument("--warmup", type=int, default=2, help="questions before them that teach the pool, not counted")
    parser.add_argument("--data", default=DEFAULT_DATA, help="GSM8K jsonl (a 'question' per line)")
    parser.add_argument("--skip", type=int, default=0, help="start this far into the seeded shuffle of the data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=32, help="each agent's answer budget")
    add_model_args(parser, local=False)
    parser.add_argument("--gamma", type=float, default=None, help="the entropy gate's gamma (default: the config's)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    parser.add_argument("--plot", default=None, help="write the TTFT plot here (e.g. docs/img/agents.png)")
    parser.add_argument("--json", default=None)


def cli_main(args: argparse.Namespace) -> int:
    from kvcomm.bench import write_json_report
    report = run(frameworks=[f.strip() for f in args.framework.split(",") if f.strip()], questions=args.questions,
                 warmup=args.warmup, data=args.data, skip=args.skip, seed=args.seed, max_tokens=args.max_tokens,
                 model=args.model, random_weights=args.random_weights, gamma=args.gamma, num_cpus=args.num_cpus)
    print(markdown_table(report))
    if args.plot:
        print(f"wrote {plot(report, args.plot)}", file=sys.stderr)
    write_json_report(args.json, report)
    return 0


__all__ = ["FRAMEWORKS", "run", "summarize", "markdown_table", "plot"]
