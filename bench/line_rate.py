"""Line rate: the gateway against the proxies a facility would pick instead, in one run.

Runs the gateway's cases (``bench/gateway_throughput.py``: direct, L4 and L7, plaintext and CURVE)
and then its peers through the shared harness where it lives (``bench/peers.py``): HAProxy in
``mode tcp`` as SciStream configures it, an stunnel TLS 1.3 pair, ``zmq.proxy`` with and without
CURVE in front, and PUSH -> PULL with no hop. Prints every path with its GB/s and the proxy's CPU
per message, the L7 gateway's ratio to each, and the line-rate goals as ratios measured in this
run, for the gateway as configured by default, with fixed 4 MiB socket buffers (as for a hop
within a site), with its producer connected twice (as HAProxy's producer is, with two
consumers), and with the scan split over two gateway processes (lanes, a producer process each;
against L4 with two producer processes). A peer that cannot run (harness absent, program not
installed) is listed with the reason.

    .venv/bin/python bench/line_rate.py [--messages 8000] [--repeat 3] [--peers DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway_throughput import SECTOR_BYTES, Figures, Tuning, best_of  # noqa: E402
from peers import DEFAULT_DIR, Peer, Result, run_peer  # noqa: E402

from common.keys import create_keypair  # noqa: E402

Against = Literal["plain", "curve"]
# Fixed kernel socket buffers, as for a hop within a site (gateway.*_buffer_bytes).
SITE_BUFFER = 4 << 20


@dataclass(frozen=True)
class Case:
    case: str  # as bench/gateway_throughput.py names it
    label: str
    against: Against | None  # the L7 case it is compared with (None: itself an L7 case)
    socket_buffer: int | None = None
    connections: int = 1  # the producer's connections to the gateway
    producers: int = 1  # producer processes
    lanes: int = 1  # gateway processes the scan is split over


GATEWAY_CASES = [
    Case("direct", "PUSH -> 2 x PULL, no hop (gateway bench)", "plain"),
    Case("l4+plain", "gateway L4 plain (zmq.proxy inside)", "plain"),
    Case("l7+plain", "gateway L7 plain (every check)", None),
    Case("l7+plain", "gateway L7 plain, 4 MiB socket buffers", None, SITE_BUFFER),
    Case("l7+plain", "gateway L7 plain, 2 producer connections", None, connections=2),
    Case("l4+curve", "gateway L4 CURVE", "curve"),
    Case("l7+curve", "gateway L7 CURVE (every check)", None),
    Case("l7+curve", "gateway L7 CURVE, 4 MiB socket buffers", None, SITE_BUFFER),
    Case("l4+curve", "gateway L4 CURVE, 2 producer connections", "curve", connections=2),
    Case("l7+curve", "gateway L7 CURVE, 2 producer connections", None, connections=2),
    Case("l4+plain", "gateway L4 plain, 2 producers", "plain", producers=2),
    Case("l7+plain", "gateway L7 plain, 2 lanes (2 processes)", None, producers=2, lanes=2),
    Case("l4+curve", "gateway L4 CURVE, 2 producers", "curve", producers=2),
    Case("l7+curve", "gateway L7 CURVE, 2 lanes (2 processes)", None, producers=2, lanes=2),
]
L7 = {"plain": "gateway L7 plain (every check)", "curve": "gateway L7 CURVE (every check)"}
L7_TUNED = {"plain": "gateway L7 plain, 4 MiB socket buffers",
            "curve": "gateway L7 CURVE, 4 MiB socket buffers"}
# The producer connected twice, as the HAProxy peer's producer is with two consumers.
L7_TWO = {"plain": "gateway L7 plain, 2 producer connections",
          "curve": "gateway L7 CURVE, 2 producer connections"}
# The scan split over two gateway processes (lanes), a producer process each.
L7_LANES = {"plain": "gateway L7 plain, 2 lanes (2 processes)",
            "curve": "gateway L7 CURVE, 2 lanes (2 processes)"}
# Each L7 variant's goals, and the baseline each of its comparisons takes instead (like for like).
VARIANTS = [(L7, {}), (L7_TUNED, {}),
            (L7_TWO, {"gateway L4 CURVE": "gateway L4 CURVE, 2 producer connections"}),
            (L7_LANES, {"gateway L4 CURVE": "gateway L4 CURVE, 2 producers"})]
PEERS = {
    "haproxy": Peer("bench_haproxy.py", ("--bufsize", "100000", "--consumers", "1,2"),
                    ("haproxy",)),
    "stunnel": Peer("bench_stunnel.py", ("--variant", "tls13"), ("stunnel4", "stunnel")),
    "zmq.proxy": Peer("bench_zmq_l4_proxy.py"),
    "zmq curve": Peer("bench_zmq_curve.py", ("--mode", "raw,l4front")),
    "no hop": Peer("bench_zmq_raw.py", ("--transport", "tcp", "--copy", "0", "--hwm", "0")),
}


@dataclass(frozen=True)
class Row:
    label: str
    gbps: float
    cpu: str  # the proxy's CPU µs per message, as printed
    against: Against | None  # which L7 case it is compared with (None: an L7 case itself)


def gateway_rows(figures: dict[Case, Figures]) -> list[Row]:
    rows = []
    for case, figure in figures.items():
        cpu = "-" if figure.cpu is None else (f"{figure.cpu_us:.1f} ({figure.cpu.io:.1f} I/O "
                                              f"+ {figure.cpu.loop:.1f} loop)")
        rows.append(Row(case.label, figure.gbps, cpu, case.against))
    return rows


def peer_rows(name: str, results: list[Result]) -> list[Row]:
    """The rows of one peer's results."""
    rows = []
    for result in results:
        gbps, cpu = float(result["GBps"]), result.get("proxy_cpu_us", "-")
        cpu = cpu if cpu == "-" else f"{float(cpu):.1f}"
        if name == "haproxy":
            count = int(result["consumers"])
            rows.append(Row(f"HAProxy, SciStream's config, {count} consumer"
                            f"{'s' if count > 1 else ''}", gbps, cpu, "plain"))
        elif name == "stunnel":
            rows.append(Row("stunnel TLS 1.3 pair", gbps, cpu, "curve"))
        elif name == "zmq.proxy":
            rows.append(Row("zmq.proxy, 2 consumers", gbps, cpu, "plain"))
        elif name == "zmq curve":
            label = ("CURVE PUSH -> PULL, no hop" if result["mode"] == "raw"
                     else "zmq.proxy with CURVE in front")
            rows.append(Row(label, gbps, cpu, "curve"))
        else:
            rows.append(Row("PUSH -> PULL, no hop (harness)", gbps, cpu, "plain"))
    return rows


def print_table(rows: list[Row], l7: dict[str, float]) -> None:
    print(f"{'path':<46}{'GB/s':>7}  {'proxy CPU µs/msg':<34}{'L7 vs it':>9}")
    for row in rows:
        ratio = "-" if row.against is None or row.against not in l7 else \
            f"{l7[row.against] / row.gbps:.2f}x"
        print(f"{row.label:<46}{row.gbps:>7.2f}  {row.cpu:<34}{ratio:>9}")


GOALS = [("L7 plain >= 1.0x HAProxy (SciStream's config, 2 consumers)", "plain",
          "HAProxy, SciStream's config, 2 consumers", 1.0),
         ("L7 CURVE >= 1.5x stunnel TLS 1.3", "curve", "stunnel TLS 1.3 pair", 1.5),
         ("L7 CURVE >= 1.0x L4 CURVE", "curve", "gateway L4 CURVE", 1.0)]


def print_goals(rows: dict[str, Row]) -> None:
    print("goals, as ratios in this run (L7 as by default; with 4 MiB socket buffers; with two "
          "producer connections; split over two lanes):")
    for text, against, baseline, target in GOALS:
        if baseline not in rows:
            print(f"  {text}: not measured")
            continue
        values = [rows[labels[against]].gbps / rows[like.get(baseline, baseline)].gbps
                  for labels, like in VARIANTS]
        print(f"  {text}: " + "; ".join(
            f"{value:.3f}x {'met' if value >= target else 'not met'}" for value in values))
    raw, stunnel = rows.get("CURVE PUSH -> PULL, no hop"), rows.get("stunnel TLS 1.3 pair")
    if raw is not None and stunnel is not None:
        print("  (the ceiling) CURVE with no hop vs stunnel TLS 1.3: "
              f"{raw.gbps / stunnel.gbps:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=8000,
                        help="sectors per gateway case [default: %(default)s]")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per gateway case, the best kept [default: %(default)s; the "
                             "peers run 3 times each]")
    parser.add_argument("--peers", type=Path, default=DEFAULT_DIR,
                        help="the shared peer harness [default: %(default)s]")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        create_keypair(workdir, "server")
        create_keypair(workdir, "client")
        figures = {case: best_of(args.repeat, case.case, args.messages, workdir, case.producers,
                                 Tuning(socket_buffer=case.socket_buffer), case.connections,
                                 case.lanes)
                   for case in GATEWAY_CASES}
    rows = gateway_rows(figures)
    skipped = []
    for name, peer in PEERS.items():
        results = run_peer(args.peers, peer)
        if isinstance(results, str):
            skipped.append(f"{name}: {results}")
        else:
            rows.extend(peer_rows(name, results))
    by_label = {row.label: row for row in rows}
    l7 = {against: by_label[label].gbps for against, label in L7.items()}
    print(f"{args.messages} messages of {SECTOR_BYTES:,} bytes per gateway case, best of "
          f"{args.repeat}; peers best of 3 (shared harness, {args.peers})")
    print_table(sorted(rows, key=lambda row: (row.against == "curve" or "CURVE" in row.label,
                                              -row.gbps)), l7)
    for reason in skipped:
        print(f"skipped {reason}")
    print_goals(by_label)


if __name__ == "__main__":
    main()
