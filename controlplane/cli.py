"""``dsn controlplane serve``: run the control plane's REST service and its state publisher."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from common.clitypes import OneLineError
from common.clone import StateEndpoints
from common.logs import configure as configure_logging
from controlplane.admin.bootstrap import require_initialised
from controlplane.settings import DEFAULT_PORT, DEFAULT_STATE_DIR, DEFAULT_STATE_ENDPOINTS, Settings


def _settings(state_dir: Path, **overrides: Any) -> Settings:
    """Settings from the options given; the rest keep Settings' defaults."""
    return Settings(state_dir=state_dir,
                    **{key: value for key, value in overrides.items() if value is not None})


@click.group()
def controlplane() -> None:
    """Run the control plane: the REST service for projects, tokens, policies and audit."""


@controlplane.command()
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_STATE_DIR, show_default=True,
              help="State directory made by 'dsn admin init' (database, signing keys).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="TCP port to listen on.")
@click.option("--policy", "policy_path", type=click.Path(exists=True, path_type=Path),
              help="Policy file, or directory of *.yaml policy files; reloads re-read it. "
                   "Default: the shipped policies/.")
@click.option("--state-snapshots", metavar="tcp://IP:PORT", default=None,
              help="Where gateways fetch session snapshots.  [default: tcp://127.0.0.1:8751]")
@click.option("--state-updates", metavar="tcp://IP:PORT", default=None,
              help="Where gateways subscribe to session updates.  [default: tcp://127.0.0.1:8752]")
@click.option("--gateway-endpoint", metavar="tcp://IP:PORT", default=None,
              help="The gateway ingress handed to producers when sessions open.  "
                   "[default: tcp://127.0.0.1:5555]")
@click.option("--gateway-receipts-endpoint", metavar="tcp://IP:PORT", default=None,
              help="The gateway's receipts endpoint (its gateway.receipts), handed to producers so "
                   "they can confirm delivery.  [default: the port after --gateway-endpoint's]")
@click.option("--gateway-plain-endpoint", metavar="tcp://IP:PORT", default=None,
              help="The gateway's plaintext ingress (its --plain-ingress), handed to producers "
                   "of sessions opened with transport 'plain'; only where the policy sets "
                   "allow_plaintext.  [default: none]")
@click.option("--audit-checkpoints", "audit_checkpoint_file", metavar="PATH",
              type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File the signed checkpoints of the audit chain are appended to; keep it out "
                   "of reach of whoever could rewrite the database (chattr +a, another disk or "
                   "host).  [default: STATE_DIR/audit-checkpoints.jsonl]")
@click.option("--public-url", metavar="URL", default=None,
              help="Where clients reach this service (https://HOST behind a proxy): the issuer "
                   "and endpoint URLs of its OAuth metadata.  [default: http://HOST:PORT]")
def serve(state_dir: Path, host: str, port: int, policy_path: Path | None,
          state_snapshots: str | None, state_updates: str | None,
          gateway_endpoint: str | None, gateway_receipts_endpoint: str | None,
          gateway_plain_endpoint: str | None, audit_checkpoint_file: Path | None,
          public_url: str | None) -> None:
    """Serve the REST API until SIGINT or SIGTERM.

    Refuses to start on a state directory that 'dsn admin init' has not initialised: the service
    never creates keys or an admin token by itself.
    """
    from aiohttp import web  # the web stack loads only for the command that serves

    from controlplane.app import create_app
    from controlplane.middlewares import AccessLogger, quiet_protocol_errors

    endpoints = StateEndpoints(state_snapshots or DEFAULT_STATE_ENDPOINTS.snapshot,
                               state_updates or DEFAULT_STATE_ENDPOINTS.updates)
    settings = _settings(state_dir, host=host, port=port, policy_path=policy_path,
                         state_endpoints=endpoints, gateway_endpoint=gateway_endpoint,
                         gateway_receipts_endpoint=gateway_receipts_endpoint,
                         gateway_plain_endpoint=gateway_plain_endpoint,
                         audit_checkpoint_file=audit_checkpoint_file, public_url=public_url)
    asyncio.run(require_initialised(settings))
    app = create_app(settings)

    def announce(_message: str) -> None:  # called once the socket is bound
        click.echo(f"control plane on {settings.base_url} (state {state_dir})", err=True)

    # JSON lines on stderr. Tokens travel only in the Authorization header, which is not logged;
    # the access log names the path without its query string, where a client might put one.
    configure_logging("dsn")
    configure_logging("aiohttp.access")
    configure_logging("aiohttp.server")
    quiet_protocol_errors()
    try:
        web.run_app(app, host=host, port=port, print=announce, handle_signals=True,
                    access_log_class=AccessLogger)
    except OSError as exc:
        raise OneLineError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
