"""A job is a small explicit record: one status enum, timestamps, the validated request, the
result or the error. Transitions live here and only here; terminal states never change."""

from __future__ import annotations

import dataclasses
import enum
import secrets
from dataclasses import dataclass, field
from typing import Any

import orjson


class Status(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELED})
_ALLOWED: dict[Status, frozenset[Status]] = {
    Status.QUEUED: frozenset({Status.RUNNING, Status.FAILED, Status.CANCELED}),
    # RUNNING -> QUEUED: a draining worker hands the job back. RUNNING -> RUNNING: another
    # worker claimed it after its first worker went silent (the visibility timeout).
    Status.RUNNING: frozenset(
        {Status.QUEUED, Status.RUNNING, Status.SUCCEEDED, Status.FAILED, Status.CANCELED}
    ),
    Status.SUCCEEDED: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELED: frozenset(),
}


class TransitionRefused(Exception):
    """The record is terminal (or the move is not allowed); nothing was changed."""


def new_job_id() -> str:
    """URL-safe, unguessable: knowing one id tells nothing about another."""
    return "job_" + secrets.token_urlsafe(16)


@dataclass(frozen=True, slots=True)
class JobResult:
    seed: int
    width: int
    height: int
    format: str
    batch_size: int
    queue_ms: float
    inference_ms: float


@dataclass(frozen=True, slots=True)
class JobError:
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    status: Status
    created_at: float
    request: dict[str, Any]
    """The validated parameters (a `schema.T2IRequest` as a dict; never secrets)."""
    format: str
    owner: str = ""
    """A digest of the API key that created the job ("" without auth); scopes idempotency."""
    webhook: str | None = None
    priority: int = 0
    tenant: str = ""
    """The tenant (a name from `--api-keys`) whose fair share and limits it counts against."""
    started_at: float | None = None
    completed_at: float | None = None
    attempts: int = 0
    result: JobResult | None = None
    error: JobError | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def moved(self, status: Status, **changes: Any) -> JobRecord:
        """This record in `status`; raises `TransitionRefused` for a move not allowed."""
        if status not in _ALLOWED[self.status]:
            raise TransitionRefused(f"job {self.id}: {self.status} -> {status} not allowed")
        return dataclasses.replace(self, status=status, **changes)

    def dumps(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def loads(cls, raw: bytes | str) -> JobRecord:
        data = orjson.loads(raw)
        data["status"] = Status(data["status"])
        if data.get("result") is not None:
            data["result"] = JobResult(**data["result"])
        if data.get("error") is not None:
            data["error"] = JobError(**data["error"])
        return cls(**data)
