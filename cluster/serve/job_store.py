"""`JobStore`: the jobs of the HTTP service, in one detached actor that outlives every ingress replica.

An ingress replica keeps nothing about a job that another replica could not read back here: its owner (for
access checks), its spec, its status, its numbered events, its result or error, and which ingress replica drives
it under a lease. So any ingress replica serves any job id, an events stream resumes from ``Last-Event-ID`` on
another replica, and a job whose driving replica died (its lease not renewed for ``lease_s``) is claimed by a live
one and run again from its record (`claim_orphans`), announced by a ``retry`` event.

* Jobs move ``queued -> running -> succeeded | failed | cancelled``; `cancel` marks a job cancelled at once, and
  the driver learns it from its next `renew` (it then stops the job's turns). Events of a job that is no longer
  driven by the caller (lease lost, cancelled) are refused, so a stale driver cannot write into a job another
  replica took over.
* At most ``max_jobs_kept`` finished jobs are kept; the one finished longest ago is forgotten first.
* With ``snapshot_path`` (a path every node sees), the whole store is saved there with msgpack at most every
  ``snapshot_every_s`` after a change, atomically (a temporary file renamed over the last), and loaded when the
  actor (re)starts: Ray restarts it (``max_restarts=-1``) on a surviving node after a crash. A running job read
  back from the snapshot stays its driver's: only when no renewal came for two leases after the restart does a
  live replica claim it (the restart must not hand live jobs to whichever replica asks first).
* A job's end is durable at once: its whole record is appended to a journal beside the snapshot
  (``<snapshot>.ends``, flushed and synced) before the call returns, and replayed over the snapshot on load; a
  save empties it. Without it a crash within ``snapshot_every_s`` of an end read the job back as running, and a
  live replica ran it again (in kvcomm mode committing its anchors twice). Saving the whole snapshot on every
  end would rewrite every record per job.

Why an actor and not a database: it needs no service besides Ray (and reads as fast as an actor call), Ray
restarts it, and the snapshot gives it durability across a restart; the records are small (turn texts and token
ids, no KV). A deployment that must survive the loss of the Ray head node would put these records in a database
it already runs; `JobStore`'s methods are the interface to keep.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from pathlib import Path
from typing import Any

import msgpack

from .job_events import CancelledEvent, RetryEvent

log = logging.getLogger(__name__)

FINISHED = ("succeeded", "failed", "cancelled")
_SNAPSHOT_VERSION = 1


class JobStore:
    """See the module docstring. Records are plain dicts: ``id``, ``owner``, ``spec``, ``spec_id``, ``mode``,
    ``namespace``, ``status``, ``created_at``, ``finished_at``, ``events`` [(number, kind, data): a
    `cluster.serve.job_events` event's kind and wire form], ``result``, ``error``, ``driver``, ``lease_until``,
    ``attempts``."""

    def __init__(self, max_jobs_kept: int = 1000, snapshot_path: str | None = None, snapshot_every_s: float = 2.0):
        self.max_jobs_kept = max_jobs_kept
        self.snapshot_path = Path(snapshot_path).expanduser() if snapshot_path else None
        self.snapshot_every_s = snapshot_every_s
        self._jobs: dict[str, dict[str, Any]] = {}
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._changed: dict[str, asyncio.Event] = {}
        self._dirty = False
        self._saver: asyncio.Task | None = None
        self.saves = 0
        self._started = time.time()   # a running job loaded from the snapshot is claimable two leases after this
        self.journal_path = None if self.snapshot_path is None else \
            self.snapshot_path.with_name(self.snapshot_path.name + ".ends")
        if self.snapshot_path is not None:
            if self.snapshot_path.exists():
                self._load()
            self._replay_ends()

    # ---- jobs ---------------------------------------------------------------------------------------------------
    async def create(self, record: dict[str, Any], driver: str, lease_s: float) -> None:
        """Keep a new job, driven by `driver` under a lease of `lease_s`."""
        job = dict(record)
        job.update(status="running", events=[], result=None, error=None, finished_at=None, driver=driver,
                   lease_until=time.time() + lease_s, attempts=1)
        self._jobs[job["id"]] = job
        self._touch(job["id"])

    async def get(self, job_id: str, with_events: bool = False) -> dict[str, Any] | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        out = {k: v for k, v in job.items() if k != "events"}
        out["turns_done"] = _turns_done(job["events"])
        out["last_event"] = job["events"][-1][0] if job["events"] else 0
        if with_events:
            out["events"] = list(job["events"])
        return out

    async def append(self, job_id: str, driver: str, kind: str, data: dict[str, Any]) -> int | None:
        """Add an event (a `JobEvent`'s `kind` and `to_dict()`: the store receives and keeps wire forms only) to a
        job `driver` drives; its number, or None when `driver` no longer drives it."""
        job = self._jobs.get(job_id)
        if job is None or job["driver"] != driver or job["status"] in FINISHED:
            return None
        number = _add_event(job, kind, data)
        self._touch(job_id)
        return number

    async def finish(self, job_id: str, driver: str, status: str, result: dict[str, Any] | None,
                     error: dict[str, Any] | None) -> bool:
        """Record a job's end (`status` in FINISHED); False when `driver` no longer drives it (nothing changes)."""
        if status not in FINISHED:
            raise ValueError(f"status must be one of {FINISHED}, got {status!r}")
        job = self._jobs.get(job_id)
        if job is None or job["driver"] != driver or job["status"] in FINISHED:
            return False
        self._end(job, status, result, error)
        return True

    async def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Mark a running job cancelled (its driver stops it on its next `renew`); the job after the call."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if job["status"] not in FINISHED:
            cancelled = CancelledEvent(job=job_id)
            _add_event(job, cancelled.kind, cancelled.to_dict())
            self._end(job, "cancelled", None, {"status": 499, "message": "job: cancelled by the client",
                                               "type": "cancelled", "param": None, "code": "cancelled"})
        return await self.get(job_id)

    async def events(self, job_id: str, after: int = 0, timeout_s: float = 15.0) -> dict[str, Any] | None:
        """The job's events numbered above `after`, waiting up to `timeout_s` for one when there is none yet
        and the job has not finished: ``{"events": [...], "done": bool}`` (None: no such job)."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if not _after(job["events"], after) and job["status"] not in FINISHED:
            event = self._changed.setdefault(job_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), timeout=timeout_s)
            except asyncio.TimeoutError:
                pass
            job = self._jobs.get(job_id)
            if job is None:
                return None
        return {"events": _after(job["events"], after), "done": job["status"] in FINISHED}

    # ---- drivers and leases -------------------------------------------------------------------------------------
    async def renew(self, driver: str, job_ids: list[str], lease_s: float) -> list[str]:
        """Extend `driver`'s leases on `job_ids`; the ones it must stop (cancelled, finished, or taken over)."""
        stop = []
        until = time.time() + lease_s
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is None or job["driver"] != driver or job["status"] in FINISHED:
                stop.append(job_id)
            else:
                job["lease_until"] = until
        return stop

    async def claim_orphans(self, driver: str, lease_s: float, limit: int) -> list[dict[str, Any]]:
        """Take over (up to `limit`) running jobs whose driver's lease ran out: each is now `driver`'s, with a
        ``retry`` event, and is run again from its spec."""
        now = time.time()
        claimed = []
        for job in self._jobs.values():
            if len(claimed) >= limit:
                break
            # a job loaded from the snapshot (lease_until 0): a live driver renews it within two leases of the
            # restart (its renewals fail while the store restarts and are tried again the next period)
            expires = job["lease_until"] or self._started + 2 * lease_s
            if job["status"] in FINISHED or expires > now:
                continue
            previous = job["driver"]
            job.update(driver=driver, lease_until=now + lease_s, attempts=job["attempts"] + 1)
            retry = RetryEvent(job=job["id"], reason=f"its ingress replica {previous} stopped answering",
                               attempt=job["attempts"])
            _add_event(job, retry.kind, retry.to_dict())
            self._touch(job["id"])
            claimed.append({k: v for k, v in job.items() if k != "events"})
        return claimed

    async def find(self, spec_id: str) -> list[str]:
        """Ids of the jobs submitted with this spec ``id`` (oldest first)."""
        return [job_id for job_id, job in self._jobs.items() if job["spec_id"] == spec_id]

    async def stats(self) -> dict[str, Any]:
        counts = collections.Counter(job["status"] for job in self._jobs.values())
        return {"jobs": len(self._jobs), "by_status": dict(counts), "saves": self.saves,
                "snapshot_path": str(self.snapshot_path) if self.snapshot_path else None}

    async def ping(self) -> str:
        return "ok"

    async def flush(self) -> None:
        """Save the snapshot now (when configured)."""
        if self.snapshot_path is not None:
            self._save()

    # ---- internals ----------------------------------------------------------------------------------------------
    def _end(self, job: dict[str, Any], status: str, result: Any, error: Any) -> None:
        job.update(status=status, result=result, error=error, finished_at=time.time(), lease_until=0.0)
        self._journal_end(job)
        self._keep_finished(job["id"])
        self._touch(job["id"])

    def _keep_finished(self, job_id: str) -> None:
        """`job_id` is the latest finished job; forget the ones finished longest ago beyond `max_jobs_kept`."""
        self._finished[job_id] = None
        self._finished.move_to_end(job_id)
        while len(self._finished) > self.max_jobs_kept:
            oldest, _ = self._finished.popitem(last=False)
            self._jobs.pop(oldest, None)
            self._changed.pop(oldest, None)

    def _journal_end(self, job: dict[str, Any]) -> None:
        """Append the finished job's whole record to the journal, synced (module docstring)."""
        if self.journal_path is None:
            return
        try:
            record = msgpack.packb(job, use_bin_type=True)
            with open(self.journal_path, "ab") as journal:
                start = journal.tell()
                try:
                    journal.write(record)
                    journal.flush()
                    os.fsync(journal.fileno())
                except OSError:
                    journal.truncate(start)     # no torn record for the next end to be read into
                    raise
        except (OSError, ValueError, TypeError) as exc:
            log.warning("job store: the end of %s not journaled to %s (%s); the next snapshot keeps it", job["id"],
                        self.journal_path, exc)

    def _replay_ends(self) -> None:
        """Apply the journaled ends over what the snapshot held, in order; a torn last record is ignored."""
        if self.journal_path is None or not self.journal_path.exists():
            return
        replayed, good = 0, 0
        try:
            with self.journal_path.open("r+b") as journal:
                unpacker = msgpack.Unpacker(journal, raw=False, strict_map_key=False)
                try:
                    for job in unpacker:
                        if not (isinstance(job, dict) and isinstance(job.get("id"), str)
                                and isinstance(job.get("events"), list) and job.get("status") in FINISHED):
                            raise ValueError("not a finished job's record")
                        job["events"] = [tuple(e) for e in job["events"]]
                        self._jobs[job["id"]] = job
                        self._keep_finished(job["id"])
                        replayed, good = replayed + 1, unpacker.tell()
                except (ValueError, TypeError, msgpack.UnpackException) as exc:
                    log.warning("job store: journal %s has a bad record after %d ends (%s); dropped from there",
                                self.journal_path, replayed, exc)
                journal.truncate(good)          # a torn tail (a crash mid-write) is cut, not read into later ends
        except OSError as exc:
            log.warning("job store: journal %s not read (%s)", self.journal_path, exc)
        self._dirty = self._dirty or replayed > 0
        log.info("job store: %d job ends replayed from %s", replayed, self.journal_path)

    def _touch(self, job_id: str) -> None:
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()                 # wake every `events` call waiting on this job
        self._dirty = True
        if self.snapshot_path is not None and (self._saver is None or self._saver.done()):
            self._saver = asyncio.get_running_loop().create_task(self._save_soon())

    async def _save_soon(self) -> None:
        await asyncio.sleep(self.snapshot_every_s)
        self._save()

    def _save(self) -> None:
        if not self._dirty or self.snapshot_path is None:
            return
        self._dirty = False
        state = {"version": _SNAPSHOT_VERSION, "jobs": list(self._jobs.values()), "finished": list(self._finished)}
        path = self.snapshot_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            tmp.write_bytes(msgpack.packb(state, use_bin_type=True))
            os.replace(tmp, path)
            self.saves += 1
        except OSError as exc:
            self._dirty = True
            log.warning("job store: snapshot not saved to %s (%s)", path, exc)
            return
        if self.journal_path is not None:
            try:
                self.journal_path.unlink(missing_ok=True)     # every end it held is in the snapshot now
            except OSError as exc:                            # replayed again on load: harmless
                log.warning("job store: journal %s not emptied (%s)", self.journal_path, exc)

    def _load(self) -> None:
        try:
            state = msgpack.unpackb(self.snapshot_path.read_bytes(), raw=False, strict_map_key=False)
            if state.get("version") != _SNAPSHOT_VERSION:
                raise ValueError(f"snapshot version {state.get('version')!r}, expected {_SNAPSHOT_VERSION}")
        except (OSError, ValueError, msgpack.UnpackException) as exc:
            log.warning("job store: snapshot %s not loaded (%s); starting empty", self.snapshot_path, exc)
            return
        for job in state["jobs"]:
            job["events"] = [tuple(e) for e in job["events"]]
            if job["status"] not in FINISHED:
                job["lease_until"] = 0.0      # unknown: its driver renews it, or two leases after the restart
                                              # a live replica claims it (`claim_orphans`)
            self._jobs[job["id"]] = job
        for job_id in state["finished"]:
            if job_id in self._jobs:
                self._finished[job_id] = None
        log.info("job store: %d jobs loaded from %s", len(self._jobs), self.snapshot_path)


def _add_event(job: dict[str, Any], kind: str, data: dict[str, Any]) -> int:
    """Append an event to the job's events in its stored form, (number, kind, data); the event's number."""
    number = (job["events"][-1][0] if job["events"] else 0) + 1
    job["events"].append((number, kind, data))
    return number


def _after(events: list[tuple[int, str, Any]], after: int) -> list[tuple[int, str, Any]]:
    return [e for e in events if e[0] > after]


def _turns_done(events: list[tuple[int, str, Any]]) -> int:
    """Turns finished by the job's current run (a job-level ``retry`` event, a new driver, starts it again; a
    turn-level one, ``scope: turn``, only resends the turn that was lost)."""
    done = 0
    for _, name, data in events:
        if name == "retry" and data.get("scope") != "turn":
            done = 0
        else:
            done += name == "turn"
    return done


def get_or_create_job_store(name: str, namespace: str, *, max_jobs_kept: int, snapshot_path: str | None,
                            snapshot_every_s: float) -> Any:
    """The named, detached job store (created with these settings if it does not exist yet; scheduled outside
    any placement group, so no Serve replica's lifetime is tied to it)."""
    import ray
    return ray.remote(JobStore).options(
        name=name, namespace=namespace, lifetime="detached", get_if_exists=True, num_cpus=0, max_restarts=-1,
        max_task_retries=-1, max_concurrency=1000, scheduling_strategy="DEFAULT",
    ).remote(max_jobs_kept, snapshot_path, snapshot_every_s)
