"""`ClusterRunner`: runs multi-agent jobs on `AgentWorker` actors placed on a Ray cluster (no Serve).

This module owns that fleet's lifecycle and routing: `start()` places one bundle per worker (cluster.placement),
creates (or joins) the named `AnchorPoolActor` and starts the workers in their bundles; `submit`/`run_job` start
a job on a driver thread, where the cluster's one job driver (`cluster.driver.DagJob`) runs it turn by turn with
this runner as its `TurnExecutor`; `run_jobs` keeps many jobs in flight and yields each result as it finishes (a
failed job becomes an error record, the batch goes on); `shutdown()` kills what `start()` created and removes the
placement group. `kvcomm submit` without ``--url`` uses it; the HTTP service runs the same driver on Serve.

Routing. Each order goes to a least-loaded worker (orders this runner has in flight; `affinity_slack` lets a
worker carry that many more); among those, to the one that computed most of the contents the turn reads (their
KV is in its cache), then to the one that last served the job's namespace (its anchors are in its cache), then to
the one idle longest. (Serve replicas are routed by `cluster.serve.router` on the same preferences.) An order
whose worker died is sent to another worker, up to `job_retries` times per job.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from actors.agent_worker import start_agent_worker
from actors.anchor_pool_actor import get_or_create_pool_actor
from actors.turns import ContentOrder, TurnOrder, TurnOutcome
from actors.worker_load import WorkerLoad
from kvcomm.harness.jobs import JobSpec, JobSpecError

from ..config import ClusterConfig
from ..driver import DagJob, Reply, WorkerLost
from ..placement import bundle_strategy, create_worker_placement_group, pool_store_problem, remove_placement_group

log = logging.getLogger(__name__)
WORKER_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


class ClusterNotStarted(RuntimeError):
    """The runner was used before `start()` or after `shutdown()`."""


@dataclass
class JobTicket:
    """One submitted job: its id, its dict, its driver, and the future of its result dict."""
    job_id: str
    job: dict[str, Any]
    mode: str | None
    dag: DagJob
    future: concurrent.futures.Future
    submitted_at: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Cancel the job: its turns in flight stop, nothing is committed, its result raises `JobCancelled`."""
        self.dag.cancel()


@dataclass
class _WorkerCall:
    """One order in flight on worker `index`: its ObjectRefs (the outcome first)."""
    order: TurnOrder | ContentOrder
    index: int
    refs: list[Any]
    released: bool = False


class _JobCalls:
    """The `TurnExecutor` one job's driver sees: orders go to this runner's workers (or all to `pinned`)."""

    def __init__(self, runner: "ClusterRunner", pinned: int | None):
        self.runner, self.pinned = runner, pinned
        self._just_lost: int | None = None    # the worker the last lost order ran on: the resend avoids it
        self._release_lock = threading.Lock()  # `cancel` (any thread) and `wait` (the driver's) both release

    def send(self, order: TurnOrder | ContentOrder) -> _WorkerCall:
        runner = self.runner
        hint = order.routing_hint()
        pinned = self.pinned
        if self._just_lost is not None:       # a resend: to a worker that answers (or this one, restarted)
            pinned, self._just_lost = runner.await_live_worker(exclude=(self._just_lost,)), None
        index = runner.acquire_worker(hint.namespace, holders=hint.holders, pinned=pinned)
        method, returns = ("run_turn", 4) if isinstance(order, TurnOrder) else ("make_content", 3)
        try:
            refs = getattr(runner.workers[index], method).options(num_returns=returns).remote(order)
        except BaseException:
            runner.release_worker(index)
            raise
        return _WorkerCall(order, index, list(refs))

    def wait(self, call: _WorkerCall) -> Reply:
        try:
            outcome: TurnOutcome = ray.get(call.refs[0])
        except WORKER_LOST as exc:
            self._just_lost = call.index
            self.pinned = None             # a job pinned to a worker that died moves on like any other
            raise WorkerLost(f"worker-{call.index} lost ({error_message(exc)})") from None
        finally:
            self._release(call)
        return Reply(outcome, call.refs[1:])

    def cancel(self, call: _WorkerCall) -> None:
        ray.cancel(call.refs[0])          # the worker's method sees CancelledError; its turn leaves the batch
        self._release(call)

    def _release(self, call: _WorkerCall) -> None:
        with self._release_lock:
            if call.released:
                return
            call.released = True
        self.runner.release_worker(call.index)

    def commit(self, staged: list[Any]) -> None:
        runner = self.runner
        try:
            ray.get(runner.pool_actor.commit_parts.remote(*staged), timeout=runner.config.pool_call_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a lost pool loses this job's anchors, never its answers
            runner.note_commit_dropped()
            log.warning("anchor pool commit dropped (%s); later jobs relearn these anchors", error_message(exc))


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
        self._lock = threading.Lock()                # driver threads route concurrently
        self._load: list[int] = []                   # turns (or whole jobs) in flight on each worker
        self._affinity: dict[str, int] = {}          # namespace -> worker that last ran it
        self._last_assigned: list[float] = []
        self._driver: concurrent.futures.ThreadPoolExecutor | None = None   # one thread per job in flight
        self._closing = False                        # shutdown() in progress: no more routing
        self.jobs_submitted = 0
        self.jobs_resubmitted = 0
        self.commits_dropped = 0

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
            # a crashed pool comes back from its snapshot (pool_snapshot_path), else empty: workers then prefill
            # densely and relearn
            # created outside the workers' placement group; the workers join the same spec
            self.pool_actor, self._pool_created = get_or_create_pool_actor(cfg.pool_spec())
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
        self._load = [0] * len(self.workers)
        self._driver = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(8, 2 * cfg.num_workers * cfg.max_batch_size), thread_name_prefix="kvcomm-job-driver")
        return self

    def shutdown(self) -> None:
        """Stop routing, kill the workers and (unless detached or joined) the pool actor after a last snapshot
        save, wait for the job-driver threads (their jobs fail with `ClusterNotStarted`), remove the placement
        group."""
        self._closing = True
        handles = list(self.workers)
        for worker in handles:
            _kill(worker)
        pool = self.pool_actor
        kill_pool = pool is not None and self._pool_created and not self.config.pool_detached
        if kill_pool:
            if self.config.pool_snapshot_path:
                try:
                    ray.get(pool.save_snapshot.remote(), timeout=self.config.pool_call_timeout_s)
                except Exception as exc:  # noqa: BLE001 - the last save is best effort; periodic saves exist
                    log.warning("anchor pool: final snapshot not saved (%s)", error_message(exc))
            _kill(pool)
        self.workers, self.pool_actor, self._pool_created = [], None, False
        if self._driver is not None:
            self._driver.shutdown(wait=True, cancel_futures=True)   # in-flight jobs see the dead workers and end
            self._driver = None
        self._affinity.clear()
        remove_placement_group(self._group)
        self._group = None
        _await_gone(handles + ([pool] if kill_pool else []), timeout_s=10.0)
        self._closing = False

    def __enter__(self) -> "ClusterRunner":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    # ---- routing ------------------------------------------------------------------------------------------------
    def _require_started(self) -> None:
        if self._closing or not self.workers:
            raise ClusterNotStarted("the cluster runner is not started (call start() or use it as a context manager)")

    def inflight_per_worker(self) -> list[int]:
        """Orders (turns and user inputs) this runner has in flight on each worker."""
        with self._lock:
            return list(self._load)

    def choose_worker(self, namespace: str, exclude: Iterable[int] = (), holders: Iterable[str] = ()) -> int:
        """The worker for the next order of `namespace` (see the module docstring); counts nothing. `holders`:
        the worker ids that computed the contents the order reads."""
        self._require_started()
        with self._lock:
            return self._choose(namespace, set(exclude), list(holders))

    def _choose(self, namespace: str, excluded: set[int], holders: list[str]) -> int:
        candidates = [i for i in range(len(self.workers)) if i not in excluded] or list(range(len(self.workers)))
        least = min(self._load[i] for i in candidates)
        eligible = [i for i in candidates if self._load[i] <= least + self.config.affinity_slack]
        home = self._affinity.get(namespace)
        return min(eligible, key=lambda i: (-holders.count(f"worker-{i}"), i != home, self._load[i],
                                            self._last_assigned[i]))

    def acquire_worker(self, namespace: str, *, holders: Iterable[str] = (), exclude: Iterable[int] = (),
                       pinned: int | None = None) -> int:
        """Choose a worker (or take `pinned`) and count one more unit of work on it; `release_worker` undoes."""
        self._require_started()
        with self._lock:
            index = pinned if pinned is not None else self._choose(namespace, set(exclude), list(holders))
            self._load[index] += 1
            self._affinity[namespace] = index
            self._last_assigned[index] = time.perf_counter()
            return index

    def release_worker(self, index: int) -> None:
        with self._lock:
            if 0 <= index < len(self._load):
                self._load[index] = max(0, self._load[index] - 1)

    def await_live_worker(self, exclude: Iterable[int] = (), timeout_s: float | None = None) -> int:
        """A worker that answers `ping` (those not in `exclude` first, then the least loaded); when none does,
        wait for Ray to restart one, up to `timeout_s` (default `worker_start_timeout_s`)."""
        self._require_started()
        excluded = set(exclude)
        deadline = time.monotonic() + (timeout_s or self.config.worker_start_timeout_s)
        while True:
            if self._closing:
                raise ClusterNotStarted("the cluster runner is shutting down")
            workers = list(self.workers)
            with self._lock:
                order = sorted(range(len(workers)), key=lambda i: (i in excluded, self._load[i]))
            pings = {workers[i].ping.remote(): i for i in order}
            ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=2.0)
            alive = set()
            for ref in ready:
                try:
                    ray.get(ref)
                    alive.add(pings[ref])
                except Exception:  # noqa: BLE001 - dead or restarting: not a candidate now
                    pass
            for index in order:
                if index in alive:
                    return index
            if time.monotonic() > deadline:
                waited = timeout_s or self.config.worker_start_timeout_s
                raise ClusterNotStarted(f"no agent worker answered for {waited:.0f} s after a worker was lost")
            time.sleep(0.5)

    def note_resubmitted(self) -> None:
        with self._lock:
            self.jobs_resubmitted += 1

    def note_commit_dropped(self) -> None:
        with self._lock:
            self.commits_dropped += 1

    # ---- jobs ---------------------------------------------------------------------------------------------------
    def submit(self, job: JobSpec | Mapping[str, Any], mode: str | None = None, *,
               worker: int | None = None) -> JobTicket:
        """Validate `job` and start it on a driver thread (`cluster.driver.DagJob`, every turn routed on its own;
        `worker` pins them all to that worker); `result(ticket)` waits for its result dict."""
        self._require_started()
        if worker is not None and not 0 <= worker < len(self.workers):
            raise ValueError(f"worker must be in [0, {len(self.workers)}), got {worker}")
        data = job_as_dict(job)
        with self._lock:
            self.jobs_submitted += 1
        spec = JobSpec.from_dict(data)
        dag = DagJob(spec, mode or spec.mode, _JobCalls(self, worker), retries=self.config.job_retries,
                     on_retry=lambda _: self.note_resubmitted())
        return JobTicket(spec.id, data, mode, dag, self._driver.submit(dag.run))

    def run_job(self, job: JobSpec | Mapping[str, Any], mode: str | None = None, *, worker: int | None = None,
                timeout_s: float | None = None) -> dict[str, Any]:
        """Run one job and return its result dict (`JobResult.to_dict()` plus where it ran); raises on failure."""
        return self.result(self.submit(job, mode, worker=worker), timeout_s=timeout_s)

    def result(self, ticket: JobTicket, timeout_s: float | None = None) -> dict[str, Any]:
        """Wait for a submitted job (its lost turns or job already resubmitted as `job_retries` allows)."""
        return ticket.future.result(timeout=timeout_s)

    def run_jobs(self, jobs: Iterable[JobSpec | Mapping[str, Any]], *, mode: str | None = None,
                 concurrency: int | None = None) -> Iterator[dict[str, Any]]:
        """Run `jobs` with at most `concurrency` in flight (default: every worker's batch full); yield each
        result as it finishes. A job that fails yields ``{"id": ..., "error": "..."}`` and the rest go on."""
        self._require_started()
        limit = concurrency or len(self.workers) * self.config.max_batch_size
        if limit < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        queue = iter(jobs)
        tickets: dict[concurrent.futures.Future, JobTicket] = {}
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
                tickets[ticket.future] = ticket
            if not tickets:
                return
            done, _ = concurrent.futures.wait(list(tickets), return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                ticket = tickets.pop(future)
                try:
                    yield future.result()
                except Exception as exc:  # noqa: BLE001 - one job's failure is its own error record
                    yield {"id": ticket.job_id, "error": error_message(exc)}

    # ---- observability ------------------------------------------------------------------------------------------
    def loads(self) -> list[WorkerLoad]:
        self._require_started()
        return ray.get([w.load.remote() for w in self.workers])

    def stats(self) -> dict[str, Any]:
        self._require_started()
        workers = ray.get([w.stats.remote() for w in self.workers])
        try:
            pool = ray.get(self.pool_actor.stats.remote(), timeout=self.config.pool_call_timeout_s)
        except (GetTimeoutError, *WORKER_LOST) as exc:
            pool = {"error": error_message(exc)}
        return {"workers": workers, "pool": pool, "jobs_submitted": self.jobs_submitted,
                "jobs_resubmitted": self.jobs_resubmitted, "commits_dropped": self.commits_dropped}


def _warn_if_pool_outgrows_object_store(config: ClusterConfig) -> None:
    """Anchor tensors live in the object store of the pool actor's node: a byte budget above it means spilling."""
    problem = pool_store_problem(config.budgets()["pool_byte_budget"], ray.nodes())
    if problem:
        log.warning(problem)


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
            except WORKER_LOST:
                break
            except GetTimeoutError:
                break
            except Exception:  # noqa: BLE001 - any other error also means it no longer serves
                break
            time.sleep(0.05)
