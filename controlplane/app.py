"""The control plane's aiohttp application factory.

``create_app(settings)`` registers the routes of ``ROUTES`` (each once, with its declared
checks), the middlewares and the OpenAPI document. The services (store, key ring, policies, token
service, rate limiter, audit log) open in a ``cleanup_ctx`` when the app starts and close with it,
so a test can build the app twice on one state directory to check what survives a restart.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from controlplane.audit import AuditLog
from controlplane.errors import ConfigurationError
from controlplane.launchers import get_launcher
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
from controlplane.ratelimit import RateLimiter
from controlplane.settings import Settings
from controlplane.signing import KeyRing
from controlplane.store import Store
from controlplane.tokens import Authenticator, TokenService
from controlplane import sessions_api, templates_api, views

# Every served route, each declared once; feature modules contribute their own route tables.
ROUTES: tuple[RouteSpec, ...] = (*views.ROUTES, *templates_api.ROUTES, *sessions_api.ROUTES)


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
        store = await Store.open(settings.database)
        try:
            app[SERVICES] = services = await _build_services(settings, store, app[METRICS])
            yield
            await services.limiter.aclose()
            for launcher in services.launchers.values():
                await launcher.close()  # a local job cannot outlive the parent that polls it
        finally:
            await store.close()
    return open_services


async def _build_services(settings: Settings, store: Store, metrics: Metrics) -> Services:
    clock = settings.clock
    keyring = await KeyRing.load(settings.state_dir, store, clock=clock)
    policies = PolicyHolder(load_policies(settings.policy_path))
    tokens = TokenService(settings.issuer, keyring, clock=clock, leeway_s=settings.leeway_s,
                          lifetime_caps=policies.lifetime_caps)
    return Services(
        settings=settings, store=store, keyring=keyring, tokens=tokens,
        authenticator=Authenticator(tokens, store, clock), policies=policies,
        limiter=RateLimiter(policies), audit=AuditLog(store, clock=clock),
        metrics=metrics, launchers={settings.launcher: get_launcher(settings.launcher)})


def create_app(settings: Settings) -> web.Application:
    _check_routes(ROUTES)
    app = web.Application(middlewares=MIDDLEWARES, client_max_size=settings.client_max_size)
    app[METRICS] = Metrics()
    app[OPENAPI] = build_document(ROUTES, version=importlib.metadata.version("dsn-gateway"),
                                  server_url=settings.base_url)
    specs = {}
    for spec in ROUTES:
        specs[app.router.add_route(spec.method, spec.path, spec.handler)] = spec
    app[ROUTE_SPECS] = specs
    app.cleanup_ctx.append(_services_ctx(settings))
    app.on_startup.append(templates_api.seed_shipped_templates)  # runs once the services are open
    return app
