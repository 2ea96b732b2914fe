"""The consumer's side of the control plane's REST API: register, heartbeat, leave, report.

The calls go through the shared REST client: every failure is its ``RestError``, naming the call,
the status and the control plane's own explanation, with ``retryable`` for the ones worth another
attempt. A control plane running as several replicas is given as all their URLs: a call that
cannot connect to one goes to the next (``common.restclient.Replicas``). The token travels only in
the ``Authorization`` header and is never part of a message or a log record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from common.restclient import REQUEST_TIMEOUT_S, Replicas, RestError, quote
from dataplane.consumer.errors import SetupError


@dataclass(frozen=True)
class Registration:
    """What a rank tells the control plane about itself."""

    endpoint: str
    rank: int
    job_id: str
    host: str


@dataclass(frozen=True)
class Lease:
    """A registered consumer and how long its lease lasts (both times from the control plane),
    and when its session last moved to another gateway (None: never, or a control plane that
    does not say)."""

    consumer_id: str
    registered_at: datetime
    expires_at: datetime
    session_moved_at: datetime | None = None

    @property
    def seconds(self) -> float:
        return (self.expires_at - self.registered_at).total_seconds()

    @classmethod
    def from_answer(cls, answer: dict[str, Any]) -> Lease:
        try:
            moved = answer.get("session_moved_at")
            return cls(str(answer["id"]), datetime.fromisoformat(answer["registered_at"]),
                       datetime.fromisoformat(answer["lease_expires_at"]),
                       None if moved is None else datetime.fromisoformat(moved))
        except (KeyError, TypeError, ValueError) as exc:
            raise RestError(f"the control plane's consumer record is malformed: {exc!r}",
                            None) from None


@dataclass(frozen=True)
class ControlPlaneClient:
    """The control plane at ``urls`` (``http://HOST:PORT``, or its replicas' URLs: a sequence or
    one comma-separated string), called with a consumer token."""

    urls: str | Sequence[str]
    token: str = field(repr=False)
    timeout_s: float = REQUEST_TIMEOUT_S
    replicas: Replicas = field(init=False)

    def __post_init__(self) -> None:
        try:
            # Frozen: the replicas (and the one in use) are set once, here.
            object.__setattr__(self, "replicas", Replicas(self.urls))
        except ValueError as exc:
            raise SetupError(str(exc)) from None

    @property
    def base_url(self) -> str:
        """The base URL of the replica in use."""
        return self.replicas.url

    def register(self, session: str, me: Registration) -> Lease:
        answer = self._call("POST", f"{_session_path(session)}/consumers", {
            "endpoint": me.endpoint, "rank": me.rank, "job_id": me.job_id, "host": me.host})
        return Lease.from_answer(answer)

    def heartbeat(self, session: str, consumer_id: str) -> Lease:
        path = f"{_session_path(session)}/consumers/{quote(consumer_id)}"
        return Lease.from_answer(self._call("PUT", path, None))

    def leave(self, session: str, consumer_id: str) -> None:
        self._call("DELETE", f"{_session_path(session)}/consumers/{quote(consumer_id)}", None)

    def report(self, session: str, scan: int, result: dict[str, Any]) -> None:
        self._call("POST", f"{_session_path(session)}/scans/{scan}/result", result)

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        return self.replicas.call_json(self.token, method, path, body, timeout_s=self.timeout_s)


def _session_path(session: str) -> str:
    return f"/api/v1/sessions/{quote(session)}"
