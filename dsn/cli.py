"""The ``dsn`` command: one entry point over each package's own commands.

Each subcommand group is imported only when it runs (or when ``--help`` lists it), so
``dsn consumer run`` loads the data plane and nothing of the control plane or the gateway.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import click

from common.clitypes import (
    CONTROLPLANE_URLS_HELP,
    ControlPlaneURLs,
    ReportingGroup,
    scan_shape_option,
)

# name -> "module:attribute" of the click group, imported on first use.
SUBCOMMANDS = {
    "admin": "controlplane.admin.commands:admin",
    "consumer": "dataplane.consumer.cli:consumer",
    "controlplane": "controlplane.cli:controlplane",
    "gateway": "gateway.cli:gateway",
    "jobs": "dsn.facility:jobs",
    "producer": "dataplane.cli:producer",
    "scans": "dsn.facility:scans",
    "sessions": "dsn.facility:sessions",
}


class LazyGroup(ReportingGroup):
    """A group whose subcommands named in ``commands`` are imported when first needed."""

    def __init__(self, *args: Any, commands: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self._lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self._lazy.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command


@click.group(cls=LazyGroup, commands=SUBCOMMANDS,
             context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "DSN"})
@click.version_option(package_name="dsn-gateway")
def main() -> None:
    """Data Streaming Node: stream detector data memory-to-memory into HPC compute nodes.

    Every option can also be set as an environment variable DSN_<COMMAND>_<OPTION>, for example
    DSN_DEMO_STATE_DIR.
    """


@main.command("login")
@click.option("--controlplane", "controlplane_urls", type=ControlPlaneURLs(), required=True,
              metavar="URL[,URL...]", help=CONTROLPLANE_URLS_HELP)
@click.option("--id-token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File (mode 0600) holding the ID token from the facility's login service. "
                   "[default: the DSN_ID_TOKEN environment variable]")
@click.option("--project", default=None,
              help="The project to log in to, where the federation maps the identity to "
                   "several. [default: the one it maps to]")
@click.option("--scope", default=None,
              help="Fewer scopes than the federation's rule grants, space-separated. "
                   "[default: all it grants]")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="New file (created 0600, never overwritten) for the project token, as "
                   "'dsn producer stream --project-token-file' reads it.")
def login_command(controlplane_urls: tuple[str, ...], id_token_file: Path | None,
                  project: str | None, scope: str | None, out_file: Path) -> None:
    """Log in with a facility identity: exchange its ID token for a project token.

    The control plane verifies the ID token against the facility issuer's published keys and
    maps it, by the administrator's federation rules, to a project and scopes; no administrator
    is involved. The ID token is read from a file or the environment, never from the command
    line.
    """
    from common.clitypes import OneLineError
    from common.privatefs import create_private_file
    from common.tokenfile import token_from
    from dsn.login import login

    if out_file.exists():
        raise OneLineError(f"{out_file} exists; refusing to overwrite it")
    id_token = token_from(id_token_file, env="DSN_ID_TOKEN", option="--id-token-file").token
    issued = login(controlplane_urls, id_token, project=project, scope=scope)
    create_private_file(out_file, f"{issued.token}\n".encode())
    click.echo(f"project token written to {out_file} (0600): project={issued.project} "
               f"jti={issued.jti} expires_in={issued.expires_in}s scope={issued.scope}")


@main.command()
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".dsn"),
              show_default=True, help="Where the control plane's state, logs and output files go.")
@scan_shape_option(default="32x32")
@click.option("--ranks", type=click.IntRange(1, 64), default=2, show_default=True,
              help="MPI ranks of the consumer job.")
@click.option("--loss", type=click.FloatRange(0, 0.5), default=0.001, show_default=True,
              help="Fraction of sectors lost before the gateway (like detector UDP loss).")
@click.option("--duplicates", type=click.FloatRange(0, 0.5), default=0.001, show_default=True,
              help="Fraction of sectors the producers send twice.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic scan.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(1), default=300, show_default=True,
              help="Seconds to wait for the consumer job.")
def demo(state_dir: Path, scan_shape: tuple[int, int], ranks: int, loss: float, duplicates: float,
         seed: int, timeout_s: float) -> None:
    """Stream a synthetic 4D-STEM scan through the whole system and verify the result.

    Starts a control plane (SQLite) and a gateway on loopback, creates a project, a project token
    and a session, launches the session's consumer job (mpiexec) through the control plane, streams
    the scan from four producers, waits for the listed result, checks the HDF5 file against the
    planted electrons and stempy's own counting, prints a summary and stops everything. Exits
    non-zero, with the reason and the relevant log lines, if any step fails.
    """
    from dsn.demo import DemoOptions, format_summary, run_demo
    from dsn.errors import DemoError

    options = DemoOptions(state_dir=state_dir, scan_shape=scan_shape, ranks=ranks, loss=loss,
                          duplicates=duplicates, seed=seed, timeout_s=timeout_s)
    try:
        summary = run_demo(options, say=lambda line: click.echo(line, err=True))
    except DemoError as exc:
        raise click.ClickException(f"demo failed: {exc}") from None
    click.echo(format_summary(summary))
