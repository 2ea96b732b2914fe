"""Threads named in the kernel, and their CPU time read back by name."""

from __future__ import annotations

import threading
import time

from common.procstat import name_this_thread, thread_cpu_seconds


def test_a_named_thread_s_cpu_time_is_read_back_under_its_name() -> None:
    spun = threading.Event()

    def spin() -> None:
        name_this_thread("dsn-test-spinner-long-name")  # cut to the kernel's 15 bytes
        started = time.thread_time()
        while time.thread_time() - started < 0.05:
            pass
        spun.set()
        time.sleep(0.5)  # still alive when read

    thread = threading.Thread(target=spin)
    thread.start()
    assert spun.wait(10)
    seconds = thread_cpu_seconds().get("dsn-test-spinne")
    thread.join()
    assert seconds is not None and 0.05 <= seconds < 5


def test_a_process_that_is_gone_has_no_threads() -> None:
    assert thread_cpu_seconds(pid=2 ** 22 + 1) == {}
