"""Token generation on the model runner: sampling and a continuous-batching decode loop.

`DecodeBatch` holds every sequence that is past its prefill and advances them together, one token per
`step()`; new sequences join between steps, finished ones leave. A sequence stopped by its length limit
gets one more forward of its last token, so the KV of *every* generated token is kept (the reference
implementation drops the last one). `generate()` is the one-sequence convenience on top.

Stop strings (`Sampling.stop_strings`) end a sequence as soon as its decoded text contains one; the batch then
needs a `detokenize` function (token ids -> text). Where the text is cut and which tokens a response keeps is
`cut_at_stop_string`'s business.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .runner import BatchKV, ModelRunner, SequenceKV


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()   # ends once its text contains one (finish_reason "stop"; not before min)

    def __post_init__(self) -> None:
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop_strings!r}")
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
    """One sequence being decoded.

    While it sits in a `DecodeBatch` slot its new tokens' KV lives in the batch's buffer; `kv` gets them back
    when it leaves the batch (finished, removed from `active`, or pushed past `max_batch_size`), so a done
    state's `kv` holds the prompt and every generated token (the stop token excluded).
    """
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
    _group: "_Group | None" = field(default=None, repr=False, compare=False)   # the batch buffer it sits in

    @property
    def done(self) -> bool:
        return self.finish_reason is not None and not self.needs_flush

    def _accept(self, token: int) -> None:
        self.tokens.append(token)
        if self.on_token is not None:
            self.on_token(token)


def _ends_in_stop(tokens: Sequence[int], stops: Sequence[str], detokenize: Callable[[Sequence[int]], str]) -> bool:
    """Whether the newest token completed a stop string. Earlier tokens were checked when they came, so only the
    tail is decoded: a stop string of n characters spans at most its last n tokens (+2 for a multi-byte
    character split across tokens), not the whole response at every step."""
    window = max(len(stop) for stop in stops) + 2
    text = detokenize(tokens[-window:])
    return any(stop in text for stop in stops)


def first_stop_at(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string in `text` begins; None when there is none."""
    found = [at for at in (text.find(stop) for stop in stops) if at >= 0]
    return min(found) if found else None


def cut_at_stop_string(token_ids: Sequence[int], stops: Sequence[str],
                       detokenize: Callable[[Sequence[int]], str]) -> tuple[str, int]:
    """The text of `token_ids` up to (not including) the earliest stop string, and how many leading tokens lie
    wholly before it (the tokens a response keeps, with their KV). Without a stop string in the text: all of it."""
    text = detokenize(token_ids)
    at = first_stop_at(text, stops)
    if at is None:
        return text, len(token_ids)
    text = text[:at]
    keep = len(token_ids)
    while keep > 0:
        prefix = detokenize(token_ids[:keep])
        if len(prefix) <= len(text) and text.startswith(prefix):
            break
        keep -= 1
    return text, keep


def _capacity_class(need: int) -> int:
    """The buffer capacity for a sequence needing `need` tokens: 64, 96, 128, 192, 256, 384, ... (<= 1/3 spare)."""
    cap = 64
    while cap < need:
        cap *= 2
    return max(64, cap * 3 // 4) if need <= cap * 3 // 4 else cap


class _Group:
    """Sequences of one capacity class sharing one `BatchKV`; owners[i] sits in slot i."""

    def __init__(self, kv: BatchKV):
        self.kv = kv
        self.owners: list[SequenceState] = []


class DecodeBatch:
    """Continuous batching over a `ModelRunner`: many sequences, one batched forward per step.

    Sequences of similar length (one capacity class, see `_capacity_class`) share a persistent `BatchKV`: a
    sequence's prompt KV is copied into a slot when it first runs, each step appends in place and attends over
    all slots in one call per layer, and the generated tokens' KV is copied back into the sequence's own buffer
    when it leaves. Sequences join (`add`) and leave between steps; `active` may be reassigned or edited from
    outside (the next step, or the assignment itself, frees the slots of the sequences no longer in it).
    """

    def __init__(self, runner: ModelRunner, max_batch_size: int = 64,
                 detokenize: Callable[[Sequence[int]], str] | None = None):
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.detokenize = detokenize            # token ids -> text; needed by sequences with stop strings
        self._active: list[SequenceState] = []
        self._groups: dict[int, _Group] = {}    # capacity -> group
        self.steps = 0

    @property
    def active(self) -> list[SequenceState]:
        return self._active

    @active.setter
    def active(self, states: list[SequenceState]) -> None:
        self._active = states
        self._release_outside(states)

    def add(self, kv: SequenceKV, last_logits: torch.Tensor, sampling: Sampling,
            on_token: Callable[[int], None] | None = None, started_at: float | None = None) -> SequenceState:
        """Join a sequence whose prompt is prefilled into `kv`; `last_logits` [vocab] are the prompt's last."""
        if sampling.stop_strings and self.detokenize is None:
            raise ValueError("a sequence with stop strings needs a DecodeBatch built with detokenize=")
        state = SequenceState(kv=kv, sampling=sampling, prompt_len=kv.length, first_logits=last_logits.float(),
                              on_token=on_token)
        if started_at is not None:
            state.started_at = started_at
        if sampling.temperature > 0:
            state.generator = torch.Generator().manual_seed(sampling.seed)
        self._take(state, state.first_logits)
        state.first_token_at = time.perf_counter()
        self._active.append(state)
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
        if (state.sampling.stop_strings and allow_stop
                and _ends_in_stop(state.tokens, state.sampling.stop_strings, self.detokenize)):
            state.finish_reason = "stop"   # the tokens from the stop string on are cut later: no flush needed
            state.finished_at = time.perf_counter()
            return
        if len(state.tokens) >= state.sampling.max_new_tokens:
            state.finish_reason = "length"
            state.needs_flush = True
            state.finished_at = time.perf_counter()

    # ---- slots ----------------------------------------------------------------------------------------------
    def _admit(self, state: SequenceState) -> None:
        """Copy the state's KV into a slot of its capacity class (one more token per remaining step fits)."""
        remaining = state.sampling.max_new_tokens - len(state.tokens) + 1    # steps left, the flush included
        cap = _capacity_class(state.kv.length + remaining)
        group = self._groups.get(cap)
        if group is None:
            pending = sum(1 for s in self._active[: self.max_batch_size] if s._group is None)
            group = self._groups[cap] = _Group(BatchKV(self.runner.spec, capacity=cap, dtype=self.runner.dtype,
                                                       device=self.runner.device, slots=pending))
        group.kv.admit(state.kv)
        group.owners.append(state)
        state._group = group

    def _release(self, state: SequenceState) -> None:
        """Copy the slot's new tokens back into `state.kv` and free the slot (dropping an emptied buffer)."""
        group = state._group
        slot = next(i for i, s in enumerate(group.owners) if s is state)
        group.kv.release(slot, state.kv)
        last = group.owners.pop()
        if last is not state:
            group.owners[slot] = last
        state._group = None
        if not group.owners:
            del self._groups[group.kv.capacity]

    def _release_outside(self, keep: Sequence[SequenceState]) -> None:
        """Free the slot of every sequence not in `keep`."""
        inside = {id(s) for s in keep}
        for group in list(self._groups.values()):
            for state in [s for s in group.owners if id(s) not in inside]:
                self._release(state)

    def _retire(self) -> list[SequenceState]:
        finished = [s for s in self._active if s.done]
        if finished:
            for state in finished:
                if state._group is not None:
                    self._release(state)
            self._active = [s for s in self._active if not s.done]
        return finished

    def step(self) -> list[SequenceState]:
        """Advance every active sequence by one token (flushes included); return those that finished."""
        batch = self._active[: self.max_batch_size]
        self._release_outside(batch)
        if not batch:
            return []
        for state in batch:
            if state._group is None:
                self._admit(state)
        groups = list(self._groups.values())
        order = [s for g in groups for s in g.owners]
        logits = self.runner.decode_step([g.kv for g in groups], torch.tensor([s.tokens[-1] for s in order]))
        self.steps += 1
        for state, row in zip(order, logits):
            if state.needs_flush:
                state.needs_flush = False
                continue
            self._take(state, row)
        return self._retire()

    def run_until_done(self) -> None:
        while self._active:
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
