"""`DagJob`: the one cluster job driver. It runs a job's DAG level by level, every turn routed on its own.

It iterates the in-process oracle's own level loop (`kvcomm.job_runner.JobLevels`) with content handles in place
of contents, and hands each turn to a `TurnExecutor`: worker actors (`cluster.batch.runner.ClusterRunner`, for
`kvcomm submit` and library use) or Serve replicas through a request router (`cluster.serve.jobs`, for HTTP).
What varies is only where a turn runs; the order of turns, what each reads, retries and the commit are here.

1. the user input's base KV is computed on one worker (`ContentOrder`) and offered to the gate;
2. for each level of the DAG, every turn is sent at once (agents of one level run on several workers and join
   each worker's continuous batch); a turn reads its contents through their `SegmentRef`s and returns its
   response (and a programming agent's condition) as new handles;
3. in kvcomm and hybrid modes every order stages its pool updates in its own transaction and returns them; the
   job's payloads are committed once, at the end (`TurnExecutor.commit`): a job's anchors become visible together
   or, when it fails or is cancelled, not at all.

Only handles pass through the driver: KV bytes go from the object store to the worker that reads them, and the
driver's process owns every object a worker returns, so when a worker dies mid-turn its earlier outputs survive
and the lost turn is simply sent again (up to ``retries`` times per job). When a node dies, the objects stored
there are lost even though the driver owns them: a turn that can no longer read one gets it back by running the
turn (or user input) that produced it again, from the driver's record of every order it sent, and is then sent
again itself; dense decoding is deterministic, so the answers do not change. An order no worker took (every
replica busy and the queue for them full: `WorkersBusy`) is sent again after a pause, not counted as a retry.
`cancel()` (from any thread) cancels the turns in flight, which leave their decode batch at the next step, and ends
the job with `JobCancelled`.
"""
from __future__ import annotations

import logging
import threading
import time
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from ray.exceptions import ObjectLostError, RayTaskError

from actors.turns import ContentHandle, ContentOrder, TurnOrder, TurnOutcome, handle_of
from kvcomm.harness.jobs import JobSpec
from kvcomm.job_runner import JobLevels, JobResult, TurnInputs, TurnRecord, consumed_names
from kvcomm.names import POOL_MODES

log = logging.getLogger(__name__)


class WorkerLost(RuntimeError):
    """The worker running an order died (or left) before answering; the order may be sent again."""


class WorkersBusy(RuntimeError):
    """No worker took the order (every replica busy and the queue for them full); it may be sent again later."""


BUSY_FIRST_PAUSE_S = 0.05     # an order no worker took is sent again after this pause, doubled each time ...
BUSY_LONGEST_PAUSE_S = 2.0    # ... up to this pause ...
BUSY_GIVE_UP_S = 300.0        # ... until it has waited this long in all; then the job fails with WorkersBusy


def busy_pauses() -> Iterator[float]:
    """The pauses before each resend of work no worker took: `BUSY_FIRST_PAUSE_S`, doubling up to
    `BUSY_LONGEST_PAUSE_S`, while less than `BUSY_GIVE_UP_S` was waited in all (then none: give up)."""
    pause, waited = BUSY_FIRST_PAUSE_S, 0.0
    while waited < BUSY_GIVE_UP_S:
        yield pause
        waited, pause = waited + pause, min(2 * pause, BUSY_LONGEST_PAUSE_S)


class JobCancelled(RuntimeError):
    """The job was cancelled: its running turns were stopped and nothing of it was committed to the pool."""


@dataclass
class Reply:
    """A worker's answer to one order: the small outcome, and ObjectRefs of what it returned besides (a turn:
    response KV, condition KV, staged pool payload; a content: its KV, staged pool payload). The caller owns them."""
    outcome: TurnOutcome
    refs: list[Any]


class TurnExecutor(Protocol):
    """Where a driver's orders run. `send` starts one (never blocks on its result), `wait` returns its `Reply` or
    raises `WorkerLost` (the driver then sends it again), `WorkersBusy` (sent again after a pause, not counted as a
    retry) or the error the worker raised; `cancel` stops it."""

    def send(self, order: TurnOrder | ContentOrder) -> Any: ...

    def wait(self, call: Any) -> Reply: ...

    def cancel(self, call: Any) -> None: ...

    def commit(self, staged: list[Any]) -> None:
        """Commit a job's staged pool payloads (ObjectRefs; None inside for empty ones) in one call; a lost pool
        drops them with a warning (it costs reuse, never answers)."""


class DagJob:
    """One job's DAG on a cluster; `run()` returns its result dict (`JobResult.to_dict()`, each turn naming the
    worker that ran it, plus ``workers``)."""

    def __init__(self, job: JobSpec, mode: str, executor: TurnExecutor, *, retries: int = 1,
                 on_turn: Callable[[TurnRecord], None] | None = None,
                 on_retry: Callable[[str], None] | None = None):
        self.job, self.mode, self.executor = job, mode, executor
        self.pooled = mode in POOL_MODES
        self.consumed_names = consumed_names(job)
        self.retries_left = retries
        self.on_turn, self.on_retry = on_turn, on_retry
        self.staged: list[Any] = []                  # ObjectRefs of per-order pool payloads (None inside if empty)
        self.reruns = 0                              # orders run again because an object they made was lost
        self._levels: JobLevels[ContentHandle] | None = None
        self._made: dict[str, tuple[str, Any, TurnOrder | ContentOrder]] = {}   # object hex -> what made it
        self._replaced: dict[str, ContentHandle] = {}  # lost object hex -> the handle of what was made again
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: set[int] = set()            # id() of calls sent and not yet answered
        self._calls: dict[int, Any] = {}

    # ---- control (any thread) -----------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the job: turns in flight are cancelled on their workers, and `run` raises `JobCancelled`."""
        self._cancelled.set()
        with self._lock:
            calls = list(self._calls.values())
        for call in calls:
            try:
                self.executor.cancel(call)
            except Exception as exc:  # noqa: BLE001 - a call that already ended cannot be cancelled
                log.debug("job %s: cancelling a call failed: %s", self.job.id, exc)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def records(self) -> list[TurnRecord]:
        """The records of the turns finished so far (each names its worker)."""
        return list(self._levels.records) if self._levels is not None else []

    # ---- the job ------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        user_input = None
        if "user_question" in self.consumed_names:
            order = ContentOrder(self.job.namespace, self.job.task, "input", ("user_question",), self.pooled)
            reply = self._wait(order, self._send(order))
            user_input = self._remember("input", None, order,
                                        handle_of(reply.outcome.produced, reply.refs[0], reply.outcome.worker,
                                                  reply.outcome.node_id))
            self.staged.append(reply.refs[1])
        levels: JobLevels[ContentHandle] = JobLevels(self.job, user_input)
        self._levels = levels
        for level in levels:
            orders = [self._order(inputs) for inputs in level]
            calls: list[Any] = []
            try:
                calls.extend(self._send(order) for order in orders)
                for inputs, order, call in zip(level, orders, calls):
                    reply = self._wait(order, call)
                    self._take(levels, inputs, order, reply)
            except BaseException:
                for call in calls:               # a failed level takes its other turns down with it
                    self._forget(call, cancel=True)
                raise
        self._check_cancelled()
        if self.pooled and self.staged:
            self.executor.commit(self.staged)
        turns: list[TurnRecord] = levels.records
        out = JobResult(self.job.id, self.mode, turns, turns[-1].text if turns else "", time.perf_counter() - started,
                        self.job.namespace, dict(self.job.metadata or {})).to_dict()
        out["workers"] = list(dict.fromkeys(t.worker for t in turns))
        return out

    def _order(self, inputs: TurnInputs[ContentHandle]) -> TurnOrder:
        return TurnOrder(self.job.id, self.job.namespace, self.mode, inputs.agent.to_dict(), inputs.turn.round,
                         inputs.contents, self.consumed_names, self.pooled)

    def _take(self, levels: JobLevels[ContentHandle], inputs: TurnInputs[ContentHandle], order: TurnOrder,
              reply: Reply) -> None:
        """Keep a finished turn's outputs as handles; learn what it staged for the contents it read."""
        outcome = reply.outcome
        for name, (anchor_ids, reasons) in outcome.gate_state.items():
            order.contents[name].learn_gate_state(anchor_ids, reasons)
        key = (inputs.turn.agent_id, inputs.turn.round)
        response = self._remember("response", key, order,
                                  handle_of(outcome.produced, reply.refs[0], outcome.worker, outcome.node_id))
        condition = None
        if outcome.condition is not None:
            condition = self._remember("condition", key, order, handle_of(outcome.condition, reply.refs[1],
                                                                          outcome.worker, outcome.node_id))
        self.staged.append(reply.refs[2])
        record = dataclasses.replace(outcome.record, worker=outcome.worker)
        levels.done(inputs.turn, response, condition, record)
        if self.on_turn is not None:
            self.on_turn(record)

    # ---- lost objects: the order that made one runs again --------------------------------------------------------
    def _remember(self, kind: str, key: Any, order: TurnOrder | ContentOrder, handle: ContentHandle) -> ContentHandle:
        made = _object_id(handle)
        if made is not None:
            self._made[made] = (kind, key, order)
        return handle

    def _remake(self, lost_hex: str) -> dict[str, ContentHandle]:
        """Run again the order that made the lost object; replace what it made in the job's record. Returns the
        replacements (old object hex -> new handle) for the orders that read them."""
        kind, key, order = self._made.pop(lost_hex)
        self.reruns += 1
        log.warning("job %s: an object it made was lost (its node died); running the %s that made it again",
                    self.job.id, "user input" if kind == "input" else f"turn {key[0]}/{key[1]}")
        reply = self._wait(order, self._send(order))
        outcome, levels = reply.outcome, self._levels
        replaced = {}
        if kind == "input":
            new = self._remember("input", None, order, handle_of(outcome.produced, reply.refs[0], outcome.worker,
                                                                 outcome.node_id))
            old, levels.user_input = levels.user_input, new
            replaced[_object_id(old)] = new
        else:
            pairs = [(levels.responses, outcome.produced, reply.refs[0], "response")]
            if outcome.condition is not None and key in levels.conditions:
                pairs.append((levels.conditions, outcome.condition, reply.refs[1], "condition"))
            for store, produced, ref, made in pairs:
                old = store[key]
                store[key] = self._remember(made, key, order, handle_of(produced, ref, outcome.worker,
                                                                       outcome.node_id))
                if _object_id(old) is not None:
                    self._made.pop(_object_id(old), None)
                    replaced[_object_id(old)] = store[key]
        return replaced

    def _current(self, handle: ContentHandle) -> ContentHandle:
        """`handle`, or what was made again in place of its object (followed through every later loss)."""
        while _object_id(handle) in self._replaced:
            handle = self._replaced[_object_id(handle)]
        return handle

    # ---- orders, with retries on worker loss and resends when busy ----------------------------------------------
    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise JobCancelled(f"job {self.job.id} was cancelled")

    def _send(self, order: TurnOrder | ContentOrder) -> Any:
        self._check_cancelled()
        call = self.executor.send(order)
        with self._lock:
            self._calls[id(call)] = call
        if self._cancelled.is_set():         # cancelled while sending: `cancel` may not have seen this call
            self.executor.cancel(call)
        return call

    def _forget(self, call: Any, cancel: bool = False) -> None:
        with self._lock:
            known = self._calls.pop(id(call), None) is not None
        if known and cancel:
            try:
                self.executor.cancel(call)
            except Exception:  # noqa: BLE001 - already ended
                pass

    def _wait(self, order: TurnOrder | ContentOrder, call: Any) -> Reply:
        """The order's reply; an order whose worker was lost is sent again while the job has retries left, one no
        worker took is sent again after a pause (`busy_pauses`)."""
        pauses = busy_pauses()
        while True:
            try:
                reply = self.executor.wait(call)
            except WorkersBusy:
                self._forget(call)
                self._check_cancelled()
                pause = next(pauses, None)
                if pause is None:
                    raise
                self._cancelled.wait(pause)                  # a cancel ends the pause at once
                call = self._send(order)                     # raises JobCancelled when cancelled meanwhile
                continue
            except WorkerLost as exc:
                self._forget(call)
                self._check_cancelled()
                if self.retries_left <= 0:
                    raise
                self.retries_left -= 1
                log.warning("job %s: %s; sending the order to another worker", self.job.id, exc)
                if self.on_retry is not None:
                    self.on_retry(str(exc))
                call = self._send(order)
                continue
            except BaseException as exc:
                self._forget(call)
                if self._cancelled.is_set():
                    raise JobCancelled(f"job {self.job.id} was cancelled") from None
                lost = _lost_object(exc)
                if lost is None or not isinstance(order, TurnOrder) or (
                        lost not in self._made and lost not in self._replaced):
                    raise
                if lost not in self._replaced:        # the first order to miss it has it made again; the others
                    self._replaced.update(self._remake(lost))        # that read it (a level's fan-out) take that
                for name, handle in list(order.contents.items()):   # the order now reads what was made again
                    order.contents[name] = self._current(handle)
                call = self._send(order)
                continue
            self._forget(call)
            return reply


def _object_id(handle: ContentHandle) -> str | None:
    """The hex id of the object holding a content's KV (None: no KV, or not a Ray object)."""
    hex_id = getattr(handle.base.object_ref, "hex", None) if handle.base is not None else None
    return hex_id() if callable(hex_id) else None


def _lost_object(exc: BaseException) -> str | None:
    """The hex id of the object whose loss `exc` reports (raised by a worker that could not read it), or None."""
    cause = exc.cause if isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None else exc
    return cause.object_ref_hex if isinstance(cause, ObjectLostError) else None
