"""Signed checkpoints of the audit chain, kept outside the database they vouch for.

Every ``interval_s`` in which the chain grew, the service signs its head (seq, hash, time) with its
current token-signing key (EdDSA, compact JWS, ``typ`` ``dsn-audit-checkpoint``) and appends it as
one line to the checkpoint file, opened append-only and fsynced; the same line goes to the log, so a
log shipper keeps a second copy. Verification checks every checkpoint's signature against the
signing keys the store has ever published (retired ones included: a key's ``kid`` is its
thumbprint, so a replaced public key cannot pass as the old one), then that each checkpointed record
still exists with the hash it had. So a chain cut short and its head rewound, or rebuilt after an
edit, is found up to the last checkpoint.

What this cannot see: records written after the last checkpoint, and a checkpoint file emptied by
someone who can write it. Put it where the service can only append (``chattr +a``, a log host),
away from whoever could rewrite the database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from controlplane.audit import Anchor, AuditLog, AuditVerification, utc_text
from controlplane.signing import public_key_from_jwk
from controlplane.store.audit import audit_head, get_audit_record
from controlplane.store.engine import Store
from controlplane.store.signing_keys import list_signing_keys

log = logging.getLogger("dsn.controlplane.audit")

CHECKPOINT_TYPE: Final = "dsn-audit-checkpoint"
ALGORITHM: Final = "EdDSA"
_CLAIMS: Final = frozenset({"iss", "seq", "hash", "ts"})
_MAX_LINE: Final = 4096  # a checkpoint is about 400 bytes
_HEX: Final = frozenset("0123456789abcdef")

Signer = Callable[[], tuple[str, Ed25519PrivateKey]]


class CheckpointError(ValueError):
    """A checkpoint line that is not one this service signed, or that says something impossible."""


def sign_checkpoint(anchor: Anchor, *, issuer: str, kid: str, key: Ed25519PrivateKey) -> str:
    payload = {"iss": issuer, "seq": anchor.seq, "hash": anchor.hash, "ts": anchor.ts}
    return jwt.encode(payload, key, algorithm=ALGORITHM,
                      headers={"kid": kid, "typ": CHECKPOINT_TYPE})


def parse_checkpoint(line: str, *, issuer: str,
                     keys: Mapping[str, Ed25519PublicKey]) -> Anchor:
    """The anchor a checkpoint line vouches for; CheckpointError unless its signature, header and
    claims are exactly what ``sign_checkpoint`` writes."""
    try:
        header = jwt.get_unverified_header(line)
    except jwt.PyJWTError:
        raise CheckpointError("not a signed checkpoint") from None
    if header.get("alg") != ALGORITHM or header.get("typ") != CHECKPOINT_TYPE:
        raise CheckpointError("not a signed checkpoint (algorithm or type)")
    key = keys.get(str(header.get("kid")))
    if key is None:
        raise CheckpointError(f"signed with a key the store never published ({header.get('kid')})")
    try:
        claims: dict[str, Any] = jwt.decode(line, key, algorithms=[ALGORITHM],
                                            options={"verify_aud": False, "verify_exp": False})
    except jwt.PyJWTError:
        raise CheckpointError("its signature does not verify") from None
    return _anchor(claims, issuer)


def _anchor(claims: dict[str, Any], issuer: str) -> Anchor:
    seq, digest, ts = claims.get("seq"), claims.get("hash"), claims.get("ts")
    if (set(claims) != _CLAIMS or claims["iss"] != issuer or type(seq) is not int or seq < 1
            or not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX
            or type(ts) is not float):
        raise CheckpointError("its claims are not a checkpoint's")
    return Anchor(seq=seq, hash=digest, ts=ts)


@dataclass(frozen=True)
class CheckpointRead:
    anchors: list[Anchor]
    problem: str | None = None  # the first line that is not a valid checkpoint


def read_checkpoints(path: Path, *, issuer: str,
                     keys: Mapping[str, Ed25519PublicKey]) -> CheckpointRead:
    """Every checkpoint in ``path`` (none if it does not exist). A last line without its newline is
    a write cut short by a crash and is skipped; any other bad line is the problem reported."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return CheckpointRead([])
    lines = text.split("\n")
    complete = lines[:-1]  # the piece after the last newline never finished
    anchors = []
    for number, line in enumerate(complete, start=1):
        try:
            if len(line) > _MAX_LINE:
                raise CheckpointError("too long")
            anchors.append(parse_checkpoint(line, issuer=issuer, keys=keys))
        except CheckpointError as exc:
            return CheckpointRead(anchors, f"{path} line {number}: {exc}")
    return CheckpointRead(anchors)


def _append_line(path: Path, line: str) -> None:
    # O_APPEND: the only write this file ever gets, so it also works once made append-only.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"{line}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


async def published_keys(store: Store) -> dict[str, Ed25519PublicKey]:
    """Every signing key the store ever published, retired ones included, by kid."""
    return {r.kid: public_key_from_jwk(r.public_jwk) for r in await list_signing_keys(store)}


async def anchored_verification(audit: AuditLog, store: Store, path: Path, *,
                                issuer: str) -> AuditVerification:
    """The audit chain verified against the checkpoints in ``path``: a checkpoint line that is
    not valid fails it as surely as a broken record."""
    keys = await published_keys(store)
    read = await asyncio.to_thread(read_checkpoints, path, issuer=issuer, keys=keys)
    result = await audit.verify(read.anchors)
    if result.ok and read.problem is not None:
        return dataclasses.replace(result, ok=False, problem=read.problem)
    return result


class Checkpoints:
    """The checkpoint file of one audit chain: writes new checkpoints, reads them back."""

    def __init__(self, path: Path, store: Store, *, issuer: str, signer: Signer,
                 clock: Callable[[], float]) -> None:
        self.path = path
        self._store = store
        self._issuer = issuer
        self._signer = signer
        self._clock = clock
        self._last_seq: int | None = None

    async def read(self) -> CheckpointRead:
        keys = await published_keys(self._store)
        return await asyncio.to_thread(read_checkpoints, self.path, issuer=self._issuer, keys=keys)

    async def verify(self, audit: AuditLog) -> AuditVerification:
        return await anchored_verification(audit, self._store, self.path, issuer=self._issuer)

    async def write(self) -> Anchor | None:
        """Sign the chain head if it moved since the last checkpoint; the anchor written, if any.
        OSError if the file cannot take it."""
        head = await audit_head(self._store)
        if head is None or head[0] == self._last_seq:
            return None
        anchor = Anchor(seq=head[0], hash=head[1], ts=float(self._clock()))
        kid, key = self._signer()
        line = sign_checkpoint(anchor, issuer=self._issuer, kid=kid, key=key)
        await asyncio.to_thread(_append_line, self.path, line)
        self._last_seq = anchor.seq
        log.info("audit checkpoint", extra={"fields": {"checkpoint": line, "seq": anchor.seq}})
        return anchor

    async def behind(self) -> str | None:
        """Why the chain in the store cannot be the one the last checkpoint signed (a database
        restored from an older copy, or cut short), else None: the check before serving."""
        read = await self.read()
        if read.problem is not None:
            return read.problem
        if not read.anchors:
            return None
        last = max(read.anchors, key=lambda anchor: anchor.seq)
        record = await get_audit_record(self._store, last.seq)
        if record is None or record.hash != last.hash:
            return (f"the audit log does not hold record {last.seq} as signed by the checkpoint of "
                    f"{utc_text(last.ts)} in {self.path}: records were removed, rewritten, or "
                    "the database was restored from an older copy")
        return None
