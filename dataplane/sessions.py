"""A producer's sessions over the control plane's REST API: open one (registering the producer's
CURVE public key, which the gateway then admits) and end it.

Both calls take a project token. Failures are ``RestError`` (``common.restclient``) with the
status, the problem's title, detail, field errors and request id, never the token. A control plane
that does not answer, or answers 429 or 503, is asked again a few times with backoff: those mean the
request was not acted on. Other 5xx answers are not retried for an open, since a second open with
the same key would be refused (409) if the first one did take effect.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from common.credentials import PlainCredentials
from common.restclient import RestError, call_json, check_base_url, quote, with_retries

SESSIONS_PATH = "/api/v1/sessions"
DEFAULT_TEMPLATE = "4dstem"
RETRY_ATTEMPTS = 4
Transport = Literal["curve", "plain"]


@dataclass(frozen=True)
class OpenedSession:
    """What a producer needs from an opened session: where to stream and whom to trust.

    ``gateway_server_key`` is the gateway's Z85 CURVE public key; ``session_token`` is the session
    token the control plane returned once (audience: the gateway), kept out of ``repr``;
    ``gateway_plain_endpoint`` the gateway's plaintext ingress, if it has one;
    ``gateway_receipts_endpoint`` where it answers what became of a scan.
    """

    id: str
    expires_at: datetime
    gateway_endpoint: str
    gateway_server_key: bytes
    session_token: str = field(repr=False)
    config: dict[str, Any] = field(repr=False, default_factory=dict)
    gateway_plain_endpoint: str | None = None
    gateway_receipts_endpoint: str | None = None

    @property
    def plain_credentials(self) -> PlainCredentials:
        return PlainCredentials.of(self.id, self.session_token)

    @property
    def consumers(self) -> list[str]:
        """The consumer endpoints the session had when it opened (none before a job joins)."""
        return [endpoint for session in self.config.get("sessions", [])
                for endpoint in session.get("consumers", [])]

    @classmethod
    def from_answer(cls, answer: dict[str, Any]) -> OpenedSession:
        try:
            gateway = answer["gateway"]
            server_key = str(gateway["server_key"]).encode("ascii")
            if len(server_key) != 40:
                raise ValueError("the gateway's server key is not a 40-character Z85 key")
            plain, receipts = gateway.get("plain_endpoint"), gateway.get("receipts_endpoint")
            return cls(id=str(answer["id"]),
                       expires_at=datetime.fromisoformat(answer["expires_at"]),
                       gateway_endpoint=str(gateway["endpoint"]), gateway_server_key=server_key,
                       session_token=str(answer["token"]), config=dict(answer["config"]),
                       gateway_plain_endpoint=None if plain is None else str(plain),
                       gateway_receipts_endpoint=None if receipts is None else str(receipts))
        except (KeyError, TypeError, ValueError, UnicodeEncodeError) as exc:
            # The answer holds a token: name only the problem, never the answer itself.
            raise RestError(f"the control plane's session record is malformed: "
                            f"{type(exc).__name__}: {exc}", None) from None


def open_session(controlplane_url: str, project_token: str, *, project: str, template: str,
                 params: dict[str, Any], client_public_key: bytes, ttl: int | None = None,
                 transport: Transport = "curve", timeout_s: float = 10.0,
                 sleep: Callable[[float], None] = time.sleep) -> OpenedSession:
    """Open a session of ``project`` from DSN template ``template``; the gateway will admit the
    producer holding the secret of ``client_public_key`` (Z85), and with ``transport`` "plain"
    (where the policy allows it) the ``plain_credentials`` on its plaintext ingress too."""
    check_base_url(controlplane_url)
    body: dict[str, Any] = {"project": project, "template": template, "params": params,
                            "client_key": client_public_key.decode("ascii"),
                            "transport": transport}
    if ttl is not None:
        body["ttl"] = ttl
    answer = with_retries(
        lambda: call_json(controlplane_url, project_token, "POST", SESSIONS_PATH, body,
                          timeout_s=timeout_s),
        attempts=RETRY_ATTEMPTS, sleep=sleep, retry_if=_not_acted_on)
    return OpenedSession.from_answer(answer)


def end_session(controlplane_url: str, project_token: str, session_id: str, *,
                timeout_s: float = 10.0, sleep: Callable[[float], None] = time.sleep) -> None:
    """End the session (idempotent): the gateway stops admitting its key and drops its messages."""
    check_base_url(controlplane_url)
    path = f"{SESSIONS_PATH}/{quote(session_id)}"
    # Ending is idempotent, so any retryable failure may be retried.
    with_retries(lambda: call_json(controlplane_url, project_token, "DELETE", path, None,
                                   timeout_s=timeout_s),
                 attempts=RETRY_ATTEMPTS, sleep=sleep)


def _not_acted_on(exc: Exception) -> bool:
    return isinstance(exc, RestError) and exc.status in (None, 429, 503)
