"""What the ``dsn`` commands share: parameter types, and how a command reports a failure."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import IO, Any, TypeVar

import click

from common.errors import DsnError
from common.restclient import parse_base_urls

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def one_for_each(values: Sequence[T], count: int) -> list[T] | None:
    """``values`` for ``count`` places (keys for endpoints, say): given once for all of them, or
    once each in order; None when neither, for the caller to say so in its own terms."""
    if len(values) == 1:
        return list(values) * count
    return list(values) if len(values) == count else None


class ShapeParam(click.ParamType[tuple[int, int]]):
    """``ROWSxCOLS``, e.g. ``32x32``."""

    name = "ROWSxCOLS"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        match = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", str(value))
        if not match or int(match[1]) < 1 or int(match[2]) < 1:
            self.fail(f"{value!r} is not ROWSxCOLS with two positive integers, e.g. 32x32",
                      param, ctx)
        return int(match[1]), int(match[2])


class ControlPlaneURLs(click.ParamType[tuple[str, ...]]):
    """The control plane's URL, or its replicas' URLs comma-separated
    (``https://cp1:8750,https://cp2:8750``): each ``http(s)://HOST:PORT``, none twice. A bad list
    is one ``error: ...`` line naming the option, as any error the user can act on."""

    name = "URL[,URL...]"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_base_urls(str(value))
        except ValueError as exc:
            option = param.opts[0] if param is not None and param.opts else "the control plane"
            raise OneLineError(f"{option}: {exc}") from None


# How every --controlplane (and `dsn admin --url`) help text describes the list form.
CONTROLPLANE_URLS_HELP = ("The control plane, http(s)://HOST:PORT; where it runs as several "
                          "replicas, all their URLs comma-separated: a call that cannot connect "
                          "to one goes to the next.")


def scan_shape_option(default: str) -> Callable[[F], F]:
    """``--scan-shape ROWSxCOLS``, shared by every command that streams a scan."""
    return click.option("--scan-shape", type=ShapeParam(), default=default, show_default=True,
                        help="Scan positions as ROWSxCOLS.")


def template_params(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``--param NAME=VALUE`` pairs; a value is JSON where it parses (64, true, ["10.0.0.0/8"]),
    else the plain string."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--param")
        try:
            params[name] = json.loads(text)
        except ValueError:
            params[name] = text
    return params


class OneLineError(click.ClickException):
    """A failure the user can act on: one ``error: ...`` line on stderr, exit status 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {' '.join(self.message.split())}", err=True)


class ReportingGroup(click.Group):
    """A command group whose commands report every ``DsnError`` as one ``error: ...`` line
    instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DsnError as exc:
            raise OneLineError(str(exc)) from None
