"""`AgentWorkerDeployment`: one model replica of the HTTP service (a Ray Serve deployment, routed by
`cluster.serve.router`).

It composes an `actors.agent_worker.AgentWorker` (model, engine, continuous-batching `TurnScheduler`, content
cache, `RemoteAnchorPool`) and serves what the ingress's job drivers and chat routes send it:

* `execute_turn(order)` / `execute_content(order)`: one turn (or a user input's base KV) of a job driven by
  `cluster.driver.DagJob`. Both are streamed: each KV payload (response, condition, staged pool updates) is
  yielded as an item of its own and the small `TurnOutcome` last, so the caller (the ingress) receives
  ObjectRefs it owns for the KV without fetching a byte, and a response outlives this replica (a scale-down or
  a crash never loses a finished turn). A cancelled request (the job was cancelled) cancels the turn.
* `chat(params)`: an OpenAI chat completion, streamed as events.
* `record_routing_stats()`: what the router weighs (the routing cost in tokens of the orders and chats in flight,
  and the node), reported every ``routing_stats_period_s``.

The anchor pool actor is created by the ingress (`cluster.serve.ingress`), outside any replica's placement group;
a replica only looks it up by name, so a scale-down never takes the pool with it.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, AsyncIterator

from ray import serve

from actors.agent_worker import AgentWorker, WorkerSettings
from actors.turns import ContentOrder, TurnOrder

from .openai_api import ChatDecoder, ChatParams, ChatRequestError

log = logging.getLogger(__name__)

POOL_WAIT_S = 30.0      # how long a starting replica waits for the ingress to create the anchor pool actor


class AgentWorkerDeployment:
    """One model replica serving job turns (streamed KV) and chat completions; see the module docstring."""

    def __init__(self, settings: WorkerSettings, default_max_tokens: int):
        try:
            worker_id = f"replica-{serve.get_replica_context().replica_id.unique_id}"
        except Exception:  # noqa: BLE001 - outside Serve (direct construction)
            worker_id = f"replica-{uuid.uuid4().hex[:8]}"
        if settings.pool_actor_name is not None:
            _wait_for_actor(settings.pool_actor_name, settings.ray_namespace, POOL_WAIT_S)
        self.worker_id = worker_id
        self.worker = AgentWorker(settings, worker_id)
        self.chats = ChatDecoder(self.worker.scheduler, self.worker.engine, settings.max_batch_size,
                                 default_max_tokens)
        self._chat_tokens = 0

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
        """One chat completion: ``{"event": "start", "prompt_tokens"}`` (or an error event), ``delta`` events, and
        a final ``done`` event with the finish reason and token counts."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cost = params.routing_hint().cost_tokens
        self._chat_tokens += cost
        admitted, sequence = self.chats.start(params, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        try:
            try:
                prompt_tokens = await asyncio.wrap_future(admitted)
            except ChatRequestError as exc:
                yield {"event": "error", "status": 400, "param": exc.param, "message": str(exc)}
                return
            yield {"event": "start", "prompt_tokens": prompt_tokens, "worker": self.worker_id}
            while True:
                event = await events.get()
                yield event
                if event["event"] == "done":
                    return
        finally:
            self._chat_tokens -= cost
            if not sequence.finished:
                self.chats.cancel(sequence)

    # ---- routing, observability, health -------------------------------------------------------------------------
    def record_routing_stats(self) -> dict[str, Any]:
        """What `cluster.serve.router.KVCommRouter` weighs: the routing cost (tokens) of everything in flight."""
        return {"tokens": self.worker._tokens_in_flight + self._chat_tokens,
                "orders": self.worker._orders_in_flight, "chats": self.chats.running,
                "node_id": self.worker.node_id, "at": time.time()}

    async def model_info(self) -> dict[str, Any]:
        spec = self.worker.engine.spec
        return {"source": self.worker.model_source, "context_length": int(spec.max_position_embeddings),
                "vocab_size": int(spec.vocab_size), "worker": self.worker_id}

    async def load(self) -> dict[str, Any]:
        """The worker's orders, queued and decoding turns, plus the chats it is decoding."""
        load = await self.worker.load()
        load["chats"] = self.chats.running
        return load

    async def stats(self) -> dict[str, Any]:
        """The worker's stats (its scheduler's count job turns only) and the chats': running, tokens decoded."""
        stats = await self.worker.stats()
        stats["chats"] = {"running": self.chats.running, "tokens_generated": self.chats.tokens_generated}
        return stats

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
