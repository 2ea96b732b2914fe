"""ZAP admission policy, without sockets: only live sessions' CURVE keys (or, for sessions allowed
unencrypted transport, their PLAIN password), from allowed networks."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
import zmq
from zmq.utils import z85

from common import zap
from common.config import Session
from gateway.auth import (
    Admission,
    ZapHandler,
    admit,
    decide_request,
    handshake_failure_reason,
    reply_frames,
)
from gateway.sessions import SessionTable

PUBLIC = zmq.curve_keypair()[0].decode()
EXPIRES = datetime(2030, 1, 1, tzinfo=UTC).timestamp()


def _table() -> SessionTable:
    return SessionTable([Session(
        id="beam-1", client_keys=[PUBLIC], allowed_networks=["10.0.0.0/8", "2001:db8::/32"],
        allowed_targets=["127.0.0.0/8"], consumers=["tcp://127.0.0.1:7001"],
        expires_at=datetime(2030, 1, 1, tzinfo=UTC))])


@pytest.mark.parametrize(("mechanism", "key", "address", "now", "reason"), [
    ("NULL", PUBLIC, "10.1.2.3", 0.0, "mechanism"),
    ("PLAIN", PUBLIC, "10.1.2.3", 0.0, "mechanism"),
    ("CURVE", zmq.curve_keypair()[0].decode(), "10.1.2.3", 0.0, "unknown_key"),
    ("CURVE", PUBLIC, "127.0.0.1", 0.0, "network"),
    ("CURVE", PUBLIC, "not-an-ip", 0.0, "network"),
    ("CURVE", PUBLIC, "10.1.2.3", EXPIRES, "expired"),
])
def test_refusals_name_their_reason(mechanism: str, key: str, address: str, now: float,
                                    reason: str) -> None:
    admission = admit(_table(), mechanism, key, address, now)
    assert not admission.allowed and admission.reason == reason and admission.user_id == ""


@pytest.mark.parametrize("address", ["10.1.2.3", "::ffff:10.9.9.9", "2001:db8::7"])
def test_a_live_session_key_from_an_allowed_network_is_admitted_as_its_session(
        address: str) -> None:
    admission = admit(_table(), "CURVE", PUBLIC, address, EXPIRES - 1)
    assert admission.allowed and admission.user_id == "beam-1"


def _request(domain: bytes = b"dsn", mechanism: bytes = b"CURVE",
             credentials: tuple[bytes, ...] = (z85.decode(PUBLIC),)) -> list[bytes]:
    return [b"1.0", b"42", domain, b"10.0.0.5", b"", mechanism, *credentials]


def _decide(table: SessionTable, frames: list[bytes], now: float = 0.0) -> Admission:
    return decide_request(table, zap.parse(frames), now)


@pytest.mark.parametrize(("request_frames", "reason"), [
    (_request(domain=b"other"), "domain"),
    (_request(mechanism=b"NULL", credentials=()), "mechanism"),
    (_request(credentials=(b"short",)), "bad_request"),
])
def test_unexpected_zap_requests_are_denied(request_frames: list[bytes], reason: str) -> None:
    admission = _decide(_table(), request_frames)
    assert not admission.allowed and admission.reason == reason
    assert reply_frames(b"42", admission)[2] == b"400"


def test_zap_reply_carries_the_session_as_user_id() -> None:
    admission = _decide(_table(), _request())
    assert reply_frames(b"42", admission) == [b"1.0", b"42", b"200", b"OK", b"beam-1", b""]


@pytest.mark.parametrize("request_frames", [_request()[:5], [b"2.0", *_request()[1:]]])
def test_the_handler_denies_a_malformed_request_as_a_bad_request(
        request_frames: list[bytes]) -> None:
    context = zmq.Context()
    handler = ZapHandler(context, _table(), poll_ms=10)
    handler.start()
    try:
        with context.socket(zmq.REQ) as requester:  # in libzmq's place
            requester.linger = 0
            requester.rcvtimeo = 5000
            requester.connect(zap.ENDPOINT)
            requester.send_multipart(request_frames)
            reply = requester.recv_multipart()
    finally:
        handler.stop()
        context.term()
    assert reply == [b"1.0", b"42", b"400", b"bad_request", b"", b""]
    assert handler.decisions == {("deny", "bad_request"): 1}


def test_handshake_failures_are_labelled() -> None:
    assert handshake_failure_reason(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                                    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH) == \
        "handshake_mechanism"
    assert handshake_failure_reason(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                                    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC) == \
        "handshake_cryptographic"
    assert handshake_failure_reason(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 0) == "handshake_failed"


PASSWORD = b"signature-of-the-session-token"


def _plain_table() -> SessionTable:
    """beam-1 as above (CURVE only) and beam-2, which also allows unencrypted transport."""
    plain = Session(
        id="beam-2", client_keys=[zmq.curve_keypair()[0].decode()],
        plain_password_sha256=hashlib.sha256(PASSWORD).hexdigest(),
        allowed_networks=["10.0.0.0/8"], allowed_targets=["127.0.0.0/8"], consumers=[],
        expires_at=datetime(2030, 1, 1, tzinfo=UTC))
    return SessionTable([next(iter(_table())).session, plain])


def _plain(username: bytes, password: bytes, domain: bytes = b"dsn-plain",
           mechanism: bytes = b"PLAIN") -> list[bytes]:
    return _request(domain=domain, mechanism=mechanism, credentials=(username, password))


def test_a_plain_client_naming_a_plaintext_session_with_its_password_is_admitted() -> None:
    admission = _decide(_plain_table(), _plain(b"beam-2", PASSWORD))
    assert admission.allowed and admission.user_id == "beam-2"


@pytest.mark.parametrize(("request_frames", "reason"), [
    (_plain(b"beam-2", b"wrong"), "bad_password"),
    (_plain(b"beam-2", PASSWORD[:-1]), "bad_password"),
    (_plain(b"beam-1", PASSWORD), "unknown_key"),  # CURVE-only session: no password exists
    (_plain(b"nobody", PASSWORD), "unknown_key"),
    (_plain(b"beam-2", PASSWORD, domain=b"dsn"), "mechanism"),  # PLAIN on the CURVE ingress
    (_request(domain=b"dsn-plain"), "mechanism"),  # CURVE on the plaintext ingress
    (_plain(b"beam-2", b"x" * 256), "bad_request"),
    (_request(domain=b"dsn-plain", mechanism=b"PLAIN", credentials=(b"beam-2",)), "bad_request"),
])
def test_plain_refusals_name_their_reason(request_frames: list[bytes], reason: str) -> None:
    admission = _decide(_plain_table(), request_frames)
    assert not admission.allowed and admission.reason == reason


def test_a_plain_client_outside_the_session_networks_or_after_expiry_is_refused() -> None:
    outside = _plain(b"beam-2", PASSWORD)
    outside[3] = b"192.168.1.1"
    assert _decide(_plain_table(), outside).reason == "network"
    assert _decide(_plain_table(), _plain(b"beam-2", PASSWORD), EXPIRES).reason == "expired"
