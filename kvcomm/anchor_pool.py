"""The anchor pool: observed placeholder contents and the KV offsets consumers saw for them.

This module owns the pool as a plain, thread-safe data structure (no model, no Ray) of the records in
`kvcomm.anchor_records` (`Anchor`, `ConsumerDeltas`): `AnchorPool` (versioned, copy-on-write, namespaced state with
the LFU-in-window eviction and a global byte budget), `PoolSnapshot` (an immutable, consistent view of one
namespace) and `PoolTransaction` (changes staged by one request, published atomically by `AnchorPool.commit`).

Positions: an anchor's base KV is stored at canonical positions ``0 .. T-1`` (its deltas: `kvcomm.anchor_records`).
The pool only ever replaces whole `Anchor` objects, so an actor can map anchor ids to object references and rebuild
anchors on the worker (`Anchor.to_state` / `from_state`).
"""
from __future__ import annotations

import threading
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import torch

from .anchor_records import Anchor, ConsumerDeltas, with_consumer_deltas
from .config import KVCommConfig
from .kv import KVSegment
from .rope import Rope


def choose_victim(anchors: Sequence[Anchor], window: int, protected_ids: frozenset[str] = frozenset()) -> int:
    """Index in `anchors` (insertion order) of the eviction victim: the least activated among the `window`
    oldest, the first one on ties. Anchors in `protected_ids` (inserted by the commit being applied; the
    reference evicts before inserting) are passed over unless nothing else is left."""
    if not anchors:
        raise ValueError("choose_victim needs a non-empty anchor list")
    candidates = [i for i, a in enumerate(anchors) if a.anchor_id not in protected_ids] or list(range(len(anchors)))
    oldest = candidates[:window]
    return min(oldest, key=lambda i: anchors[i].activation_count)  # min() keeps the first on ties


# ------------------------------------------------------------------------------------------------------------
# Snapshots
# ------------------------------------------------------------------------------------------------------------
_PlaceholderLists = Mapping[str, tuple[Anchor, ...]]  # placeholder kind -> anchors in insertion order


@dataclass(frozen=True)
class _PoolState:
    """One published version of the whole pool. Never mutated after publication."""
    version: int
    namespaces: Mapping[str, _PlaceholderLists]
    total_bytes: int


@dataclass(frozen=True, eq=False)
class PoolSnapshot:
    """An immutable, consistent view of one namespace at one pool version.

    An unknown namespace gives an empty snapshot (the engine then goes dense and records an anchor).
    `namespaces` lists the namespaces the pool held at that version (names only; never their anchors).
    """
    namespace: str
    version: int
    lists: _PlaceholderLists
    namespaces: tuple[str, ...]

    def anchors(self, placeholder: str) -> list[Anchor]:
        """The anchors of one placeholder kind, in insertion order (a new list each call)."""
        return list(self.lists.get(placeholder, ()))

    @property
    def placeholders(self) -> tuple[str, ...]:
        return tuple(self.lists)

    def anchor(self, anchor_id: str) -> Anchor | None:
        for anchors in self.lists.values():
            for anchor in anchors:
                if anchor.anchor_id == anchor_id:
                    return anchor
        return None

    def __len__(self) -> int:
        return sum(len(anchors) for anchors in self.lists.values())

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for anchors in self.lists.values() for a in anchors)


# ------------------------------------------------------------------------------------------------------------
# Transactions
# ------------------------------------------------------------------------------------------------------------
class PoolTransaction:
    """Changes to one namespace staged by one request; visible to nobody until `AnchorPool.commit`.

    Not thread-safe itself: one transaction belongs to one request. Tensor arithmetic (deltas, de-rotation)
    happens here, at staging time, so that commit only rearranges references.
    """

    def __init__(self, pool: "AnchorPool", namespace: str, rope: Rope | None):
        self._pool = pool
        self.namespace = namespace
        self._rope = rope
        self._new_anchors: dict[str, Anchor] = {}                        # anchor id -> anchor, staging order
        self._deltas: dict[str, dict[str, ConsumerDeltas]] = {}          # anchor id -> consumer -> deltas
        self._activations: Counter[str] = Counter()
        self._sibling_anchors: dict[str, int] = {}                       # anchor id -> tokens (see adopt_anchor)
        self.state = "open"                                              # "open" | "committed" | "aborted"

    # ---- staging ------------------------------------------------------------------------------------------------
    def add_anchor(self, placeholder: str, base: KVSegment) -> str:
        """Stage a new anchor for `placeholder`; `base` is shifted to canonical position 0 if needed. Returns its id."""
        self._require_open()
        if not placeholder:
            raise ValueError("add_anchor: placeholder kind must be a non-empty string")
        if base.start != 0:
            base = base.shifted(self._require_rope("add_anchor with a base not at position 0"), 0)
        anchor_id = uuid.uuid4().hex
        self._new_anchors[anchor_id] = Anchor(
            anchor_id=anchor_id, placeholder=placeholder,
            base_keys=base.keys.detach().clone(), base_values=base.values.detach().clone())
        return anchor_id

    def add_deltas(self, anchor_id: str, consumer: str, ph_real: KVSegment, ph_base_rotated: KVSegment,
                   pf_real: KVSegment, pf_base: KVSegment, offset_error: float | None = None) -> None:
        """Stage `consumer`'s observed deltas for an anchor (staged here or already committed in this namespace).

        ph_real / ph_base_rotated: the placeholder's KV in the consumer's dense prefill and the anchor's base rotated
        to the same start; pf_real / pf_base: the same for the consumer's fixed segment right after it.
        offset_error: see `ConsumerDeltas.offset_error`.
        """
        self._require_open()
        anchor_tokens = self._anchor_tokens(anchor_id)
        for name, real, base in (("placeholder", ph_real, ph_base_rotated), ("following segment", pf_real, pf_base)):
            if real.keys.shape != base.keys.shape:
                raise ValueError(f"add_deltas({anchor_id}, {consumer}): {name} real KV {tuple(real.keys.shape)} "
                                 f"and base KV {tuple(base.keys.shape)} differ in shape")
            if real.start != base.start:
                raise ValueError(f"add_deltas({anchor_id}, {consumer}): {name} real KV starts at {real.start} "
                                 f"but its base was rotated to {base.start}")
        if ph_real.num_tokens != anchor_tokens:
            raise ValueError(f"add_deltas({anchor_id}, {consumer}): placeholder has {ph_real.num_tokens} tokens, "
                             f"the anchor has {anchor_tokens}")
        rerotate = self._pool.config.rerotate_deltas
        ph_key = _difference(ph_real.keys, ph_base_rotated.keys)     # [L, H, T, D]
        pf_key = _difference(pf_real.keys, pf_base.keys)             # [L, H, S, D]
        if rerotate:
            rope = self._require_rope("add_deltas in corrected mode (rerotate_deltas)")
            ph_key = rope.shift_keys(ph_key, -ph_real.start)
            pf_key = rope.shift_keys(pf_key, -pf_real.start)
        self._deltas.setdefault(anchor_id, {})[consumer] = ConsumerDeltas(
            ph_key=ph_key, ph_value=_difference(ph_real.values, ph_base_rotated.values),
            pf_key=pf_key, pf_value=_difference(pf_real.values, pf_base.values),
            ph_start=ph_real.start, pf_start=pf_real.start,
            rotated_base_key=None if rerotate else ph_base_rotated.keys.detach().clone(),
            keys_canonical=rerotate, offset_error=None if offset_error is None else float(offset_error))

    def adopt_anchor(self, anchor_id: str, num_tokens: int) -> None:
        """Let `add_deltas` name an anchor staged by a *sibling* transaction of the same job.

        On a cluster one job's turns run on several workers, each staging into its own transaction; the job's
        driver merges them into one commit. A consumer that prefills densely because of an anchor staged on
        another worker adopts it here (its id and token count), so its deltas can be staged against it. An
        adopted anchor is not part of this transaction's own staged anchors: the sibling commits it.
        """
        self._require_open()
        if num_tokens < 1:
            raise ValueError(f"adopt_anchor({anchor_id}): an anchor has at least one token, got {num_tokens}")
        self._sibling_anchors[anchor_id] = int(num_tokens)

    def activate(self, anchor_ids: Iterable[str]) -> None:
        """+1 activation for each id (applied at commit; ids evicted meanwhile are ignored)."""
        self._require_open()
        if isinstance(anchor_ids, str):
            raise TypeError(f"activate takes an iterable of anchor ids, got the single string {anchor_ids!r}")
        self._activations.update(anchor_ids)

    @property
    def staged_anchor_ids(self) -> tuple[str, ...]:
        return tuple(self._new_anchors)

    @property
    def is_empty(self) -> bool:
        return not (self._new_anchors or self._deltas or self._activations)

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _require_open(self) -> None:
        if self.state != "open":
            raise RuntimeError(f"transaction on namespace {self.namespace!r} is already {self.state}")

    def _require_rope(self, what: str) -> Rope:
        if self._rope is None:
            raise ValueError(f"{what} needs a Rope: construct AnchorPool(config, rope=Rope(spec))")
        return self._rope

    def _anchor_tokens(self, anchor_id: str) -> int:
        staged = self._new_anchors.get(anchor_id)
        if staged is not None:
            return staged.num_tokens
        if anchor_id in self._sibling_anchors:
            return self._sibling_anchors[anchor_id]
        committed = self._pool._find_committed(self.namespace, anchor_id)
        if committed is None:
            raise KeyError(f"anchor {anchor_id!r} is neither staged in this transaction nor committed in "
                           f"namespace {self.namespace!r}")
        return committed.num_tokens


def _difference(real: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """real - base, computed in fp32 and stored in the real KV's dtype."""
    return (real.float() - base.float()).to(real.dtype)


# ------------------------------------------------------------------------------------------------------------
# The pool
# ------------------------------------------------------------------------------------------------------------
class TransactionHost:
    """The transaction lifecycle every pool shares (the in-process `AnchorPool`, the Ray client
    `actors.anchor_pool_actor.RemoteAnchorPool`): begin, abort, and the committed-anchor lookup that
    `PoolTransaction.add_deltas` needs. Subclasses set `self.rope` and implement `snapshot` and `commit`."""

    rope: Rope | None

    def _find_committed(self, namespace: str, anchor_id: str) -> Anchor | None:
        return self.snapshot(namespace).anchor(anchor_id)

    def begin(self, namespace: str) -> PoolTransaction:
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty string, got {namespace!r}")
        return PoolTransaction(self, namespace, self.rope)

    def abort(self, txn: PoolTransaction) -> None:
        self._require_own_open(txn)
        txn.state = "aborted"

    def _require_own_open(self, txn: PoolTransaction) -> None:
        if txn._pool is not self:
            raise ValueError(f"transaction belongs to another pool than this {type(self).__name__}")
        txn._require_open()


class AnchorPool(TransactionHost):
    """Namespaced anchor pool: versioned copy-on-write state behind one lock.

    Readers (`snapshot`) take the lock only to read one reference. Writers (`commit`) hold it while they
    rearrange references (no tensor math), so neither blocks the other for long, and commits apply under
    continuous load. Bounds, applied at every commit:
      * per (namespace, placeholder): while more than V (`config.max_anchors`) anchors, evict the least activated
        among the W (`config.window`) oldest, first on ties; anchors inserted by this very commit are passed over
        while others remain (the reference evicts before inserting).
      * whole pool: while the tensor bytes exceed `config.pool_byte_budget`, evict by the same rule from the
        (namespace, placeholder) list holding the most bytes.
    Unlike the reference (which peaks at V + 1), a list never holds more than V anchors after a commit.

    `rope` is needed only to store deltas at canonical positions (corrected mode) or to move a base not given at
    position 0.
    """

    def __init__(self, config: KVCommConfig, rope: Rope | None = None):
        self.config = config
        self.rope = rope
        self._lock = threading.Lock()
        self._state = _PoolState(version=0, namespaces=MappingProxyType({}), total_bytes=0)
        self._next_seq = 0
        self._evictions: Counter[str] = Counter()         # reason ("count" | "bytes") -> anchors evicted
        self._stale_updates = 0                           # deltas/activations whose anchor was gone at commit

    # ---- reading ------------------------------------------------------------------------------------------------
    def snapshot(self, namespace: str) -> PoolSnapshot:
        with self._lock:
            state = self._state
        return PoolSnapshot(namespace=namespace, version=state.version,
                            lists=state.namespaces.get(namespace, MappingProxyType({})),
                            namespaces=tuple(state.namespaces))

    @property
    def version(self) -> int:
        return self._state.version

    def stats(self) -> dict[str, Any]:
        with self._lock:
            state = self._state
            evictions = dict(self._evictions)
            stale = self._stale_updates
        return {
            "version": state.version,
            "total_bytes": state.total_bytes,
            "byte_budget": self.config.pool_byte_budget,
            "evictions": {"count": evictions.get("count", 0), "bytes": evictions.get("bytes", 0)},
            "stale_updates": stale,
            "namespaces": {ns: {ph: {"anchors": len(anchors), "bytes": sum(a.nbytes for a in anchors)}
                                for ph, anchors in lists.items()}
                           for ns, lists in state.namespaces.items()},
        }

    # ---- writing (begin / abort: TransactionHost) ---------------------------------------------------------------
    def commit(self, txn: PoolTransaction) -> int:
        """Publish `txn` atomically, apply the bounds, and return the new version (unchanged for an empty txn)."""
        self._require_own_open(txn)
        txn.state = "committed"
        if txn.is_empty:
            return self._state.version
        with self._lock:
            state = self._state
            namespaces = dict(state.namespaces)
            lists = {ph: list(anchors) for ph, anchors in namespaces.get(txn.namespace, {}).items()}
            activations = Counter(txn._activations)
            # 1. new anchors, in staging order, with their own deltas and activations
            for anchor_id, staged in txn._new_anchors.items():
                anchor = replace(staged, inserted_seq=self._next_seq, activation_count=activations.pop(anchor_id, 0))
                self._next_seq += 1
                for consumer, deltas in txn._deltas.get(anchor_id, {}).items():
                    anchor = with_consumer_deltas(anchor, consumer, deltas)
                lists.setdefault(anchor.placeholder, []).append(anchor)
            # 2. deltas and activations for anchors committed earlier (gone ones are counted as stale)
            updates = {anchor_id: per_consumer for anchor_id, per_consumer in txn._deltas.items()
                       if anchor_id not in txn._new_anchors}
            touched = {a.placeholder for a in txn._new_anchors.values()}
            for ph, anchors in lists.items():
                for index, anchor in enumerate(anchors):
                    changed = anchor
                    for consumer, deltas in updates.pop(anchor.anchor_id, {}).items():
                        changed = with_consumer_deltas(changed, consumer, deltas)
                    count = activations.pop(anchor.anchor_id, 0)
                    if count:
                        changed = replace(changed, activation_count=changed.activation_count + count)
                    if changed is not anchor:
                        anchors[index] = changed
                        touched.add(ph)
            self._stale_updates += len(updates) + len(activations)
            # 3. the per-placeholder bound V
            protected = frozenset(txn._new_anchors)
            for ph in touched:
                anchors = lists[ph]
                while len(anchors) > self.config.max_anchors:
                    anchors.pop(choose_victim(anchors, self.config.window, protected))
                    self._evictions["count"] += 1
            namespaces[txn.namespace] = MappingProxyType({ph: tuple(a) for ph, a in lists.items() if a})
            # 4. the global byte budget
            namespaces, total_bytes = self._apply_byte_budget(namespaces, protected)
            self._state = _PoolState(version=state.version + 1, namespaces=MappingProxyType(namespaces),
                                     total_bytes=total_bytes)
            return self._state.version

    def drop_namespace(self, namespace: str) -> int:
        """Forget every anchor of `namespace`; returns the new version (unchanged if it held nothing)."""
        with self._lock:
            state = self._state
            if namespace not in state.namespaces:
                return state.version
            namespaces = {ns: lists for ns, lists in state.namespaces.items() if ns != namespace}
            dropped = sum(a.nbytes for anchors in state.namespaces[namespace].values() for a in anchors)
            self._state = _PoolState(version=state.version + 1, namespaces=MappingProxyType(namespaces),
                                     total_bytes=state.total_bytes - dropped)
            return self._state.version

    def restore(self, namespaces: Mapping[str, Mapping[str, Sequence[Anchor]]], version: int = 0) -> int:
        """Replace the whole pool by `namespaces` (namespace -> placeholder -> anchors in insertion order, e.g.
        read back from a snapshot file) at `version`, then apply the bounds as a commit does (the config may
        have shrunk since the anchors were saved); returns the version. Anchors keep their ids, activation
        counts, insertion order and last writers."""
        with self._lock:
            restored: dict[str, _PlaceholderLists] = {}
            next_seq = self._next_seq
            for ns, lists in namespaces.items():
                kept = {}
                for ph, anchors in lists.items():
                    anchors = list(anchors)
                    while len(anchors) > self.config.max_anchors:
                        anchors.pop(choose_victim(anchors, self.config.window))
                        self._evictions["count"] += 1
                    if anchors:
                        kept[ph] = tuple(anchors)
                        next_seq = max(next_seq, 1 + max(a.inserted_seq for a in anchors))
                if kept:
                    restored[ns] = MappingProxyType(kept)
            restored, total_bytes = self._apply_byte_budget(restored, frozenset())
            self._next_seq = next_seq
            self._state = _PoolState(version=int(version), namespaces=MappingProxyType(restored),
                                     total_bytes=total_bytes)
            return self._state.version

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _apply_byte_budget(self, namespaces: dict[str, _PlaceholderLists],
                           protected: frozenset[str]) -> tuple[dict[str, _PlaceholderLists], int]:
        """Evict until the pool fits the byte budget; returns the new namespace map and its total bytes."""
        list_bytes = {(ns, ph): sum(a.nbytes for a in anchors)
                      for ns, lists in namespaces.items() for ph, anchors in lists.items()}
        total = sum(list_bytes.values())
        budget = self.config.pool_byte_budget
        if total <= budget:
            return namespaces, total
        working = {ns: dict(lists) for ns, lists in namespaces.items()}
        while total > budget and list_bytes:
            ns, ph = max(list_bytes, key=list_bytes.__getitem__)
            anchors = list(working[ns][ph])
            victim = anchors.pop(choose_victim(anchors, self.config.window, protected))
            self._evictions["bytes"] += 1
            total -= victim.nbytes
            list_bytes[(ns, ph)] -= victim.nbytes
            if anchors:
                working[ns][ph] = tuple(anchors)
            else:
                del working[ns][ph]
                del list_bytes[(ns, ph)]
        return {ns: MappingProxyType(lists) for ns, lists in working.items()}, total
