"""The control plane's aiohttp application factory.

``create_app(settings)`` registers the routes of ``ROUTES`` (each once, with its declared
checks), the middlewares and the OpenAPI document. The services (store, key ring, policies, token
service, rate limiter, audit log, state service) open in a ``cleanup_ctx`` when the app starts and
close with it, so a test can build the app twice on one state directory to check what survives a
restart. Beside them, each replica writes the summaries of the denials it saw and re-reads the
published signing keys; the duties that must run once whatever the number of replicas on one
database (adopting jobs, the signed checkpoints of the audit chain, expiring rate counters) run in
the leader (``controlplane.leader``). A start on a chain its checkpoints disown is refused.
The state service publishes the live sessions to the gateways (``controlplane.state``): the session
views publish each change they commit, and its reconcile loop publishes expiries. It also stores
the gateways' registrations, and a placement loop moves the sessions of a gateway whose
registrations stopped (``controlplane.placement``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import zmq
from aiohttp import web

from common.keys import KeyFileError, load_keypair, load_secret_keypair
from controlplane import admins, gateways, live, oauth, policy_api, views
from controlplane.anchor import Checkpoints
from controlplane.audit import AuditLog
from controlplane.console import web as console
from controlplane.errors import ConfigurationError, ControlPlaneError
from controlplane.federation import federation_ctx
from controlplane.launchers import get_launcher
from controlplane.leader import Duty, LeaderLock, Leadership, SoleLock, leading
from controlplane.metrics import Metrics
from controlplane.middlewares import (
    METRICS,
    MIDDLEWARES,
    ROUTE_SPECS,
    SERVICES,
    RouteSpec,
    Services,
)
from controlplane.openapi import OPENAPI, build_document
from controlplane.policy import ACTIONS, PolicyHolder, load_policies
from controlplane.ratelimit import Counters, MemoryCounters, RateLimiter
from controlplane.sessions import api as sessions_api
from controlplane.sessions.repository import live_sessions
from controlplane.sessions.service import (
    adopt_jobs,
    record_gateway_report,
    register_gateway,
    replace_stranded,
)
from controlplane.settings import Settings
from controlplane.signing import REFRESH_S, KeyRing
from controlplane.state import Placed, ReplicaSignal, StateService, StateSettings
from controlplane.store.engine import Store
from controlplane.store.tokens import Revocations
from controlplane.templates import api as templates_api
from controlplane.tokens import Authenticator, TokenService

log = logging.getLogger("dsn.controlplane")

# Every served route, each declared once; feature modules contribute their own route tables.
ROUTES: tuple[RouteSpec, ...] = (*views.ROUTES, *admins.ROUTES, *oauth.ROUTES,
                                 *templates_api.ROUTES, *sessions_api.ROUTES, *gateways.ROUTES,
                                 *live.ROUTES, *policy_api.ROUTES, *console.ROUTES)


def _check_routes(routes: tuple[RouteSpec, ...]) -> None:
    """A protected route must name a catalogued action and a resource; refuse to start otherwise."""
    for spec in routes:
        if spec.public:
            continue
        if spec.action not in ACTIONS or spec.resource is None:
            raise ConfigurationError(f"route {spec.method} {spec.path} declares no known action "
                                     f"({spec.action!r}) or no resource")


def _services_ctx(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def open_services(app: web.Application) -> AsyncIterator[None]:
        store = await Store.open(settings.store_location)
        try:
            state = _state_service(settings, store)
            try:
                app[SERVICES] = services = await _build_services(settings, store, app[METRICS],
                                                                 state)
                state.on_report = functools.partial(record_gateway_report, services)
                state.on_register = functools.partial(register_gateway, services)
                try:
                    await _check_checkpoints(services.checkpoints)
                    async with leading(_leadership(services)):
                        await _start_state(state, settings)
                        async with _replica_upkeep(services):
                            yield
                finally:
                    await services.limiter.aclose()
            finally:
                await state.close()
            for launcher in services.launchers.values():
                await launcher.close()  # a local job cannot outlive the parent that polls it
        finally:
            await store.close()
    return open_services


async def _check_checkpoints(checkpoints: Checkpoints) -> None:
    """Fail closed: never extend a chain that its signed checkpoints say was cut or rewritten."""
    problem = await checkpoints.behind()
    if problem is not None:
        raise ConfigurationError(f"{problem}; 'dsn admin audit verify --offline' says more. To "
                                 "serve a database restored on purpose, move the checkpoint "
                                 f"file {checkpoints.path} aside first")


def _leadership(services: Services) -> Leadership:
    """The run-once duties: jobs adopted when this replica takes the lead, a signed checkpoint of
    the audit chain every ``audit_checkpoint_s`` in which it grew (and one when the leader
    stops), the sessions of silent gateways moved every third of ``gateway_timeout_s`` (at most a
    second; one replica deciding, so a move is decided and audited once), and, with PostgreSQL,
    the rate counters no window reads any more deleted every minute. Each replica's checkpoints
    go to its own checkpoint file, signed with its own key: while it leads, it is the one that
    writes them."""
    url = services.settings.database_url
    lock: LeaderLock = SoleLock()
    duties = [Duty("audit checkpoint", services.settings.audit_checkpoint_s,
                   functools.partial(_write_checkpoint, services)),
              Duty("gateway placement", min(1.0, services.settings.gateway_timeout_s / 3),
                   functools.partial(replace_stranded, services, services.now()))]
    if url is not None:
        # Imported here: a SQLite deployment never loads the PostgreSQL driver.
        from controlplane.store.coordination import PostgresLeaderLock
        lock = PostgresLeaderLock(url)
        duties.append(Duty("rate counter expiry", 60.0,
                           functools.partial(_expire, services.limiter.counters)))
    return Leadership(lock, functools.partial(adopt_jobs, services), duties,
                      functools.partial(_write_checkpoint, services), services.metrics.leader)


async def _write_checkpoint(services: Services) -> None:
    """A checkpoint if the chain grew; a failure is logged and counted, the next one tries
    again."""
    try:
        anchor = await services.checkpoints.write()
    except (OSError, ControlPlaneError) as exc:
        services.metrics.audit_checkpoint_failures.inc()
        log.error("audit: checkpoint not written to %s: %s", services.checkpoints.path, exc)
        return
    if anchor is not None:
        services.metrics.audit_checkpoint.set(anchor.seq)


async def _expire(counters: Counters) -> None:
    log.debug("rate counters: %d expired windows deleted", await counters.expire())


async def _flush_denials(services: Services, *, final: bool) -> None:
    try:
        await services.audit.flush_denials(everything=final)
    except ControlPlaneError as exc:
        log.error("audit: denial summaries not written: %s", exc.detail)


async def _refresh_keys(services: Services) -> None:
    try:
        await services.keyring.refresh()
    except ControlPlaneError as exc:
        log.error("signing keys not re-read from the store (tried again later): %s", exc.detail)


@contextlib.asynccontextmanager
async def _replica_upkeep(services: Services) -> AsyncIterator[None]:
    """What every replica does for itself: write the summaries of the denials it saw (every
    second, all of them at exit: each replica tallies its own), and re-read the published signing
    keys every ``REFRESH_S`` (the other replicas', rotated or retired ones)."""
    async def run() -> None:
        loop = asyncio.get_running_loop()
        keys_due = loop.time() + REFRESH_S
        while True:
            await _flush_denials(services, final=False)
            if loop.time() >= keys_due:
                await _refresh_keys(services)
                keys_due = loop.time() + REFRESH_S
            await asyncio.sleep(1.0)

    try:
        async with _running(run, "replica-upkeep"):
            yield
    finally:
        await _flush_denials(services, final=True)


@contextlib.asynccontextmanager
async def _running(body: Callable[[], Coroutine[Any, Any, None]], name: str) -> AsyncIterator[None]:
    """``body`` as a task for the duration of the block, cancelled and awaited at its end."""
    task = asyncio.create_task(body(), name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _start_state(state: StateService, settings: Settings) -> None:
    try:
        await state.start()
    except zmq.ZMQError as exc:
        raise ConfigurationError(f"state service: cannot bind "
                                 f"{' and '.join(settings.state_endpoints)}: {exc}") from None


def _state_service(settings: Settings, store: Store) -> StateService:
    """The state service over ``store``'s live sessions, with its key pair and gateway allow-list
    read from the state directory; a missing or unreadable key refuses the start."""
    try:
        keypair = load_secret_keypair(settings.state_secret_key_file)
        gateways = _gateway_keys(settings)
    except KeyFileError as exc:
        raise ConfigurationError(f"state service: {exc}; 'dsn admin init' creates "
                                 f"{settings.state_secret_key_file.name} and "
                                 f"{settings.gateways_dir.name}/ "
                                 "in a new state directory") from None

    async def source() -> list[Placed]:
        return await live_sessions(store, settings.clock())

    replicas: ReplicaSignal | None = None
    if settings.database_url is not None:
        from controlplane.store.coordination import PostgresReplicaSignal
        replicas = PostgresReplicaSignal(settings.database_url)
    return StateService(StateSettings(settings.state_endpoints, reconcile_s=settings.reconcile_s),
                        keypair, gateways, source, replicas=replicas)


def _gateway_keys(settings: Settings) -> dict[str, bytes]:
    """The gateways allowed to subscribe, by name: ``STATE_DIR/gateways/NAME.key`` holds gateway
    NAME's public key."""
    files = sorted(settings.gateways_dir.glob("*.key"))
    if not files:
        log.warning("no gateway keys in %s: no gateway can receive sessions", settings.gateways_dir)
    return {_gateway_name(path): load_keypair(path).public for path in files}


def _gateway_name(path: Path) -> str:
    return path.name.removesuffix(".key")


async def _build_services(settings: Settings, store: Store, metrics: Metrics,
                          state: StateService) -> Services:
    clock = settings.clock
    keyring = await KeyRing.load(settings.state_dir, store, clock=clock)
    keyring.signing_key()  # refuse to serve from a state directory that cannot sign
    policies = PolicyHolder(load_policies(settings.policy_path))
    tokens = TokenService(settings.issuer, keyring, clock=clock, leeway_s=settings.leeway_s,
                          lifetime_caps=policies.lifetime_caps)
    audit = AuditLog(store, clock=clock, denial_window_s=settings.audit_denial_window_s)
    checkpoints = Checkpoints(settings.audit_checkpoints, store, issuer=settings.issuer,
                              signer=keyring.signing_key, clock=clock)
    return Services(
        settings=settings, store=store, keyring=keyring, tokens=tokens,
        authenticator=Authenticator(tokens, Revocations(store), clock), policies=policies,
        limiter=RateLimiter(policies, await _counters(settings)), audit=audit,
        checkpoints=checkpoints, metrics=metrics, state=state,
        launchers={settings.launcher: get_launcher(settings.launcher, **settings.launcher_options)})


async def _counters(settings: Settings) -> Counters:
    """Rate-limit hits counted in the shared database when there is one, else in memory."""
    if settings.database_url is None:
        return MemoryCounters()
    from controlplane.store.coordination import PostgresCounters
    return await PostgresCounters.open(settings.database_url)


async def _plain_server_header(_request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp names itself and Python with their versions: nothing a client needs.
    response.headers["Server"] = "dsn-controlplane"


def create_app(settings: Settings) -> web.Application:
    _check_routes(ROUTES)
    app = web.Application(middlewares=MIDDLEWARES, client_max_size=settings.client_max_size)
    app[METRICS] = Metrics()
    app[OPENAPI] = build_document(ROUTES, version=importlib.metadata.version("dsn-gateway"),
                                  server_url=settings.public_base_url,
                                  max_body=settings.client_max_size)
    specs = {}
    for spec in ROUTES:
        specs[app.router.add_route(spec.method, spec.path, spec.handler)] = spec
    app[ROUTE_SPECS] = specs
    app.cleanup_ctx.append(_services_ctx(settings))
    app.cleanup_ctx.append(federation_ctx(settings.clock))
    app.cleanup_ctx.append(gateways.scraper_ctx())
    app[live.STREAMS] = live.Streams()
    app.on_shutdown.append(live.stop_streams)  # before the server waits for open requests
    app.on_response_prepare.append(_plain_server_header)
    app.on_response_prepare.append(console.security_headers)
    app.on_startup.append(templates_api.seed_shipped_templates)  # runs once the services are open
    return app
