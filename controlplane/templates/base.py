"""What every template module shares: the template kinds, the strict base of every declaration
and system-values model, and how a rejected input becomes an ``InvalidRequest`` whose ``errors``
name each field at fault.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from controlplane.errors import InvalidRequest

Kind = Literal["dsn", "job"]


class Strict(BaseModel):
    """Unknown keys are refused and nothing is coerced: a typo in a declaration is an error
    naming the field, never a silently ignored setting."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def show(value: Any) -> str:
    """A value for an error message: its repr, cut short (user input can be long)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def field_errors(exc: ValidationError, prefix: str) -> list[dict[str, str]]:
    """A pydantic error as field errors, each field a dotted path under ``prefix``."""
    errors = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        errors.append({"field": ".".join([prefix, *loc] if prefix else loc) or "(top level)",
                       "message": message})
    return errors


def invalid(what: str, errors: list[dict[str, str]]) -> InvalidRequest:
    """``errors`` summed up in the message too, for callers that print only the message."""
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return InvalidRequest(f"{what}: {summary}", errors=errors)

