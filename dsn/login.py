"""``dsn login``: trade a facility identity token for a project token at the control plane.

RFC 8693 token exchange at ``POST /api/v1/token``: the identity token (an OpenID Connect ID token
from the facility's login service) is the ``subject_token``; the control plane verifies it against
the issuer's keys, maps it to a project by the admin's federation rules, and answers with a
project token, which is written to a new 0600 file. Given the URLs of several control-plane
replicas, the exchange goes to the next when no connection to one can be made. Neither token is
ever on the command line, in a message or in a log line.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from common.errors import DsnError
from common.restclient import REQUEST_TIMEOUT_S, Replicas, RestError, send

TOKEN_PATH: Final = "/api/v1/token"
GRANT: Final = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN: Final = "urn:ietf:params:oauth:token-type:id_token"
PROJECT_TOKEN: Final = "urn:dsn:params:token-type:project"


class LoginError(DsnError):
    """The control plane refused the identity, or could not be asked."""


@dataclass(frozen=True)
class ProjectToken:
    token: str
    project: str
    jti: str
    scope: str
    expires_in: int

    def __repr__(self) -> str:  # the token is a secret: never in a repr
        return f"ProjectToken(project={self.project!r}, jti={self.jti!r})"


def login(controlplane_urls: str | Sequence[str], id_token: str, *, project: str | None = None,
          scope: str | None = None, timeout_s: float = REQUEST_TIMEOUT_S) -> ProjectToken:
    """Exchange ``id_token`` for a project token at the control plane (one URL, or its
    replicas'); LoginError names the control plane's reason."""
    try:
        replicas = Replicas(controlplane_urls)
    except ValueError as exc:
        raise LoginError(str(exc)) from None
    form = {"grant_type": GRANT, "subject_token": id_token, "subject_token_type": ID_TOKEN,
            "requested_token_type": PROJECT_TOKEN}
    form.update({name: value for name, value in (("project", project), ("scope", scope))
                 if value is not None})
    data = urllib.parse.urlencode(form).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    try:
        answer = replicas.call(f"POST {TOKEN_PATH}", lambda url: send(
            url, "POST", TOKEN_PATH, data, headers, timeout_s=timeout_s), idempotent=False)
    except RestError as exc:
        raise LoginError(str(exc)) from None
    if not answer.ok:
        raise LoginError(f"login refused: {_refusal(answer.status, answer.body)}")
    return _answer(answer.body)


def _answer(raw: bytes) -> ProjectToken:
    try:
        answer: Any = json.loads(raw)
        return ProjectToken(token=str(answer["access_token"]), project=str(answer["project"]),
                            jti=str(answer["jti"]), scope=str(answer["scope"]),
                            expires_in=int(answer["expires_in"]))
    except (ValueError, KeyError, TypeError):
        # The answer holds a token: name the problem, never the answer.
        raise LoginError("the control plane's answer is not a token response") from None


def _refusal(status: int, raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        description = " ".join(str(body.get("error_description", "")).split())[:500]
        return f"{status} {body['error']}: {description}"
    return f"{status} {' '.join(raw.decode(errors='replace').split())[:200]}"
