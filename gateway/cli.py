"""``dsn gateway``: run a DSN gateway, create its CURVE server key pair."""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import NoReturn

import click

from dataplane.config import ConfigError, load_config
from dataplane.keys import KeyFileError, create_keypair, load_keypair
from dataplane.logs import configure as configure_logging
from gateway.errors import GatewayError
from gateway.metrics import serve_metrics
from gateway.proxy import Gateway, Mode

log = logging.getLogger("dsn.gateway")
SERVER_KEY_NAME = "server"


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.group()
def gateway() -> None:
    """Run and manage a DSN gateway (the layer-7 ZeroMQ proxy)."""


@gateway.command()
@click.option("--config", "config_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="DSN configuration (YAML).")
@click.option("--mode", type=click.Choice(["l7", "l4"]), default="l7", show_default=True,
              help="l7 inspects and routes every message; l4 forwards blindly (comparison).")
@click.option("--metrics", "metrics_address", metavar="HOST:PORT",
              help="Serve Prometheus metrics here (overrides gateway.metrics).")
def run(config_path: Path, mode: Mode, metrics_address: str | None) -> None:
    """Run a gateway until SIGTERM or SIGINT."""
    configure_logging("dsn")
    try:
        config = load_config(config_path)
        gw = Gateway(config, mode=mode)
        gw.start()
    except (ConfigError, KeyFileError, GatewayError) as exc:
        _fail(str(exc))
    address = metrics_address or config.gateway.metrics
    try:
        server = serve_metrics(address, gw) if address else None
    except GatewayError as exc:
        gw.close()
        _fail(str(exc))
    _serve(gw, mode, address)
    if server is not None:
        server.shutdown()
        server.server_close()


def _serve(gw: Gateway, mode: Mode, metrics_address: str | None) -> None:
    def on_signal(signum: int, _frame: FrameType | None) -> None:
        gw.stop()
        log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    log.info("start", extra={"fields": {
        "mode": mode, "ingress": gw.config.gateway.ingress, "sessions": len(gw.table),
        "consumers": sum(len(e.session.consumers) for e in gw.table),
        "metrics": metrics_address}})
    try:
        gw.run()
    finally:
        counters = gw.counters()
        gw.close()
        log.info("stop", extra={"fields": {"uptime_s": round(time.monotonic() - started, 3),
                                           "forwarding_blocked": gw.stuck,
                                           "counters": counters}})


@gateway.command()
@click.option("--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="Directory for the key pair.")
def keygen(out_dir: Path) -> None:
    """Create the gateway's CURVE server key pair; prints the public key for producers."""
    existing = [p for p in (out_dir / f"{SERVER_KEY_NAME}.key",
                            out_dir / f"{SERVER_KEY_NAME}.key_secret") if p.exists()]
    if existing:
        _fail(f"{existing[0]} exists; refusing to overwrite a key pair")
    try:
        public_file, _secret_file = create_keypair(out_dir, SERVER_KEY_NAME)
    except OSError as exc:
        _fail(f"cannot write a key pair in {out_dir}: {exc.strerror}")
    click.echo(load_keypair(public_file).public.decode("ascii"))
