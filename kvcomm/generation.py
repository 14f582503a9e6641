"""Token generation on the model runner: sampling and a continuous-batching decode loop.

`DecodeBatch` holds every sequence that is past its prefill and advances them together, one token per
`step()`; new sequences join between steps, finished ones leave. A sequence stopped by its length limit
gets one more forward of its last token, so the KV of *every* generated token is kept (the reference
implementation drops the last one). `generate()` is the one-sequence convenience on top.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .runner import ForwardRequest, ModelRunner, SequenceKV


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None,
                 allow_stop: bool) -> int:
    """One token from fp32 logits [vocab]. Stop tokens are masked until min_new_tokens is reached."""
    if not allow_stop and sampling.stop_token_ids:
        logits = logits.clone()
        logits[list(sampling.stop_token_ids)] = float("-inf")
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < sampling.top_p     # always keeps the top token
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class SequenceState:
    """One sequence being decoded."""
    kv: SequenceKV
    sampling: Sampling
    prompt_len: int
    first_logits: torch.Tensor          # [vocab] fp32: the distribution of the first generated token
    on_token: Callable[[int], None] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    needs_flush: bool = False           # last token still lacks its KV
    started_at: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0
    finished_at: float = 0.0
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None and not self.needs_flush

    def _accept(self, token: int) -> None:
        self.tokens.append(token)
        if self.on_token is not None:
            self.on_token(token)


class DecodeBatch:
    """Continuous batching over a `ModelRunner`: many sequences, one batched forward per step."""

    def __init__(self, runner: ModelRunner, max_batch_size: int = 64):
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.active: list[SequenceState] = []
        self.steps = 0

    def add(self, kv: SequenceKV, last_logits: torch.Tensor, sampling: Sampling,
            on_token: Callable[[int], None] | None = None, started_at: float | None = None) -> SequenceState:
        """Join a sequence whose prompt is prefilled into `kv`; `last_logits` [vocab] are the prompt's last."""
        state = SequenceState(kv=kv, sampling=sampling, prompt_len=kv.length, first_logits=last_logits.float(),
                              on_token=on_token)
        if started_at is not None:
            state.started_at = started_at
        if sampling.temperature > 0:
            state.generator = torch.Generator().manual_seed(sampling.seed)
        kv.reserve(sampling.max_new_tokens)
        self._take(state, state.first_logits)
        state.first_token_at = time.perf_counter()
        self.active.append(state)
        self._retire()
        return state

    def _take(self, state: SequenceState, logits: torch.Tensor) -> None:
        allow_stop = len(state.tokens) >= state.sampling.min_new_tokens
        token = sample_token(logits, state.sampling, state.generator, allow_stop)
        if token in state.sampling.stop_token_ids and allow_stop:
            state.finish_reason = "stop"   # the stop token is not part of the response; its KV is not needed
            state.finished_at = time.perf_counter()
            return
        state._accept(token)
        if len(state.tokens) >= state.sampling.max_new_tokens:
            state.finish_reason = "length"
            state.needs_flush = True
            state.finished_at = time.perf_counter()

    def _retire(self) -> list[SequenceState]:
        finished = [s for s in self.active if s.done]
        self.active = [s for s in self.active if not s.done]
        return finished

    def step(self) -> list[SequenceState]:
        """Advance every active sequence by one token (flushes included); return those that finished."""
        if not self.active:
            return []
        batch = self.active[: self.max_batch_size]
        requests = [ForwardRequest(s.kv, torch.tensor([s.tokens[-1]])) for s in batch]
        logits = self.runner.forward(requests)
        self.steps += 1
        for state, row in zip(batch, logits):
            if state.needs_flush:
                state.needs_flush = False
                continue
            self._take(state, row[0])
        return self._retire()

    def run_until_done(self) -> None:
        while self.active:
            self.step()


@dataclass
class GenerationResult:
    token_ids: list[int]
    first_logits: torch.Tensor   # [vocab] fp32
    kv: SequenceKV               # prompt + every generated token (the stop token excluded)
    prompt_len: int
    ttft_s: float
    total_s: float
    finish_reason: str

    @property
    def response_kv(self):
        """The generated tokens' KV as a segment (positions after the prompt)."""
        return self.kv.segment(self.prompt_len, self.prompt_len + len(self.token_ids))


def result_of(state: SequenceState) -> GenerationResult:
    return GenerationResult(token_ids=list(state.tokens), first_logits=state.first_logits, kv=state.kv,
                            prompt_len=state.prompt_len, ttft_s=state.first_token_at - state.started_at,
                            total_s=state.finished_at - state.started_at, finish_reason=state.finish_reason or "")


def generate(runner: ModelRunner, kv: SequenceKV, last_logits: torch.Tensor, sampling: Sampling,
             started_at: float | None = None) -> GenerationResult:
    """Decode one sequence to completion from a prefilled buffer."""
    batch = DecodeBatch(runner, max_batch_size=1)
    state = batch.add(kv, last_logits, sampling, started_at=started_at)
    batch.run_until_done()
    return result_of(state)


def generate_from_ids(runner: ModelRunner, prompt_ids: Sequence[int] | torch.Tensor, sampling: Sampling,
                      context=None) -> GenerationResult:
    """Prefill `prompt_ids` (after an optional context segment) and decode: the plain dense path."""
    started = time.perf_counter()
    logits, kv = runner.prefill(prompt_ids, context=context, extra_capacity=sampling.max_new_tokens + 1)
    return generate(runner, kv, logits[-1], sampling, started_at=started)
