"""Signed checkpoints of the audit chain, kept outside its database: what a rewrite of the database
alone can no longer hide, on a real service, its real files and the offline verifier."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sqlite3
from pathlib import Path

import pytest
from cp_helpers import (
    ClientFactory,
    ControlPlane,
    ManualClock,
    free_state_endpoints,
    sql,
    start_control_plane,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.admin.bootstrap import verify_offline
from controlplane.anchor import (
    CheckpointError,
    parse_checkpoint,
    read_checkpoints,
    sign_checkpoint,
)
from controlplane.app import create_app
from controlplane.audit import Anchor, chain_hash
from controlplane.errors import ConfigurationError
from controlplane.signing import public_jwk


@pytest.fixture
async def cp(aiohttp_client: ClientFactory, tmp_path: Path) -> ControlPlane:
    # Checkpoints only when a test writes one, or at stop.
    return await start_control_plane(aiohttp_client, tmp_path / "state", audit_checkpoint_s=3600)


async def _requests(cp: ControlPlane, count: int) -> None:
    for _ in range(count):
        assert (await cp.admin("GET", "/api/v1/projects")).status == 200


async def _verify(cp: ControlPlane) -> dict[str, object]:
    return dict(await (await cp.admin("GET", "/api/v1/audit/verify")).json())


def _cut_and_rewind(database: Path, keep: int) -> None:
    """What the outside attack run did: drop the tail and move the head back onto what remains."""
    with sqlite3.connect(database) as conn:
        conn.execute("DELETE FROM audit WHERE seq > ?", (keep,))
        conn.execute("UPDATE audit_head SET seq = ?, hash = (SELECT hash FROM audit WHERE seq = ?)",
                     (keep, keep))


def _rebuild_chain(database: Path, seq: int, principal: str) -> None:
    """Edit one record and recompute every later hash and the head: a chain consistent in itself."""
    with sqlite3.connect(database) as conn:
        conn.execute("UPDATE audit SET principal = ? WHERE seq = ?", (principal, seq))
        rows = conn.execute("SELECT seq, ts, principal, action, resource, decision, rule, "
                            "request_id, prev_hash, count FROM audit WHERE seq >= ? ORDER BY seq",
                            (seq,)).fetchall()
        prev = rows[0][8]
        for row in rows:
            digest = chain_hash(seq=row[0], ts=row[1], principal=row[2], action=row[3],
                                resource=row[4], decision=row[5], rule=row[6], request_id=row[7],
                                prev_hash=prev, count=row[9])
            conn.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?",
                         (prev, digest, row[0]))
            prev = digest
        conn.execute("UPDATE audit_head SET hash = ?", (prev,))


async def test_a_truncated_log_with_its_head_rewound_is_found_by_the_checkpoints(
        cp: ControlPlane) -> None:
    await _requests(cp, 5)
    anchor = await cp.services.checkpoints.write()
    assert anchor is not None and anchor.seq >= 6
    _cut_and_rewind(cp.database, 3)
    offline = await verify_offline(cp.settings.state_dir)
    assert offline["ok"] is False and offline["first_bad_seq"] == 4
    assert f"records 4..{anchor.seq} were removed" in offline["problem"]
    result = await _verify(cp)  # its own audit record is seq 4 again: 5 onwards are missing
    assert result["ok"] is False and "were removed" in str(result["problem"])


async def test_without_a_checkpoint_the_same_truncation_would_verify(cp: ControlPlane) -> None:
    """Why the checkpoints exist: the chain alone cannot see a cut tail with a rewound head."""
    await _requests(cp, 5)
    _cut_and_rewind(cp.database, 3)
    assert cp.settings.audit_checkpoints.exists() is False
    result = await _verify(cp)
    assert result["ok"] is True and result["checkpoints"] == 0


async def test_a_chain_rebuilt_after_an_edit_is_found_by_the_checkpoints(
        cp: ControlPlane) -> None:
    await _requests(cp, 3)
    await cp.services.checkpoints.write()
    _rebuild_chain(cp.database, 2, "admin:someone-else")
    assert (await cp.services.audit.verify()).ok  # consistent in itself
    result = await _verify(cp)
    assert result["ok"] is False and "rewritten" in str(result["problem"])


async def test_checkpoints_are_written_only_when_the_chain_grew(
        cp: ControlPlane, caplog: pytest.LogCaptureFixture) -> None:
    await _requests(cp, 2)
    checkpoints = cp.services.checkpoints
    with caplog.at_level(logging.INFO, logger="dsn.controlplane.audit"):
        first = await checkpoints.write()
    # The log carries the same signed line: a second copy wherever the logs are shipped.
    logged = [r for r in caplog.records if r.getMessage() == "audit checkpoint"]
    assert [r.fields["checkpoint"] for r in logged] == checkpoints.path.read_text().splitlines()  # type: ignore[attr-defined]
    assert first is not None and await checkpoints.write() is None
    await _requests(cp, 1)
    second = await checkpoints.write()
    assert second is not None and second.seq == first.seq + 1
    lines = checkpoints.path.read_text().splitlines()
    assert len(lines) == 2 and checkpoints.path.stat().st_mode & 0o777 == 0o600
    result = await _verify(cp)
    assert result["ok"] is True and result["checkpoints"] == 2


async def test_a_checkpoint_is_written_when_the_service_stops(cp: ControlPlane) -> None:
    await _requests(cp, 2)
    head = sql(cp.database, "SELECT seq FROM audit_head")[0][0]
    await cp.client.close()
    lines = cp.settings.audit_checkpoints.read_text().splitlines()
    assert len(lines) == 1 and f'"seq":{head}' not in lines[0]  # signed, not plain JSON
    assert (await verify_offline(cp.settings.state_dir))["checkpoints"] == 1


async def test_a_service_does_not_start_on_a_chain_its_checkpoints_disown(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    clock = ManualClock()
    first = await start_control_plane(aiohttp_client, tmp_path / "state", clock=clock)
    await _requests(first, 4)
    await first.client.close()  # writes the last checkpoint
    _cut_and_rewind(first.database, 2)
    app = create_app(dataclasses.replace(first.settings, state_endpoints=free_state_endpoints()))
    app.on_startup.freeze()  # as a runner does; the app itself freezes once started
    with pytest.raises(ConfigurationError, match="does not hold record .* move the checkpoint"):
        await app.startup()
    # A restore on purpose: the operator moves the checkpoints aside, and the service starts.
    first.settings.audit_checkpoints.rename(tmp_path / "old-checkpoints.jsonl")
    second = await start_control_plane(aiohttp_client, tmp_path / "state", clock=clock)
    assert (await _verify(second))["ok"] is True


async def test_a_forged_or_edited_checkpoint_line_fails_verification(cp: ControlPlane) -> None:
    await _requests(cp, 2)
    await cp.services.checkpoints.write()
    path = cp.services.checkpoints.path
    genuine = path.read_text()
    stranger = Ed25519PrivateKey.generate()
    forged = sign_checkpoint(Anchor(1, "0" * 64, 1.0), issuer=cp.settings.issuer,
                             kid=public_jwk(stranger.public_key())["kid"], key=stranger)
    path.write_text(genuine + forged + "\n")
    result = await _verify(cp)
    assert result["ok"] is False and "line 2" in str(result["problem"])
    header, payload, signature = genuine.strip().split(".")
    path.write_text(f"{header}.{payload}.{signature[:-4]}AAAA\n")
    assert "does not verify" in str((await _verify(cp))["problem"])


async def test_a_last_line_cut_short_by_a_crash_is_skipped(cp: ControlPlane) -> None:
    await _requests(cp, 2)
    await cp.services.checkpoints.write()
    path = cp.services.checkpoints.path
    path.write_text(path.read_text() + "eyJhbGciOiJFZERTQSJ9.eyJzZXEiOjF9")  # no newline: torn
    result = await _verify(cp)
    assert result["ok"] is True and result["checkpoints"] == 1


def test_a_checkpoint_must_be_exactly_what_the_service_signs(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    kid = public_jwk(key.public_key())["kid"]
    keys = {kid: key.public_key()}
    digest = hashlib.sha256(b"x").hexdigest()
    line = sign_checkpoint(Anchor(7, digest, 1.5), issuer="dsn-controlplane", kid=kid, key=key)
    assert parse_checkpoint(line, issuer="dsn-controlplane", keys=keys) == Anchor(7, digest, 1.5)
    for bad in (Anchor(0, digest, 1.5), Anchor(7, "zz" * 32, 1.5), Anchor(7, digest[:10], 1.5)):
        with pytest.raises(CheckpointError, match="claims"):
            parse_checkpoint(sign_checkpoint(bad, issuer="dsn-controlplane", kid=kid, key=key),
                             issuer="dsn-controlplane", keys=keys)
    with pytest.raises(CheckpointError, match="claims"):
        parse_checkpoint(line, issuer="another-service", keys=keys)
    with pytest.raises(CheckpointError, match="never published"):
        parse_checkpoint(line, issuer="dsn-controlplane", keys={})
    path = tmp_path / "checkpoints.jsonl"
    assert read_checkpoints(path, issuer="dsn-controlplane", keys=keys).anchors == []
    path.write_text("not a checkpoint\n")
    assert "line 1" in str(read_checkpoints(path, issuer="dsn-controlplane", keys=keys).problem)
