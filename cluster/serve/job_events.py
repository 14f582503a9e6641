"""The events a job emits (``GET /v1/jobs/{id}/events``, ``?stream=true``): one frozen dataclass per kind, built
where the event happens (`cluster.serve.jobs`, `cluster.serve.job_store`). `to_dict()` is the wire form: what is
sent to the job store actor, kept in its msgpack snapshot and carried by the SSE ``data:``; `kind` is the SSE
``event:`` name.

Not here: numbering and storing events (`cluster.serve.job_store`), streaming them (`cluster.serve.jobs`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Union

if TYPE_CHECKING:             # the job store imports this module and must not import torch (the engine's records)
    from kvcomm.job_runner import TurnRecord


@dataclass(frozen=True)
class TurnEvent:
    """A finished turn: its record's wire form plus the job id."""
    kind: ClassVar[str] = "turn"
    job: str
    turn: TurnRecord

    def to_dict(self) -> dict[str, Any]:
        return {**self.turn.to_dict(), "job": self.job}


@dataclass(frozen=True)
class RetryEvent:
    """The job runs something again: one lost turn (``scope: turn``, `attempt` None), or the whole job after its
    ingress replica stopped answering (`attempt`: the job's run number; no ``scope`` on the wire)."""
    kind: ClassVar[str] = "retry"
    job: str
    reason: str
    attempt: int | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.attempt is None:
            return {"job": self.job, "reason": self.reason, "scope": "turn"}
        return {"job": self.job, "attempt": self.attempt, "reason": self.reason}


@dataclass(frozen=True)
class CancelledEvent:
    """The client cancelled the job."""
    kind: ClassVar[str] = "cancelled"
    job: str

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job}


JobEvent = Union[TurnEvent, RetryEvent, CancelledEvent]
