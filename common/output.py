"""How commands print answers: aligned tables for people, ``--json`` for scripts."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import click

Columns = list[tuple[str, str]]  # (key in the answer, column header)


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={cell(v)}" for k, v in value.items()) or "-"
    return str(value)


def show(rows: list[dict[str, Any]], columns: Columns, *, as_json: bool,
         single: bool = False) -> None:
    """Rows as JSON (one object when ``single``) or as a table."""
    if as_json:
        echo_json(rows[0] if single else rows)
    else:
        table(rows, columns)


def table(rows: Iterable[dict[str, Any]], columns: Columns) -> None:
    """Print ``rows`` as aligned columns; missing values print as '-'."""
    cells = [[header for _key, header in columns]]
    cells += [[cell(row.get(key)) for key, _header in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def summary(fields: dict[str, Any], keys: Iterable[str]) -> str:
    """``key=value`` for each of ``keys`` that ``fields`` has."""
    return " ".join(f"{k}={cell(fields[k])}" for k in keys if k in fields)
