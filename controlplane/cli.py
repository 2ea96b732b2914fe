"""The ``dsn`` command: one entry point joining each package's own commands."""

from __future__ import annotations

from pathlib import Path

import click

from controlplane.admin import admin, controlplane_group
from dataplane.cli import consumer, producer, scan_shape_option
from gateway.cli import gateway


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "DSN"})
@click.version_option(package_name="dsn-gateway")
def main() -> None:
    """Data Streaming Node: stream detector data memory-to-memory into HPC compute nodes.

    Every option can also be set as an environment variable DSN_<COMMAND>_<OPTION>, for example
    DSN_DEMO_STATE_DIR.
    """


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
    from controlplane.demo import DemoError, DemoOptions, format_summary, run_demo
    from controlplane.processes import ProcessFailed

    options = DemoOptions(state_dir=state_dir, scan_shape=scan_shape, ranks=ranks, loss=loss,
                          duplicates=duplicates, seed=seed, timeout_s=timeout_s)
    try:
        summary = run_demo(options, say=lambda line: click.echo(line, err=True))
    except (DemoError, ProcessFailed) as exc:
        raise click.ClickException(f"demo failed: {exc}") from None
    click.echo(format_summary(summary))


main.add_command(gateway)
main.add_command(producer)
main.add_command(consumer)
main.add_command(controlplane_group)
main.add_command(admin)
