"""The model thread of a worker: continuous batching on one engine (plain Python, no Ray).

* `TurnScheduler`: a single *model thread* owns the `KVCommEngine`. Callers submit engine calls (`call`) and turns
  (`turn`) and get `concurrent.futures.Future`s. Between two decode steps the thread runs the queued engine calls,
  admits newly arrived turns (`engine.prepare`: their prefill, or reuse) into the running `DecodeBatch` in arrival
  order while it holds fewer than `max_batch_size` sequences *and* the replica's KV budget has room for the turn's
  slot (one that can never fit fails at once, naming the limit), advances every active sequence by one token in one
  batched forward, and resolves the futures of finished turns (`engine.finish`). A turn can be cancelled while it
  waits or decodes (`cancel`): it leaves the batch at the next step.
  Decode steps ride in engine calls (as vLLM's scheduler mixes prefill chunks and decodes in one batch): while
  sequences decode, every forward of new tokens an engine call or admission runs on this thread (a prefill or one
  of its chunks, an input, a base cache) carries the batch's next decode step in the same pass over the weights
  (`kvcomm.runner_hooks.PrefillBudget.ride_decode`); the turns such a step finishes are resolved when the current work
  is done. Chunked prefill (`prefill_step_tokens` > 0) bounds the prefill tokens one forward carries: while
  sequences decode the runner prefills in chunks of that size, each carrying a step; CacheBlend's prefill (its own
  layer loop, no step rides in it) takes a separate step first once the tokens since the last step would pass it.
* `ScheduledEngine`: the engine as the worker side of a turn (`actors.turns`) uses it, callable from any thread:
  its `run_turn` joins the shared batch and its other engine calls (inputs, the gate) run on the model thread; the
  pool, thread-safe, is used on the caller's thread.

`actors.agent_worker.AgentWorker` builds one of each per model replica.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
import traceback
from typing import Any, Callable

import torch

from kvcomm.engine import KVCommEngine, TurnRequest, TurnResult
from kvcomm.generation import SequenceState
from kvcomm.memory_plan import MemoryPlan
from kvcomm.runner_hooks import DecodeRide, PrefillBudget

from .latency import Latencies
from .turns import Cancellation, TurnCancelled
from .worker_load import SchedulerLoad

log = logging.getLogger(__name__)


class SchedulerStopped(RuntimeError):
    """The scheduler was stopped before this work ran."""


class TurnScheduler:
    """Continuous batching on one engine: one model thread runs engine calls, prefills and decode steps."""

    def __init__(self, engine: KVCommEngine, max_batch_size: int, max_queued_turns: int = 1024,
                 name: str = "kvcomm-model", memory_plan: MemoryPlan | None = None, prefill_step_tokens: int = 0):
        """`memory_plan`: turns it can never serve fail at once (its KV budget is `engine.runner.kv_budget`).
        `prefill_step_tokens`: chunked prefill's budget (see the module docstring); 0: prefills run whole."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queued_turns < 1:
            raise ValueError(f"max_queued_turns must be >= 1, got {max_queued_turns}")
        if prefill_step_tokens < 0:
            raise ValueError(f"prefill_step_tokens must be >= 0 (0: no chunked prefill), got {prefill_step_tokens}")
        self.engine, self.memory_plan = engine, memory_plan
        self._turn_slots = threading.BoundedSemaphore(max_queued_turns)   # queued + decoding turns
        self.max_batch_size = max_batch_size
        self._batch = engine.decode_batch(max_batch_size)
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._pending: collections.deque[tuple[TurnRequest, concurrent.futures.Future]] = collections.deque()
        self._running: dict[int, tuple[Any, concurrent.futures.Future]] = {}   # id(SequenceState) -> work
        self._cancelled: set[int] = set()     # id(future) of running turns to drop at the next step
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        # statistics (written by the model thread only)
        self.steps = 0
        self.step_sequences = 0           # sum over steps of the sequences advanced: mean batch = this / steps
        self.max_active = 0               # the most sequences one step advanced
        self.turns_finished = 0
        self.turns_failed = 0
        self.turns_cancelled = 0
        self.tokens_generated = 0
        self.busy_s = 0.0
        self.step_times = Latencies()     # decode steps
        self.step_gaps = Latencies()      # sequences waiting between two steps (admissions, engine calls)
        self.token_intervals = Latencies()   # from one step's end to the next's while sequences decode: the gap
        #                                      and the step itself, what a decoding sequence waits per token
        self._last_step_end: float | None = None
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self.prefill_step_tokens = prefill_step_tokens
        self.steps_between_chunks = 0     # decode steps of their own taken inside an engine call (chunked prefill)
        self.steps_riding = 0             # decode steps that rode in an engine call's forward of new tokens
        self._stepping = False            # a step of its own is running or resolving its turns: no step rides
        self._prefill_since_step = 0      # prefill tokens run since the last decode step
        self._calls_since_step = 0        # engine calls and admissions run since the last decode step
        self.largest_gap: dict[str, float] = {}   # the largest gap so far: its ms, calls and prefill tokens in it
        self._finished_later: list[tuple[Any, SequenceState, concurrent.futures.Future]] = []
        # always installed: with a budget of 0 it only counts the prefill tokens each gap holds (`largest_gap`)
        engine.runner.prefill_budget = PrefillBudget(self._prefill_chunk, self._before_prefill, self._ride_decode)

    # ---- control ------------------------------------------------------------------------------------------------
    def start(self) -> "TurnScheduler":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def set_max_batch_size(self, max_batch_size: int) -> None:
        """Change how many sequences decode together (already decoding ones finish in the current batch)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        with self._cv:
            self.max_batch_size = max_batch_size

    # ---- submitting ---------------------------------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run `fn(*args, **kwargs)` on the model thread before the next decode step."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._enqueue(self._calls, (lambda: fn(*args, **kwargs), future))
        return future

    def turn(self, request: TurnRequest) -> concurrent.futures.Future:
        """Prefill (or reuse) and decode one turn in the shared batch; the future holds its `TurnResult`.

        Blocks while `max_queued_turns` turns are already queued or decoding (backpressure on job threads)."""
        self._turn_slots.acquire()
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.add_done_callback(lambda _: self._turn_slots.release())
        try:
            self._enqueue(self._pending, (request, future))
        except BaseException:
            self._turn_slots.release()
            raise
        return future

    def cancel(self, future: concurrent.futures.Future) -> None:
        """Cancel a turn from `turn`: a queued one never runs; a decoding one leaves the batch before the next
        step and its future raises `TurnCancelled`."""
        if future.cancel():
            return
        with self._cv:
            if not future.done():
                self._cancelled.add(id(future))
                self._cv.notify()

    def _enqueue(self, queue: collections.deque, item: tuple[Any, concurrent.futures.Future]) -> None:
        with self._cv:
            if self._stopping:
                raise SchedulerStopped("the worker's model thread is stopped")
            queue.append(item)
            self._cv.notify()

    def load(self) -> SchedulerLoad:
        return SchedulerLoad(queued=len(self._pending), active=len(self._batch.active), calls=len(self._calls))

    def stats(self) -> dict[str, float]:
        return {"steps": self.steps, "step_sequences": self.step_sequences,
                "mean_batch": self.step_sequences / self.steps if self.steps else 0.0, "max_batch": self.max_active,
                "turns_finished": self.turns_finished, "turns_failed": self.turns_failed,
                "turns_cancelled": self.turns_cancelled,
                "tokens_generated": self.tokens_generated, "busy_s": self.busy_s, "prefill_s": self.prefill_s,
                "prefill_step_tokens": self.prefill_step_tokens, "steps_between_chunks": self.steps_between_chunks,
                "steps_riding": self.steps_riding, "token_interval_ms": self.token_intervals.summary(),
                "largest_gap": dict(self.largest_gap),
                "decode_s": self.decode_s, "decode_kv_bytes": self._batch.kv_bytes,
                "step_ms": self.step_times.summary(), "step_gap_ms": self.step_gaps.summary(),
                "kv_budget": self.engine.runner.kv_budget.stats()}

    # ---- the model thread ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        finally:                   # however the thread ends (an error no turn caught included), nothing queued
            with self._cv:         # waits on it forever and nothing more is queued
                self._stopping = True
            self._fail_everything(SchedulerStopped("the worker's model thread stopped"))

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not (self._calls or self._pending or self._batch.active or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    break
                cancelled, self._cancelled = self._cancelled, set()
                calls = list(self._calls)
                self._calls.clear()
            t0 = time.perf_counter()
            if cancelled:
                self._drop(cancelled)
            for fn, future in calls:
                self._calls_since_step += 1
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        future.set_exception(exc)
            admitted = self._admit_pending()
            self._finish_later_ones()
            t1 = time.perf_counter()
            self.prefill_s += t1 - t0
            if self._batch.active:
                self._step()
                self.decode_s += time.perf_counter() - t1
            elif not calls and not admitted:   # queued turns wait for KV held outside the batch: don't spin
                with self._cv:
                    self._cv.wait(timeout=0.01)
            self.busy_s += time.perf_counter() - t0

    def _admit_pending(self) -> int:
        """Admit queued turns in arrival order while the batch has room by count and its KV budget by bytes (the first
        that does not fit waits, with those behind it); one that can never fit fails. Returns how many left."""
        taken = 0
        while True:
            with self._cv:
                if not self._pending or len(self._batch.active) >= self.max_batch_size:
                    return taken
                request, future = self._pending[0]
            try:   # its KV: prompt + max_new_tokens (agent_state renders the template, cached for prepare)
                prompt = len(self.engine.agent_state(request.agent).rendered.fill(
                    {p: c.token_ids for p, c in request.contents.items()}))
                if self.memory_plan is not None:
                    self.memory_plan.check_request(prompt, request.sampling.max_new_tokens)
                problem, fits = None, self._batch.can_place(prompt + request.sampling.max_new_tokens)
            except BaseException as exc:  # noqa: BLE001 - this turn fails (never fits, bad template)
                problem, fits = exc, True
            if not fits and not future.cancelled():
                return taken   # a finishing turn frees its slot
            with self._cv:
                self._pending.popleft()
            taken += 1
            if problem is None:
                self._admit(request, future)
            elif future.set_running_or_notify_cancel():
                self.turns_failed += 1
                future.set_exception(problem)

    def _admit(self, request: TurnRequest, future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        self._calls_since_step += 1
        try:
            prepared = self.engine.prepare(request)
            state = self._batch.add(prepared.kv, prepared.last_logits[-1], request.sampling,
                                    on_token=request.on_token, started_at=prepared.started)
        except BaseException as exc:  # noqa: BLE001 - this turn fails, the batch goes on
            self.turns_failed += 1
            future.set_exception(exc)
            return
        if state.done:          # stopped at its first token
            self._finish(prepared, state, future)
        else:
            self._running[id(state)] = (prepared, future)

    def _drop(self, cancelled: set[int]) -> None:
        """Take the cancelled turns out of the batch (their slots are freed) and fail their futures."""
        dropped = [key for key, (_, future) in self._running.items() if id(future) in cancelled]
        if not dropped:
            return
        gone = set(dropped)
        self._batch.active = [s for s in self._batch.active if id(s) not in gone]
        for key in dropped:
            _, future = self._running.pop(key)
            self.turns_cancelled += 1
            future.set_exception(TurnCancelled("cancelled by its driver while decoding"))

    def _prefill_chunk(self) -> int:
        """Chunk size for the runner's next prefill forward: the budget while sequences decode, else 0 (whole;
        also while a step resolves its finished turns, whose engine work no step may interrupt)."""
        return self.prefill_step_tokens if self._batch.active and not self._stepping else 0

    def _before_prefill(self, tokens: int) -> None:
        """The runner is about to run a selective-recompute prefill of `tokens` tokens that carries no decode step
        (`blend_prefill`, or `recompute_prefill` when none rode) on this model thread: once the tokens prefilled
        since the last decode step would pass `prefill_step_tokens`, the batch takes a step of its own first."""
        if self.prefill_step_tokens and self._prefill_since_step and not self._stepping \
                and self._prefill_since_step + tokens > self.prefill_step_tokens and self._batch.active:
            self.steps_between_chunks += 1
            self._step(finish_later=True)
        self._prefill_since_step += tokens

    def _finish_later_ones(self) -> None:
        finished, self._finished_later = self._finished_later, []
        for prepared, state, future in finished:
            self._finish(prepared, state, future)

    def _step(self, finish_later: bool = False) -> None:
        """One decode step of the batch, a forward of its own. `finish_later`: inside an engine call (chunked
        prefill), the turns it finishes are resolved by `_finish_later_ones` once that call is done (the engine is
        not re-entered)."""
        advanced, started = self._open_step()
        self._stepping = True
        try:
            try:
                finished = self._batch.step()
            except BaseException as exc:  # noqa: BLE001 - a failed forward fails the turns in it, not the worker
                self._step_failed(exc)
                return
            self._close_step(advanced, started, finished, finish_later)
        finally:
            self._stepping = False

    def _ride_decode(self) -> DecodeRide | None:
        """A decode step for the runner's next forward of new tokens (`PrefillBudget.ride_decode`): only on this
        model thread, while sequences decode and no step of its own is under way. The turns it finishes are
        resolved once the current engine call is done."""
        if threading.current_thread() is not self._thread or self._stepping or not self._batch.active:
            return None
        advanced, started = self._open_step()
        try:
            plan = self._batch.begin_step()
        except BaseException as exc:  # noqa: BLE001 - as in `_step`: the batch's turns fail, the engine call goes on
            self._step_failed(exc)
            return None
        if plan is None:
            return None

        def deliver(logits: torch.Tensor) -> None:
            try:
                finished = self._batch.end_step(plan, logits)
            except BaseException as exc:  # noqa: BLE001
                self._step_failed(exc)
                return
            self.steps_riding += 1
            self._close_step(advanced, started, finished, finish_later=True)
        return DecodeRide(plan.inputs, deliver)

    def _open_step(self) -> tuple[int, float]:
        """Start a step: size the batch, record the gap since the last step and what ran in it."""
        advanced = len(self._batch.active)   # admission keeps it <= max_batch_size, unless that just shrank
        self._batch.max_batch_size = max(self.max_batch_size, advanced)
        started = time.perf_counter()
        if self._last_step_end is not None:
            gap = started - self._last_step_end
            self.step_gaps.add(gap)
            if gap * 1e3 > self.largest_gap.get("ms", -1.0):
                self.largest_gap = {"ms": gap * 1e3, "calls": self._calls_since_step,
                                    "prefill_tokens": self._prefill_since_step}
        self._prefill_since_step = self._calls_since_step = 0
        return advanced, started

    def _close_step(self, advanced: int, started: float, finished: list[SequenceState], finish_later: bool) -> None:
        self.steps += 1
        self.step_sequences += advanced
        self.max_active = max(self.max_active, advanced)
        ended = time.perf_counter()
        self.step_times.add(ended - started)
        if self._last_step_end is not None:    # a sequence decoding through both steps waited this long for a token
            self.token_intervals.add(ended - self._last_step_end)
        for state in finished:
            prepared, future = self._running.pop(id(state))
            if finish_later:
                self._finished_later.append((prepared, state, future))
            else:
                self._finish(prepared, state, future)
        self._last_step_end = ended if self._batch.active else None   # an idle wait is not a stall

    def _step_failed(self, exc: BaseException) -> None:
        log.exception("decode step failed; failing the %d turns in the batch", len(self._running))
        traceback.clear_frames(exc.__traceback__)   # the failed frames' locals hold the decode buffers
        self._fail_running(exc)

    def _finish(self, prepared: Any, state: SequenceState, future: concurrent.futures.Future) -> None:
        try:
            result = self.engine.finish(prepared, state, state.finished_at - state.first_token_at)
        except BaseException as exc:  # noqa: BLE001
            self.turns_failed += 1
            future.set_exception(exc)
            return
        self.turns_finished += 1
        self.tokens_generated += len(result.token_ids)
        future.set_result(result)

    def _fail_running(self, exc: BaseException) -> None:
        running = list(self._running.values())
        self._running.clear()
        self._batch.active = ()   # the assignment frees every decode buffer (before any waiter looks)
        for prepared, future in running:
            self.turns_failed += 1
            future.set_exception(exc)

    def _fail_everything(self, exc: BaseException) -> None:
        self._finish_later_ones()
        self._fail_running(exc)
        with self._cv:
            leftovers = list(self._calls) + list(self._pending)
            self._calls.clear()
            self._pending.clear()
        for _, future in leftovers:
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)


class ScheduledEngine:
    """The engine as a turn's worker side sees it, for use from any thread: every call that touches the engine
    runs on the scheduler's model thread, and `run_turn(s)` joins the shared continuous batch.

    Forwarding is explicit: an engine attribute not listed here raises AttributeError instead of silently
    running on the wrong thread.
    """

    def __init__(self, engine: KVCommEngine, scheduler: TurnScheduler):
        self._engine = engine
        self._scheduler = scheduler
        self.pool = engine.pool   # thread-safe (RemoteAnchorPool, AnchorPool): called on the caller's thread
        # read-only after construction: safe from any thread
        self.spec = engine.spec
        self.tokenizer = engine.tokenizer
        self.config = engine.config
        self.stop_token_ids = engine.stop_token_ids

    def run_turns(self, requests: list[TurnRequest]) -> list[TurnResult]:
        futures = [self._scheduler.turn(request) for request in requests]
        return [future.result() for future in futures]

    def run_turn(self, request: TurnRequest, cancel: Cancellation | None = None) -> TurnResult:
        future = self._scheduler.turn(request)
        if cancel is not None:
            cancel.on_cancel(lambda: self._scheduler.cancel(future))
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise TurnCancelled("cancelled by its driver before it ran") from None

    def make_input(self, *args: Any, **kwargs: Any) -> Any:
        return self._scheduler.call(self._engine.make_input, *args, **kwargs).result()

    def offer_content(self, *args: Any, **kwargs: Any) -> str:
        return self._scheduler.call(self._engine.offer_content, *args, **kwargs).result()

    def encode(self, text: str) -> tuple[int, ...]:
        return self._scheduler.call(self._engine.encode, text).result()


# ------------------------------------------------------------------------------------------------------------
# The Ray actor
# ------------------------------------------------------------------------------------------------------------
