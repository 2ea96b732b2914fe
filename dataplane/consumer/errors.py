"""The consumer's exception tree: every error that stops a consumer job is a ConsumerError."""

from __future__ import annotations


class ConsumerError(Exception):
    """A consumer job cannot go on; the message names the bad value."""


class SetupError(ConsumerError):
    """The job's configuration, rank layout or input files do not fit together."""


class MembershipError(ConsumerError):
    """The gateway routes a scan to a member list that does not match this job's ranks."""


class WriteError(ConsumerError):
    """A scan's output file could not be written."""
