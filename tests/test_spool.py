"""Spool files: the format (round trip, every defect refused), the gateway spooling a scan of a
session without consumers on real sockets, and its replay into another session."""

from __future__ import annotations

import os
import stat
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from click.testing import CliRunner
from waiting import eventually

from common import strictyaml
from common.config import load_config
from common.keys import KeyPair, create_keypair, load_secret_keypair
from common.protocol import (
    Data,
    RoutedScanBegin,
    RoutedScanEnd,
    ScanBegin,
    decode_consumer_message,
    encode,
)
from dataplane.cli import producer as producer_cli
from dataplane.producer import Producer, replay_spool, stream_synthetic
from dataplane.spool import (
    SpoolError,
    SpoolManifest,
    SpoolReader,
    SpoolWriter,
    encode_file_header,
)
from dataplane.synthetic import CameraSpec, StreamPlan, SyntheticCamera
from gateway import journal
from gateway.metrics import GatewayCollector
from gateway.proxy import Gateway
from gateway.spool import prepare_spool_dir

BEGIN = ScanBegin(v=1, scan=3, scan_shape=(2, 2), frame_shape=(8, 4), sectors=2, producers=2,
                  dtype="uint16")
SECTOR = 4 * 4 * 2
MANIFEST = SpoolManifest(sent=9, dropped={"out_of_range": 1}, drops=[(7, 0, "out_of_range")],
                         drops_truncated=False)
HEAD = len(encode_file_header("s1", 3, encode(BEGIN)))


def _records() -> list[tuple[Data, bytes]]:
    pairs = [(2, 1), (0, 0), (3, 1), (0, 0), (1, 0)]  # out of order, with a duplicate
    return [(Data(v=1, scan=3, frame=f, sector=k, seq=i), bytes([i]) * SECTOR)
            for i, (f, k) in enumerate(pairs)]


def _write(directory: Path, records: list[tuple[Data, bytes]] | None = None) -> Path:
    writer = SpoolWriter(directory, "s1", 3, encode(BEGIN))
    for msg, payload in _records() if records is None else records:
        writer.write(encode(msg), payload)
    return writer.finish(MANIFEST)


def _read(path: Path) -> list[tuple[Data, bytes]]:
    with SpoolReader(path) as reader:
        return list(reader.records())


def test_round_trip_keeps_order_geometry_and_manifest(tmp_path: Path) -> None:
    path = _write(tmp_path)
    assert path == tmp_path / "s1_scan000003.spool"
    assert os.listdir(tmp_path) == [path.name]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with SpoolReader(path) as reader:
        info = reader.info
        assert (info.session, info.scan, info.begin) == ("s1", 3, BEGIN)
        assert (info.records, info.bytes, info.manifest) == (5, 5 * SECTOR, MANIFEST)
        assert list(reader.records()) == _records()


def test_an_existing_spool_is_never_overwritten(tmp_path: Path) -> None:
    first = _write(tmp_path)
    second = _write(tmp_path, _records()[:1])
    assert second.name == "s1_scan000003-1.spool"
    assert len(_read(first)) == 5 and len(_read(second)) == 1


def test_an_unfinished_spool_stays_partial_and_is_refused(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path, "s1", 3, encode(BEGIN))
    msg, payload = _records()[0]
    writer.write(encode(msg), payload)
    partial = writer.abandon()
    assert partial.name.endswith(".partial") and os.listdir(tmp_path) == [partial.name]
    with pytest.raises(SpoolError, match=rf"offset {HEAD + 1 + 2 + len(encode(msg)) + 4 + SECTOR}"
                                         r": truncated record kind"):
        SpoolReader(partial)


def _reseal(blob: bytes) -> bytes:
    return blob[:-4] + struct.pack("<I", zlib.crc32(blob[:-4]))


def _patched(blob: bytes, offset: int, value: bytes) -> bytes:
    return blob[:offset] + value + blob[offset + len(value):]


FIRST = HEAD  # the first record's kind byte
HEADER_LEN = len(encode(_records()[0][0]))
PAYLOAD_LEN_AT = FIRST + 1 + 2 + HEADER_LEN
TRAILER_AT = -(4 + 4 + len(msgspec.msgpack.encode(MANIFEST)) + 16 + 1)

CORRUPTIONS: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("bad magic", lambda b: b"NOTSPOOL" + b[8:], r"offset 0: not a spool file"),
    ("version", lambda b: _patched(b, 8, b"\x02\x00"), r"offset 8: unsupported .* version 2"),
    ("session", lambda b: _patched(b, 11, b"?"), r"offset 11: invalid session id"),
    ("empty file", lambda b: b"", r"offset 0: truncated file header"),
    ("truncated header", lambda b: b[:HEAD - 3], r"truncated scan_begin header"),
    ("truncated record", lambda b: b[:PAYLOAD_LEN_AT + 10], r"truncated payload: 6 of 32"),
    ("truncated trailer", lambda b: b[:-2], r"truncated checksum"),
    ("oversized header length", lambda b: _patched(b, FIRST + 1, struct.pack("<H", 600)),
     rf"offset {FIRST + 1}: data header length 600 outside 1..512"),
    ("oversized payload length", lambda b: _patched(b, PAYLOAD_LEN_AT, struct.pack("<I", 2**31)),
     rf"offset {PAYLOAD_LEN_AT}: payload length 2147483648 outside 32..32"),
    ("unknown record kind", lambda b: _patched(b, FIRST, b"Z"), rf"offset {FIRST}: unknown record"),
    ("trailer count", lambda b: _patched(b, TRAILER_AT + 1, struct.pack("<Q", 4)),
     r"trailer counts 4 records, 160 bytes; the file holds 5 records, 160 bytes"),
    ("payload bit flip", lambda b: _patched(b, PAYLOAD_LEN_AT + 4, b"\xff"), r"checksum"),
    ("checksum", lambda b: b[:-1] + bytes([b[-1] ^ 1]), r"checksum .* computed"),
    ("bytes after the trailer", lambda b: b + b"\x00", r"bytes after the trailer"),
    ("frame outside the scan", lambda b: _reseal(b.replace(encode(_records()[0][0]), encode(
        Data(v=1, scan=3, frame=4, sector=1, seq=0)))), rf"offset {FIRST + 1}: out_of_range"),
    ("record of another scan", lambda b: _reseal(b.replace(encode(_records()[0][0]), encode(
        Data(v=1, scan=4, frame=2, sector=1, seq=0)))), r"not a native data header of scan 3"),
]


@pytest.mark.parametrize(("case", "corrupt", "message"), CORRUPTIONS,
                         ids=[c[0] for c in CORRUPTIONS])
def test_every_defect_is_refused_with_its_offset(tmp_path: Path, case: str,
                                                 corrupt: Callable[[bytes], bytes],
                                                 message: str) -> None:
    path = _write(tmp_path)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(SpoolError, match=message):
        SpoolReader(path)


def test_a_file_changed_during_replay_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path)
    with SpoolReader(path) as reader:
        blob = path.read_bytes()
        path.write_bytes(_patched(blob, PAYLOAD_LEN_AT + 4, b"\xff"))
        with pytest.raises(SpoolError, match="checksum"):
            list(reader.records())


def test_spool_dir_resolves_beside_the_config_and_null_turns_spooling_off(
        tmp_path: Path, server_key_files: tuple[KeyPair, Path]) -> None:
    path = tmp_path / "dsn.yaml"
    gateway: dict[str, Any] = {"server_secret_key_file": str(server_key_files[1])}
    path.write_text(strictyaml.dump({"version": 1, "gateway": gateway, "sessions": []}))
    assert load_config(path).gateway.spool_dir == tmp_path / "spool"
    path.write_text(strictyaml.dump({"version": 1, "sessions": [],
                                     "gateway": {**gateway, "spool_dir": None}}))
    assert load_config(path).gateway.spool_dir is None


def test_spool_dir_is_private_and_a_link_or_file_in_its_place_is_refused(tmp_path: Path) -> None:
    created = prepare_spool_dir(tmp_path / "a" / "spool")
    assert created is not None and stat.S_IMODE(created.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    assert prepare_spool_dir(shared) == shared  # tightened: others may no longer read it
    assert stat.S_IMODE(shared.stat().st_mode) == 0o700
    (tmp_path / "link").symlink_to(shared)
    assert prepare_spool_dir(tmp_path / "link") is None
    (tmp_path / "file").write_text("")
    assert prepare_spool_dir(tmp_path / "file") is None
    assert prepare_spool_dir(None) is None


# --- real sockets ---------------------------------------------------------------------------

SPEC = CameraSpec(scan_shape=(4, 4), seed=5, electrons_per_frame=10)
PLAN = StreamPlan(SPEC, producers=4, loss_rate=0.1, duplicate_rate=0.2, reorder_window=4, seed=5)
Key = tuple[int, int, bytes]


class Gateways:
    """Gateways started on configs written to tmp_path; stopped and closed at teardown."""

    def __init__(self, tmp_path: Path, secret_file: Path, free_port: Callable[[], int]) -> None:
        self.tmp_path = tmp_path
        self.secret_file = secret_file
        self.free_port = free_port
        self.running: list[tuple[Gateway, threading.Thread]] = []

    def start(self, session: str, client: KeyPair, consumers: list[str],
              **settings: Any) -> Gateway:
        ingress = f"tcp://127.0.0.1:{self.free_port()}"
        path = self.tmp_path / f"{session}.yaml"
        path.write_text(strictyaml.dump({
            "version": 1,
            "gateway": {"ingress": ingress, "server_secret_key_file": str(self.secret_file),
                        **settings},
            "sessions": [{"id": session, "client_keys": [client.public.decode()],
                          "allowed_networks": ["127.0.0.0/8"],
                          "allowed_targets": ["127.0.0.0/8"], "consumers": consumers}]}))
        gateway = Gateway(load_config(path))
        gateway.start()
        thread = threading.Thread(target=gateway.run, daemon=True)
        thread.start()
        self.running.append((gateway, thread))
        return gateway

    def close(self) -> None:
        for gateway, thread in self.running:
            gateway.stop()
            thread.join(timeout=5)
            gateway.close()


@pytest.fixture
def gateways(tmp_path: Path, server_key_files: tuple[KeyPair, Path],
             free_port: Callable[[], int]) -> Iterator[Gateways]:
    made = Gateways(tmp_path, server_key_files[1], free_port)
    yield made
    made.close()


def _client(directory: Path, name: str) -> tuple[KeyPair, Path]:
    _public, secret = create_keypair(directory, name)
    return load_secret_keypair(secret), secret


def _receive_scan(pulls: list[zmq.Socket]) -> tuple[list[Any], list[Key], list[Any]]:
    """Routed scan_begins, data as (frame, sector, payload), routed scan_ends of every consumer."""
    begins, data, ends = [], [], []
    for pull in pulls:
        while True:
            assert pull.poll(10_000), "a consumer timed out"
            parts = pull.recv_multipart()
            msg = decode_consumer_message(parts[0])
            if isinstance(msg, RoutedScanBegin):
                begins.append(msg)
            elif isinstance(msg, Data):
                data.append((msg.frame, msg.sector, parts[1]))
            else:
                ends.append(msg)
                break
    return begins, data, ends


def _planned() -> Counter[Key]:
    camera = SyntheticCamera(SPEC)
    return Counter((f, k, camera.sector(f, k).tobytes())
                   for p in range(PLAN.producers) for f, k in PLAN.messages(p))


@pytest.mark.timeout(30)
def spools_in(directory: Path) -> list[str]:
    """The directory's files but the gateway's journal of open scans."""
    return sorted(name for name in os.listdir(directory) if name != journal.NAME)


def test_a_spooled_file_appears_only_under_its_final_name_after_scan_end(
        tmp_path: Path, gateways: Gateways, server_key_files: tuple[KeyPair, Path]) -> None:
    client, _ = _client(tmp_path / "keys", "producer")
    gateway = gateways.start("lab", client, consumers=[])
    spool_dir = tmp_path / "spool"
    camera = SyntheticCamera(SPEC)
    with Producer(gateway.config.gateway.ingress, server_key_files[0].public, client,
                  send_timeout_s=10) as producer:
        producer.begin_scan(12, SPEC.scan_shape, 1)
        for frame in range(3):
            producer.send(frame, 2, camera.sector(frame, 2))
        router = gateway.router
        assert router is not None
        eventually(lambda: next(router.stats()).spooled >= 3, timeout_s=10,
                   what="the gateway to spool the 3 messages")
        (partial,) = spools_in(spool_dir)
        assert partial.startswith("lab_scan000012.spool.") and partial.endswith(".partial")
        producer.end_scan()
    final = spool_dir / "lab_scan000012.spool"
    eventually(final.exists, timeout_s=10, what=f"{final.name} to appear")
    assert spools_in(spool_dir) == [final.name]
    assert [(m.frame, m.sector, m.seq) for m, _ in _read(final)] == [(0, 2, 0), (1, 2, 1),
                                                                      (2, 2, 2)]
    (stats,) = router.stats()
    assert (stats.spooled, stats.spooled_bytes, stats.messages) == (3, 3 * 165_888, 0)
    assert router.drops == {} and gateway.spool_files() == {"lab": 1}
    samples = {(s.name, s.labels.get("session")): s.value
               for family in GatewayCollector(gateway).collect() for s in family.samples}
    assert samples[("dsn_gateway_spooled_messages_total", "lab")] == 3
    assert samples[("dsn_gateway_spooled_bytes_total", "lab")] == 3 * 165_888
    assert samples[("dsn_gateway_spool_files_total", "lab")] == 1


@pytest.mark.timeout(60)
def test_a_replayed_spool_delivers_exactly_what_a_direct_stream_delivers(
        tmp_path: Path, gateways: Gateways, server_key_files: tuple[KeyPair, Path],
        zmq_context: zmq.Context) -> None:
    server = server_key_files[0]
    spool_client, _ = _client(tmp_path / "keys", "spooler")
    spooler = gateways.start("lab", spool_client, consumers=[])
    stream_synthetic(spooler.config.gateway.ingress, server.public, spool_client,
                     SyntheticCamera(SPEC), PLAN, scan=7, progress=False, send_timeout_s=10)
    spool = tmp_path / "spool" / "lab_scan000007.spool"
    eventually(spool.exists, timeout_s=10, what=f"{spool.name} to appear")

    pulls = [zmq_context.socket(zmq.PULL) for _ in range(2)]
    ports = [pull.bind_to_random_port("tcp://127.0.0.1") for pull in pulls]
    client, client_file = _client(tmp_path / "keys", "hpc")
    target = gateways.start("hpc", client, [f"tcp://127.0.0.1:{p}" for p in ports])
    endpoint = target.config.gateway.ingress

    stream_synthetic(endpoint, server.public, client, SyntheticCamera(SPEC), PLAN, scan=5,
                     progress=False, send_timeout_s=10)
    _, direct, direct_ends = _receive_scan(pulls)
    stats = replay_spool(spool, endpoint, server.public, client, progress=False)
    begins, replayed, ends = _receive_scan(pulls)

    assert Counter(direct) == Counter(replayed) == _planned()
    assert stats.messages == PLAN.total_messages and stats.lost == 0
    assert [(b.scan, b.members, b.index, b.scan_shape) for b in begins] == [
        (7, 2, 0, (4, 4)), (7, 2, 1, (4, 4))]
    per_consumer = Counter(f % 2 for f, _, _ in replayed)
    for index, end in enumerate(ends):
        assert isinstance(end, RoutedScanEnd)
        assert (end.scan, end.expected, end.sent, end.accepted, end.dropped, end.drops) == (
            7, per_consumer[index], PLAN.total_messages, PLAN.total_messages, {}, [])
    assert sum(e.expected for e in direct_ends) == PLAN.total_messages

    result = CliRunner().invoke(producer_cli, [
        "stream", "--spool", str(spool), "--endpoint", endpoint, "--client-key", str(client_file),
        "--server-key", str(tmp_path / "keys" / "server.key"), "--scan", "9", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"spool {spool.name}: {PLAN.total_messages} messages" in result.output
    begins, again, _ = _receive_scan(pulls)
    assert {b.scan for b in begins} == {9} and Counter(again) == _planned()
    assert target.router is not None and target.router.drops == {}


def test_replay_refuses_synthetic_options(tmp_path: Path) -> None:
    path = _write(tmp_path)
    result = CliRunner().invoke(producer_cli, [
        "stream", "--spool", str(path), "--endpoint", "tcp://127.0.0.1:1", "--loss", "0.1",
        "--client-key", "x", "--server-key", "x"])
    assert result.exit_code == 2 and "--loss applies to synthetic scans" in result.output


@pytest.mark.timeout(30)
def test_without_a_usable_spool_dir_a_scan_without_consumers_is_refused(
        tmp_path: Path, gateways: Gateways, server_key_files: tuple[KeyPair, Path]) -> None:
    (tmp_path / "not-a-dir").write_text("")
    client, _ = _client(tmp_path / "keys", "producer")
    gateway = gateways.start("lab", client, consumers=[], spool_dir=str(tmp_path / "not-a-dir"))
    router = gateway.router
    assert router is not None and not router.spooling
    with Producer(gateway.config.gateway.ingress, server_key_files[0].public, client,
                  send_timeout_s=10) as producer:
        producer.begin_scan(1, SPEC.scan_shape, 1)
    def refused() -> bool:
        assert router.drops == {("lab", "no_consumers"): 1}
        return True

    eventually(refused, timeout_s=10, what="the scan to be dropped for want of consumers")
    assert gateway.spool_files() == {}
