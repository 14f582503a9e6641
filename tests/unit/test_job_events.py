"""A job's events are typed where they happen (`cluster.serve.job_events`) and keep their wire form: the keys, their
order and values that the job store snapshots and ``GET /v1/jobs/{id}/events`` sends (no Ray: the store is a plain
class; the HTTP tests check the same events end to end); and what a failed job's client is told."""
from __future__ import annotations

import asyncio
import json

from cluster.serve.job_events import CancelledEvent, RetryEvent, TurnEvent
from cluster.serve.job_store import JobStore
from kvcomm.job_runner import TurnRecord


def test_each_event_kind_has_its_wire_form():
    turn = TurnRecord(agent_id="a", round=1, role="solver", text="4", token_ids=[7, 8], ttft_s=0.5, total_s=1.0,
                      reused=True, reason="reused", prompt_tokens=20, recomputed_tokens=3, timings={"align": 0.1},
                      worker="replica-1")
    event = TurnEvent(job="j1", turn=turn)
    assert event.kind == "turn" and list(event.to_dict()) == [*turn.to_dict(), "job"]
    assert json.dumps(event.to_dict()) == json.dumps({**turn.to_dict(), "job": "j1"})
    assert json.dumps(RetryEvent(job="j1", reason="lost").to_dict()) == \
        '{"job": "j1", "reason": "lost", "scope": "turn"}'
    assert json.dumps(RetryEvent(job="j1", reason="gone", attempt=2).to_dict()) == \
        '{"job": "j1", "attempt": 2, "reason": "gone"}'
    assert (CancelledEvent(job="j1").kind, CancelledEvent(job="j1").to_dict()) == ("cancelled", {"job": "j1"})


def test_the_store_numbers_and_keeps_events_in_their_wire_form():
    async def scenario():
        store = JobStore()
        for job_id in ("j1", "j2"):
            await store.create({"id": job_id}, driver="ingress-a", lease_s=0.0)
        retry = RetryEvent(job="j1", reason="lost")
        assert await store.append("j1", "ingress-a", retry.kind, retry.to_dict()) == 1
        assert await store.append("j1", "ingress-b", retry.kind, retry.to_dict()) is None   # not its driver
        claimed = await store.claim_orphans("ingress-b", lease_s=60.0, limit=10)
        assert sorted(job["id"] for job in claimed) == ["j1", "j2"]
        await store.cancel("j2")
        return (await store.get("j1", with_events=True))["events"], (await store.get("j2", with_events=True))["events"]

    j1, j2 = asyncio.run(scenario())
    orphaned = "its ingress replica ingress-a stopped answering"
    assert j1 == [(1, "retry", {"job": "j1", "reason": "lost", "scope": "turn"}),
                  (2, "retry", {"job": "j1", "attempt": 2, "reason": orphaned})]
    assert j2 == [(1, "retry", {"job": "j2", "attempt": 2, "reason": orphaned}), (2, "cancelled", {"job": "j2"})]


def test_a_store_restarted_from_its_snapshot_gives_a_running_job_to_no_one_for_two_leases(tmp_path):
    """A running job read back from the snapshot is not claimable at once (its driver may be alive and renew); two
    leases after the restart, unrenewed, it is."""
    async def scenario():
        store = JobStore(snapshot_path=str(tmp_path / "jobs.msgpack"))
        await store.create({"id": "j1"}, driver="ingress-a", lease_s=60.0)
        await store.flush()
        restarted = JobStore(snapshot_path=str(tmp_path / "jobs.msgpack"))       # what Ray's restart runs
        first_to_ask = await restarted.claim_orphans("ingress-b", lease_s=60.0, limit=10)
        assert await restarted.renew("ingress-a", ["j1"], lease_s=60.0) == []       # still its driver's
        abandoned = JobStore(snapshot_path=str(tmp_path / "jobs.msgpack"))
        later = await abandoned.claim_orphans("ingress-b", lease_s=0.0, limit=10)   # two (zero) leases on
        return first_to_ask, later

    first_to_ask, later = asyncio.run(scenario())
    assert first_to_ask == [] and [job["id"] for job in later] == ["j1"]


def test_a_jobs_end_survives_a_store_crash_before_the_next_snapshot(tmp_path):
    """The store saves its snapshot at most every `snapshot_every_s`; a job that ended since is read back ended (from
    the journal of ends), so no live replica claims it and runs it again. A torn last record (a crash while it was
    written) is skipped; a save empties the journal."""
    path = str(tmp_path / "jobs.msgpack")

    async def scenario():
        store = JobStore(snapshot_path=path, snapshot_every_s=3600.0)
        for job_id in ("j1", "j2", "j3"):
            await store.create({"id": job_id, "spec_id": job_id}, driver="ingress-a", lease_s=0.0)
        await store.flush()                                       # all three running in the snapshot
        await store.finish("j1", "ingress-a", "succeeded", {"answer": "8"}, None)
        await store.cancel("j2")
        with open(path + ".ends", "ab") as journal:               # the crash tore the next record
            journal.write(b"\x85\xa2id\xa2j3")
        restarted = JobStore(snapshot_path=path, snapshot_every_s=3600.0)      # what Ray's restart runs
        ended = {job_id: await restarted.get(job_id) for job_id in ("j1", "j2", "j3")}
        orphans = await JobStore(snapshot_path=path).claim_orphans("ingress-b", lease_s=0.0, limit=10)
        # the torn tail was cut on load: the next end is not read into it
        await restarted.finish("j3", "ingress-a", "failed", None, {"status": 500})
        after_crash = await JobStore(snapshot_path=path).get("j3")
        await restarted.flush()
        return (ended, orphans, after_crash, (tmp_path / "jobs.msgpack.ends").exists(),
                await JobStore(snapshot_path=path).get("j1"))

    ended, orphans, after_crash, journal_left, after_save = asyncio.run(scenario())
    assert (ended["j1"]["status"], ended["j1"]["result"]) == ("succeeded", {"answer": "8"})
    assert ended["j2"]["status"] == "cancelled" and ended["j2"]["last_event"] == 1
    assert ended["j3"]["status"] == "running"
    assert [job["id"] for job in orphans] == ["j3"]               # only the job that had not ended
    assert after_crash["status"] == "failed"
    assert not journal_left and after_save["status"] == "succeeded"


def test_a_job_no_replica_admits_is_the_clients_error_naming_the_knob():
    """A prompt over the memory plan's limit is refused like one over the model's context: 400, not 500."""
    from cluster.serve.jobs import job_error
    from kvcomm.memory_plan import KVBudgetError
    error = job_error("job-1", KVBudgetError("the prompt is 9000 tokens; this replica admits prompts of at most "
                                             "memory.max_prompt_tokens = 8192"))
    assert (error["status"], error["param"]) == (400, "job") and "memory.max_prompt_tokens" in error["message"]
    assert job_error("job-2", RuntimeError("boom"))["status"] == 500
