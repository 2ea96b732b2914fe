"""Gateway throughput under a junk-connection flood, against the same gateway without one.

One real ``dsn gateway run`` (L7, CURVE + ZAP) serves one producer process streaming N data
messages of one 4D Camera sector (165,888 bytes) to two consumer processes, as in
bench/gateway_throughput.py (whose producer and consumers this reuses). The runs alternate: without
a flood, then with a flood process opening R junk connections per second at the ingress for the
whole stream (raw TCP garbage, half ZMTP greetings, NULL clients, CURVE clients with unregistered
keys, in turn). Each run uses a fresh gateway; the best of ``--repeat`` runs of each kind is kept.
Throughput is payload bytes / (last message received - first message sent). The gateway's own
refusal counters are read from its metrics endpoint after each flood run. No assertions.

    .venv/bin/python bench/gateway_flood.py [--messages 8000] [--rate 200] [--repeat 2]

On a small machine the flood process competes with the gateway for CPU; the printed CPU count says
how much room there was.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import re
import socket
import sys
import tempfile
import time
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from gateway_throughput import SECTOR_BYTES, producer, start_gateway, start_rig

from common.keys import create_keypair
from common.ports import free_port

DSN = str(Path(sys.executable).parent / "dsn")
HALF_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f\x03"
GARBAGE = b"GET / HTTP/1.1\r\nHost: dsn\r\n\r\n" + bytes(range(256))  # what a port scanner sends
JUNK_KINDS = ("garbage", "half_greeting", "NULL", "CURVE")
OPEN_JUNK_SOCKETS = 64  # ZeroMQ junk clients kept open at once; the oldest is closed first


def _junk_once(kind: str, context: zmq.Context, address: tuple[str, int], endpoint: str,
               server_public: bytes, open_sockets: deque[zmq.Socket]) -> None:
    if kind in ("garbage", "half_greeting"):
        try:
            with socket.create_connection(address, timeout=2) as conn:
                conn.sendall(GARBAGE if kind == "garbage" else HALF_GREETING)
        except OSError:
            pass  # the gateway may close first; that is the point
        return
    client = context.socket(zmq.PUSH)
    client.linger = 0
    client.reconnect_ivl = -1
    if kind == "CURVE":
        public, secret = zmq.curve_keypair()
        client.curve_publickey, client.curve_secretkey = public, secret
        client.curve_serverkey = server_public
    client.connect(endpoint)
    open_sockets.append(client)
    if len(open_sockets) > OPEN_JUNK_SOCKETS:
        open_sockets.popleft().close()


def flood(endpoint: str, server_public: bytes, rate: float, stop: Any, opened: Any) -> None:
    """Open ``rate`` junk connections per second at ``endpoint`` until ``stop`` is set."""
    context = zmq.Context()
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    open_sockets: deque[zmq.Socket] = deque()
    kinds = itertools.cycle(JUNK_KINDS)
    count, next_at = 0, time.perf_counter()
    while not stop.is_set():
        _junk_once(next(kinds), context, (host, int(port)), endpoint, server_public, open_sockets)
        count += 1
        next_at += 1 / rate
        time.sleep(max(0.0, next_at - time.perf_counter()))
    for client in open_sockets:
        client.close()
    context.term()
    opened.put(count)


@dataclass
class Run:
    gbps: float
    rate: float
    received: int
    junk_opened: int = 0
    junk_refused: int = 0
    accepted: int = 0


def _sum(text: str, pattern: str) -> int:
    return int(sum(float(v) for v in re.findall(pattern + r" ([0-9.e+]+)$", text, re.MULTILINE)))


def _connections(metrics: str) -> tuple[int, int]:
    """Connections refused (ZAP or handshake) and accepted, from the gateway's metrics."""
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as response:
        text = response.read().decode()
    return (_sum(text, r'^dsn_gateway_auth_decisions_total\{decision="deny",[^}]*\}'),
            _sum(text, r'^dsn_gateway_connections_total\{event="accepted"\}'))


def run(messages: int, workdir: Path, flood_rate: float) -> Run:
    """One stream through a fresh gateway, with a junk flood at ``flood_rate``/s (0: none)."""
    mpc = mp.get_context("spawn")
    rig = start_rig(mpc, workdir)
    results, consumers, client, server, ingress = (rig.results, rig.consumers, rig.client,
                                                   rig.server, rig.ingresses[0])
    metrics = f"127.0.0.1:{free_port()}"
    gateway = start_gateway(rig.configs[0], "--mode", "l7", "--metrics", metrics)
    stop, opened = mpc.Event(), mpc.Queue()
    flooder = None
    if flood_rate:
        flooder = mpc.Process(target=flood, args=(ingress, server.public, flood_rate, stop, opened))
        flooder.start()
        time.sleep(0.5)  # the flood is under way before the first data message
    keys = (client.public, client.secret, server.public)
    sender = mpc.Process(target=producer, args=([ingress], messages, keys, results))
    sender.start()
    collected = [results.get(timeout=300) for _ in range(3)]
    stop.set()
    junk_opened = opened.get(timeout=30) if flooder is not None else 0
    junk_refused, accepted = _connections(metrics)
    for process in [sender, *consumers, *([flooder] if flooder else [])]:
        process.join(30)
    gateway.terminate()
    gateway.wait(20)
    start = next(r for r in collected if isinstance(r, float))
    received = [r for r in collected if isinstance(r, tuple)]
    count, volume = sum(r[0] for r in received), sum(r[1] for r in received)
    seconds = max(r[2] for r in received) - start
    return Run(volume / seconds / 1e9, count / seconds, count, junk_opened, junk_refused,
               accepted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=8000)
    parser.add_argument("--rate", type=float, default=200, help="junk connections per second")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each kind; best kept")
    args = parser.parse_args()
    quiet: list[Run] = []
    flooded: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="dsn-bench-flood-") as tmp:
        workdir = Path(tmp)
        create_keypair(workdir, "server")
        create_keypair(workdir, "client")
        for _ in range(args.repeat):  # alternate, so drift in the machine affects both alike
            quiet.append(run(args.messages, workdir, 0))
            flooded.append(run(args.messages, workdir, args.rate))
    best_quiet = max(quiet, key=lambda r: r.gbps)
    best_flood = max(flooded, key=lambda r: r.gbps)
    print(f"{args.messages} messages of {SECTOR_BYTES:,} bytes, 1 producer, 2 consumers, L7 + "
          f"CURVE gateway, tcp loopback, {os.cpu_count()} CPUs, best of {args.repeat}")
    print(f"{'case':<22}{'GB/s':>7}{'msg/s':>9}{'received':>10}{'junk opened':>13}"
          f"{'refused':>9}{'accepted':>10}")
    for name, r in (("no flood", best_quiet), (f"flood {args.rate:g}/s", best_flood)):
        print(f"{name:<22}{r.gbps:>7.2f}{r.rate:>9,.0f}{r.received:>10}{r.junk_opened:>13}"
              f"{r.junk_refused:>9}{r.accepted:>10}")
    print(f"flood / no flood: {best_flood.gbps / best_quiet.gbps:.2f}x")
    print("refused: dsn_gateway_auth_decisions_total{decision=\"deny\"}; accepted: "
          "dsn_gateway_connections_total{event=\"accepted\"}\n(every TCP connection, raw garbage "
          "included, which libzmq closes without a handshake event).")


if __name__ == "__main__":
    main()
