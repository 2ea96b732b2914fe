"""Service configuration files: YAML whose keys are the fields of a frozen settings dataclass.

``dsn controlplane serve --config FILE`` reads its settings here (the gateway's file is a DSN
configuration, ``common.config``). Nothing is declared twice: the keys a file may hold and their
types come from the dataclass's own fields and annotations, so a field added to the dataclass is a
key of the file from then on.
A ``Layout`` says how the fields are written:

- a field ``GROUP_REST`` whose prefix is one of the layout's ``groups`` is written inside a mapping
  ``GROUP: {REST: ...}`` (the control plane's ``audit_checkpoint_s`` is ``audit.checkpoint_s``);
- ``renamed`` gives a field another dotted key, as deep as it likes (the control plane's
  ``launcher`` is ``launcher.name``, and ``slurm_timeout_s`` is ``launcher.slurm.timeout_s``);
- ``internal`` fields are never read from a file (an injected clock, the names tokens carry);
- every other field is a top-level key of its own name.

Values are checked by type, strictly (``"30"`` is not ``30``, ``yes`` is not a string; a float
setting accepts ``10``), unknown keys are refused, and every error names the file and the dotted
key. Relative paths resolve against the file's directory, so a file means the same wherever the
service is started from. Range and consistency checks stay in the dataclass, which reports the
field at fault; ``Given.where`` turns that field back into the key or option the value came from.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import click
from click.core import ParameterSource
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from common import strictyaml
from common.errors import DsnError, InvalidSetting

MAX_FILE_BYTES = 256 * 1024
T = TypeVar("T")


class SettingsError(DsnError):
    """Settings that cannot be used: a file that cannot be read, a key it should not hold, a value
    of the wrong kind or out of bounds. The message names the file and key, or the option, at
    fault."""


@dataclass(frozen=True)
class Layout:
    """How the fields of one settings dataclass are written in a file (see the module doc)."""

    groups: frozenset[str] = frozenset()
    renamed: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    internal: frozenset[str] = frozenset()

    def key(self, name: str) -> str:
        """The dotted file key of field ``name``."""
        if name in self.renamed:
            return self.renamed[name]
        group, sep, rest = name.partition("_")
        return f"{group}.{rest}" if sep and rest and group in self.groups else name

    def keys(self, cls: type) -> dict[str, str]:
        """Field name -> dotted file key, for every field a file may set."""
        return {f.name: self.key(f.name) for f in dataclasses.fields(cls)
                if f.name not in self.internal}


@dataclass(frozen=True)
class Given:
    """Setting values (field name -> value) with where each was given, for messages."""

    values: Mapping[str, Any] = field(default_factory=dict)
    origins: Mapping[str, str] = field(default_factory=dict)

    def over(self, lower: Given) -> Given:
        """These values, and ``lower``'s where these have none."""
        return Given({**lower.values, **self.values}, {**lower.origins, **self.origins})

    def where(self, name: str) -> str:
        """Where field ``name`` was given (``FILE: dotted.key``, ``--option``), else its name."""
        return self.origins.get(name, name)

    def build(self, cls: Callable[..., T]) -> T:
        """``cls`` from these values; a value it refuses is named as it was given."""
        try:
            return cls(**self.values)
        except InvalidSetting as exc:
            raise SettingsError(exc.named(self.where(exc.key))) from None


def options_given(ctx: click.Context, fields: Collection[str]) -> Given:
    """The options named after ``fields`` that were given on the command line or in the
    environment, which override a file; an option left at its default does not."""
    values, origins = {}, {}
    for param in ctx.command.params:
        name = param.name or ""
        source = ctx.get_parameter_source(name)
        if name in fields and source in (ParameterSource.COMMANDLINE,
                                         ParameterSource.ENVIRONMENT):
            values[name] = ctx.params[name]
            origins[name] = _origin(ctx, param, source)
    return Given(values, origins)


def _origin(ctx: click.Context, param: click.Parameter, source: ParameterSource) -> str:
    if source is not ParameterSource.ENVIRONMENT:
        return param.opts[0]
    if isinstance(param.envvar, str):
        return f"${param.envvar}"
    return f"${ctx.auto_envvar_prefix}_{(param.name or '').upper()}"


def read_settings(path: Path, cls: type, layout: Layout) -> Given:
    """The settings ``path`` gives for dataclass ``cls``: only the keys it holds, typed, relative
    paths resolved against its directory. An empty file gives nothing."""
    try:
        data = strictyaml.load_file(path, MAX_FILE_BYTES)
    except strictyaml.FileError as exc:
        raise SettingsError(str(exc)) from None
    if data is None:
        return Given()
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: must be a mapping of settings, not {_kind(data)}")
    if (odd := _first_not_plain(data)) is not None:
        key, value = odd
        raise SettingsError(f"{path}: {key}: {value!r} is a {_kind(value)}; settings are "
                                "strings, numbers, booleans, lists and mappings (quote it)")
    try:
        # JSON mode: strict scalars, yet a string is a path and a list a tuple, as a file means.
        model = _model(cls, layout).model_validate_json(json.dumps(data), strict=True)
    except ValidationError as exc:
        raise SettingsError(f"{path}: {_describe(exc)}") from None
    values = _flatten(model, layout.keys(cls), path.resolve().parent)
    return Given(values, {name: f"{path}: {layout.key(name)}" for name in values})


def _first_not_plain(data: Any, key: str = "") -> tuple[str, object] | None:
    """The first value JSON cannot carry (a YAML date, binary, a non-string key), with its key."""
    if isinstance(data, dict):
        for name, value in data.items():
            where = f"{key}.{name}" if key else str(name)
            found = (where, name) if not isinstance(name, str) else _first_not_plain(value, where)
            if found:
                return found
        return None
    if isinstance(data, list):
        return next(filter(None, (_first_not_plain(v, f"{key}.{i}") for i, v in
                                  enumerate(data))), None)
    plain = data is None or isinstance(data, str | int | float | bool)
    return None if plain else (key, data)


_KINDS: Mapping[type, str] = MappingProxyType({dict: "mapping", list: "list", str: "string"})


def _kind(value: object) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def _model(cls: type, layout: Layout) -> type[BaseModel]:
    """A pydantic model shaped like the file: a field per key, a nested model per group.

    Every field defaults to None, never validated: only the keys the file holds are read back
    (``model_fields_set``), so an explicit ``null`` is checked against the field's own type.
    """
    hints = typing.get_type_hints(cls)
    tree: dict[str, Any] = {}
    for name, key in layout.keys(cls).items():
        *groups, leaf = key.split(".")
        node = tree
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = hints[name]
    return _group_model(f"{cls.__name__}_file", tree)


def _group_model(name: str, tree: Mapping[str, Any]) -> type[BaseModel]:
    fields: dict[str, Any] = {
        key: (_group_model(f"{name}_{key}", sub) if isinstance(sub, dict) else sub, None)
        for key, sub in tree.items()}
    return create_model(name, __config__=ConfigDict(extra="forbid", frozen=True), **fields)


def _flatten(model: BaseModel, keys: Mapping[str, str], base_dir: Path) -> dict[str, Any]:
    values = {}
    for name, key in keys.items():
        node: Any = model
        for part in key.split("."):
            if node is None or part not in node.model_fields_set:
                break
            node = getattr(node, part)
        else:
            relative = isinstance(node, Path) and not node.is_absolute()
            values[name] = (base_dir / node).resolve() if relative else node
    return values


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key")
        else:
            lines.append(f"{where}: {err['msg']} (got {err.get('input')!r:.80})")
    return "; ".join(lines)
