"""One piece of a job run on whichever worker the cluster's DAG driver picks: the wire format and the worker side.

On a cluster a job does not have to run whole on one worker: `cluster.driver` drives its DAG level by level and
sends every turn (and the user input's base KV) to a worker of its choice. This module owns what crosses:

* `ContentHandle`: a shared content as the driver holds it: its tokens, its base KV as a `SegmentRef` (bytes in
  the object store, never in the driver), which worker computed it and on which node (routing prefers them),
  and the job's gate state for it (placeholder name -> anchor staged for it, and the gate's reason). Small and
  picklable.
* `ContentOrder` (compute a user input or condition's base KV and offer it to the gate) and `TurnOrder` (run one
  agent turn on given contents, then offer its response downstream), and `TurnOutcome`, the small answer (the
  turn's `kvcomm.job_runner.TurnRecord` and a `ProducedContent` per content it made). Each
  order carries a `RoutingHint` (its namespace, its cost in tokens, the KV bytes it reads per node): what a
  router needs, without fetching a byte.
* `Cancellation`: how a driver's cancel reaches the model thread (the turn leaves the decode batch at the next
  step).
* `execute_content` / `execute_turn`: the worker side, on the worker's `ScheduledEngine` view. Each order
  stages its pool updates in a transaction of its own and hands it back as a commit payload; the driver merges a
  job's payloads and commits them once (`AnchorPoolActor.commit_parts`), so the job stays atomic for the pool.
  Anchors staged by an earlier turn on another worker are *adopted* (`PoolTransaction.adopt_anchor`), so a
  consumer records its deltas against them exactly as in one process.

KV bytes leave a worker as separate return values of the Ray call (`AgentWorker.run_turn`), or as separate items
of a streamed Serve response (`cluster.serve.worker`): either way the caller owns them, so a response outlives
the worker that produced it and a turn can be retried elsewhere.
"""
from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from kvcomm.engine import SharedContent, TurnRequest, learn_gate_state
from kvcomm.harness.jobs import AgentSpec, Turn
from kvcomm.job_runner import TurnRecord, sampling_for, share_turn_output, turn_record
from kvcomm.kv import KVSegment

from .part_cache import PartCache
from .pool_state import transaction_payload
from .transfer import SegmentPayload, SegmentRef, get_segment, segment_to_payload


@dataclass(frozen=True)
class ContentHandle:
    """A shared content of one job, held by the driver; its KV stays in the object store."""
    kind: str                               # "input" | "response" | "condition"
    token_ids: tuple[int, ...]
    content_key: str
    base: SegmentRef | None                 # None only for empty content
    cache_key: str                          # names the KV in worker caches (unique per produced content)
    holder: str                             # the worker that computed it (it has the KV cached)
    node_id: str | None = None              # the Ray node whose object store holds the KV
    anchor_ids: dict[str, str] = field(default_factory=dict)    # placeholder name -> anchor staged for it
    gate_reason: dict[str, str] = field(default_factory=dict)   # placeholder name -> the gate's reason

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def learn_gate_state(self, anchor_ids: Mapping[str, str], gate_reason: Mapping[str, str]) -> None:
        """Take in what a turn that read this content staged for it (a consumer may promote it to an anchor);
        the dicts are the driver's own, so later turns of the job see it. Turns of one round run concurrently and
        each reports the state it started from: `kvcomm.engine.learn_gate_state` merges them."""
        learn_gate_state(self.anchor_ids, self.gate_reason, anchor_ids, gate_reason)


@dataclass(frozen=True)
class RoutingHint:
    """What a router weighs for one order, without fetching a byte."""
    namespace: str | None                             # None: no namespace (no home replica)
    cost_tokens: int                                  # prompt tokens to assemble + tokens to generate
    bytes_by_node: Mapping[str, int]                  # KV bytes the order reads, per node holding them
    holders: tuple[str, ...] = ()                     # workers that computed the contents it reads


def _hint(namespace: str, contents: Mapping[str, ContentHandle], new_tokens: int, text_tokens: int = 0
          ) -> RoutingHint:
    by_node: dict[str, int] = {}
    for handle in contents.values():
        if handle.node_id is not None and handle.base is not None:
            by_node[handle.node_id] = by_node.get(handle.node_id, 0) + handle.base.nbytes
    prompt = text_tokens + sum(handle.num_tokens for handle in contents.values())
    return RoutingHint(namespace, prompt + new_tokens, by_node, tuple(h.holder for h in contents.values()))


@dataclass(frozen=True)
class ContentOrder:
    """Compute a user input's (or condition's) base KV and offer it to the gate under `offer_as` names."""
    namespace: str
    text: str
    kind: str = "input"
    offer_as: tuple[str, ...] = ()
    pooled: bool = False                    # kvcomm / hybrid: the gate runs and stages anchors

    def routing_hint(self) -> RoutingHint:
        return RoutingHint(self.namespace, 1 + len(self.text) // 4, {})   # ~4 characters per token


@dataclass(frozen=True)
class TurnOrder:
    """Run agent `agent` (a `AgentSpec.to_dict()`) in round `round` on `contents` (placeholder -> handle)."""
    job_id: str
    namespace: str
    mode: str
    agent: Mapping[str, Any]
    round: int
    contents: Mapping[str, ContentHandle]
    consumed_names: frozenset[str]          # every placeholder name some agent of the job reads
    pooled: bool

    def frozen(self) -> "TurnOrder":
        """This order with its contents' gate state copied: what a transport that serializes the order later (Ray
        Serve pickles it on its router's loop, once a replica is chosen) must send, while the driver's thread goes
        on teaching the shared handles what sibling turns staged."""
        return replace(self, contents={
            name: replace(handle, anchor_ids=dict(handle.anchor_ids), gate_reason=dict(handle.gate_reason))
            for name, handle in self.contents.items()})

    def routing_hint(self) -> RoutingHint:
        generation = self.agent.get("generation") or {}
        fixed_text = sum(len(str(self.agent.get(k) or "")) for k in ("system_prompt", "user_template"))
        return _hint(self.namespace, self.contents, int(generation.get("max_new_tokens", 256)), fixed_text // 4)


class TurnCancelled(Exception):
    """The driver cancelled this turn (its job was cancelled): it left the decode batch unfinished."""


class Cancellation:
    """A cancel signal from a driver to the work it started: `cancel()` (from any thread, once) runs every
    callback registered with `on_cancel` (at once for callbacks registered after it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.cancelled = False

    def on_cancel(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self.cancelled:
                self._callbacks.append(callback)
                return
        callback()

    def cancel(self) -> None:
        with self._lock:
            if self.cancelled:
                return
            self.cancelled = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def check(self) -> None:
        """Raise `TurnCancelled` if cancelled."""
        if self.cancelled:
            raise TurnCancelled("cancelled by its driver")


@dataclass(frozen=True)
class SegmentMeta:
    """A produced content's KV as the driver sees it (the tensors travel as a separate return value)."""
    num_tokens: int
    nbytes: int                             # K + V bytes
    dtype: str                              # "float32", "bfloat16", ...
    start: int                              # position of the first token
    shape: tuple[int, int, int, int]        # [layers, kv_heads, tokens, head_dim] of K (and of V)


@dataclass(frozen=True)
class ProducedContent:
    """What a worker tells the driver about a content it produced; `handle_of` makes the driver's handle of it."""
    kind: str                               # "input" | "response" | "condition"
    token_ids: tuple[int, ...]
    content_key: str
    cache_key: str                          # names the KV in the producing worker's cache
    anchor_ids: dict[str, str]              # placeholder name -> anchor staged for it
    gate_reason: dict[str, str]             # placeholder name -> the gate's reason
    segment: SegmentMeta | None             # None for empty content


@dataclass
class TurnOutcome:
    """A worker's small answer; the KV payloads travel next to it as separate return values."""
    worker: str
    node_id: str | None = None                           # the node whose object store holds the KV returned
    record: TurnRecord | None = None                     # what the job keeps of the turn (turns only)
    produced: ProducedContent | None = None              # the response (or input) it produced
    condition: ProducedContent | None = None             # a programming agent's condition
    gate_state: dict[str, tuple[dict[str, str], dict[str, str]]] = field(default_factory=dict)
    # ^ placeholder name -> (anchor ids, gate reasons) of each content the turn read, after the turn


def _produced(content: SharedContent, resolver: "ContentResolver") -> ProducedContent:
    """A produced content's metadata; its KV is remembered in this worker's cache under a fresh key."""
    base = content.base
    cache_key = uuid.uuid4().hex
    if base is not None and content.num_tokens:
        resolver.remember(cache_key, base)
    segment = None if base is None or content.num_tokens == 0 else SegmentMeta(
        base.num_tokens, base.nbytes, str(base.dtype).removeprefix("torch."), int(base.start),
        tuple(int(d) for d in base.keys.shape))
    return ProducedContent(content.kind, tuple(content.token_ids), content.content_key, cache_key,
                           dict(content.anchor_ids), dict(content.gate_reason), segment)


def handle_of(produced: ProducedContent, payload_ref: Any, holder: str, node_id: str | None = None
              ) -> ContentHandle:
    """The driver's handle on a content a worker produced (`payload_ref`: the return value holding its KV)."""
    meta = produced.segment
    base = None if meta is None else SegmentRef(object_ref=payload_ref, num_tokens=meta.num_tokens,
                                                nbytes=meta.nbytes, dtype=meta.dtype, start=meta.start,
                                                shape=meta.shape)
    return ContentHandle(produced.kind, produced.token_ids, produced.content_key, base, produced.cache_key,
                         holder, node_id, dict(produced.anchor_ids), dict(produced.gate_reason))


def _payload(content: SharedContent | None) -> SegmentPayload | None:
    if content is None or content.base is None or content.num_tokens == 0:
        return None
    return segment_to_payload(content.base)


class ContentResolver:
    """A worker's view of contents: KV it computed or fetched, cached by object (LRU, byte budget)."""

    def __init__(self, engine: Any, cache_bytes: int, device: Any, node_id: str | None = None):
        self.engine = engine
        self.cache = PartCache(cache_bytes)
        self.device = device
        self.node_id = node_id              # this worker's node: bytes fetched from another node are counted
        self.fetched_bytes = 0
        self.remote_bytes = 0
        self._lock = threading.Lock()       # turns of concurrent jobs run on several job threads

    def remember(self, key: str, segment: KVSegment) -> None:
        with self._lock:
            self.cache.put(key, {"keys": segment.keys, "values": segment.values}, segment.nbytes)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self.cache), "bytes": self.cache.nbytes, "hits": self.cache.hits,
                    "misses": self.cache.misses, "evictions": self.cache.evictions,
                    "fetched_bytes": self.fetched_bytes, "bytes_from_other_nodes": self.remote_bytes}

    def content(self, handle: ContentHandle) -> SharedContent:
        """A fresh `SharedContent` for one turn (gate state is per job: never shared between turns)."""
        if handle.base is None:
            base = self.engine.make_input(()).base
        else:
            with self._lock:
                cached = self.cache.get(handle.cache_key)
            if cached is None:
                base = get_segment(handle.base, device=self.device)
                self.remember(handle.cache_key, base)
                with self._lock:
                    self.fetched_bytes += handle.base.nbytes
                    if handle.node_id is not None and self.node_id is not None and handle.node_id != self.node_id:
                        self.remote_bytes += handle.base.nbytes
            else:
                base = KVSegment(cached["keys"], cached["values"], handle.base.start)
        return SharedContent(handle.kind, tuple(handle.token_ids), base=base, content_key=handle.content_key,
                             anchor_ids=dict(handle.anchor_ids), gate_reason=dict(handle.gate_reason))


def execute_content(view: Any, order: ContentOrder, resolver: ContentResolver, worker_id: str,
                    node_id: str | None = None) -> tuple[TurnOutcome, SegmentPayload | None, dict[str, Any] | None]:
    """Compute the content's base KV and run the gate on it: (outcome, KV payload, staged pool payload)."""
    txn = view.pool.begin(order.namespace) if order.pooled else None
    try:
        content = view.make_input(order.text, kind=order.kind)
        for name in order.offer_as:
            view.offer_content(order.namespace, name, content, txn)
        staged = _staged(txn)
    finally:
        _close(view, txn)
    outcome = TurnOutcome(worker=worker_id, node_id=node_id, produced=_produced(content, resolver))
    return outcome, _payload(content), staged


def execute_turn(view: Any, order: TurnOrder, resolver: ContentResolver, worker_id: str,
                 node_id: str | None = None, cancel: Cancellation | None = None
                 ) -> tuple[TurnOutcome, SegmentPayload | None, SegmentPayload | None, dict[str, Any] | None]:
    """Run one turn and offer its output downstream: (outcome, response KV, condition KV, staged pool payload).
    `cancel` ends it early (`TurnCancelled`), its decoding included."""
    agent = AgentSpec.from_dict(dict(order.agent))
    if cancel is not None:
        cancel.check()
    txn = view.pool.begin(order.namespace) if order.pooled else None
    try:
        contents = {name: resolver.content(handle) for name, handle in order.contents.items()}
        if txn is not None:
            for content in contents.values():
                for anchor_id in content.anchor_ids.values():
                    txn.adopt_anchor(anchor_id, content.num_tokens)
        request = TurnRequest(agent.template_for_round(order.round), contents, mode=order.mode,
                              sampling=sampling_for(agent, order.round, view), namespace=order.namespace, transaction=txn,
                              force_dense=agent.force_dense)
        result = view.run_turn(request) if cancel is None else view.run_turn(request, cancel=cancel)
        response, condition = share_turn_output(view, order.namespace, agent, result, order.consumed_names, txn)
        staged = _staged(txn)
    finally:
        _close(view, txn)
    record = turn_record(Turn(agent.id, order.round), agent, result)
    outcome = TurnOutcome(worker=worker_id, node_id=node_id, record=record, produced=_produced(response, resolver),
                          condition=None if condition is None else _produced(condition, resolver),
                          gate_state={name: (dict(c.anchor_ids), dict(c.gate_reason)) for name, c in contents.items()})
    return outcome, _payload(response), _payload(condition), staged


def _staged(txn: Any) -> dict[str, Any] | None:
    return None if txn is None or txn.is_empty else transaction_payload(txn)


def _close(view: Any, txn: Any) -> None:
    """The worker's transaction only stages: the driver commits the job's merged payload, so close it here."""
    if txn is not None and txn.state == "open":
        view.pool.abort(txn)
