"""The journal of open scans, and the router carrying on what a previous gateway left open."""

from __future__ import annotations

import stat
from pathlib import Path

from test_gateway_router import _session, begin, control, data, end, send_data

from common.protocol import RoutedScanBegin, RoutedScanEnd
from gateway.journal import NAME, Closed, Ended, Opened, Record, ScanJournal, _frame, recover
from gateway.router import Router
from gateway.sessions import SessionTable

ENDPOINTS = ["tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002"]


def opened(scan: int, session: str = "s1", members: list[str] | None = None,
           producers: int = 1) -> Opened:
    return Opened(session=session, scan=scan, begin=begin(scan=scan, producers=producers),
                  members=ENDPOINTS if members is None else members, spool_reason="",
                  every_sector=False)


def test_recovery_keeps_the_scans_still_open_and_the_newest_closed_numbers() -> None:
    records = [opened(1), opened(2), Closed(session="s1", scan=1), opened(3, "s2"),
               Closed(session="s1", scan=9), Closed(session="s1", scan=9)]
    recovered = recover(records, closed_kept=2)
    assert recovered.open == [opened(2), opened(3, "s2")]
    assert recovered.closed == {"s1": [1, 9]}
    assert recover([Closed(session="s1", scan=n) for n in range(5)], 3).closed == {"s1": [2, 3, 4]}


def test_recovery_keeps_the_scan_ends_of_the_scans_still_open_only() -> None:
    records: list[Record] = [
        opened(1), Ended(session="s1", scan=1, sent=5), opened(2),
        Ended(session="s1", scan=2, sent=7), Ended(session="s1", scan=1, sent=6),
        Closed(session="s1", scan=2), Ended(session="s1", scan=3, sent=1)]  # 3 never opened
    recovered = recover(records, closed_kept=8)
    assert recovered.ends == {("s1", 1): [5, 6]}
    assert recovered.ended(opened(1)) == [Ended(session="s1", scan=1, sent=5),
                                         Ended(session="s1", scan=1, sent=6)]


def test_a_journal_is_read_back_compacted_and_a_record_cut_short_ends_it(tmp_path: Path) -> None:
    journal = ScanJournal(tmp_path, closed_kept=8)
    journal.opened(opened(1))
    journal.opened(opened(2))
    journal.ended("s1", 2, 9)
    journal.closed("s1", 1)
    journal.close()
    assert stat.S_IMODE((tmp_path / NAME).stat().st_mode) == 0o600
    with (tmp_path / NAME).open("ab") as file:  # a crash in the middle of an append
        file.write(_frame(opened(3))[:-5])
    again = ScanJournal(tmp_path, closed_kept=8)
    assert (again.recovered.open, again.recovered.closed) == ([opened(2)], {"s1": [1]})
    assert again.recovered.ends == {("s1", 2): [9]}
    again.close()
    assert (tmp_path / NAME).read_bytes() == b"".join(_frame(r) for r in [
        Closed(session="s1", scan=1), opened(2), Ended(session="s1", scan=2, sent=9)])


class Recorder:
    def __init__(self) -> None:
        self.records: list[Record] = []

    def opened(self, record: Opened) -> None:
        self.records.append(record)

    def ended(self, session: str, scan: int, sent: int) -> None:
        self.records.append(Ended(session=session, scan=scan, sent=sent))

    def closed(self, session: str, scan: int) -> None:
        self.records.append(Closed(session=session, scan=scan))


def test_the_router_journals_each_scan_it_opens_ends_and_closes() -> None:
    journal = Recorder()
    session = _session(consumers=2)
    router = Router(SessionTable([session]), journal=journal)
    router.route("s1", begin(producers=2), 1, 0)
    send_data(router, data(frame=0))
    router.route("s1", end(sent=1), 1, 0)
    router.route("s1", end(sent=0), 1, 0)
    # The last scan_end closes the scan: its close record says all there is to know.
    assert journal.records == [opened(1, members=list(session.consumers), producers=2),
                               Ended(session="s1", scan=1, sent=1), Closed(session="s1", scan=1)]


def test_a_restored_scan_closes_at_the_scan_end_of_the_producers_still_streaming() -> None:
    session = _session(consumers=2)
    router = Router(SessionTable([session]))
    members = list(session.consumers)
    # Two of three producers had ended the scan before the restart; they will not end it again.
    router.restore(recover([opened(1, members=members, producers=3),
                            Ended(session="s1", scan=1, sent=10),
                            Ended(session="s1", scan=1, sent=11)], closed_kept=8))
    ends = [msg for _, msg in control(router.route("s1", end(sent=12), 1, 0))]
    assert len(ends) == 2 and all(isinstance(e, RoutedScanEnd) and e.sent == 33 for e in ends)
    assert not router.scan_open("s1", 1)


def test_a_restored_scan_is_announced_again_routed_and_ended_as_resumed() -> None:
    session = _session(consumers=2)
    router = Router(SessionTable([session]))
    recovered = recover([opened(1, members=list(session.consumers)),
                         Closed(session="s1", scan=0)], closed_kept=8)
    change = router.restore(recovered)
    [resumed] = change.resumed
    assert [(slot, msg.scan, msg.index) for slot, msg in control(resumed)] == [(0, 1, 0),
                                                                               (1, 1, 1)]
    assert all(isinstance(msg, RoutedScanBegin) for _, msg in control(resumed))
    assert send_data(router, data(frame=3)).slot == 1  # no scan_begin needed: the scan is known
    ends = [msg for _, msg in control(router.route("s1", end(sent=24), 1, 0))]
    assert all(isinstance(e, RoutedScanEnd) and e.resumed and e.sent == 24 for e in ends)
    assert router.route("s1", begin(scan=0), 1, 0).drop == "scan_closed"  # used before restart


def test_a_scan_of_a_session_that_appears_later_is_restored_then() -> None:
    router = Router(SessionTable())
    # As in control-plane mode: the journal is read before the first table arrives.
    records: list[Record] = [opened(4, producers=2), Ended(session="s1", scan=4, sent=3)]
    assert router.restore(recover(records, closed_kept=8)).resumed == []
    session = _session(consumers=2).model_copy(update={"consumers": ENDPOINTS})
    change = router.use_table(SessionTable([session]))
    assert [d.control for d in change.resumed] and change.interruptions == []
    assert router.scan_open("s1", 4)
    ends = [msg for _, msg in control(router.route("s1", end(scan=4, sent=5), 1, 0))]
    assert len(ends) == 2 and all(isinstance(e, RoutedScanEnd) and e.sent == 8 for e in ends)


def test_a_restored_scan_whose_member_is_gone_is_interrupted() -> None:
    session = _session(consumers=1)
    router = Router(SessionTable([session]), spooling=True)
    change = router.restore(recover([opened(1, members=[*session.consumers, ENDPOINTS[1]])],
                                    closed_kept=8))
    assert [i.key.scan for i in change.interruptions] == [1]
