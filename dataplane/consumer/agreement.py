"""Threshold agreement across ranks with non-blocking MPI collectives.

Each scan needs one ``Iallreduce`` (sum of the ranks' sample histograms) and one ``Ibcast`` (the
root's decision). A rank blocked in MPI would stop reading its ZeroMQ socket, its queue would fill,
the gateway would block on it and stop feeding the other ranks, and the job would deadlock; so
nothing here waits: ``progress`` tests the requests and returns the scans whose thresholds became
known.

MPI matches collectives by call order, and scans overlap, so the ranks must issue the same sequence
of collectives even though their samples are ready at different times. The sequence is fixed by the
order of the routed ``scan_begin`` messages, which is the same on every rank: for each scan in that
order, its allreduce and then its broadcast. An operation starts only after every operation before
it in the sequence has started, and the agreement uses its own communicator, so the blocking gathers
at scan end (on another communicator) never interleave with it.
"""

from __future__ import annotations

import enum
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from dataplane.consumer.errors import ConsumerError
from dataplane.consumer.scanwork import ThresholdDecision

# A decision is a few numbers and at most one error message; the broadcast buffer has a fixed size
# because the receivers must post it before they know the length.
DECISION_BYTES = 16 * 1024
_MAX_ERROR_CHARS = 2000
SETTLE_POLL_S = 0.001


class _Stage(enum.IntEnum):
    OPEN = 0
    CONTRIBUTED = 1
    REDUCING = 2
    BROADCASTING = 3


@dataclass
class _Scan:
    scan: int
    stage: _Stage = _Stage.OPEN
    send: np.ndarray | None = None
    total: np.ndarray | None = None
    decision_buffer: bytearray = field(default_factory=lambda: bytearray(DECISION_BYTES))
    request: MPI.Request | None = None


def encode_decision(decision: ThresholdDecision) -> bytearray:
    """A decision in the fixed-size broadcast buffer: 4-byte length, then the pickle."""
    if len(decision.error) > _MAX_ERROR_CHARS:
        decision = ThresholdDecision(decision.thresholds, decision.source, decision.samples,
                                     decision.error[:_MAX_ERROR_CHARS])
    payload = pickle.dumps(decision, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) + 4 > DECISION_BYTES:
        raise ConsumerError(f"threshold decision of {len(payload)} bytes exceeds {DECISION_BYTES}")
    buffer = bytearray(DECISION_BYTES)
    buffer[:4] = len(payload).to_bytes(4, "little")
    buffer[4:4 + len(payload)] = payload
    return buffer


def decode_decision(buffer: bytearray) -> ThresholdDecision:
    size = int.from_bytes(buffer[:4], "little")
    # The buffer comes from the root rank of this same MPI job, never from the network.
    decision = pickle.loads(bytes(buffer[4:4 + size]))
    if not isinstance(decision, ThresholdDecision):
        raise ConsumerError(f"the root broadcast a {type(decision).__name__}, not a decision")
    return decision


class ThresholdAgreement:
    """Per-scan threshold agreement, driven by ``progress`` from the receive loop."""

    def __init__(self, comm: MPI.Comm, decide: Callable[[np.ndarray], ThresholdDecision],
                 root: int = 0) -> None:
        self._comm = comm
        self._decide = decide
        self._root = root
        self._scans: list[_Scan] = []

    @property
    def pending(self) -> int:
        """Scans opened whose thresholds are not known yet on this rank."""
        return len(self._scans)

    def open(self, scan: int) -> None:
        """Register a scan at its routed ``scan_begin``, which fixes its place in the sequence."""
        if any(entry.scan == scan for entry in self._scans):
            raise ConsumerError(f"scan {scan} is already being agreed on")
        self._scans.append(_Scan(scan))

    def contribute(self, scan: int, vector: np.ndarray) -> None:
        """This rank's summable vector for ``scan``; sent when the sequence allows."""
        entry = self._entry(scan)
        if entry.stage is not _Stage.OPEN:
            raise ConsumerError(f"scan {scan}: this rank already contributed")
        entry.send = np.ascontiguousarray(vector, dtype=np.int64)
        entry.stage = _Stage.CONTRIBUTED

    def progress(self) -> list[tuple[int, ThresholdDecision]]:
        """Advance every request that can move; return the scans decided on this call."""
        decided: list[tuple[int, ThresholdDecision]] = []
        predecessors_started = True
        for entry in list(self._scans):
            if entry.stage is _Stage.CONTRIBUTED and predecessors_started:
                self._start_reduce(entry)
            if entry.stage is _Stage.REDUCING and _completed(entry.request):
                self._start_broadcast(entry)
            if entry.stage is _Stage.BROADCASTING and _completed(entry.request):
                self._scans.remove(entry)
                decided.append((entry.scan, decode_decision(entry.decision_buffer)))
            predecessors_started = predecessors_started and entry.stage >= _Stage.BROADCASTING
        return decided

    def settle(self, timeout_s: float) -> bool:
        """Before the job exits: wait, at most ``timeout_s``, for the operations already started
        to complete, starting no new one; False if some did not. A peer that took part in one may
        still be reading or writing its buffers, which the interpreter frees on its way out
        before MPI is finalized."""
        deadline = time.monotonic() + timeout_s
        while not all(_completed(e.request) for e in self._scans if e.request is not None):
            if time.monotonic() >= deadline:
                return False
            time.sleep(SETTLE_POLL_S)
        return True

    def _entry(self, scan: int) -> _Scan:
        for entry in self._scans:
            if entry.scan == scan:
                return entry
        raise ConsumerError(f"scan {scan} was never opened for threshold agreement")

    def _start_reduce(self, entry: _Scan) -> None:
        assert entry.send is not None
        entry.total = np.empty_like(entry.send)
        entry.request = self._comm.Iallreduce(entry.send, entry.total, op=MPI.SUM)
        entry.stage = _Stage.REDUCING

    def _start_broadcast(self, entry: _Scan) -> None:
        assert entry.total is not None
        if self._comm.Get_rank() == self._root:
            entry.decision_buffer = encode_decision(self._decide(entry.total))
        entry.send = entry.total = None
        entry.request = self._comm.Ibcast([entry.decision_buffer, MPI.BYTE], root=self._root)
        entry.stage = _Stage.BROADCASTING


def _completed(request: MPI.Request | None) -> bool:
    return request is not None and request.Test()
