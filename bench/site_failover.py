"""A site's fail-over times: a gateway changing control-plane replica, a session change crossing
replicas, and a lost gateway's session moved and its scan streamed again.

Builds the site of tests/test_site_failover.py with real processes on this host: a throwaway
PostgreSQL server (``tests/postgres_server.py``), two ``dsn controlplane serve`` replicas A and B on
it (``dsn admin init``, ``init --join``; ``gateway.fallback: false``), and four ``dsn gateway run``
processes with their default heartbeats (registration every 2 s, the state service's every 1 s,
three missed ones to change replica), each following both replicas' state services:

    gw-a            follows A first, then B      project "change" is placed on it only
    gw-b            follows B first, then A      project "notify" is placed on it only
    gw-l1, gw-l2    follow A first, then B       project "lost" is placed on them only

(the policy's ``gateways`` section pins each project to its gateways, so placement is known). A
gateway "serves" a session once the session is in the table its ZAP handler admits producers
from, which its metrics page shows as a ``dsn_gateway_consumers{session="ID"}`` series; the bench
polls that page every 10 ms (the control plane's REST API every 50 ms). Times are the bench's
monotonic clock, except registrations: the registry's ``last_seen`` (wall clock, same host).

1. **Gateway changes replica** (``--rounds``): SIGKILL the replica gw-a follows, at once open a
   session of "change" through the other (the survivor), and time kill -> gw-a serves it (it can
   only learn of it from the survivor's snapshot once it follows the survivor). Also the
   registration gap the survivor's registry shows for gw-a: the first ``last_seen`` after the kill
   minus the last one before it. The killed replica is restarted on the same ports between
   rounds; gw-a stays with the one it moved to, so the rounds alternate between A and B.
2. **Session change across replicas** (``--notify-rounds``): a session of "notify" opened through
   A (LISTEN/NOTIFY to B, which publishes it to gw-b) against one opened through B (published
   directly): time from the open's 201 answer to gw-b serving it. Without the notice B would find
   it at its next reconcile (``reconcile_s``, 1 s).
3. **Gateway lost** (``--rounds`` per ``gateway.timeout_s``: the default 10 s, and
   ``--short-timeout`` on a second site): a consumer rank (a PULL socket here, not reading yet)
   registered on a session of "lost", and ``dsn producer stream --controlplane A,B --session ID``
   streaming a ``--scan-shape`` scan into it, held mid-scan by the consumer; then SIGKILL its
   gateway and let the consumer read. Timed from the kill: the control plane moved the session
   (``GET /api/v1/sessions/ID`` names another gateway), the producer gave its blocked send up
   (once the session moved, or at its ``--timeout``, ``--send-timeout`` here), it printed the
   move, and it printed the new gateway's
   receipt for the whole scan (and exited 0). The killed gateway is restarted between rounds.

Leader takeover is bench/controlplane_replicas.py's. No assertions: a failed round prints why.

    .venv/bin/python bench/site_failover.py [--rounds 3] [--notify-rounds 20] \
        [--short-timeout 3] [--send-timeout 30] [--scan-shape 16x16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
import zmq

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH.parent / "tests"))

from controlplane_tokens import DSN, ROOT, _wait_ready, write_bench_policy
from postgres_server import running_server

from common.keys import create_keypair, load_keypair
from common.ports import free_port
from common.privatefs import create_private_file
from controlplane.admin.bootstrap import initialize, join

POLL_S = 0.01  # a gateway's metrics page
REST_POLL_S = 0.05  # the control plane: each request is also counted in the database
SCOPE = ("token:exchange projects:read sessions:read sessions:write consumers:register "
         "templates:read templates:render scans:read")
UNBOUNDED = 1_000_000_000
# Which gateways each project's sessions may be placed on, and the replicas each gateway follows,
# in its order.
PLACEMENT = {"change": ["gw-a"], "notify": ["gw-b"], "lost": ["gw-l1", "gw-l2"]}
FOLLOWS = {"gw-a": "ab", "gw-b": "ba", "gw-l1": "ab", "gw-l2": "ab"}


def _request(url: str, method: str = "GET", token: str | None = None,
             body: dict[str, Any] | None = None, timeout_s: float = 10) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _until(condition: Callable[[], bool], timeout_s: float, what: str,
           every: float = POLL_S) -> float:
    """Poll ``condition`` ``every`` seconds; the monotonic time it first held. TimeoutError
    naming ``what`` if it does not within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s")
        time.sleep(every)
    return time.monotonic()


@dataclass
class Replica:
    """A ``dsn controlplane serve`` on fixed ports, so that it restarts where gateways look."""

    name: str
    state: Path
    port: int = field(default_factory=free_port)
    snapshots: str = field(default_factory=lambda: f"tcp://127.0.0.1:{free_port()}")
    updates: str = field(default_factory=lambda: f"tcp://127.0.0.1:{free_port()}")
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, options: list[str], env: dict[str, str]) -> None:
        log = self.state.parent / f"{self.name}.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [DSN, "controlplane", "serve", "--state-dir", str(self.state),
                 "--port", str(self.port), "--state-snapshots", self.snapshots,
                 "--state-updates", self.updates, *options],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        _wait_ready(self.url, self.process, log, 30)

    def following(self) -> list[str]:
        """A gateway's options to follow this replica's state service."""
        return ["--controlplane-state", f"{self.snapshots},{self.updates}",
                "--state-key", str(self.state / "keys" / "state.key")]

    def kill(self) -> None:
        _kill(self.process)

    def stop(self) -> None:
        _stop(self.process)


def _kill(process: subprocess.Popen[bytes] | None) -> None:
    assert process is not None
    process.send_signal(signal.SIGKILL)
    process.wait()


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)


@dataclass
class Gateway:
    """A ``dsn gateway run`` in control-plane mode on fixed ports, restartable after a kill."""

    name: str
    root: Path
    replicas: list[Replica]
    ingress: str = field(default_factory=lambda: f"tcp://127.0.0.1:{free_port()}")
    receipts: str = field(default_factory=lambda: f"tcp://127.0.0.1:{free_port()}")
    metrics: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        following = [option for replica in self.replicas for option in replica.following()]
        with (self.root / f"{self.name}.log").open("ab") as out:
            self.process = subprocess.Popen(
                [DSN, "gateway", "run", *following,
                 "--key", str(self.root / self.name / "server.key_secret"),
                 "--ingress", self.ingress, "--receipts", self.receipts,
                 "--spool-dir", str(self.root / "spool" / self.name), "--metrics", self.metrics,
                 "--sync-timeout", "30"],
                stdout=out, stderr=subprocess.STDOUT)

    def page(self) -> str:
        try:
            with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=2) as response:
                return response.read().decode()  # type: ignore[no-any-return]
        except OSError:
            return ""  # not up (yet, or any more)

    def serves(self, session: str) -> bool:
        return f'dsn_gateway_consumers{{session="{session}"}}' in self.page()

    def shows(self, pattern: str) -> bool:
        return re.search(pattern, self.page()) is not None

    def kill(self) -> None:
        _kill(self.process)

    def stop(self) -> None:
        _stop(self.process)


@dataclass
class Site:
    a: Replica
    b: Replica
    gateways: dict[str, Gateway]
    admin_token: str
    tokens: dict[str, str]  # project -> project token
    root: Path
    options: list[str]
    env: dict[str, str]

    def admin(self, replica: Replica, method: str, path: str,
              body: dict[str, Any] | None = None) -> Any:
        status, answer = _request(replica.url + path, method, self.admin_token, body)
        if status not in (200, 201):
            raise RuntimeError(f"{method} {path} at {replica.name}: {status} {answer}")
        return answer

    def open_session(self, replica: Replica, project: str, client_key: str) -> dict[str, Any]:
        status, opened = _request(f"{replica.url}/api/v1/sessions", "POST", self.tokens[project],
                                  {"project": project, "template": "4dstem",
                                   "params": {"hwm": 8}, "client_key": client_key})
        if status != 201:
            raise RuntimeError(f"session open at {replica.name}: {status} {opened}")
        return dict(opened)

    def end_session(self, session: str) -> None:
        for replica in (self.a, self.b):  # whichever is up
            try:
                status, _ = _request(f"{replica.url}/api/v1/sessions/{session}", "DELETE",
                                     self.admin_token)
            except OSError:
                continue
            if status == 200:
                return

    def registry(self, replica: Replica) -> dict[str, dict[str, Any]]:
        listed = self.admin(replica, "GET", "/api/v1/gateways")["registered"]
        return {g["name"]: g for g in listed}

    def all_live(self) -> bool:
        try:
            registry = self.registry(self.a)
        except (RuntimeError, OSError):
            return False
        return all(registry.get(name, {}).get("live") for name in self.gateways)


def _policy(root: Path) -> Path:
    """The shipped policy, rate limits out of reach, each project pinned to its gateways."""
    directory = write_bench_policy(ROOT / "policies", root / "policies")
    path = directory / "default.yaml"
    document = yaml.safe_load(path.read_text())
    document["gateways"] = {"defaults": [], "projects": PLACEMENT}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return directory


def _allow_gateways(root: Path, replicas: list[Replica]) -> None:
    for name in FOLLOWS:
        public, _ = create_keypair(root / name, "server")
        for replica in replicas:  # every replica admits every gateway, under one name
            shutil.copy(public, replica.state / "gateways" / f"{name}.key")


def _projects(site: Site) -> None:
    for project in PLACEMENT:
        site.admin(site.a, "POST", "/api/v1/projects", {
            "name": project, "quotas": {"tokens": UNBOUNDED, "sessions": UNBOUNDED}})
        issued = site.admin(site.a, "POST", f"/api/v1/projects/{project}/tokens",
                            {"subject": "bench", "scope": SCOPE, "ttl": 3600})
        site.tokens[project] = issued["token"]


@contextmanager
def running_site(database_url: str, root: Path, timeout_s: float) -> Iterator[Site]:
    """Two replicas on ``database_url`` with ``gateway.timeout_s`` = ``timeout_s``, the four
    gateways registered and live, the three projects made."""
    root.mkdir()
    env = {**os.environ, "DSN_DATABASE_URL": database_url}
    policy = _policy(root)
    a, b = Replica("a", root / "a"), Replica("b", root / "b")
    admin_token = asyncio.run(initialize(a.state, policy_path=policy, database_url=database_url))
    asyncio.run(join(b.state, database_url=database_url))
    _allow_gateways(root, [a, b])
    config = root / "controlplane.yaml"
    # lease_s: the bench's consumer rank registers once and never renews its lease.
    config.write_text(f"gateway:\n  timeout_s: {timeout_s:g}\n  fallback: false\nlease_s: 600\n")
    options = ["--policy", str(policy), "--config", str(config)]
    replica_of = {"a": a, "b": b}
    gateways = {name: Gateway(name, root, [replica_of[r] for r in order])
                for name, order in FOLLOWS.items()}
    site = Site(a, b, gateways, admin_token, {}, root, options, env)
    try:
        for replica in (a, b):
            replica.start(options, env)
        for gateway in gateways.values():
            gateway.start()
        _until(site.all_live, 60, "every gateway registered", every=REST_POLL_S)
        _projects(site)
        yield site
    finally:
        for gateway in gateways.values():
            gateway.stop()
        for replica in (a, b):
            replica.stop()


# -- 1. a gateway changes replica ------------------------------------------------------------


@dataclass
class ChangeRound:
    killed: str
    synced_s: float  # kill -> the gateway serves a session opened through the survivor
    gap_s: float  # the survivor's last_seen for the gateway: first after the kill - last before


def _last_seen(site: Site, replica: Replica, gateway: str) -> float:
    return datetime.fromisoformat(site.registry(replica)[gateway]["last_seen"]).timestamp()


def change_round(site: Site, followed: Replica, survivor: Replica) -> ChangeRound:
    gateway = site.gateways["gw-a"]
    before = _last_seen(site, survivor, gateway.name)
    followed.kill()
    killed, killed_wall = time.monotonic(), time.time()
    session = site.open_session(survivor, "change", zmq.curve_keypair()[0].decode())["id"]
    synced = _until(lambda: gateway.serves(session), 60, f"gw-a serving {session}")
    # It registers with the survivor as it moves, so the first registration after the kill is
    # in by the time of the sync, and the next one a heartbeat (2 s) later.
    seen: list[float] = []

    def registered_again() -> bool:
        seen.append(_last_seen(site, survivor, gateway.name))
        return seen[-1] > killed_wall
    _until(registered_again, 60, "gw-a registering with the survivor", every=REST_POLL_S)
    site.end_session(session)
    return ChangeRound(followed.name, synced - killed, seen[-1] - before)


def _registered_twice(site: Site, replica: Replica, gateway: str) -> None:
    """Until two more of ``gateway``'s registrations have arrived: it heartbeats steadily to the
    replica it follows now, so the next round starts from a settled site."""
    for _ in range(2):
        def newer(seen: float = _last_seen(site, replica, gateway)) -> bool:
            return _last_seen(site, replica, gateway) > seen
        _until(newer, 30, f"{gateway} registering", every=REST_POLL_S)


def change_rounds(site: Site, rounds: int) -> list[ChangeRound]:
    results = []
    followed, survivor = site.a, site.b  # gw-a follows A first
    for _ in range(rounds):
        results.append(change_round(site, followed, survivor))
        followed.start(site.options, site.env)
        _registered_twice(site, survivor, "gw-a")
        followed, survivor = survivor, followed  # gw-a stays with the one it moved to
    return results


# -- 2. a session change crossing replicas -----------------------------------------------------


def notify_delay_s(site: Site, via: Replica) -> float:
    """A session of "notify" opened through ``via``: its 201 answer -> gw-b serves it."""
    gateway = site.gateways["gw-b"]
    session = site.open_session(via, "notify", zmq.curve_keypair()[0].decode())["id"]
    answered = time.monotonic()
    served = _until(lambda: gateway.serves(session), 30, f"gw-b serving {session}")
    site.end_session(session)
    return served - answered


# -- 3. a gateway lost -----------------------------------------------------------------------


@dataclass
class LostRound:
    moved_s: float  # kill -> GET session names another gateway
    stalled_s: float | None  # kill -> the producer says the gateway is not answering
    followed_s: float | None  # kill -> the producer says the session moved
    confirmed_s: float | None  # kill -> the producer prints the new gateway's receipt
    confirmed: bool  # the receipt accounts for every message of the scan, the producer exits 0


class Consumer:
    """A consumer rank: a PULL socket the gateways connect to, read (and discarded) once
    ``release``d, until ``close``d."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.socket = context.socket(zmq.PULL)
        self.socket.rcvhwm = 4  # so that the gateway is held mid-scan until released
        self.port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)

    def release(self) -> None:
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            if self.socket.poll(100):
                self.socket.recv_multipart(copy=False)

    def close(self) -> None:
        self._stop.set()
        if self._reader.is_alive():
            self._reader.join()
        self.socket.close(linger=0)


class TimedOutput:
    """A subprocess's output lines, each with the monotonic time it was read."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[tuple[float, str]] = []
        self._process = process
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self.lines.append((time.monotonic(), line.rstrip()))

    def first(self, pattern: str) -> float | None:
        return next((at for at, line in self.lines if re.search(pattern, line)), None)

    def wait(self, timeout_s: float) -> int:
        code = self._process.wait(timeout=timeout_s)
        self._reader.join()
        return code

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _register_consumer(site: Site, session: dict[str, Any], consumer: Consumer) -> None:
    status, worker = _request(f"{site.a.url}/api/v1/token", "POST", site.tokens["lost"],
                              {"kind": "consumer"})
    if status != 200:
        raise RuntimeError(f"consumer token: {status} {worker}")
    status, answer = _request(
        f"{site.a.url}/api/v1/sessions/{session['id']}/consumers", "POST", worker["token"],
        {"endpoint": f"tcp://127.0.0.1:{consumer.port}", "rank": 0, "job_id": "bench",
         "host": "node-1"})
    if status != 201:
        raise RuntimeError(f"consumer registration: {status} {answer}")


@dataclass(frozen=True)
class ProducerFiles:
    """The producer's key pair (registered with each session) and its project token file."""

    public: Path
    secret: Path
    token: Path


def _producer_files(site: Site) -> ProducerFiles:
    public, secret = create_keypair(site.root / "producer", "p")
    token = site.root / "producer" / "lost.token"
    create_private_file(token, site.tokens["lost"].encode())
    return ProducerFiles(public, secret, token)


def _stream(site: Site, session: str, files: ProducerFiles,
            args: argparse.Namespace) -> TimedOutput:
    process = subprocess.Popen(
        [DSN, "producer", "stream", "--controlplane", f"{site.a.url},{site.b.url}",
         "--project-token-file", str(files.token), "--session", session,
         "--client-key", str(files.secret), "--scan-shape", args.scan_shape,
         "--timeout", f"{args.send_timeout:g}", "--follow-wait", "60",
         "--receipt-timeout", "60", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return TimedOutput(process)


def _moved_from(site: Site, session: str, gateway: str) -> bool:
    detail = site.admin(site.a, "GET", f"/api/v1/sessions/{session}")
    return detail["gateway_name"] not in (None, gateway)


def lost_round(site: Site, context: zmq.Context[zmq.Socket[bytes]], files: ProducerFiles,
               args: argparse.Namespace) -> LostRound:
    opened = site.open_session(site.a, "lost", load_keypair(files.public).public.decode())
    session, gateway = opened["id"], site.gateways[opened["gateway_name"]]
    consumer = Consumer(context)
    try:
        _register_consumer(site, opened, consumer)
        _until(lambda: gateway.shows(rf'dsn_gateway_consumers{{session="{session}"}} 1\.0'), 30,
               f"{gateway.name} connected to the consumer")
        output = _stream(site, session, files, args)
        _until(lambda: gateway.shows(
            rf'dsn_gateway_backpressure_waits_total{{session="{session}"}} [1-9]'), 60,
            f"{gateway.name} held mid-scan")
        gateway.kill()
        killed = time.monotonic()
        consumer.release()
        moved = _until(lambda: _moved_from(site, session, gateway.name), 120, "session moved",
                       every=REST_POLL_S)
        code = output.wait(timeout_s=180)
    finally:
        consumer.close()
    messages = _messages(args.scan_shape)
    confirmed = code == 0 and (f"{messages} sent, {messages} forwarded, 0 spooled, 0 lost"
                               in output.text())
    if not confirmed:
        print(f"producer exited {code}:\n{output.text()}", file=sys.stderr)

    def since_kill(at: float | None) -> float | None:
        return None if at is None else at - killed
    # "is not answering" is printed only when the move has not happened yet; else "failed".
    result = LostRound(moved - killed, since_kill(output.first("is not answering|failed: ")),
                       since_kill(output.first(r"moved from gateway")),
                       since_kill(output.first(r"^gateway: scan 0 ")), confirmed)
    site.end_session(session)
    restarted = time.time()
    gateway.start()
    _until(lambda: _last_seen(site, site.a, gateway.name) > restarted, 60,
           f"{gateway.name} registered again", every=REST_POLL_S)
    return result


def _messages(scan_shape: str) -> int:
    rows, columns = scan_shape.split("x")
    return int(rows) * int(columns) * 4  # the 4D Camera's four sectors per frame


def lost_rounds(site: Site, rounds: int, args: argparse.Namespace) -> list[LostRound]:
    files = _producer_files(site)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        return [lost_round(site, context, files, args) for _ in range(rounds)]
    finally:
        context.term()


# -- the report --------------------------------------------------------------------------------


def _row(label: str, values: list[float | None]) -> str:
    return f"  {label:<44}" + "".join(f"{'-' if v is None else f'{v:.2f}':>7}" for v in values)


def _p50_max(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1e3:6.1f} ms, max {max(values) * 1e3:6.1f} ms"


def report(change: list[ChangeRound], notify: dict[str, list[float]],
           lost: dict[float, list[LostRound]], args: argparse.Namespace) -> None:
    print("1. gateway changes replica: gw-a's replica SIGKILLed (seconds, one column per round)")
    print(f"  {'replica killed':<44}" + "".join(f"{r.killed:>7}" for r in change))
    print(_row("kill -> gw-a serves a session opened after", [r.synced_s for r in change]))
    print(_row("survivor's registry: gap in gw-a's last_seen", [r.gap_s for r in change]))
    print(f"2. session opened -> gw-b (follows B) serves it, from the 201 answer "
          f"({args.notify_rounds} each; reconcile_s 1 s)")
    for via, delays in notify.items():
        print(f"  {'through ' + via.upper():<44}{_p50_max(delays)}")
    print(f"3. gateway lost mid-scan ({args.scan_shape} scan, {_messages(args.scan_shape)} "
          f"messages; producer --timeout {args.send_timeout:g}): seconds from the SIGKILL")
    for timeout_s, rounds in lost.items():
        print(f" gateway.timeout_s {timeout_s:g}")
        print(_row("control plane moved the session", [r.moved_s for r in rounds]))
        print(_row("producer: gave the gateway up", [r.stalled_s for r in rounds]))
        print(_row("producer: follows the move", [r.followed_s for r in rounds]))
        print(_row("producer: new gateway's receipt, whole scan", [r.confirmed_s for r in rounds]))
        print(f"  {'every scan confirmed, exit 0':<44}{all(r.confirmed for r in rounds)!s:>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="kills per case")
    parser.add_argument("--notify-rounds", type=int, default=20,
                        help="sessions opened through each replica")
    parser.add_argument("--short-timeout", type=float, default=3.0,
                        help="the second site's gateway.timeout_s")
    parser.add_argument("--send-timeout", type=float, default=30.0,
                        help="the producer's --timeout (its default, 30): how long a send may "
                             "block")
    parser.add_argument("--scan-shape", default="16x16", help="the streamed scan, ROWSxCOLS")
    args = parser.parse_args()
    lost: dict[float, list[LostRound]] = {}
    with running_server() as server, tempfile.TemporaryDirectory(prefix="dsn-bench-") as tmp:
        with running_site(server.url(server.create_database()), Path(tmp) / "default",
                          10.0) as site:
            notify = {via.name: [notify_delay_s(site, via) for _ in range(args.notify_rounds)]
                      for via in (site.a, site.b)}
            change = change_rounds(site, args.rounds)
            lost[10.0] = lost_rounds(site, args.rounds, args)
        with running_site(server.url(server.create_database()), Path(tmp) / "short",
                          args.short_timeout) as site:
            lost[args.short_timeout] = lost_rounds(site, args.rounds, args)
    report(change, notify, lost, args)


if __name__ == "__main__":
    main()
