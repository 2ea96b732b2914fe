"""The ``dsn`` package's exception tree: the demo, and the processes it supervises."""

from __future__ import annotations

from common.errors import DsnError


class DemoError(DsnError):
    """The demo could not complete; the message says which step failed and why."""


class ProcessFailed(DemoError):
    """A child process exited unexpectedly or did not finish in time; the message shows its log
    tail."""
