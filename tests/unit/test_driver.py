"""The job driver (`cluster.driver.DagJob`) and its orders.

Its recovery of lost KV objects, with a stand-in executor: orders run in this process and their outputs are named
by stand-in object refs, so which object is lost, and when, is chosen exactly (the simulated-node drill in
tests/multinode loses a node at a moment it cannot choose).

When a node dies, the objects stored there are lost; every order that reads one fails with Ray's
`ObjectLostError`. The first such order has the object made again; the others that read it, a level's fan-out,
must read the new one (they failed with the same lost id, which no longer names anything the driver made)."""
from __future__ import annotations

import itertools
import threading
import time

import pytest
from ray.exceptions import ObjectLostError

from actors.turns import ContentHandle, ContentOrder, ProducedContent, SegmentMeta, TurnOrder, TurnOutcome
from cluster.driver import BUSY_LONGEST_PAUSE_S, DagJob, JobCancelled, Reply, WorkersBusy
from kvcomm.harness.jobs import JobSpec
from kvcomm.job_runner import TurnRecord


class StandInRef:
    """An object ref's id, as the driver reads it."""
    ids = itertools.count()

    def __init__(self) -> None:
        self._hex = f"object-{next(self.ids)}"

    def hex(self) -> str:
        return self._hex


def produced(kind: str) -> ProducedContent:
    return ProducedContent(kind, (1, 2), f"{kind}-key", "cache", {}, {}, SegmentMeta(2, 8, "float32", 0, (1, 1, 2, 1)))


class StandInExecutor:
    """Runs orders at once; an order reading an object in `lost` fails as a worker that cannot fetch it does.
    `lose_input_before_turns`: how many times the user input's object is lost just as the turns start reading it."""

    def __init__(self, lose_input_before_turns: int) -> None:
        self.lost: set[str] = set()
        self.inputs_made: list[str] = []
        self.turns_run: list[tuple[str, str]] = []       # (agent, the input object it read)
        self.losses_left = lose_input_before_turns

    def send(self, order):
        return order

    def wait(self, order) -> Reply:
        if isinstance(order, ContentOrder):
            refs = [StandInRef(), StandInRef()]
            self.inputs_made.append(refs[0].hex())
            return Reply(TurnOutcome("worker-0", produced=produced("input")), refs)
        read = order.contents["user_question"].base.object_ref.hex()
        if self.losses_left and read not in self.lost:       # its node dies as the level starts
            self.losses_left -= 1
            self.lost.add(read)
        if read in self.lost:
            raise ObjectLostError(read, None, "")
        self.turns_run.append((order.agent["id"], read))
        record = TurnRecord(order.agent["id"], order.round, "role", "answer", [1], 0.0, 0.0, False, "dense", 3, 3,
                            {})
        return Reply(TurnOutcome("worker-0", record=record, produced=produced("response")),
                     [StandInRef(), StandInRef(), StandInRef()])

    def cancel(self, call) -> None:
        pass

    def commit(self, staged) -> None:
        pass


def fan_out_job() -> JobSpec:
    """Three agents that all read the question in one level (no edges): its object is read three times at once."""
    return JobSpec.from_dict({"id": "fan-out", "task": "Tom has 3 apples.", "agents": [
        {"id": name, "role": "r", "system_prompt": "s", "user_template": "{user_question}"}
        for name in ("a", "b", "c")]})


def test_an_input_lost_under_a_fan_out_is_made_again_once_and_every_reader_reads_the_new_one() -> None:
    executor = StandInExecutor(lose_input_before_turns=1)
    dag = DagJob(fan_out_job(), "dense", executor, retries=0)
    result = dag.run()
    assert [t["agent_id"] for t in result["turns"]] == ["a", "b", "c"]
    assert dag.reruns == 1 and len(executor.inputs_made) == 2
    assert {read for _, read in executor.turns_run} == {executor.inputs_made[1]}


def test_an_object_made_again_and_lost_again_is_made_a_third_time() -> None:
    executor = StandInExecutor(lose_input_before_turns=2)
    dag = DagJob(fan_out_job(), "dense", executor, retries=0)
    assert len(dag.run()["turns"]) == 3
    assert dag.reruns == 2 and len(executor.inputs_made) == 3
    assert {read for _, read in executor.turns_run} == {executor.inputs_made[2]}


def test_an_order_sent_for_later_serialization_keeps_the_gate_state_it_was_sent_with() -> None:
    """Serve pickles an order on its router's loop once a replica is chosen, while the driver's thread teaches the
    shared handles what sibling turns staged: the order it sends is `frozen()`, whose contents own their dicts."""
    shared = ContentHandle("input", (1, 2), "key", None, "cache", "worker-0", anchor_ids={"user_question": "a1"},
                           gate_reason={"user_question": "reused"})
    order = TurnOrder("job", "ns", "kvcomm", {"id": "a"}, 0, {"user_question": shared}, frozenset(), True)
    sent = order.frozen()
    shared.learn_gate_state({"user_question": "a2"}, {"user_question": "new_anchor:high_entropy"})
    assert (shared.anchor_ids, shared.gate_reason) != ({"user_question": "a1"}, {"user_question": "reused"})
    assert sent.contents["user_question"].anchor_ids == {"user_question": "a1"}
    assert sent.contents["user_question"].gate_reason == {"user_question": "reused"}
    assert sent.contents["user_question"].token_ids == shared.token_ids and sent.agent == order.agent
    assert order.contents["user_question"] is shared        # the driver's own order keeps the shared handle


def test_a_level_whose_send_fails_cancels_the_orders_it_already_sent() -> None:
    """Sending the second of a level's three orders fails (no worker to take it): the first, already running on a
    worker, is cancelled, not left to run for a job that has failed."""
    class FailingSecondSend(StandInExecutor):
        def __init__(self) -> None:
            super().__init__(lose_input_before_turns=0)
            self.turns_sent, self.cancelled = [], []

        def send(self, order):
            if isinstance(order, TurnOrder):
                self.turns_sent.append(order)
                if len(self.turns_sent) == 2:
                    raise RuntimeError("no worker to take it")
            return order

        def cancel(self, call) -> None:
            self.cancelled.append(call)

    executor = FailingSecondSend()
    with pytest.raises(RuntimeError, match="no worker"):
        DagJob(fan_out_job(), "dense", executor).run()
    assert executor.cancelled == executor.turns_sent[:1]


class BusyExecutor(StandInExecutor):
    """The stand-in whose workers refuse each turn `refusals` times first (Serve's full queue: `WorkersBusy`)."""

    def __init__(self, refusals: int) -> None:
        super().__init__(lose_input_before_turns=0)
        self.refusals = refusals
        self.refused: dict[str, int] = {}

    def wait(self, order) -> Reply:
        if isinstance(order, TurnOrder) and self.refused.get(order.agent["id"], 0) < self.refusals:
            self.refused[order.agent["id"]] = self.refused.get(order.agent["id"], 0) + 1
            raise WorkersBusy("Request dropped due to backpressure")
        return super().wait(order)


def test_an_order_no_worker_took_is_sent_again_after_a_pause_and_not_counted_as_a_retry() -> None:
    executor = BusyExecutor(refusals=3)
    job = DagJob(fan_out_job(), "dense", executor, retries=0)
    result = job.run()
    assert [t["agent_id"] for t in result["turns"]] == ["a", "b", "c"]
    assert executor.refused == {"a": 3, "b": 3, "c": 3} and job.retries_left == 0 and not job._calls


def test_a_cancel_ends_the_pause_of_an_order_no_worker_took() -> None:
    executor = BusyExecutor(refusals=10 ** 6)
    job = DagJob(fan_out_job(), "dense", executor)
    threading.Timer(0.3, job.cancel).start()
    started = time.monotonic()
    with pytest.raises(JobCancelled):
        job.run()
    assert time.monotonic() - started < BUSY_LONGEST_PAUSE_S + 1.0 and not job._calls
