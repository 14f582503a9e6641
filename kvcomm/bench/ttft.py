"""`kvcomm bench ttft`: time to first token per agent and serving mode, the paper's Tables 2 and 3.

This module owns the TTFT benchmark's measurement loop, its report (a JSON-able dict) and the command-line entry
point (`add_arguments` / `cli_main`, also ``python -m kvcomm.bench.ttft``; `scripts/gpu_bench.sh` runs it on a
GPU). The synthetic CopyMachine job is `kvcomm.bench.ttft_workload`; the tables and plot `kvcomm.bench.ttft_report`.

The setting, what is compared and what is timed: docs/benchmarks.md ("`kvcomm bench ttft`").
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..anchor_pool import AnchorPool
from ..calibration import resolve
from ..config import KVCommConfig
from ..engine import KVCommEngine, SharedContent, TurnRequest
from ..names import DENSE_MODES, EMBEDDED_MODEL, MODES, POOL_MODES
from ..generation import DecodeBatch, Sampling
from ..model_loading import load_model
from ..runner import ModelRunner, SequenceKV
from . import write_json_report
from .cli import model_options, standalone_main
from .ttft_report import GOALS, SPLIT_KEYS, markdown_table, plot
from .ttft_workload import token_ids_of, copy_machine_template, random_symbol_ids, teacher_forced_response

DEFAULT_MODES = MODES
NAMESPACE = "ttft-bench"
# Table 3 (3 agents, prefix x output): the paper's grid, and the subset that fits a CPU run (~10 min, SmolLM2)
PAPER_GRID = {"prefixes": (64, 256, 512, 1024), "outputs": (128, 256, 512, 1024)}
CPU_GRID = {"prefixes": (64, 512), "outputs": (128, 512)}
# The byte bound must not evict the warm-up anchors: Llama-3.1-8B bf16 needs ~3.3 GiB for the 5-agent job
BENCH_POOL_BYTE_BUDGET = 16 << 30


@dataclass(frozen=True)
class Setting:
    agents: int = 5
    prefix: int = 512
    input: int = 1024
    output: int = 512
    modes: tuple[str, ...] = DEFAULT_MODES
    samples: int = 3
    warmup: int = 2
    seed: int = 0


@dataclass
class TurnMeasurement:
    sample: int
    agent: int                   # 1-based
    mode: str
    ttft_s: float
    timings: dict[str, float]    # the engine's split: fetch, align, offset, prefill (+ record on a dense fallback)
    reused: bool
    reason: str
    prompt_tokens: int
    recomputed_tokens: int


@dataclass
class SampleMeasurement:
    index: int
    warmup: bool
    input_prefill_s: float
    gate_s: float
    turns: list[TurnMeasurement] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mode_order(modes: Sequence[str], sample: int, agent: int) -> list[str]:
    """`modes` rotated by sample + agent: every mode takes every slot in turn, so drift hits all alike."""
    shift = (sample + agent) % len(modes)
    return list(modes[shift:]) + list(modes[:shift])


class TTFTBench:
    """One benchmark setting on one runner: a fresh engine and anchor pool, the agents' templates, the samples."""

    def __init__(self, runner: ModelRunner, tokenizer: Any, setting: Setting, config: KVCommConfig):
        unknown = [m for m in setting.modes if m not in MODES]
        if unknown or not setting.modes:
            raise ValueError(f"unknown or no modes {unknown or list(setting.modes)}; modes: {', '.join(MODES)}")
        if setting.agents < 1 or min(setting.prefix, setting.input, setting.output) < 1:
            raise ValueError(f"agents, prefix, input and output must be >= 1: {setting}")
        self.runner, self.tokenizer, self.setting, self.config = runner, tokenizer, setting, config
        self.engine = KVCommEngine(runner, tokenizer, config, AnchorPool(config, runner.rope))
        self.templates = [copy_machine_template(k, setting.prefix, tokenizer) for k in range(1, setting.agents + 1)]
        for template in self.templates:       # the reference's initialization pass: fixed-segment KV, untimed
            self.engine.agent_state(template)
        self.sampling = Sampling(max_new_tokens=setting.output, min_new_tokens=setting.output)
        self.pool_modes = [m for m in setting.modes if m in POOL_MODES]

    def prompt_layout(self) -> list[dict[str, int]]:
        """Per agent: prompt tokens, leading fixed segment (what dense-prefix reuses), system prompt tokens."""
        rows = []
        for k, template in enumerate(self.templates, start=1):
            rendered = self.engine.agent_state(template).rendered
            lengths = {"user_question": self.setting.input}
            lengths.update({f"agent_{j}_current": self.setting.output for j in range(1, k)})
            layout = rendered.layout([lengths[p] for p in rendered.placeholders])
            rows.append({"agent": k, "prompt_tokens": layout.length, "leading_fixed_tokens": len(rendered.fixed[0]),
                         "system_prompt_tokens": len(token_ids_of(self.tokenizer, template.system_prompt)),
                         "placeholders": len(rendered.placeholders)})
        return rows

    def run_sample(self, index: int, modes: Sequence[str], warmup: bool, on_turn=None) -> SampleMeasurement:
        """One job: every agent in order, each in every mode of `modes`; responses teacher-forced in between."""
        setting, engine = self.setting, self.engine
        rng = random.Random(f"{setting.seed}:{index}")
        input_ids = random_symbol_ids(self.tokenizer, setting.input, rng)
        response_ids = [random_symbol_ids(self.tokenizer, setting.output, rng) for _ in range(setting.agents)]

        _synchronize(self.runner.device)
        t = time.perf_counter()
        user_input = engine.make_input(input_ids)          # once per question, shared by every agent
        _synchronize(self.runner.device)
        sample = SampleMeasurement(index, warmup, time.perf_counter() - t, 0.0)

        txn = engine.pool.begin(NAMESPACE) if any(m in POOL_MODES for m in modes) else None
        sample.gate_s += self._offer(txn, "user_question", user_input)
        contents: dict[str, SharedContent] = {"user_question": user_input}
        try:
            for k, template in enumerate(self.templates, start=1):
                response_source: SequenceKV | None = None   # an exact (non-reused) prompt KV of agent k
                source_is_dense = False
                prompt_ids: list[int] = []
                for mode in _mode_order(modes, index, k):
                    request = TurnRequest(template, dict(contents), mode=mode, sampling=self.sampling,
                                          namespace=NAMESPACE, transaction=txn if mode in POOL_MODES else None)
                    _synchronize(self.runner.device)
                    prepared = engine.prepare(request)
                    batch = DecodeBatch(self.runner, max_batch_size=1)
                    first = batch.add(prepared.kv, prepared.last_logits[-1], self.sampling,
                                      started_at=prepared.started)
                    batch.active = ()   # out of its decode slot: prepared.kv holds the prompt's KV again
                    ttft = first.first_token_at - first.started_at   # the engine's TTFT, without the decode
                    sample.turns.append(TurnMeasurement(
                        index, k, mode, ttft, dict(prepared.timings), prepared.reused, prepared.reason,
                        len(prepared.prompt_ids), prepared.recomputed))
                    prompt_ids = prepared.prompt_ids
                    if not prepared.reused and not source_is_dense:
                        response_source, source_is_dense = prepared.kv, mode == "dense"
                    del prepared, first, batch
                    if on_turn is not None:
                        on_turn(sample.turns[-1])
                if k < setting.agents:                         # the last agent's response has no consumer
                    response = teacher_forced_response(self.runner, prompt_ids, response_ids[k - 1], response_source)
                    contents[f"agent_{k}_current"] = response
                    sample.gate_s += self._offer(txn, f"agent_{k}_current", response)
                del response_source
        except BaseException:
            if txn is not None:
                engine.pool.abort(txn)
            raise
        if txn is not None:
            engine.pool.commit(txn)
        return sample

    def _offer(self, txn, placeholder: str, content: SharedContent) -> float:
        """The entropy gate on new content (anchor prediction; not in TTFT, as in the reference): seconds taken."""
        if txn is None:
            return 0.0
        t = time.perf_counter()
        self.engine.offer_content(NAMESPACE, placeholder, content, txn)
        _synchronize(self.runner.device)
        return time.perf_counter() - t


def _median_ms(values: Sequence[float]) -> float | None:
    return statistics.median(values) * 1e3 if values else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def summarize(setting: Setting, samples: Sequence[SampleMeasurement], layout: list[dict[str, int]]) -> dict:
    """Medians per agent and mode, speedups against dense / dense-prefix of the same run, kvcomm's split."""
    measured = [s for s in samples if not s.warmup]
    turns = [t for s in measured for t in s.turns]
    input_ms = [s.input_prefill_s * 1e3 for s in measured]
    agents = []
    for k in range(1, setting.agents + 1):
        per_mode: dict[str, dict[str, Any]] = {}
        for mode in setting.modes:
            rows = [t for t in turns if t.agent == k and t.mode == mode]
            entry: dict[str, Any] = {
                "ttft_ms": _median_ms([t.ttft_s for t in rows]),
                "ttft_ms_samples": [t.ttft_s * 1e3 for t in rows],
                "reuse_rate": sum(t.reused for t in rows) / len(rows) if rows else None,
                "reasons": dict(Counter(t.reason for t in rows)),
                "recomputed_tokens": statistics.median([t.recomputed_tokens for t in rows]) if rows else None,
            }
            if mode not in DENSE_MODES:
                split = {key: _median_ms([t.timings.get(key, 0.0) for t in rows]) for key in SPLIT_KEYS}
                split["other"] = _median_ms([t.ttft_s - sum(t.timings.get(key, 0.0) for key in SPLIT_KEYS)
                                             for t in rows])
                entry["split_ms"] = split
            if k == 1 and mode not in DENSE_MODES:
                by_sample = {t.sample: t.ttft_s for t in rows}
                entry["ttft_with_input_prefill_ms"] = _median_ms(
                    [by_sample[s.index] + s.input_prefill_s for s in measured if s.index in by_sample])
            per_mode[mode] = entry
        for mode, entry in per_mode.items():
            for baseline, key in (("dense", "speedup_vs_dense"), ("dense-prefix", "speedup_vs_dense_prefix")):
                base = per_mode.get(baseline, {}).get("ttft_ms")
                entry[key] = _ratio(base, entry["ttft_ms"])
                if k == 1 and "ttft_with_input_prefill_ms" in entry:
                    entry[key + "_with_input_prefill"] = _ratio(base, entry["ttft_with_input_prefill_ms"])
        agents.append({**layout[k - 1], "modes": per_mode})
    last = agents[-1]["modes"].get("kvcomm", {})
    goals = {name: {"target": target, "measured": last.get("speedup_" + name),
                    "met": (last.get("speedup_" + name) or 0.0) >= target}
             for name, target in GOALS.items()}
    return {"agents": agents, "input_prefill_ms": _median_ms([s.input_prefill_s for s in measured]),
            "input_prefill_ms_samples": input_ms,
            "gate_ms_per_sample": _median_ms([s.gate_s for s in measured]),
            "goals": {"agent": setting.agents, "mode": "kvcomm", **goals}}


# ------------------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------------------
def bench_config(**overrides: Any) -> KVCommConfig:
    """The benchmark's algorithm config: the corrected defaults with the reference TTFT script's gamma = 1.0,
    and a pool byte budget that never evicts the warm-up anchors."""
    return KVCommConfig(**{"gamma": 1.0, "pool_byte_budget": BENCH_POOL_BYTE_BUDGET, **overrides})


def _load_runner(model: str, device: str, dtype: str | None, random_weights: bool) -> tuple[ModelRunner, Any, str]:
    loaded = load_model(model, device=device, dtype=dtype, random_weights=random_weights)
    if loaded.tokenizer is None:
        raise ValueError(f"{model}: no tokenizer available; the benchmark's templates need one")
    return ModelRunner(loaded.spec, loaded.state_dict), loaded.tokenizer, loaded.source


def _progress_bar(enabled: bool, total: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="turn", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def measure(runner: ModelRunner, tokenizer: Any, setting: Setting, *, config: KVCommConfig | None = None,
            progress: bool = True, desc: str = "ttft") -> dict[str, Any]:
    """Run one setting on an already loaded runner and return its report (see `run`)."""
    config = config or bench_config()
    started = time.perf_counter()
    bench = TTFTBench(runner, tokenizer, setting, config)
    warm_modes = ["kvcomm"] if bench.pool_modes else [setting.modes[0]]
    total = setting.agents * (setting.warmup * len(warm_modes) + setting.samples * len(setting.modes))
    samples: list[SampleMeasurement] = []
    with _progress_bar(progress, total, desc) as bar:
        def on_turn(turn: TurnMeasurement) -> None:
            bar.set_postfix_str(f"{'warm-up' if turn.sample < setting.warmup else 'sample'} {turn.sample} "
                                f"agent {turn.agent} {turn.mode} {turn.ttft_s * 1e3:.0f} ms", refresh=False)
            bar.update(1)

        for index in range(setting.warmup + setting.samples):
            warm = index < setting.warmup
            samples.append(bench.run_sample(index, warm_modes if warm else setting.modes, warm, on_turn))
    summary = summarize(setting, samples, bench.prompt_layout())
    notes = [
        "Responses are teacher-forced: `output` synthetic tokens whose KV is the producer's own KV (prefilled "
        "after its exact prompt KV, as a decode would compute it), de-rotated to position 0. TTFT stops at the "
        "first token, so this changes nothing it measures.",
        f"gamma = {config.gamma} like the reference TTFT script (the default is 0.3): after {setting.warmup} "
        "warm-up samples in kvcomm mode, whose dense fallbacks record anchors, every placeholder has two anchors "
        "and the gate always matches.",
        "TTFT = KVCommEngine.prepare (template lookup, fetch, align, offsets, assembly, tail or full prefill) + "
        "sampling the first token. Not in it, as in the reference: the isolated user-input prefill (reported "
        "separately, and added to agent 1 in ttft_with_input_prefill_ms), the entropy gate, response "
        "de-rotation.",
        "fetch is in-process (no Ray transfer); modes run in an order rotated per sample and agent.",
    ]
    if runner.device.type == "cuda":
        notes.append("On CUDA only TTFT itself is synchronized; the fetch/align/offset/prefill split is host time "
                     "between the engine's unsynchronized timestamps.")
    return {
        "benchmark": "ttft",
        "setting": {"agents": setting.agents, "prefix": setting.prefix, "input": setting.input,
                    "output": setting.output, "modes": list(setting.modes), "samples": setting.samples,
                    "warmup": setting.warmup, "warmup_modes": warm_modes, "seed": setting.seed,
                    "response_generation": "teacher_forced"},
        "device": str(runner.device), "dtype": str(runner.dtype), "threads": torch.get_num_threads(),
        "attention": runner.attention_backend, "config": bench.engine.config.to_dict(),   # as the engine ran it
        "config_mode": bench.engine.config.mode,
        **summary,
        "pool": _pool_summary(bench.engine.pool),
        "notes": notes,
        "wall_s": time.perf_counter() - started,
        "turns": [vars(t) for s in samples for t in s.turns],
    }


def _pool_summary(pool: AnchorPool) -> dict[str, Any]:
    stats = pool.stats()
    lists = stats["namespaces"].get(NAMESPACE, {})
    return {"total_bytes": stats["total_bytes"], "byte_budget": stats["byte_budget"], "evictions": stats["evictions"],
            "anchors": {ph: info["anchors"] for ph, info in lists.items()}}


def run(agents: int = 5, prefix: int = 512, input: int = 1024, output: int = 512,
        modes: Sequence[str] = DEFAULT_MODES, samples: int = 3, warmup: int = 2, *,
        model: str = EMBEDDED_MODEL, device: str = "cpu", dtype: str | None = None,
        random_weights: bool = False, threads: int | None = 2, seed: int = 0, progress: bool = True,
        config: KVCommConfig | None = None) -> dict[str, Any]:
    """The paper's Table 2 setting: TTFT per agent and mode; see the module docstring for what is timed.

    Returns a JSON-able report: ``setting``, ``agents`` (per agent: prompt sizes and per mode ``ttft_ms``,
    ``speedup_vs_dense``, ``speedup_vs_dense_prefix``, ``split_ms`` for reuse modes, raw samples),
    ``input_prefill_ms``, ``goals``, ``pool``, ``notes`` and every raw ``turns`` measurement.
    `threads` sets torch's CPU threads for the run (restored afterwards); None leaves them alone.
    """
    setting = Setting(agents, prefix, input, output, tuple(modes), samples, warmup, seed)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        runner, tokenizer, source = _load_runner(model, device, dtype, random_weights)
        report = measure(runner, tokenizer, setting, config=config, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)
    report["model"] = source
    report["threads"] = threads or previous_threads
    return report


def run_grid(agents: int = 3, prefixes: Sequence[int] = PAPER_GRID["prefixes"],
             outputs: Sequence[int] = PAPER_GRID["outputs"], input: int = 1024,
             modes: Sequence[str] = ("dense", "dense-prefix", "kvcomm"), samples: int = 1, warmup: int = 2, *,
             model: str = EMBEDDED_MODEL, device: str = "cpu", dtype: str | None = None,
             random_weights: bool = False, threads: int | None = 2, seed: int = 0, progress: bool = True,
             config: KVCommConfig | None = None) -> dict[str, Any]:
    """The paper's Table 3: the last agent's TTFT and speedups over a prefix x output grid (one model load,
    a fresh engine and pool per cell). The paper's grid is `PAPER_GRID`; `CPU_GRID` is the subset that fits a
    CPU run with the embedded model."""
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    cells = []
    started = time.perf_counter()
    try:
        runner, tokenizer, source = _load_runner(model, device, dtype, random_weights)
        for prefix in prefixes:
            for output in outputs:
                setting = Setting(agents, prefix, input, output, tuple(modes), samples, warmup, seed)
                report = measure(runner, tokenizer, setting, config=config, progress=progress,
                                 desc=f"ttft prefix {prefix} output {output}")
                last = report["agents"][-1]
                cells.append({"prefix": prefix, "output": output, "agent": agents,
                              "prompt_tokens": last["prompt_tokens"],
                              "modes": {m: {k: v for k, v in e.items() if not k.endswith("_samples")}
                                        for m, e in last["modes"].items()},
                              "input_prefill_ms": report["input_prefill_ms"], "wall_s": report["wall_s"]})
    finally:
        torch.set_num_threads(previous_threads)
    return {"benchmark": "ttft-grid", "model": source, "device": str(runner.device), "dtype": str(runner.dtype),
            "threads": threads or previous_threads, "agents": agents, "input": input, "modes": list(modes),
            "samples": samples, "warmup": warmup, "prefixes": list(prefixes), "outputs": list(outputs),
            "config": (config or bench_config()).to_dict(), "cells": cells, "wall_s": time.perf_counter() - started}


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------
def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `kvcomm bench ttft` options."""
    parser.add_argument("--agents", type=int, default=None, help="agents in the job (default 5; 3 with --grid)")
    parser.add_argument("--prefix", type=int, default=512, help="system prompt tokens per agent")
    parser.add_argument("--input", type=int, default=1024, help="user input tokens")
    parser.add_argument("--output", type=int, default=512, help="response tokens per agent (teacher-forced)")
    parser.add_argument("--modes", default=None,
                        help=f"comma list (default: {','.join(DEFAULT_MODES)}; dense,dense-prefix,kvcomm with --grid)")
    parser.add_argument("--samples", type=int, default=None, help="measured samples (default 3; 1 per grid cell)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up samples in kvcomm mode (anchors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", action="store_true", help="Table 3: prefix x output grid instead of one setting")
    parser.add_argument("--grid-prefixes", default=None,
                        help="comma list (default: the paper's 64,256,512,1024 on GPU, 64,512 on CPU)")
    parser.add_argument("--grid-outputs", default=None,
                        help="comma list (default: the paper's 128,256,512,1024 on GPU, 128,512 on CPU)")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--plot", default=None, help="write the TTFT/speedup figure here (PNG; not for --grid)")
    parser.add_argument("--calibration", default="none",
                        help="none (default: the uncalibrated corrected config, no recompute budget), auto (the "
                             "model's calibration, as a served engine runs it), or a calibration file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    model_options(parser, threads_help="torch CPU threads (default 2)")


def cli_main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed `add_arguments` options; print the markdown table, write JSON / PNG."""
    config = None if args.calibration == "none" else resolve(bench_config(calibration=args.calibration),
                                                                 args.model)[0]
    common = dict(model=args.model, device=args.device, dtype=args.dtype, random_weights=args.random_weights,
                  threads=getattr(args, "threads", None) or 2, seed=args.seed, progress=not args.no_progress,
                  config=config)
    if args.grid:
        on_gpu = str(args.device).startswith("cuda")
        grid = PAPER_GRID if on_gpu else CPU_GRID
        report = run_grid(agents=args.agents or 3,
                          prefixes=_int_list(args.grid_prefixes) if args.grid_prefixes else grid["prefixes"],
                          outputs=_int_list(args.grid_outputs) if args.grid_outputs else grid["outputs"],
                          input=args.input,
                          modes=tuple(args.modes.split(",")) if args.modes else ("dense", "dense-prefix", "kvcomm"),
                          samples=args.samples or 1, warmup=args.warmup, **common)
    else:
        report = run(agents=args.agents or 5, prefix=args.prefix, input=args.input, output=args.output,
                     modes=tuple(args.modes.split(",")) if args.modes else DEFAULT_MODES,
                     samples=args.samples or 3, warmup=args.warmup, **common)
    print(markdown_table(report))
    write_json_report(args.json, report)
    if args.plot and not args.grid:
        print(f"wrote {plot(report, args.plot)}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return standalone_main("ttft", add_arguments, cli_main, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
