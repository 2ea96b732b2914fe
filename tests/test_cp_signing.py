"""Signing keys on a real state directory and SQLite store:
files, kids, JWKS, rotation, retirement."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.errors import ConfigurationError, Conflict
from controlplane.signing import KeyRing, public_jwk, thumbprint
from controlplane.store.engine import Store


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
async def store(state_dir: Path) -> AsyncIterator[Store]:
    opened = await Store.open(state_dir / "controlplane.db")
    yield opened
    await opened.close()


@pytest.fixture
async def ring(state_dir: Path, store: Store) -> KeyRing:
    # Looks again for every unknown kid: the one test of the rate limit makes its own ring.
    return await KeyRing.load(state_dir, store, clock=FakeClock(), lookup_every_s=0)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_thumbprint_matches_rfc_8037_example() -> None:
    # RFC 8037 appendix A.3: the JWK thumbprint of the example Ed25519 public key.
    assert thumbprint("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo") == \
        "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


async def test_no_key_before_init(ring: KeyRing) -> None:
    with pytest.raises(ConfigurationError, match="dsn admin init"):
        ring.signing_key()
    assert ring.jwks() == {"keys": []}


async def test_create_writes_a_private_pem_0600_in_a_0700_dir(ring: KeyRing,
                                                              state_dir: Path) -> None:
    kid = await ring.create()
    pem = state_dir / "keys" / f"{kid}.pem"
    assert _mode(state_dir / "keys") == 0o700
    assert _mode(pem) == 0o600
    assert pem.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in (state_dir / "keys").iterdir()] == [f"{kid}.pem"]


async def test_jwks_content_is_exact_and_kid_is_the_thumbprint(ring: KeyRing) -> None:
    kid = await ring.create()
    signer_kid, private = ring.signing_key()
    assert signer_kid == kid
    x = public_jwk(private.public_key())["x"]
    assert ring.jwks() == {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": thumbprint(x),
                                     "alg": "EdDSA", "use": "sig"}]}
    assert kid == thumbprint(x)


async def test_a_token_signed_with_the_signing_key_verifies_with_the_published_jwk(
        ring: KeyRing) -> None:
    await ring.create()
    kid, private = ring.signing_key()
    token = jwt.encode({"sub": "alice"}, private, algorithm="EdDSA", headers={"kid": kid})
    published = jwt.PyJWK(ring.jwks()["keys"][0])
    assert jwt.decode(token, published.key, algorithms=["EdDSA"]) == {"sub": "alice"}
    verifier = ring.public_key(kid)
    assert verifier is not None
    assert jwt.decode(token, verifier, algorithms=["EdDSA"]) == {"sub": "alice"}
    assert ring.public_key("unknown-kid") is None


async def test_create_twice_is_a_conflict(ring: KeyRing) -> None:
    await ring.create()
    with pytest.raises(Conflict, match="rotate"):
        await ring.create()


async def test_rotation_newest_signs_old_keys_still_verify_old_private_key_deleted(
        ring: KeyRing, state_dir: Path) -> None:
    first = await ring.create()
    second = await ring.rotate(2000.0)
    assert second != first
    assert ring.signing_key()[0] == second
    assert [k["kid"] for k in ring.jwks()["keys"]] == [second, first]
    assert ring.public_key(first) is not None
    assert sorted(p.name for p in (state_dir / "keys").iterdir()) == [f"{second}.pem"]


async def test_retire_expired_waits_for_the_longest_lifetime_after_the_key_stopped_signing(
        ring: KeyRing) -> None:
    first = await ring.create()           # created at 1000
    second = await ring.rotate(2000.0)    # first stops signing at 2000
    assert await ring.retire_expired(2000.0 + 3599, max_token_lifetime_s=3600) == []
    assert ring.public_key(first) is not None
    assert await ring.retire_expired(2000.0 + 3600, max_token_lifetime_s=3600) == [first]
    assert ring.public_key(first) is None
    assert [k["kid"] for k in ring.jwks()["keys"]] == [second]
    # The newest key never retires, however old.
    assert await ring.retire_expired(10**9, max_token_lifetime_s=1) == []
    assert ring.signing_key()[0] == second


async def test_keys_and_retirements_persist_across_restart(state_dir: Path) -> None:
    store = await Store.open(state_dir / "controlplane.db")
    ring = await KeyRing.load(state_dir, store, clock=FakeClock())
    first = await ring.create()
    second = await ring.rotate(2000.0)
    third = await ring.rotate(3000.0)
    await ring.retire_expired(2500.0, max_token_lifetime_s=100)  # retires first only
    jwks, signer_kid = ring.jwks(), ring.signing_key()[0]
    await store.close()

    store = await Store.open(state_dir / "controlplane.db")
    try:
        again = await KeyRing.load(state_dir, store)
        assert again.jwks() == jwks
        assert again.signing_key()[0] == signer_kid == third
        assert again.public_key(first) is None and again.public_key(second) is not None
    finally:
        await store.close()


async def test_refresh_picks_up_a_rotation_by_another_process(ring: KeyRing, state_dir: Path,
                                                              store: Store) -> None:
    await ring.create()
    other = await KeyRing.load(state_dir, store)
    newer = await other.rotate(5000.0)
    await ring.refresh()
    assert ring.signing_key()[0] == newer


async def test_a_private_key_readable_by_others_is_refused(ring: KeyRing, state_dir: Path,
                                                           store: Store) -> None:
    kid = await ring.create()
    (state_dir / "keys" / f"{kid}.pem").chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by others .* chmod 600 it"):
        await KeyRing.load(state_dir, store)


async def test_a_swapped_private_key_is_refused(ring: KeyRing, state_dir: Path,
                                                store: Store) -> None:
    kid = await ring.create()
    pem = state_dir / "keys" / f"{kid}.pem"
    pem.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    assert _mode(pem) == 0o600
    with pytest.raises(ConfigurationError, match="does not match its published public key"):
        await KeyRing.load(state_dir, store)


async def test_a_garbled_private_key_is_refused(ring: KeyRing, state_dir: Path,
                                                store: Store) -> None:
    kid = await ring.create()
    (state_dir / "keys" / f"{kid}.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n")
    with pytest.raises(ConfigurationError, match="not a readable PEM"):
        await KeyRing.load(state_dir, store)


async def test_a_missing_private_key_leaves_the_directory_unable_to_sign(
        ring: KeyRing, state_dir: Path, store: Store) -> None:
    kid = await ring.create()
    (state_dir / "keys" / f"{kid}.pem").unlink()
    again = await KeyRing.load(state_dir, store)
    assert again.public_key(kid) is not None  # it still verifies what was signed
    with pytest.raises(ConfigurationError, match="holds no private key .* --join"):
        again.signing_key()


async def test_a_joined_replica_signs_with_its_own_key_and_each_verifies_the_other(
        ring: KeyRing, tmp_path: Path, store: Store) -> None:
    first = await ring.create()
    other = await KeyRing.load(tmp_path / "replica-b", store, clock=FakeClock(1500.0))
    second = await other.create(join=True)
    assert other.signing_key()[0] == second and ring.signing_key()[0] == first
    assert sorted(p.name for p in (tmp_path / "replica-b" / "keys").iterdir()) == [f"{second}.pem"]
    assert ring.public_key(second) is None  # not re-read yet
    assert await ring.lookup(second) is not None  # an unknown kid makes it look again
    assert [k["kid"] for k in ring.jwks()["keys"]] == [second, first]
    with pytest.raises(Conflict, match="has a signing key already"):
        await other.create(join=True)


async def test_joining_a_database_without_keys_is_a_conflict(ring: KeyRing) -> None:
    with pytest.raises(Conflict, match="nothing to join"):
        await ring.create(join=True)


async def test_lookups_of_unknown_kids_waiting_together_share_one_read_of_the_store(
        ring: KeyRing, tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    await ring.create()
    joined = await (await KeyRing.load(tmp_path / "replica-b", store)).create(join=True)
    reads = 0
    refresh = ring.refresh

    async def counted() -> None:
        nonlocal reads
        reads += 1
        await refresh()

    monkeypatch.setattr(ring, "refresh", counted)
    found = await asyncio.gather(ring.lookup("forged-1"), ring.lookup(joined),
                                 ring.lookup("forged-2"))
    assert reads == 1
    assert found[0] is None and found[1] is not None and found[2] is None


async def test_rotation_by_one_replica_leaves_the_others_key_signing(
        ring: KeyRing, tmp_path: Path, store: Store) -> None:
    first = await ring.create()  # replica A's, at 1000
    other = await KeyRing.load(tmp_path / "replica-b", store, clock=FakeClock(1500.0))
    b_key = await other.create(join=True)
    a_new = await ring.rotate(2000.0)  # A's first key stops signing at 2000; B's is untouched
    await other.refresh()
    assert other.signing_key()[0] == b_key and ring.signing_key()[0] == a_new
    assert await ring.retire_expired(10**9, max_token_lifetime_s=3600) == [first]
    await other.refresh()
    assert other.signing_key()[0] == b_key and other.public_key(b_key) is not None


def test_generated_keys_have_distinct_kids() -> None:
    kids = {public_jwk(Ed25519PrivateKey.generate().public_key())["kid"] for _ in range(5)}
    assert len(kids) == 5
