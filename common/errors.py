"""The root of every error the dsn packages raise on purpose.

Each package has one root below it (``ControlPlaneError``, ``GatewayError``, ``DataPlaneError``,
``DemoError``), and this package's own errors derive from it directly. ``str(error)`` is a message
that is safe to show: it names the value, file or rule at fault, never a token or a key.
"""

from __future__ import annotations


class DsnError(Exception):
    """Something the caller can act on; the message says what and where."""


class InvalidSetting(DsnError):
    """A service setting that cannot be used: ``key`` names the field, ``reason`` says why.

    Raised by the frozen settings objects of the services as they are built; whoever built one
    from several sources names the key as its user gave it (``named``).
    """

    def __init__(self, key: str, value: object, reason: str) -> None:
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"invalid setting {self.named(key)}")

    def named(self, where: str) -> str:
        """The message with the setting named as given (a file and key, an option)."""
        shown = "" if self.value is None else f"{self.value!r}: "
        return f"{where}: {shown}{self.reason}"
