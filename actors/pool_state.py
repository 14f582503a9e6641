"""The anchor pool's state on the cluster, with no Ray in it: `AnchorPoolState` and the wire format of a commit.

* `AnchorPoolState` (tested in-process; `actors.anchor_pool_actor.AnchorPoolActor` wraps it) holds a *metadata
  mirror*: a real `kvcomm.anchor_pool.AnchorPool` whose anchors carry ``meta``-device tensors (shape and dtype, no
  storage). Every rule of the pool (versioned copy-on-write commits, namespaces, the V-per-placeholder
  LFU-in-window eviction, the global byte budget, stale updates) is therefore `AnchorPool`'s own code, applied to
  exact byte counts; nothing is restated. Next to the mirror it keeps one ObjectRef per tensor *part*: an anchor's
  base KV, one consumer's deltas, and a reference-mode writer's rotated base key. Parts are immutable and named by
  a unique key, so a worker caches them by key; parts evicted by a commit have their refs dropped.
* Concurrency: every method may be called from several threads at once (the actor serves calls concurrently).
  One lock guards the mirror and the part maps, and is held only to rearrange references: a commit stores its
  tensors (`put`, a `ray.put` in the actor) *before* it takes the lock, and a save reads the refs under it and
  fetches and writes tensors after releasing it. A slow save or a large commit's copy never holds up a snapshot.
* Versions per namespace: the pool's version counts every change, but each namespace also remembers the pool
  version at which *it* last changed (`changed_at`), and a snapshot's "unchanged" shortcut compares that: a
  commit to another namespace does not invalidate a worker's copy (an eviction the byte budget makes in this
  namespace does).
* Wire format: `transaction_payload` (a staged `PoolTransaction` as plain Python + numpy), `merge_payloads` (one
  job's per-turn payloads as one commit), `payload_nbytes`, and `PartRef`. Tensors cross Ray as numpy;
  bfloat16, which numpy lacks, travels as its raw 16-bit pattern with the dtype's name next to it.
* Files: `save` writes the whole pool to one file with the msgpack codec (`kvcomm.codec.pack_stream`: one anchor
  in memory at a time; a temporary file then `os.replace`, so a crash mid-write leaves the previous file intact)
  and `load` reads it back: same anchor ids, metadata, part keys and tensor bytes, so workers' part caches stay
  valid across a restart. When and where the actor saves: `actors.anchor_pool_actor.SnapshotSaver`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from kvcomm.anchor_pool import AnchorPool, PoolTransaction
from kvcomm.anchor_records import Anchor, ConsumerDeltas
from kvcomm.codec import dtype_name, numpy_to_tensor, pack_stream, tensor_to_numpy, unpack_stream
from kvcomm.config import KVCommConfig

log = logging.getLogger(__name__)

DELTA_TENSORS = ("ph_key", "ph_value", "pf_key", "pf_value")
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
    """The anchor pool's metadata and tensor-part references; `put` stores a part (ray.put in the actor).
    Thread-safe: see the module docstring for what the lock covers."""

    def __init__(self, config: KVCommConfig, put: Callable[[dict[str, np.ndarray]], Any],
                 get: Callable[[Any], dict[str, np.ndarray]] | None = None):
        self.config = config
        self._put = put
        self._get = get or (lambda ref: ref)                 # a part's tensors from its ref (ray.get in the actor)
        self._lock = threading.Lock()                        # the mirror, the part maps, the counters
        self._mirror = AnchorPool(config, rope=None)        # meta tensors: the pool's rules on exact byte counts
        self._base_parts: dict[str, PartRef] = {}            # anchor id -> base KV
        self._delta_parts: dict[tuple[str, str], PartRef] = {}   # (anchor id, consumer) -> deltas
        self._rbk_parts: dict[tuple[str, str], PartRef] = {}     # (anchor id, consumer) -> rotated base key
        self._lists: dict[str, Mapping[str, tuple[Anchor, ...]]] = {}   # namespace -> its lists, as last seen
        self._changed_at: dict[str, int] = {}                # namespace -> pool version of its last change
        self._commits = 0
        self._bytes_received = 0
        self._questions = 0                                  # commits that brought new anchors (see stats)
        self._question_bytes = 0                             # ... and the bytes of their new tensors
        self.epoch = uuid.uuid4().hex[:12]   # a restarted pool is a new epoch: versions restart from 0

    # ---- writing ------------------------------------------------------------------------------------------------
    def commit(self, payload: Mapping[str, Any]) -> int:
        """Apply one worker's (or one job's merged) staged transaction atomically; returns the new pool version.

        The payload's tensors are stored (`put`) before the lock is taken; only the rearranging of references
        happens under it."""
        txn, parts, nbytes = self._stage(payload)
        with self._lock:
            version = self._mirror.commit(txn)
            base_parts, delta_parts, rbk_parts = parts
            self._base_parts.update(base_parts)
            self._delta_parts.update(delta_parts)
            for key in delta_parts:      # a consumer's newer deltas without a rotated base key replace the old
                self._rbk_parts.pop(key, None)
            self._rbk_parts.update(rbk_parts)
            self._note_changes()
            self._commits += 1
            self._bytes_received += nbytes
            if base_parts:
                self._questions += 1
                self._question_bytes += nbytes
            return version

    def _stage(self, payload: Mapping[str, Any]) -> tuple[PoolTransaction, tuple[dict, dict, dict], int]:
        """The payload as a transaction on the mirror (meta tensors) and its stored parts; touches no shared state
        but the mirror's identity, so it runs outside the lock."""
        txn = _PreparedTransaction(self._mirror, payload["namespace"], None)
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
        nbytes = sum(p.nbytes for parts in (base_parts, delta_parts, rbk_parts) for p in parts.values())
        return txn, (base_parts, delta_parts, rbk_parts), nbytes

    def drop_namespace(self, namespace: str) -> int:
        with self._lock:
            version = self._mirror.drop_namespace(namespace)
            self._note_changes()
            return version

    def _store(self, anchor_id: str, part: str, tensors: dict[str, np.ndarray], dtype: str) -> PartRef:
        nbytes = sum(int(t.nbytes) for t in tensors.values())
        return PartRef(f"{anchor_id}/{part}/{uuid.uuid4().hex[:12]}", self._put(dict(tensors)), nbytes, dtype)

    def _note_changes(self) -> None:
        """After a change of the mirror (lock held): stamp every namespace whose anchors changed (the committed
        one, and any the byte budget evicted from) with the new version, and forget the refs of every part the
        mirror no longer holds (evicted, stale, or superseded)."""
        version = self._mirror.version
        lists = {ns: self._mirror.snapshot(ns).lists for ns in self._mirror.snapshot("").namespaces}
        for namespace in set(lists) | set(self._lists):
            if lists.get(namespace) != self._lists.get(namespace):   # anchors compare by identity
                self._changed_at[namespace] = version
        self._lists = lists
        live_base, live_deltas, live_rbk = set(), set(), set()
        for per_placeholder in lists.values():
            for anchors in per_placeholder.values():
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

    def changed_at(self, namespace: str) -> int:
        """The pool version at which `namespace` last changed (0: never, in this epoch)."""
        with self._lock:
            return self._changed_at.get(namespace, 0)

    def snapshot(self, namespace: str, known: tuple[str, int] | None = None) -> dict[str, Any] | None:
        """One namespace's anchors as metadata + part refs, or None when the namespace is unchanged since `known`
        ((epoch, changed_at) of the caller's last snapshot of it; commits to other namespaces do not count)."""
        with self._lock:
            return self._snapshot(namespace, known)

    def _snapshot(self, namespace: str, known: tuple[str, int] | None = None) -> dict[str, Any] | None:
        changed_at = self._changed_at.get(namespace, 0)
        if known is not None and tuple(known) == (self.epoch, changed_at):
            return None
        snap = self._mirror.snapshot(namespace)
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
        return {"namespace": namespace, "epoch": self.epoch, "version": snap.version, "changed_at": changed_at,
                "namespaces": list(snap.namespaces), "lists": lists}

    def stats(self) -> dict[str, Any]:
        """The mirror's stats (version, bytes, evictions, per namespace) and the parts held. `bytes_per_question`:
        the mean bytes of new tensors a commit that brought new anchors stored (a job's, or a chat's, anchors
        and deltas: what one question adds to the pool)."""
        with self._lock:
            stats = self._mirror.stats()
            stats.update(epoch=self.epoch, commits=self._commits, bytes_received=self._bytes_received,
                         bytes_per_question=self._question_bytes / self._questions if self._questions else 0.0,
                         parts={"base": len(self._base_parts), "deltas": len(self._delta_parts),
                                "rotated_base_keys": len(self._rbk_parts)},
                         changed_at=dict(self._changed_at))
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
            self._note_changes()
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


