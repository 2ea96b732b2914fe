"""Reading a whole ZeroMQ message with as few Python calls as possible: for the paths that take
every sector (the gateway's forwarding loop, a consumer rank's receive loop)."""

from __future__ import annotations

import zmq


def read_message(socket: zmq.Socket[bytes], flags: int = 0) -> list[zmq.Frame]:
    """One whole message, zero-copy: its first part (zmq.Again when there is none, with
    ``zmq.NOBLOCK``), then the rest, which libzmq delivers with it. Half the Python calls of
    recv_multipart, which asks the socket for RCVMORE after every part: the part itself knows."""
    frames = [socket.recv(flags, copy=False)]
    while frames[-1].more:
        frames.append(socket.recv(flags, copy=False))
    return frames
