"""The jinja2 sandbox templates render in: an ``ImmutableSandboxedEnvironment`` with
``StrictUndefined`` whose attribute and item access reads plain data only (mapping keys, list
indexes, loop counters), with no globals and only the output filters of each kind (``yaml``,
``shquote``) and ``length``.

Every body is parsed here and passed through the static check (``grammar``) before it is
compiled, so a body outside the grammar never reaches the environment's compiler.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateError, TemplateRuntimeError, Undefined, nodes
from jinja2 import Template as CompiledTemplate
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from controlplane.templates.base import BodyError
from controlplane.templates.grammar import LOOP_ATTRS, TESTS, check_body


class _DataSandbox(ImmutableSandboxedEnvironment):
    """Templates read plain data only: ``a.b`` and ``a["b"]`` are mapping keys, ``a[0]`` a list
    index, ``loop.index`` a loop counter. Every other attribute (so every method and dunder) is
    refused here, whatever the static check let through."""

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(obj, Mapping) and isinstance(argument, str):
            return obj[argument] if argument in obj else self.undefined(obj=obj, name=argument)
        if isinstance(obj, list) and type(argument) is int:
            if -len(obj) <= argument < len(obj):
                return obj[argument]
            return self.undefined(obj=obj, name=str(argument))
        if isinstance(obj, LoopContext) and argument in LOOP_ATTRS:
            return getattr(obj, argument)
        return self.unsafe_undefined(obj, str(argument))

    def getattr(self, obj: Any, attribute: str) -> Any:
        return self.getitem(obj, attribute)


def _defined(value: Any) -> Any:
    if isinstance(value, Undefined):
        str(value)  # raises the undefined or security error that names the missing key
    return value


def _is_data(value: Any) -> bool:
    if value is None or type(value) in (str, int, bool):
        return True
    if isinstance(value, list):
        return all(_is_data(item) for item in value)
    if isinstance(value, dict):
        return all(type(k) is str and _is_data(v) for k, v in value.items())
    return False


def _escape(char: str) -> str:
    return f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}"


def _yaml_filter(value: Any) -> str:
    """A YAML flow scalar or collection: JSON is valid YAML, and a JSON string is one
    double-quoted scalar however hostile its text, so a value can never add structure."""
    if not _is_data(_defined(value)):
        raise TemplateRuntimeError(f"yaml takes plain data, not a {type(value).__name__}")
    # Not ensure_ascii: PyYAML reads a JSON surrogate pair as two lone surrogates. JSON leaves
    # NEL and U+2028 raw, which YAML would fold as line breaks, so every unprintable character
    # (only ever inside a string) becomes a YAML escape.
    text = json.dumps(value, ensure_ascii=False)
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _shquote_one(value: Any) -> str:
    if type(value) is int:
        return str(value)
    if type(value) is str:
        return shlex.quote(value)
    raise TemplateRuntimeError(f"shquote takes strings, integers or lists of them, not "
                               f"{type(value).__name__} (test booleans with {{% if %}})")


def _shquote_filter(value: Any) -> str:
    """One shell word per value; a list becomes space-separated words."""
    if isinstance(_defined(value), list):
        return " ".join(_shquote_one(item) for item in value)
    return _shquote_one(value)


_FILTERS: dict[str, dict[str, Any]] = {
    "dsn": {"yaml": _yaml_filter, "length": len},
    "job": {"shquote": _shquote_filter, "length": len},
}


def _environment(kind: str) -> _DataSandbox:
    env = _DataSandbox(undefined=StrictUndefined, autoescape=False, trim_blocks=True,
                       lstrip_blocks=True, keep_trailing_newline=True, auto_reload=False)
    env.globals.clear()  # no range, lipsum, cycler, joiner, namespace, dict
    env.filters = dict(_FILTERS[kind])
    env.tests = {name: env.tests[name] for name in TESTS}
    return env


_ENVIRONMENTS = {kind: _environment(kind) for kind in _FILTERS}


def parse_body(kind: str, body: str) -> nodes.Template:
    """The checked syntax tree of a body, or BodyError listing every problem by line."""
    try:
        tree = _ENVIRONMENTS[kind].parse(body)
    except TemplateError as exc:
        raise BodyError([(getattr(exc, "lineno", None), str(exc))]) from None
    except RecursionError:
        raise BodyError([(None, "the body is nested too deeply")]) from None
    check_body(tree, kind, _FILTERS[kind])
    return tree


@lru_cache(maxsize=64)
def compiled_body(kind: str, body: str) -> CompiledTemplate:
    return _ENVIRONMENTS[kind].from_string(parse_body(kind, body))
