"""The root rank's word to the others: which scan to finish next, and which to close as lost.

Every rank gathers a finished scan with blocking collectives, so all must gather the same scans in
the same order. The routed ``scan_end`` messages give one order on every rank, but a scan whose
gateway was lost ends on no message at all: the root decides that on its own clock
(``GatewayWatch``), and a rank told later could already be inside another scan's gather. So the
root alone orders: it tells the others each scan it is about to gather, and each scan it closes as
lost, and they follow. The words are small point-to-point messages on a communicator of their own,
sent without waiting; MPI delivers the messages from one rank to another in the order they were
sent.
"""

from __future__ import annotations

import enum
import logging
import pickle
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from mpi4py import MPI

from common.logs import fields
from dataplane.consumer.errors import ConsumerError

TAG = 0  # the communicator carries nothing else
SETTLE_POLL_S = 0.001


class Kind(enum.Enum):
    FINISH = "finish"  # gather this scan next
    LOST = "lost"  # close these scans: their gateway was lost


@dataclass(frozen=True)
class Word:
    kind: Kind
    scans: tuple[int, ...]


class RootOrders:
    """Sends (on the root) and receives (on the others) the root's words, in order."""

    def __init__(self, comm: MPI.Comm, root: int = 0) -> None:
        self._comm = comm
        self._root = root
        # Each send with the buffer it reads, kept alive until the send completes.
        self._sending: list[tuple[MPI.Request, bytes]] = []

    def tell(self, word: Word) -> None:
        """On the root: send ``word`` to every other rank."""
        payload = pickle.dumps(word, protocol=pickle.HIGHEST_PROTOCOL)
        self._sending = [(request, data) for request, data in self._sending if not request.Test()]
        for rank in range(self._comm.Get_size()):
            if rank != self._root:
                request = self._comm.Isend([payload, MPI.BYTE], dest=rank, tag=TAG)
                self._sending.append((request, payload))

    def hear(self) -> list[Word]:
        """On the other ranks: the words that arrived, in the order the root sent them."""
        heard: list[Word] = []
        status = MPI.Status()
        while self._comm.Iprobe(source=self._root, tag=TAG, status=status):
            buffer = bytearray(status.Get_count(MPI.BYTE))
            self._comm.Recv([buffer, MPI.BYTE], source=self._root, tag=TAG)
            # The bytes come from the root rank of this same MPI job, never from the network.
            word = pickle.loads(bytes(buffer))
            if not isinstance(word, Word):
                raise ConsumerError(f"the root sent a {type(word).__name__}, not an order")
            heard.append(word)
        return heard

    def settle(self, timeout_s: float) -> bool:
        """Before the job exits: wait, at most ``timeout_s``, for the words still being sent."""
        deadline = time.monotonic() + timeout_s
        while not all(request.Test() for request, _ in self._sending):
            if time.monotonic() >= deadline:
                return False
            time.sleep(SETTLE_POLL_S)
        return True


class GatewayWatch:
    """On the root: the scans a lost gateway left open.

    Two rules. A registered job's: when a heartbeat answer says the session moved to another
    gateway (a ``session_moved_at`` this job has not seen before), every scan the root holds that
    has not ended is suspect; a suspect scan of which any message arrives (the new gateway's
    repeated ``scan_begin``, data, its ``scan_end``) is served by a live gateway and no longer
    suspect; one of which nothing arrives for ``grace_s`` will never end, and is lost. Any job's:
    a scan split over lanes of which one lane has ended waits for the others, whose gateways
    stream the same scan at the same time; once nothing of it arrives for ``grace_s``, the lanes
    it waits for will never end (their gateway or producers were lost), and it is lost.
    """

    def __init__(self, moved_at: Callable[[], datetime | None], grace_s: float,
                 log: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self._moved_at = moved_at
        self._known = moved_at()  # a move before the job joined concerns no scan it holds
        self._grace_s = grace_s
        self._log = log
        self._clock = clock
        self._deadlines: dict[int, float] = {}
        self._waiting: dict[int, float] = {}  # scans waiting for lanes: their deadlines

    def heard(self, scan: int) -> None:
        self._deadlines.pop(scan, None)
        if scan in self._waiting:
            self._waiting[scan] = self._clock() + self._grace_s

    def lane_ended(self, scan: int) -> None:
        """A lane of ``scan`` ended while others have not."""
        self._waiting[scan] = self._clock() + self._grace_s

    def lost(self, open_scans: Iterable[int]) -> list[int]:
        """The scans to close as lost now; ``open_scans`` are those held and not ended."""
        moved = self._moved_at()
        if moved is not None and moved != self._known:
            self._known = moved
            suspect = sorted(open_scans)
            deadline = self._clock() + self._grace_s
            for scan in suspect:
                self._deadlines.setdefault(scan, deadline)
            self._log.warning("session moved to another gateway", extra=fields(
                moved_at=moved.isoformat(), scans=suspect, grace_s=self._grace_s))
        held = set(open_scans)
        now = self._clock()
        lost: set[int] = set()
        for deadlines in (self._deadlines, self._waiting):
            for scan, deadline in list(deadlines.items()):
                if scan not in held:
                    del deadlines[scan]  # it ended meanwhile
                elif deadline <= now:
                    del deadlines[scan]
                    lost.add(scan)
        return sorted(lost)
