"""The consumer's exception tree: every error that stops a consumer job is a ConsumerError."""

from __future__ import annotations

from dataplane.errors import DataPlaneError


class ConsumerError(DataPlaneError):
    """A consumer job cannot go on; the message names the bad value."""


class SetupError(ConsumerError):
    """The job's configuration, rank layout or input files do not fit together."""


class JoinError(SetupError):
    """The ranks could not all join the session. Every rank raises it, so none waits for another."""


class MembershipError(ConsumerError):
    """The gateway routes a scan to a member list that does not match this job's ranks."""


class WriteError(ConsumerError):
    """A scan's output file could not be written."""
