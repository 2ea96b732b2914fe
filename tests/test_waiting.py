"""The tests' one polling helper: it returns what the check found, and a timeout explains itself."""

from __future__ import annotations

import itertools
import socket

import pytest
from waiting import eventually, eventually_async, tcp_port_closed


def test_the_first_truthy_value_is_returned() -> None:
    calls = itertools.count()
    assert eventually(lambda: next(calls) >= 3 and "ready", timeout_s=5, what="ready",
                      interval_s=0) == "ready"
    assert next(calls) == 4  # not called again once it held


def test_a_timeout_names_what_was_awaited_and_the_last_value_seen() -> None:
    expected = r"^timed out after 0.05 s waiting for a count; last check returned 0$"
    with pytest.raises(AssertionError, match=expected):
        eventually(lambda: 0, timeout_s=0.05, what="a count")


def test_an_exception_means_not_yet_and_the_last_one_is_shown_and_chained() -> None:
    attempts = itertools.count(1)

    def job_ended() -> bool:
        raise AssertionError(f"job still running (attempt {next(attempts)})")

    with pytest.raises(AssertionError, match=r"waiting for the job; last check raised "
                                             r"AssertionError\('job still running") as info:
        eventually(job_ended, timeout_s=0.1, what="the job", interval_s=0.01)
    assert isinstance(info.value.__cause__, AssertionError)
    assert next(attempts) > 2  # it kept trying until the deadline


def test_a_long_last_message_keeps_both_ends() -> None:
    def stuck() -> bool:
        raise AssertionError("head " + "x" * 10_000 + " tail")

    with pytest.raises(AssertionError) as info:
        eventually(stuck, timeout_s=0.01, what="a page")
    message = str(info.value)
    assert len(message) < 2_200 and "head" in message and "tail" in message and " … " in message


async def test_the_async_twin_awaits_coroutines_and_takes_plain_values_too() -> None:
    calls = itertools.count()

    async def answer() -> str | None:
        return "done" if next(calls) >= 2 else None

    assert await eventually_async(answer, timeout_s=5, what="done", interval_s=0) == "done"
    assert await eventually_async(lambda: 7, timeout_s=5, what="seven") == 7
    with pytest.raises(AssertionError, match="waiting for never; last check returned None"):
        await eventually_async(lambda: None, timeout_s=0.05, what="never")


def test_a_port_is_closed_once_its_listener_and_both_ends_of_its_connection_are() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    server, _ = listener.accept()
    assert not tcp_port_closed(port)
    listener.close()
    server.close()
    assert not tcp_port_closed(port)  # the client has not closed its end yet
    client.close()
    eventually(lambda: tcp_port_closed(port), timeout_s=5, what=f"port {port} closed")
    assert tcp_port_closed(port)
