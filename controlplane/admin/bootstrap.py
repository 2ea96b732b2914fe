"""A state directory from nothing (``dsn admin init``), the checks before it is served, and what
works on it without the service: the audit chain verified from its database, and an admin
recovered when every admin token is lost or expired (``dsn admin recover``).

The first admin's token is written to ``STATE_DIR/admin.token`` (0600), a recovered one to the
file named; nowhere else: the store keeps their metadata only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pwd
import re
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
from controlplane.schemas import NAME_PATTERN
from controlplane.settings import Settings
from controlplane.signing import KeyRing
from controlplane.store.admins import enable_admin
from controlplane.store.base import redacted
from controlplane.store.engine import Store
from controlplane.store.signing_keys import list_signing_keys
from controlplane.store.tokens import TokenRecord
from controlplane.tokens import Claims, TokenKind, TokenService

ADMIN_TOKEN_FILE = "admin.token"
FIRST_ADMIN = "admin"  # the first admin's name unless ``dsn admin init --name`` says otherwise


async def initialize(state_dir: Path, *, name: str = FIRST_ADMIN, policy_path: Path | None = None,
                     now: float | None = None, database_url: str | None = None) -> str:
    """Create the state directory, store (the SQLite file in it, or the PostgreSQL database
    ``database_url`` names), first signing key and first admin, ``name``, with its first token;
    return the token.

    The token is written to ``state_dir/admin.token`` (0600) and nowhere else; the store keeps its
    metadata only. ConfigurationError if the directory is already initialised; Conflict if the
    database already has a signing key.
    """
    _check_name(name)
    settings = Settings(state_dir=state_dir, database_url=database_url)
    token_path = state_dir / ADMIN_TOKEN_FILE
    if token_path.exists() or (database_url is None and settings.database.exists()):
        raise ConfigurationError(f"{state_dir} is already initialised")
    policy = load_policies(policy_path or settings.policy_path)
    clock: Callable[[], float] = time.time if now is None else (lambda: now)
    await asyncio.to_thread(private_dir, state_dir)
    store = await Store.open(settings.store_location)
    try:
        if database_url is not None and await list_signing_keys(store):
            # Another state directory holds its private keys: this one joins, it does not init.
            raise ConfigurationError(f"the database at {redacted(database_url)} is already "
                                     "initialised (it has signing keys); add another replica "
                                     "with 'dsn admin init --join'")
        keyring = await KeyRing.load(state_dir, store, clock=clock)
        await keyring.create()
        await asyncio.to_thread(_gateway_keys, settings)
        await asyncio.to_thread(_state_keys, settings)
        grant = _Grant(settings, policy, store, keyring, clock)
        token, _ = await grant.admin_token(name, policy.lifetime_cap(TokenKind.ADMIN), token_path,
                                           action="admin.init", rule="bootstrap")
        return token
    finally:
        await store.close()


async def join(state_dir: Path, *, database_url: str, now: float | None = None) -> str:
    """Make ``state_dir`` another replica's state directory on the shared PostgreSQL database
    ``database_url``: its own signing key (its public half published there, audited as
    ``replica.join`` by the OS user), gateway and state service key pairs. No admin, no admin
    token: the database has its admins already. Returns the new key's kid.

    ConfigurationError if the directory is initialised already; Conflict if the database has no
    signing key yet (initialise it without joining)."""
    settings = Settings(state_dir=state_dir, database_url=database_url)
    keys_dir = state_dir / "keys"
    if (state_dir / ADMIN_TOKEN_FILE).exists() or any(keys_dir.glob("*.pem")):
        raise ConfigurationError(f"{state_dir} is already initialised")
    clock: Callable[[], float] = time.time if now is None else (lambda: now)
    await asyncio.to_thread(private_dir, state_dir)
    store = await Store.open(settings.store_location)
    try:
        keyring = await KeyRing.load(state_dir, store, clock=clock)
        kid = await keyring.create(join=True)
        await AuditLog(store, clock=clock).record(
            principal=f"offline:{_os_user()}", action="replica.join",
            resource=f"signing-key/{kid}", decision="allow", rule="bootstrap",
            request_id=f"replica.join-{uuid.uuid4()}")
        await asyncio.to_thread(_gateway_keys, settings)
        await asyncio.to_thread(_state_keys, settings)
        return kid
    finally:
        await store.close()


async def recover(state_dir: Path, *, name: str, out: Path, ttl_s: int | None = None,
                  revoke_others: bool = False, policy_path: Path | None = None,
                  now: float | None = None, database_url: str | None = None) -> Claims:
    """Without the service: make ``name`` an active admin again (or a new one) and write a fresh
    token of it to ``out`` (0600, a new file), revoking its other tokens if ``revoke_others`` (lost
    ones may have been stolen), recorded as an audited ``admin.recover`` by the OS user.

    Whoever can write the state directory holds the signing keys already: this grants no power
    they lack, it only does properly what they could do by hand. ``database_url``: the service's
    PostgreSQL database, if its state is there."""
    _check_name(name)
    settings = Settings(state_dir=state_dir, database_url=database_url)
    await require_initialised(settings)
    policy = load_policies(policy_path or settings.policy_path)
    cap = policy.lifetime_cap(TokenKind.ADMIN)
    clock: Callable[[], float] = time.time if now is None else (lambda: now)
    store = await Store.open(settings.store_location)
    try:
        keyring = await KeyRing.load(state_dir, store, clock=clock)
        grant = _Grant(settings, policy, store, keyring, clock)
        _, claims = await grant.admin_token(name, ttl_s or cap, out, action="admin.recover",
                                            rule="offline-recovery", revoke_others=revoke_others)
        return claims
    finally:
        await store.close()


def _check_name(name: str) -> None:
    if not re.fullmatch(NAME_PATTERN, name):
        raise ConfigurationError(f"admin name {name!r} is not 1 to 63 lower-case letters, digits, "
                                 "'-' and '_', starting with a letter or digit")


def _os_user() -> str:
    """Who runs this process, by its effective uid (not by environment variables)."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid-{uid}"


@dataclasses.dataclass(frozen=True)
class _Grant:
    """Admin tokens issued on the state directory, without the service (init and recovery)."""

    settings: Settings
    policy: PolicySet
    store: Store
    keyring: KeyRing
    clock: Callable[[], float]

    async def admin_token(self, name: str, ttl_s: int, path: Path, *, action: str, rule: str,
                          revoke_others: bool = False) -> tuple[str, Claims]:
        """Enable admin ``name`` with a new token in the new 0600 file ``path``, audited first as
        ``action`` by ``offline:<OS user>``. The file is written before anything is stored (a
        path that cannot take it changes nothing) and removed if storing fails."""
        kind = TokenKind.ADMIN
        service = TokenService(self.settings.issuer, self.keyring, clock=self.clock,
                               leeway_s=self.settings.leeway_s,
                               lifetime_caps={kind: self.policy.lifetime_cap(kind)})
        token, claims = service.issue(kind=kind, subject=name, project=None,
                                      scope=self.policy.admin_scopes(), ttl_s=ttl_s,
                                      audience=self.settings.api_audience)
        await asyncio.to_thread(create_private_file, path, f"{token}\n".encode())
        try:
            by = f"offline:{_os_user()}"
            await AuditLog(self.store, clock=self.clock).record(
                principal=by, action=action, resource=f"admin/{name}#{claims.jti}",
                decision="allow", rule=rule, request_id=f"{action}-{uuid.uuid4()}")
            await enable_admin(self.store, TokenRecord(
                jti=claims.jti, project=None, kind=kind.value, subject=claims.sub,
                scope=" ".join(sorted(claims.scope)), issued_at=float(claims.iat),
                expires_at=float(claims.exp)), by=by, at=self.clock(), exists_ok=True,
                revoke_others=revoke_others)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return token, claims


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


async def require_initialised(settings: Settings) -> None:
    """Fail closed: never serve (and so never mint an admin) from an uninitialised directory."""
    hint = f"run 'dsn admin init --state-dir {settings.state_dir}' first"
    if settings.database_url is None and not settings.database.is_file():
        raise ConfigurationError(f"{settings.state_dir} is not initialised; {hint}")
    store = await Store.open(settings.store_location)
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


async def verify_offline(state_dir: Path, checkpoints: Path | None = None,
                         database_url: str | None = None) -> dict[str, Any]:
    """The audit chain in ``state_dir``'s database (or the PostgreSQL one ``database_url`` names),
    checked against the signed checkpoints in ``checkpoints`` (default: the service's default
    checkpoint file)."""
    settings = Settings(state_dir=state_dir, audit_checkpoint_file=checkpoints,
                        database_url=database_url)
    if database_url is None and not settings.database.is_file():
        raise ConfigurationError(f"no control plane database at {settings.database}")
    store = await Store.open(settings.store_location)
    try:
        result = await anchored_verification(AuditLog(store), store, settings.audit_checkpoints,
                                             issuer=settings.issuer)
    finally:
        await store.close()
    return dataclasses.asdict(result)
