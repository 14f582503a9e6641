"""The worker side of the cluster's anchor pool: `RemoteAnchorPool`, the pool the engine sees.

`RemoteAnchorPool` has the interface the engine uses (`snapshot`, `begin`, `commit`, `abort`, `config`, `rope`)
over an `actors.anchor_pool_actor.AnchorPoolActor`. Its snapshots are real `PoolSnapshot`s of real `Anchor`s
rebuilt from cached tensor parts (`actors.part_cache.AnchorPartCache`: a byte-bounded host tier, pinned on CUDA,
and a separately bounded tier of on-device copies; a part's key never goes stale); its transactions are real
`PoolTransaction`s (staging and tensor math happen on the worker).

Off the model thread (a worker's setting, `prefetch=True`): the model thread makes no pool call at all.
  * Reads: a turn's job thread calls `hold(namespace, pairs)` before the turn is handed to the model thread: it
    fetches the namespace's snapshot (one actor call, "unchanged" answered without a rebuild) restricted to the
    (placeholder, consumer) pairs the turn reads (`Pair`): only those pairs' parts are fetched into the cache,
    on demand. It holds it until `release(namespace)`, after the turn. The engine's `snapshot(namespace)` on
    the model thread returns the held snapshot (or the last one kept), never calling the actor; a namespace
    nobody fetched reads as empty (the engine then prefills densely), counted in `snapshots_not_held`.
  * Writes: `commit` hands the payload to a committer thread and returns a `Future` of the new version; at most
    `max_pending_commit_bytes` of payloads wait (a commit beyond that is dropped, counted and logged: anchors are
    an optimization, never correctness). A later `hold` of the same namespace waits for this worker's pending
    commits to it first, so a worker reads its own writes.
Without `prefetch` (tests, single-threaded tools) `snapshot` fetches and `commit` waits, as plain calls.

When the actor is unreachable a snapshot is empty and a commit is dropped with a warning: the engine then
prefills densely, so losing the pool costs speed, never correctness. Thread-safe: one lock guards the caches
and counters, never held across an actor call.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import torch

from kvcomm.anchor_pool import PoolSnapshot, PoolTransaction, TransactionHost
from kvcomm.anchor_records import Anchor
from kvcomm.codec import numpy_to_tensor
from kvcomm.config import KVCommConfig
from kvcomm.rope import Rope

from .latency import Latencies
from .part_cache import AnchorPartCache
from .pool_state import PartRef, payload_nbytes, transaction_payload

log = logging.getLogger(__name__)

_SNAPSHOTS_KEPT = 8   # namespaces whose last snapshot a client keeps to answer "unchanged" without a rebuild


@dataclass
class _ClientStats:
    snapshots: int = 0                 # snapshots the engine read
    snapshots_unchanged: int = 0       # fetches the pool answered "unchanged"
    snapshots_not_held: int = 0        # reads (prefetch mode) of a namespace nobody fetched: served empty
    fetches: int = 0                   # snapshot calls to the actor
    commits: int = 0
    commits_dropped: int = 0           # pool unreachable, failed, or too many bytes waiting
    commits_pending: int = 0
    pending_commit_bytes: int = 0
    snapshots_failed: int = 0
    fetch_s: float = 0.0
    fetched_bytes: int = 0
    fetched_parts: int = 0             # tensor parts (object-store objects) fetched
    commit_s: float = 0.0
    committed_bytes: int = 0
    warnings: list[str] = field(default_factory=list)
    calls: Latencies = field(default_factory=Latencies)   # recent snapshot-call latencies
    calls_by_thread: collections.Counter = field(default_factory=collections.Counter)   # actor calls, by thread
    commit_calls: Latencies = field(default_factory=Latencies)


Pair = tuple[str, "str | None"]
"""(placeholder, consumer): a turn of consumer agent template `consumer` (its `RenderedTemplate.key`) reads the
anchors of `placeholder`: their base parts and that consumer's deltas. A consumer of None reads the bases alone
(the entropy gate on content offered under `placeholder`)."""
Pairs = frozenset  # of Pair


class _RefDropped(Exception):
    """A part the snapshot needs is neither cached nor fetchable from the kept wire (its refs were dropped)."""


@dataclass
class _Hold:
    count: int = 0                         # turns holding the namespace
    pairs: Pairs | None = frozenset()      # the pairs they read (None: every part)
    snapshot: PoolSnapshot | None = None   # the latest snapshot fetched for them


def _union(a: Pairs | None, b: Pairs | None) -> Pairs | None:
    return None if a is None or b is None else a | b


def _covers(have: Pairs | None, want: Pairs | None) -> bool:
    return have is None or (want is not None and want <= have)


def _selection(wire: Mapping[str, Any], pairs: Pairs | None) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(placeholder, metadata, parts) of every anchor `pairs` read, each with only the consumers read: the pairs'
    consumers, plus an anchor's last writer when it has a rotated base key (reference mode reads it with any
    consumer's deltas). An anchor read for its base alone lists no consumers and no last writer."""
    consumers_of: dict[str, set[str]] | None = None
    if pairs is not None:
        consumers_of = {}
        for placeholder, consumer in pairs:
            consumers_of.setdefault(placeholder, set()).update(() if consumer is None else (consumer,))
    selection = []
    for placeholder, entries in wire["lists"].items():
        if consumers_of is not None and placeholder not in consumers_of:
            continue
        for entry in entries:
            metadata, parts = entry["metadata"], entry["parts"]
            if consumers_of is None:
                selection.append((placeholder, metadata, parts))
                continue
            names = consumers_of[placeholder] & set(parts["deltas"])
            writer = metadata["last_writer"]
            if names and writer in parts["rbk"]:
                names.add(writer)
            consumers = [c for c in metadata["consumers"] if c["consumer"] in names]
            selection.append((placeholder,
                              {**metadata, "consumers": consumers, "last_writer": writer if writer in names else None},
                              {"base": parts["base"], "deltas": {c: parts["deltas"][c] for c in names},
                               "rbk": {c: parts["rbk"][c] for c in names if c in parts["rbk"]}}))
    return selection


def _parts_of(parts: Mapping[str, Any]) -> list[PartRef]:
    return [parts["base"], *parts["deltas"].values(), *parts["rbk"].values()]


def _without_refs(wire: Mapping[str, Any]) -> dict[str, Any]:
    """The wire with every part's object ref dropped: a kept wire must not keep objects the pool evicted alive."""
    def strip(part: PartRef) -> PartRef:
        return dataclasses.replace(part, ref=None)
    return {**wire, "lists": {placeholder: [{"metadata": e["metadata"],
                                             "parts": {"base": strip(e["parts"]["base"]),
                                                       "deltas": {c: strip(p) for c, p in e["parts"]["deltas"].items()},
                                                       "rbk": {c: strip(p) for c, p in e["parts"]["rbk"].items()}}}
                                            for e in entries]
                              for placeholder, entries in wire["lists"].items()}}


class RemoteAnchorPool(TransactionHost):
    """The engine's pool interface over an `AnchorPoolActor`; one per worker (see the module docstring).

    `actor` may be None (no pool reachable): then every snapshot is empty and every commit is dropped.
    After a failed call the actor is not asked again for `retry_after_s`, so a lost pool does not add a
    timeout to every turn; then `resolve_actor` (e.g. a lookup by name) gives the handle to try next, so a
    pool re-created under the same name is found again.
    """

    def __init__(self, actor: Any, config: KVCommConfig, rope: Rope | None, *, cache_bytes: int = 256 << 20,
                 device_cache_bytes: int | None = None, device: torch.device | str = "cpu",
                 pin: Callable[[torch.Tensor], torch.Tensor] | None = None, call_timeout_s: float = 10.0,
                 retry_after_s: float = 5.0, resolve_actor: Callable[[], Any] | None = None, prefetch: bool = False,
                 max_pending_commit_bytes: int = 1 << 30):
        self.actor = actor
        self._resolve_actor = resolve_actor
        self._needs_resolve = False
        self.config = config
        self.rope = rope
        self.device = torch.device(device)
        self.call_timeout_s = call_timeout_s
        self.retry_after_s = retry_after_s
        self.prefetch = prefetch
        self.max_pending_commit_bytes = max_pending_commit_bytes
        self._lock = threading.RLock()
        self.cache = AnchorPartCache(cache_bytes, cache_bytes if device_cache_bytes is None else device_cache_bytes,
                                     self.device, pin=pin, on_evict=self._forget_snapshots_using)
        self._wires: OrderedDict[str, dict[str, Any]] = OrderedDict()
        # ^ namespace -> its last wire (metadata and part keys, refs dropped): "unchanged" is rebuilt from it
        self._snapshots: OrderedDict[str, tuple[Pairs | None, PoolSnapshot]] = OrderedDict()
        # ^ namespace -> (the pairs it holds, None: all; its last snapshot), kept while its parts are cached
        self._snapshot_keys: dict[str, frozenset[str]] = {}   # namespace -> part keys its kept snapshot holds
        self._held: dict[str, _Hold] = {}                     # namespace -> the turns holding it
        self._unreachable_until = 0.0
        self._stats = _ClientStats()
        self._pending: dict[str, list[concurrent.futures.Future]] = collections.defaultdict(list)
        self._committer = (concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcomm-commit")
                           if prefetch else None)

    # ---- reading ------------------------------------------------------------------------------------------------
    def snapshot(self, namespace: str) -> PoolSnapshot:
        """The namespace's anchors. Prefetch mode: the held (or last kept) snapshot, no actor call; else fetched."""
        with self._lock:
            self._stats.snapshots += 1
            if self.prefetch:
                held = self._held.get(namespace)
                if held is not None and held.snapshot is not None:
                    return held.snapshot
                if namespace in self._snapshots:
                    return self._snapshots[namespace][1]
                self._stats.snapshots_not_held += 1
                return _empty_snapshot(namespace)
        return self.fetch(namespace)

    def hold(self, namespace: str, pairs: Iterable[Pair] | None = None) -> PoolSnapshot:
        """Fetch the namespace's snapshot now (on the calling thread, e.g. a turn's job thread) and hold it for
        the engine's reads until `release(namespace)`; waits for this client's pending commits to it first.

        `pairs`: the (placeholder, consumer) pairs the turn reads (`Pair`); only their parts are fetched. None:
        every part. Turns holding one namespace at once share one snapshot covering all their pairs."""
        wanted = None if pairs is None else frozenset(pairs)
        with self._lock:
            held = self._held.get(namespace)
            if held is None:
                held = self._held[namespace] = _Hold()
            held.count += 1
            held.pairs = _union(held.pairs, wanted)
            pending = list(self._pending.get(namespace, ()))
        try:
            concurrent.futures.wait(pending, timeout=self.call_timeout_s)
            while True:
                with self._lock:
                    covering = held.pairs
                snap = self.fetch(namespace, covering)
                with self._lock:
                    if held.pairs != covering:
                        continue                          # another turn joined with other pairs meanwhile
                    if held.snapshot is None or snap.version >= held.snapshot.version:
                        held.snapshot = snap
                    return held.snapshot
        except BaseException:
            self.release(namespace)                       # a failed hold is no hold (its caller releases nothing)
            raise

    def release(self, namespace: str) -> None:
        """A turn that `hold` fetched for is done: the snapshot is let go once no turn holds it."""
        with self._lock:
            held = self._held.get(namespace)
            if held is None:
                return
            held.count -= 1
            if held.count <= 0:
                del self._held[namespace]

    def fetch(self, namespace: str, pairs: Pairs | None = None) -> PoolSnapshot:
        """The namespace's anchors at the pool's current version, from the actor (empty when the pool is lost):
        only the parts `pairs` read (None: all of them)."""
        import ray
        if not self._reachable():
            return _empty_snapshot(namespace)
        with self._lock:
            wire = self._wires.get(namespace)
            kept = self._snapshots.get(namespace)
            actor = self.actor
        started = time.monotonic()
        try:
            for _ in range(2):
                with self._lock:
                    self._stats.fetches += 1
                    self._count_call()
                known = None if wire is None else (wire["epoch"], int(wire["changed_at"]))
                answer = ray.get(actor.snapshot.remote(namespace, known), timeout=self.call_timeout_s)
                with self._lock:
                    self._stats.calls.add(time.monotonic() - started)
                    if answer is None:
                        self._stats.snapshots_unchanged += 1
                        if kept is not None and _covers(kept[0], pairs) and namespace in self._snapshots:
                            self._snapshots.move_to_end(namespace)
                            return kept[1]
                    else:
                        wire = answer
                try:
                    snap, keys = self._build_snapshot(wire, pairs)
                    break
                except _RefDropped:
                    wire = None                   # a part it needs left the cache: ask for the refs again
            else:
                raise RuntimeError(f"namespace {namespace!r}: parts kept leaving the cache while it was rebuilt")
        except Exception as exc:  # noqa: BLE001 - any failure to reach the pool costs speed, never the turn
            self._lost("snapshot", exc)
            with self._lock:
                self._stats.snapshots_failed += 1
            return _empty_snapshot(namespace)
        with self._lock:
            self._keep(namespace, wire, pairs, snap, keys)
        return snap

    def _keep(self, namespace: str, wire: Mapping[str, Any], pairs: Pairs | None, snap: PoolSnapshot,
              keys: frozenset[str]) -> None:
        """Keep the namespace's wire (refs dropped) and last snapshot, to answer "unchanged" without a rebuild; the
        snapshot only while every part it holds is in the cache: a kept snapshot never pins tensors the cache has
        evicted, so the anchor bytes a worker holds between turns stay within its cache budgets (plus the
        snapshots turns in flight hold)."""
        self._wires[namespace] = _without_refs(wire)
        self._wires.move_to_end(namespace)
        self._snapshots.pop(namespace, None)
        self._snapshot_keys.pop(namespace, None)
        if all(self.cache.holds_on_device(key) for key in keys):
            self._snapshots[namespace] = (pairs, snap)
            self._snapshot_keys[namespace] = keys
        while len(self._snapshots) > _SNAPSHOTS_KEPT:
            dropped, _ = self._snapshots.popitem(last=False)
            self._snapshot_keys.pop(dropped, None)
        while len(self._wires) > _SNAPSHOTS_KEPT:
            self._wires.popitem(last=False)

    def _forget_snapshots_using(self, key: str) -> None:
        for namespace in [ns for ns, keys in self._snapshot_keys.items() if key in keys]:
            self._snapshots.pop(namespace, None)
            del self._snapshot_keys[namespace]

    def _build_snapshot(self, wire: Mapping[str, Any], pairs: Pairs | None) -> tuple[PoolSnapshot, frozenset[str]]:
        """The snapshot of `wire` holding only what `pairs` read, and the part keys it holds; parts not cached are
        fetched (all in one `ray.get`)."""
        import ray
        selection = _selection(wire, pairs)
        have: dict[str, dict[str, torch.Tensor]] = {}    # part key -> tensors (held here: the LRU may evict)
        wanted: dict[str, PartRef] = {}
        with self._lock:
            for _, _, selected in selection:
                for part in _parts_of(selected):
                    if part.key in have or part.key in wanted:
                        continue
                    cached = self.cache.get(part.key)
                    if cached is None:
                        wanted[part.key] = part
                    else:
                        have[part.key] = cached
        if any(part.ref is None for part in wanted.values()):
            raise _RefDropped()
        if wanted:
            t0 = time.perf_counter()
            arrays = ray.get([p.ref for p in wanted.values()], timeout=self.call_timeout_s)
            fetched = {key: {n: numpy_to_tensor(a, part.dtype, "cpu") for n, a in entry_arrays.items()}
                       for (key, part), entry_arrays in zip(wanted.items(), arrays)}
            with self._lock:
                for key, part in wanted.items():
                    have[key] = self.cache.put(key, fetched[key], part.nbytes)
                    self._stats.fetched_bytes += part.nbytes
                    self._stats.fetched_parts += 1
                self._stats.fetch_s += time.perf_counter() - t0

        lists: dict[str, list[Anchor]] = {}
        for placeholder, metadata, selected in selection:
            tensors = dict(have[selected["base"].key])
            for index, consumer in enumerate(metadata["consumers"]):
                name = consumer["consumer"]
                for tensor_name, tensor in have[selected["deltas"][name].key].items():
                    tensors[f"deltas.{index}.{tensor_name}"] = tensor
                if consumer["has_rotated_base_key"]:
                    tensors[f"deltas.{index}.rotated_base_key"] = have[selected["rbk"][name].key]["rotated_base_key"]
            lists.setdefault(placeholder, []).append(Anchor.from_state(metadata, tensors))
        snap = PoolSnapshot(namespace=wire["namespace"], version=int(wire["version"]),
                            lists=MappingProxyType({p: tuple(a) for p, a in lists.items()}),
                            namespaces=tuple(wire["namespaces"]))
        return snap, frozenset(have)

    # ---- writing (begin / abort: kvcomm.anchor_pool.TransactionHost) --------------------------------------------
    def commit(self, txn: PoolTransaction) -> Any:
        """Send the staged changes to the pool actor. Returns the new version (a `Future` of it in prefetch mode,
        sent by the committer thread), or None when dropped (pool lost, or too many bytes already waiting)."""
        self._require_own_open(txn)
        txn.state = "committed"
        if txn.is_empty:
            return None
        payload = transaction_payload(txn)
        nbytes = payload_nbytes(payload)
        if self._committer is None:
            return self._send(payload, nbytes)
        with self._lock:
            if self._stats.pending_commit_bytes + nbytes > self.max_pending_commit_bytes and self._stats.commits_pending:
                self._stats.commits_dropped += 1
                self._warn(f"anchor pool commit of {nbytes} bytes dropped: {self._stats.pending_commit_bytes} bytes "
                           f"of commits already waiting (max_pending_commit_bytes {self.max_pending_commit_bytes})")
                return None
            self._stats.commits_pending += 1
            self._stats.pending_commit_bytes += nbytes
            future = self._committer.submit(self._send, payload, nbytes, True)
            pending = self._pending[txn.namespace]
            pending[:] = [f for f in pending if not f.done()] + [future]
        return future

    def _send(self, payload: dict[str, Any], nbytes: int, queued: bool = False) -> int | None:
        import ray
        t0 = time.perf_counter()
        try:
            if not self._reachable():
                with self._lock:
                    self._stats.commits_dropped += 1
                return None
            with self._lock:
                self._count_call()
            version = ray.get(self.actor.commit.remote(payload), timeout=self.call_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a lost pool loses the anchors, never the job
            self._lost("commit", exc)
            with self._lock:
                self._stats.commits_dropped += 1
            return None
        finally:
            if queued:
                with self._lock:
                    self._stats.commits_pending -= 1
                    self._stats.pending_commit_bytes -= nbytes
        with self._lock:
            self._stats.commits += 1
            self._stats.commit_s += time.perf_counter() - t0
            self._stats.commit_calls.add(time.perf_counter() - t0)
            self._stats.committed_bytes += nbytes
        return int(version)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait for every pending commit (prefetch mode)."""
        with self._lock:
            pending = [f for futures in self._pending.values() for f in futures]
        concurrent.futures.wait(pending, timeout=timeout_s)

    def close(self) -> None:
        if self._committer is not None:
            self._committer.shutdown(wait=False, cancel_futures=False)

    def _count_call(self) -> None:
        """Count an actor call by the thread making it (pool names the threads "<prefix>_<n>"): a worker's stats show
        that its model thread makes none."""
        self._stats.calls_by_thread[threading.current_thread().name.split("_")[0]] += 1

    # ---- health -------------------------------------------------------------------------------------------------
    def _reachable(self) -> bool:
        if time.monotonic() < self._unreachable_until:
            return False
        if (self.actor is None or self._needs_resolve) and self._resolve_actor is not None:
            self.actor = self._resolve_actor()
            self._needs_resolve = False
            if self.actor is None:
                self._unreachable_until = time.monotonic() + self.retry_after_s
        return self.actor is not None

    def _lost(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self._unreachable_until = time.monotonic() + self.retry_after_s
            self._needs_resolve = True
        self._warn(f"anchor pool unreachable ({what}: {type(exc).__name__}: "
                   f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                   f"{'serving an empty pool' if what == 'snapshot' else 'commit dropped'}, "
                   f"retrying in {self.retry_after_s:.0f} s")

    def _warn(self, message: str) -> None:
        log.warning(message)
        with self._lock:
            self._stats.warnings = (self._stats.warnings + [message])[-5:]

    @property
    def call_latencies(self) -> Latencies:
        """Recent snapshot-call durations (seconds), for the replica's metrics."""
        return self._stats.calls

    def stats(self) -> dict[str, Any]:
        with self._lock:
            s = self._stats
            return {"snapshots": s.snapshots, "snapshots_unchanged": s.snapshots_unchanged,
                    "snapshots_not_held": s.snapshots_not_held, "fetches": s.fetches,
                    "snapshots_failed": s.snapshots_failed, "commits": s.commits,
                    "commits_dropped": s.commits_dropped, "commits_pending": s.commits_pending,
                    "pending_commit_bytes": s.pending_commit_bytes,
                    "fetch_s": s.fetch_s, "fetched_bytes": s.fetched_bytes, "fetched_parts": s.fetched_parts,
                    "commit_s": s.commit_s, "committed_bytes": s.committed_bytes, **self.cache.stats(),
                    "held_namespaces": len(self._held),
                    "reachable": self.actor is not None and time.monotonic() >= self._unreachable_until,
                    "snapshot_call_ms": s.calls.summary(), "commit_call_ms": s.commit_calls.summary(),
                    "calls_by_thread": dict(s.calls_by_thread), "recent_warnings": list(s.warnings)}


def _empty_snapshot(namespace: str) -> PoolSnapshot:
    return PoolSnapshot(namespace=namespace, version=-1, lists=MappingProxyType({}), namespaces=())
