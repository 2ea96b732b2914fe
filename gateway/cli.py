"""``dsn gateway``: run a DSN gateway."""

from __future__ import annotations

import click


@click.group()
def gateway() -> None:
    """Run and manage a DSN gateway (the layer-7 ZeroMQ proxy)."""
