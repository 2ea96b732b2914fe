"""``dsn producer`` and ``dsn consumer``: the endpoint commands."""

from __future__ import annotations

import click


@click.group()
def producer() -> None:
    """Stream detector data into a DSN session."""


@click.group()
def consumer() -> None:
    """Receive, count and store a session's data on HPC nodes (run under mpiexec or srun)."""
