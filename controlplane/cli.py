"""The ``dsn`` command: one entry point joining each package's own commands."""

from __future__ import annotations

import click

from dataplane.cli import consumer, producer
from gateway.cli import gateway


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "DSN"})
@click.version_option(package_name="dsn-gateway")
def main() -> None:
    """Data Streaming Node: stream detector data memory-to-memory into HPC compute nodes.

    Options can also be given as DSN_<COMMAND>_<OPTION> environment variables.
    """


main.add_command(gateway)
main.add_command(producer)
main.add_command(consumer)
