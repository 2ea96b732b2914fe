"""Ed25519 token-signing keys: each control plane signs with its own key, every published key
verifies until retired.

Private keys live only in ``state_dir/keys/<kid>.pem`` (PKCS#8, mode 0600, in a 0700 directory);
the store holds each key's public JWK and its life (created, stopped signing, retired). ``kid`` is
the RFC 7638 thumbprint of the public JWK, so anyone can check that a published key matches its id.

Several replicas on one database each hold the private half of their own key, never another's:
``dsn admin init --join`` publishes a new replica's key in the shared store. A replica signs with
the newest key that has not stopped signing and whose private half is in its state directory, and
verifies with every published key, which it re-reads from the store every ``REFRESH_S`` and when a
token names a kid it does not know (``lookup``: at most once per ``UNKNOWN_KID_REFRESH_S``, so
that forged kids cannot cost a database read each). So a token signed by any replica verifies at
all of them, and each one's JWKS lists every live key. Sharing one private key through the
database, encrypted under a key every state directory holds, was the alternative: it would put a
copy of that wrapping key, and so of every signing key, on every host, and make the loss of one
replica's state directory a rotation for all.

Rotation replaces the rotating replica's key only: its new key signs from then on, its old key
stops signing (``stopped_at``) and its private half is deleted; the other replicas' keys are left
alone (to renew every key, rotate through each replica). ``retire_expired`` unpublishes a key once
every token it can have signed has expired: the longest token lifetime after it stopped signing. A
key that never stopped (its replica's) is never retired.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.privatefs import (
    PrivatePathError,
    private_dir,
    read_private_file,
    replace_private_file,
)
from controlplane.errors import ConfigurationError, Conflict
from controlplane.store.engine import Store
from controlplane.store.signing_keys import (
    SigningKeyRecord,
    add_signing_key,
    list_signing_keys,
    retire_signing_key,
)

Clock = Callable[[], float]
# How often a replica re-reads the published keys, and how soon a token naming an unknown kid may
# make it re-read them again.
REFRESH_S = 5.0
UNKNOWN_KID_REFRESH_S = 1.0
# An Ed25519 PKCS#8 PEM is 119 bytes; anything much larger is not one.
MAX_PEM_BYTES = 4096


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def thumbprint(x: str) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url) of an Ed25519 public key given as ``x``."""
    required = {"crv": "Ed25519", "kty": "OKP", "x": x}  # only the required members, sorted
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return _b64url(hashlib.sha256(canonical).digest())


def public_jwk(key: Ed25519PublicKey) -> dict[str, str]:
    """The published form of a verification key (RFC 8037 OKP), ``kid`` = its thumbprint."""
    x = _b64url(_raw_public(key))
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": thumbprint(x), "alg": "EdDSA",
            "use": "sig"}


def public_key_from_jwk(jwk: dict[str, str]) -> Ed25519PublicKey:
    """Parse a stored JWK, refusing one whose ``kid`` is not its own thumbprint."""
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or "x" not in jwk:
        raise ConfigurationError(f"signing key {jwk.get('kid')!r} is not an Ed25519 OKP key")
    if jwk.get("kid") != thumbprint(jwk["x"]):
        raise ConfigurationError(f"signing key {jwk.get('kid')!r} does not match its thumbprint")
    raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
    return Ed25519PublicKey.from_public_bytes(raw)


def _write_private_pem(path: Path, key: Ed25519PrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    replace_private_file(path, pem)


def _read_private_pem(path: Path, expected: Ed25519PublicKey) -> Ed25519PrivateKey:
    try:
        data = read_private_file(path, max_bytes=MAX_PEM_BYTES, what="signing key")
    except PrivatePathError as exc:
        raise ConfigurationError(str(exc)) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"signing key {path} is not a readable PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError(f"signing key {path} is not an Ed25519 key")
    if _raw_public(key.public_key()) != _raw_public(expected):
        raise ConfigurationError(f"signing key {path} does not match its published public key")
    return key


@dataclass(frozen=True)
class _Published:
    kid: str
    created_at: float
    jwk: dict[str, str]
    key: Ed25519PublicKey


class KeyRing:
    """The published verification keys and this state directory's signing key, loaded from the
    store and disk."""

    def __init__(self, keys_dir: Path, store: Store, clock: Clock,
                 lookup_every_s: float = UNKNOWN_KID_REFRESH_S) -> None:
        self._dir = keys_dir
        self._store = store
        self._clock = clock
        self._lookup_every_s = lookup_every_s
        self._published: list[_Published] = []  # oldest first
        self._signer: tuple[str, Ed25519PrivateKey] | None = None
        self._refreshed = -math.inf  # time.monotonic() of the last refresh
        self._lookups = asyncio.Lock()

    @classmethod
    async def load(cls, state_dir: Path, store: Store, *, clock: Clock = time.time,
                   lookup_every_s: float = UNKNOWN_KID_REFRESH_S) -> KeyRing:
        keys_dir = state_dir / "keys"
        await asyncio.to_thread(private_dir, keys_dir)
        ring = cls(keys_dir, store, clock, lookup_every_s)
        await ring.refresh()
        return ring

    async def refresh(self) -> None:
        """Reload from the store: picks up keys published, stopped or retired by another process
        (another replica, or an admin command on this state directory)."""
        records = [r for r in await list_signing_keys(self._store) if r.retired_at is None]
        published = [_Published(r.kid, r.created_at, dict(r.public_jwk),
                                 public_key_from_jwk(r.public_jwk)) for r in records]
        held = await asyncio.to_thread(self._private_kids)
        own = [p for p, r in zip(published, records, strict=True)
               if r.stopped_at is None and p.kid in held]
        signer = None
        if own:
            newest = own[-1]
            private = await asyncio.to_thread(_read_private_pem, self._pem(newest.kid), newest.key)
            signer = (newest.kid, private)
        self._published, self._signer = published, signer
        self._refreshed = time.monotonic()

    def _private_kids(self) -> set[str]:
        return {path.stem for path in self._dir.glob("*.pem")}

    def _pem(self, kid: str) -> Path:
        return self._dir / f"{kid}.pem"

    async def create(self, *, join: bool = False) -> str:
        """Create this state directory's first signing key: the database's first (``dsn admin
        init``; Conflict if one is published) or, with ``join``, one beside the keys of the
        replicas already on the database (Conflict if none is, or if this directory signs
        already)."""
        if join and not self._published:
            raise Conflict("the database has no signing key: there is nothing to join; "
                           "initialise it without --join")
        if join and self._signer is not None:
            raise Conflict("this state directory has a signing key already")
        if not join and self._published:
            raise Conflict("a signing key already exists; rotate it instead")
        return await self.rotate(self._clock())

    async def rotate(self, now: float) -> str:
        """Add a new key that replaces this directory's signing key (which stops signing but stays
        published); other replicas' keys are left alone. Returns its kid."""
        private = Ed25519PrivateKey.generate()
        jwk = public_jwk(private.public_key())
        pem = self._pem(jwk["kid"])
        await asyncio.to_thread(_write_private_pem, pem, private)
        replaced = None if self._signer is None else self._signer[0]
        try:
            await add_signing_key(self._store, SigningKeyRecord(jwk["kid"], now, None, jwk),
                                  replaces=replaced)
        except BaseException:
            pem.unlink(missing_ok=True)  # an unpublished private key must not linger
            raise
        await self.refresh()
        await asyncio.to_thread(self._delete_private_keys_except, jwk["kid"])
        return jwk["kid"]

    def _delete_private_keys_except(self, kid: str) -> None:
        # Only the newest key ever signs again; the others' private halves have no further use.
        for path in self._dir.glob("*.pem"):
            if path.stem != kid:
                path.unlink(missing_ok=True)

    def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        """This directory's signing key and its kid; ConfigurationError if it holds none."""
        if self._signer is None:
            raise ConfigurationError(
                "no signing key: the state directory holds no private key of a published key "
                "that still signs; run `dsn admin init` first (or `dsn admin init --join` for "
                "another replica on a shared database)")
        return self._signer

    def public_key(self, kid: str) -> Ed25519PublicKey | None:
        """The verification key for ``kid`` if it is published (not retired), else None."""
        return next((p.key for p in self._published if p.kid == kid), None)

    async def lookup(self, kid: str) -> Ed25519PublicKey | None:
        """``public_key(kid)``, re-reading the store first if ``kid`` is unknown (another replica
        may have just published it). Lookups waiting together share one re-read, and re-reads
        are at least ``lookup_every_s`` apart (a lookup waits for its turn): a flood of forged
        kids costs one database read per interval, and a genuine new kid a wait of at most
        that."""
        arrived = time.monotonic()
        async with self._lookups:
            if self.public_key(kid) is None and self._refreshed < arrived:
                await asyncio.sleep(self._refreshed + self._lookup_every_s - time.monotonic())
                await self.refresh()
        return self.public_key(kid)

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The JWK Set of every published key, newest first."""
        return {"keys": [dict(p.jwk) for p in reversed(self._published)]}

    async def retire_expired(self, now: float, max_token_lifetime_s: float) -> list[str]:
        """Retire every key that stopped signing longer than the longest token lifetime ago;
        returns the retired kids."""
        due = [r.kid for r in await list_signing_keys(self._store)
               if r.retired_at is None and r.stopped_at is not None
               and now >= r.stopped_at + max_token_lifetime_s]
        for kid in due:
            await retire_signing_key(self._store, kid, now)
        if due:
            await self.refresh()
        return due
