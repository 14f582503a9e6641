"""The centralized anchor pool on Ray: `AnchorPoolActor` (metadata and ObjectRefs) and its worker-side client.

This module owns the cluster's anchor pool and the wire format between workers and it:

* `AnchorPoolState` (no Ray needed, tested in-process) holds a *metadata mirror*: a real `kvcomm.anchor_pool.
  AnchorPool` whose anchors carry ``meta``-device tensors (shape and dtype, no storage). Every rule of the pool
  (versioned copy-on-write commits, namespaces, the V-per-placeholder LFU-in-window eviction, the global byte
  budget, stale updates) is therefore `AnchorPool`'s own code, applied to exact byte counts; nothing is restated.
  Next to the mirror it keeps one ObjectRef per tensor *part*: an anchor's base KV, one consumer's deltas, and a
  reference-mode writer's rotated base key. Parts are immutable and named by a unique key, so a worker caches
  them by key (= anchor id + part version); parts evicted by a commit have their refs dropped.
* `AnchorPoolActor` wraps the state in a Ray actor (one method at a time, so a commit is atomic against
  snapshots). Workers send the numpy payload *in* the commit call and the actor `ray.put`s it itself: the actor
  owns every anchor object, so anchors survive the loss of the worker that recorded them (a ref put by a worker
  dies with that worker). The price is one copy of a commit's new tensors into the object store, paid once per
  new anchor or delta (milliseconds for a few MB), never on the read path.
* `RemoteAnchorPool` lives in a worker and has the interface the engine uses (`snapshot`, `begin`, `commit`,
  `abort`, `config`, `rope`). Its snapshots are real `PoolSnapshot`s of real `Anchor`s rebuilt from cached
  parts (LRU with a byte budget); its transactions are real `PoolTransaction`s (staging and tensor math happen
  on the worker). When the actor is unreachable a snapshot is empty and a commit is dropped with a warning: the
  engine then prefills densely, so losing the pool costs speed, never correctness.

Tensors cross Ray as numpy (zero-copy reads from the object store); bfloat16, which numpy lacks, travels as its
raw 16-bit pattern with the dtype's name next to it.

Snapshots (optional: `PoolSnapshotSettings`). `AnchorPoolState.save` writes the whole pool to one file with the
msgpack codec (`kvcomm.codec.pack_stream`: one anchor in memory at a time; a temporary file then `os.replace`,
so a crash mid-write leaves the previous snapshot intact) and `AnchorPoolState.load` reads it back: same anchor
ids, metadata, part keys and tensor bytes, so workers' part caches stay valid across a restart. The actor loads
the file when it is constructed (Ray restarts a crashed pool by constructing it again) and a `SnapshotSaver`
thread saves after every N commits or T seconds with changes, off the actor's call path, and on graceful
termination (`__ray_shutdown__`). A snapshot that cannot be used (corrupt, another format, another deployment's
`tag`) is moved aside with a warning and the pool starts empty.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from kvcomm.codec import dtype_name, numpy_to_tensor, pack_stream, tensor_to_numpy, unpack_stream
from kvcomm.anchor_pool import (Anchor, AnchorPool, ConsumerDeltas, PoolSnapshot, PoolTransaction,
                                TransactionHost)
from kvcomm.config import KVCommConfig
from kvcomm.rope import Rope

from .latency import Latencies

log = logging.getLogger(__name__)

DEFAULT_POOL_ACTOR_NAME = "kvcomm-anchor-pool"
DEFAULT_RAY_NAMESPACE = "kvcomm"
DELTA_TENSORS = ("ph_key", "ph_value", "pf_key", "pf_value")
_SNAPSHOTS_KEPT = 8   # namespaces whose last snapshot a client keeps to answer "unchanged" without a rebuild
SNAPSHOT_KIND = "kvcomm-anchor-pool"
SNAPSHOT_SCHEMA = 1   # the layout of a pool snapshot file's body (the codec's envelope has its own version)

# ------------------------------------------------------------------------------------------------------------
# Tensors as numpy
# ------------------------------------------------------------------------------------------------------------
# tensor_to_numpy / numpy_to_tensor / dtype_name: kvcomm.codec (bfloat16 travels as int16 bit patterns)


def _meta_like(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A storage-less tensor with the shape and dtype a shipped array stands for (the mirror's bytes)."""
    return torch.empty(array.shape, dtype=getattr(torch, dtype), device="meta")


# ------------------------------------------------------------------------------------------------------------
# The wire format of a commit
# ------------------------------------------------------------------------------------------------------------
def transaction_payload(txn: PoolTransaction) -> dict[str, Any]:
    """What a staged transaction commits, as plain Python + numpy (for `AnchorPoolActor.commit`).

    Reads the transaction's staged anchors, deltas and activations (the fields `AnchorPool.commit` reads).
    """
    anchors = []
    for anchor in txn._new_anchors.values():
        anchors.append({"anchor_id": anchor.anchor_id, "placeholder": anchor.placeholder,
                        "dtype": dtype_name(anchor.base_keys.dtype),
                        "base": {"base_keys": tensor_to_numpy(anchor.base_keys),
                                 "base_values": tensor_to_numpy(anchor.base_values)}})
    deltas = []
    for anchor_id, per_consumer in txn._deltas.items():
        for consumer, d in per_consumer.items():
            deltas.append({
                "anchor_id": anchor_id, "consumer": consumer, "ph_start": d.ph_start, "pf_start": d.pf_start,
                "keys_canonical": d.keys_canonical, "offset_error": d.offset_error,
                "dtype": dtype_name(d.ph_key.dtype),
                "tensors": {name: tensor_to_numpy(getattr(d, name)) for name in DELTA_TENSORS},
                "rotated_base_key": None if d.rotated_base_key is None else tensor_to_numpy(d.rotated_base_key)})
    return {"namespace": txn.namespace, "anchors": anchors, "deltas": deltas,
            "activations": dict(txn._activations)}


def payload_nbytes(payload: Mapping[str, Any]) -> int:
    total = 0
    for a in payload["anchors"]:
        total += sum(x.nbytes for x in a["base"].values())
    for d in payload["deltas"]:
        total += sum(x.nbytes for x in d["tensors"].values())
        total += 0 if d["rotated_base_key"] is None else d["rotated_base_key"].nbytes
    return total


def merge_payloads(payloads: list[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """One job's transactions, staged turn by turn on several workers, as one payload (None when all are empty).

    Two turns on different workers may both promote the same content to an anchor (each saw no compatible
    anchor, and neither sees the other's staging); identical anchors of one placeholder are kept once and the
    deltas and activations naming a duplicate are moved to the kept one, so the pool ends as a single process
    would leave it. Later deltas of one (anchor, consumer) replace earlier ones, as in one transaction.
    """
    present = [p for p in payloads if p]
    if not present:
        return None
    namespaces = {p["namespace"] for p in present}
    if len(namespaces) != 1:
        raise ValueError(f"merge_payloads: one job's payloads span namespaces {sorted(namespaces)}")
    anchors: list[dict[str, Any]] = []
    same_as: dict[str, str] = {}                     # duplicate anchor id -> kept anchor id
    for payload in present:
        for anchor in payload["anchors"]:
            twin = next((kept for kept in anchors if _same_anchor(kept, anchor)), None)
            if twin is None:
                anchors.append(anchor)
            else:
                same_as[anchor["anchor_id"]] = twin["anchor_id"]
    deltas: dict[tuple[str, str], dict[str, Any]] = {}
    activations: dict[str, int] = {}
    for payload in present:
        for d in payload["deltas"]:
            anchor_id = same_as.get(d["anchor_id"], d["anchor_id"])
            deltas[(anchor_id, d["consumer"])] = {**d, "anchor_id": anchor_id}
        for anchor_id, count in payload["activations"].items():
            anchor_id = same_as.get(anchor_id, anchor_id)
            activations[anchor_id] = activations.get(anchor_id, 0) + int(count)
    return {"namespace": namespaces.pop(), "anchors": anchors, "deltas": list(deltas.values()),
            "activations": activations}


def _same_anchor(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return (a["placeholder"] == b["placeholder"] and a["dtype"] == b["dtype"]
            and all(np.array_equal(a["base"][name], b["base"][name]) for name in ("base_keys", "base_values")))


class _PreparedTransaction(PoolTransaction):
    """A transaction on the metadata mirror whose records arrive ready-made (a worker did the tensor math)."""

    def stage_anchor(self, anchor: Anchor) -> None:
        self._require_open()
        self._new_anchors[anchor.anchor_id] = anchor

    def stage_deltas(self, anchor_id: str, consumer: str, deltas: ConsumerDeltas) -> None:
        self._require_open()
        self._deltas.setdefault(anchor_id, {})[consumer] = deltas

    def stage_activations(self, counts: Mapping[str, int]) -> None:
        self._require_open()
        self._activations.update(counts)


# ------------------------------------------------------------------------------------------------------------
# The pool's state: a metadata mirror plus one ObjectRef per tensor part
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PartRef:
    """One immutable group of an anchor's tensors in the object store."""
    key: str          # unique: "<anchor id>/<part>/<uuid>"; a cache key that never goes stale
    ref: Any          # ObjectRef (or, in-process, the payload itself) of {name: np.ndarray}
    nbytes: int
    dtype: str        # the tensors' torch dtype name (bfloat16 travels as int16)


class AnchorPoolState:
    """The anchor pool's metadata and tensor-part references; `put` stores a part (ray.put in the actor)."""

    def __init__(self, config: KVCommConfig, put: Callable[[dict[str, np.ndarray]], Any],
                 get: Callable[[Any], dict[str, np.ndarray]] | None = None):
        self.config = config
        self._put = put
        self._get = get or (lambda ref: ref)                 # a part's tensors from its ref (ray.get in the actor)
        self._lock = threading.Lock()                        # a snapshot saver reads from another thread
        self._mirror = AnchorPool(config, rope=None)        # meta tensors: the pool's rules on exact byte counts
        self._base_parts: dict[str, PartRef] = {}            # anchor id -> base KV
        self._delta_parts: dict[tuple[str, str], PartRef] = {}   # (anchor id, consumer) -> deltas
        self._rbk_parts: dict[tuple[str, str], PartRef] = {}     # (anchor id, consumer) -> rotated base key
        self._commits = 0
        self._bytes_received = 0
        self.epoch = uuid.uuid4().hex[:12]   # a restarted pool is a new epoch: versions restart from 0

    # ---- writing ------------------------------------------------------------------------------------------------
    def commit(self, payload: Mapping[str, Any]) -> int:
        """Apply one worker's staged transaction atomically; returns the new pool version."""
        with self._lock:
            return self._commit(payload)

    def _commit(self, payload: Mapping[str, Any]) -> int:
        namespace = payload["namespace"]
        txn = _PreparedTransaction(self._mirror, namespace, None)
        base_parts, delta_parts, rbk_parts = {}, {}, {}
        for a in payload["anchors"]:
            base = a["base"]
            txn.stage_anchor(Anchor(anchor_id=a["anchor_id"], placeholder=a["placeholder"],
                                    base_keys=_meta_like(base["base_keys"], a["dtype"]),
                                    base_values=_meta_like(base["base_values"], a["dtype"])))
            base_parts[a["anchor_id"]] = self._store(a["anchor_id"], "base", base, a["dtype"])
        for d in payload["deltas"]:
            tensors, rbk, dtype = d["tensors"], d["rotated_base_key"], d["dtype"]
            key = (d["anchor_id"], d["consumer"])
            txn.stage_deltas(d["anchor_id"], d["consumer"], ConsumerDeltas(
                **{name: _meta_like(tensors[name], dtype) for name in DELTA_TENSORS},
                ph_start=int(d["ph_start"]), pf_start=int(d["pf_start"]),
                rotated_base_key=None if rbk is None else _meta_like(rbk, dtype),
                keys_canonical=bool(d["keys_canonical"]), offset_error=d.get("offset_error")))
            delta_parts[key] = self._store(d["anchor_id"], "deltas", tensors, dtype)
            if rbk is not None:
                rbk_parts[key] = self._store(d["anchor_id"], "rbk", {"rotated_base_key": rbk}, dtype)
        txn.stage_activations({str(k): int(v) for k, v in payload["activations"].items()})
        version = self._mirror.commit(txn)
        self._base_parts.update(base_parts)
        self._delta_parts.update(delta_parts)
        for key in delta_parts:          # a consumer's newer deltas without a rotated base key replace the old
            self._rbk_parts.pop(key, None)
        self._rbk_parts.update(rbk_parts)
        self._drop_dead_parts()
        self._commits += 1
        return version

    def drop_namespace(self, namespace: str) -> int:
        with self._lock:
            version = self._mirror.drop_namespace(namespace)
            self._drop_dead_parts()
            return version

    def _store(self, anchor_id: str, part: str, tensors: dict[str, np.ndarray], dtype: str) -> PartRef:
        nbytes = sum(int(t.nbytes) for t in tensors.values())
        self._bytes_received += nbytes
        return PartRef(f"{anchor_id}/{part}/{uuid.uuid4().hex[:12]}", self._put(dict(tensors)), nbytes, dtype)

    def _drop_dead_parts(self) -> None:
        """Forget the refs of every part the mirror no longer holds (evicted, stale, or superseded)."""
        live_base, live_deltas, live_rbk = set(), set(), set()
        state = self._mirror.snapshot("")   # any namespace: only the version's namespace map is read below
        for namespace in state.namespaces:
            for anchors in self._mirror.snapshot(namespace).lists.values():
                for anchor in anchors:
                    live_base.add(anchor.anchor_id)
                    for consumer, d in anchor.deltas.items():
                        live_deltas.add((anchor.anchor_id, consumer))
                        if d.rotated_base_key is not None:
                            live_rbk.add((anchor.anchor_id, consumer))
        self._base_parts = {k: v for k, v in self._base_parts.items() if k in live_base}
        self._delta_parts = {k: v for k, v in self._delta_parts.items() if k in live_deltas}
        self._rbk_parts = {k: v for k, v in self._rbk_parts.items() if k in live_rbk}

    # ---- reading ------------------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._mirror.version

    def snapshot(self, namespace: str, known: tuple[str, int] | None = None) -> dict[str, Any] | None:
        """One namespace's anchors as metadata + part refs, or None when the pool is still at `known`
        ((epoch, version) of the caller's last snapshot)."""
        with self._lock:
            return self._snapshot(namespace, known)

    def _snapshot(self, namespace: str, known: tuple[str, int] | None = None) -> dict[str, Any] | None:
        snap = self._mirror.snapshot(namespace)
        if known is not None and tuple(known) == (self.epoch, snap.version):
            return None
        lists = {}
        for placeholder, anchors in snap.lists.items():
            entries = []
            for anchor in anchors:
                metadata, _ = anchor.to_state()
                parts = {"base": self._base_parts[anchor.anchor_id], "deltas": {}, "rbk": {}}
                for entry in metadata["consumers"]:
                    key = (anchor.anchor_id, entry["consumer"])
                    parts["deltas"][entry["consumer"]] = self._delta_parts[key]
                    if entry["has_rotated_base_key"]:
                        parts["rbk"][entry["consumer"]] = self._rbk_parts[key]
                entries.append({"metadata": metadata, "parts": parts})
            lists[placeholder] = entries
        return {"namespace": namespace, "epoch": self.epoch, "version": snap.version,
                "namespaces": list(snap.namespaces), "lists": lists}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            stats = self._mirror.stats()
            stats.update(epoch=self.epoch, commits=self._commits, bytes_received=self._bytes_received,
                         parts={"base": len(self._base_parts), "deltas": len(self._delta_parts),
                                "rotated_base_keys": len(self._rbk_parts)})
        return stats

    # ---- snapshots on disk --------------------------------------------------------------------------------------
    def save(self, path: str | Path, *, tag: str = "") -> dict[str, Any]:
        """Write every namespace's anchors to `path` (atomically: a temporary file, then `os.replace`).

        The pool is read at one version (under the lock, refs only); tensors are fetched and written one anchor
        at a time after that, while commits go on. Returns {"version", "anchors", "bytes", "seconds", "path"}.
        """
        t0 = time.perf_counter()
        with self._lock:
            version = self._mirror.version
            entries = [(namespace, placeholder, entry)
                       for namespace in self._mirror.snapshot("").namespaces
                       for placeholder, listed in self._snapshot(namespace)["lists"].items()
                       for entry in listed]      # the refs held here keep every part alive until written
        head = {"kind": SNAPSHOT_KIND, "schema": SNAPSHOT_SCHEMA, "tag": tag, "version": version,
                "saved_at": time.time()}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as file:
                written = pack_stream(file, head, self._snapshot_items(entries), count=len(entries),
                                      items_key="anchors")
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return {"version": version, "anchors": len(entries), "bytes": written,
                "seconds": time.perf_counter() - t0, "path": str(path)}

    def _snapshot_items(self, entries: list[tuple[str, str, dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        def part(ref: PartRef) -> dict[str, Any]:
            arrays = self._get(ref.ref)
            return {"key": ref.key, "dtype": ref.dtype,
                    "tensors": {name: numpy_to_tensor(array, ref.dtype, copy=False) for name, array in arrays.items()}}

        for namespace, placeholder, entry in entries:
            parts = entry["parts"]
            yield {"namespace": namespace, "placeholder": placeholder, "metadata": entry["metadata"],
                   "parts": {"base": part(parts["base"]),
                             "deltas": {c: part(p) for c, p in parts["deltas"].items()},
                             "rbk": {c: part(p) for c, p in parts["rbk"].items()}}}

    def load(self, path: str | Path, *, tag: str = "") -> dict[str, Any]:
        """Replace the pool by the snapshot at `path`; never raises for a bad file.

        Returns {"loaded": True, "anchors", "version", "bytes", "seconds"} or {"loaded": False, "reason"}. A missing
        file is a quiet "no snapshot"; a file that cannot be used (unreadable, corrupt or truncated, another
        format or schema version, another `tag`) logs a warning, is renamed to ``<path>.rejected`` (so the next
        save does not overwrite evidence) and leaves the pool as it was (empty, in a new actor). The bounds (V,
        the byte budget) are applied to what was read, as a commit would.
        """
        path = Path(path)
        t0 = time.perf_counter()
        for stale in path.parent.glob(f".{path.name}.tmp-*"):     # a save interrupted by a crash
            stale.unlink(missing_ok=True)
        if not path.exists():
            return {"loaded": False, "reason": "no snapshot file"}
        try:
            with open(path, "rb") as file:
                head, count, items = unpack_stream(file, items_key="anchors")
                if head.get("kind") != SNAPSHOT_KIND:
                    raise ValueError(f"not an anchor-pool snapshot (kind {head.get('kind')!r})")
                if head.get("schema") != SNAPSHOT_SCHEMA:
                    raise ValueError(f"snapshot schema {head.get('schema')!r}, this build reads {SNAPSHOT_SCHEMA}")
                if head.get("tag", "") != tag:
                    raise ValueError(f"snapshot of another deployment (tag {head.get('tag')!r}, this pool's "
                                     f"{tag!r})")
                restored = self._read_items(items, count)
            nbytes = path.stat().st_size
        except Exception as exc:  # noqa: BLE001 - a bad snapshot costs the anchors, never the pool
            reason = f"{type(exc).__name__}: {exc}"
            rejected = path.with_name(path.name + ".rejected")
            try:
                os.replace(path, rejected)
                where = f"moved to {rejected}"
            except OSError as move_error:
                where = f"left in place ({move_error})"
            log.warning("anchor pool snapshot %s unusable (%s); starting with an empty pool, the file %s",
                        path, reason, where)
            return {"loaded": False, "reason": reason, "rejected": str(rejected)}
        namespaces, parts, _ = restored
        with self._lock:
            self._mirror.restore(namespaces, version=int(head.get("version", 0)))
            self._base_parts, self._delta_parts, self._rbk_parts = parts
            self._drop_dead_parts()
            anchors = len(self._base_parts)
        return {"loaded": True, "anchors": anchors, "version": self._mirror.version, "bytes": nbytes,
                "seconds": time.perf_counter() - t0}

    def _read_items(self, items: Iterator[Any], count: int) -> tuple[dict, tuple[dict, dict, dict], int]:
        """Anchors (meta tensors, for the mirror) and stored parts from a snapshot's items; raises on anything
        malformed, before the pool is touched."""
        namespaces: dict[str, dict[str, list[Anchor]]] = {}
        base_parts: dict[str, PartRef] = {}
        delta_parts: dict[tuple[str, str], PartRef] = {}
        rbk_parts: dict[tuple[str, str], PartRef] = {}

        def stored(raw: Mapping[str, Any], names: tuple[str, ...]) -> tuple[PartRef, dict[str, torch.Tensor]]:
            tensors = raw["tensors"]
            if set(tensors) != set(names):
                raise ValueError(f"part {raw.get('key')!r} holds {sorted(tensors)}, expected {sorted(names)}")
            dtype = dtype_name(getattr(torch, str(raw["dtype"])))
            arrays = {}
            for name in names:
                tensor = tensors[name]
                if not isinstance(tensor, torch.Tensor) or dtype_name(tensor.dtype) != dtype:
                    raise ValueError(f"part {raw['key']!r}: {name} is not a {dtype} tensor")
                arrays[name] = tensor_to_numpy(tensor)
            nbytes = sum(int(a.nbytes) for a in arrays.values())
            meta = {name: torch.empty(tensors[name].shape, dtype=tensors[name].dtype, device="meta")
                    for name in names}
            return PartRef(str(raw["key"]), self._put(arrays), nbytes, dtype), meta

        read = 0
        for item in items:
            read += 1
            metadata, parts = item["metadata"], item["parts"]
            anchor_id = metadata["anchor_id"]
            base_parts[anchor_id], flat = stored(parts["base"], ("base_keys", "base_values"))
            for index, consumer in enumerate(metadata["consumers"]):
                name = consumer["consumer"]
                delta_parts[(anchor_id, name)], tensors = stored(parts["deltas"][name], DELTA_TENSORS)
                flat.update({f"deltas.{index}.{k}": v for k, v in tensors.items()})
                if consumer["has_rotated_base_key"]:
                    rbk_parts[(anchor_id, name)], tensors = stored(parts["rbk"][name], ("rotated_base_key",))
                    flat[f"deltas.{index}.rotated_base_key"] = tensors["rotated_base_key"]
            anchor = Anchor.from_state(metadata, flat)
            if anchor.placeholder != item["placeholder"]:
                raise ValueError(f"anchor {anchor_id} listed under {item['placeholder']!r}, is {anchor.placeholder!r}")
            namespaces.setdefault(str(item["namespace"]), {}).setdefault(anchor.placeholder, []).append(anchor)
        if read != count:
            raise ValueError(f"snapshot announces {count} anchors, holds {read}")
        return namespaces, (base_parts, delta_parts, rbk_parts), read


@dataclass(frozen=True)
class PoolSnapshotSettings:
    """Where and how often the pool actor saves its snapshot (see the module docstring)."""
    path: str                       # the snapshot file (on the pool actor's node); loaded at (re)start if present
    every_commits: int = 100        # save once this many commits (or namespace drops) are unsaved ...
    every_s: float = 60.0           # ... or once changes are this old, whichever comes first
    tag: str = ""                   # names the deployment (model, dtype): a snapshot with another tag is rejected

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("PoolSnapshotSettings.path must be a file path")
        if self.every_commits < 1:
            raise ValueError(f"every_commits must be >= 1, got {self.every_commits}")
        if not self.every_s > 0:
            raise ValueError(f"every_s must be > 0, got {self.every_s}")


class SnapshotSaver:
    """Loads a pool's snapshot at start, then saves it from a thread of its own when changes are due.

    `note_change()` after every commit; a save runs once `every_commits` changes are unsaved or the oldest
    unsaved change is `every_s` old. Saving reads the pool at one version and writes while commits go on, so no
    actor call waits for the disk. `save_now()` saves at once (if anything changed); `close()` stops the thread
    and saves what is left. A failed save is logged and retried at the next due time, never raised.
    """

    def __init__(self, state: AnchorPoolState, settings: PoolSnapshotSettings, *, start_thread: bool = True):
        self.state = state
        self.settings = settings
        self.loaded = state.load(settings.path, tag=settings.tag)
        self._saved_version = state.version            # what is on disk (or, with no file, an empty pool)
        self._unsaved = 0
        self._dirty_since: float | None = None
        self._save_lock = threading.Lock()             # one save at a time (thread, save_now, close)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.saves = 0
        self.save_errors = 0
        self.last_save: dict[str, Any] | None = None
        self.last_error: str | None = None
        self._thread = None
        if start_thread:
            self._thread = threading.Thread(target=self._run, name="kvcomm-pool-snapshot", daemon=True)
            self._thread.start()

    def note_change(self) -> None:
        self._unsaved += 1
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()
        if self._unsaved >= self.settings.every_commits:
            self._wake.set()

    def due(self) -> bool:
        if self.state.version == self._saved_version and not self._unsaved:
            return False
        return (self._unsaved >= self.settings.every_commits or (
            self._dirty_since is not None and time.monotonic() - self._dirty_since >= self.settings.every_s))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=min(1.0, self.settings.every_s))
            self._wake.clear()
            if not self._stop.is_set() and self.due():
                self.save_now()

    def save_now(self) -> dict[str, Any] | None:
        """Save if anything changed since the last save; the save's figures (None when nothing was due)."""
        with self._save_lock:
            if self.state.version == self._saved_version and not self._unsaved:
                return None
            unsaved, self._unsaved, self._dirty_since = self._unsaved, 0, None
            try:
                info = self.state.save(self.settings.path, tag=self.settings.tag)
            except Exception as exc:  # noqa: BLE001 - a failed save loses no anchors in memory; retried later
                self._unsaved += unsaved
                self._dirty_since = time.monotonic()
                self.save_errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("anchor pool snapshot to %s failed (%s); retrying in %.0f s", self.settings.path,
                            self.last_error, self.settings.every_s)
                return None
            self._saved_version = info["version"]
            if self.state.version != info["version"]:      # committed while writing: still unsaved
                self._unsaved = max(self._unsaved, 1)
                self._dirty_since = self._dirty_since or time.monotonic()
            self.saves += 1
            self.last_save = info
            return info

    def close(self) -> dict[str, Any] | None:
        """Stop the saving thread and save what is unsaved."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        return self.save_now()

    def stats(self) -> dict[str, Any]:
        return {"path": self.settings.path, "loaded": dict(self.loaded), "saves": self.saves,
                "save_errors": self.save_errors, "last_save": self.last_save, "last_error": self.last_error,
                "saved_version": self._saved_version, "unsaved_changes": self._unsaved}


class AnchorPoolActor:
    """The Ray actor around `AnchorPoolState`: one method at a time, the actor owns every tensor object.

    With `snapshot` settings it starts from the snapshot file when there is one and keeps it up to date (see
    `SnapshotSaver`); Ray's restart of a crashed pool constructs it again, so it comes back with its anchors.
    """

    def __init__(self, config: KVCommConfig | None = None, snapshot: PoolSnapshotSettings | None = None):
        import ray
        self._state = AnchorPoolState(config or KVCommConfig(), put=ray.put, get=ray.get)
        self._saver = None if snapshot is None else SnapshotSaver(self._state, snapshot)
        self._started = time.time()

    def commit(self, payload: dict[str, Any]) -> int:
        version = self._state.commit(payload)
        self._changed()
        return version

    def commit_parts(self, *payloads: dict[str, Any] | None) -> int:
        """Commit one job's per-turn payloads (passed as ObjectRefs: Ray resolves them before this runs) as one
        atomic update; the new pool version."""
        merged = merge_payloads(list(payloads))
        if merged is None:
            return self._state.version
        version = self._state.commit(merged)
        self._changed()
        return version

    def _changed(self) -> None:
        if self._saver is not None:
            self._saver.note_change()

    def save_snapshot(self) -> dict[str, Any] | None:
        """Save now (when snapshots are on and anything changed): the save's figures, else None."""
        return None if self._saver is None else self._saver.save_now()

    def __ray_shutdown__(self) -> None:
        """Graceful termination (not `ray.kill`): save what is unsaved."""
        if self._saver is not None:
            self._saver.close()

    def snapshot(self, namespace: str, known: tuple[str, int] | None = None) -> dict[str, Any] | None:
        return self._state.snapshot(namespace, known)

    def version(self) -> int:
        return self._state.version

    def drop_namespace(self, namespace: str) -> int:
        version = self._state.drop_namespace(namespace)
        self._changed()
        return version

    def stats(self) -> dict[str, Any]:
        stats = self._state.stats()
        stats["uptime_s"] = time.time() - self._started
        stats["snapshot"] = None if self._saver is None else self._saver.stats()
        return stats

    def ping(self) -> str:
        return "ok"


def get_or_create_pool_actor(config: KVCommConfig | None = None, *, name: str = DEFAULT_POOL_ACTOR_NAME,
                             namespace: str = DEFAULT_RAY_NAMESPACE, detached: bool = False,
                             max_restarts: int = 0, snapshot: PoolSnapshotSettings | None = None
                             ) -> tuple[Any, bool]:
    """The named pool actor in `namespace`: (handle, created). An existing one is reused as it is.

    The actor asks for no CPU (it only rearranges metadata), so it never takes a worker's slot. Without
    `snapshot` a restarted actor comes back empty (workers then prefill densely until anchors are learned
    again); with it, the actor comes back with the anchors of its last saved snapshot.
    """
    import ray
    remote_cls = ray.remote(AnchorPoolActor)
    try:
        return ray.get_actor(name, namespace=namespace), False
    except ValueError:
        pass
    options: dict[str, Any] = dict(name=name, namespace=namespace, num_cpus=0, max_restarts=max_restarts,
                                   max_concurrency=1, get_if_exists=True)
    if detached:
        options["lifetime"] = "detached"
    handle = remote_cls.options(**options).remote(config or KVCommConfig(), snapshot)
    return handle, True


# ------------------------------------------------------------------------------------------------------------
# The worker-side client
# ------------------------------------------------------------------------------------------------------------
class PartCache:
    """Fetched tensor parts by key, least recently used evicted first once over `budget_bytes` (one entry
    larger than the budget is kept alone). `on_evict(key)` is told of every eviction."""

    def __init__(self, budget_bytes: int, on_evict: Callable[[str], None] | None = None):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, tuple[dict[str, torch.Tensor], int]] = OrderedDict()
        self._on_evict = on_evict
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The cached tensors (now the most recently used), or None; counted as a hit or a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: str, tensors: dict[str, torch.Tensor], nbytes: int) -> None:
        if key in self._entries:
            return
        self._entries[key] = (tensors, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.budget_bytes and len(self._entries) > 1:
            evicted, (_, size) = self._entries.popitem(last=False)
            self.nbytes -= size
            self.evictions += 1
            if self._on_evict is not None:
                self._on_evict(evicted)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class _ClientStats:
    snapshots: int = 0
    snapshots_unchanged: int = 0
    commits: int = 0
    commits_dropped: int = 0
    snapshots_failed: int = 0
    fetch_s: float = 0.0
    fetched_bytes: int = 0
    commit_s: float = 0.0
    committed_bytes: int = 0
    warnings: list[str] = field(default_factory=list)
    calls: Latencies = field(default_factory=Latencies)   # recent snapshot-call latencies


class RemoteAnchorPool(TransactionHost):
    """The engine's pool interface over an `AnchorPoolActor`; one per worker, used from one thread.

    `actor` may be None (no pool reachable): then every snapshot is empty and every commit is dropped.
    After a failed call the actor is not asked again for `retry_after_s`, so a lost pool does not add a
    timeout to every turn; then `resolve_actor` (e.g. a lookup by name) gives the handle to try next, so a
    pool re-created under the same name is found again.
    """

    def __init__(self, actor: Any, config: KVCommConfig, rope: Rope | None, *, cache_bytes: int = 256 << 20,
                 device: torch.device | str = "cpu", call_timeout_s: float = 10.0, retry_after_s: float = 5.0,
                 resolve_actor: Callable[[], Any] | None = None):
        self.actor = actor
        self._resolve_actor = resolve_actor
        self._needs_resolve = False
        self.config = config
        self.rope = rope
        self.device = torch.device(device)
        self.call_timeout_s = call_timeout_s
        self.retry_after_s = retry_after_s
        self.cache = PartCache(cache_bytes, on_evict=self._forget_snapshots_using)
        self._snapshots: OrderedDict[str, tuple[str, PoolSnapshot]] = OrderedDict()  # namespace -> (epoch, last)
        self._snapshot_keys: dict[str, frozenset[str]] = {}   # namespace -> part keys its kept snapshot holds
        self._unreachable_until = 0.0
        self._stats = _ClientStats()

    # ---- reading ------------------------------------------------------------------------------------------------
    def snapshot(self, namespace: str) -> PoolSnapshot:
        """The namespace's anchors at the pool's current version (an empty snapshot when the pool is lost)."""
        import ray
        self._stats.snapshots += 1
        cached = self._snapshots.get(namespace)
        if not self._reachable():
            return _empty_snapshot(namespace)
        known = None if cached is None else (cached[0], cached[1].version)
        started = time.monotonic()
        try:
            wire = ray.get(self.actor.snapshot.remote(namespace, known), timeout=self.call_timeout_s)
            self._stats.calls.add(time.monotonic() - started)
            if wire is None:
                self._stats.snapshots_unchanged += 1
                return cached[1]
            snap = self._build_snapshot(wire)
        except Exception as exc:  # noqa: BLE001 - any failure to reach the pool costs speed, never the turn
            self._lost("snapshot", exc)
            self._stats.snapshots_failed += 1
            return _empty_snapshot(namespace)
        self._keep(namespace, wire, snap)
        return snap

    def _keep(self, namespace: str, wire: Mapping[str, Any], snap: PoolSnapshot) -> None:
        """Keep the namespace's last snapshot (to answer "unchanged" without a rebuild) only while every part it
        holds is in the cache: a kept snapshot never pins tensors the cache has evicted, so the anchor bytes a
        worker holds between turns stay within `cache_bytes`."""
        keys = frozenset(part.key for entries in wire["lists"].values() for entry in entries
                         for part in [entry["parts"]["base"], *entry["parts"]["deltas"].values(),
                                      *entry["parts"]["rbk"].values()])
        self._snapshots.pop(namespace, None)
        self._snapshot_keys.pop(namespace, None)
        if not all(key in self.cache for key in keys):
            return                                         # larger than the cache: rebuilt from the pool next time
        self._snapshots[namespace] = (wire["epoch"], snap)
        self._snapshot_keys[namespace] = keys
        while len(self._snapshots) > _SNAPSHOTS_KEPT:
            dropped, _ = self._snapshots.popitem(last=False)
            self._snapshot_keys.pop(dropped, None)

    def _forget_snapshots_using(self, key: str) -> None:
        for namespace in [ns for ns, keys in self._snapshot_keys.items() if key in keys]:
            self._snapshots.pop(namespace, None)
            del self._snapshot_keys[namespace]

    def _build_snapshot(self, wire: Mapping[str, Any]) -> PoolSnapshot:
        import ray
        have: dict[str, dict[str, torch.Tensor]] = {}    # part key -> tensors (held here: the LRU may evict)
        wanted: dict[str, PartRef] = {}
        for entries in wire["lists"].values():
            for entry in entries:
                parts = entry["parts"]
                for part in [parts["base"], *parts["deltas"].values(), *parts["rbk"].values()]:
                    if part.key in have or part.key in wanted:
                        continue
                    cached = self.cache.get(part.key)
                    if cached is None:
                        wanted[part.key] = part
                    else:
                        have[part.key] = cached
        if wanted:
            t0 = time.perf_counter()
            arrays = ray.get([p.ref for p in wanted.values()], timeout=self.call_timeout_s)
            for part, entry_arrays in zip(wanted.values(), arrays):
                have[part.key] = {n: numpy_to_tensor(a, part.dtype, self.device) for n, a in entry_arrays.items()}
                self.cache.put(part.key, have[part.key], part.nbytes)
                self._stats.fetched_bytes += part.nbytes
            self._stats.fetch_s += time.perf_counter() - t0

        lists = {}
        for placeholder, entries in wire["lists"].items():
            anchors = []
            for entry in entries:
                metadata, parts = entry["metadata"], entry["parts"]
                tensors = dict(have[parts["base"].key])
                for index, consumer in enumerate(metadata["consumers"]):
                    name = consumer["consumer"]
                    for tensor_name, tensor in have[parts["deltas"][name].key].items():
                        tensors[f"deltas.{index}.{tensor_name}"] = tensor
                    if consumer["has_rotated_base_key"]:
                        tensors[f"deltas.{index}.rotated_base_key"] = have[parts["rbk"][name].key]["rotated_base_key"]
                anchors.append(Anchor.from_state(metadata, tensors))
            lists[placeholder] = tuple(anchors)
        return PoolSnapshot(namespace=wire["namespace"], version=int(wire["version"]),
                            lists=MappingProxyType(lists), namespaces=tuple(wire["namespaces"]))

    # ---- writing (begin / abort: kvcomm.anchor_pool.TransactionHost) --------------------------------------------
    def commit(self, txn: PoolTransaction) -> int | None:
        """Send the staged changes to the pool actor; the new version, or None when dropped (pool lost)."""
        import ray
        self._require_own_open(txn)
        txn.state = "committed"
        if txn.is_empty:
            return None
        if not self._reachable():
            self._stats.commits_dropped += 1
            return None
        payload = transaction_payload(txn)
        t0 = time.perf_counter()
        try:
            version = ray.get(self.actor.commit.remote(payload), timeout=self.call_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a lost pool loses the anchors, never the job
            self._lost("commit", exc)
            self._stats.commits_dropped += 1
            return None
        self._stats.commits += 1
        self._stats.commit_s += time.perf_counter() - t0
        self._stats.committed_bytes += payload_nbytes(payload)
        return int(version)

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
        self._unreachable_until = time.monotonic() + self.retry_after_s
        self._needs_resolve = True
        message = (f"anchor pool unreachable ({what}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                   f"{'serving an empty pool' if what == 'snapshot' else 'commit dropped'}, "
                   f"retrying in {self.retry_after_s:.0f} s")
        log.warning(message)
        self._stats.warnings = (self._stats.warnings + [message])[-5:]

    def stats(self) -> dict[str, Any]:
        s = self._stats
        return {"snapshots": s.snapshots, "snapshots_unchanged": s.snapshots_unchanged,
                "snapshots_failed": s.snapshots_failed, "commits": s.commits, "commits_dropped": s.commits_dropped,
                "fetch_s": s.fetch_s, "fetched_bytes": s.fetched_bytes, "commit_s": s.commit_s,
                "committed_bytes": s.committed_bytes, "cache_entries": len(self.cache),
                "cache_bytes": self.cache.nbytes, "cache_hits": self.cache.hits, "cache_misses": self.cache.misses,
                "cache_evictions": self.cache.evictions,
                "reachable": self.actor is not None and time.monotonic() >= self._unreachable_until,
                "snapshot_call_ms": s.calls.summary(),
                "recent_warnings": list(s.warnings)}


def _empty_snapshot(namespace: str) -> PoolSnapshot:
    return PoolSnapshot(namespace=namespace, version=-1, lists=MappingProxyType({}), namespaces=())
