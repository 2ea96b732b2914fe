"""The wire protocol codec: round trips, plain-msgpack producers, and every rejection reason."""

from __future__ import annotations

import msgpack
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from common import protocol as p

u32 = st.integers(0, 2**32 - 1)
dims = st.tuples(st.integers(1, 65_535), st.integers(1, 65_535))

data_headers = st.builds(p.Data, v=st.just(1), scan=u32, frame=u32, sector=st.integers(0, 63),
                         seq=st.integers(0, 2**63 - 1))
scan_ends = st.builds(p.ScanEnd, v=st.just(1), scan=u32, sent=st.integers(0, 2**63 - 1))
lane_pairs = st.one_of(st.just((None, None)),
                       st.integers(1, 64).flatmap(lambda n: st.tuples(st.integers(0, n - 1),
                                                                      st.just(n))))
scan_begins = lane_pairs.flatmap(lambda lane: st.builds(
    p.ScanBegin, v=st.just(1), scan=u32, scan_shape=dims, frame_shape=st.just((576, 576)),
    sectors=st.sampled_from([1, 2, 4, 8]), producers=st.integers(1, 1024),
    dtype=st.just("uint16"), lane=st.just(lane[0]), lanes=st.just(lane[1])))


def _reason(buf: bytes) -> str:
    with pytest.raises(p.ProtocolError) as info:
        p.decode_producer_header(buf)
    return info.value.reason.value


@given(st.one_of(data_headers, scan_ends, scan_begins))
def test_native_headers_round_trip(msg: p.ProducerMessage) -> None:
    assert p.decode_producer_header(p.encode(msg)) == msg


@given(st.one_of(data_headers, scan_ends, scan_begins))
def test_headers_from_plain_msgpack_producers_decode(msg: p.ProducerMessage) -> None:
    # Such a producer leaves out the keys it does not use (a scan of one lane has no lane keys).
    as_dict = {"type": msg.__struct_config__.tag,
               **{f: getattr(msg, f) for f in msg.__struct_fields__
                  if getattr(msg, f) is not None}}
    assert p.decode_producer_header(msgpack.packb(as_dict)) == msg


def test_a_scan_of_one_lane_is_encoded_without_lane_keys() -> None:
    begin = p.ScanBegin(v=1, scan=1, scan_shape=(2, 2), frame_shape=(576, 576), sectors=4,
                        producers=1, dtype="uint16")
    assert set(msgpack.unpackb(p.encode(begin))) == {
        "type", "v", "scan", "scan_shape", "frame_shape", "sectors", "producers", "dtype"}
    laned = p.ScanBegin(v=1, scan=1, scan_shape=(2, 2), frame_shape=(576, 576), sectors=4,
                        producers=1, dtype="uint16", lane=1, lanes=2)
    assert msgpack.unpackb(p.encode(laned))["lanes"] == 2


@given(st.binary(max_size=600))
def test_arbitrary_bytes_decode_or_raise_protocol_error(buf: bytes) -> None:
    try:
        p.decode_producer_header(buf)
    except p.ProtocolError as exc:
        assert exc.reason in p.DropReason


@given(st.recursive((st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
                     | st.floats() | st.text(max_size=8)),
                    lambda c: (st.lists(c, max_size=4)
                               | st.dictionaries(st.text(max_size=6), c, max_size=4)),
                    max_leaves=20))
def test_arbitrary_msgpack_values_never_escape_as_other_errors(value: object) -> None:
    try:
        p.decode_producer_header(msgpack.packb(value))
    except p.ProtocolError:
        pass


def test_ncem_header_becomes_a_native_data_message() -> None:
    # [scan_number, frame_number, positions_per_row, rows, x_in_row, row_in_scan, thread_id, module]
    msg = p.decode_producer_header(msgpack.packb([7, 1234, 32, 16, 5, 3, 1, 2]))
    assert msg == p.Data(v=1, scan=7, frame=3 * 32 + 5, sector=2, seq=1234)
    assert not p.is_native_header(msgpack.packb([7, 1234, 32, 16, 5, 3, 1, 2]))


@pytest.mark.parametrize("fields", [
    [7, 1, 32, 16, 32, 3, 1, 2],          # x_in_row outside the row
    [7, 1, 32, 16, 5, 16, 1, 2],          # row outside the scan
    [7, 1, 32, 16, 5, 3, 1, 64],          # module beyond any sector count
    [7, 1, 32, 16, 5, 3, 1],              # 7 fields
    [7, 1, 32, 16, 5, 3, 1, 2, 0],        # 9 fields
    [7, -1, 32, 16, 5, 3, 1, 2],          # negative
    [7, 1.0, 32, 16, 5, 3, 1, 2],         # float
])
def test_bad_ncem_headers_are_invalid(fields: list[object]) -> None:
    assert _reason(msgpack.packb(fields)) == "invalid_header"


def test_duplicate_key_is_rejected_even_when_the_struct_would_decode() -> None:
    good = {"type": "data", "v": 1, "scan": 1, "frame": 2, "sector": 3, "seq": 4}
    body = b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in good.items())
    duplicated = bytes([0x80 | 7]) + body + msgpack.packb("scan") + msgpack.packb(9)
    assert _reason(duplicated) == "duplicate_key"
    assert (p.decode_producer_header(bytes([0x80 | 6]) + body)
            == p.Data(v=1, scan=1, frame=2, sector=3, seq=4))


def test_duplicate_key_is_rejected_in_a_header_without_its_optional_keys() -> None:
    # A scan_begin of one lane leaves room for two more keys: a repeated key must not fill it.
    begin = {"type": "scan_begin", "v": 1, "scan": 1, "scan_shape": [4, 4],
             "frame_shape": [576, 576], "sectors": 4, "producers": 4, "dtype": "uint16"}
    body = b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in begin.items())
    twice = bytes([0x80 | 9]) + body + msgpack.packb("producers") + msgpack.packb(1)
    assert _reason(twice) == "duplicate_key"


@pytest.mark.parametrize("header, reason", [
    ({"type": "data", "v": 2, "scan": 1, "frame": 2, "sector": 3, "seq": 4}, "invalid_header"),
    ({"type": "data", "v": 1, "scan": 1, "frame": 2, "sector": 3}, "invalid_header"),
    ({"type": "data", "v": 1, "scan": 1, "frame": 2, "sector": 3, "seq": 4, "x": 0},
     "invalid_header"),
    ({"type": "data", "v": 1, "scan": "1", "frame": 2, "sector": 3, "seq": 4}, "invalid_header"),
    ({"type": "data", "v": 1, "scan": True, "frame": 2, "sector": 3, "seq": 4}, "invalid_header"),
    ({"type": "data", "v": 1, "scan": 1, "frame": 2.0, "sector": 3, "seq": 4}, "invalid_header"),
    ({"type": "data", "v": 1, "scan": 2**32, "frame": 2, "sector": 3, "seq": 4}, "invalid_header"),
    ({"type": "data", "v": 1, "scan": 1, "frame": -1, "sector": 3, "seq": 4}, "invalid_header"),
    ({"type": "data", "v": 1, "scan": 1, "frame": 2, "sector": 64, "seq": 4}, "invalid_header"),
    ({"type": "nope", "v": 1}, "invalid_header"),
    ({"v": 1, "scan": 1}, "invalid_header"),
    ({"type": "scan_begin", "v": 1, "scan": 1, "scan_shape": [0, 4], "frame_shape": [576, 576],
      "sectors": 4, "producers": 4, "dtype": "uint16"}, "invalid_header"),
    ({"type": "scan_begin", "v": 1, "scan": 1, "scan_shape": [4, 4], "frame_shape": [576, 576],
      "sectors": 5, "producers": 4, "dtype": "uint16"}, "invalid_header"),
    ({"type": "scan_begin", "v": 1, "scan": 1, "scan_shape": [4, 4], "frame_shape": [576, 576],
      "sectors": 4, "producers": 4, "dtype": "float64"}, "invalid_header"),
    ({"type": "scan_begin", "v": 1, "scan": 1, "scan_shape": [4, 4, 4], "frame_shape": [576, 576],
      "sectors": 4, "producers": 4, "dtype": "uint16"}, "invalid_header"),
    ({"type": "scan_end", "v": 1, "scan": 1, "sent": -5}, "invalid_header"),
    *[({"type": "scan_begin", "v": 1, "scan": 1, "scan_shape": [4, 4], "frame_shape": [576, 576],
        "sectors": 4, "producers": 4, "dtype": "uint16", **lanes}, reason)
      for lanes, reason in [({"lane": 0}, "invalid_header"),         # lane without lanes
                            ({"lanes": 2}, "invalid_header"),        # lanes without lane
                            ({"lane": 2, "lanes": 2}, "invalid_header"),
                            ({"lane": 0, "lanes": 65}, "invalid_header"),
                            ({"lane": -1, "lanes": 2}, "invalid_header"),
                            ({"lane": None, "lanes": None}, "duplicate_key")]],
])
def test_invalid_headers_name_their_reason(header: dict[str, object], reason: str) -> None:
    assert _reason(msgpack.packb(header)) == reason


def test_oversized_header_is_rejected_before_decoding() -> None:
    huge = msgpack.packb({"type": "data", "v": 1, "pad": "x" * p.MAX_HEADER_BYTES})
    assert _reason(huge) == "oversized_header"


@pytest.mark.parametrize("buf", [b"", b"\xc1", b"\x85", b"\xde\x00", b"\x81\xa4typ",
                                 b"\x81\xa4type\xa4da\xff\xfe"])
def test_truncated_or_undecodable_headers_are_malformed(buf: bytes) -> None:
    assert _reason(buf) == "malformed_header"
    with pytest.raises(p.ProtocolError):
        p.decode_consumer_message(buf)


def test_extension_types_and_deep_nesting_are_rejected() -> None:
    ext = msgpack.packb({"type": "data", "v": 1, "scan": msgpack.ExtType(1, b"x"), "frame": 2,
                         "sector": 3, "seq": 4})
    assert _reason(ext) == "invalid_header"
    nested: object = 1
    for _ in range(100):
        nested = [nested]
    assert _reason(msgpack.packb({"type": "data", "v": 1, "scan": nested})) in {
        "invalid_header", "oversized_header"}


def test_geometry_checks_frame_sector_and_payload_size() -> None:
    geometry = p.ScanGeometry((4, 8), (576, 576), 4)
    assert geometry.sector_shape == (144, 576) and geometry.sector_bytes == 165_888
    geometry.check(p.Data(v=1, scan=0, frame=31, sector=3, seq=0), 165_888)
    for msg, size, reason in [
        (p.Data(v=1, scan=0, frame=32, sector=0, seq=0), 165_888, "out_of_range"),
        (p.Data(v=1, scan=0, frame=0, sector=4, seq=0), 165_888, "out_of_range"),
        (p.Data(v=1, scan=0, frame=0, sector=0, seq=0), 165_887, "wrong_payload_size"),
    ]:
        with pytest.raises(p.ProtocolError) as info:
            geometry.check(msg, size)
        assert info.value.reason.value == reason


def test_routed_messages_round_trip_and_validate_index() -> None:
    begin = p.RoutedScanBegin(v=1, session="s1", scan=3, scan_shape=(4, 4), frame_shape=(576, 576),
                              sectors=4, dtype="uint16", members=2, index=1)
    end = p.RoutedScanEnd(v=1, scan=3, expected=30, sent=63, accepted=63,
                          dropped={"wrong_payload_size": 1}, drops=[(5, 2, "wrong_payload_size")],
                          drops_truncated=False)
    assert p.decode_consumer_message(p.encode(begin)) == begin
    assert p.decode_consumer_message(p.encode(end)) == end
    for laned in (msgspec.structs.replace(begin, lane=1, lanes=3),
                  msgspec.structs.replace(end, lane=2, lanes=3, resumed=True)):
        assert p.decode_consumer_message(p.encode(laned)) == laned
    with pytest.raises(ValueError, match="lane must be below lanes"):
        msgspec.structs.replace(end, lane=3, lanes=3)
    bad = msgpack.packb({"type": "scan_begin", "v": 1, "session": "s1", "scan": 3,
                         "scan_shape": [4, 4], "frame_shape": [576, 576], "sectors": 4,
                         "dtype": "uint16", "members": 2, "index": 2})
    with pytest.raises(p.ProtocolError):
        p.decode_consumer_message(bad)


def test_a_routed_scan_end_that_repeats_a_key_in_place_of_its_optional_ones_is_refused() -> None:
    end = {"type": "scan_end", "v": 1, "scan": 3, "expected": 1, "sent": 1, "accepted": 1,
           "dropped": {}, "drops": [], "drops_truncated": False}
    body = b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in end.items())
    assert p.decode_consumer_message(bytes([0x80 | 9]) + body).resumed is None
    resumed = body + msgpack.packb("resumed") + msgpack.packb(False)
    assert p.decode_consumer_message(bytes([0x80 | 10]) + resumed).resumed is False
    twice = bytes([0x80 | 10]) + body + msgpack.packb("expected") + msgpack.packb(5)
    with pytest.raises(p.ProtocolError) as info:
        p.decode_consumer_message(twice)
    assert info.value.reason.value == "duplicate_key"
