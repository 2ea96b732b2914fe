"""Policy-as-code: the YAML files under ``policies/`` (format: ``policies/README.md``), validated
with pydantic into an immutable ``PolicySet`` whose ``decide`` is pure and never raises.

Decision order (the first that applies names the rule):

1. ``unknown-action``     the action is not in ``ACTIONS``
2. ``unknown-principal``  the principal's kind is not a token kind (or ``anonymous``)
3. ``resource-mismatch``  the resource is not the kind the action acts on, or lacks/has a project
                          contrary to the catalogue
4. ``cross-project``      a project-bound principal (project, session, consumer token) names a
                          resource outside its own project
5. ``missing-scope``      the token lacks the action's scope (or the policy no longer grants it to
                          that kind of token: scopes are capped by the kind's roles on every call)
6. ``template-not-allowed`` a template-bound action names a template the project may not use
7. the id of the first matching ``deny`` rule, else of the first matching ``allow`` rule
8. ``default-deny``       nothing allowed it

Which registered gateways a project's sessions may be placed on (section ``gateways``) is no
request decision: placement (``controlplane.placement``) asks ``gateways_for``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from limits import RateLimitItem, parse_many
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from common import strictyaml
from controlplane.errors import ConfigurationError
from controlplane.federation import FederationPolicy
from controlplane.schemas import NAME_PATTERN
from controlplane.tokens import TokenKind

ANONYMOUS = "anonymous"
FEDERATED = "federated"  # an outside identity at the token endpoint (controlplane.federation)
PRINCIPAL_KINDS = frozenset(kind.value for kind in TokenKind) | {ANONYMOUS, FEDERATED}
ProjectUse = Literal["required", "optional", "none"]


@dataclass(frozen=True)
class ActionSpec:
    """``scope`` the token needs (None: public); ``resource`` the kind acted on; ``project`` whether
    the resource names a project; ``template_bound``: the resource's name is a template the project
    must be allowed to use."""

    scope: str | None
    resource: str
    project: ProjectUse
    template_bound: bool = False


ACTIONS: Mapping[str, ActionSpec] = {
    "projects:create": ActionSpec("projects:write", "project", "optional"),
    "projects:update": ActionSpec("projects:write", "project", "required"),
    "projects:delete": ActionSpec("projects:write", "project", "required"),
    "projects:read": ActionSpec("projects:read", "project", "required"),
    "projects:list": ActionSpec("projects:read", "project", "optional"),
    "tokens:issue": ActionSpec("tokens:write", "token", "required"),
    "tokens:revoke": ActionSpec("tokens:write", "token", "optional"),
    "tokens:list": ActionSpec("tokens:read", "token", "required"),
    "token:exchange": ActionSpec("token:exchange", "token", "required"),
    "admins:create": ActionSpec("admins:write", "admin", "none"),
    "admins:list": ActionSpec("admins:read", "admin", "none"),
    "admins:read": ActionSpec("admins:read", "admin", "none"),
    "admins:issue": ActionSpec("admins:write", "admin", "none"),
    "admins:remove": ActionSpec("admins:write", "admin", "none"),
    "admins:whoami": ActionSpec("admins:read", "admin", "none"),
    # An outside identity holds no scope: the federation's rules decided what it may have.
    "token:federate": ActionSpec(None, "token", "required"),
    "keys:rotate": ActionSpec("keys:write", "key", "none"),
    "jwks:read": ActionSpec(None, "key", "none"),
    # The console's own sign-in: the token's other actions are judged by their own routes.
    "console:sign_in": ActionSpec(None, "console", "optional"),
    "console:session": ActionSpec(None, "console", "optional"),
    "console:sign_out": ActionSpec(None, "console", "optional"),
    "policies:read": ActionSpec("policies:read", "policy", "none"),
    "policies:reload": ActionSpec("policies:write", "policy", "none"),
    # Checking an uploaded document and asking for a sample decision change nothing.
    "policies:check": ActionSpec("policies:read", "policy", "none"),
    "policies:decide": ActionSpec("policies:read", "policy", "none"),
    "audit:read": ActionSpec("audit:read", "audit", "none"),
    "audit:verify": ActionSpec("audit:read", "audit", "none"),
    "templates:read": ActionSpec("templates:read", "template", "none"),
    "templates:write": ActionSpec("templates:write", "template", "none"),
    "templates:render": ActionSpec("templates:render", "template", "optional", template_bound=True),
    "sessions:open": ActionSpec("sessions:write", "session", "required", template_bound=True),
    "sessions:read": ActionSpec("sessions:read", "session", "optional"),
    "sessions:end": ActionSpec("sessions:write", "session", "required"),
    "consumers:register": ActionSpec("consumers:register", "session", "required"),
    "scans:report": ActionSpec("scans:report", "scan", "required"),
    "scans:read": ActionSpec("scans:read", "scan", "optional"),
    # The gateways' counters of the sessions the caller may read.
    "gateways:read": ActionSpec("sessions:read", "gateway", "optional"),
    # The live stream of the open sessions (and their gateways' counters) the caller may read.
    "live:watch": ActionSpec("sessions:read", "session", "optional"),
}
SCOPES = frozenset(spec.scope for spec in ACTIONS.values() if spec.scope is not None)
BUILTIN_RULES = frozenset({"unknown-action", "unknown-principal", "resource-mismatch",
                           "cross-project", "missing-scope", "template-not-allowed",
                           "default-deny"})
_NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOST_PATTERN = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")
_GATEWAY_PATTERN = re.compile(r"^[\x21-\x7e]{1,100}$")
_DURATION = re.compile(r"^([1-9][0-9]*)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# --- the decision types ------------------------------------------------------------------------

@dataclass(frozen=True)
class Principal:
    kind: str
    subject: str
    project: str | None
    scopes: frozenset[str]


@dataclass(frozen=True)
class Resource:
    kind: str
    project: str | None
    name: str | None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str
    reason: str


def expand_actions(pattern: str) -> frozenset[str]:
    """``*`` is every action, ``area:*`` every action of an area; anything else names itself."""
    if pattern == "*":
        return frozenset(ACTIONS)
    if pattern.endswith(":*"):
        prefix = pattern[:-1]
        return frozenset(name for name in ACTIONS if name.startswith(prefix))
    return frozenset({pattern}) & frozenset(ACTIONS)


def parse_duration(value: Any) -> int:
    """Seconds as an integer, or a string such as ``90s``, ``15m``, ``12h``, ``30d``, ``2w``."""
    if type(value) is int and value > 0:
        return value
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a duration (a positive integer or e.g. 15m, 12h, 30d)")
    return int(match.group(1)) * _UNITS[match.group(2)]


# --- the document model (every model refuses unknown keys) ---------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Rule(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    effect: Literal["allow", "deny"]
    description: str = ""
    principals: list[str] = Field(min_length=1)
    actions: list[str] = Field(min_length=1)
    projects: list[str] | None = None  # fnmatch patterns on the resource's project

    @field_validator("principals")
    @classmethod
    def _known_principals(cls, value: list[str]) -> list[str]:
        unknown = [kind for kind in value if kind != "*" and kind not in PRINCIPAL_KINDS]
        if unknown:
            raise ValueError(f"unknown principal kind(s) {unknown}; known: "
                             f"{sorted(PRINCIPAL_KINDS)} or '*'")
        return value

    @field_validator("actions")
    @classmethod
    def _known_actions(cls, value: list[str]) -> list[str]:
        unknown = [pattern for pattern in value if not expand_actions(pattern)]
        if unknown:
            raise ValueError(f"unknown action(s) {unknown}; see the ACTIONS catalogue")
        return value


class KindPolicy(_Strict):
    max_ttl: int
    roles: list[str]

    @field_validator("max_ttl", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> int:
        return parse_duration(value)


class QuotaValues(_Strict):
    tokens: int = Field(ge=0)    # live project tokens
    sessions: int = Field(ge=0)  # concurrent streaming sessions
    consumers: int = Field(ge=0)  # consumer ranks per session


class QuotaOverrides(_Strict):
    tokens: int | None = Field(default=None, ge=0)
    sessions: int | None = Field(default=None, ge=0)
    consumers: int | None = Field(default=None, ge=0)


class Quotas(_Strict):
    defaults: QuotaValues
    projects: dict[str, QuotaOverrides] = {}


class Templates(_Strict):
    defaults: list[str] = []  # fnmatch patterns every project may use
    projects: dict[str, list[str]] = {}  # replaces the defaults for the named project


def _gateway_pattern(value: str) -> str:
    if not _GATEWAY_PATTERN.match(value):
        raise ValueError(f"{value!r} is not a gateway name pattern (fnmatch, 1 to 100 printable "
                         "characters, no spaces)")
    return value


def _project_name(value: str) -> str:
    if not re.match(NAME_PATTERN, value):
        raise ValueError(f"{value!r} is not a project name")
    return value


GatewayPattern = Annotated[str, AfterValidator(_gateway_pattern)]
ProjectName = Annotated[str, AfterValidator(_project_name)]


class Gateways(_Strict):
    """Which registered gateways (by name) a project's sessions may be placed on. Left out, every
    project may use every gateway, as on a site whose policy predates the section."""

    defaults: list[GatewayPattern] = ["*"]  # fnmatch patterns over gateway names
    projects: dict[ProjectName, list[GatewayPattern]] = {}  # replaces the defaults for one


@dataclass(frozen=True)
class GatewayAllowance:
    """The gateways ``project``'s sessions may be placed on: those whose name matches one of
    ``patterns`` (fnmatch, case-sensitive)."""

    project: str
    patterns: tuple[str, ...]

    def allows(self, gateway: str) -> bool:
        return any(fnmatch.fnmatchcase(gateway, pattern) for pattern in self.patterns)

    def __str__(self) -> str:
        if not self.patterns:
            return "none"
        return "gateways matching " + ", ".join(repr(pattern) for pattern in self.patterns)


def _strict_cidrs(value: list[str]) -> list[str]:
    bad = []
    for text in value:
        try:
            ipaddress.ip_network(text, strict=True)
        except ValueError as error:
            bad.append(f"{text!r} ({error})")
    if bad:
        raise ValueError("invalid CIDR(s): " + "; ".join(bad))
    return value


class Networks(_Strict):
    sources: list[str] = []  # external networks a session may admit producers from
    targets: list[str] = []  # internal networks consumers may listen on
    target_hosts: list[str] = []  # host names (or *.domain) consumers may listen on

    @field_validator("sources", "targets")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        return _strict_cidrs(value)

    @field_validator("target_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        bad = [host for host in value if not _HOST_PATTERN.match(host)]
        if bad:
            raise ValueError(f"invalid host name(s) {bad}")
        return value


class RateLimits(_Strict):
    per_token: str
    per_project: str
    # Requests that fail authentication (no token, a bad one), counted per client address.
    unauthenticated_per_source: str = "10/second;100/minute"

    @field_validator("per_token", "per_project", "unauthenticated_per_source")
    @classmethod
    def _rate(cls, value: str) -> str:
        try:
            parse_many(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a rate such as '20/second' or "
                             f"'20/second;600/minute'") from None
        return value


class PolicyDocument(_Strict):
    roles: dict[str, list[str]]
    tokens: dict[TokenKind, KindPolicy]
    rules: list[Rule]
    quotas: Quotas
    rate_limits: RateLimits
    templates: Templates = Templates()
    gateways: Gateways = Gateways()
    networks: Networks = Networks()
    allow_plaintext: bool = False
    federation: FederationPolicy | None = None

    @field_validator("tokens", mode="before")
    @classmethod
    def _kinds(cls, value: Any) -> Any:
        # Strict mode refuses str for enum keys: map them here. Unknown kinds are left out and
        # named by _kind_checks, which gives a clearer message than pydantic's.
        if isinstance(value, dict):
            return {TokenKind(key): item for key, item in value.items()
                    if key in TokenKind._value2member_map_}
        return value

    @field_validator("roles")
    @classmethod
    def _roles(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        problems = [f"role {name!r}: unknown scope(s) {sorted(set(scopes) - SCOPES)}"
                    for name, scopes in value.items() if set(scopes) - SCOPES]
        problems += [f"role name {name!r} is not a lower-case name"
                     for name in value if not re.match(_NAME, name)]
        if problems:
            raise ValueError("; ".join(problems))
        return value


# --- the compiled policy set -------------------------------------------------------------------

@dataclass(frozen=True)
class _CompiledRule:
    id: str
    deny: bool
    principals: frozenset[str]
    actions: frozenset[str]
    projects: tuple[str, ...] | None

    def matches(self, principal: Principal, action: str, resource: Resource) -> bool:
        if "*" not in self.principals and principal.kind not in self.principals:
            return False
        if action not in self.actions:
            return False
        if self.projects is None:
            return True
        return resource.project is not None and any(
            fnmatch.fnmatchcase(resource.project, pattern) for pattern in self.projects)


def _compile(rule: Rule) -> _CompiledRule:
    actions = frozenset().union(*(expand_actions(pattern) for pattern in rule.actions))
    projects = None if rule.projects is None else tuple(rule.projects)
    return _CompiledRule(rule.id, rule.effect == "deny", frozenset(rule.principals), actions,
                         projects)


class PolicySet:
    """An immutable, validated policy set. Build it with ``load_policies``."""

    def __init__(self, document: PolicyDocument, sources: tuple[str, ...]) -> None:
        self._doc = document
        self.sources = sources
        self._rules = tuple(_compile(rule) for rule in document.rules)
        self._kind_scopes = {kind: frozenset().union(*(document.roles[r] for r in spec.roles))
                             for kind, spec in document.tokens.items()}
        self.per_token_limits: tuple[RateLimitItem, ...] = tuple(
            parse_many(document.rate_limits.per_token))
        self.per_project_limits: tuple[RateLimitItem, ...] = tuple(
            parse_many(document.rate_limits.per_project))
        self.unauthenticated_limits: tuple[RateLimitItem, ...] = tuple(
            parse_many(document.rate_limits.unauthenticated_per_source))
        canonical = json.dumps(self.describe(), sort_keys=True).encode()
        self.digest = hashlib.sha256(canonical).hexdigest()

    # -- decisions --

    def decide(self, principal: Principal, action: str, resource: Resource) -> Decision:
        """Allow or deny, naming the rule; pure, and never raises on any input."""
        spec = ACTIONS.get(action) if isinstance(action, str) else None
        if spec is None:
            return Decision(False, "unknown-action", f"{action!r} is not a known action")
        for guard in (_principal_guard, _resource_guard, _project_guard, self._scope_guard,
                      self._template_guard):
            denied = guard(principal, action, spec, resource)
            if denied is not None:
                return denied
        return self._by_rules(principal, action, resource)

    def _scope_guard(self, principal: Principal, action: str, spec: ActionSpec,
                     resource: Resource) -> Decision | None:
        if spec.scope is None:
            return None
        granted = self.scopes_for(principal.kind)
        if spec.scope not in principal.scopes:
            return Decision(False, "missing-scope", f"{action} needs scope {spec.scope!r}")
        if spec.scope not in granted:
            return Decision(False, "missing-scope",
                            f"the policy grants no {spec.scope!r} to {principal.kind} tokens")
        return None

    def _template_guard(self, principal: Principal, action: str, spec: ActionSpec,
                        resource: Resource) -> Decision | None:
        if not spec.template_bound or resource.project is None:
            return None
        name = resource.name
        if not isinstance(name, str) or not self.may_use_template(resource.project, name):
            return Decision(False, "template-not-allowed", f"project {resource.project!r} may not "
                            f"use template {resource.name!r}")
        return None

    def _by_rules(self, principal: Principal, action: str, resource: Resource) -> Decision:
        matching = [rule for rule in self._rules if rule.matches(principal, action, resource)]
        for rule in matching:
            if rule.deny:
                return Decision(False, rule.id, f"denied by rule {rule.id!r}")
        for rule in matching:
            return Decision(True, rule.id, f"allowed by rule {rule.id!r}")
        return Decision(False, "default-deny",
                        f"no rule allows {action} to {principal.kind} tokens")

    # -- settings the service reads --

    def lifetime_cap(self, kind: TokenKind | str) -> int:
        """The longest lifetime (seconds) of a token of ``kind``; ConfigurationError if none."""
        known = _kind(kind)
        spec = None if known is None else self._doc.tokens.get(known)
        if spec is None:
            raise ConfigurationError(f"the policy sets no lifetime for {kind!r} tokens")
        return spec.max_ttl

    def scopes_for(self, kind: TokenKind | str) -> frozenset[str]:
        """Every scope a token of ``kind`` may carry: the union of its roles' scopes."""
        known = _kind(kind)
        return frozenset() if known is None else self._kind_scopes.get(known, frozenset())

    def admin_scopes(self) -> frozenset[str]:
        return self.scopes_for(TokenKind.ADMIN)

    def quota(self, project: str, name: str) -> int:
        if name not in QuotaValues.model_fields:
            raise ValueError(f"unknown quota {name!r}")
        override = self._doc.quotas.projects.get(project)
        value = getattr(override, name) if override is not None else None
        return int(getattr(self._doc.quotas.defaults, name) if value is None else value)

    @property
    def allow_plaintext(self) -> bool:
        return self._doc.allow_plaintext

    @property
    def federation(self) -> FederationPolicy | None:
        return self._doc.federation

    def may_use_template(self, project: str, template: str) -> bool:
        patterns = self._doc.templates.projects.get(project, self._doc.templates.defaults)
        return any(fnmatch.fnmatchcase(template, pattern) for pattern in patterns)

    def gateways_for(self, project: str) -> GatewayAllowance:
        """The registered gateways ``project``'s sessions may be placed on."""
        patterns = self._doc.gateways.projects.get(project, self._doc.gateways.defaults)
        return GatewayAllowance(project, tuple(patterns))

    def source_allowed(self, network: str) -> bool:
        """Whether a session may admit producers from ``network`` (an address or CIDR)."""
        return _within(network, self._doc.networks.sources)

    def target_allowed(self, node: str) -> bool:
        """Whether a consumer may listen on ``node``: an address inside the target networks, or a
        host name matching ``target_hosts``."""
        if _within(node, self._doc.networks.targets):
            return True
        host = node.lower()
        return bool(_HOST_PATTERN.match(host)) and any(
            fnmatch.fnmatchcase(host, pattern) for pattern in self._doc.networks.target_hosts)

    def describe(self) -> dict[str, Any]:
        """The whole set as JSON-ready data (for GET /api/v1/policies)."""
        return self._doc.model_dump(mode="json")


def _kind(kind: Any) -> TokenKind | None:
    return TokenKind(kind) if kind in TokenKind._value2member_map_ else None


def _within(text: str, networks: list[str]) -> bool:
    try:
        candidate = ipaddress.ip_network(text, strict=True)
    except (ValueError, TypeError):
        return False
    return any(_inside(candidate, ipaddress.ip_network(allowed)) for allowed in networks)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _inside(candidate: Network, network: Network) -> bool:
    # An IPv4 network is never inside an IPv6 one, nor the reverse.
    if isinstance(candidate, ipaddress.IPv4Network) and isinstance(network, ipaddress.IPv4Network):
        return candidate.subnet_of(network)
    if isinstance(candidate, ipaddress.IPv6Network) and isinstance(network, ipaddress.IPv6Network):
        return candidate.subnet_of(network)
    return False


# --- the guards of decide(): each returns a denial or None -------------------------------------

def _principal_guard(principal: Principal, action: str, spec: ActionSpec,
                     resource: Resource) -> Decision | None:
    if not isinstance(principal.kind, str) or principal.kind not in PRINCIPAL_KINDS:
        return Decision(False, "unknown-principal", f"{principal.kind!r} is not a principal kind")
    # decide() never raises on any input: what a principal holds is checked, not trusted.
    scopes: object = principal.scopes
    if not isinstance(scopes, frozenset):
        return Decision(False, "unknown-principal", "the principal's scopes are not a set")
    return None


def _resource_guard(principal: Principal, action: str, spec: ActionSpec,
                    resource: Resource) -> Decision | None:
    if resource.kind != spec.resource:
        return Decision(False, "resource-mismatch", f"{action} acts on a {spec.resource}, "
                        f"not a {resource.kind!r}")
    has_project = resource.project is not None
    if (spec.project == "required" and not has_project) or (spec.project == "none" and has_project):
        return Decision(False, "resource-mismatch", f"{action} {spec.project} names a project")
    if has_project and not isinstance(resource.project, str):
        return Decision(False, "resource-mismatch", "the resource's project is not a name")
    return None


def _project_guard(principal: Principal, action: str, spec: ActionSpec,
                   resource: Resource) -> Decision | None:
    kind = _kind(principal.kind)
    if kind is None or not kind.project_bound or spec.project == "none":
        return None
    if principal.project is None or principal.project != resource.project:
        return Decision(False, "cross-project", f"a {principal.kind} token of another project "
                        "may not act here")
    return None


# --- loading and linting -----------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyProblem:
    """One reason a policy set does not load: the file (or upload) at fault, where in it
    (``rules[2].effect``; empty for the file as a whole), and its line when one can be named."""

    source: str
    field: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.source}: {self.field + ': ' if self.field else ''}{self.message}"


@dataclass
class _Merge:
    """The files merged into one document, with where each part came from (for messages)."""

    document: dict[str, Any]
    origin: dict[str, str]  # section -> file
    rule_origin: list[str]
    role_origin: dict[str, str]
    problems: list[PolicyProblem]
    name: str  # what was loaded: named in messages about the set as a whole
    trees: dict[str, yaml.Node]  # file -> its YAML nodes, which know their lines
    unreadable: bool = False


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(path.glob("*.yaml"))
    return [path]


def _read(name: str, text: str, merge: _Merge) -> dict[str, Any] | None:
    problems = merge.problems
    try:
        data, node = strictyaml.load_with_nodes(text)
    except strictyaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problems.append(PolicyProblem(name, "", f"not valid YAML: {' '.join(str(error).split())}",
                                      None if mark is None else mark.line + 1))
        return None
    if not isinstance(data, dict) or node is None:
        problems.append(PolicyProblem(name, "", "must be a mapping of sections"))
        return None
    merge.trees[name] = node
    if type(data.get("version")) is not int or data["version"] != 1:
        problems.append(PolicyProblem(name, "version", "must be 1"))
    return data


def _merge(name: str, texts: list[tuple[str, str | OSError | UnicodeDecodeError]]) -> _Merge:
    merge = _Merge({}, {}, [], {}, [], name, {})
    for source, text in texts:
        if isinstance(text, str):
            data = _read(source, text, merge)
        else:
            merge.problems.append(PolicyProblem(source, "", f"cannot read: {text}"))
            data = None
        merge.unreadable |= data is None
        for section, value in (data or {}).items():
            if section != "version":
                _merge_section(merge, source, section, value)
    return merge


def _merge_section(merge: _Merge, name: str, section: Any, value: Any) -> None:
    doc = merge.document
    if section == "rules" and isinstance(value, list) and isinstance(doc.get(section), list):
        doc[section] = doc[section] + value
        merge.rule_origin += [name] * len(value)
    elif section == "roles" and isinstance(value, dict) and isinstance(doc.get(section), dict):
        for role in value:
            if role in doc[section]:
                merge.problems.append(PolicyProblem(
                    name, f"{section}.{role}", f"already defined in {merge.role_origin[role]}"))
        doc[section] = {**value, **doc[section]}
        merge.role_origin.update({role: name for role in value if role not in merge.role_origin})
    elif section in doc:
        merge.problems.append(PolicyProblem(name, str(section),
                                            f"already defined in {merge.origin[section]}"))
    else:
        doc[section] = value
        merge.origin[section] = name
        if section == "rules" and isinstance(value, list):
            merge.rule_origin = [name] * len(value)
        if section == "roles" and isinstance(value, dict):
            merge.role_origin = {role: name for role in value}


def _where(merge: _Merge, loc: tuple[Any, ...]) -> str:
    section = str(loc[0]) if loc else ""
    if section == "rules" and len(loc) > 1 and isinstance(loc[1], int) \
            and loc[1] < len(merge.rule_origin):
        return merge.rule_origin[loc[1]]
    if section == "roles" and len(loc) > 1 and str(loc[1]) in merge.role_origin:
        return merge.role_origin[str(loc[1])]
    return merge.origin.get(section, merge.name)


def _location(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{getattr(part, 'value', part)}"
    return text.lstrip(".")


def _parts(location: str) -> list[str | int]:
    """``rules[2].effect`` -> ["rules", 2, "effect"]: the inverse of ``_location``."""
    return [int(part[1:-1]) if part.startswith("[") else part
            for part in re.findall(r"\[[0-9]+\]|[^.\[\]]+", location)]


def _line(merge: _Merge, problem: PolicyProblem) -> int | None:
    """The line of the deepest part of ``problem.field`` that its file holds."""
    node: yaml.Node | None = merge.trees.get(problem.source)
    parts = _parts(problem.field)
    if parts[:1] == ["rules"] and len(parts) > 1 and isinstance(parts[1], int) \
            and problem.source in merge.rule_origin:
        # Rules merged from several files are numbered across them: count within this one.
        parts[1] -= merge.rule_origin.index(problem.source)
    line = None
    for part in parts:
        if isinstance(node, yaml.MappingNode):
            found = [(key, value) for key, value in node.value
                     if isinstance(key, yaml.ScalarNode) and key.value == str(part)]
            if not found:
                break
            line, node = found[0][0].start_mark.line + 1, found[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) \
                and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _validation_problems(merge: _Merge, error: ValidationError) -> Iterator[PolicyProblem]:
    for item in error.errors(include_url=False):
        # A bad mapping key is named by its own place: pydantic adds a "[key]" part after it.
        loc = tuple(part for part in item["loc"]
                    if not str(part).startswith("function-") and part != "[key]")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        yield PolicyProblem(_where(merge, loc), _location(loc), message)


def _cross_checks(merge: _Merge) -> Iterator[PolicyProblem]:
    """Checks across sections, run on the raw data so they report even when other parts are bad."""
    doc = merge.document
    raw_rules = doc.get("rules")
    rules: list[Any] = raw_rules if isinstance(raw_rules, list) else []
    seen: dict[str, int] = {}
    for index, rule in enumerate(rules):
        rule_id = rule.get("id") if isinstance(rule, dict) else None
        if not isinstance(rule_id, str):
            continue
        source, where = merge.rule_origin[index], f"rules[{index}].id"
        if rule_id in seen:
            yield PolicyProblem(source, where, f"duplicate rule id {rule_id!r} (first at "
                                f"rules[{seen[rule_id]}])")
        elif rule_id in BUILTIN_RULES:
            yield PolicyProblem(source, where, f"{rule_id!r} is a built-in rule name")
        seen.setdefault(rule_id, index)
    yield from _kind_checks(merge)


def _kind_checks(merge: _Merge) -> Iterator[PolicyProblem]:
    tokens, roles = merge.document.get("tokens"), merge.document.get("roles")
    if not isinstance(tokens, dict):
        return
    where = merge.origin["tokens"]
    for kind in tokens:
        if kind not in TokenKind._value2member_map_:
            yield PolicyProblem(where, f"tokens.{kind}", "unknown token kind; "
                                f"known: {[known.value for known in TokenKind]}")
    for kind in TokenKind:
        if kind.value not in tokens:
            yield PolicyProblem(where, "tokens", f"no entry for {kind.value} tokens (every kind "
                                "needs max_ttl)")
    known_roles = set(roles) if isinstance(roles, dict) else set()
    for kind, spec in tokens.items():
        named = spec.get("roles") if isinstance(spec, dict) else None
        for role in named if isinstance(named, list) else []:
            if isinstance(role, str) and role not in known_roles:
                yield PolicyProblem(where, f"tokens.{kind}.roles", f"unknown role {role!r}")


def _federation_problems(merge: _Merge, document: PolicyDocument) -> Iterator[PolicyProblem]:
    if document.federation is None:
        return
    where = merge.origin.get("federation", merge.name)
    for problem in document.federation.problems(_project_scopes(document)):
        field_, _, message = problem.partition(": ")
        yield PolicyProblem(where, field_, message)


def _check(name: str, texts: list[tuple[str, str | OSError | UnicodeDecodeError]],
           sources: tuple[str, ...]) -> tuple[PolicySet | None, list[PolicyProblem]]:
    """The one validation of a policy set, whether from the service's files or an upload."""
    merge = _merge(name, texts)
    problems = list(merge.problems)
    if not merge.unreadable:  # what could be read is incomplete: checking it would only add noise
        document: PolicyDocument | None = None
        try:
            document = PolicyDocument.model_validate(merge.document)
        except ValidationError as error:
            problems += _validation_problems(merge, error)
        problems += _cross_checks(merge)
        if document is not None:
            problems += _federation_problems(merge, document)
        if not problems and document is not None:
            return PolicySet(document, sources), []
    return None, [problem if problem.line is not None or not problem.field
                  else replace(problem, line=_line(merge, problem)) for problem in problems]


def _load(path: Path) -> tuple[PolicySet | None, list[PolicyProblem]]:
    paths = _files(path)
    if not paths:
        return None, [PolicyProblem(str(path), "", "no policy files (*.yaml)")]
    texts: list[tuple[str, str | OSError | UnicodeDecodeError]] = []
    for file in paths:
        try:
            texts.append((str(file), file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as error:
            texts.append((str(file), error))
    # File names only: where the service's files live is no caller's business.
    return _check(str(path), texts, tuple(p.name for p in paths))


def check_text(text: str, name: str) -> tuple[PolicySet | None, list[PolicyProblem]]:
    """Validate one policy document given as text (an upload called ``name``), exactly as a
    policy file is validated at load and reload; nothing is activated."""
    return _check(name, [(name, text)], (name,))


def _project_scopes(document: PolicyDocument) -> frozenset[str]:
    spec = document.tokens.get(TokenKind.PROJECT)
    roles = spec.roles if spec is not None else []
    return frozenset().union(*(document.roles.get(role, []) for role in roles))


def lint(path: Path) -> list[str]:
    """Every problem in a policy file or directory; empty when it would load."""
    return [str(problem) for problem in _load(Path(path))[1]]


def load_policies(path: Path) -> PolicySet:
    """Load a policy file, or every ``*.yaml`` of a directory; ConfigurationError lists every
    problem."""
    policy, problems = _load(Path(path))
    if policy is None:
        listing = "\n".join(f"- {problem}" for problem in problems)
        raise ConfigurationError(f"invalid policy {path}:\n{listing}")
    return policy


class PolicyHolder:
    """The active policy set; a reload swaps it only when the new set is valid."""

    def __init__(self, policy: PolicySet) -> None:
        self._current = policy
        self.lifetime_caps = LifetimeCaps(lambda: self._current)

    @classmethod
    def load(cls, path: Path) -> PolicyHolder:
        return cls(load_policies(path))

    @property
    def current(self) -> PolicySet:
        return self._current

    def reload(self, path: Path) -> tuple[bool, list[str]]:
        policy, problems = _load(Path(path))
        if policy is None:
            return False, [str(problem) for problem in problems]
        self._current = policy
        return True, []


class LifetimeCaps(Mapping[TokenKind, int]):
    """A live view of the active set's lifetime caps, for ``TokenService(lifetime_caps=...)``: a
    reload changes the caps of both issue and verify at once."""

    def __init__(self, current: Callable[[], PolicySet]) -> None:
        self._current = current

    def __getitem__(self, kind: TokenKind) -> int:
        try:
            return self._current().lifetime_cap(kind)
        except ConfigurationError:
            raise KeyError(kind) from None

    def __iter__(self) -> Iterator[TokenKind]:
        return iter(TokenKind)

    def __len__(self) -> int:
        return len(TokenKind)
