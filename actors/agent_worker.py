"""`AgentWorker`: one model replica on Ray serving any agent role of any job, with continuous batching.

This module owns the worker side of the cluster:

* `WorkerSettings`: what a worker needs to start (built by `cluster.config.ClusterConfig.worker_settings`, the one
  home of the defaults; the actors layer never sees pydantic).
* `actors.scheduler.TurnScheduler` and `ScheduledEngine`: the model thread's continuous batch (its own module).
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
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kvcomm.chat import ChatContents, ChatRequest, ChatResult, ChatTurns
from kvcomm.config import KVCommConfig
from kvcomm.engine import KVCommEngine
from kvcomm.harness.jobs import AgentSpec
from kvcomm.memory_plan import KVBudget, MemoryConfig, plan_for_runner
from kvcomm.names import POOL_MODES
from kvcomm.templates import render_template

from .anchor_pool_actor import PoolMismatchError, PoolSpec, join_pool_actor
from .pool_client import RemoteAnchorPool
from .scheduler import ScheduledEngine, TurnScheduler
from .metrics import ReplicaMetrics
from .turns import (Cancellation, ContentOrder, ContentResolver, TurnCancelled, TurnOrder, execute_content,
                    execute_turn)
from .worker_load import WorkerLoad

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
    prefill_step_tokens: int          # chunked prefill: prefill tokens a decode step waits for at most (0: off)
    anchor_cache_bytes: int           # fetched anchor tensors kept (LRU; pinned host memory on CUDA)
    anchor_device_cache_bytes: int    # on an accelerator: device copies of them kept (LRU)
    content_cache_bytes: int          # shared contents' base KV (inputs, responses) kept (LRU)
    pool: PoolSpec | None             # the cluster's anchor pool (None: none, every kvcomm turn prefills densely)
    pool_call_timeout_s: float
    pool_retry_after_s: float         # after a failed pool call, serve an empty pool this long before asking again
    kvcomm: KVCommConfig
    memory: MemoryConfig              # the replica's memory plan (device memory, longest prompt, agent cache)


# ------------------------------------------------------------------------------------------------------------
# The model thread
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
        on_device = settings.anchor_cache_bytes if runner.device.type == "cpu" else settings.anchor_device_cache_bytes
        self.memory_plan = plan_for_runner(runner, settings.memory, anchor_cache_bytes=on_device,
                                           content_cache_bytes=settings.content_cache_bytes, model=settings.model,
                                           max_batch_size=settings.max_batch_size)
        runner.kv_budget = KVBudget(self.memory_plan.kv_bytes, what=f"{worker_id}'s KV budget")
        self.pool = RemoteAnchorPool(self._find_pool_actor(), settings.kvcomm, runner.rope,
                                     cache_bytes=settings.anchor_cache_bytes,
                                     device_cache_bytes=settings.anchor_device_cache_bytes, device=runner.device,
                                     call_timeout_s=settings.pool_call_timeout_s,
                                     retry_after_s=settings.pool_retry_after_s,
                                     resolve_actor=self._find_pool_actor, prefetch=True)
        self.engine = KVCommEngine(runner, loaded.tokenizer, settings.kvcomm, self.pool,
                                   agent_cache_bytes=settings.memory.agent_cache_bytes,
                                   max_prompt_tokens=self.memory_plan.max_prompt_tokens)
        self.scheduler = TurnScheduler(self.engine, settings.max_batch_size, settings.max_queued_turns,
                                       name=f"kvcomm-model-{worker_id}", memory_plan=self.memory_plan,
                                       prefill_step_tokens=settings.prefill_step_tokens).start()
        self.view = ScheduledEngine(self.engine, self.scheduler)
        # one thread per order in flight: it only waits on the model thread (and runs a job's code sandbox)
        self._job_threads = concurrent.futures.ThreadPoolExecutor(max_workers=settings.max_queued_turns,
                                                                  thread_name_prefix=f"kvcomm-job-{worker_id}")
        self.node_id = _current_node_id()
        self.contents = ContentResolver(self.view, settings.content_cache_bytes - chat_cache_bytes, runner.device,
                                        self.node_id)
        self.chats = ChatTurns(self.engine, ChatContents(chat_cache_bytes))     # used on the model thread only
        self._turns_run = 0
        self._turns_cancelled = 0
        self._orders_in_flight = 0
        self._tokens_in_flight = 0        # the routing cost (`RoutingHint.cost_tokens`) of the orders in flight
        self._namespaces: collections.Counter[str] = collections.Counter()
        self._rendered: dict[Any, Any] = {}       # agent template -> its rendering (`_turn_pairs`)
        self._render_lock = threading.Lock()
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
        pairs = frozenset((name, None) for name in order.offer_as)     # the gate reads those anchors' bases
        return await self._execute(order.routing_hint().cost_tokens, self._holding_pool,
                                   order.namespace if order.pooled else None, pairs, execute_content, self.view,
                                   order, self.contents, self.worker_id, self.node_id)

    async def execute_turn(self, order: TurnOrder) -> tuple[Any, Any, Any, Any]:
        """One agent turn: (`TurnOutcome`, response KV, condition KV or None, staged pool payload or None)."""
        self._namespaces[order.namespace] += 1
        cancel = Cancellation()
        out = await self._execute(order.routing_hint().cost_tokens, self._holding_pool,
                                  order.namespace if order.pooled else None,
                                  functools.partial(self._turn_pairs, order), execute_turn,
                                  self.view, order, self.contents, self.worker_id, self.node_id, cancel,
                                  cancel=cancel)
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
            return self._holding_pool(request.namespace, None, self._chat_turn, request, on_text, cancel, arrived)
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

    def _holding_pool(self, namespace: str | None, pairs: Any, fn: Callable[..., Any], *args: Any) -> Any:
        """A job thread: fetch the namespace's pool snapshot here (never on the model thread) and hold it for the
        engine while `fn(*args)` runs (`RemoteAnchorPool.hold`); None: the work reads no pool. `pairs`: the
        (placeholder, consumer) pairs the work reads (or a callable giving them, run here), None: every part."""
        if namespace is None:
            return fn(*args)
        self.pool.hold(namespace, pairs() if callable(pairs) else pairs)
        try:
            return fn(*args)
        finally:
            self.pool.release(namespace)

    def _turn_pairs(self, order: TurnOrder) -> frozenset[tuple[str, str | None]]:
        """The pool pairs a turn reads: its template's placeholders for its consumer key (the engine's offsets and
        gate), and the bases of the names its output is offered under (the entropy gate)."""
        template = AgentSpec.from_dict(dict(order.agent)).template_for_round(order.round)
        with self._render_lock:                  # the tokenizer, on a job thread: one render at a time
            rendered = self._rendered.get(template)
            if rendered is None:
                rendered = self._rendered[template] = render_template(template, self.engine.tokenizer)
                while len(self._rendered) > 256:
                    self._rendered.pop(next(iter(self._rendered)))
        return (frozenset((name, rendered.key) for name in rendered.placeholders)
                | frozenset((name, None) for name in order.consumed_names))

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
    async def load(self) -> WorkerLoad:
        """What a router looks at: orders and their cost in tokens in flight, queued and decoding turns."""
        return self.load_now()

    def load_now(self) -> WorkerLoad:
        """`load()` for a caller that cannot await (Serve's `record_routing_stats`); it reads counters only."""
        return WorkerLoad.of(self.scheduler.load(), worker=self.worker_id, node_id=self.node_id,
                             orders=self._orders_in_flight, tokens=self._tokens_in_flight,
                             max_batch_size=self.settings.max_batch_size)

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
