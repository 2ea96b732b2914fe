"""A socket served from a daemon thread, the shape of the gateway's side services (handshake
monitors, receipts): the forwarding loop never waits for them, and they stop within one poll."""

from __future__ import annotations

import abc
import threading
from typing import Final

import zmq

from common.procstat import named_thread

POLL_MS: Final = 100


class SocketThread(abc.ABC):
    """Serves ``socket`` from a daemon thread named ``name``: ``_handle`` runs each time it is
    readable, until ``stop``, which then closes it (``_close``)."""

    def __init__(self, socket: zmq.Socket[bytes], name: str, *, poll_ms: int = POLL_MS) -> None:
        self._socket = socket
        self._poll_ms = poll_ms
        self._stop = threading.Event()
        self._thread = named_thread(self._serve, name)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._close()

    def _close(self) -> None:
        self._socket.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self._socket.poll(self._poll_ms):
                self._handle()

    @abc.abstractmethod
    def _handle(self) -> None:
        """Take what the readable socket holds."""
