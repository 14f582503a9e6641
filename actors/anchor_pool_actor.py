"""The cluster's one anchor pool as a Ray actor: `AnchorPoolActor`, what it is built for (`PoolSpec`), and its
snapshot file (`PoolSnapshotSettings`, `SnapshotSaver`).

* `AnchorPoolActor` wraps `actors.pool_state.AnchorPoolState` (metadata and one ObjectRef per tensor part). It is
  a *threaded* actor (`POOL_MAX_CONCURRENCY` calls at once): snapshots, commits, stats and saves overlap, and the
  state's lock is held only to rearrange references, so a large commit's copy or a slow save never delays
  another worker's snapshot. Workers send the numpy payload *in* the commit call and the actor `ray.put`s it
  itself: the actor owns every anchor object, so anchors survive the loss of the worker that recorded them (a
  ref put by a worker dies with that worker). `ray.put(..., _owner=actor)` from the worker would save that copy,
  but would leave the only copy in the worker's node's object store: see ARCHITECTURE.md, "The anchor pool".
* `PoolSpec`: one pool's name, Ray namespace, lifetime and what it was built for (the model, the algorithm's
  settings, the snapshot settings). Built in one place (`cluster.config.ClusterConfig.pool_spec`) and used by
  everyone who creates or joins the pool (the Serve ingress, the batch runner, every worker), so nobody's
  settings are silently dropped: `get_or_create_pool_actor` compares the existing actor's fingerprint with its
  own and raises `PoolMismatchError`, naming both, when they differ. The actor is created with
  ``scheduling_strategy="DEFAULT"``: never inside the placement group of the replica or task that creates it, so
  a Serve downscale does not take it.
* Snapshots (optional): the actor loads its file when it is constructed (Ray restarts a crashed pool by
  constructing it again) and a `SnapshotSaver` thread saves after every N commits or T seconds with changes, off
  the actor's call path, and on graceful termination (`__ray_shutdown__`). A snapshot that cannot be used
  (corrupt, another format, another deployment's `tag`) is moved aside with a warning and the pool starts empty.

The worker-side client is `actors.pool_client.RemoteAnchorPool`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from kvcomm.config import KVCommConfig

from .pool_state import AnchorPoolState, merge_payloads

log = logging.getLogger(__name__)

DEFAULT_POOL_ACTOR_NAME = "kvcomm-anchor-pool"
DEFAULT_RAY_NAMESPACE = "kvcomm"
POOL_MAX_CONCURRENCY = 64     # actor calls served at once (threads); the state's lock serializes only bookkeeping


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
        self._count_lock = threading.Lock()            # the unsaved-change counters
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
        with self._count_lock:               # commits arrive on several actor threads at once
            self._unsaved += 1
            if self._dirty_since is None:
                self._dirty_since = time.monotonic()
            due = self._unsaved >= self.settings.every_commits
        if due:
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
            with self._count_lock:
                unsaved, self._unsaved, self._dirty_since = self._unsaved, 0, None
            try:
                info = self.state.save(self.settings.path, tag=self.settings.tag)
            except Exception as exc:  # noqa: BLE001 - a failed save loses no anchors in memory; retried later
                with self._count_lock:
                    self._unsaved += unsaved
                    self._dirty_since = time.monotonic()
                self.save_errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("anchor pool snapshot to %s failed (%s); retrying in %.0f s", self.settings.path,
                            self.last_error, self.settings.every_s)
                return None
            self._saved_version = info["version"]
            if self.state.version != info["version"]:      # committed while writing: still unsaved
                with self._count_lock:
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


@dataclass(frozen=True)
class PoolSpec:
    """One anchor pool: where it lives, how it lives, and what it was built for (see the module docstring)."""
    name: str = DEFAULT_POOL_ACTOR_NAME
    ray_namespace: str = DEFAULT_RAY_NAMESPACE
    model: str = ""                                   # the model it holds anchors of (name, weights, dtype, device)
    kvcomm: KVCommConfig = dataclasses.field(default_factory=KVCommConfig)
    snapshot: PoolSnapshotSettings | None = None
    detached: bool = False                            # outlives its creator (Serve: always)
    max_restarts: int = -1                            # a crashed pool comes back (from its snapshot, if any)
    num_cpus: float = 0                               # the CPUs Ray reserves for it (0: it packs anywhere)
    nice: int = 0                                     # its process's CPU priority below the workers' (os.nice):
                                                      # a busy pool yields a shared core to decoding

    def fingerprint(self) -> dict[str, Any]:
        """What must agree between the pool and everyone who joins it (not its lifetime options)."""
        return {"model": self.model, "kvcomm": self.kvcomm.to_dict(),
                "snapshot": None if self.snapshot is None else dataclasses.asdict(self.snapshot)}


class PoolMismatchError(ValueError):
    """A pool of this name exists but was built for another model or other settings."""

    def __init__(self, spec: PoolSpec, existing: dict[str, Any] | None):
        ours = spec.fingerprint()
        if existing is None:
            detail = "it reports no fingerprint (an older build)"
        else:
            detail = "; ".join(f"{key}: pool has {theirs!r}, this deployment wants {mine!r}"
                               for key, theirs, mine in _differences(existing, ours))
        super().__init__(f"anchor pool {spec.name!r} (Ray namespace {spec.ray_namespace!r}) was built for "
                         f"{(existing or {}).get('model')!r}, this deployment is {ours['model']!r}: {detail}. Use "
                         f"another pool_actor_name, or stop the old pool (kvcomm serve shutdown / ray.kill)")


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append((prefix + key, x, y))
    return out


class AnchorPoolActor:
    """The Ray actor around `AnchorPoolState` (threaded: see the module docstring); it owns every tensor object.

    With snapshot settings it starts from the snapshot file when there is one and keeps it up to date (see
    `SnapshotSaver`); Ray's restart of a crashed pool constructs it again, so it comes back with its anchors.
    """

    def __init__(self, spec: PoolSpec | None = None):
        import ray
        spec = spec or PoolSpec()
        self._fingerprint = spec.fingerprint()
        self._state = AnchorPoolState(spec.kvcomm, put=ray.put, get=ray.get)
        self._saver = None if spec.snapshot is None else SnapshotSaver(self._state, spec.snapshot)
        self._started = time.time()
        self._placement_group = ray.get_runtime_context().get_placement_group_id()
        if spec.nice:
            os.nice(spec.nice)        # this actor's own process: every thread serving calls runs at that priority

    def fingerprint(self) -> dict[str, Any]:
        return self._fingerprint

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
        stats["model"] = self._fingerprint["model"]
        stats["threads"] = threading.active_count()
        stats["nice"] = os.nice(0)                              # its process's CPU priority (spec.nice added)
        stats["pid"] = os.getpid()
        stats["placement_group"] = self._placement_group       # None: outside every placement group
        stats["snapshot"] = None if self._saver is None else self._saver.stats()
        return stats

    def ping(self) -> str:
        return "ok"


def get_or_create_pool_actor(spec: PoolSpec, timeout_s: float = 60.0) -> tuple[Any, bool]:
    """The pool `spec` names: (handle, created). An existing pool is joined only when it was built for the same
    model and settings (`PoolMismatchError` otherwise, naming both).

    The actor asks for no CPU (it only rearranges metadata), so it never takes a worker's slot, and is placed
    with the default strategy, outside any placement group its creator runs in. Without snapshot settings a
    restarted actor comes back empty (workers then prefill densely until anchors are learned again); with
    them, it comes back with the anchors of its last saved snapshot.
    """
    import ray
    created = False
    try:
        handle = ray.get_actor(spec.name, namespace=spec.ray_namespace)
    except ValueError:
        options: dict[str, Any] = dict(name=spec.name, namespace=spec.ray_namespace, num_cpus=spec.num_cpus,
                                       max_restarts=spec.max_restarts, max_concurrency=POOL_MAX_CONCURRENCY,
                                       get_if_exists=True, scheduling_strategy="DEFAULT")
        if spec.detached:
            options["lifetime"] = "detached"
        handle = ray.remote(AnchorPoolActor).options(**options).remote(spec)
        created = True
    _check_fingerprint(handle, spec, timeout_s)
    return handle, created


def join_pool_actor(spec: PoolSpec, timeout_s: float = 60.0) -> Any | None:
    """The existing pool `spec` names (checked as `get_or_create_pool_actor` does), or None when there is none."""
    import ray
    try:
        handle = ray.get_actor(spec.name, namespace=spec.ray_namespace)
    except ValueError:
        return None
    _check_fingerprint(handle, spec, timeout_s)
    return handle


def _check_fingerprint(handle: Any, spec: PoolSpec, timeout_s: float) -> None:
    import ray
    try:
        existing = ray.get(handle.fingerprint.remote(), timeout=timeout_s)
    except AttributeError:       # an actor of an older build has no such method
        existing = None
    if existing != spec.fingerprint():
        raise PoolMismatchError(spec, existing)
