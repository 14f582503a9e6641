"""`kvcomm bench ttft`: time to first token per agent and serving mode, the paper's Tables 2 and 3.

This module owns the TTFT benchmark: the synthetic CopyMachine job, the measurement loop, its report (JSON-able
dict), the markdown table, the plot, and the command-line entry point (`add_arguments` / `cli_main`, also
runnable as ``python -m kvcomm.bench.ttft``; `scripts/gpu_bench.sh` runs it on a GPU).

The setting (kvcomm-algorithm.md section 4, the reference's ``experiments/benchmark_TTFT.py``):

* a fully connected job of N agents: agent k reads the user input and every agent j < k's response;
* agent k's template: a system prompt of ~`prefix` tokens (a role line naming agent k, then one-token filler
  symbols, a different symbol per agent), then ``{user_question}`` (~`input` random Delta/Omega symbols, like the
  reference's 1000 random symbols), then for each upstream agent a fixed header line, its ``{agent_j_current}``
  placeholder and a fixed closing line, then an instruction;
* every response is forced to exactly `output` tokens.

Teacher forcing. Decoding `output` tokens per agent per sample is far too slow on a CPU, so each response is
produced by teacher forcing: its tokens are `output` synthetic symbol tokens, and its KV is the producer's own KV
for them, computed by prefilling them right after the producer's exact (dense) prompt KV -- exactly the KV a
decode would have produced for those tokens -- then de-rotated to position 0 (the reference's response base).
This changes nothing about what TTFT measures: TTFT stops at the first token. Every mode sees identical tokens.

What is timed, per agent and mode: from the start of `KVCommEngine.prepare` (template lookup, fetch, RoPE
alignment, offsets, assembly, the recomputed tail or full prefill) until the first token is sampled, i.e. the
engine's own ``TurnResult.ttft_s`` without the decode. Like the reference, the isolated user-input prefill (paid
once per question, not per agent), the entropy gate (anchor prediction) and the response de-rotation are not in
TTFT; the input prefill and the gate are reported separately, and agent 1's TTFT is also reported with the input
prefill added. Pool warm-up: `warmup` samples run in kvcomm mode only; their dense fallbacks record anchors. The
reference's TTFT script uses gamma = 1.0, so once every placeholder has two anchors every call reuses; this
benchmark does the same (``KVCommConfig(gamma=1.0)``; default gamma is 0.3). Measured samples then run every
mode, in an order rotated per sample and agent so machine drift hits all modes alike; speedups are ratios of
medians against dense and dense-prefix measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..anchor_pool import AnchorPool
from ..config import KVCommConfig
from ..engine import MODES, KVCommEngine, SharedContent, TurnRequest
from ..generation import DecodeBatch, Sampling
from ..kv import KVSegment
from ..model_loading import load_model
from ..runner import ForwardRequest, ModelRunner, SequenceKV
from ..templates import AgentTemplate

DEFAULT_MODES = MODES
POOL_MODES = ("kvcomm", "hybrid")
SPLIT_KEYS = ("fetch", "align", "offset", "prefill")
NAMESPACE = "ttft-bench"
# one-token symbols in the embedded SmolLM2 tokenizer: each agent's system-prompt filler uses its own
FILLER_SYMBOLS = ("α", "β", "γ", "δ", "λ", "μ", "π", "σ")
CONTENT_SYMBOLS = ("Δ", "Ω")      # the reference's random input alphabet
# Table 3 (3 agents, prefix x output): the paper's grid, and the subset that fits a CPU run (~10 min, SmolLM2)
PAPER_GRID = {"prefixes": (64, 256, 512, 1024), "outputs": (128, 256, 512, 1024)}
CPU_GRID = {"prefixes": (64, 512), "outputs": (128, 512)}
GOALS = {"vs_dense": 10.0, "vs_dense_prefix": 4.0}   # agent N, kvcomm, on CPU with the embedded model
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
# the synthetic job
# ------------------------------------------------------------------------------------------------------------
def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def system_prompt(agent: int, prefix_tokens: int, tokenizer: Any) -> str:
    """Agent `agent`'s system prompt: a role line plus filler symbols, sized to ~`prefix_tokens` tokens."""
    role = f"You are agent {agent}, a copy machine. Copy the task text exactly."
    symbol = " " + FILLER_SYMBOLS[(agent - 1) % len(FILLER_SYMBOLS)]
    count = max(0, prefix_tokens - len(_encode(tokenizer, role)))
    for _ in range(4):   # symbols are one token each; a merge at the boundary is corrected here
        text = role + symbol * count
        missing = prefix_tokens - len(_encode(tokenizer, text))
        if missing == 0 or count + missing < 0:
            break
        count += missing
    return role + symbol * count


def copy_machine_template(agent: int, prefix_tokens: int, tokenizer: Any) -> AgentTemplate:
    """Agent k of the fully connected CopyMachine job: reads the input and agents 1..k-1's responses."""
    parts = ["The task is:\n\n{user_question}\n\n"]
    for upstream in range(1, agent):
        parts.append(f"Agent {upstream} as a copy machine answered:\n\n{{agent_{upstream}_current}}\n\n"
                     f"That was agent {upstream}'s answer.\n\n")
    parts.append("Copy the task text above exactly, symbol by symbol.")
    return AgentTemplate(str(agent), system_prompt(agent, prefix_tokens, tokenizer), "".join(parts))


def random_symbol_ids(tokenizer: Any, num_tokens: int, rng: random.Random) -> tuple[int, ...]:
    """Exactly `num_tokens` token ids of random space-separated Delta/Omega symbols (each symbol >= 1 token)."""
    text = "".join(" " + rng.choice(CONTENT_SYMBOLS) for _ in range(num_tokens))
    return tuple(_encode(tokenizer, text)[:num_tokens])


def teacher_forced_response(runner: ModelRunner, prompt_ids: Sequence[int], response_ids: Sequence[int],
                            prompt_kv: SequenceKV | None = None) -> SharedContent:
    """A response's shared content as a decode would have left it: the producer's own KV for `response_ids`.

    `prompt_kv` is the producer's exact prompt KV (a dense prefill, positions 0..P-1), extended in place; without
    it the prompt is prefilled here. The response tokens are prefilled after it (causal attention: the same KV a
    token-by-token decode computes), then copied out and de-rotated to start at position 0.
    """
    prompt_len, response_len = len(prompt_ids), len(response_ids)
    if prompt_kv is None:
        _, prompt_kv = runner.prefill(list(prompt_ids), extra_capacity=response_len)
    if prompt_kv.start != 0 or prompt_kv.length != prompt_len:
        raise ValueError(f"prompt KV holds {prompt_kv.length} tokens from position {prompt_kv.start}; expected "
                         f"the {prompt_len}-token prompt from position 0")
    runner.forward([ForwardRequest(prompt_kv, torch.tensor(list(response_ids), dtype=torch.int64))])
    produced = prompt_kv.segment(prompt_len, prompt_len + response_len)   # [L, Hkv, response_len, D] at P..
    base = KVSegment(produced.keys.clone(), produced.values.clone(), produced.start).shifted(runner.rope, 0)
    return SharedContent(kind="response", token_ids=tuple(int(t) for t in response_ids), base=base)


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
                         "system_prompt_tokens": len(_encode(self.tokenizer, template.system_prompt)),
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
            if mode not in ("dense", "dense-prefix"):
                split = {key: _median_ms([t.timings.get(key, 0.0) for t in rows]) for key in SPLIT_KEYS}
                split["other"] = _median_ms([t.ttft_s - sum(t.timings.get(key, 0.0) for key in SPLIT_KEYS)
                                             for t in rows])
                entry["split_ms"] = split
            if k == 1 and mode not in ("dense", "dense-prefix"):
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
        "attention": runner.attention_backend, "config": config.to_dict(), "config_mode": config.mode,
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
        model: str = "smollm2-135m-instruct", device: str = "cpu", dtype: str | None = None,
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
             model: str = "smollm2-135m-instruct", device: str = "cpu", dtype: str | None = None,
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
# presentation
# ------------------------------------------------------------------------------------------------------------
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

    reuse_modes = [m for m in modes if m not in ("dense", "dense-prefix")]
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


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------
def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def add_arguments(parser: argparse.ArgumentParser, *, model_args: bool = True) -> None:
    """The `kvcomm bench ttft` options. `model_args=False` when the caller already added --model,
    --random-weights, --device, --dtype and --threads (cluster.cli's `_model_args`)."""
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    if model_args:
        parser.add_argument("--model", default="smollm2-135m-instruct",
                            help="embedded name, HF checkpoint dir, .gguf file, or preset (with --random-weights)")
        parser.add_argument("--random-weights", action="store_true", help="random weights for a preset")
        parser.add_argument("--device", default="cpu")
        parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 on CPU, "
                                                         "bf16 on GPU)")
        parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")


def cli_main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed `add_arguments` options; print the markdown table, write JSON / PNG."""
    common = dict(model=args.model, device=args.device, dtype=args.dtype, random_weights=args.random_weights,
                  threads=getattr(args, "threads", None) or 2, seed=args.seed, progress=not args.no_progress)
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
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {path}", file=sys.stderr)
    if args.plot and not args.grid:
        print(f"wrote {plot(report, args.plot)}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvcomm.bench.ttft", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return cli_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
