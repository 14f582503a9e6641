"""Token generation on the model runner: a continuous-batching decode loop (sampling is `kvcomm.sampling`).

`DecodeBatch` holds every sequence that is past its prefill and advances them together, one token per
`step()`; new sequences join between steps, finished ones leave. A sequence stopped by its length limit
gets one more forward of its last token, so the KV of *every* generated token is kept (the reference
implementation drops the last one). `generate()` is the one-sequence convenience on top.

Memory: a joining sequence's KV *moves* into a slot of a decode buffer of its capacity class (its own buffer is
freed), and leaves in a buffer of exactly its length; buffers never grow in place, they are allocated, merged and
shrunk only where the runner's `kv_budget` has room, so the KV a batch holds never exceeds it (`can_place` says
whether a sequence of a given size would get a slot now). One step reads one tensor back from the device: the
sampled tokens of the whole batch.

Stop strings (`Sampling.stop`) end a sequence as soon as its decoded text contains one; the batch then
needs a `detokenize` function (token ids -> text). Where the text is cut and which tokens a response keeps is
`cut_at_stop_string`'s business.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .memory_plan import KVBudgetError, capacity_class
from .runner import BatchKV, DecodeInputs, ModelRunner, SequenceKV
from .sampling import RowSampling, Sampling, sample_tokens

__all__ = ["DecodeBatch", "GenerationResult", "Sampling", "SequenceState", "StepPlan", "cut_at_stop_string",
           "first_stop_at", "generate", "generate_from_ids", "result_of"]


@dataclass
class SequenceState:
    """One sequence being decoded.

    While it sits in a `DecodeBatch` slot its whole KV lives in the batch's buffer (and `kv`, the very buffer the
    caller passed in, reads as empty); when it leaves the batch (finished, removed from `active`, or pushed past
    `max_batch_size`) `kv` gets it back in storage of exactly its tokens, so a done state's `kv` holds the prompt
    and every generated token (the stop token excluded).
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
    _group: "_Buffer | None" = field(default=None, repr=False, compare=False)   # the batch buffer it sits in

    @property
    def done(self) -> bool:
        return self.finish_reason is not None and not self.needs_flush

    def _accept(self, token: int) -> None:
        self.tokens.append(token)
        if self.on_token is not None:
            self.on_token(token)

    def _row(self) -> RowSampling:
        """How its next token is sampled."""
        return RowSampling(self.sampling, len(self.tokens), len(self.tokens) >= self.sampling.min_new_tokens)


def _ends_in_stop(tokens: Sequence[int], stops: Sequence[str], detokenize: Callable[[Sequence[int]], str]) -> bool:
    """Whether the newest token completed a stop string. Earlier tokens were checked when they came, so only the
    tail is decoded: a stop string of n UTF-8 bytes spans at most its last n tokens (a token is at least a byte;
    one CJK character or emoji is often split over several), +2 for a character split across the window's start,
    not the whole response at every step."""
    window = max(len(stop.encode("utf-8")) for stop in stops) + 2
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


@dataclass(frozen=True)
class StepPlan:
    """One decode step between `DecodeBatch.begin_step` and `end_step`: what the forward computes, and the
    sequences its logits' rows belong to (order[i] is row i)."""
    inputs: DecodeInputs
    order: list[SequenceState]


class _Buffer:
    """One decode buffer (`BatchKV`) of a capacity class; owners[i] sits in slot i."""

    def __init__(self, kv: BatchKV):
        self.kv = kv
        self.owners: list[SequenceState] = []


class DecodeBatch:
    """Continuous batching over a `ModelRunner`: many sequences, one batched forward per step.

    Sequences of similar length (one capacity class, see `kvcomm.memory_plan.capacity_class`) share decode
    buffers: a sequence's KV moves into a slot when it joins (`add`), each step appends in place and attends over
    all slots in one call per layer and buffer, and its KV moves back out when it leaves. Sequences join and
    leave between steps; `active` may be reassigned from outside (the assignment frees the slots of the
    sequences no longer in it). `keep_kv=False` drops a finished sequence's KV instead of handing it back.
    """

    def __init__(self, runner: ModelRunner, max_batch_size: int = 64,
                 detokenize: Callable[[Sequence[int]], str] | None = None, keep_kv: bool = True):
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.detokenize = detokenize            # token ids -> text; needed by sequences with stop strings
        self.keep_kv = keep_kv
        self._active: list[SequenceState] = []
        self._groups: dict[int, list[_Buffer]] = {}    # capacity -> its buffers
        self.steps = 0

    @property
    def active(self) -> tuple[SequenceState, ...]:
        """The sequences being decoded (the first `max_batch_size` advance each step). Read-only: assign to
        change it, so the slots of the sequences dropped are freed."""
        return tuple(self._active)

    @active.setter
    def active(self, states: Sequence[SequenceState]) -> None:
        self._active = list(states)
        self._release_outside(self._active)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the decode buffers this batch holds."""
        return sum(b.kv.nbytes for buffers in self._groups.values() for b in buffers)

    def slot_bytes(self, tokens: int) -> int:
        """Bytes of the slot a sequence needing `tokens` tokens (prompt + max_new_tokens) decodes in."""
        return capacity_class(tokens) * self.runner.kv_bytes_per_token

    def can_place(self, tokens: int) -> bool:
        """Whether a sequence needing `tokens` tokens (prompt + max_new_tokens) would get a slot right now: a free
        slot of its class, or room in the runner's KV budget for one."""
        buffers = self._groups.get(capacity_class(tokens), [])
        return any(b.kv.free_slots for b in buffers) or self.runner.kv_budget.fits(self.slot_bytes(tokens))

    def add(self, kv: SequenceKV, last_logits: torch.Tensor, sampling: Sampling,
            on_token: Callable[[int], None] | None = None, started_at: float | None = None) -> SequenceState:
        """Join a sequence whose prompt is prefilled into `kv`; `last_logits` [vocab] are the prompt's last.

        Its first token is sampled now; its KV moves into a decode slot (when the batch and the KV budget have
        room; otherwise it waits, holding `kv`, until a step finds room)."""
        if sampling.stop and self.detokenize is None:
            raise ValueError("a sequence with stop strings needs a DecodeBatch built with detokenize=")
        state = SequenceState(kv=kv, sampling=sampling, prompt_len=kv.length, first_logits=last_logits.float(),
                              on_token=on_token)
        if started_at is not None:
            state.started_at = started_at
        (token,) = sample_tokens(state.first_logits[None], [state._row()]).tolist()   # one read-back
        self._take(state, token)
        state.first_token_at = time.perf_counter()
        if not state.done:
            self._active.append(state)
            if len(self._active) <= self.max_batch_size:
                self._place(state)
        return state

    def _take(self, state: SequenceState, token: int) -> None:
        allow_stop = len(state.tokens) >= state.sampling.min_new_tokens
        if token in state.sampling.stop_token_ids and allow_stop:
            state.finish_reason = "stop"   # the stop token is not part of the response; its KV is not needed
            state.finished_at = time.perf_counter()
            return
        state._accept(token)
        if (state.sampling.stop and allow_stop
                and _ends_in_stop(state.tokens, state.sampling.stop, self.detokenize)):
            state.finish_reason = "stop"   # the tokens from the stop string on are cut later: no flush needed
            state.finished_at = time.perf_counter()
            return
        if len(state.tokens) >= state.sampling.max_new_tokens:
            state.finish_reason = "length"
            state.needs_flush = True
            state.finished_at = time.perf_counter()

    # ---- slots ----------------------------------------------------------------------------------------------
    def _place(self, state: SequenceState) -> bool:
        """Move the state's KV into a free slot of its class (a new one-slot buffer if the budget has room);
        False when there is no room now. One more token per remaining step (and the flush) fits its slot."""
        remaining = state.sampling.max_new_tokens - len(state.tokens) + 1    # steps left, the flush included
        cap = capacity_class(state.kv.length + remaining)
        buffers = self._groups.setdefault(cap, [])
        target = next((b for b in buffers if b.kv.free_slots), None)
        if target is None:
            if not self.runner.kv_budget.fits(cap * self.runner.kv_bytes_per_token):
                if not buffers:
                    del self._groups[cap]
                return False
            target = _Buffer(self.runner.new_batch_kv(cap, 1))
            buffers.append(target)
        state.kv.move_to(target.kv)
        target.owners.append(state)
        state._group = target
        return True

    def _move(self, source: _Buffer, slot: int, target: _Buffer) -> None:
        """Move the sequence in `source`'s `slot` into a free slot of `target` (same class)."""
        state = source.owners[slot]
        source.kv.move(slot, target.kv)
        last = source.owners.pop()
        if slot < len(source.owners):
            source.owners[slot] = last
        target.owners.append(state)
        state._group = target

    def _consolidate(self, cap: int) -> None:
        """Fewer, fuller buffers for one class, never beyond the KV budget: sequences of the smaller buffers move
        into free slots of the larger ones; several buffers left merge into one with room to grow (if the budget
        holds it next to them); a buffer three-quarters empty shrinks."""
        buffers = sorted(self._groups[cap], key=lambda b: b.kv.slots, reverse=True)
        for i in range(len(buffers) - 1, 0, -1):            # smallest donors first, into the largest targets
            for target in buffers[:i]:
                while buffers[i].owners and target.kv.free_slots:
                    self._move(buffers[i], len(buffers[i].owners) - 1, target)
        buffers = [b for b in buffers if b.owners]
        used = sum(len(b.owners) for b in buffers)
        per_slot = cap * self.runner.kv_bytes_per_token
        sizes = []
        if len(buffers) > 1:
            sizes = [min(2 * used, max(self.max_batch_size, used)), used]
        elif buffers and buffers[0].kv.slots >= 8 and 4 * used <= buffers[0].kv.slots:
            sizes = [2 * used]
        for slots in sizes:
            if self.runner.kv_budget.fits(slots * per_slot):
                merged = _Buffer(self.runner.new_batch_kv(cap, slots))
                for b in buffers:
                    while b.owners:
                        self._move(b, len(b.owners) - 1, merged)
                buffers = [merged]
                break
        if buffers:
            self._groups[cap] = buffers
        else:
            del self._groups[cap]

    def _release(self, state: SequenceState) -> None:
        """Free the state's slot; its KV comes back into `state.kv`, in storage of exactly its tokens (unless
        `keep_kv` is off)."""
        buffer = state._group
        slot = next(i for i, s in enumerate(buffer.owners) if s is state)
        if self.keep_kv:
            buffer.kv.release(slot, into=state.kv)
        else:
            buffer.kv.drop(slot)
        last = buffer.owners.pop()
        if slot < len(buffer.owners):
            buffer.owners[slot] = last
        state._group = None
        if not buffer.owners:
            buffers = self._groups[buffer.kv.capacity]
            buffers.remove(buffer)
            if not buffers:
                del self._groups[buffer.kv.capacity]

    def _release_outside(self, keep: Sequence[SequenceState]) -> None:
        """Free the slot of every sequence not in `keep`."""
        inside = {id(s) for s in keep}
        for buffers in list(self._groups.values()):
            for buffer in list(buffers):
                for state in [s for s in buffer.owners if id(s) not in inside]:
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
        """Advance every active sequence that has a slot by one token (flushes included); return those that
        finished. The batch's sampled tokens are the one read-back from the device."""
        plan = self.begin_step()
        if plan is None:
            return self._retire()
        return self.end_step(plan, self.runner.decode_step(plan.inputs.groups, plan.inputs.token_ids))

    def begin_step(self) -> StepPlan | None:
        """The first half of `step`, for a step that rides in another forward (`ModelRunner.forward` with the
        scheduler's hooks): place the sequences the step advances and say what it computes; None when no sequence
        has a slot. Nothing may join or leave the batch until `end_step`."""
        batch = self._active[: self.max_batch_size]
        self._release_outside(batch)
        for state in batch:
            if state._group is None:
                self._place(state)
        for cap in list(self._groups):
            self._consolidate(cap)
        buffers = [b for group in self._groups.values() for b in group]
        order = [s for b in buffers for s in b.owners]
        if not order:
            return None
        return StepPlan(DecodeInputs([b.kv for b in buffers], [s.tokens[-1] for s in order]), order)

    def end_step(self, plan: StepPlan, logits: torch.Tensor) -> list[SequenceState]:
        """The second half of `step`: sample from the step's logits [N, vocab]; return the sequences finished."""
        self.steps += 1
        tokens = sample_tokens(logits, [s._row() for s in plan.order]).tolist()   # the step's one device read
        for state, token in zip(plan.order, tokens):
            if state.needs_flush:
                state.needs_flush = False
                continue
            self._take(state, token)
        return self._retire()

    def run_until_done(self) -> None:
        """Step until every sequence is done; a `KVBudgetError` if sequences wait for KV room nothing here frees."""
        while self._active:
            steps = self.steps
            finished = self.step()
            if self.steps == steps and not finished and self._active:
                raise KVBudgetError(f"{len(self._active)} sequence(s) wait for KV room and none is decoding here "
                                    f"to free it ({self.runner.kv_budget.what}: {self.runner.kv_budget.stats()})")


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
    logits, kv = runner.prefill(prompt_ids, context=context)   # its KV moves into a decode slot
    return generate(runner, kv, logits[-1], sampling, started_at=started)
