"""Typed template parameters: the ``Parameter`` declaration and one value checker per type, each
returning the canonical value or a ValueError naming the value. A ``SiteValue`` is declared the
same way but its value is fixed by the admin in the template (``site:``), never by a user.

A declaration's own ``default`` and ``example`` are checked for form when it is built
(``policy=None``); user values, and those defaults and examples at save time, are also checked
against the policy's networks. No value may contain a newline or other control character.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import Field, StrictInt, StrictStr, model_validator

from common.config import parse_endpoint
from controlplane.policy import PolicySet
from controlplane.templates.base import Strict, show

ParamType = Literal["cidr_list", "host_list", "endpoint_list", "port", "int", "enum", "bool",
                    "string", "command", "command_list"]
# A command (a list of words, each one shell word once quoted) is code the job runs: only an
# admin sets one, as a site value, never a user as a parameter.
COMMAND_TYPES = frozenset({"command", "command_list"})
_LISTS = frozenset({"cidr_list", "host_list", "endpoint_list"})
_APPLIES = {  # which declaration keys make sense for which parameter types
    "min": frozenset({"int", "port"}), "max": frozenset({"int", "port"}),
    "choices": frozenset({"enum"}), "pattern": frozenset({"string"}),
    "max_length": frozenset({"string"}) | COMMAND_TYPES, "min_items": _LISTS | COMMAND_TYPES,
    "max_items": _LISTS | COMMAND_TYPES, "network": _LISTS,
}
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")


class Parameter(Strict):
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


class SiteValue(Parameter):
    """An admin-set value (the site's Python, its environment setup, its MPI launch): typed and
    checked like a parameter, with its ``value`` in the template instead of a default."""

    value: Any

    @model_validator(mode="after")
    def _valued(self) -> SiteValue:
        if self.default is not None or self.example is not None:
            raise ValueError("a site value has a value, not a default or example")
        try:
            check_value(self, self.value, None)
        except ValueError as exc:
            raise ValueError(f"value: {exc}") from None
        return self


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


def _require_item_bounds(param: Parameter) -> None:
    if param.min_items > param.max_items:
        raise ValueError(f"min_items {param.min_items} is above max_items {param.max_items}")


def _require_network(param: Parameter) -> None:
    if param.network is None:
        raise ValueError(f"a {param.type} parameter needs network: sources or targets (the "
                         "policy list its values must lie in)")
    _require_item_bounds(param)


_REQUIRES = {"int": _require_bounds, "port": _require_bounds, "enum": _require_choices,
             "string": _require_pattern, "cidr_list": _require_network,
             "host_list": _require_network, "endpoint_list": _require_network,
             "command": _require_item_bounds, "command_list": _require_item_bounds}


def _in_policy(param: Parameter, item: str, policy: PolicySet | None) -> None:
    if policy is None:  # form-only check of a declaration; the policy applies at save and use
        return
    allowed = policy.source_allowed if param.network == "sources" else policy.target_allowed
    if not allowed(item):
        raise ValueError(f"{item} is outside the {param.network} networks the policy allows")


def _no_scope_or_mapping(address: ipaddress.IPv4Address | ipaddress.IPv6Address, text: str) -> None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        raise ValueError(f"{show(text)} is IPv4-mapped IPv6; write the IPv4 form")


def _cidr(param: Parameter, value: Any, policy: PolicySet | None) -> str:
    if type(value) is not str:
        raise ValueError(f"{show(value)} is not a CIDR string such as 10.1.0.0/16")
    if "%" in value:
        raise ValueError(f"{show(value)}: scoped IPv6 networks are refused")
    if "/" not in value:
        raise ValueError(f"{show(value)} has no prefix length (write e.g. {value}/32)")
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"{show(value)} is not a CIDR network: {exc}") from None
    _no_scope_or_mapping(network.network_address, value)
    if str(network) != value:  # refuses netmask and hostmask forms, upper case, long IPv6
        raise ValueError(f"{show(value)} is not in canonical form; write {network}")
    _in_policy(param, value, policy)
    return value


def _host(param: Parameter, value: Any, policy: PolicySet | None) -> str:
    if type(value) is not str or not value or len(value) > 253 or "%" in value:
        raise ValueError(f"{show(value)} is not a host name or IP address")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        # A numeric last label (127.1, 2130706433) is an address to many resolvers: refuse it.
        if not _HOSTNAME.fullmatch(value) or value.rsplit(".", 1)[-1].isdigit():
            raise ValueError(f"{show(value)} is not a lower-case host name or IP address") from None
    else:
        _no_scope_or_mapping(address, value)
        if str(address) != value:
            raise ValueError(f"{show(value)} is not in canonical form; write {address}")
    _in_policy(param, value, policy)
    return value


def _endpoint(param: Parameter, value: Any, policy: PolicySet | None) -> str:
    if type(value) is not str or "%" in value:
        raise ValueError(f"{show(value)} is not an endpoint such as tcp://10.1.2.3:6001")
    try:
        host, port = parse_endpoint(value)
    except ValueError as exc:
        raise ValueError(f"{show(value)}: {exc}") from None
    address = ipaddress.ip_address(host)
    _no_scope_or_mapping(address, value)
    canonical = f"tcp://{address}:{port}" if address.version == 4 else f"tcp://[{address}]:{port}"
    if canonical != value:
        raise ValueError(f"{show(value)} is not in canonical form; write {canonical}")
    _in_policy(param, host, policy)
    return value


def _items(param: Parameter, value: Any, policy: PolicySet | None) -> list[str]:
    if type(value) is not list:
        raise ValueError(f"must be a list, not {show(value)}")
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
        raise ValueError(f"must be an integer, not {show(value)}")
    lo, hi = param.bounds()
    if not lo <= value <= hi:
        raise ValueError(f"{value} is outside {lo}..{hi}")
    return value


def _enum(param: Parameter, value: Any, policy: PolicySet | None) -> str | int:
    for choice in param.choices or []:
        if type(value) is type(choice) and value == choice:
            return choice
    raise ValueError(f"{show(value)} is not one of {param.choices}")


def _boolean(param: Parameter, value: Any, policy: PolicySet | None) -> bool:
    if type(value) is not bool:
        raise ValueError(f"must be true or false, not {show(value)}")
    return value


def _string(param: Parameter, value: Any, policy: PolicySet | None) -> str:
    if type(value) is not str:
        raise ValueError(f"must be a string, not {show(value)}")
    if len(value) > param.max_length:
        raise ValueError(f"is {len(value)} characters long; at most {param.max_length}")
    if not value.isprintable():  # newlines, tabs, NEL, U+2028 and every other control character
        raise ValueError(f"{show(value)} contains a newline or control character")
    if not re.fullmatch(param.pattern or "", value):
        raise ValueError(f"{show(value)} does not match {param.pattern!r}")
    return value


def _word(param: Parameter, value: Any) -> str:
    if type(value) is not str or not value:
        raise ValueError(f"{show(value)} is not a word (a non-empty string)")
    if len(value) > param.max_length:
        raise ValueError(f"{show(value)} is {len(value)} characters long; at most "
                         f"{param.max_length}")
    if not value.isprintable():
        raise ValueError(f"{show(value)} contains a newline or control character")
    return value


def _counted(param: Parameter, value: Any, what: str) -> list[Any]:
    if type(value) is not list:
        raise ValueError(f"must be a list of {what}, not {show(value)}")
    if not param.min_items <= len(value) <= param.max_items:
        raise ValueError(f"has {len(value)} {what}; {param.min_items}..{param.max_items} allowed")
    return value


def _command(param: Parameter, value: Any, policy: PolicySet | None) -> list[str]:
    """A command as its words, e.g. ``[srun, --mpi=pmix]``: each becomes one quoted shell word,
    so a command never brings shell syntax (expansion, pipes, redirection) with it."""
    return [_word(param, word) for word in _counted(param, value, "words")]


def _command_list(param: Parameter, value: Any, policy: PolicySet | None) -> list[list[str]]:
    """Commands run one after the other (``module load``, ``source``): each a non-empty list of
    words, at most ``max_length`` characters each."""
    commands = _counted(param, value, "commands")
    words = param.model_copy(update={"min_items": 1, "max_items": 64})
    return [_command(words, command, policy) for command in commands]


_CHECKS = {"cidr_list": _items, "host_list": _items, "endpoint_list": _items, "port": _integer,
           "int": _integer, "enum": _enum, "bool": _boolean, "string": _string,
           "command": _command, "command_list": _command_list}


def check_value(param: Parameter, value: Any, policy: PolicySet | None) -> Any:
    """The canonical value, or ValueError naming the value; ``policy=None`` checks form only."""
    return _CHECKS[param.type](param, value, policy)
