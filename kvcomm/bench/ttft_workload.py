"""The synthetic CopyMachine job of `kvcomm bench ttft` (the reference's ``experiments/benchmark_TTFT.py``).

Agent k's template (a ~`prefix`-token system prompt of one-token filler symbols, the user input, every upstream
agent's response between fixed lines), the random symbol inputs, and teacher-forced responses: `output` symbol
tokens whose KV is the producer's own (prefilled after its exact prompt KV), de-rotated to position 0. It measures
nothing; `kvcomm.bench.ttft` does.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from ..engine import SharedContent
from ..kv import KVSegment
from ..runner import ForwardRequest, ModelRunner, SequenceKV
from ..templates import AgentTemplate

# one-token symbols in the embedded SmolLM2 tokenizer: each agent's system-prompt filler uses its own
FILLER_SYMBOLS = ("α", "β", "γ", "δ", "λ", "μ", "π", "σ")
CONTENT_SYMBOLS = ("Δ", "Ω")      # the reference's random input alphabet


def token_ids_of(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def system_prompt(agent: int, prefix_tokens: int, tokenizer: Any) -> str:
    """Agent `agent`'s system prompt: a role line plus filler symbols, sized to ~`prefix_tokens` tokens."""
    role = f"You are agent {agent}, a copy machine. Copy the task text exactly."
    symbol = " " + FILLER_SYMBOLS[(agent - 1) % len(FILLER_SYMBOLS)]
    count = max(0, prefix_tokens - len(token_ids_of(tokenizer, role)))
    for _ in range(4):   # symbols are one token each; a merge at the boundary is corrected here
        text = role + symbol * count
        missing = prefix_tokens - len(token_ids_of(tokenizer, text))
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
    return tuple(token_ids_of(tokenizer, text)[:num_tokens])


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
