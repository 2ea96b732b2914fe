"""The control plane's exception tree: what went wrong, in the service's own terms.

No class here knows HTTP. ``controlplane.problems`` maps each one to a status and a problem type in
one table, and the error middleware answers with RFC 9457 problem+json from it; the admin commands
print the same messages as one line.

Messages are safe to show to the caller: they name the claim, field or rule at fault, never a token,
a key or a stack trace.
"""

from __future__ import annotations

from typing import Any, ClassVar

from common.errors import DsnError


class ControlPlaneError(DsnError):
    """The root; on its own, a failure inside the service that the caller cannot fix.

    ``retry_after_s``, where set, is when asking again may succeed.
    """

    retry_after_s: int | None = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidRequest(ControlPlaneError):
    """A request whose values break the rules; ``errors`` names the fields at fault."""

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.errors = errors or []  # [{"field": "params.port", "message": "...", "line"?: 3}]


class UnsupportedMediaType(InvalidRequest):
    """A request body that is not JSON."""


class InvalidScope(InvalidRequest):
    """A requested scope beyond what the caller may be granted (OAuth ``invalid_scope``)."""


class InvalidTarget(InvalidRequest):
    """An audience or resource this service issues no tokens for (OAuth ``invalid_target``)."""


class UnsupportedGrantType(InvalidRequest):
    """A token request naming a grant this service does not handle."""


class TokenError(ControlPlaneError):
    """No usable credentials. Each subclass is one way a token fails, with ``reason``, a stable
    label for the audit log and the metrics."""

    reason: ClassVar[str] = "invalid_token"


class MissingToken(TokenError):
    reason = "missing"


class MalformedToken(TokenError):
    reason = "malformed"


class InvalidHeader(TokenError):
    reason = "header"


class InvalidAlgorithm(TokenError):
    reason = "algorithm"


class UnknownKey(TokenError):
    reason = "unknown_key"


class InvalidSignature(TokenError):
    reason = "signature"


class MissingClaim(TokenError):
    reason = "missing_claim"


class InvalidClaim(TokenError):
    reason = "invalid_claim"


class InvalidIssuer(TokenError):
    reason = "issuer"


class InvalidAudience(TokenError):
    reason = "audience"


class WrongKind(TokenError):
    reason = "kind"


class LifetimeTooLong(TokenError):
    reason = "lifetime"


class KeysUnavailable(TokenError):
    """An outside issuer's keys cannot be had (never fetched, or too long unreachable)."""

    reason = "issuer_keys"


class ExpiredToken(TokenError):
    reason = "expired"


class ImmatureToken(TokenError):
    reason = "immature"


class RevokedToken(TokenError):
    reason = "revoked"


class UnknownProject(TokenError):
    reason = "unknown_project"


class UnknownAdmin(TokenError):
    """An admin token whose ``sub`` names no active admin (removed, or never added)."""

    reason = "unknown_admin"


class SignedOut(TokenError):
    """The console session a cookie names has ended, expired or never existed."""

    reason = "console_session"


class PermissionDenied(ControlPlaneError):
    """Authenticated, but the policy denies the action; ``rule`` names the deciding rule."""

    def __init__(self, detail: str, *, rule: str = "") -> None:
        super().__init__(detail)
        self.rule = rule


class UnmappedIdentity(PermissionDenied):
    """A verified outside identity that no rule of the federation maps to a project; ``principal``
    names it for the audit record."""

    def __init__(self, detail: str, *, principal: str, rule: str, action: str) -> None:
        super().__init__(detail, rule=rule)
        self.principal = principal
        self.action = action


class CsrfRefused(PermissionDenied):
    """A state change from the console without the session's CSRF token, or from another
    origin."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, rule="csrf")


class NotFound(ControlPlaneError):
    """The resource named does not exist (or is not the caller's to see)."""


class Conflict(ControlPlaneError):
    """The request contradicts the current state: a duplicate, a quota reached, a lapsed lease."""

    def __init__(self, detail: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class PreconditionFailed(ControlPlaneError):
    """The version the caller based its change on is no longer the current one (a lost update)."""


class PreconditionRequired(ControlPlaneError):
    """A change that must name the version it is based on did not."""


class RateLimited(ControlPlaneError):
    """Too many requests for the token or its project; ``retry_after_s`` says when to come back."""

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = max(1, retry_after_s)


class Unavailable(ControlPlaneError):
    """The store or the audit sink cannot take a write: refuse rather than act unaudited."""

    def __init__(self, detail: str, *, retry_after_s: int = 1) -> None:
        super().__init__(detail)
        self.retry_after_s = max(1, retry_after_s)


class ConfigurationError(ControlPlaneError):
    """A bad state directory, policy file or setting, found at start-up or reload."""


class LaunchFailed(ControlPlaneError):
    """The scheduler answered but refused the request (e.g. ``sbatch`` rejected the job)."""


class PictureError(ControlPlaneError):
    """A scan's file or events that cannot be made into pictures: not the electron-counted layout
    the consumer writes, unreadable, inconsistent, or beyond the configured bounds."""


class NoScanFile(NotFound):
    """A scan with no file this service may read: none reported, none there any more, or one
    outside the jobs directory (refused before anything in it is read)."""


class ScanFileChanged(Conflict):
    """A scan's file whose contents are no longer those reported: its SHA-256 differs."""
