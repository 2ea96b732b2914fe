"""Admin-owned templates rendered with typed user parameters (SPEC §5; format: ``templates/README.md``).

A template is a YAML document: ``name``, ``kind`` (``dsn`` or ``job``), ``description``, typed
``parameters`` and a jinja2 ``body``. Users only ever choose parameter values; admins write bodies.

Defences, outermost first:

1. Parameter values are type-checked, bounded and checked against the policy before any rendering
   (``validate_params``); system values the control plane supplies are validated the same way
   (``validate_system``). No value may contain a newline or other control character.
2. Bodies are checked statically when a template is built: only output, ``if`` and non-nested
   ``for`` over ``params``/``system`` are allowed, every interpolation must end in ``| yaml`` (DSN)
   or ``| shquote`` (job), and no call, assignment, arithmetic, include, macro, unknown name,
   underscore or internal attribute may appear. A render bomb therefore cannot even be written.
3. Rendering runs in an ``ImmutableSandboxedEnvironment`` with ``StrictUndefined`` whose attribute
   and item access reads plain data only (mapping keys, list indexes, loop counters), under a time
   and output-size budget checked on every loop step and output chunk.
4. DSN output is re-read with a safe YAML loader (no aliases, no duplicate keys) and validated by
   ``common.config.parse_config``, the schema the gateway's own file uses; job output must be a
   ``#!`` script free of control characters.

Pure: no I/O except ``load_template``/``load_templates``, which read the shipped directory.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import shlex
import sysconfig
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from jinja2 import StrictUndefined, TemplateError, TemplateRuntimeError, Undefined, nodes
from jinja2 import Template as CompiledTemplate
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from common import strictyaml
from common.config import (
    BindEndpoint,
    ConfigError,
    ConnectEndpoint,
    CurveKey,
    DSNConfig,
    SessionId,
    parse_config,
    parse_endpoint,
)
from controlplane.errors import ConfigurationError, InvalidRequest, NotFound
from controlplane.policy import PolicySet

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
MAX_SOURCE_BYTES = 256 * 1024
MAX_BODY_CHARS = 64 * 1024
DEFAULT_MAX_SECONDS = 1.0
DEFAULT_MAX_BYTES = 64 * 1024
Kind = Literal["dsn", "job"]
KIND_DIRECTORIES: dict[Kind, str] = {"dsn": "dsn", "job": "jobs"}
ParamType = Literal["cidr_list", "host_list", "endpoint_list", "port", "int", "enum", "bool",
                    "string"]
_LISTS = frozenset({"cidr_list", "host_list", "endpoint_list"})
_APPLIES = {  # which declaration keys make sense for which parameter types
    "min": frozenset({"int", "port"}), "max": frozenset({"int", "port"}),
    "choices": frozenset({"enum"}), "pattern": frozenset({"string"}),
    "max_length": frozenset({"string"}), "min_items": _LISTS, "max_items": _LISTS,
    "network": _LISTS,
}
_NAME = re.compile(NAME_PATTERN)
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_URL = re.compile(r"^https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$"
                  r"|^https?://\[[0-9a-fA-F:.]+\](:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$")


def _show(value: Any) -> str:
    """A value for an error message: its repr, cut short (user input can be long)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _field_errors(exc: ValidationError, prefix: str) -> list[dict[str, str]]:
    errors = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        errors.append({"field": ".".join([prefix, *loc] if prefix else loc) or "(top level)",
                       "message": message})
    return errors


def _invalid(what: str, errors: list[dict[str, str]]) -> InvalidRequest:
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return InvalidRequest(f"{what}: {summary}", errors=errors)


# --- parameter values: one checker per type, each returning the canonical value ----------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Parameter(_Strict):
    """One typed parameter. ``default`` (or, for a required parameter, ``example``) must itself be
    a valid value: it is checked here for form and at save time against the policy."""

    type: ParamType
    description: str = Field(default="", max_length=1000)
    min: StrictInt | None = None
    max: StrictInt | None = None
    choices: list[StrictStr | StrictInt] | None = Field(default=None, min_length=1, max_length=256)
    pattern: StrictStr | None = Field(default=None, max_length=1000)
    max_length: StrictInt = Field(default=256, ge=1, le=4096)
    min_items: StrictInt = Field(default=1, ge=0, le=256)
    max_items: StrictInt = Field(default=16, ge=1, le=256)
    network: Literal["sources", "targets"] | None = None
    default: Any = None
    example: Any = None

    @model_validator(mode="after")
    def _coherent(self) -> Parameter:
        misplaced = [key for key, types in _APPLIES.items()
                     if key in self.model_fields_set and self.type not in types]
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)} do(es) not apply to a {self.type} parameter")
        require = _REQUIRES.get(self.type)
        if require is not None:
            require(self)
        for label, value in (("default", self.default), ("example", self.example)):
            if value is not None:
                try:
                    check_value(self, value, None)
                except ValueError as exc:
                    raise ValueError(f"{label}: {exc}") from None
        return self

    def bounds(self) -> tuple[int, int]:
        lo, hi = (1, 65_535) if self.type == "port" else (0, 0)
        return (lo if self.min is None else self.min, hi if self.max is None else self.max)


def _require_bounds(param: Parameter) -> None:
    if param.type == "int" and (param.min is None or param.max is None):
        raise ValueError("an int parameter needs both min and max")
    lo, hi = param.bounds()
    if lo > hi:
        raise ValueError(f"min {lo} is above max {hi}")
    if param.type == "port" and not 1 <= lo <= hi <= 65_535:
        raise ValueError("port bounds must lie within 1..65535")


def _require_choices(param: Parameter) -> None:
    choices = param.choices or []
    if not choices:
        raise ValueError("an enum parameter needs choices")
    if len({(type(c), c) for c in choices}) != len(choices):
        raise ValueError("choices lists a value twice")


def _require_pattern(param: Parameter) -> None:
    if param.pattern is None:
        raise ValueError("a string parameter needs a pattern (matched against the whole value)")
    try:
        re.compile(param.pattern)
    except re.error as exc:
        raise ValueError(f"pattern {param.pattern!r} is not a regular expression: {exc}") from None


def _require_network(param: Parameter) -> None:
    if param.network is None:
        raise ValueError(f"a {param.type} parameter needs network: sources or targets (the "
                         "policy list its values must lie in)")
    if param.min_items > param.max_items:
        raise ValueError(f"min_items {param.min_items} is above max_items {param.max_items}")


_REQUIRES = {"int": _require_bounds, "port": _require_bounds, "enum": _require_choices,
             "string": _require_pattern, "cidr_list": _require_network,
             "host_list": _require_network, "endpoint_list": _require_network}


def _in_policy(param: Parameter, item: str, policy: PolicySet | None) -> None:
    if policy is None:  # form-only check of a declaration; the policy applies at save and use
        return
    allowed = policy.source_allowed if param.network == "sources" else policy.target_allowed
    if not allowed(item):
        raise ValueError(f"{item} is outside the {param.network} networks the policy allows")


def _no_scope_or_mapping(address: ipaddress.IPv4Address | ipaddress.IPv6Address, text: str) -> None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        raise ValueError(f"{_show(text)} is IPv4-mapped IPv6; write the IPv4 form")


def _cidr(param: Parameter, value: Any, policy: PolicySet | None) -> str:
    if type(value) is not str:
        raise ValueError(f"{_show(value)} is not a CIDR string such as 10.1.0.0/16")
    if "%" in value:
        raise ValueError(f"{_show(value)}: scoped IPv6 networks are refused")
    if "/" not in value:
        raise ValueError(f"{_show(value)} has no prefix length (write e.g. {value}/32)")
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"{_show(value)} is not a CIDR network: {exc}") from None
    _no_scope_or_mapping(network.network_address, value)
    if str(network) != value:  # refuses netmask and hostmask forms, upper case, long IPv6
        raise ValueError(f"{_show(value)} is not in canonical form; write {network}")
    _in_policy(param, value, policy)
    return value


def _host(param: Parameter, value: Any, policy: PolicySet | None) -> str:
    if type(value) is not str or not value or len(value) > 253 or "%" in value:
        raise ValueError(f"{_show(value)} is not a host name or IP address")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        # A numeric last label (127.1, 2130706433) is an address to many resolvers: refuse it.
        if not _HOSTNAME.fullmatch(value) or value.rsplit(".", 1)[-1].isdigit():
            raise ValueError(f"{_show(value)} is not a lower-case host name or IP address") from None
    else:
        _no_scope_or_mapping(address, value)
        if str(address) != value:
            raise ValueError(f"{_show(value)} is not in canonical form; write {address}")
    _in_policy(param, value, policy)
    return value


def _endpoint(param: Parameter, value: Any, policy: PolicySet | None) -> str:
    if type(value) is not str or "%" in value:
        raise ValueError(f"{_show(value)} is not an endpoint such as tcp://10.1.2.3:6001")
    try:
        host, port = parse_endpoint(value)
    except ValueError as exc:
        raise ValueError(f"{_show(value)}: {exc}") from None
    address = ipaddress.ip_address(host)
    _no_scope_or_mapping(address, value)
    canonical = f"tcp://{address}:{port}" if address.version == 4 else f"tcp://[{address}]:{port}"
    if canonical != value:
        raise ValueError(f"{_show(value)} is not in canonical form; write {canonical}")
    _in_policy(param, host, policy)
    return value


def _items(param: Parameter, value: Any, policy: PolicySet | None) -> list[str]:
    if type(value) is not list:
        raise ValueError(f"must be a list, not {_show(value)}")
    if not param.min_items <= len(value) <= param.max_items:
        raise ValueError(f"has {len(value)} items; {param.min_items}..{param.max_items} allowed")
    check = _ITEM_CHECKS[param.type]
    items = [check(param, item, policy) for item in value]
    if len(set(items)) != len(items):
        raise ValueError("lists an item twice")
    return items


_ITEM_CHECKS = {"cidr_list": _cidr, "host_list": _host, "endpoint_list": _endpoint}


def _integer(param: Parameter, value: Any, policy: PolicySet | None) -> int:
    if type(value) is not int:  # refuses "5", 5.0 and True
        raise ValueError(f"must be an integer, not {_show(value)}")
    lo, hi = param.bounds()
    if not lo <= value <= hi:
        raise ValueError(f"{value} is outside {lo}..{hi}")
    return value


def _enum(param: Parameter, value: Any, policy: PolicySet | None) -> str | int:
    for choice in param.choices or []:
        if type(value) is type(choice) and value == choice:
            return choice
    raise ValueError(f"{_show(value)} is not one of {param.choices}")


def _boolean(param: Parameter, value: Any, policy: PolicySet | None) -> bool:
    if type(value) is not bool:
        raise ValueError(f"must be true or false, not {_show(value)}")
    return value


def _string(param: Parameter, value: Any, policy: PolicySet | None) -> str:
    if type(value) is not str:
        raise ValueError(f"must be a string, not {_show(value)}")
    if len(value) > param.max_length:
        raise ValueError(f"is {len(value)} characters long; at most {param.max_length}")
    if not value.isprintable():  # newlines, tabs, NEL, U+2028 and every other control character
        raise ValueError(f"{_show(value)} contains a newline or control character")
    if not re.fullmatch(param.pattern or "", value):
        raise ValueError(f"{_show(value)} does not match {param.pattern!r}")
    return value


_CHECKS = {"cidr_list": _items, "host_list": _items, "endpoint_list": _items, "port": _integer,
           "int": _integer, "enum": _enum, "bool": _boolean, "string": _string}


def check_value(param: Parameter, value: Any, policy: PolicySet | None) -> Any:
    """The canonical value, or ValueError naming the value; ``policy=None`` checks form only."""
    return _CHECKS[param.type](param, value, policy)


# --- the static body check -----------------------------------------------------------------------

_ROOTS = frozenset({"params", "system"})
_LOOP_ATTRS = frozenset({"index", "index0", "revindex", "revindex0", "first", "last", "length"})
_OUTPUT_FILTER: dict[str, str] = {"dsn": "yaml", "job": "shquote"}
_TESTS = frozenset({"defined", "none", "true", "false"})
# Python internals used in sandbox escapes: refused by name so the admin learns why at once (the
# sandbox refuses every non-data attribute at render time anyway).
_UNSAFE_ATTRS = frozenset({"mro", "format", "format_map", "func_globals", "func_code", "f_globals",
                           "f_locals", "f_builtins", "f_back", "gi_frame", "gi_code", "cr_frame",
                           "cr_code", "ag_frame", "ag_code", "tb_frame", "tb_next", "im_func",
                           "globals", "builtins", "subclasses"})
_ALLOWED = (nodes.Template, nodes.Output, nodes.TemplateData, nodes.Const, nodes.Name,
            nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Test, nodes.If, nodes.For,
            nodes.CondExpr, nodes.And, nodes.Or, nodes.Not, nodes.Compare, nodes.Operand,
            nodes.List, nodes.Tuple, nodes.Concat)
_FRIENDLY = {"Call": "calling a function or method", "Assign": "{% set %}",
             "AssignBlock": "{% set %}", "Macro": "{% macro %}", "CallBlock": "{% call %}",
             "Include": "{% include %}", "Import": "{% import %}", "FromImport": "{% import %}",
             "Extends": "{% extends %}", "Block": "{% block %}", "With": "{% with %}",
             "FilterBlock": "{% filter %}", "Slice": "slicing", "Keyword": "a keyword argument"}
_MAX_DEPTH = 64


@dataclass
class _BodyChecker:
    """Walks a parsed body and lists every construct outside the allowed subset."""

    kind: str
    problems: list[str]
    loop_names: set[str]
    loop_depth: int = 0

    def fail(self, node: nodes.Node, message: str) -> None:
        self.problems.append(f"line {node.lineno}: {message}")

    def visit(self, node: nodes.Node, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            self.fail(node, "expressions are nested too deeply")
            return
        if not isinstance(node, _ALLOWED):
            name = type(node).__name__
            what = "arithmetic" if isinstance(node, (nodes.BinExpr, nodes.UnaryExpr)) else \
                _FRIENDLY.get(name, name)
            self.fail(node, f"{what} is not allowed in templates")
            return
        handler = getattr(self, f"visit_{type(node).__name__}", None)
        if handler is None or handler(node, depth):
            for child in node.iter_child_nodes():
                self.visit(child, depth + 1)

    # Each handler returns True when the generic walk should still visit the node's children.

    def visit_Name(self, node: nodes.Name, depth: int) -> bool:
        allowed = _ROOTS | self.loop_names | ({"loop"} if self.loop_depth else set())
        if node.ctx == "load" and node.name not in allowed:
            self.fail(node, f"{node.name!r} is not available; templates see only params, system "
                            "and loop variables")
        return False

    def visit_Getattr(self, node: nodes.Getattr, depth: int) -> bool:
        self._key(node, node.attr, node.node)
        return True

    def visit_Getitem(self, node: nodes.Getitem, depth: int) -> bool:
        if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            self._key(node, node.arg.value, node.node)
        return True

    def _key(self, node: nodes.Node, key: str, owner: nodes.Node) -> None:
        if key.startswith("_") or not key.isidentifier() or key in _UNSAFE_ATTRS:
            self.fail(node, f"attribute {key!r} is not allowed")
        elif isinstance(owner, nodes.Name) and owner.name == "loop" and key not in _LOOP_ATTRS:
            self.fail(node, f"loop.{key} is not allowed; use one of {sorted(_LOOP_ATTRS)}")

    def visit_Filter(self, node: nodes.Filter, depth: int) -> bool:
        if node.name not in _FILTERS[self.kind]:
            self.fail(node, f"filter {node.name!r} is not allowed in a {self.kind} template; "
                            f"use {sorted(_FILTERS[self.kind])}")
        self._no_arguments(node)
        return True

    def visit_Test(self, node: nodes.Test, depth: int) -> bool:
        if node.name not in _TESTS:
            self.fail(node, f"test {node.name!r} is not allowed; use {sorted(_TESTS)}")
        self._no_arguments(node)
        return True

    def _no_arguments(self, node: nodes.Filter | nodes.Test) -> None:
        if node.args or node.kwargs or node.dyn_args or node.dyn_kwargs:
            self.fail(node, f"{node.name!r} takes no arguments here")

    def visit_Output(self, node: nodes.Output, depth: int) -> bool:
        last = _OUTPUT_FILTER[self.kind]
        for child in node.nodes:
            if not isinstance(child, nodes.TemplateData) and not (
                    isinstance(child, nodes.Filter) and child.name == last):
                self.fail(child, f"every value in a {self.kind} template must end in '| {last}'")
        return True

    def visit_For(self, node: nodes.For, depth: int) -> bool:
        if self.loop_depth:
            self.fail(node, "loops cannot be nested")
        if node.recursive:
            self.fail(node, "recursive loops are not allowed")
        if _root(node.iter) not in _ROOTS:
            self.fail(node, "a loop may only iterate over params or system values")
        targets = [node.target] if isinstance(node.target, nodes.Name) else \
            list(node.target.iter_child_nodes())
        for target in targets:
            if not isinstance(target, nodes.Name) or target.name in _ROOTS | {"loop"} \
                    or target.name.startswith("_"):
                self.fail(node, "a loop variable must be a plain new name")
            else:
                self.loop_names.add(target.name)
        self.visit(node.iter, depth + 1)
        self.loop_depth += 1
        for child in [node.target, *node.body, *([node.test] if node.test else [])]:
            self.visit(child, depth + 1)
        self.loop_depth -= 1
        for child in node.else_:
            self.visit(child, depth + 1)
        return False


def _root(node: nodes.Node) -> str | None:
    while isinstance(node, (nodes.Getattr, nodes.Getitem)):
        node = node.node
    return node.name if isinstance(node, nodes.Name) else None


# --- the sandbox ---------------------------------------------------------------------------------

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
        if isinstance(obj, LoopContext) and argument in _LOOP_ATTRS:
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
    env.tests = {name: env.tests[name] for name in _TESTS}
    return env


_ENVIRONMENTS = {kind: _environment(kind) for kind in _FILTERS}


def _parse_body(kind: str, body: str) -> nodes.Template:
    """The checked syntax tree of a body, or ValueError listing every problem."""
    try:
        tree = _ENVIRONMENTS[kind].parse(body)
    except TemplateError as exc:
        raise ValueError(f"line {getattr(exc, 'lineno', '?')}: {exc}") from None
    except RecursionError:
        raise ValueError("the body is nested too deeply") from None
    checker = _BodyChecker(kind, [], set())
    checker.visit(tree)
    if checker.problems:
        raise ValueError("; ".join(checker.problems))
    return tree


@lru_cache(maxsize=64)
def _compiled(kind: str, body: str) -> CompiledTemplate:
    return _ENVIRONMENTS[kind].from_string(_parse_body(kind, body))


# --- templates -----------------------------------------------------------------------------------

ParamName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


class Template(_Strict):
    """A template whose declarations are coherent and whose body passed the static check."""

    name: str = Field(pattern=NAME_PATTERN)
    kind: Kind
    description: str = Field(default="", max_length=2000)
    parameters: dict[ParamName, Parameter] = Field(default_factory=dict, max_length=64)
    body: str = Field(min_length=1, max_length=MAX_BODY_CHARS)

    @field_validator("body")
    @classmethod
    def _body_is_safe(cls, body: str, info: ValidationInfo) -> str:
        kind = info.data.get("kind")
        if kind is not None:  # else the kind's own error is reported
            _parse_body(kind, body)
        return body


def _load_yaml(text: str, field: str) -> Any:
    try:
        return strictyaml.load(text)
    except strictyaml.YAMLError as exc:
        message = " ".join(str(exc).split())
        raise _invalid("not valid YAML", [{"field": field, "message": message}]) from None


def parse_template(source_text: str) -> Template:
    """A template document (YAML) as a ``Template``; InvalidRequest lists every problem by field."""
    if not isinstance(source_text, str) or len(source_text.encode()) > MAX_SOURCE_BYTES:
        raise _invalid("template rejected", [
            {"field": "(top level)", "message": f"must be YAML text of at most "
                                                f"{MAX_SOURCE_BYTES} bytes"}])
    data = _load_yaml(source_text, "(top level)")
    try:
        return Template.model_validate(data)
    except ValidationError as exc:
        raise _invalid("template rejected", _field_errors(exc, "")) from None


# Checking a template costs milliseconds and every session open needs its template: a template's
# text decides the result, and Templates are frozen, so one parse per text serves every request.
parse_template_cached = functools.lru_cache(maxsize=128)(parse_template)


# --- system values -------------------------------------------------------------------------------

def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError("contains a newline or control character")
    return value


def _absolute(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{_show(value)} is not an absolute path")
    return _printable(value)


Argument = Annotated[StrictStr, Field(min_length=1, max_length=1024), AfterValidator(_printable)]
AbsolutePath = Annotated[StrictStr, Field(max_length=1024), AfterValidator(_absolute)]


class DSNSystem(_Strict):
    """What the control plane supplies to a DSN template: never chosen by the user directly."""

    session_id: SessionId
    client_key: CurveKey
    expires_at: AwareDatetime
    ingress: BindEndpoint
    server_secret_key_file: AbsolutePath
    consumers: list[ConnectEndpoint] = Field(default_factory=list, max_length=4096)


class JobSystem(_Strict):
    """What the control plane supplies to a job template."""

    session_id: SessionId
    job_id: StrictStr = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    ranks: StrictInt = Field(ge=1, le=4096)
    config_path: AbsolutePath
    output_dir: AbsolutePath
    token_file: AbsolutePath
    controlplane_url: StrictStr = Field(pattern=_URL.pattern, max_length=1024)
    consumer_command: list[Argument] = Field(min_length=1, max_length=16)
    mpiexec: list[Argument] = Field(default_factory=lambda: ["mpiexec"], min_length=1,
                                    max_length=16)


System = DSNSystem | JobSystem
_SYSTEM_MODELS: dict[str, type[DSNSystem | JobSystem]] = {"dsn": DSNSystem, "job": JobSystem}


def validate_system(kind: Kind, values: Mapping[str, Any], policy: PolicySet) -> System:
    """The control plane's values for a template of ``kind``, checked like user values: consumer
    endpoints must lie inside the policy's targets."""
    try:
        system = _SYSTEM_MODELS[kind].model_validate(dict(values))
    except ValidationError as exc:
        raise _invalid("invalid system values", _field_errors(exc, "system")) from None
    if isinstance(system, DSNSystem):
        outside = [c for c in system.consumers if not policy.target_allowed(parse_endpoint(c)[0])]
        if outside:
            raise _invalid("invalid system values", [
                {"field": "system.consumers",
                 "message": f"{', '.join(outside)} outside the targets the policy allows"}])
    return system


# --- validation and rendering --------------------------------------------------------------------

def _param_field(name: Any) -> str:
    return f"params.{name}" if isinstance(name, str) and re.fullmatch(r"[a-z0-9_]{1,32}", name) \
        else "params"


def validate_params(template: Template, values: Any, policy: PolicySet) -> dict[str, Any]:
    """Every declared parameter's canonical value (user's, else default); InvalidRequest lists every
    bad, unknown or missing parameter under ``params.<name>``."""
    if not isinstance(values, Mapping):
        raise _invalid("invalid parameters", [
            {"field": "params", "message": f"must be an object, not {_show(values)}"}])
    known = sorted(template.parameters)
    errors = [{"field": _param_field(name),
               "message": f"unknown parameter {_show(name)}; {template.name} takes {known}"}
              for name in values if name not in template.parameters]
    result: dict[str, Any] = {}
    for name, param in template.parameters.items():
        value = values.get(name, param.default)
        if value is None:
            errors.append({"field": f"params.{name}", "message": "required"})
            continue
        try:
            result[name] = check_value(param, value, policy)
        except ValueError as exc:
            errors.append({"field": f"params.{name}", "message": str(exc)})
    if errors:
        raise _invalid(f"invalid parameters for template {template.name!r}", errors)
    return result


class _RenderLimit(Exception):
    """The render ran out of time or output budget."""


class _Budget:
    """Time and output bytes left for one render; checked on every loop step and output chunk."""

    def __init__(self, max_seconds: float, max_bytes: int) -> None:
        self.deadline = time.monotonic() + max_seconds
        self.max_seconds = max_seconds
        self.bytes_left = max_bytes
        self.max_bytes = max_bytes

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _RenderLimit(f"rendering took longer than {self.max_seconds} s")

    def spend(self, size: int) -> None:
        self.bytes_left -= size
        if self.bytes_left < 0:
            raise _RenderLimit(f"the output exceeds {self.max_bytes} bytes")
        self.tick()


class _MeteredList(list[Any]):
    """A list that charges the render's time budget for each item a loop takes from it."""

    def __init__(self, items: list[Any], budget: _Budget) -> None:
        super().__init__(items)
        self._budget = budget

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            self._budget.tick()
            yield item


def _metered(value: Any, budget: _Budget) -> Any:
    if isinstance(value, list):
        return _MeteredList([_metered(item, budget) for item in value], budget)
    if isinstance(value, dict):
        return {key: _metered(item, budget) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class Rendered:
    """A render's text; for a DSN template also the validated configuration."""

    text: str
    config: DSNConfig | None


def _generate(compiled: CompiledTemplate, context: dict[str, Any], budget: _Budget) -> str:
    parts = []
    for chunk in compiled.generate(context):
        budget.spend(len(chunk.encode("utf-8", "surrogatepass")))
        parts.append(chunk)
    return "".join(parts)


def _validated_config(text: str) -> DSNConfig:
    data = _load_yaml(text, "config")
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise _invalid("the rendered configuration is invalid",
                           [{"field": "config", "message": str(exc)}]) from None


def _validated_script(text: str) -> str:
    if not text.startswith("#!"):
        raise _invalid("the rendered job script is invalid",
                           [{"field": "body", "message": "a job script must start with #!"}])
    if any(not (c.isprintable() or c in "\n\t") for c in text):
        raise _invalid("the rendered job script is invalid",
                           [{"field": "body", "message": "contains a control character"}])
    return text


def render(template: Template, params: Mapping[str, Any], system: System, *,
           max_seconds: float = DEFAULT_MAX_SECONDS,
           max_bytes: int = DEFAULT_MAX_BYTES) -> Rendered:
    """Render validated ``params`` (from ``validate_params``) and ``system`` (from
    ``validate_system``) within the time and size bounds, then validate the output."""
    if not isinstance(system, _SYSTEM_MODELS[template.kind]):
        raise TypeError(f"a {template.kind} template needs {_SYSTEM_MODELS[template.kind].__name__}")
    if set(params) != set(template.parameters):
        raise _invalid("invalid parameters", [
            {"field": "params", "message": "pass the result of validate_params"}])
    budget = _Budget(max_seconds, max_bytes)
    context = {"params": _metered(dict(params), budget),
               "system": _metered(system.model_dump(mode="json"), budget)}
    try:
        text = _generate(_compiled(template.kind, template.body), context, budget)
    except (TemplateError, _RenderLimit) as exc:
        raise _invalid(f"template {template.name!r} failed to render",
                           [{"field": "body", "message": str(exc)}]) from None
    if template.kind == "dsn":
        return Rendered(text, _validated_config(text))
    return Rendered(_validated_script(text), None)


def render_values(template: Template, values: Any, system_values: Mapping[str, Any],
                  policy: PolicySet, *, max_seconds: float = DEFAULT_MAX_SECONDS,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> Rendered:
    """Validate user ``values`` and ``system_values`` against ``policy``, then ``render``."""
    params = validate_params(template, values, policy)
    system = validate_system(template.kind, system_values, policy)
    return render(template, params, system, max_seconds=max_seconds, max_bytes=max_bytes)


# --- admin saves and the shipped directory -------------------------------------------------------

_SAMPLE_KEY = "0" * 40  # a valid Z85 key (32 zero bytes): dry runs need one, and never connect


def sample_system(template: Template, params: Mapping[str, Any]) -> dict[str, Any]:
    """System values for a dry run of ``template`` with validated ``params``."""
    if template.kind == "dsn":
        return {"session_id": "dry-run", "client_key": _SAMPLE_KEY,
                "expires_at": datetime(2030, 1, 1, tzinfo=UTC), "ingress": "tcp://*:5555",
                "server_secret_key_file": "/var/lib/dsn/keys/gateway.key_secret",
                "consumers": []}
    return {"session_id": "dry-run", "job_id": "dry-run", "ranks": 2,
            "config_path": "/var/lib/dsn/dry-run.yaml",
            "output_dir": "/var/lib/dsn/output", "token_file": "/var/lib/dsn/consumer.token",
            "controlplane_url": "http://127.0.0.1:8750",
            "consumer_command": ["/usr/bin/python3", "-m", "dataplane.consumer"]}


def _saved_value_errors(exc: InvalidRequest) -> InvalidRequest:
    """Parameter errors of a dry run are errors in the template's own defaults or examples."""
    errors = [{"field": e["field"].replace("params.", "parameters.", 1),
               "message": f"default or example: {e['message']}"} for e in exc.errors]
    return _invalid("template rejected", errors)


def check_template(source_text: str, policy: PolicySet) -> Template:
    """Parse, statically check and dry-render a template an admin wants to save, with its
    defaults and examples, so that every error shows at save time."""
    template = parse_template(source_text)
    examples = {name: p.example for name, p in template.parameters.items() if p.example is not None}
    try:
        params = validate_params(template, examples, policy)
    except InvalidRequest as exc:
        raise _saved_value_errors(exc) from None
    system = validate_system(template.kind, sample_system(template, params), policy)
    render(template, params, system)
    return template


def shipped_templates_dir() -> Path:
    """The templates shipped with the package: the source tree's, else the installed data copy."""
    source = Path(__file__).resolve().parent.parent / "templates"
    if source.is_dir():
        return source
    return Path(sysconfig.get_paths()["purelib"]) / "dsn_data" / "templates"


def _template_file(root: Path, name: str) -> tuple[Path, Kind] | None:
    base = root.resolve()
    for kind, directory in KIND_DIRECTORIES.items():
        path = (base / directory / f"{name}.yaml").resolve()
        if not path.is_relative_to(base):  # a symbolic link out of the directory
            raise _invalid("invalid template name", [
                {"field": "name", "message": f"{name!r} resolves outside {root}"}])
        if path.is_file():
            return path, kind
    return None


def load_template(root: Path, name: Any) -> Template:
    """The template ``name`` from ``root/dsn`` or ``root/jobs``; names never leave ``root``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _invalid("invalid template name", [
            {"field": "name", "message": f"{_show(name)} does not match {NAME_PATTERN}"}])
    found = _template_file(root, name)
    if found is None:
        raise NotFound(f"no template named {name!r} in {root}")
    path, kind = found
    with path.open("rb") as file:
        raw = file.read(MAX_SOURCE_BYTES + 1)  # parse_template names the size limit
    try:
        template = parse_template(raw.decode("utf-8"))
    except (InvalidRequest, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path}: {exc}") from None
    if template.name != name or template.kind != kind:
        raise ConfigurationError(f"{path}: declares {template.kind} template {template.name!r}; "
                                 f"expected {kind} template {name!r}")
    return template


def load_templates(root: Path) -> dict[str, Template]:
    """Every template under ``root``, by name (the shipped set the store starts from)."""
    names = sorted(path.stem for directory in KIND_DIRECTORIES.values()
                   for path in (root / directory).glob("*.yaml"))
    if len(set(names)) != len(names):
        raise ConfigurationError(f"{root}: two templates share a name: {names}")
    return {name: load_template(root, name) for name in names}
