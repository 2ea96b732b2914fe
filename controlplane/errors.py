"""The control plane's one exception tree. Each class carries its HTTP status and problem type; the
error middleware turns any of them into an RFC 9457 problem+json response in one place.

Messages are safe to show to the caller: they name the claim, field or rule at fault, never a token,
a key or a stack trace.
"""

from __future__ import annotations

from common.errors import DsnError


class ControlPlaneError(DsnError):
    status = 500
    title = "Internal error"
    type_slug = "internal"

    def __init__(self, detail: str = "", *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = headers or {}


class BadRequest(ControlPlaneError):
    status, title, type_slug = 400, "Bad request", "bad-request"

    def __init__(self, detail: str = "", *, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(detail)
        self.errors = errors or []  # field-level: [{"field": "params.port", "message": "..."}]


class Unauthorized(ControlPlaneError):
    """No usable credentials: a missing, malformed, forged, expired or revoked token."""

    status, title, type_slug = 401, "Unauthorized", "unauthorized"

    def __init__(self, detail: str = "", *, reason: str = "invalid_token") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": f'Bearer error="{reason}"'})
        self.reason = reason


class TokenError(Unauthorized):
    """A token that fails verification; ``reason`` is a stable label for audit and metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail, reason="invalid_token")
        self.token_reason = reason


class Forbidden(ControlPlaneError):
    """Authenticated, but the policy denies the action; ``rule`` names the deciding rule."""

    status, title, type_slug = 403, "Forbidden", "forbidden"

    def __init__(self, detail: str = "", *, rule: str = "") -> None:
        super().__init__(detail)
        self.rule = rule


class NotFound(ControlPlaneError):
    status, title, type_slug = 404, "Not found", "not-found"


class Conflict(ControlPlaneError):
    status, title, type_slug = 409, "Conflict", "conflict"


class PreconditionFailed(ControlPlaneError):
    status, title, type_slug = 412, "Precondition failed", "precondition-failed"


class PayloadTooLarge(ControlPlaneError):
    status, title, type_slug = 413, "Payload too large", "payload-too-large"


class TooManyRequests(ControlPlaneError):
    status, title, type_slug = 429, "Too many requests", "rate-limited"

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after_s))})


class Unavailable(ControlPlaneError):
    """The store or the audit sink cannot take a write: refuse rather than act unaudited."""

    status, title, type_slug = 503, "Service unavailable", "unavailable"

    def __init__(self, detail: str, *, retry_after_s: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after_s))})


class ConfigurationError(ControlPlaneError):
    """A bad state directory, policy file or setting, found at start-up or reload."""

    title, type_slug = "Configuration error", "configuration"


class UnsupportedMediaType(ControlPlaneError):
    """A request body that is not ``application/json``."""

    status, title, type_slug = 415, "Unsupported media type", "unsupported-media-type"


class LaunchFailed(ControlPlaneError):
    """The scheduler answered but refused the request (e.g. ``sbatch`` rejected the job)."""

    status, title, type_slug = 502, "Job launch failed", "job-launch-failed"
