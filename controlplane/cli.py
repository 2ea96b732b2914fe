"""``dsn controlplane serve``: run the control plane's REST service and its state publisher."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import click

from common.clitypes import OneLineError
from common.logs import configure as configure_logging
from common.settingsfile import Given, options_given, read_settings
from controlplane.admin.bootstrap import require_initialised
from controlplane.settings import (
    DEFAULT_PORT,
    DEFAULT_STATE_DIR,
    DEFAULT_STATE_ENDPOINTS,
    FILE_LAYOUT,
    Settings,
)
from controlplane.store.base import redacted


@click.group()
def controlplane() -> None:
    """Run the control plane: the REST service for projects, tokens, policies and audit."""


# serve's options are named after the Settings field they set (a given one overrides the file),
# but for these two, which each set one half of ``state_endpoints``.
STATE_HALVES = {"state_snapshots": "snapshot", "state_updates": "updates"}


def load_settings(ctx: click.Context, config_path: Path | None) -> Settings:
    """Settings from the options given, over the --config file, over the defaults; a bad value
    is named as it was given (``FILE: launcher.name``, ``--lease-s``)."""
    from_file = read_settings(config_path, Settings, FILE_LAYOUT) if config_path else Given()
    fields = {field.name for field in dataclasses.fields(Settings)}
    given = options_given(ctx, fields).over(_state_endpoints(ctx, from_file)).over(
        from_file).over(Given({"state_dir": DEFAULT_STATE_DIR}))
    return given.build(Settings)


def _state_endpoints(ctx: click.Context, from_file: Given) -> Given:
    """--state-snapshots and --state-updates each override one half of ``state_endpoints``."""
    halves = {STATE_HALVES[name]: value for name, value in ctx.params.items()
              if name in STATE_HALVES and value is not None}
    if not halves:
        return Given()
    base = from_file.values.get("state_endpoints", DEFAULT_STATE_ENDPOINTS)
    options = "/".join(f"--state-{name}" for name in ("snapshots", "updates")
                       if STATE_HALVES[f"state_{name}"] in halves)
    return Given({"state_endpoints": base._replace(**halves)}, {"state_endpoints": options})


@controlplane.command()
@click.option("--config", "config_path", metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Service configuration (YAML; docs/configuration.md): any of the settings "
                   "below and more. Options given override it; relative paths in it are read "
                   "from its directory.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="State directory made by 'dsn admin init' (database, signing keys).  "
                   "[default: .dsn]")
@click.option("--host", default=None,
              help="Address to listen on; 0.0.0.0 or :: (every address) needs --public-url.  "
                   "[default: 127.0.0.1]")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help=f"TCP port to listen on.  [default: {DEFAULT_PORT}]")
@click.option("--public-url", metavar="URL", default=None,
              help="Where clients, gateways and consumer jobs reach this service "
                   "(https://HOST behind a proxy): the control plane URL jobs are given and the "
                   "issuer of its OAuth metadata.  [default: http://HOST:PORT]")
@click.option("--replica-url", "replica_urls", metavar="URL", multiple=True,
              help="Where the control plane runs as several replicas: a replica's public URL "
                   "(repeat for each; the same list at every replica). Consumer jobs are given "
                   "this replica's URL first, then the others, and report to the next when one "
                   "is gone.  [default: none: jobs get this replica's URL alone]")
@click.option("--policy", "policy_path", type=click.Path(exists=True, path_type=Path),
              help="Policy file, or directory of *.yaml policy files; reloads re-read it. "
                   "Default: the shipped policies/.")
@click.option("--state-snapshots", metavar="tcp://IP:PORT", default=None,
              help="Where gateways fetch session snapshots.  [default: tcp://127.0.0.1:8751]")
@click.option("--state-updates", metavar="tcp://IP:PORT", default=None,
              help="Where gateways subscribe to session updates.  [default: tcp://127.0.0.1:8752]")
@click.option("--gateway-endpoint", metavar="tcp://IP:PORT", default=None,
              help="The gateway ingress handed to producers when sessions open; not a wildcard "
                   "address.  [default: tcp://127.0.0.1:5555]")
@click.option("--gateway-receipts-endpoint", metavar="tcp://IP:PORT", default=None,
              help="The gateway's receipts endpoint (its gateway.receipts), handed to producers so "
                   "they can confirm delivery.  [default: the port after --gateway-endpoint's]")
@click.option("--gateway-plain-endpoint", metavar="tcp://IP:PORT", default=None,
              help="The gateway's plaintext ingress (its --plain-ingress), handed to producers "
                   "of sessions opened with transport 'plain'; only where the policy sets "
                   "allow_plaintext.  [default: none]")
@click.option("--gateway-key-file", metavar="PATH",
              type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The gateway's CURVE public key (the server.key 'dsn gateway keygen' wrote on "
                   "the gateway host), handed to producers.  [default: STATE_DIR/keys/server.key]")
@click.option("--gateway-metrics", metavar="URL", multiple=True,
              help="A gateway's metrics page (http://HOST:PORT/metrics, its --metrics address), "
                   "read for the per-session counters of GET /api/v1/gateways and the console's "
                   "live page; repeat for each gateway.  [default: none]")
@click.option("--launcher", default=None,
              help="How consumer jobs are started: local (mpiexec on this host) or slurm "
                   "(sbatch).  [default: local]")
@click.option("--jobs-dir", "jobs_root", metavar="DIR",
              type=click.Path(file_okay=False, path_type=Path),
              default=None,
              help="Where each consumer job gets its directory (script, token file, output); "
                   "with slurm, a directory the compute nodes share.  [default: STATE_DIR/jobs]")
@click.option("--lease-s", type=int, default=None,
              help="Seconds a consumer stays registered without a heartbeat (1-3600).  "
                   "[default: 30]")
@click.option("--drain-s", type=int, default=None,
              help="Seconds after a session ends during which its consumer jobs may still report "
                   "the results of the scans they finish, and leave (0-3600).  [default: 60]")
@click.option("--audit-checkpoints", "audit_checkpoint_file", metavar="PATH",
              type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File the signed checkpoints of the audit chain are appended to; keep it out "
                   "of reach of whoever could rewrite the database (chattr +a, another disk or "
                   "host).  [default: STATE_DIR/audit-checkpoints.jsonl]")
@click.option("--database-url", metavar="URL", envvar="DSN_DATABASE_URL", default=None,
              help="Keep the state in this PostgreSQL database (postgresql://USER@HOST/DB), which "
                   "several control planes may share, instead of the SQLite file in the state "
                   "directory. Best given as DSN_DATABASE_URL or in the --config file, with the "
                   "password in ~/.pgpass or PGPASSWORD, not on a command line.  "
                   "[default: STATE_DIR/controlplane.sqlite3]")
@click.pass_context
def serve(ctx: click.Context, /, config_path: Path | None, **_options: object) -> None:
    """Serve the REST API until SIGINT or SIGTERM.

    Settings come from the options given, then the --config file, then the defaults. Refuses to
    start on a state directory that 'dsn admin init' has not initialised (the service never
    creates keys or an admin token by itself), and when it would hand jobs or producers a
    wildcard address.
    """
    from aiohttp import web  # the web stack loads only for the command that serves

    from controlplane.app import create_app
    from controlplane.middlewares import AccessLogger, quiet_protocol_errors

    settings = load_settings(ctx, config_path)
    asyncio.run(require_initialised(settings))
    if not settings.audit_checkpoints.parent.is_dir():
        raise OneLineError(f"audit checkpoint file {settings.audit_checkpoints}: its directory "
                           "does not exist (audit.checkpoint_file, --audit-checkpoints)")
    app = create_app(settings)

    def announce(_message: str) -> None:  # called once the socket is bound
        store = (redacted(settings.database_url) if settings.database_url
                 else str(settings.database))
        click.echo(f"control plane on {settings.base_url}, reached at "
                   f"{settings.public_base_url} (state {settings.state_dir}, store {store}, jobs "
                   f"{settings.jobs_dir})", err=True)

    # JSON lines on stderr. Tokens travel only in the Authorization header, which is not logged;
    # the access log names the path without its query string, where a client might put one.
    configure_logging("dsn")
    configure_logging("aiohttp.access")
    configure_logging("aiohttp.server")
    quiet_protocol_errors()
    host, port = settings.host, settings.port
    try:
        web.run_app(app, host=host, port=port, print=announce, handle_signals=True,
                    access_log_class=AccessLogger)
    except OSError as exc:
        raise OneLineError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
