"""The gateway's exception tree: every error it raises on purpose is a GatewayError."""

from __future__ import annotations

from common.errors import DsnError


class GatewayError(DsnError):
    """A gateway that cannot start or run as configured; the message names the cause."""


class ModeError(GatewayError):
    """A forwarding mode that the configuration cannot support (e.g. L4 with several sessions)."""


class SocketSetupError(GatewayError):
    """An ingress or egress socket that could not be bound, connected or configured."""
