"""`DagJob`: one multi-agent job driven across the cluster's workers, level by level, every turn routed on its own.

This module owns turn-level execution on a cluster (the runner's ``dispatch: turn``). It follows the
single-process oracle `kvcomm.job_runner.run_job` step for step, with workers in place of the engine:

1. the user input's base KV is computed on one worker (`AgentWorker.make_content`) and offered to the gate;
2. for each level of the job's DAG, every turn is sent to a worker chosen by the runner (agents of one level run
   on several workers at once, and join each worker's continuous batch); a turn reads the contents it needs
   through their `SegmentRef`s and returns its response (and a programming agent's condition) as new handles;
3. in kvcomm and hybrid modes every order stages its pool updates in its own transaction and returns them; the
   job's payloads are committed once, at the end, in one `AnchorPoolActor.commit_parts` call: a job's anchors
   become visible together or (when it fails) not at all.

Only handles pass through the driver: KV bytes go from the object store to the worker that reads them. The
driver owns every returned object (the caller owns a task's returns), so when a worker dies mid-turn its earlier
outputs survive and the turn is simply sent to another worker (up to ``job_retries`` times per job).
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import ray

from actors.turns import ContentHandle, ContentOrder, TurnOrder, TurnOutcome, handle_of
from kvcomm.harness.jobs import JobSpec, Turn
from kvcomm.job_runner import POOL_MODES, JobResult, TurnRecord, resolve_placeholder

if TYPE_CHECKING:
    from .job_runner import ClusterRunner

log = logging.getLogger(__name__)


class DagJob:
    """One job's DAG on the cluster; `run()` returns its result dict (`JobResult.to_dict()` plus workers)."""

    def __init__(self, runner: "ClusterRunner", job: JobSpec, mode: str, *, worker: int | None = None):
        self.runner, self.job, self.mode, self.pinned = runner, job, mode, worker
        self.pooled = mode in POOL_MODES
        self.consumed_names = frozenset(name for a in job.agents for name in job.placeholders_of(a.id))
        self.user_input: ContentHandle | None = None
        self.responses: dict[tuple[str, int], ContentHandle] = {}
        self.conditions: dict[tuple[str, int], ContentHandle] = {}
        self.staged: list[Any] = []                  # ObjectRefs of per-order pool payloads (None inside if empty)
        self.retries_left = runner.config.job_retries

    # ---- the job ------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        records: list[dict[str, Any]] = []
        if "user_question" in self.consumed_names:
            order = ContentOrder(self.job.namespace, self.job.task, "input", ("user_question",), self.pooled)
            outcome, refs, index = self._call("make_content", order, holders=(), num_returns=3)
            self.user_input = handle_of(outcome.produced, refs[1], index)
            self.staged.append(refs[2])
        for level in self.job.turn_levels():
            calls: list[tuple[TurnOrder, list[Any], int]] = []
            waited = 0
            try:
                for turn in level:
                    calls.append(self._submit_turn(turn))
                for turn, call in zip(level, calls):
                    waited += 1                     # _finish_turn releases its worker's slot, even on failure
                    outcome, refs, index = self._finish_turn(call)
                    records.append(self._take(turn, call[0], outcome, refs, index))
            except BaseException:
                for _, _, index in calls[waited:]:
                    self.runner.release_worker(index)
                raise
        self._commit()
        turns = [TurnRecord(**{k: v for k, v in r.items() if k != "worker"}) for r in records]
        final = turns[-1].text if turns else ""
        out = JobResult(self.job.id, self.mode, turns, final, time.perf_counter() - started, self.job.namespace,
                        dict(self.job.metadata or {})).to_dict()
        for turn_dict, record in zip(out["turns"], records):
            turn_dict["worker"] = record["worker"]
        out["workers"] = list(dict.fromkeys(r["worker"] for r in records))
        return out

    def _order(self, turn: Turn) -> TurnOrder:
        agent = self.job.agent(turn.agent_id)
        template = agent.template_for_round(turn.round)
        contents = {name: resolve_placeholder(name, turn, self.user_input, self.responses, self.conditions)
                    for name in template.placeholders()}
        return TurnOrder(self.job.id, self.job.namespace, self.mode, agent.to_dict(), turn.round, contents,
                         self.consumed_names, self.pooled)

    def _submit_turn(self, turn: Turn) -> tuple[TurnOrder, list[Any], int]:
        order = self._order(turn)
        holders = [h.holder for h in order.contents.values()]
        refs, index = self._send("run_turn", order, holders, num_returns=4)
        return order, refs, index

    def _finish_turn(self, call: tuple[TurnOrder, list[Any], int]) -> tuple[TurnOutcome, list[Any], int]:
        order, refs, index = call
        return self._wait("run_turn", order, refs, index, holders=[h.holder for h in order.contents.values()],
                          num_returns=4)

    def _take(self, turn: Turn, order: TurnOrder, outcome: TurnOutcome, refs: list[Any],
              index: int) -> dict[str, Any]:
        """Keep a finished turn's outputs as handles; learn what it staged for the contents it read."""
        for name, (anchor_ids, reasons) in outcome.gate_state.items():
            order.contents[name].learn_gate_state(anchor_ids, reasons)
        key = (turn.agent_id, turn.round)
        self.responses[key] = handle_of(outcome.produced, refs[1], index)
        if outcome.condition is not None:
            self.conditions[key] = handle_of(outcome.condition, refs[2], index)
        self.staged.append(refs[3])
        return {**outcome.record, "worker": outcome.worker}

    # ---- calls to workers, with retries on worker loss ----------------------------------------------------------
    def _call(self, method: str, order: Any, holders: Any, num_returns: int) -> tuple[Any, list[Any], int]:
        refs, index = self._send(method, order, holders, num_returns)
        return self._wait(method, order, refs, index, holders, num_returns)

    def _send(self, method: str, order: Any, holders: Any, num_returns: int,
              pinned: int | None = None) -> tuple[list[Any], int]:
        index = self.runner.acquire_worker(self.job.namespace, holders=holders,
                                           pinned=self.pinned if pinned is None else pinned)
        try:
            refs = getattr(self.runner.workers[index], method).options(num_returns=num_returns).remote(order)
        except BaseException:
            self.runner.release_worker(index)
            raise
        return list(refs), index

    def _wait(self, method: str, order: Any, refs: list[Any], index: int, holders: Any,
              num_returns: int) -> tuple[Any, list[Any], int]:
        """The call's outcome; the worker's slot is released whatever happens. A call whose worker died is
        sent to another worker while the job has retries left."""
        from .job_runner import WORKER_LOST, error_message
        while True:
            try:
                outcome = ray.get(refs[0])
            except WORKER_LOST as exc:
                self.runner.release_worker(index)
                if self.retries_left <= 0:
                    raise
                self.retries_left -= 1
                self.runner.note_resubmitted()
                log.warning("job %s: worker-%d lost during %s (%s); sending it to another worker", self.job.id,
                            index, method, error_message(exc))
                self.pinned = None            # a job pinned to a worker that died moves on like any other
                live = self.runner.await_live_worker(exclude=(index,))   # another one, or this one restarted
                refs, index = self._send(method, order, holders, num_returns, pinned=live)
                continue
            except BaseException:
                self.runner.release_worker(index)
                raise
            self.runner.release_worker(index)
            return outcome, refs, index

    def _commit(self) -> None:
        if not self.pooled or not self.staged:
            return
        runner = self.runner
        try:
            ray.get(runner.pool_actor.commit_parts.remote(*self.staged), timeout=runner.config.pool_call_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a lost pool loses this job's anchors, never its answers
            from .job_runner import error_message
            runner.note_commit_dropped()
            log.warning("job %s: anchor pool commit dropped (%s); later jobs relearn these anchors", self.job.id,
                        error_message(exc))
