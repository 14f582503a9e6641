"""`ClusterRunner`: runs multi-agent jobs on a pool of `AgentWorker`s placed on a Ray cluster.

This module owns the cluster's lifecycle and routing: `start()` places one bundle per worker (cluster.placement),
creates (or joins) the named `AnchorPoolActor` and starts the workers in their bundles; `submit`/`run_job`
route a job to one worker, which runs it whole with continuous batching; `run_jobs` keeps many jobs in flight
and yields each result as it finishes (a failed job becomes an error record, the batch goes on); `shutdown()`
kills what `start()` created and removes the placement group.

Routing. A job goes to the worker that last ran its namespace (that worker holds the namespace's anchors in its
cache) unless that worker runs more than `affinity_slack` jobs more than the least loaded one; otherwise, and
for a new namespace, to the least loaded worker (jobs in flight from this runner, ties to the worker idle
longest). A job whose worker died is resubmitted to another worker up to `job_retries` times.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from actors.agent_worker import start_agent_worker
from actors.anchor_pool_actor import get_or_create_pool_actor
from kvcomm.harness.jobs import JobSpec, JobSpecError

from .config import ClusterConfig
from .placement import bundle_strategy, create_worker_placement_group, remove_placement_group

log = logging.getLogger(__name__)
_WORKER_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


class ClusterNotStarted(RuntimeError):
    """The runner was used before `start()` or after `shutdown()`."""


@dataclass
class JobTicket:
    """One submitted job: its id, its dict, the worker running it and the pending result."""
    job_id: str
    job: dict[str, Any]
    mode: str | None
    worker: int
    ref: Any
    attempts: int = 1
    submitted_at: float = field(default_factory=time.perf_counter)


def job_as_dict(job: JobSpec | Mapping[str, Any]) -> dict[str, Any]:
    """A validated job as a plain dict (what crosses to a worker); raises `JobSpecError` naming the field."""
    if isinstance(job, JobSpec):
        return job.to_dict()
    return JobSpec.from_dict(dict(job)).to_dict()


def error_message(exc: BaseException) -> str:
    """One line: the exception a worker raised (not Ray's wrapper and traceback)."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


class ClusterRunner:
    """Agent workers in a placement group, the anchor-pool actor, and job routing; a context manager."""

    def __init__(self, config: ClusterConfig | None = None):
        self.config = config or ClusterConfig()
        self.workers: list[Any] = []
        self.pool_actor: Any = None
        self._pool_created = False
        self._group = None
        self._inflight: dict[Any, int] = {}          # result ref -> worker index
        self._affinity: dict[str, int] = {}          # namespace -> worker that last ran it
        self._last_assigned: list[float] = []
        self.jobs_submitted = 0
        self.jobs_resubmitted = 0

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> "ClusterRunner":
        if not ray.is_initialized():
            raise ClusterNotStarted("Ray is not initialized: call ray.init(...) (or use `kvcomm submit`, which "
                                    "connects or starts a local cluster) before ClusterRunner.start()")
        if self.workers:
            return self
        cfg = self.config
        tag = uuid.uuid4().hex[:8]
        try:
            self._group = create_worker_placement_group(cfg, name=f"kvcomm-workers-{tag}")
            # a crashed pool comes back empty (restarts are free); workers then prefill densely and relearn
            self.pool_actor, self._pool_created = get_or_create_pool_actor(
                cfg.kvcomm.to_kvcomm(), name=cfg.pool_actor_name, namespace=cfg.ray_namespace,
                detached=cfg.pool_detached, max_restarts=-1)
            _warn_if_pool_outgrows_object_store(cfg)
            settings = cfg.worker_settings()
            self.workers = [
                start_agent_worker(settings, f"worker-{i}", num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker,
                                   max_restarts=cfg.worker_max_restarts, max_task_retries=cfg.worker_max_task_retries,
                                   scheduling_strategy=bundle_strategy(self._group, i))
                for i in range(cfg.num_workers)]
            ray.get([w.ping.remote() for w in self.workers] + [self.pool_actor.ping.remote()],
                    timeout=cfg.worker_start_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self._last_assigned = [0.0] * len(self.workers)
        return self

    def shutdown(self) -> None:
        """Kill the workers and (unless detached or joined) the pool actor; remove the placement group."""
        handles = list(self.workers)
        for worker in handles:
            _kill(worker)
        pool = self.pool_actor
        kill_pool = pool is not None and self._pool_created and not self.config.pool_detached
        if kill_pool:
            _kill(pool)
        self.workers, self.pool_actor, self._pool_created = [], None, False
        self._inflight.clear()
        self._affinity.clear()
        remove_placement_group(self._group)
        self._group = None
        _await_gone(handles + ([pool] if kill_pool else []), timeout_s=10.0)

    def __enter__(self) -> "ClusterRunner":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    # ---- routing ------------------------------------------------------------------------------------------------
    def _require_started(self) -> None:
        if not self.workers:
            raise ClusterNotStarted("the cluster runner is not started (call start() or use it as a context manager)")

    def inflight_per_worker(self) -> list[int]:
        """Jobs this runner has in flight on each worker (finished ones pruned)."""
        if self._inflight:
            refs = list(self._inflight)
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            for ref in done:
                self._inflight.pop(ref, None)
        counts = [0] * len(self.workers)
        for index in self._inflight.values():
            counts[index] += 1
        return counts

    def choose_worker(self, namespace: str, exclude: Iterable[int] = ()) -> int:
        """The worker for a job of `namespace` (see the module docstring)."""
        self._require_started()
        excluded = set(exclude)
        candidates = [i for i in range(len(self.workers)) if i not in excluded] or list(range(len(self.workers)))
        counts = self.inflight_per_worker()
        least = min(counts[i] for i in candidates)
        preferred = self._affinity.get(namespace)
        if preferred in candidates and counts[preferred] <= least + self.config.affinity_slack:
            return preferred
        return min(candidates, key=lambda i: (counts[i], self._last_assigned[i]))

    # ---- jobs ---------------------------------------------------------------------------------------------------
    def submit(self, job: JobSpec | Mapping[str, Any], mode: str | None = None, *,
               worker: int | None = None) -> JobTicket:
        """Validate `job` and start it on the routed worker (or on worker index `worker`);
        `ray.get(ticket.ref)` is its result dict."""
        self._require_started()
        if worker is not None and not 0 <= worker < len(self.workers):
            raise ValueError(f"worker must be in [0, {len(self.workers)}), got {worker}")
        data = job_as_dict(job)
        return self._dispatch(data, mode, worker=worker)

    def _dispatch(self, data: dict[str, Any], mode: str | None, *, worker: int | None = None,
                  exclude: Iterable[int] = (), attempts: int = 1) -> JobTicket:
        namespace = data.get("namespace", "default")
        index = worker if worker is not None else self.choose_worker(namespace, exclude)
        ref = self.workers[index].run_job.remote(data, mode)
        self._inflight[ref] = index
        self._affinity[namespace] = index
        self._last_assigned[index] = time.perf_counter()
        self.jobs_submitted += 1
        return JobTicket(str(data["id"]), data, mode, index, ref, attempts)

    def _retry(self, ticket: JobTicket, exc: BaseException) -> JobTicket | None:
        """A new ticket on another worker when the job's worker died and retries are left, else None."""
        if not isinstance(exc, _WORKER_LOST) or ticket.attempts > self.config.job_retries:
            return None
        log.warning("job %s: worker-%d lost (%s); resubmitting (attempt %d)", ticket.job_id, ticket.worker,
                    error_message(exc), ticket.attempts + 1)
        self.jobs_resubmitted += 1
        return self._dispatch(ticket.job, ticket.mode, exclude=[ticket.worker], attempts=ticket.attempts + 1)

    def run_job(self, job: JobSpec | Mapping[str, Any], mode: str | None = None, *, worker: int | None = None,
                timeout_s: float | None = None) -> dict[str, Any]:
        """Run one job and return its result dict (`JobResult.to_dict()` plus "worker"); raises on failure."""
        return self.result(self.submit(job, mode, worker=worker), timeout_s=timeout_s)

    def result(self, ticket: JobTicket, timeout_s: float | None = None) -> dict[str, Any]:
        """Wait for a submitted job; resubmits it elsewhere if its worker dies (up to `job_retries` times)."""
        while True:
            try:
                return ray.get(ticket.ref, timeout=timeout_s)
            except _WORKER_LOST as exc:
                retry = self._retry(ticket, exc)
                if retry is None:
                    raise
                ticket = retry

    def run_jobs(self, jobs: Iterable[JobSpec | Mapping[str, Any]], *, mode: str | None = None,
                 concurrency: int | None = None) -> Iterator[dict[str, Any]]:
        """Run `jobs` with at most `concurrency` in flight (default: every worker's batch full); yield each
        result as it finishes. A job that fails yields ``{"id": ..., "error": "..."}`` and the rest go on."""
        self._require_started()
        limit = concurrency or len(self.workers) * self.config.max_batch_size
        if limit < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        queue = iter(jobs)
        tickets: dict[Any, JobTicket] = {}
        exhausted = False
        while True:
            while not exhausted and len(tickets) < limit:
                try:
                    job = next(queue)
                except StopIteration:
                    exhausted = True
                    break
                try:
                    ticket = self.submit(job, mode)
                except (JobSpecError, TypeError, ValueError) as exc:
                    yield {"id": _job_id_of(job), "error": error_message(exc)}
                    continue
                tickets[ticket.ref] = ticket
            if not tickets:
                return
            done, _ = ray.wait(list(tickets), num_returns=1)
            for ref in done:
                ticket = tickets.pop(ref)
                try:
                    yield ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - one job's failure is its own error record
                    retry = self._retry(ticket, exc)
                    if retry is not None:
                        tickets[retry.ref] = retry
                    else:
                        yield {"id": ticket.job_id, "error": error_message(exc), "worker": f"worker-{ticket.worker}"}

    # ---- observability ------------------------------------------------------------------------------------------
    def loads(self) -> list[dict[str, Any]]:
        self._require_started()
        return ray.get([w.load.remote() for w in self.workers])

    def stats(self) -> dict[str, Any]:
        self._require_started()
        workers = ray.get([w.stats.remote() for w in self.workers])
        try:
            pool = ray.get(self.pool_actor.stats.remote(), timeout=self.config.pool_call_timeout_s)
        except (GetTimeoutError, *_WORKER_LOST) as exc:
            pool = {"error": error_message(exc)}
        return {"workers": workers, "pool": pool, "jobs_submitted": self.jobs_submitted,
                "jobs_resubmitted": self.jobs_resubmitted}


def _warn_if_pool_outgrows_object_store(config: ClusterConfig) -> None:
    """Anchor tensors live in the object store: a byte budget above its size means spilling to disk."""
    store = ray.cluster_resources().get("object_store_memory", 0)
    budget = config.kvcomm.pool_byte_budget
    if store and budget > store:
        log.warning("kvcomm.pool_byte_budget (%.2f GiB) exceeds the cluster's object store (%.2f GiB): "
                    "anchors will spill to disk; lower the budget or give Ray a larger object store",
                    budget / 2**30, store / 2**30)


def _job_id_of(job: Any) -> str:
    if isinstance(job, JobSpec):
        return job.id
    if isinstance(job, Mapping):
        return str(job.get("id", "?"))
    return "?"


def _kill(handle: Any) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # noqa: BLE001 - already dead
        pass


def _await_gone(handles: list[Any], timeout_s: float) -> None:
    """Wait until killed actors stop answering (ray.kill is asynchronous), at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    for handle in handles:
        while time.monotonic() < deadline:
            try:
                ray.get(handle.ping.remote(), timeout=max(0.1, deadline - time.monotonic()))
            except _WORKER_LOST:
                break
            except GetTimeoutError:
                break
            except Exception:  # noqa: BLE001 - any other error also means it no longer serves
                break
            time.sleep(0.05)
