"""What every template module shares: the template kinds, the strict base of every declaration
and system-values model, and how a rejected input becomes an ``InvalidRequest`` whose ``errors``
name each field at fault.
"""

from __future__ import annotations

from typing import Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, ValidationError

from controlplane.errors import InvalidRequest

Kind = Literal["dsn", "job"]
# {"field", "message"} and, once located in the template's text, "line" (1 = the file's first).
# Until then a body problem carries "body_line", its line within the body.
FieldErrors: TypeAlias = list[dict[str, Any]]


class BodyError(ValueError):
    """Problems of a body, each with its line in the body (1 = the body's first line) when known;
    the message lists them all, so callers that print only the message lose nothing."""

    def __init__(self, problems: list[tuple[int | None, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(message if line is None else f"line {line}: {message}"
                                   for line, message in problems))


class Strict(BaseModel):
    """Unknown keys are refused and nothing is coerced: a typo in a declaration is an error
    naming the field, never a silently ignored setting."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def show(value: Any) -> str:
    """A value for an error message: its repr, cut short (user input can be long)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def field_errors(exc: ValidationError, prefix: str) -> FieldErrors:
    """A pydantic error as field errors, each field a dotted path under ``prefix``; a body's
    problems become one error each, with its line in the body."""
    errors: FieldErrors = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        field = ".".join([prefix, *loc] if prefix else loc) or "(top level)"
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, BodyError):
            errors += [{"field": field, "message": message,
                        **({} if line is None else {"body_line": line})}
                       for line, message in cause.problems]
            continue
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        errors.append({"field": field, "message": message})
    return errors


def _at(error: dict[str, Any]) -> str:
    return f" (line {error['line']})" if "line" in error else ""


def invalid(what: str, errors: FieldErrors) -> InvalidRequest:
    """``errors`` summed up in the message too, for callers that print only the message."""
    summary = "; ".join(f"{e['field']}{_at(e)}: {e['message']}" for e in errors)
    return InvalidRequest(f"{what}: {summary}", errors=errors)

