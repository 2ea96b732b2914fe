"""The root of every error the dsn packages raise on purpose.

Each package has one root below it (``ControlPlaneError``, ``GatewayError``, ``DataPlaneError``,
``DemoError``), and this package's own errors derive from it directly. ``str(error)`` is a message
that is safe to show: it names the value, file or rule at fault, never a token or a key.
"""

from __future__ import annotations


class DsnError(Exception):
    """Something the caller can act on; the message says what and where."""
