"""The per-rank receive loop: ZeroMQ in, the pure scan work in the middle, MPI and files out.

Rank r binds a PULL socket at the session's consumer endpoint r (static mode) or, with a control
plane, on an ephemeral port that it registers (``registration``). The loop never blocks in MPI while
data may still arrive: threshold agreement is non-blocking (``agreement``), and the blocking gather
happens only for a scan whose routed ``scan_end`` every rank has already received (the gateway sends
it to all members at once), so every rank reaches that gather without needing any more data.
Scans finish in the root's ``scan_end`` order, which the root tells the others (``order``): that
keeps the gathers matched, also for a scan the root closes because its gateway was lost.

On a first SIGTERM, SIGINT or SIGUSR1 a rank drains (``Shutdown``): it takes no new scan but goes on
until the scans it holds are finished, or the drain deadline passes; a second signal stops it at
once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Never

import numpy as np
import zmq
from mpi4py import MPI
from tqdm import tqdm

from common.config import ConfigError, Session, load_config
from common.logs import configure as configure_logging
from common.logs import fields
from common.protocol import (
    Data,
    ProtocolError,
    RoutedScanAbort,
    RoutedScanBegin,
    RoutedScanEnd,
    decode_consumer_message,
)
from common.results import ScanResult
from common.tuning import keep_message_buffers
from common.zmqparts import read_message
from dataplane import counting
from dataplane.consumer.agreement import ThresholdAgreement
from dataplane.consumer.controlplane import ControlPlaneClient
from dataplane.consumer.errors import (
    ConsumerError,
    JoinError,
    MembershipError,
    SetupError,
    WriteError,
)
from dataplane.consumer.gather import gather_scan
from dataplane.consumer.lanes import Joined
from dataplane.consumer.order import GatewayWatch, Kind, RootOrders, Word
from dataplane.consumer.outcome import ScanOutcome, merge
from dataplane.consumer.registration import RegistrationArguments, job_id_for, join_session
from dataplane.consumer.report import (
    HttpResultReporter,
    JsonLinesReporter,
    Reporters,
    ResultReporter,
    failed_result,
    written_result,
)
from dataplane.consumer.scanwork import (
    CountingOptions,
    ScanWork,
    ThresholdDecision,
    decide_thresholds,
)
from dataplane.consumer.writer import scan_file_name, write_scan

ROOT = 0
# Messages taken from the socket before MPI requests are tested again.
RECEIVE_BATCH = 64
# While an agreement is in flight, MPI needs frequent calls to make progress.
BUSY_POLL_MS = 5
IDLE_POLL_MS = 200
# How long a stopping rank waits for the threshold agreements it started: the other ranks, stopping
# too, complete theirs within milliseconds.
SETTLE_S = 2.0
# Batch systems and launchers ask a job to end with one of these; Open MPI's mpiexec ends its ranks
# at once on SIGTERM or SIGINT but hands SIGUSR1 on to them, so a local job script relays a cancel
# as SIGUSR1.
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Shutdown:
    """What the signals asked for: the first, to drain for at most ``drain_s``; the second, to stop
    at once. Python runs signal handlers in the main thread, the receive loop's own."""

    def __init__(self, drain_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.drain_s = drain_s
        self._clock = clock
        self.deadline: float | None = None
        self.stopped = False

    def request(self) -> None:
        if self.deadline is None:
            self.deadline = self._clock() + self.drain_s
        else:
            self.stopped = True

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def expired(self) -> bool:
        return self.stopped or (self.deadline is not None and self._clock() >= self.deadline)


@dataclass(frozen=True)
class ConsumerSettings:
    session: Session
    output_dir: Path  # absolute
    options: CountingOptions
    scans: int | None = None  # exit after this many scans; None: until stopped
    # How long a scan may go without a message before it is closed as lost with its gateway:
    # registered, after the session moved; any job, once some of a scan's lanes ended.
    gateway_lost_s: float = 30.0


def _never_moved() -> datetime | None:
    return None  # a job without the control plane hears of no move


def check_layout(session: Session, ranks: int) -> None:
    if len(session.consumers) != ranks:
        raise SetupError(
            f"session {session.id!r} lists {len(session.consumers)} consumer endpoints but the job "
            f"has {ranks} MPI ranks; start it with mpiexec -n {len(session.consumers)}")


def load_dark(path: Path, frame_shape: tuple[int, int]) -> np.ndarray:
    """A dark reference file (.npy, frame-shaped) in the form the counting kernels subtract."""
    try:
        dark = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SetupError(f"--dark {path}: cannot read a .npy array: {exc}") from None
    if dark.shape != tuple(frame_shape):
        raise SetupError(f"--dark {path}: shape {dark.shape} differs from the detector frame "
                         f"shape {tuple(frame_shape)}")
    try:
        return counting.dark_offsets(dark)
    except counting.CountingError as exc:
        raise SetupError(f"--dark {path}: {exc}") from None


class RankLoop:
    """One rank of a consumer job."""

    def __init__(self, settings: ConsumerSettings, world: MPI.Comm, socket: zmq.Socket[bytes],
                 reporter: ResultReporter | None, shutdown: Shutdown,
                 log: logging.Logger,
                 moved_at: Callable[[], datetime | None] | None = None) -> None:
        self.settings = settings
        self._shutdown = shutdown
        self.rank = world.Get_rank()
        self.ranks = world.Get_size()
        # Separate communicators keep the non-blocking agreement and the blocking gathers from
        # ever being matched against each other.
        self._agreement = ThresholdAgreement(world.Dup(), self._decide, root=ROOT)
        self._gather_comm = world.Dup()
        self._orders = RootOrders(world.Dup(), root=ROOT)
        # Only the root watches for a lost gateway: it decides, and tells the others.
        self._watch = (GatewayWatch(moved_at or _never_moved, settings.gateway_lost_s, log)
                       if self.rank == ROOT else None)
        self._socket = socket
        self._poller = zmq.Poller()
        self._poller.register(socket, zmq.POLLIN)
        self._reporter = reporter
        self._log = log
        self._scans: dict[int, ScanWork] = {}
        self._ended: list[int] = []  # in the order their ends came (or they were lost)
        self._told: deque[int] = deque()  # not the root: the scans to finish, in the root's order
        self._stray: Counter[str] = Counter()
        self._bars: dict[int, tqdm[Never]] = {}
        self.finished = 0

    @property
    def _draining(self) -> bool:
        return self._shutdown.draining

    def run(self) -> int:
        """Receive and process until ``settings.scans`` scans are finished, or, once signalled,
        until drained or stopped."""
        shutdown = self._shutdown
        announced = False
        while not self._done() and not self._leaving():
            if shutdown.draining and not announced:
                announced = True
                self._log.info("draining", extra=fields(scans=sorted(self._scans),
                                                        drain_s=shutdown.drain_s))
            timeout = BUSY_POLL_MS if self._agreement.pending else IDLE_POLL_MS
            if self._poller.poll(timeout):
                self._receive_batch()
            self._advance()
        if self._scans:
            self._log.warning("stopping with scans unfinished", extra=fields(
                scans={s: w.assembly.counters.received for s, w in self._scans.items()}))
        if not self._agreement.settle(SETTLE_S):
            self._log.warning("threshold agreements still under way at exit")
        if not self._orders.settle(SETTLE_S):
            self._log.warning("orders to the other ranks still being sent at exit")
        for bar in self._bars.values():
            bar.close()
        return self.finished

    def _done(self) -> bool:
        return self.settings.scans is not None and self.finished >= self.settings.scans

    def _leaving(self) -> bool:
        """Signalled, and drained or out of time.

        Why leaving here cannot strand another rank in a collective: a scan's blocking gather
        follows its threshold agreement, which completes only once every rank has contributed,
        so any scan another rank may be gathering is one this rank holds too, and this rank
        leaves only when it holds none, i.e. after it took part in every such gather. Scans begun
        elsewhere after this rank stopped taking them never reach their agreement, let alone a
        gather; the gateway aborts them to the others once this rank leaves. Only the deadline
        breaks the rule: a rank out of time may leave a fellow rank blocked in a gather, which
        the launcher's kill, later than the drain, then ends.
        """
        shutdown = self._shutdown
        return shutdown.draining and (not self._scans or shutdown.expired())

    def _receive_batch(self) -> None:
        for _ in range(RECEIVE_BATCH):
            try:
                parts = read_message(self._socket, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(parts)

    def _handle(self, parts: list[zmq.Frame]) -> None:
        try:
            msg = decode_consumer_message(parts[0].buffer)
        except ProtocolError as exc:
            self._stray_message(exc.reason.value, None)
            return
        if self._watch is not None:
            self._watch.heard(msg.scan)
        if isinstance(msg, Data):
            self._on_data(msg, parts)
        elif isinstance(msg, RoutedScanBegin):
            self._on_begin(msg)
        elif isinstance(msg, RoutedScanEnd):
            self._on_end(msg)
        else:
            self._on_abort(msg)

    def _on_begin(self, begin: RoutedScanBegin) -> None:
        if begin.members != self.ranks or begin.index != self.rank:
            raise MembershipError(
                f"scan {begin.scan}: the gateway routes to member {begin.index} of "
                f"{begin.members}, but this is rank {self.rank} of {self.ranks}")
        known = self._scans.get(begin.scan)
        if known is not None:
            self._join_lane(known, begin)
            return
        if self._draining:
            # The gateway accounts for the scan when this rank leaves.
            self._stray_message("scan_begin_while_draining", begin.scan)
            return
        dark = self.settings.options.dark
        if dark is not None and dark.shape != tuple(begin.frame_shape):
            raise SetupError(f"scan {begin.scan}: frame shape {tuple(begin.frame_shape)} differs "
                             f"from the dark reference's {dark.shape}")
        work = ScanWork(begin, self.settings.options, self.ranks)
        self._scans[begin.scan] = work
        self._agreement.open(begin.scan)
        self._log.info("scan begins", extra=fields(
            scan=begin.scan, scan_shape=list(begin.scan_shape),
            owned_frames=work.assembly.owned_frames))
        if self.rank == ROOT and sys.stderr.isatty():
            self._bars[begin.scan] = tqdm(total=work.assembly.owned_frames,
                                          desc=f"scan {begin.scan}", unit="frame",
                                          file=sys.stderr, leave=False)

    def _join_lane(self, work: ScanWork, begin: RoutedScanBegin) -> None:
        joined = work.lanes.join(begin)
        if joined is not Joined.JOINED:
            self._stray_message(joined.value, begin.scan)
            return
        self._log.info("lane joins the scan", extra=fields(scan=begin.scan, lane=begin.lane,
                                                          lanes=begin.lanes))

    def _on_data(self, msg: Data, parts: list[zmq.Frame]) -> None:
        work = self._scans.get(msg.scan)
        if work is None or work.closure is not None:
            self._stray_message("unknown_scan" if work is None else "after_scan_end", msg.scan)
            return
        if len(parts) != 2:
            self._stray_message("wrong_part_count", msg.scan)
            return
        before = work.assembly.complete_frames
        work.add(msg, parts[1].buffer)
        bar = self._bars.get(msg.scan)
        if bar is not None and work.assembly.complete_frames != before:
            bar.update(1)

    def _on_end(self, end: RoutedScanEnd) -> None:
        work = self._scans.get(end.scan)
        if work is None or work.closure is not None:
            self._stray_message("unknown_scan_end", end.scan)
            return
        merged = work.lanes.end(end)
        if isinstance(merged, Joined):
            self._stray_message(merged.value, end.scan)
            return
        if merged is None:
            self._log.info("lane ends", extra=fields(scan=end.scan, lane=end.lane,
                                                     waiting_for=work.lanes.waiting_for))
            if self._watch is not None:
                self._watch.lane_ended(end.scan)
            return
        closure = work.close(merged)
        self._ended.append(end.scan)
        self._log.info("scan ends", extra=fields(
            scan=end.scan, expected=closure.expected, received=closure.received,
            incomplete_frames=len(closure.incomplete_frames), missing_sectors=len(closure.missing)))
        if closure.unaccounted:
            self._log.warning("fewer messages arrived than the gateway forwarded", extra=fields(
                scan=end.scan, expected=closure.expected, received=closure.received))

    def _on_abort(self, abort: RoutedScanAbort) -> None:
        if abort.scan not in self._scans:
            self._stray_message("unknown_scan_abort", abort.scan)
            return
        if self._draining:
            # A fellow rank drained and left first: nobody will gather this scan, and this rank
            # is leaving too, so no later scan waits behind its agreement.
            self._drop(abort)
            return
        # A member of this job left the session mid-scan: the scan can never be gathered, and
        # the threshold agreement of every open scan may wait for that member forever.
        raise MembershipError(
            f"scan {abort.scan} aborted by the gateway ({abort.reason}): a rank of this job left "
            "the session; the gateway spools the rest of the scan and reports it")

    def _close_lost(self, scans: tuple[int, ...]) -> None:
        """Close scans whose gateway was lost: no routed ``scan_end`` will ever come."""
        for scan in scans:
            work = self._scans.get(scan)
            if work is None or work.closure is not None:
                continue
            closure = work.close_lost()
            self._ended.append(scan)
            self._log.warning("scan closed: its gateway was lost", extra=fields(
                scan=scan, received=closure.received, missing_sectors=len(closure.missing),
                lanes_lost=work.lanes.waiting_for))

    def _drop(self, abort: RoutedScanAbort) -> None:
        work = self._scans.pop(abort.scan)
        if abort.scan in self._ended:
            self._ended.remove(abort.scan)
        bar = self._bars.pop(abort.scan, None)
        if bar is not None:
            bar.close()
        self._log.warning("scan dropped", extra=fields(
            scan=abort.scan, reason=abort.reason, received=work.assembly.counters.received))

    def _advance(self) -> None:
        self._follow_the_root()
        for scan, work in self._scans.items():
            # Draining, an open scan contributes what it has: the agreements of the scans that
            # ended after it began wait for its turn in the sequence.
            if work.ready_to_contribute or (self._draining and not work.contributed):
                self._agreement.contribute(scan, work.contribution())
        for scan, decision in self._agreement.progress():
            if scan not in self._scans:  # dropped while draining
                continue
            self._scans[scan].decide(decision)
            if self.rank == ROOT:
                self._log.info("thresholds agreed",
                               extra=fields(scan=scan, **decision.as_metadata()))
        while (ready := self._next_to_finish()) is not None and not self._done():
            if self.rank == ROOT:
                self._orders.tell(Word(Kind.FINISH, (ready,)))
            self._finish(ready)

    def _follow_the_root(self) -> None:
        """The root closes the scans its watch finds lost and tells the others; they do as told."""
        if self._watch is not None:
            open_scans = [scan for scan, work in self._scans.items() if work.closure is None]
            lost = tuple(self._watch.lost(open_scans))
            if lost:
                self._orders.tell(Word(Kind.LOST, lost))
                self._close_lost(lost)
        if self.rank == ROOT:
            return
        for word in self._orders.hear():
            if word.kind is Kind.LOST:
                self._close_lost(word.scans)
            else:
                self._told.extend(word.scans)

    def _next_to_finish(self) -> int | None:
        """The scan to gather now: on the root, the first ended, once finished here; on the
        others, the next the root named, once finished here."""
        scan: int | None
        if self.rank == ROOT:
            scan = self._ended[0] if self._ended else None
        else:
            while self._told and self._told[0] not in self._scans:
                # Dropped on the gateway's abort while draining: this rank gathers it no more.
                self._log.warning("told to finish a scan this rank dropped",
                                  extra=fields(scan=self._told.popleft()))
            scan = self._told[0] if self._told else None
        return scan if scan is not None and self._scans[scan].finished else None

    def _finish(self, scan: int) -> None:
        if self._told and self._told[0] == scan:
            self._told.popleft()
        if scan in self._ended:
            self._ended.remove(scan)
        work = self._scans.pop(scan)
        parts = gather_scan(self._gather_comm, work.result(), root=ROOT)
        bar = self._bars.pop(scan, None)
        if bar is not None:
            bar.close()
        self.finished += 1
        if parts is None or work.end is None or work.decision is None:
            return
        outcome = merge(work.begin, work.end, work.decision, parts)
        result = write_result(self.settings.output_dir, outcome, self._log)
        if self._reporter is not None:
            self._reporter.report(result)

    def _decide(self, total: np.ndarray) -> ThresholdDecision:
        options = self.settings.options
        return decide_thresholds(total, options.background_n_sigma, options.xray_n_sigma)

    def _stray_message(self, reason: str, scan: int | None) -> None:
        self._stray[reason] += 1
        count = self._stray[reason]
        # Log the 1st, 2nd, 4th, 8th, ... so a flood stays visible without flooding the log.
        if count & (count - 1) == 0:
            self._log.warning("message dropped",
                              extra=fields(reason=reason, scan=scan, count=count))


def write_result(output_dir: Path, outcome: ScanOutcome, log: logging.Logger) -> ScanResult:
    """Write the scan's file and log it. A write that fails (a full disk, say) becomes a
    ``failed`` result rather than the job's end: the writer has removed its temporary file, and
    the scans after this one may still find space."""
    try:
        written = write_scan(output_dir, outcome)
    except WriteError as exc:
        log.error("scan not written", extra=fields(scan=outcome.begin.scan, error=str(exc)))
        path = output_dir / scan_file_name(outcome.begin.session, outcome.begin.scan)
        return failed_result(outcome, path, str(exc))
    result = written_result(outcome, written)
    log.info("scan written", extra=fields(
        scan=result.scan, path=result.path, frames=result.frames, events=result.events,
        status=result.status, incomplete_frames=result.incomplete_frames,
        conflicting_duplicates=result.conflicting_duplicates))
    return result


def open_socket(context: zmq.Context[zmq.Socket[bytes]], session: Session,
                rank: int) -> zmq.Socket[bytes]:
    socket: zmq.Socket[bytes] = context.socket(zmq.PULL)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, session.limits.hwm)
    endpoint = session.consumers[rank]
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as exc:
        socket.close()
        raise SetupError(f"rank {rank}: cannot bind {endpoint}: {exc}") from None
    return socket


def run_rank(settings: ConsumerSettings, world: MPI.Comm, reporter: ResultReporter | None,
             shutdown: Shutdown, log: logging.Logger) -> int:
    """Static mode: bind the session's endpoint for this rank, run the loop, close; returns the
    number of scans finished. Only the root reports."""
    check_layout(settings.session, world.Get_size())
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    context = zmq.Context()
    socket = open_socket(context, settings.session, world.Get_rank())
    log.info("listening", extra=fields(endpoint=settings.session.consumers[world.Get_rank()],
                                       session=settings.session.id,
                                       hwm=settings.session.limits.hwm))
    try:
        return RankLoop(settings, world, socket, reporter, shutdown, log).run()
    finally:
        socket.close(linger=0)
        context.term()


def run_registered_rank(settings: ConsumerSettings, world: MPI.Comm,
                        registration: RegistrationArguments, result_file: Path | None,
                        shutdown: Shutdown, log: logging.Logger) -> int:
    """Registration mode: join the session (all ranks or none), run the loop, leave; returns the
    number of scans finished. Membership comes from each routed scan_begin, not the config."""
    session = settings.session
    try:
        settings.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SetupError(f"--output-dir {settings.output_dir}: {exc.strerror}") from None
    job_id = job_id_for(registration.job_id, world)
    context = zmq.Context()
    try:
        client, joined = join_session(registration, context, session.id, session.limits.hwm,
                                      world, job_id, log)
        log.info("listening", extra=fields(endpoint=joined.endpoint, session=session.id,
                                           hwm=session.limits.hwm, job_id=job_id))
        reporter: ResultReporter | None = None
        try:
            if world.Get_rank() == ROOT:
                reporter = _registered_reporter(client, session.id, result_file, log)
            return RankLoop(settings, world, joined.socket, reporter, shutdown, log,
                            moved_at=lambda: joined.keeper.lease.session_moved_at).run()
        finally:
            if reporter is not None:
                reporter.close()
            joined.leave(client, session.id, log)
    finally:
        context.term()


@dataclass(frozen=True)
class JobArguments:
    """What ``dsn consumer run`` was given."""

    config: Path
    session: str
    output_dir: Path
    scans: int | None
    dark: Path | None
    samples: int
    background_sigma: float
    xray_sigma: float
    kernel: str
    result_file: Path | None
    drain_s: float  # after the first signal, at most this long to finish the scans under way
    registration: RegistrationArguments | None = None  # None: static mode
    gateway_lost_s: float = 30.0


def settings_from(args: JobArguments) -> ConsumerSettings:
    try:
        session = load_config(args.config).session(args.session)
        kernel = counting.get_kernel(args.kernel)
    except (ConfigError, counting.CountingError) as exc:
        raise SetupError(str(exc)) from None
    dark = None if args.dark is None else load_dark(args.dark, session.detector.frame_shape)
    options = CountingOptions(kernel=kernel, dark=dark, samples=args.samples,
                              background_n_sigma=args.background_sigma,
                              xray_n_sigma=args.xray_sigma)
    # Resolved once, here: every result names its file by an absolute path, useful to whoever
    # reads it, wherever the job ran.
    return ConsumerSettings(session=session, output_dir=args.output_dir.resolve(),
                            options=options, scans=args.scans,
                            gateway_lost_s=args.gateway_lost_s)


def run_job(args: JobArguments) -> int:
    """One rank of ``dsn consumer run``; returns the process exit code."""
    world = MPI.COMM_WORLD
    log = configure_logging("dsn.consumer", rank=world.Get_rank(), pid=os.getpid())
    keep_message_buffers()
    shutdown = Shutdown(args.drain_s)
    for signum in DRAIN_SIGNALS:
        signal.signal(signum, lambda *_: shutdown.request())
    # A file-size limit (a batch system's ulimit -f) must fail the write, not kill the rank: the
    # write then raises EFBIG and the scan is reported failed.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        finished = _run(args, world, shutdown, log)
    except JoinError as exc:
        log.error(str(exc), extra=fields(error=type(exc).__name__))
        return 2
    except ConsumerError as exc:
        log.error(str(exc), extra=fields(error=type(exc).__name__))
        if world.Get_size() > 1:
            # The other ranks may be inside a collective this rank will never join.
            world.Abort(2)
        return 2
    log.info("consumer stopped", extra=fields(scans=finished, signalled=shutdown.draining))
    return 0


def _run(args: JobArguments, world: MPI.Comm, shutdown: Shutdown, log: logging.Logger) -> int:
    settings = settings_from(args)
    if args.registration is not None:
        return run_registered_rank(settings, world, args.registration, args.result_file,
                                   shutdown, log)
    reporter = _reporter(args.result_file) if world.Get_rank() == ROOT else None
    try:
        return run_rank(settings, world, reporter, shutdown, log)
    finally:
        if reporter is not None:
            reporter.close()


def _reporter(result_file: Path | None) -> JsonLinesReporter:
    return JsonLinesReporter() if result_file is None else JsonLinesReporter.to_file(result_file)


def _registered_reporter(client: ControlPlaneClient, session: str, result_file: Path | None,
                         log: logging.Logger) -> ResultReporter:
    """The control plane records results; a --result-file keeps a local copy, written first."""
    http = HttpResultReporter(client, session, log)
    if result_file is None:
        return http
    return Reporters([JsonLinesReporter.to_file(result_file), http])

