"""The ZAP 1.0 codec: malformed frame lists refused (still answerable), credentials read only in
the shape their mechanism gives them, replies in RFC 27's six frames."""

from __future__ import annotations

import pytest
import zmq
from zmq.utils import z85

from common import zap
from common.errors import DsnError

PUBLIC = zmq.curve_keypair()[0]
HEADER = [b"1.0", b"42", b"dsn", b"10.0.0.5", b"peer-id"]


def _request(mechanism: bytes, *credentials: bytes) -> list[bytes]:
    return [*HEADER, mechanism, *credentials]


def test_a_request_is_read_frame_by_frame() -> None:
    request = zap.parse(_request(b"CURVE", z85.decode(PUBLIC)))
    assert request == zap.ZapRequest(
        version=b"1.0", request_id=b"42", domain=b"dsn", address="10.0.0.5",
        identity=b"peer-id", mechanism=b"CURVE", credentials=(z85.decode(PUBLIC),))
    assert request.curve_key() == PUBLIC.decode()
    assert request.plain_credentials() is None


@pytest.mark.parametrize(("frames", "request_id", "address"), [
    ([], b"", ""),
    ([b"1.0"], b"", ""),
    ([b"1.0", b"42", b"dsn"], b"42", ""),
    (HEADER, b"42", "10.0.0.5"),
    ([b"2.0", *HEADER[1:], b"NULL"], b"42", "10.0.0.5"),
    ([b"", *HEADER[1:], b"NULL"], b"42", "10.0.0.5"),
])
def test_malformed_frame_lists_are_refused_but_can_be_answered(
        frames: list[bytes], request_id: bytes, address: str) -> None:
    with pytest.raises(zap.ZapError) as refused:
        zap.parse(frames)
    assert isinstance(refused.value, DsnError)
    assert (refused.value.request_id, refused.value.address) == (request_id, address)


def test_an_address_that_is_not_ascii_is_still_text() -> None:
    assert zap.parse([*HEADER[:3], b"10.0.\xff.5", b"", b"NULL"]).address == "10.0.\ufffd.5"


@pytest.mark.parametrize("frames", [
    _request(b"CURVE"),
    _request(b"CURVE", z85.decode(PUBLIC)[:-1]),
    _request(b"CURVE", z85.decode(PUBLIC) + b"x"),
    _request(b"CURVE", z85.decode(PUBLIC), b""),
    _request(b"PLAIN", z85.decode(PUBLIC)),
    _request(b"NULL"),
])
def test_a_curve_key_is_exactly_one_32_byte_frame_of_a_curve_request(
        frames: list[bytes]) -> None:
    assert zap.parse(frames).curve_key() is None


def test_plain_credentials_are_a_username_and_a_password_of_at_most_255_bytes() -> None:
    longest = b"x" * zap.MAX_PLAIN_BYTES
    assert zap.parse(_request(b"PLAIN", b"beam-2", longest)).plain_credentials() == (
        b"beam-2", longest)
    assert zap.parse(_request(b"PLAIN", b"", b"")).plain_credentials() == (b"", b"")


@pytest.mark.parametrize("frames", [
    _request(b"PLAIN", b"beam-2"),
    _request(b"PLAIN", b"beam-2", b"secret", b"more"),
    _request(b"PLAIN", b"x" * 256, b"secret"),
    _request(b"PLAIN", b"beam-2", b"x" * 256),
    _request(b"CURVE", b"beam-2", b"secret"),
])
def test_other_plain_credentials_are_refused(frames: list[bytes]) -> None:
    assert zap.parse(frames).plain_credentials() is None


def test_replies_are_six_frames_echoing_the_request_id() -> None:
    assert zap.allow(b"42", "beam-1") == [b"1.0", b"42", b"200", b"OK", b"beam-1", b""]
    assert zap.deny(b"42", "unknown_key") == [b"1.0", b"42", b"400", b"unknown_key", b"", b""]
    assert zap.deny(b"", "bad_request")[1] == b""
