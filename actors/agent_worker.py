"""`AgentWorker`: one model replica on Ray serving any agent role of any job, with continuous batching.

This module owns the worker side of the cluster:

* `WorkerSettings`: what a worker needs to start (built by `cluster.config.ClusterConfig.worker_settings`, the one
  home of the defaults; the actors layer never sees pydantic).
* `TurnScheduler` (plain Python, no Ray): a single *model thread* owns the `KVCommEngine`. Callers submit engine
  calls (`call`) and turns (`turn`) and get `concurrent.futures.Future`s. Between two decode steps the thread runs
  the queued engine calls, admits newly arrived turns (`engine.prepare`: their prefill, or reuse) into the running
  `DecodeBatch` in arrival order while it holds fewer than `max_batch_size` sequences *and* the replica's KV budget
  has room for the turn's slot (one that can never fit fails at once, naming the limit), advances every active
  sequence by one token in one batched forward, and resolves the futures of finished turns (`engine.finish`). A
  replica's throughput therefore grows with concurrent load: sixteen turns decode in one forward pass, not sixteen.
  A turn can be cancelled while it waits or decodes (`cancel`): it leaves the batch at the next step.
* `ScheduledEngine`: the engine as the worker side of a turn (`actors.turns`) uses it, callable from any thread:
  its `run_turn` joins the shared batch and its other engine calls (inputs, the gate) run on the model thread; the
  pool, thread-safe, is used on the caller's thread.
* `AgentWorker`: one model replica (engine, scheduler, content cache) that executes the turns and contents a
  job driver (`cluster.driver`) orders, and chat completions (`kvcomm.chat.ChatTurns`: a chat is a turn of the
  same batch, its contents kept across requests), in job threads, so that they all batch together. The
  engine's pool is a `RemoteAnchorPool` on the cluster's `AnchorPoolActor`, in prefetch mode: no pool call runs
  on the model thread. A pooled order's job thread fetches the namespace's snapshot before the work reaches the
  model thread and holds it for the engine until the work is done (`_holding_pool`); commits (a chat's) leave on
  the client's committer thread. It is used as a Ray actor
  (`start_agent_worker`, by `cluster.batch.runner.ClusterRunner`) or composed into a Serve replica
  (`cluster.serve.worker`).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import os
import resource
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kvcomm.chat import ChatContents, ChatRequest, ChatResult, ChatTurns
from kvcomm.config import KVCommConfig
from kvcomm.engine import KVCommEngine, TurnRequest, TurnResult
from kvcomm.generation import SequenceState
from kvcomm.job_runner import POOL_MODES
from kvcomm.memory_plan import KVBudget, MemoryConfig, MemoryPlan, plan_for_runner

from .anchor_pool_actor import PoolMismatchError, PoolSpec, join_pool_actor
from .pool_client import RemoteAnchorPool
from .latency import Latencies
from .metrics import ReplicaMetrics
from .turns import (Cancellation, ContentOrder, ContentResolver, TurnCancelled, TurnOrder, execute_content,
                    execute_turn)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    """Everything one worker needs; no defaults here (they live in `cluster.config.ClusterConfig`)."""
    model: str
    random_weights: bool
    device: str
    dtype: str | None
    threads: int                      # torch intra-op threads (Ray sets OMP_NUM_THREADS=1 in actors)
    max_batch_size: int               # sequences decoded together in one step
    max_queued_turns: int             # turns admitted to the scheduler at once (queued + decoding)
    anchor_cache_bytes: int           # fetched anchor tensors kept (LRU)
    content_cache_bytes: int          # shared contents' base KV (inputs, responses) kept (LRU)
    pool: PoolSpec | None             # the cluster's anchor pool (None: none, every kvcomm turn prefills densely)
    pool_call_timeout_s: float
    pool_retry_after_s: float         # after a failed pool call, serve an empty pool this long before asking again
    kvcomm: KVCommConfig
    memory: MemoryConfig              # the replica's memory plan (device memory, longest prompt, agent cache)


# ------------------------------------------------------------------------------------------------------------
# The model thread
# ------------------------------------------------------------------------------------------------------------
class SchedulerStopped(RuntimeError):
    """The scheduler was stopped before this work ran."""


class TurnScheduler:
    """Continuous batching on one engine: one model thread runs engine calls, prefills and decode steps."""

    def __init__(self, engine: KVCommEngine, max_batch_size: int, max_queued_turns: int = 1024,
                 name: str = "kvcomm-model", memory_plan: MemoryPlan | None = None):
        """`memory_plan`: turns it can never serve fail at once (its KV budget is `engine.runner.kv_budget`)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queued_turns < 1:
            raise ValueError(f"max_queued_turns must be >= 1, got {max_queued_turns}")
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
        self._last_step_end: float | None = None
        self.prefill_s = 0.0
        self.decode_s = 0.0

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

    def load(self) -> dict[str, int]:
        return {"queued": len(self._pending), "active": len(self._batch.active), "calls": len(self._calls)}

    def stats(self) -> dict[str, float]:
        return {"steps": self.steps, "step_sequences": self.step_sequences,
                "mean_batch": self.step_sequences / self.steps if self.steps else 0.0, "max_batch": self.max_active,
                "turns_finished": self.turns_finished, "turns_failed": self.turns_failed,
                "turns_cancelled": self.turns_cancelled,
                "tokens_generated": self.tokens_generated, "busy_s": self.busy_s, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "decode_kv_bytes": self._batch.kv_bytes,
                "step_ms": self.step_times.summary(), "step_gap_ms": self.step_gaps.summary(),
                "kv_budget": self.engine.runner.kv_budget.stats()}

    # ---- the model thread ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
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
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        future.set_exception(exc)
            admitted = self._admit_pending()
            t1 = time.perf_counter()
            self.prefill_s += t1 - t0
            if self._batch.active:
                self._step()
                self.decode_s += time.perf_counter() - t1
            elif not calls and not admitted:   # queued turns wait for KV held outside the batch: don't spin
                with self._cv:
                    self._cv.wait(timeout=0.01)
            self.busy_s += time.perf_counter() - t0
        self._fail_everything(SchedulerStopped("the worker's model thread stopped"))

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

    def _step(self) -> None:
        advanced = len(self._batch.active)   # admission keeps it <= max_batch_size, unless that just shrank
        self._batch.max_batch_size = max(self.max_batch_size, advanced)
        started = time.perf_counter()
        if self._last_step_end is not None:
            self.step_gaps.add(started - self._last_step_end)
        try:
            finished = self._batch.step()
        except BaseException as exc:  # noqa: BLE001 - a failed forward fails the turns in it, not the worker
            log.exception("decode step failed; failing the %d turns in the batch", len(self._running))
            traceback.clear_frames(exc.__traceback__)   # the failed frames' locals hold the decode buffers
            self._fail_running(exc)
            return
        self.steps += 1
        self.step_sequences += advanced
        self.max_active = max(self.max_active, advanced)
        ended = time.perf_counter()
        self.step_times.add(ended - started)
        for state in finished:
            prepared, future = self._running.pop(id(state))
            self._finish(prepared, state, future)
        self._last_step_end = ended if self._batch.active else None   # an idle wait is not a stall

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
class AgentWorker:
    """One model replica executing the turns (and user inputs) that job drivers order; the turns of concurrent
    jobs share decode steps.

    Use as an async Ray actor (`start_agent_worker`) or inside a Serve replica; every method that touches the
    engine hands the work to the model thread and awaits it, so the event loop stays free to accept more work and
    answer `load()`. A cancelled call (the caller cancelled its task or Serve request) cancels its turn.
    """

    def __init__(self, settings: WorkerSettings, worker_id: str = "worker-0", chat_cache_bytes: int = 0):
        """`chat_cache_bytes` of `settings.content_cache_bytes` keep chat contents (`kvcomm.chat.ChatContents`), the
        rest the jobs' contents."""
        from kvcomm.model_loading import load_model
        from kvcomm.runner import ModelRunner

        if not 0 <= chat_cache_bytes <= settings.content_cache_bytes:
            raise ValueError(f"chat_cache_bytes must be within 0 and content_cache_bytes "
                             f"({settings.content_cache_bytes}), got {chat_cache_bytes}")

        self.settings = settings
        self.worker_id = worker_id
        # The only blocking ray.get calls (the pool client's) run on job threads, never on the event loop;
        # Ray's warning about them cannot tell the two apart.
        os.environ["RAY_WARN_BLOCKING_GET_INSIDE_ASYNC"] = "0"
        torch.set_num_threads(settings.threads)
        started = time.perf_counter()
        loaded = load_model(settings.model, device=settings.device, dtype=settings.dtype,
                            random_weights=settings.random_weights)
        if loaded.tokenizer is None:
            raise ValueError(f"{settings.model}: no tokenizer available; agent templates need one")
        runner = ModelRunner(loaded.spec, loaded.state_dict)
        loaded.state_dict.clear()   # the runner holds what it needs (q/k/v and gate/up concatenated): free the rest
        self.memory_plan = plan_for_runner(runner, settings.memory, anchor_cache_bytes=settings.anchor_cache_bytes,
                                           content_cache_bytes=settings.content_cache_bytes, model=settings.model,
                                           max_batch_size=settings.max_batch_size)
        runner.kv_budget = KVBudget(self.memory_plan.kv_bytes, what=f"{worker_id}'s KV budget")
        self.pool = RemoteAnchorPool(self._find_pool_actor(), settings.kvcomm, runner.rope,
                                     cache_bytes=settings.anchor_cache_bytes, device=runner.device,
                                     call_timeout_s=settings.pool_call_timeout_s,
                                     retry_after_s=settings.pool_retry_after_s,
                                     resolve_actor=self._find_pool_actor, prefetch=True)
        self.engine = KVCommEngine(runner, loaded.tokenizer, settings.kvcomm, self.pool,
                                   agent_cache_bytes=settings.memory.agent_cache_bytes)
        self.scheduler = TurnScheduler(self.engine, settings.max_batch_size, settings.max_queued_turns,
                                       name=f"kvcomm-model-{worker_id}", memory_plan=self.memory_plan).start()
        self.view = ScheduledEngine(self.engine, self.scheduler)
        # one thread per order in flight: it only waits on the model thread (and runs a job's code sandbox)
        self._job_threads = concurrent.futures.ThreadPoolExecutor(max_workers=settings.max_queued_turns,
                                                                  thread_name_prefix=f"kvcomm-job-{worker_id}")
        self.node_id = _current_node_id()
        self.contents = ContentResolver(self.view, settings.content_cache_bytes - chat_cache_bytes, runner.device,
                                        self.node_id)
        self.chats = ChatTurns(self.engine, ChatContents(chat_cache_bytes))   # used on the model thread only
        self._turns_run = 0
        self._turns_cancelled = 0
        self._orders_in_flight = 0
        self._tokens_in_flight = 0        # the routing cost (`RoutingHint.cost_tokens`) of the orders in flight
        self._namespaces: collections.Counter[str] = collections.Counter()
        self.load_s = time.perf_counter() - started
        self.model_source = loaded.source
        self.metrics = ReplicaMetrics(worker_id, settings.model).start(self)   # per-replica engine metrics

    def _find_pool_actor(self) -> Any:
        """The cluster's pool, checked to be built for this model and settings (`PoolMismatchError` otherwise);
        None while there is none (the worker serves dense and looks again later)."""
        spec = self.settings.pool
        if spec is None:
            return None
        try:
            actor = join_pool_actor(spec, timeout_s=self.settings.pool_call_timeout_s)
        except PoolMismatchError:
            raise
        except Exception as exc:  # noqa: BLE001 - a pool restarting or unreachable: looked up again later
            log.warning("anchor pool %r unreachable (%s); serving without a pool for now", spec.name, exc)
            return None
        if actor is None:
            log.warning("anchor pool actor %r not found in namespace %r; serving without a pool", spec.name,
                        spec.ray_namespace)
        return actor

    # ---- orders from a job driver (cluster.driver) --------------------------------------------------------------
    async def execute_content(self, order: ContentOrder) -> tuple[Any, Any, Any]:
        """A user input's base KV, offered to the gate: (`TurnOutcome`, the KV as a `SegmentPayload`, the staged
        pool payload or None)."""
        return await self._execute(order.routing_hint().cost_tokens, self._holding_pool,
                                   order.namespace if order.pooled else None, execute_content, self.view, order,
                                   self.contents, self.worker_id, self.node_id)

    async def execute_turn(self, order: TurnOrder) -> tuple[Any, Any, Any, Any]:
        """One agent turn: (`TurnOutcome`, response KV, condition KV or None, staged pool payload or None)."""
        self._namespaces[order.namespace] += 1
        cancel = Cancellation()
        out = await self._execute(order.routing_hint().cost_tokens, self._holding_pool,
                                  order.namespace if order.pooled else None, execute_turn, self.view, order,
                                  self.contents, self.worker_id, self.node_id, cancel, cancel=cancel)
        self._turns_run += 1
        self.metrics.observe_job_turn(order.mode, out[0].record)
        return out

    async def execute_chat(self, request: ChatRequest, cost: int,
                           on_text: Callable[[str], None] | None = None) -> ChatResult:
        """One chat completion as a turn of the shared batch; `on_text` is told its text deltas (on the model
        thread). `cost`: its routing cost in tokens. A cancelled call (the client went away) takes it out of the
        batch and commits nothing of it."""
        cancel = Cancellation()
        return await self._execute(cost, self._run_chat, request, on_text, cancel, cancel=cancel)

    def _run_chat(self, request: ChatRequest, on_text: Callable[[str], None] | None,
                  cancel: Cancellation) -> ChatResult:
        """A job thread: prepare the chat on the model thread, decode it in the batch, finish it there."""
        arrived = time.perf_counter()
        cancel.check()
        if request.mode in POOL_MODES:
            return self._holding_pool(request.namespace, self._chat_turn, request, on_text, cancel, arrived)
        return self._chat_turn(request, on_text, cancel, arrived)

    def _chat_turn(self, request: ChatRequest, on_text: Callable[[str], None] | None, cancel: Cancellation,
                   arrived: float) -> ChatResult:
        prepared = self.scheduler.call(self.chats.prepare, request, on_text, arrived).result()
        try:
            future = self.scheduler.turn(prepared.turn)
            cancel.on_cancel(lambda: self.scheduler.cancel(future))
            try:
                result = future.result()
            except concurrent.futures.CancelledError:
                raise TurnCancelled("cancelled before it ran") from None
        except BaseException:
            self.scheduler.call(self.chats.abort, prepared)
            raise
        chat = self.scheduler.call(self.chats.finish, prepared, result).result()
        self.metrics.observe_chat(result, chat.ttft_s, time.perf_counter() - arrived)
        return chat

    def _holding_pool(self, namespace: str | None, fn: Callable[..., Any], *args: Any) -> Any:
        """A job thread: fetch the namespace's pool snapshot here (never on the model thread) and hold it for the
        engine while `fn(*args)` runs (`RemoteAnchorPool.hold`); None: the work reads no pool."""
        if namespace is None:
            return fn(*args)
        self.pool.hold(namespace)
        try:
            return fn(*args)
        finally:
            self.pool.release(namespace)

    async def _execute(self, cost: int, fn: Callable[..., Any], *args: Any,
                       cancel: Cancellation | None = None) -> Any:
        """Run `fn(*args)` in a job thread, counting `cost` tokens in flight; a cancelled call cancels `cancel`."""
        self._orders_in_flight += 1
        self._tokens_in_flight += cost
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._job_threads, functools.partial(fn, *args))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            self._turns_cancelled += 1
            work.add_done_callback(lambda f: f.cancelled() or f.exception())   # its TurnCancelled: expected
            if cancel is not None:
                cancel.cancel()        # the turn leaves the batch at the next step; its thread then ends
            raise
        finally:
            self._orders_in_flight -= 1
            self._tokens_in_flight -= cost

    # ---- as a Ray actor (cluster.batch.runner): KV payloads as separate returns, owned by the caller -------------
    async def make_content(self, order: ContentOrder) -> tuple[Any, Any, Any]:
        """`execute_content`; call with ``.options(num_returns=3)``."""
        return await self.execute_content(order)

    async def run_turn(self, order: TurnOrder) -> tuple[Any, Any, Any, Any]:
        """`execute_turn`; call with ``.options(num_returns=4)``: the KV returns are owned by the caller."""
        return await self.execute_turn(order)

    # ---- routing and health -------------------------------------------------------------------------------------
    async def load(self) -> dict[str, Any]:
        """What a router looks at: orders and their cost in tokens in flight, queued and decoding turns."""
        load = self.scheduler.load()
        load.update(worker=self.worker_id, node_id=self.node_id, orders=self._orders_in_flight,
                    tokens=self._tokens_in_flight, max_batch_size=self.settings.max_batch_size)
        return load

    async def stats(self) -> dict[str, Any]:
        spec = self.engine.spec
        return {"worker": self.worker_id, "pid": os.getpid(), "node_id": self.node_id, "model": self.model_source,
                "device": str(self.engine.runner.device), "dtype": str(self.engine.runner.dtype).removeprefix("torch."),
                "kv_shape": {"layers": spec.num_layers, "kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim},
                "threads": torch.get_num_threads(),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,   # Linux: KiB
                "load_s": self.load_s, "turns_run": self._turns_run, "turns_cancelled": self._turns_cancelled,
                "namespaces": dict(self._namespaces), "contents": self.contents.stats(), "chats": self.chats.stats(),
                "memory_plan": self.memory_plan.to_dict(),
                "scheduler": self.scheduler.stats(), "pool": self.pool.stats()}

    async def set_max_batch_size(self, max_batch_size: int) -> int:
        """Tune continuous batching at run time (1 turns it off: one sequence per decode step)."""
        self.scheduler.set_max_batch_size(max_batch_size)
        return max_batch_size

    async def ping(self) -> str:
        if not self.scheduler.alive:
            raise RuntimeError(f"{self.worker_id}: the model thread is not running")
        return self.worker_id

    def __del__(self) -> None:
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.stop(timeout=1.0)
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close()
        threads = getattr(self, "_job_threads", None)
        if threads is not None:
            threads.shutdown(wait=False, cancel_futures=True)


def _current_node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        import ray
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside a Ray worker
        return None


def start_agent_worker(settings: WorkerSettings, worker_id: str, *, num_cpus: float, num_gpus: float = 0.0,
                       max_restarts: int = 0, max_task_retries: int = 0, scheduling_strategy: Any = None,
                       max_concurrency: int = 1000) -> Any:
    """Start one `AgentWorker` actor with these resources; returns its handle (the model loads in the actor)."""
    import ray
    options: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                   max_task_retries=max_task_retries, max_concurrency=max_concurrency)
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    return ray.remote(AgentWorker).options(**options).remote(settings, worker_id)
