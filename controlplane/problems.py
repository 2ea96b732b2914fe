"""Errors as HTTP answers: the one table from the control plane's exceptions to RFC 9457 problems,
and, for the OAuth form of the token endpoint, the table to RFC 6749 §5.2 error codes.

An exception answers with the entry of the nearest class in its MRO that a table lists, so a
new subclass answers like its parent until it is given an entry of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from controlplane.errors import (
    ConfigurationError,
    Conflict,
    ControlPlaneError,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    KeysUnavailable,
    LaunchFailed,
    NoScanFile,
    NotFound,
    PermissionDenied,
    PictureError,
    PreconditionFailed,
    PreconditionRequired,
    RateLimited,
    ScanFileChanged,
    TokenError,
    Unavailable,
    UnsupportedGrantType,
    UnsupportedMediaType,
)

PROBLEM_TYPE_PREFIX: Final = "urn:dsn:problem:"


@dataclass(frozen=True)
class ProblemType:
    status: int
    title: str
    slug: str  # the problem type is PROBLEM_TYPE_PREFIX + slug


PROBLEM_TYPES: Final[dict[type[ControlPlaneError], ProblemType]] = {
    ControlPlaneError: ProblemType(500, "Internal error", "internal"),
    InvalidRequest: ProblemType(400, "Bad request", "bad-request"),
    TokenError: ProblemType(401, "Unauthorized", "unauthorized"),
    PermissionDenied: ProblemType(403, "Forbidden", "forbidden"),
    NotFound: ProblemType(404, "Not found", "not-found"),
    NoScanFile: ProblemType(404, "No file for this scan", "no-scan-file"),
    Conflict: ProblemType(409, "Conflict", "conflict"),
    ScanFileChanged: ProblemType(409, "Scan file changed since it was reported",
                                 "scan-file-changed"),
    PreconditionFailed: ProblemType(412, "Precondition failed", "precondition-failed"),
    UnsupportedMediaType: ProblemType(415, "Unsupported media type", "unsupported-media-type"),
    PictureError: ProblemType(422, "Unprocessable scan file", "unprocessable-scan-file"),
    PreconditionRequired: ProblemType(428, "Precondition required", "precondition-required"),
    RateLimited: ProblemType(429, "Too many requests", "rate-limited"),
    ConfigurationError: ProblemType(500, "Configuration error", "configuration"),
    LaunchFailed: ProblemType(502, "Job launch failed", "job-launch-failed"),
    Unavailable: ProblemType(503, "Service unavailable", "unavailable"),
}


# RFC 8693 §2.2.2: a subject token that is invalid for any reason, or unacceptable by policy, is
# ``invalid_request`` (the audit record keeps the precise reason). Busy answers keep their status.
OAUTH_ERRORS: Final[dict[type[ControlPlaneError], tuple[int, str]]] = {
    ControlPlaneError: (500, "server_error"),
    InvalidRequest: (400, "invalid_request"),
    InvalidScope: (400, "invalid_scope"),
    InvalidTarget: (400, "invalid_target"),
    UnsupportedGrantType: (400, "unsupported_grant_type"),
    TokenError: (400, "invalid_request"),
    KeysUnavailable: (503, "temporarily_unavailable"),
    PermissionDenied: (400, "invalid_request"),
    NotFound: (400, "invalid_request"),
    Conflict: (400, "invalid_request"),
    RateLimited: (429, "temporarily_unavailable"),
    Unavailable: (503, "temporarily_unavailable"),
}


def oauth_error(exc: ControlPlaneError) -> tuple[int, str]:
    """The status and RFC 6749 error code answering ``exc`` at the OAuth token endpoint."""
    return next(OAUTH_ERRORS[cls] for cls in type(exc).__mro__ if cls in OAUTH_ERRORS)


def problem_type(exc: ControlPlaneError) -> ProblemType:
    # The root is in the table, so every ControlPlaneError finds an entry.
    return next(PROBLEM_TYPES[cls] for cls in type(exc).__mro__ if cls in PROBLEM_TYPES)


def problem_headers(exc: ControlPlaneError, *, bearer: bool = True) -> dict[str, str]:
    """What the status obliges the answer to say besides the body (``bearer``: the credential
    was a bearer token, so a token failure is a 401 challenge)."""
    if bearer and isinstance(exc, TokenError):
        return {"WWW-Authenticate": 'Bearer error="invalid_token"'}
    if exc.retry_after_s is not None:
        return {"Retry-After": str(exc.retry_after_s)}
    return {}


def field_errors(exc: ControlPlaneError) -> list[dict[str, Any]]:
    return exc.errors if isinstance(exc, InvalidRequest) else []
