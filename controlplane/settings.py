"""The control plane service's configuration: one frozen object, read once at start-up.

``dsn controlplane serve`` builds it from flags, ``DSN_*`` variables and a ``--config`` file
(``FILE_LAYOUT`` says how a file writes each field); tests build it directly and
inject a clock, so token lifetimes, rate-limit windows and key retirement move without sleeping.
"""

from __future__ import annotations

import functools
import ipaddress
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeAlias
from urllib.parse import urlsplit

from common.clone import StateEndpoints
from common.config import next_port, parse_endpoint
from common.errors import InvalidSetting
from common.restclient import base_url_key, parse_base_urls
from common.settingsfile import Layout
from controlplane.launchers import LAUNCHERS
from controlplane.store.base import DATABASE_URL_SCHEMES, redacted

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_STATE_DIR: Final = Path(".dsn")
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8750
DATABASE_NAME: Final = "controlplane.sqlite3"
CHECKPOINTS_NAME: Final = "audit-checkpoints.jsonl"
# Stable names, not URLs: tokens stay valid when the service moves to another host or port.
ISSUER: Final = "dsn-controlplane"
API_AUDIENCE: Final = "dsn-api"
GATEWAY_AUDIENCE: Final = "dsn-gateway"
DEFAULT_GATEWAY_ENDPOINT: Final = "tcp://127.0.0.1:5555"
DEFAULT_STATE_ENDPOINTS: Final = StateEndpoints("tcp://127.0.0.1:8751", "tcp://127.0.0.1:8752")


def _shipped_policies() -> Path:
    """The policies shipped with the package: the source tree's, else the installed data copy."""
    source = Path(__file__).resolve().parent.parent / "policies"
    if source.is_dir():
        return source
    return Path(sysconfig.get_paths()["purelib"]) / "dsn_data" / "policies"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``create_app`` needs.

    ``issuer`` is the ``iss`` of every token this service signs and accepts. ``policy_path`` is the
    policy file or directory (``policies/*.yaml``) loaded at start and on reload. ``leeway_s``
    forgives clock skew on ``exp``/``iat``/``nbf``. ``body_timeout_s`` bounds how long a request
    body may take to arrive. ``min_free_bytes``: below this much free space on the state directory's
    disk the service is not ready. ``client_max_size`` bounds every request body
    (bytes) but a scan result's, which may carry a long loss manifest (``MAX_REPORT_BYTES``).
    ``jwks_max_age_s`` is the JWKS cache lifetime: verifiers refetch at least this often, so a key
    must be published this long before it signs (rotation keeps the old keys published).

    Audit: ``audit_checkpoint_file`` is where signed checkpoints of the audit chain are appended
    (default ``STATE_DIR/audit-checkpoints.jsonl``; put it where whoever could rewrite the database
    cannot rewrite it), every ``audit_checkpoint_s`` in which the chain grew.
    ``audit_denial_window_s``: repeated refusals of one principal (no or a bad token, a spent rate
    limit) are recorded once per window plus one record counting the rest; 0 records each one.

    Sessions: ``gateway_endpoint`` is where producers connect (and the gateway binds);
    ``gateway_plain_endpoint`` the gateway's plaintext ingress, if it has one (sessions opened with
    transport ``plain``, where the policy allows unencrypted transport);
    ``gateway_receipts_endpoint`` where the gateway answers producers what became of their scans
    (default: the port after ``gateway_endpoint``'s, as the gateway's own default);
    ``gateway_key_file`` is the gateway's CURVE public key certificate (default
    ``STATE_DIR/keys/server.key``, as ``dsn gateway keygen --out STATE_DIR/keys`` writes it; the
    secret sits beside it as ``server.key_secret``);
    ``launcher`` names the consumer-job launcher (``local`` or ``slurm``), and each launcher has its
    own settings, handed to it only when it is the one named (None: the launcher's default):
    ``local_grace_s``, how long a cancelled local job has between SIGTERM and SIGKILL (30);
    ``slurm_timeout_s``, how long an ``sbatch``/``squeue``/``sacct``/``scancel`` call may take (30);
    ``slurm_sbatch_args``, options added to every ``sbatch`` (``--partition=...``).
    ``lease_s`` is how long a consumer stays live without a heartbeat; ``drain_s`` how long after
    a session ends its jobs' consumer tokens may still report results and leave, while the ranks
    the end signalled drain; ``jobs_root`` (the file's
    ``jobs_dir``, ``--jobs-dir``) is where each job gets its directory (default ``STATE_DIR/jobs``,
    see ``jobs_dir``; with Slurm, a directory the compute nodes share, which the state directory
    with its SQLite database should not be on).

    ``public_url`` is the URL clients reach the service at (behind a TLS proxy); it is the
    ``issuer`` of the RFC 8414 metadata, the base of its endpoint URLs, and the control plane URL
    consumer jobs are given (default ``base_url``). ``replica_urls``: where the control plane runs
    as several replicas, every replica's public URL (the same list in each replica's settings);
    consumer jobs are given this replica's URL first and then the others
    (``job_controlplane_urls``), so that a job started by one replica reports to another when
    that one is gone. A service listening on every address (``host``
    ``0.0.0.0`` or ``::``) has no address to hand out, so it needs ``public_url``. Tokens keep
    ``issuer`` as their ``iss``: a name, so they survive a move. No address handed to others (the
    public URL, the gateway endpoints producers are given) may be a wildcard.
    ``trusted_proxies`` are the networks (CIDRs) of the reverse proxies in front of the service: a
    request from one is attributed to the client its ``X-Forwarded-For`` names (the right-most
    address not itself a trusted proxy), for the per-source rate limit, the audit and the access
    log. From any other peer the header is ignored, so a client cannot choose its own address.
    ``gateway_metrics`` are the URLs of the gateways' metrics pages (each gateway's ``--metrics``
    address as ``http://HOST:PORT/metrics``): ``GET /api/v1/gateways`` and the console's live
    page read the per-session counters there.
    ``console_session_s`` is the longest a web-console sign-in lasts (never past its token's
    expiry); its cookie is ``Secure`` when ``public_url`` is https or the request came over TLS.

    Store: ``database_url`` (``postgresql://user@host/db``) puts the state in that PostgreSQL
    database, which several control planes may share; None (the default) keeps it in the SQLite
    file ``STATE_DIR/controlplane.sqlite3``. Its password is best left out of it (``~/.pgpass`` or
    ``PGPASSWORD``); it is never logged.

    State service: ``state_endpoints`` are where gateways fetch snapshots (ROUTER) and subscribe to
    updates (PUB); ``reconcile_s`` is how often the published sessions are compared with the store,
    which is how expiries (sessions, leases) reach the gateways. Its CURVE key pair is
    ``STATE_DIR/keys/state.key(_secret)``; the gateways it admits are the public key files
    ``STATE_DIR/gateways/*.key``.

    Several gateways: a gateway registers itself over the state service and repeats it as its
    heartbeat; it is live while its last registration is younger than ``gateway_timeout_s`` (set
    it to at least three of the gateways' ``--heartbeat`` intervals). Sessions are placed on live
    registered gateways its project may use (``controlplane.placement``, the policy's
    ``gateways``); the open sessions of a gateway silent for longer are moved to another. With no
    live registered gateway at all a session goes to the configured one above
    (``gateway_endpoint``, ``gateway_key_file``), as on a single-gateway site, unless
    ``gateway_fallback`` is false: then opening a session is refused (503).
    """

    state_dir: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    issuer: str = ISSUER
    policy_path: Path = field(default_factory=_shipped_policies)
    leeway_s: int = 30
    client_max_size: int = 64 * 1024
    body_timeout_s: float = 30.0
    min_free_bytes: int = 64 * 1024 * 1024
    jwks_max_age_s: int = 300
    audit_checkpoint_file: Path | None = None
    audit_checkpoint_s: float = 10.0
    audit_denial_window_s: float = 60.0
    api_audience: str = API_AUDIENCE
    gateway_audience: str = GATEWAY_AUDIENCE
    clock: Callable[[], float] = time.time
    gateway_endpoint: str = DEFAULT_GATEWAY_ENDPOINT
    gateway_key_file: Path | None = None
    gateway_plain_endpoint: str | None = None
    gateway_receipts_endpoint: str | None = None
    launcher: str = "local"
    local_grace_s: float | None = None
    slurm_timeout_s: float | None = None
    slurm_sbatch_args: tuple[str, ...] = ()
    lease_s: int = 30
    drain_s: int = 60
    jobs_root: Path | None = None
    state_endpoints: StateEndpoints = DEFAULT_STATE_ENDPOINTS
    reconcile_s: float = 1.0
    public_url: str | None = None
    replica_urls: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    console_session_s: int = 8 * 3600
    gateway_metrics: tuple[str, ...] = ()
    gateway_timeout_s: float = 10.0
    gateway_fallback: bool = True
    # Out of the repr: the URL may carry the database password.
    database_url: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _within("port", self.port, 1, 65535)
        _within("leeway_s", self.leeway_s, 0, 300)
        _within("client_max_size", self.client_max_size, 1024, 16 * 1024 * 1024)
        _within("body_timeout_s", self.body_timeout_s, 0, 600, above=True)
        _within("min_free_bytes", self.min_free_bytes, 0, None)
        _within("jwks_max_age_s", self.jwks_max_age_s, 0, 86400)
        _within("audit_checkpoint_s", self.audit_checkpoint_s, 0, 3600, above=True)
        _within("audit_denial_window_s", self.audit_denial_window_s, 0, 3600)
        _require(bool(self.issuer.strip()), "issuer", self.issuer, "must not be empty")
        _within("lease_s", self.lease_s, 1, 3600)
        _within("drain_s", self.drain_s, 0, 3600)
        _within("console_session_s", self.console_session_s, 60, 7 * 86400)
        _require(self.launcher in LAUNCHERS, "launcher", self.launcher,
                 f"unknown launcher; known: {', '.join(sorted(LAUNCHERS))}")
        for name in ("local_grace_s", "slurm_timeout_s"):
            if (seconds := getattr(self, name)) is not None:
                _within(name, seconds, 0, 3600, above=True)
        for arg in self.slurm_sbatch_args:
            # Handed to sbatch as separate arguments, never through a shell: one option each,
            # so a space means two options were run together.
            _require(arg.startswith("-") and not any(c.isspace() for c in arg),
                     "slurm_sbatch_args", arg, "each is one sbatch option, such as "
                     "--partition=debug, with no spaces")
        for name in ("gateway_endpoint", "gateway_plain_endpoint", "gateway_receipts_endpoint"):
            if (value := getattr(self, name)) is not None:
                _check_handed_endpoint(name, value)
        for endpoint in self.state_endpoints:
            try:
                parse_endpoint(endpoint, allow_wildcard=True)
            except ValueError as exc:
                raise InvalidSetting("state_endpoints", endpoint, str(exc)) from None
        _within("reconcile_s", self.reconcile_s, 0, 3600, above=True)
        _within("gateway_timeout_s", self.gateway_timeout_s, 0, 3600, above=True)
        _require(self.public_url is None or _is_base_url(self.public_url), "public_url",
                 self.public_url, "must be an http(s) URL whose host is not a wildcard "
                 "address, with no query or fragment")
        _require(self.public_url is not None or not _is_wildcard(self.host), "host", self.host,
                 "listens on every address, which is no address to hand to jobs and gateways: "
                 "set public_url (--public-url), the URL they reach this service at")

        _check_replica_urls(self.replica_urls)
        _check_metrics_urls(self.gateway_metrics)
        if self.database_url is not None:
            _check_database_url(self.database_url)
        for network in self.trusted_proxies:
            try:
                ipaddress.ip_network(network)
            except ValueError as exc:
                raise InvalidSetting("trusted_proxies", network, str(exc)) from None

    @property
    def proxy_networks(self) -> tuple[IPNetwork, ...]:
        return _networks(self.trusted_proxies)

    @property
    def gateway_receipts(self) -> str:
        """Where the gateway answers receipts: as set, else the port after its ingress's."""
        return self.gateway_receipts_endpoint or next_port(self.gateway_endpoint)

    @property
    def launcher_options(self) -> dict[str, object]:
        """The named launcher's own settings, those set (the launcher defaults the rest)."""
        options: dict[str, object | None] = (
            {"grace_s": self.local_grace_s} if self.launcher == "local" else
            {"timeout_s": self.slurm_timeout_s, "sbatch_args": self.slurm_sbatch_args or None})
        return {name: value for name, value in options.items() if value is not None}

    @property
    def database(self) -> Path:
        """The SQLite database file (used unless ``database_url`` names a PostgreSQL one)."""
        return self.state_dir / DATABASE_NAME

    @property
    def store_location(self) -> Path | str:
        """What ``Store.open`` is given: ``database_url`` if set, else the SQLite file."""
        return self.database_url or self.database

    @property
    def audit_checkpoints(self) -> Path:
        return self.audit_checkpoint_file or self.state_dir / CHECKPOINTS_NAME

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def public_base_url(self) -> str:
        """Where clients reach the service (``public_url`` behind a proxy, else ``base_url``):
        the issuer identifier of its RFC 8414 metadata."""
        return (self.public_url or self.base_url).rstrip("/")

    @property
    def job_controlplane_urls(self) -> tuple[str, ...]:
        """The control plane URLs consumer jobs are given, in the order they try them: this
        replica's (``public_base_url``), then the other ``replica_urls``."""
        own = self.public_base_url
        others = (url.rstrip("/") for url in self.replica_urls
                  if base_url_key(url) != base_url_key(own))
        return (own, *others)

    @property
    def gateway_public_key_file(self) -> Path:
        # Absolute: the path is written into rendered configurations read from other directories.
        return (self.gateway_key_file or self.state_dir / "keys" / "server.key").resolve()

    @property
    def gateway_secret_key_file(self) -> Path:
        public = self.gateway_public_key_file
        return public.with_name(public.name + "_secret")

    @property
    def state_public_key_file(self) -> Path:
        return self.state_dir / "keys" / "state.key"

    @property
    def state_secret_key_file(self) -> Path:
        return self.state_dir / "keys" / "state.key_secret"

    @property
    def gateways_dir(self) -> Path:
        """The allow-list of gateways: one CURVE public key file (``NAME.key``) per gateway."""
        return self.state_dir / "gateways"

    @property
    def jobs_dir(self) -> Path:
        """Where job directories are made (absolute: job scripts on other hosts name it)."""
        return (self.jobs_root or self.state_dir / "jobs").resolve()


# How ``dsn controlplane serve --config FILE`` writes the fields: ``gateway_endpoint`` as
# ``gateway: {endpoint: ...}``, ``audit_checkpoint_s`` as ``audit: {checkpoint_s: ...}``, each
# launcher's own settings under ``launcher.NAME`` beside ``launcher.name``; every other field
# under its own name.
FILE_LAYOUT: Final = Layout(groups=frozenset({"gateway", "audit"}),
                            renamed={"launcher": "launcher.name",
                                     "local_grace_s": "launcher.local.grace_s",
                                     "slurm_timeout_s": "launcher.slurm.timeout_s",
                                     "slurm_sbatch_args": "launcher.slurm.sbatch_args",
                                     "jobs_root": "jobs_dir"},
                            # Names every token carries: not for a site to change.
                            internal=frozenset({"clock", "issuer", "api_audience",
                                                "gateway_audience"}))


@functools.cache
def _networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    # Asked on every request: parsed once per setting.
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


def _is_base_url(url: str) -> bool:
    # RFC 8414 §2: an https URL with no query or fragment (http for loopback and tests).
    parts = urlsplit(url)
    return parts.scheme in ("https", "http") and bool(parts.hostname) and not parts.query \
        and not parts.fragment and not _is_wildcard(parts.hostname or "")


def _is_wildcard(host: str) -> bool:
    """Every local address (``0.0.0.0``, ``::``, ``*``, or empty as aiohttp reads it)."""
    try:
        return host in ("", "*") or ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False  # a host name


MAX_GATEWAYS: Final = 64
MAX_REPLICAS: Final = 16


def _check_replica_urls(urls: tuple[str, ...]) -> None:
    _require(len(urls) <= MAX_REPLICAS, "replica_urls", f"{len(urls)} URLs",
             f"at most {MAX_REPLICAS} replicas")
    for url in urls:
        # Handed to jobs on other hosts: as public_url, a URL they can reach.
        _require(_is_base_url(url), "replica_urls", url, "must be an http(s) URL whose host is "
                 "not a wildcard address, with no query or fragment")
    if urls:
        try:
            parse_base_urls(urls)
        except ValueError as exc:
            raise InvalidSetting("replica_urls", ", ".join(urls), str(exc)) from None


def _check_metrics_urls(urls: tuple[str, ...]) -> None:
    _require(len(urls) <= MAX_GATEWAYS, "gateway_metrics", f"{len(urls)} URLs",
             f"at most {MAX_GATEWAYS} gateways are scraped")
    for url in urls:
        # Scraped by the service on behalf of every caller: a plain http(s) URL of one host, with
        # no credentials in it (they would show in the answer and the logs).
        parts = urlsplit(url)
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        _require(parts.scheme in ("http", "https") and bool(parts.hostname) and port_ok
                 and parts.username is None and parts.password is None and not parts.fragment
                 and not any(c.isspace() for c in url), "gateway_metrics", url,
                 "must be an http(s) URL of a gateway's metrics page, such as "
                 "http://gateway-host:9100/metrics (no user, password or fragment)")
        _require(urls.count(url) == 1, "gateway_metrics", url, "is listed twice")


def _check_database_url(url: str) -> None:
    parts = urlsplit(url)
    # Named by its redacted form: the error is shown and may be logged, the password must not be.
    _require(parts.scheme in DATABASE_URL_SCHEMES and len(parts.path) > 1
             and not any(c.isspace() for c in url), "database_url", redacted(url),
             "must be a PostgreSQL URL naming its database, such as "
             "postgresql://dsn@db-host/dsn (the password from ~/.pgpass or PGPASSWORD)")


def _check_handed_endpoint(name: str, value: str) -> None:
    try:
        host, _port = parse_endpoint(value)
    except ValueError as exc:
        raise InvalidSetting(name, value, str(exc)) from None
    _require(not _is_wildcard(host), name, value, "producers are handed this address: name the "
             "one they reach the gateway at, not a wildcard")


def _within(key: str, value: float, low: float, high: float | None, *,
            above: bool = False) -> None:
    """``low <= value <= high`` (``low < value`` if ``above``; no upper bound if ``high`` is
    None)."""
    ok = (value > low if above else value >= low) and (high is None or value <= high)
    lower = f"more than {low}" if above else f"at least {low}"
    _require(ok, key, value, f"must be {lower}" + (f" and at most {high}" if high else ""))


def _require(ok: bool, key: str, value: object, reason: str) -> None:
    if not ok:
        raise InvalidSetting(key, value, reason)
