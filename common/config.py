"""The DSN configuration: one schema for the gateway's file, consumers and rendered templates.

A DSN configuration names the gateway's ingress and keys and the streaming sessions it serves. Each
session says which CURVE client keys may stream into it, from which source networks, to which
consumer endpoints (each inside the session's allowed internal targets), with which detector
geometry and limits. Everything is validated on load; an error names the key and the bad value.
"""

from __future__ import annotations

import ipaddress
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from zmq.utils import z85

from common import strictyaml
from common.errors import DsnError
from common.protocol import MAX_LANES

MAX_CONFIG_BYTES = 1024 * 1024
_Z85 = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_ENDPOINT = re.compile(r"^tcp://(?P<host>\[[0-9a-fA-F:.]+\]|[0-9.]+|\*):(?P<port>[0-9]{1,5})$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(DsnError, ValueError):
    """A DSN configuration that cannot be used; the message names the key and value."""


def _curve_key(value: str) -> str:
    if not isinstance(value, str) or not _Z85.match(value):
        raise ValueError("must be a 40-character Z85 CURVE public key")
    z85.decode(value)
    return value


def _network(value: str) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a CIDR string such as 10.1.0.0/16")
    if "%" in value:
        raise ValueError("scoped IPv6 addresses are refused")
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"not a CIDR network: {exc}") from None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped:
        raise ValueError("IPv4-mapped IPv6 networks are refused; write the IPv4 network")
    # Netmask and hostmask forms (10.0.0.0/255.0.0.0, 10.0.0.0/0.255.255.255) and bare addresses
    # parse too; only the canonical prefix form is accepted, so what is reviewed is what applies.
    if str(net) != value:
        raise ValueError(f"write the network in canonical form: {net}")
    return value


def parse_endpoint(value: str, *, allow_wildcard: bool = False) -> tuple[str, int]:
    """Split ``tcp://HOST:PORT`` into an IP literal and a port, refusing anything else."""
    match = _ENDPOINT.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise ValueError("must look like tcp://IP:PORT (an IP literal, IPv6 in brackets)")
    host, port = match["host"].strip("[]"), int(match["port"])
    if not 1 <= port <= 65_535:
        raise ValueError(f"port {port} is outside 1..65535")
    if host == "*":
        if not allow_wildcard:
            raise ValueError("a wildcard host is only allowed where the gateway binds")
        return host, port
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    return host, port


def next_port(endpoint: str) -> str:
    """``endpoint`` with the port after its own: where a gateway serves receipts by default."""
    host, port = parse_endpoint(endpoint, allow_wildcard=True)
    if port == 65_535:
        raise ValueError(f"{endpoint} has no next port; set the receipts endpoint explicitly")
    return endpoint.rsplit(":", 1)[0] + f":{port + 1}"


def _connect_endpoint(value: str) -> str:
    parse_endpoint(value)
    return value


def _bind_endpoint(value: str) -> str:
    parse_endpoint(value, allow_wildcard=True)
    return value


CurveKey = Annotated[StrictStr, AfterValidator(_curve_key)]
Cidr = Annotated[StrictStr, AfterValidator(_network)]
ConnectEndpoint = Annotated[StrictStr, AfterValidator(_connect_endpoint)]
BindEndpoint = Annotated[StrictStr, AfterValidator(_bind_endpoint)]
SessionId = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
MAX_DEFAULT_IO_THREADS = 8
FrameDim = Annotated[StrictInt, Field(ge=1, le=8192)]


class _Model(BaseModel):
    # Strict scalars (no "5" for 5, no true for 1); containers still accept YAML lists.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Detector(_Model):
    frame_shape: tuple[FrameDim, FrameDim] = (576, 576)
    sectors: Annotated[StrictInt, Field(ge=1, le=64)] = 4
    dtype: Literal["uint16"] = "uint16"

    @model_validator(mode="after")
    def _sectors_divide_rows(self) -> Detector:
        if self.frame_shape[0] % self.sectors:
            raise ValueError(f"frame_shape[0]={self.frame_shape[0]} is not a multiple of "
                             f"sectors={self.sectors}")
        return self

    @property
    def sector_bytes(self) -> int:
        return self.frame_shape[0] // self.sectors * self.frame_shape[1] * 2


class Limits(_Model):
    # ZeroMQ reads an HWM of 0 as "unlimited": a bounded queue is what makes backpressure work.
    hwm: Annotated[StrictInt, Field(ge=1, le=100_000)] = 256
    max_scan_positions: Annotated[StrictInt, Field(ge=1, le=16_777_216)] = 4_194_304
    max_producers: Annotated[StrictInt, Field(ge=1, le=1024)] = 64
    max_open_scans: Annotated[StrictInt, Field(ge=1, le=64)] = 4
    # A scan with no message for this long is closed as if its producers had ended it (a producer
    # died mid-scan); consumers then list what never came.
    scan_idle_s: Annotated[StrictInt, Field(ge=1, le=86_400)] = 300


Sha256Hex = Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]


class Lane(_Model):
    """One lane of a scan split over several gateways: lane ``lane`` of ``lanes``, from 0."""

    lane: Annotated[StrictInt, Field(ge=0, lt=MAX_LANES)]
    lanes: Annotated[StrictInt, Field(ge=2, le=MAX_LANES)]

    @model_validator(mode="after")
    def _lane_below_lanes(self) -> Lane:
        if self.lane >= self.lanes:
            raise ValueError(f"lane {self.lane} of {self.lanes}: lanes count from 0")
        return self


class Session(_Model):
    id: SessionId
    client_keys: Annotated[list[CurveKey], Field(min_length=1, max_length=1024)]
    # Set only where policy allows unencrypted transport: the session then also admits PLAIN
    # connections on the gateway's plain_ingress with username = the session id and a password
    # whose SHA-256 is this (the session token's signature; see docs/security.md).
    plain_password_sha256: Sha256Hex | None = None
    allowed_networks: Annotated[list[Cidr], Field(min_length=1, max_length=256)]
    allowed_targets: Annotated[list[Cidr], Field(min_length=1, max_length=256)]
    # Empty until HPC jobs register: a session is opened before its consumers exist.
    consumers: Annotated[list[ConnectEndpoint], Field(max_length=4096)]
    expires_at: AwareDatetime | None = None
    detector: Detector = Detector()
    limits: Limits = Limits()
    # Set where the control plane splits the session's scans over several gateways: this gateway
    # carries this lane. Its producers' scan_begins must name it (others are refused as
    # wrong_lane), and the NCEM scans it opens carry it, as gateway.ncem_lane would.
    lane: Lane | None = None

    @model_validator(mode="after")
    def _consumers_inside_targets(self) -> Session:
        targets = [ipaddress.ip_network(t) for t in self.allowed_targets]
        for endpoint in self.consumers:
            host = ipaddress.ip_address(parse_endpoint(endpoint)[0])
            if not any(host in net for net in targets):
                raise ValueError(f"consumer {endpoint} is outside allowed_targets")
        if len(set(self.consumers)) != len(self.consumers):
            raise ValueError("consumers lists an endpoint twice")
        return self

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def admits(self, address: str) -> bool:
        """True if a peer at ``address`` lies in one of the session's source networks."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in ipaddress.ip_network(net) for net in self.allowed_networks)


DEFAULT_CAPACITY: Final = 64  # sessions a gateway takes unless it says otherwise
DEFAULT_HEARTBEAT_S: Final = 2.0  # between a gateway's registrations


class StateServiceLink(_Model):
    """One more control-plane replica's state service, to follow when the others are silent."""

    state_snapshots: ConnectEndpoint
    state_updates: ConnectEndpoint
    state_key_file: Path


class ControlPlaneLink(_Model):
    """Where a gateway in control-plane mode follows the sessions: the control plane's state
    service (``dsn gateway run --controlplane-state``, ``--state-key``, ``--max-sector-bytes``)."""

    state_snapshots: ConnectEndpoint
    state_updates: ConnectEndpoint
    # The state service's CURVE public key (the control plane's STATE_DIR/keys/state.key).
    state_key_file: Path
    # The other replicas' state services, followed in turn when the one followed goes silent.
    replicas: Annotated[list[StateServiceLink], Field(max_length=16)] = []
    # Largest data message a session may carry (the ingress limit is fixed when it binds).
    max_sector_bytes: Annotated[StrictInt, Field(ge=1, le=2**31 - 1)] | None = None
    # Registration with the control plane (several gateways): where producers reach this gateway
    # (default: the ingress, receipts and plaintext ingress, when they are not wildcards; else the
    # advertised ingress's host with their ports), how many sessions it takes, and how often it
    # announces itself (its heartbeat).
    advertise: ConnectEndpoint | None = None
    advertise_receipts: ConnectEndpoint | None = None
    advertise_plain: ConnectEndpoint | None = None
    capacity: Annotated[StrictInt, Field(ge=1, le=10_000)] = DEFAULT_CAPACITY
    heartbeat_s: Annotated[float, Field(ge=0.1, le=60)] = DEFAULT_HEARTBEAT_S


SocketBuffer = Annotated[StrictInt, Field(ge=64 * 1024, le=1 << 30)]


class GatewaySettings(_Model):
    ingress: BindEndpoint = "tcp://127.0.0.1:5555"
    server_secret_key_file: Path
    metrics: Annotated[StrictStr, Field(pattern=r"^[0-9.]+:[0-9]{1,5}$")] | None = None
    # Where scans of a session without consumers are spooled; relative paths resolve like the key
    # file's (from the configuration file's directory). null turns spooling off: such scans are
    # then refused.
    spool_dir: Path | None = Path("spool")
    # A second ingress for sessions allowed unencrypted transport (PLAIN, token as password);
    # null (the default): there is none, and PLAIN connections have nowhere to go.
    plain_ingress: BindEndpoint | None = None
    # Where producers ask what became of their scans (common.receipts); default: the port after
    # the ingress's.
    receipts: BindEndpoint | None = None
    # Set: the gateway serves the sessions the control plane publishes, not the file's.
    controlplane: ControlPlaneLink | None = None
    # libzmq I/O threads. Each connection (its CURVE decryption, its socket work) is served by one
    # of them, so a producer with several connections, such as a camera's sector streams, is
    # decrypted on as many cores. Default: one per core, at most MAX_DEFAULT_IO_THREADS.
    io_threads: Annotated[StrictInt, Field(ge=1, le=64)] | None = None
    # Kernel socket buffers in bytes: SO_RCVBUF of the ingresses, SO_SNDBUF of the sockets toward
    # consumers. null (the default): the kernel sizes them as the connection goes (TCP
    # autotuning), which a long-distance hop needs. A fixed size turns autotuning off, so set one
    # only for a hop whose bandwidth-delay product it covers (within a site); the kernel caps it
    # at net.core.rmem_max / wmem_max.
    ingress_buffer_bytes: SocketBuffer | None = None
    egress_buffer_bytes: SocketBuffer | None = None
    # This gateway carries one lane of the session's NCEM scans (several gateways share them, a
    # camera module's stream each): it takes the modules whose number modulo ``lanes`` is
    # ``lane`` (others are dropped as wrong_lane), closes a scan once all of those arrived, and
    # consumers merge the lanes. null (the default): NCEM scans have one lane. Producers of the
    # native protocol name their lane themselves.
    ncem_lane: Lane | None = None

    @model_validator(mode="after")
    def _receipts_beside_the_ingress(self) -> GatewaySettings:
        if self.receipts is None:
            next_port(self.ingress)  # refuses an ingress on the last port with no receipts set
        return self

    @property
    def receipts_endpoint(self) -> str:
        return self.receipts or next_port(self.ingress)

    @property
    def io_thread_count(self) -> int:
        return self.io_threads or min(os.cpu_count() or 1, MAX_DEFAULT_IO_THREADS)


class DSNConfig(_Model):
    version: Literal[1]
    gateway: GatewaySettings
    sessions: Annotated[list[Session], Field(max_length=10_000)]

    @model_validator(mode="after")
    def _unique(self) -> DSNConfig:
        ids = [s.id for s in self.sessions]
        if len(set(ids)) != len(ids):
            raise ValueError("two sessions share an id")
        if self.gateway.controlplane is not None and self.sessions:
            raise ValueError("gateway.controlplane is set: sessions come from the control plane;"
                             " leave sessions empty")
        keys = [k for s in self.sessions for k in s.client_keys]
        if len(set(keys)) != len(keys):
            raise ValueError("a client key belongs to more than one session")
        return self

    def session(self, session_id: str) -> Session:
        for session in self.sessions:
            if session.id == session_id:
                return session
        raise ConfigError(f"sessions: no session with id {session_id!r}")


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        value = "" if err["type"] == "missing" else f" (got {err.get('input')!r:.80})"
        lines.append(f"{where}: {err['msg']}{value}")
    return "; ".join(lines)


def parse_config(data: Any, base_dir: Path | None = None) -> DSNConfig:
    """Validate an already-parsed DSN configuration; relative key and spool paths resolve
    from ``base_dir``."""
    try:
        config = DSNConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    if base_dir is None:
        return config
    paths = {"server_secret_key_file": config.gateway.server_secret_key_file,
             "spool_dir": config.gateway.spool_dir}
    relative: dict[str, object] = {key: base_dir / path for key, path in paths.items()
                                   if path is not None and not path.is_absolute()}
    link = config.gateway.controlplane
    if link is not None:
        relative["controlplane"] = link.model_copy(update={
            "state_key_file": base_dir / link.state_key_file,
            "replicas": [replica.model_copy(
                update={"state_key_file": base_dir / replica.state_key_file})
                for replica in link.replicas]})
    if relative:
        gateway = config.gateway.model_copy(update=relative)
        config = config.model_copy(update={"gateway": gateway})
    return config


def load_config(path: Path) -> DSNConfig:
    """Read and validate a DSN configuration file (strict safe YAML, at most 1 MiB)."""
    try:
        data = strictyaml.load_file(path, MAX_CONFIG_BYTES)
    except strictyaml.FileError as exc:
        raise ConfigError(str(exc)) from None
    try:
        # Absolute: paths derived from it (spool files) are reported to other hosts and processes.
        return parse_config(data, base_dir=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
