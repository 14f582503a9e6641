"""`AgentWorkerDeployment`: one model replica of the HTTP service (a Ray Serve deployment, routed by
`cluster.serve.router`).

It composes an `actors.agent_worker.AgentWorker` (model, engine, continuous-batching `TurnScheduler`, content
caches, `RemoteAnchorPool`) and serves what the ingress's job drivers and chat routes send it:

* `execute_turn(order)` / `execute_content(order)`: one turn (or a user input's base KV) of a job driven by
  `cluster.driver.DagJob`. Both are streamed: each KV payload (response, condition, staged pool updates) is
  yielded as an item of its own and the small `TurnOutcome` last, so the caller (the ingress) receives
  ObjectRefs it owns for the KV without fetching a byte, and a response outlives this replica (a scale-down or
  a crash never loses a finished turn). A cancelled request (the job was cancelled) cancels the turn.
* `chat(params)`: an OpenAI chat completion, streamed as events: a turn of the replica's one continuous batch,
  its contents reused across requests of its namespace (`kvcomm.chat`; this replica keeps them, so the router
  sends a namespace's chats to its home replica when loads tie).
* `engine_metrics()`: the replica's engine metrics (`actors.metrics.ReplicaMetrics`, exported through Ray's
  metrics API) as Prometheus text.
* `record_routing_stats()`: what the router weighs (the routing cost in tokens of the orders and chats in flight,
  and the node), reported every ``routing_stats_period_s``.

The anchor pool actor is created (detached) by the ingress (`cluster.serve.ingress`) from the app's `PoolSpec`,
outside any replica's placement group; a replica joins the same spec (its fingerprint checked: a pool built for
another model or other settings is an error), so a scale-down never takes the pool with it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Any, AsyncIterator

import torch

from ray import serve

from actors.agent_worker import AgentWorker, WorkerSettings
from actors.turns import ContentOrder, TurnCancelled, TurnOrder
from actors.worker_load import WorkerLoad
from kvcomm.chat import ChatResult
from kvcomm.chat_template import CONTEXT_LENGTH_EXCEEDED, ChatRequestError
from kvcomm.memory_plan import KVBudgetError

from .http import internal_error_message
from .openai_api import ChatParams

log = logging.getLogger(__name__)

POOL_WAIT_S = 30.0      # how long a starting replica waits for the ingress to create the anchor pool actor


class AgentWorkerDeployment:
    """One model replica serving job turns (streamed KV) and chat completions; see the module docstring."""

    def __init__(self, settings: WorkerSettings, chat_cache_bytes: int = 0):
        """`chat_cache_bytes` of the settings' content cache keep chat contents (`serve.chat_cache_share`)."""
        try:
            worker_id = f"replica-{serve.get_replica_context().replica_id.unique_id}"
        except Exception:  # noqa: BLE001 - outside Serve (direct construction)
            worker_id = f"replica-{uuid.uuid4().hex[:8]}"
        if settings.pool is not None:
            _wait_for_actor(settings.pool.name, settings.pool.ray_namespace, POOL_WAIT_S)
        self.worker_id = worker_id
        self.worker = AgentWorker(settings, worker_id, chat_cache_bytes=chat_cache_bytes)
        self._chats = 0                  # chat completions in flight

    # ---- job turns ----------------------------------------------------------------------------------------------
    async def execute_turn(self, order: TurnOrder) -> AsyncIterator[Any]:
        """Yields the response KV, the condition KV (or None), the staged pool payload (or None), the outcome."""
        outcome, response, condition, staged = await self.worker.execute_turn(order)
        yield response
        yield condition
        yield staged
        yield outcome

    async def execute_content(self, order: ContentOrder) -> AsyncIterator[Any]:
        """Yields the content's KV, the staged pool payload (or None), the outcome."""
        outcome, payload, staged = await self.worker.execute_content(order)
        yield payload
        yield staged
        yield outcome

    # ---- chat completions ---------------------------------------------------------------------------------------
    async def chat(self, params: ChatParams) -> AsyncIterator[dict[str, Any]]:
        """One chat completion: an ``error`` event (status, param, message) and nothing else, or ``start`` when its
        first token is out, ``delta`` events (text), and a final ``done`` event (`_done_event`), or a final
        ``error`` event when it fails while decoding (what was sent is then no answer). Closing the
        stream early (the client went away) takes the chat out of the decode batch."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        self._chats += 1
        work = asyncio.ensure_future(self.worker.execute_chat(
            params.request, params.routing_hint().cost_tokens,
            lambda text: loop.call_soon_threadsafe(events.put_nowait, text)))
        work.add_done_callback(lambda _: events.put_nowait(None))   # after every delta (both go through the loop)
        try:
            first = await events.get()
            if first is None and work.exception() is not None:
                yield _error_event(work.exception(), params.request.max_tokens_param)
                return
            yield {"event": "start", "worker": self.worker_id}
            item = first
            while item is not None:
                yield {"event": "delta", "text": item}
                item = await events.get()
            if work.exception() is not None:    # failed while decoding: its error, never `done`
                yield _error_event(work.exception(), params.request.max_tokens_param)
                return
            yield _done_event(work.result(), params.details)
        finally:
            self._chats -= 1
            if not work.done():
                work.cancel()           # AgentWorker cancels the turn: it leaves the batch at the next step
                work.add_done_callback(lambda f: f.cancelled() or f.exception())   # its TurnCancelled: expected

    # ---- routing, observability, health -------------------------------------------------------------------------
    def record_routing_stats(self) -> dict[str, Any]:
        """What `cluster.serve.router.KVCommRouter` weighs: the routing cost (tokens) of everything in flight.
        Ray's API takes a dict: {tokens, orders, chats, node_id, at (unix s)}, from this replica's `WorkerLoad`."""
        load = self.worker.load_now()
        return {"tokens": load.tokens, "orders": load.orders, "chats": self._chats, "node_id": load.node_id,
                "at": time.time()}

    async def model_info(self) -> dict[str, Any]:
        spec = self.worker.engine.spec
        return {"source": self.worker.model_source, "context_length": int(spec.max_position_embeddings),
                "vocab_size": int(spec.vocab_size), "worker": self.worker_id}

    async def load(self) -> WorkerLoad:
        """The worker's orders, queued and decoding turns, plus the chats it is decoding."""
        return dataclasses.replace(await self.worker.load(), chats=self._chats)

    async def stats(self) -> dict[str, Any]:
        """The worker's stats; its ``chats``: chats running here, tokens decoded for chats (cancelled ones too), the
        chat contents kept and the engine's decisions."""
        stats = await self.worker.stats()
        stats["chats"]["running"] = self._chats
        return stats

    async def engine_metrics(self) -> str:
        """This replica's engine metrics (`actors.metrics.ReplicaMetrics`) as Prometheus text, sampled now: what
        Ray's metrics agent exports for it (as ``ray_`` + each name) once its export interval has passed."""
        self.worker.metrics.sample(self.worker)
        return self.worker.metrics.metrics.render()

    async def check_health(self) -> None:
        await self.worker.ping()


def _wait_for_actor(name: str, namespace: str, timeout_s: float) -> None:
    """Wait until the named actor exists (the ingress creates it), at most `timeout_s`; a replica that starts
    without it serves dense and looks for it again later (`RemoteAnchorPool`)."""
    import ray
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get_actor(name, namespace=namespace)
            return
        except ValueError:
            if time.monotonic() > deadline:
                log.warning("actor %r not found in namespace %r after %.0f s", name, namespace, timeout_s)
                return
            time.sleep(0.2)


def _error_event(exc: BaseException, max_tokens_param: str) -> dict[str, Any]:
    """A chat that failed (before its first token, or while decoding), as the status, field, message and OpenAI
    error code the client gets; `max_tokens_param`: the field the request's output budget came in."""
    if isinstance(exc, ChatRequestError):
        return {"event": "error", "status": 400, "param": exc.param, "message": str(exc), "code": exc.code}
    if isinstance(exc, KVBudgetError):
        param = max_tokens_param if exc.too_long == "output" else "messages"
        return {"event": "error", "status": 400, "param": param, "message": f"{param}: {exc}",
                "code": CONTEXT_LENGTH_EXCEEDED if exc.too_long else None}
    if isinstance(exc, TurnCancelled):
        return {"event": "error", "status": 499, "param": None, "message": "the chat was cancelled"}
    try:
        raise exc
    except BaseException:  # noqa: BLE001 - logged with its traceback under an error id
        return {"event": "error", "status": 500, "param": None,
                "message": internal_error_message("chat completion on a worker replica")}


def _done_event(result: ChatResult, details: bool) -> dict[str, Any]:
    """The last event of a chat: what `cluster.serve.openai_api` shapes into ``usage`` and ``kvcomm``."""
    done = {"event": "done", "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            "completion_tokens": len(result.token_ids), "cached_tokens": result.cached_tokens,
            "mode": result.mode, "reused": result.reused, "reason": result.reason, "ttft_s": result.ttft_s,
            "predicted_kl": result.predicted_kl}
    if details:
        logprobs = torch.log_softmax(result.first_logits.float(), dim=-1).cpu().numpy().astype("<f4")   # [vocab]
        done.update(prompt_token_ids=result.prompt_ids, completion_token_ids=result.token_ids,
                    first_token_logprobs=logprobs.tobytes())
    return done
