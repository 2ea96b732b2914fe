"""``dsn gateway``: run a DSN gateway, create its CURVE server key pair.

Two ways to run: ``--config`` serves the sessions of a static DSN configuration;
``--controlplane-state`` (or ``gateway.controlplane`` in the file) serves the sessions the control
plane's state service publishes (opened, ended and expired over REST), with the gateway's own
settings from flags or a gateway-only configuration (``sessions: []``); flags override the file.
In control-plane mode the gateway also registers with the control plane (``--advertise``,
``--capacity``), so that sessions can be placed on it among several gateways.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple, NoReturn

import click

from common.clitypes import one_for_each
from common.clone import Registration, StateEndpoints, StateServer
from common.config import (
    DEFAULT_CAPACITY,
    DEFAULT_HEARTBEAT_S,
    ConfigError,
    ControlPlaneLink,
    Detector,
    DSNConfig,
    GatewaySettings,
    StateServiceLink,
    load_config,
    next_port,
    parse_config,
    parse_endpoint,
)
from common.keys import KeyFileError, create_keypair, load_keypair, load_secret_keypair
from common.logs import configure as configure_logging
from common.tuning import keep_message_buffers
from gateway.errors import GatewayError
from gateway.metrics import serve_metrics
from gateway.proxy import Gateway, Mode
from gateway.state import CloneSessionSource

log = logging.getLogger("dsn.gateway")
SERVER_KEY_NAME = "server"
# At shutdown, how long reports of interrupted scans may take to reach the control plane.
REPORT_FLUSH_S = 3.0


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.group()
def gateway() -> None:
    """Run and manage a DSN gateway (the layer-7 ZeroMQ proxy)."""


@gateway.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="DSN configuration (YAML). In control-plane mode (--controlplane-state, or "
                   "gateway.controlplane in the file): the gateway section only (sessions: []); "
                   "the options given override it.")
@click.option("--mode", type=click.Choice(["l7", "l4"]), default="l7", show_default=True,
              help="l7 inspects and routes every message; l4 forwards blindly (comparison).")
@click.option("--metrics", "metrics_address", metavar="HOST:PORT",
              help="Serve Prometheus metrics here (overrides gateway.metrics).")
@click.option("--controlplane-state", "state_endpoints", metavar="SNAPSHOT,UPDATES",
              multiple=True,
              help="Serve the sessions of the control plane's state service, e.g. "
                   "tcp://10.0.0.5:8751,tcp://10.0.0.5:8752 (default: gateway.controlplane."
                   "state_snapshots,state_updates of --config). Repeat it for each control-plane "
                   "replica: the gateway follows the first and moves to the next whenever the "
                   "one it follows goes silent.")
@click.option("--state-key", "state_key_files", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The state service's CURVE public key (its STATE_DIR/keys/state.key; default "
                   "gateway.controlplane.state_key_file). With several --controlplane-state: one "
                   "per replica in the same order, or one for all.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path),
              help="This gateway's CURVE key pair (.key_secret; default gateway."
                   "server_secret_key_file): the ingress server key producers are given, and in "
                   "control-plane mode its identity to the state service (the control plane's "
                   "STATE_DIR/gateways/ must hold the public .key).")
@click.option("--ingress", metavar="tcp://IP:PORT", help="Where producers connect "
              "(default gateway.ingress or tcp://127.0.0.1:5555).")
@click.option("--receipts", metavar="tcp://IP:PORT",
              help="Where producers ask what became of their scans (default gateway.receipts, "
                   "or the port after the ingress's).")
@click.option("--plain-ingress", metavar="tcp://IP:PORT",
              help="A second ingress for sessions whose policy allows unencrypted transport "
                   "(PLAIN, session id and token signature; default gateway.plain_ingress, none).")
@click.option("--spool-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Spool directory, also holding the scan journal (default gateway.spool_dir "
                   "or ./spool).")
@click.option("--ncem-lane", metavar="LANE/LANES",
              help="Carry lane LANE of LANES of the NCEM scans (gateway.ncem_lane): the camera "
                   "modules m with m mod LANES == LANE. With --ingress, --receipts, --metrics "
                   "and --spool-dir, one configuration file serves every lane's gateway.")
@click.option("--max-sector-bytes", type=click.IntRange(1, 2**31 - 1),
              help="Largest data message a session may carry (control-plane mode; the ingress "
                   "limit is fixed when it binds). Default gateway.controlplane.max_sector_bytes, "
                   f"else {Detector().sector_bytes}, the 4D Camera's.")
@click.option("--sync-timeout", type=click.FloatRange(0.1, 3600), default=10.0, show_default=True,
              help="Seconds to wait for the first snapshot of the sessions before giving up.")
@click.option("--advertise", metavar="tcp://IP:PORT",
              help="Where producers reach the ingress, announced to the control plane (control-"
                   "plane mode; default gateway.controlplane.advertise, else the ingress unless it "
                   "binds a wildcard; with neither the gateway does not register).")
@click.option("--advertise-receipts", metavar="tcp://IP:PORT",
              help="Where producers reach the receipts endpoint (default gateway.controlplane."
                   "advertise_receipts, else the receipts endpoint unless it is a wildcard, else "
                   "the advertised host with its port).")
@click.option("--advertise-plain", metavar="tcp://IP:PORT",
              help="Where producers reach the plaintext ingress, if there is one (default as for "
                   "--advertise-receipts).")
@click.option("--capacity", type=click.IntRange(1, 10_000),
              help="Open sessions the control plane may place on this gateway (default "
                   "gateway.controlplane.capacity, 64).")
@click.option("--heartbeat", "heartbeat_s", type=click.FloatRange(0.1, 60),
              help="Seconds between registrations, the gateway's heartbeat (default "
                   "gateway.controlplane.heartbeat_s, 2); the control plane's gateway_timeout_s "
                   "should be at least three of them.")
def run(config_path: Path | None, mode: Mode, metrics_address: str | None,
        state_endpoints: tuple[str, ...], state_key_files: tuple[Path, ...],
        key_file: Path | None,
        ingress: str | None, receipts: str | None, plain_ingress: str | None,
        spool_dir: Path | None, ncem_lane: str | None, max_sector_bytes: int | None,
        sync_timeout: float,
        advertise: str | None, advertise_receipts: str | None, advertise_plain: str | None,
        capacity: int | None, heartbeat_s: float | None) -> None:
    """Run a gateway until SIGTERM or SIGINT."""
    configure_logging("dsn")
    keep_message_buffers()
    source: CloneSessionSource | None = None
    try:
        loaded = load_config(config_path) if config_path is not None else None
        flags = Overrides(key_file, ingress, receipts, plain_ingress, spool_dir, ncem_lane)
        if not state_endpoints and (loaded is None or loaded.gateway.controlplane is None):
            _static_only(state_key_files or None, max_sector_bytes, advertise,
                         advertise_receipts, advertise_plain, capacity, heartbeat_s)
            if loaded is None:
                raise ConfigError("give --config, or --controlplane-state with --state-key")
            gateway_settings = _gateway_settings(loaded.gateway.model_dump(mode="json"), flags)
            gw = Gateway(loaded.model_copy(update={"gateway": gateway_settings}), mode=mode)
            gw.start()
        else:
            config = _gateway_only_config(loaded, config_path, flags)
            announced = Announced(advertise, advertise_receipts, advertise_plain, capacity,
                                  heartbeat_s)
            servers = _state_servers(config.gateway.controlplane, state_endpoints,
                                     state_key_files)
            gw, source = _live_gateway(config, mode, servers,
                                       max_sector_bytes, sync_timeout, announced)
    except (ConfigError, KeyFileError, GatewayError) as exc:
        _fail(str(exc))
    try:
        _run_with_metrics(gw, mode, metrics_address or gw.config.gateway.metrics)
    finally:
        if source is not None:
            source.stop(flush_s=REPORT_FLUSH_S)


def _static_only(*live_options: object) -> None:
    if any(option is not None for option in live_options):
        raise ConfigError("--state-key, --max-sector-bytes, --advertise*, --capacity and "
                          "--heartbeat apply only in control-plane mode "
                          "(--controlplane-state, or gateway.controlplane in the --config file)")


class Overrides(NamedTuple):
    """Gateway settings given as flags, in either mode (None: the file's, else the default)."""

    key_file: Path | None
    ingress: str | None
    receipts: str | None
    plain_ingress: str | None
    spool_dir: Path | None
    ncem_lane: str | None  # LANE/LANES


def _gateway_settings(settings: dict[str, Any], flags: Overrides) -> GatewaySettings:
    """``settings`` (a file's gateway section, as JSON values) overridden by the flags given,
    validated as the file's would be."""
    named = {"server_secret_key_file": None if flags.key_file is None else str(flags.key_file),
             "ingress": flags.ingress, "receipts": flags.receipts,
             "plain_ingress": flags.plain_ingress,
             "spool_dir": None if flags.spool_dir is None else str(flags.spool_dir),
             "ncem_lane": None if flags.ncem_lane is None else _lane(flags.ncem_lane)}
    given = {name: value for name, value in named.items() if value is not None}
    return parse_config({"version": 1, "gateway": {**settings, **given}, "sessions": []}).gateway


def _lane(text: str) -> dict[str, int]:
    lane, slash, lanes = text.partition("/")
    if not (slash and lane.isdigit() and lanes.isdigit()):
        raise ConfigError(f"--ncem-lane: expected LANE/LANES such as 0/2, got {text!r}")
    return {"lane": int(lane), "lanes": int(lanes)}


def _gateway_only_config(loaded: DSNConfig | None, config_path: Path | None,
                         flags: Overrides) -> DSNConfig:
    """The gateway's own settings: the configuration file's, overridden by the flags given."""
    settings: dict[str, Any] = {}
    if loaded is not None:
        if loaded.sessions:
            raise ConfigError(f"{config_path}: sessions come from the control plane; "
                              "leave sessions empty")
        settings = loaded.gateway.model_dump(mode="json")
    elif flags.key_file is None:
        raise ConfigError("--controlplane-state needs --key (or --config naming the key)")
    return DSNConfig(version=1, gateway=_gateway_settings(settings, flags), sessions=[])


def _state_servers(link: ControlPlaneLink | None, endpoints: tuple[str, ...],
                   key_files: tuple[Path, ...]) -> list[StateServer]:
    """The state services to follow, in order: the flags', else the file's (``link``)."""
    if not endpoints:
        if link is None:
            raise ConfigError("give --controlplane-state, or gateway.controlplane in --config")
        if key_files:
            raise ConfigError("--state-key goes with --controlplane-state")
        links: list[ControlPlaneLink | StateServiceLink] = [link, *link.replicas]
        return [_state_server(StateEndpoints(one.state_snapshots, one.state_updates),
                              one.state_key_file) for one in links]
    if not key_files and link is not None and not link.replicas:
        key_files = (link.state_key_file,)
    if not key_files:
        raise ConfigError("--controlplane-state needs --state-key (the state service's public key)")
    keys = one_for_each(key_files, len(endpoints))
    if keys is None:
        raise ConfigError(f"{len(endpoints)} --controlplane-state and {len(key_files)} "
                          "--state-key: give one key per state service, or one for all")
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError("--controlplane-state: the same state service is named twice")
    return [_state_server(_state_endpoints(text), key)
            for text, key in zip(endpoints, keys, strict=True)]


def _state_server(endpoints: StateEndpoints, key_file: Path) -> StateServer:
    return StateServer(endpoints, load_keypair(key_file).public)


def _state_endpoints(text: str) -> StateEndpoints:
    parts = text.split(",")
    if len(parts) != 2:
        raise ConfigError(f"--controlplane-state: expected SNAPSHOT,UPDATES, got {text!r}")
    for endpoint in parts:
        try:
            parse_endpoint(endpoint)
        except ValueError as exc:
            raise ConfigError(f"--controlplane-state: {endpoint!r} {exc}") from None
    return StateEndpoints(*parts)


class Announced(NamedTuple):
    """The registration options given as flags (None: the file's, else the default)."""

    advertise: str | None
    receipts: str | None
    plain: str | None
    capacity: int | None
    heartbeat_s: float | None


def _reachable(name: str, explicit: str | None, bound: str | None,
               advertised_host: str | None) -> str | None:
    """Where producers reach an endpoint bound at ``bound``: ``explicit``, else ``bound`` unless
    it is a wildcard, else ``advertised_host`` with its port."""
    if explicit is not None:
        try:
            parse_endpoint(explicit)
        except ValueError as exc:
            raise ConfigError(f"--{name}: {explicit!r} {exc}") from None
        return explicit
    if bound is None:
        return None
    host, port = parse_endpoint(bound, allow_wildcard=True)
    if host != "*":
        return bound
    if advertised_host is None:
        return None
    return f"tcp://{advertised_host}:{port}"


def _registration(config: DSNConfig, flags: Announced, public_key: bytes
                  ) -> Registration | None:
    """What this gateway announces to the control plane; None when no address producers can reach
    is known (a wildcard ingress and no --advertise): the control plane then hands producers the
    gateway its own settings name, as on a single-gateway site."""
    gateway, link = config.gateway, config.gateway.controlplane
    if link is not None:
        flags = Announced(flags.advertise or link.advertise, flags.receipts or
                          link.advertise_receipts, flags.plain or link.advertise_plain,
                          flags.capacity or link.capacity, flags.heartbeat_s)
    endpoint = _reachable("advertise", flags.advertise, gateway.ingress, None)
    if endpoint is None:
        log.warning("not registering with the control plane: the ingress binds a wildcard; give "
                    "--advertise to take part in session placement")
        return None
    host, _ = parse_endpoint(endpoint)
    host = f"[{host}]" if ":" in host else host
    receipts = _reachable("advertise-receipts", flags.receipts,
                          gateway.receipts or next_port(gateway.ingress), host)
    plain = _reachable("advertise-plain", flags.plain, gateway.plain_ingress, host)
    assert receipts is not None  # bound, so reachable
    return Registration(endpoint=endpoint, receipts_endpoint=receipts, plain_endpoint=plain,
                        server_key=public_key.decode("ascii"),
                        capacity=flags.capacity or DEFAULT_CAPACITY)


def _live_gateway(config: DSNConfig, mode: Mode, servers: list[StateServer],
                  max_sector_bytes: int | None, sync_timeout: float,
                  announced: Announced) -> tuple[Gateway, CloneSessionSource]:
    """A started gateway serving the state service's sessions, once their first snapshot is in.
    The options given override the file's ``gateway.controlplane``."""
    if mode != "l7":
        raise ConfigError("--mode l4 forwards one fixed session; use --config for it")
    if config.gateway.ncem_lane is not None:
        raise ConfigError("gateway.ncem_lane (--ncem-lane): the control plane tells each gateway "
                          "which lane of a session it carries ('dsn sessions open --lanes'); set "
                          "the NCEM lane only with a static --config")
    link = config.gateway.controlplane
    max_sector_bytes = max_sector_bytes or (link.max_sector_bytes if link else None)
    keypair = load_secret_keypair(config.gateway.server_secret_key_file)
    registration = _registration(config, announced, keypair.public)
    gw = Gateway(config, mode=mode,
                 max_sector_bytes=max_sector_bytes or Detector().sector_bytes, lanes=False)
    source = CloneSessionSource(
        servers, keypair, gw.use_table,
        registration=registration,
        register_s=announced.heartbeat_s or (link.heartbeat_s if link else DEFAULT_HEARTBEAT_S))
    gw.on_report = source.report
    source.start()
    try:
        if not source.wait_synced(sync_timeout):
            raise GatewayError(
                f"no sessions from the state service at "
                f"{' or '.join(','.join(server.endpoints) for server in servers)} within "
                f"{sync_timeout:g} s:"
                " is the control plane running, is --state-key its state.key, and is this "
                "gateway's public key in its STATE_DIR/gateways/?")
        gw.start()
    except BaseException:
        source.stop()
        raise
    # A table handed on while start() built the forwarding loop may have missed the loop: hand
    # the current one again (adopting the same table twice changes nothing).
    gw.use_table(source.load())
    return gw, source


def _run_with_metrics(gw: Gateway, mode: Mode, address: str | None) -> None:
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
    settings = gw.config.gateway
    lane = settings.ncem_lane
    log.info("start", extra={"fields": {
        "mode": mode, "ingress": settings.ingress, "receipts": settings.receipts_endpoint,
        "sessions": len(gw.table), "consumers": sum(len(e.session.consumers) for e in gw.table),
        "metrics": metrics_address,
        "ncem_lane": None if lane is None else f"{lane.lane}/{lane.lanes}"}})
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
