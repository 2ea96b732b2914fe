"""Threads named in the kernel, and their CPU time read back by name."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from waiting import eventually

from common.procstat import name_this_thread, named_thread, thread_cpu_seconds


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


def test_a_named_thread_carries_its_name_in_python_and_in_the_kernel() -> None:
    release = threading.Event()
    thread = named_thread(release.wait, "dsn-test-named")
    thread.start()
    try:
        eventually(lambda: _kernel_name(thread) == "dsn-test-named", timeout_s=5,
                   what="the kernel's name of the thread")
    finally:
        release.set()
        thread.join()
    assert (thread.name, thread.daemon) == ("dsn-test-named", True)


def _kernel_name(thread: threading.Thread) -> str | None:
    if thread.native_id is None:
        return None
    return Path(f"/proc/self/task/{thread.native_id}/comm").read_text().strip()
