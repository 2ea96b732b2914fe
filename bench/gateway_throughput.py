"""Gateway throughput: direct PUSH->PULL vs the gateway in L4 and L7 mode, with and without CURVE.

One producer process streams N data messages of one 4D Camera sector (144 x 576 uint16, 165,888
bytes) to two consumer processes, either directly over TCP loopback or through a gateway process.
Throughput is payload bytes / (last message received - first message sent). No assertions.

    .venv/bin/python bench/gateway_throughput.py [--messages 8000] [--repeat 1]

The CURVE cases run the real ``dsn gateway run`` command. The plaintext cases run the same proxy
loops in a bench-only process whose ZAP handler admits NULL connections, to show the proxy's own
cost without encryption; the gateway itself never accepts unencrypted producers.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import zap
from common.keys import KeyPair, create_keypair, load_keypair
from common.ports import free_port
from common.protocol import Data, ScanBegin, ScanEnd, encode
from common.tuning import keep_message_buffers
from gateway.proxy import gateway_thread_cpu

SECTOR_BYTES = 144 * 576 * 2
IDLE_S = 1.0


def consumer(port: int, ready: Any, results: Any) -> None:
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.bind(f"tcp://127.0.0.1:{port}")
    ready.set()
    count = volume = 0
    last = 0.0
    while pull.poll(int(IDLE_S * 1000) if count else 60_000):
        frames = pull.recv_multipart(copy=False)
        if len(frames) == 2:
            count += 1
            volume += len(frames[1])
            last = time.perf_counter()
    results.put((count, volume, last))
    pull.close(linger=0)
    context.term()


def producer(endpoints: list[str], messages: int, keys: tuple[bytes, bytes, bytes] | None,
             results: Any, index: int = 0, producers: int = 1, connections: int = 1,
             lane: tuple[int, int] | None = None, lane_producers: int = 1) -> None:
    """Producer process ``index`` of ``producers``: it sends every ``producers``-th message of the
    scan, over ``connections`` sockets in turn, each its own connection to every endpoint and a
    producer of the scan of its own (its scan_begin first, its scan_end last), as a camera's
    sector streams; HAProxy's peer bench with two consumers connects its one producer twice.
    ``lane`` (index, count): it streams that lane of the scan, with ``lane_producers`` producer
    processes in the lane."""
    context = zmq.Context(io_threads=connections)
    pushes = [context.socket(zmq.PUSH) for _ in range(connections)]
    for push in pushes:
        push.sndhwm = 64
        if keys is not None:
            push.curve_publickey, push.curve_secretkey, push.curve_serverkey = keys
        for endpoint in endpoints:
            push.connect(endpoint)
    frames_needed = messages // 4 + 1
    cols = 128
    rows = frames_needed // cols + 1
    payload = zmq.Frame(os.urandom(SECTOR_BYTES))
    headers = [encode(Data(v=1, scan=1, frame=i // 4, sector=i % 4, seq=i))
               for i in range(index, messages, producers)]
    in_scan = (producers if lane is None else lane_producers) * connections
    begin = encode(ScanBegin(v=1, scan=1, scan_shape=(rows, cols), frame_shape=(576, 576),
                             sectors=4, producers=in_scan, dtype="uint16",
                             lane=None if lane is None else lane[0],
                             lanes=None if lane is None else lane[1]))
    for push in pushes:
        push.send(begin)
    time.sleep(0.3)  # let the connections settle so round-robin starts balanced
    start = time.perf_counter()
    for number, header in enumerate(headers):
        pushes[number % connections].send_multipart([header, payload], copy=False)
    for number, push in enumerate(pushes):
        push.send(encode(ScanEnd(v=1, scan=1, sent=len(headers[number::connections]))))
    results.put(start)
    for push in pushes:
        push.close(linger=-1)
    context.term()


def plaintext_gateway(config_path: str, mode: str, ready: Any) -> None:
    """Bench only: the proxy loops behind a NULL-mechanism ingress."""
    from common.config import load_config
    from common.procstat import named_thread
    from gateway.proxy import FORWARD_THREAD, L4Proxy, L7Proxy
    from gateway.sessions import table_from_config

    keep_message_buffers()  # as `dsn gateway run` does
    # A consumer that exits after its tally is a lost connection to the loop: not news here.
    logging.getLogger("dsn").setLevel(logging.ERROR)
    config = load_config(Path(config_path))
    table = table_from_config(config)
    session_id = next(iter(table)).id
    context = zmq.Context(io_threads=config.gateway.io_thread_count)  # as the gateway does
    handler = context.socket(zmq.REP)
    handler.bind(zap.ENDPOINT)

    def admit_all() -> None:
        while True:
            try:
                request = handler.recv_multipart()
            except zmq.ContextTerminated:
                handler.close(linger=0)  # closed by the thread that uses it, once term() begins
                return
            handler.send_multipart(zap.allow(request[1], session_id))

    threading.Thread(target=admit_all, daemon=True).start()
    ingress = context.socket(zmq.PULL)
    ingress.zap_domain = b"dsn"
    ingress.rcvhwm = 256
    ingress.rcvtimeo = 100
    settings = config.gateway
    if settings.ingress_buffer_bytes is not None:  # as the gateway's own ingress
        ingress.rcvbuf = settings.ingress_buffer_bytes
    ingress.bind(settings.ingress)
    buffer = settings.egress_buffer_bytes
    proxy = (L7Proxy(context, ingress, table, egress_buffer_bytes=buffer) if mode == "l7"
             else L4Proxy(context, ingress, table, buffer))
    signal.signal(signal.SIGTERM, lambda *_: proxy.stop())
    forward = named_thread(proxy.run, FORWARD_THREAD)  # as the gateway's: its CPU read apart
    forward.start()
    ready.set()
    while forward.is_alive():  # the main thread stays interruptible so SIGTERM is handled
        forward.join(0.1)
    proxy.close()
    ingress.close(linger=0)
    context.term()


@dataclass(frozen=True)
class Tuning:
    """The gateway settings a run varies."""

    io_threads: int | None = None  # gateway.io_threads (None: one per core)
    socket_buffer: int | None = None  # gateway.ingress_ and egress_buffer_bytes (None: autotuned)


def write_config(workdir: Path, ports: list[int], client_public: str, tuning: Tuning,
                 plain_password: str | None = None) -> tuple[Path, str]:
    """A static configuration with one session "bench"; the ingress its producers use: the CURVE
    one, or with ``plain_password`` a plaintext ingress admitting the session with it."""
    port = free_port()
    ingress = f"tcp://127.0.0.1:{port}"
    path = workdir / f"dsn-{port}.yaml"
    # A spool directory (and so a scan journal) per gateway: every run streams scan 1 of session
    # "bench", which a gateway that read an earlier run's journal refuses as closed.
    gateway: dict[str, Any] = {
        "ingress": ingress, "server_secret_key_file": str(workdir / "server.key_secret"),
        "io_threads": tuning.io_threads, "spool_dir": str(workdir / f"spool-{port}")}
    if tuning.socket_buffer is not None:
        gateway["ingress_buffer_bytes"] = gateway["egress_buffer_bytes"] = tuning.socket_buffer
    session: dict[str, Any] = {
        "id": "bench", "client_keys": [client_public], "allowed_networks": ["127.0.0.0/8"],
        "allowed_targets": ["127.0.0.0/8"], "consumers": [f"tcp://127.0.0.1:{p}" for p in ports],
        "limits": {"hwm": 64}}
    if plain_password is not None:
        ingress = gateway["plain_ingress"] = f"tcp://127.0.0.1:{free_port()}"
        session["plain_password_sha256"] = hashlib.sha256(plain_password.encode()).hexdigest()
    path.write_text(yaml.safe_dump({"version": 1, "gateway": gateway, "sessions": [session]}))
    return path, ingress


@dataclass
class Rig:
    """Two consumer processes (ready), the keys, and a configuration naming them per lane (one
    gateway each)."""

    results: Any  # multiprocessing queue: the producer's start time, each consumer's tally
    consumers: list[Any]
    ports: list[int]
    client: KeyPair
    server: KeyPair
    configs: list[Path]
    ingresses: list[str]


def start_rig(mpc: Any, workdir: Path, tuning: Tuning = Tuning(), lanes: int = 1) -> Rig:
    results, ready = mpc.Queue(), [mpc.Event(), mpc.Event()]
    ports = [free_port(), free_port()]
    consumers = [mpc.Process(target=consumer, args=(p, r, results))
                 for p, r in zip(ports, ready, strict=True)]
    for process in consumers:
        process.start()
    for event in ready:
        event.wait(30)
    client = load_keypair(workdir / "client.key_secret")
    server = load_keypair(workdir / "server.key_secret")
    written = [write_config(workdir, ports, client.public.decode(), tuning) for _ in range(lanes)]
    return Rig(results, consumers, ports, client, server, [c for c, _ in written],
               [i for _, i in written])


def start_gateway(config: Path, *options: str) -> subprocess.Popen[str]:
    """``dsn gateway run --config`` with ``options``, once it has bound and connected."""
    gateway = subprocess.Popen([str(Path(sys.executable).parent / "dsn"), "gateway", "run",
                                "--config", str(config), *options],
                               stderr=subprocess.PIPE, text=True)
    assert gateway.stderr is not None
    gateway.stderr.readline()  # the "start" log line: bound and connected
    threading.Thread(target=gateway.stderr.read, daemon=True).start()
    return gateway


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` so far, all its threads (libzmq's I/O threads too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class GatewayCpu:
    """CPU seconds of the gateway's libzmq I/O threads (TCP reads and writes, CURVE) and of its
    forwarding loop (one thread, serial), read as its metrics read them."""

    io: float
    loop: float

    @classmethod
    def now(cls, pid: int) -> GatewayCpu:
        seconds = gateway_thread_cpu(pid)
        return cls(seconds["io"], seconds["forwarding"])


@dataclass(frozen=True)
class Figures:
    gbps: float
    rate: float
    cpu: GatewayCpu | None = None  # per message, µs

    @property
    def cpu_us(self) -> float | None:
        return None if self.cpu is None else self.cpu.io + self.cpu.loop


def start_gateways(mpc: Any, case: str, configs: list[Path]) -> list[Any]:
    """One gateway per configuration (lane): ``dsn gateway run`` for CURVE, else the bench's
    plaintext process; each once it has bound and connected."""
    mode, curve = case.split("+")
    if curve == "curve":
        return [start_gateway(config, "--mode", mode) for config in configs]
    gateways = []
    for config in configs:
        started = mpc.Event()
        gateway = mpc.Process(target=plaintext_gateway, args=(str(config), mode, started))
        gateway.start()
        started.wait(30)
        gateways.append(gateway)
    return gateways


def stop_gateway(gateway: Any) -> None:
    if isinstance(gateway, subprocess.Popen):
        gateway.terminate()
        gateway.wait(20)
        return
    gateway.terminate()
    gateway.join(20)
    if gateway.is_alive():
        gateway.kill()


def gateways_cpu(gateways: list[Any]) -> GatewayCpu:
    """CPU seconds so far of all the gateways' I/O threads and forwarding loops, summed."""
    each = [GatewayCpu.now(gateway.pid) for gateway in gateways]
    return GatewayCpu(sum(c.io for c in each), sum(c.loop for c in each))


def run_case(case: str, messages: int, workdir: Path, producers: int = 1,
             tuning: Tuning = Tuning(), connections: int = 1, lanes: int = 1) -> Figures:
    """One run; with ``lanes`` > 1, that many gateways each carry a lane of the scan, producer
    process p streaming lane p mod lanes."""
    mpc = mp.get_context("spawn")
    rig = start_rig(mpc, workdir, tuning, lanes)
    results, consumers = rig.results, rig.consumers
    direct = [f"tcp://127.0.0.1:{p}" for p in rig.ports]
    keys = (rig.client.public, rig.client.secret, rig.server.public)
    gateways = [] if case == "direct" else start_gateways(mpc, case, rig.configs)
    cpu_before = gateways_cpu(gateways) if gateways else None
    senders = []
    for index in range(producers):
        lane = index % lanes
        endpoints = direct if case == "direct" else [rig.ingresses[lane]]
        senders.append(mpc.Process(target=producer, args=(
            endpoints, messages, keys if case.endswith("curve") else None, results, index,
            producers, connections, None if lanes == 1 else (lane, lanes),
            len(range(lane, producers, lanes)))))
    for sender in senders:
        sender.start()
    collected = [results.get(timeout=300) for _ in range(producers + 2)]
    # Per message forwarded: the gateways' whole cost, decryption and routing.
    cpu = None
    if cpu_before is not None:
        after = gateways_cpu(gateways)
        cpu = GatewayCpu((after.io - cpu_before.io) / messages * 1e6,
                         (after.loop - cpu_before.loop) / messages * 1e6)
    start = min(r for r in collected if isinstance(r, float))
    received = [r for r in collected if isinstance(r, tuple)]
    for process in [*senders, *consumers]:
        process.join(30)
    for gateway in gateways:
        stop_gateway(gateway)
    count = sum(r[0] for r in received)
    volume = sum(r[1] for r in received)
    if count != messages:
        print(f"  {case}: received {count} of {messages} messages", file=sys.stderr)
    seconds = max(r[2] for r in received) - start
    return Figures(volume / seconds / 1e9, count / seconds, cpu)


def best_of(repeat: int, case: str, messages: int, workdir: Path, producers: int,
            tuning: Tuning, connections: int = 1, lanes: int = 1) -> Figures:
    runs = [run_case(case, messages, workdir, producers, tuning, connections, lanes)
            for _ in range(repeat)]
    return max(runs, key=lambda figures: figures.gbps)


def print_cases(figures: dict[str, Figures]) -> None:
    print(f"{'case':<12}{'GB/s':>8}{'msg/s':>10}{'vs direct':>11}{'vs L4':>8}"
          f"{'gateway CPU µs/msg':>20}{'I/O threads':>13}{'loop':>7}")
    for case, figure in figures.items():
        l4 = figures.get("l4+curve" if case.endswith("curve") else "l4+plain")
        direct = figures.get("direct")
        vs_l4 = f"{figure.gbps / l4.gbps:.2f}x" if l4 and case != "direct" else "-"
        vs_direct = f"{figure.gbps / direct.gbps:.2f}x" if direct else "-"
        print(f"{case:<12}{figure.gbps:>8.2f}{figure.rate:>10,.0f}{vs_direct:>11}{vs_l4:>8}"
              + cpu_columns(figure))


def cpu_columns(figure: Figures) -> str:
    if figure.cpu is None:
        return f"{'-':>20}{'-':>13}{'-':>7}"
    return f"{figure.cpu_us:>20.1f}{figure.cpu.io:>13.1f}{figure.cpu.loop:>7.1f}"


Scaling = tuple[str, int, int | None, int]  # case, producers, I/O threads, lanes


def print_scaling(figures: dict[Scaling, Figures]) -> None:
    """One row per (case, producers, I/O threads, lanes), and what the serial part allows."""
    print(f"{'case':<12}{'producers':>10}{'I/O thr':>8}{'lanes':>6}{'GB/s':>7}{'msg/s':>9}"
          f"{'gateway CPU µs/msg':>20}{'I/O threads':>13}{'loop':>7}{'loop-bound msg/s':>18}")
    for (case, producers, io_threads, lanes), figure in figures.items():
        ceiling = "-" if figure.cpu is None else f"{lanes * 1e6 / figure.cpu.loop:,.0f}"
        threads = "default" if io_threads is None else str(io_threads)
        print(f"{case:<12}{producers:>10}{threads:>8}{lanes:>6}{figure.gbps:>7.2f}"
              f"{figure.rate:>9,.0f}{cpu_columns(figure)}{ceiling:>18}")
    print("loop-bound msg/s: a gateway process cannot forward more than its forwarding loop's\n"
          "CPU per message allows (the loop is one thread; I/O threads serve connections in\n"
          "parallel, each connection on one of them); a scan split over N lanes has N loops,\n"
          "one per gateway process, and N times the bound. CPU columns: all lanes' gateways.")


def int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=8000)
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the best is kept")
    parser.add_argument("--producers", type=int_list, default=[1],
                        help="producer processes, each its own connection (a camera's sector "
                             "streams); the gateway decrypts each on one of its I/O threads. "
                             "A comma-separated list gives a scaling table")
    parser.add_argument("--io-threads", type=int_list, default=None,
                        help="the gateway's gateway.io_threads, or a comma-separated list "
                             "[default: its own, one per core]")
    parser.add_argument("--socket-buffer", type=int, default=None, metavar="BYTES",
                        help="the gateway's gateway.ingress_buffer_bytes and egress_buffer_bytes "
                             "[default: unset, the kernel's autotuning]")
    parser.add_argument("--connections", type=int, default=1,
                        help="sockets per producer process, each its own connection, sent to in "
                             "turn (HAProxy's peer bench with two consumers connects its producer "
                             "twice) [default: %(default)s]")
    parser.add_argument("--lanes", type=int_list, default=[1],
                        help="gateways the scan is split over (lanes, each its own gateway "
                             "process; producer p streams lane p mod lanes, so give at least as "
                             "many --producers), or a comma-separated list for a scaling table; "
                             "L7 cases only [default: 1]")
    parser.add_argument("--cases", default="direct,l4+plain,l7+plain,l4+curve,l7+curve",
                        help="comma-separated subset; ratios need direct and the matching l4")
    args = parser.parse_args()
    cases = args.cases.split(",")
    io_options: list[int | None] = args.io_threads or [None]
    scaling = len(args.producers) > 1 or len(io_options) > 1 or args.lanes != [1]
    if args.lanes != [1] and any(not case.startswith("l7") for case in cases):
        parser.error("--lanes splits a scan over L7 gateways: give --cases l7+plain,l7+curve")
    if max(args.lanes) > min(args.producers):
        parser.error("each lane needs a producer: --lanes above --producers")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        create_keypair(workdir, "server")
        create_keypair(workdir, "client")
        figures = {(case, producers, io_threads, lanes): best_of(
                       args.repeat, case, args.messages, workdir, producers,
                       Tuning(io_threads, args.socket_buffer), args.connections, lanes)
                   for case in cases for producers in args.producers
                   for io_threads in io_options for lanes in args.lanes}
    print(f"{args.messages} messages of {SECTOR_BYTES:,} bytes, "
          f"{','.join(map(str, args.producers))} producer(s) x {args.connections} "
          f"connection(s), 2 consumers, "
          f"tcp loopback, {os.cpu_count()} CPUs, gateway socket buffers "
          f"{args.socket_buffer or 'autotuned'}")
    if scaling:
        print_scaling(figures)
    else:
        print_cases({case: figure for (case, _, _, _), figure in figures.items()})
    print("curve: CURVE encryption + ZAP on the gateway ingress (the real `dsn gateway run`);\n"
          "plain: the same proxy loops with a bench-only NULL ingress (the proxy's own cost).\n"
          "CPU: per message, the gateway's libzmq I/O threads and its forwarding loop (the\n"
          "thread dsn-forward), from /proc as its dsn_gateway_thread_cpu_seconds metric.")


if __name__ == "__main__":
    main()
