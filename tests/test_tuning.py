"""Message buffers are reused: with the tuning the gateway and the consumers apply, a stream of
4D Camera sectors through real ZeroMQ sockets no longer faults its pages in message by message."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from common.tuning import keep_message_buffers

STREAM = """
import resource, sys, zmq
from common.tuning import keep_message_buffers
if sys.argv[1] == "tuned":
    assert keep_message_buffers()
# A hop as the gateway makes it: each sector is received by one I/O thread and sent on, then freed,
# by another.
context = zmq.Context(io_threads=2)
source, ingress = context.socket(zmq.PUSH), context.socket(zmq.PULL)
egress, sink = context.socket(zmq.PUSH), context.socket(zmq.PULL)
source.connect(f"tcp://127.0.0.1:{ingress.bind_to_random_port('tcp://127.0.0.1')}")
egress.connect(f"tcp://127.0.0.1:{sink.bind_to_random_port('tcp://127.0.0.1')}")
sector = zmq.Frame(bytes(165888))
def stream(bursts):
    for _ in range(bursts):  # queues of sectors in flight, as behind a busy consumer
        for _ in range(64):
            source.send(sector, copy=False)
        for _ in range(64):
            egress.send(ingress.recv(copy=False), copy=False)
        for _ in range(64):
            sink.recv(copy=False)
stream(5)  # warm up: the arenas reach their working size
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
stream(30)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


# glibc's starting mmap threshold, held fixed: its dynamic raise depends on which large block a
# process happens to free first, so an untuned baseline left to it varies from run to run (measured
# 6 to 68,000 faults); fixed, every sector above it is a fresh mapping, as the tuning prevents.
UNTUNED = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}


def faults(mode: str) -> int:
    env = {**os.environ, **(UNTUNED if mode == "plain" else {})}
    done = subprocess.run([sys.executable, "-c", STREAM, mode], capture_output=True, text=True,
                          timeout=120, check=True, env=env)
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_received_sectors_reuse_their_buffers_instead_of_faulting_pages_in() -> None:
    assert keep_message_buffers()
    untuned, tuned = faults("plain"), faults("tuned")
    # 1,920 sectors: untuned, every sector's pages faulted in again (measured 157,000);
    # tuned, the buffers stay mapped (measured under 10).
    assert untuned > 1000, untuned
    assert tuned < untuned / 10, (tuned, untuned)
