"""The admin commands' client: the shared REST client with the admin token.

The token comes from ``--token-file`` or ``$DSN_ADMIN_TOKEN`` (both at once is an error, never a
silent choice), else ``STATE_DIR/admin.token``; never from the command line, so it cannot leak
through ``ps`` or shell history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.restclient import call_json, quote
from common.tokenfile import FoundToken, token_from
from controlplane.admin.bootstrap import ADMIN_TOKEN_FILE

ADMIN_TOKEN_ENV = "DSN_ADMIN_TOKEN"
# An admin command waits longer than a data-plane call: a verify reads the whole audit log.
HTTP_TIMEOUT_S = 30.0


def admin_token(token_file: Path | None, state_dir: Path) -> FoundToken:
    return token_from(token_file, env=ADMIN_TOKEN_ENV, default=state_dir / ADMIN_TOKEN_FILE)


@dataclass(frozen=True)
class AdminClient:
    """The control plane at ``url``, called with an admin token (found at ``token_source``): one
    command, a request or two."""

    url: str
    token: str = field(repr=False)
    token_source: str = ""

    @classmethod
    def found(cls, url: str, token_file: Path | None, state_dir: Path) -> AdminClient:
        found = admin_token(token_file, state_dir)
        return cls(url, found.token, found.source)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             headers: dict[str, str] | None = None) -> dict[str, Any]:
        return call_json(self.url, self.token, method, path, body, headers=headers,
                         timeout_s=HTTP_TIMEOUT_S)

    def items(self, path: str) -> list[dict[str, Any]]:
        """The ``items`` of a list answer."""
        return list(self.call("GET", path).get("items", []))


def template_path(name: str, suffix: str = "") -> str:
    return f"/api/v1/templates/{quote(name)}{suffix}"
