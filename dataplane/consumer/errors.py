"""The consumer's exception tree: every error that stops a consumer job is a ConsumerError."""

from __future__ import annotations


class ConsumerError(Exception):
    """A consumer job cannot go on; the message names the bad value."""


class SetupError(ConsumerError):
    """The job's configuration, rank layout or input files do not fit together."""


class JoinError(SetupError):
    """The ranks could not all join the session. Every rank raises it, so none waits for another."""


class MembershipError(ConsumerError):
    """The gateway routes a scan to a member list that does not match this job's ranks."""


class WriteError(ConsumerError):
    """A scan's output file could not be written."""


class ControlPlaneError(ConsumerError):
    """A control-plane call failed; ``status`` is the HTTP status (None: no usable answer).

    ``retryable`` marks the failures worth another attempt: no answer, 429 and 5xx. A 4xx is the
    control plane refusing the request, and asking again would be refused again.
    """

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status == 429 or self.status >= 500
