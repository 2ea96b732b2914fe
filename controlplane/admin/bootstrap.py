"""A state directory from nothing (``dsn admin init``), the checks before it is served, and the
audit chain verified from its database without the service.

The first admin token is written to ``STATE_DIR/admin.token`` (0600) and nowhere else; the store
keeps its metadata only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.keys import create_keypair
from common.privatefs import create_private_file, private_dir
from controlplane.anchor import anchored_verification
from controlplane.audit import AuditLog
from controlplane.errors import ConfigurationError
from controlplane.policy import PolicySet, load_policies
from controlplane.settings import Settings
from controlplane.signing import KeyRing
from controlplane.store.engine import Store
from controlplane.store.signing_keys import list_signing_keys
from controlplane.store.tokens import TokenRecord, add_token
from controlplane.tokens import TokenKind, TokenService

ADMIN_TOKEN_FILE = "admin.token"


async def initialize(state_dir: Path, *, policy_path: Path | None = None,
                     now: float | None = None) -> str:
    """Create the state directory, store, first signing key and first admin token; return the token.

    The token is written to ``state_dir/admin.token`` (0600) and nowhere else; the store keeps its
    metadata only. ConfigurationError if the directory is already initialised.
    """
    settings = Settings(state_dir=state_dir)
    token_path = state_dir / ADMIN_TOKEN_FILE
    if token_path.exists() or settings.database.exists():
        raise ConfigurationError(f"{state_dir} is already initialised")
    policy = load_policies(policy_path or settings.policy_path)
    clock: Callable[[], float] = time.time if now is None else (lambda: now)
    await asyncio.to_thread(private_dir, state_dir)
    store = await Store.open(settings.database)
    try:
        keyring = await KeyRing.load(state_dir, store, clock=clock)
        await keyring.create()
        await asyncio.to_thread(_gateway_keys, settings)
        await asyncio.to_thread(_state_keys, settings)
        return await _first_admin_token(settings, policy, store, keyring, clock, token_path)
    finally:
        await store.close()


def _gateway_keys(settings: Settings) -> None:
    """The gateway's CURVE key pair, handed to producers when sessions open; a gateway on another
    host replaces it with its own public key (``dsn gateway keygen``)."""
    if not settings.gateway_public_key_file.exists():
        create_keypair(settings.gateway_public_key_file.parent,
                       settings.gateway_public_key_file.name.removesuffix(".key"))


def _state_keys(settings: Settings) -> None:
    """The state service's CURVE key pair, and the local gateway's public key as the first entry
    of the gateways allowed to subscribe (the one-host default; an admin adds a remote gateway by
    copying its public ``.key`` file into ``STATE_DIR/gateways/``)."""
    if not settings.state_secret_key_file.exists():
        create_keypair(settings.state_secret_key_file.parent, "state")
    private_dir(settings.gateways_dir)
    local = settings.gateways_dir / "local.key"
    if not local.exists():
        shutil.copyfile(settings.gateway_public_key_file, local)


async def _first_admin_token(settings: Settings, policy: PolicySet, store: Store, keyring: KeyRing,
                             clock: Callable[[], float], token_path: Path) -> str:
    kind = TokenKind.ADMIN
    service = TokenService(settings.issuer, keyring, clock=clock, leeway_s=settings.leeway_s,
                           lifetime_caps={kind: policy.lifetime_cap(kind)})
    token, claims = service.issue(kind=kind, subject="admin", project=None,
                                  scope=policy.admin_scopes(), ttl_s=policy.lifetime_cap(kind),
                                  audience=settings.api_audience)
    await add_token(store, TokenRecord(
        jti=claims.jti, project=None, kind=kind.value, subject=claims.sub,
        scope=" ".join(sorted(claims.scope)), issued_at=float(claims.iat),
        expires_at=float(claims.exp)))
    await AuditLog(store, clock=clock).record(
        principal="admin-cli", action="admin.init", resource=f"token:{claims.jti}",
        decision="allow", rule="bootstrap", request_id=f"init-{uuid.uuid4()}")
    await asyncio.to_thread(create_private_file, token_path, f"{token}\n".encode())
    return token


async def require_initialised(settings: Settings) -> None:
    """Fail closed: never serve (and so never mint an admin) from an uninitialised directory."""
    hint = f"run 'dsn admin init --state-dir {settings.state_dir}' first"
    if not settings.database.is_file():
        raise ConfigurationError(f"{settings.state_dir} is not initialised; {hint}")
    store = await Store.open(settings.database)
    try:
        if not await list_signing_keys(store):
            raise ConfigurationError(f"{settings.state_dir} has no signing key; {hint}")
    finally:
        await store.close()
    if not settings.state_secret_key_file.is_file():
        raise ConfigurationError(f"{settings.state_dir} has no state service key "
                                 f"({settings.state_secret_key_file}); it was initialised by an "
                                 "older version: create the key pair with 'dsn gateway keygen' "
                                 "and rename it to state.key / state.key_secret")


async def verify_offline(state_dir: Path, checkpoints: Path | None = None) -> dict[str, Any]:
    """The audit chain in ``state_dir``'s database, checked against the signed checkpoints in
    ``checkpoints`` (default: the service's default checkpoint file)."""
    settings = Settings(state_dir=state_dir, audit_checkpoint_file=checkpoints)
    if not settings.database.is_file():
        raise ConfigurationError(f"no control plane database at {settings.database}")
    store = await Store.open(settings.database)
    try:
        result = await anchored_verification(AuditLog(store), store, settings.audit_checkpoints,
                                             issuer=settings.issuer)
    finally:
        await store.close()
    return dataclasses.asdict(result)
