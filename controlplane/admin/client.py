"""The admin commands' client: the shared REST client with the admin token.

The token comes from ``--token-file`` or ``$DSN_ADMIN_TOKEN`` (both at once is an error, never a
silent choice), else ``STATE_DIR/admin.token``; never from the command line, so it cannot leak
through ``ps`` or shell history. A control plane running as several replicas is named by all
their URLs; a call that cannot connect to one goes to the next (``common.restclient.Replicas``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.restclient import Replicas, quote
from common.tokenfile import FoundToken, token_from
from controlplane.admin.bootstrap import ADMIN_TOKEN_FILE

ADMIN_TOKEN_ENV = "DSN_ADMIN_TOKEN"
# An admin command waits longer than a data-plane call: a verify reads the whole audit log.
HTTP_TIMEOUT_S = 30.0


def admin_token(token_file: Path | None, state_dir: Path) -> FoundToken:
    return token_from(token_file, env=ADMIN_TOKEN_ENV, default=state_dir / ADMIN_TOKEN_FILE)


@dataclass(frozen=True)
class AdminClient:
    """The control plane at ``replicas``, called with an admin token (found at
    ``token_source``): one command, a request or two."""

    replicas: Replicas
    token: str = field(repr=False)
    token_source: str = ""

    @classmethod
    def found(cls, urls: str | Sequence[str], token_file: Path | None,
              state_dir: Path) -> AdminClient:
        """``urls`` (one, or the replicas' comma-separated; ValueError for a bad list)."""
        found = admin_token(token_file, state_dir)
        return cls(Replicas(urls), found.token, found.source)

    @property
    def url(self) -> str:
        """The base URL of the replica in use."""
        return self.replicas.url

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             headers: dict[str, str] | None = None) -> dict[str, Any]:
        return self.replicas.call_json(self.token, method, path, body, headers=headers,
                                       timeout_s=HTTP_TIMEOUT_S)

    def items(self, path: str) -> list[dict[str, Any]]:
        """The ``items`` of a list answer."""
        return list(self.call("GET", path).get("items", []))


def template_path(name: str, suffix: str = "") -> str:
    return f"/api/v1/templates/{quote(name)}{suffix}"
