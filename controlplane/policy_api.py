"""The policy set as an admin works on it over REST: validating an uploaded policy document with
the very checks a load or reload makes (``policy.check_text``), and asking the active set's
``decide`` what it answers a sample request. Neither changes anything: only a reload of the
configured file activates a policy set. Handlers, their models and ``ROUTES``.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from aiohttp import web
from pydantic import AfterValidator, Field, JsonValue, StringConstraints

from controlplane import schemas as s
from controlplane.middlewares import SERVICES, RouteSpec
from controlplane.policy import (
    ACTIONS,
    PRINCIPAL_KINDS,
    SCOPES,
    PolicySet,
    Principal,
    Resource,
    check_text,
)
from controlplane.views import ADMIN, _singleton, parse_body, reply

MAX_POLICY_CHARS: Final = 256 * 1024
# The JSON envelope around the text, and escapes in it, need room beyond the text itself.
MAX_POLICY_BODY: Final = 2 * MAX_POLICY_CHARS
RESOURCE_KINDS: Final = frozenset(spec.resource for spec in ACTIONS.values())


def _one_of(known: frozenset[str], what: str) -> AfterValidator:
    def check(value: str) -> str:
        if value not in known:
            raise ValueError(f"unknown {what}; known: {', '.join(sorted(known))}")
        return value
    return AfterValidator(check)


def _enum(known: frozenset[str]) -> Any:
    values: list[JsonValue] = sorted(known)  # type: ignore[assignment]
    return Field(max_length=64, json_schema_extra={"enum": values})


# Strings that must name a catalogued value (an enum in the OpenAPI document).
PrincipalKind = Annotated[str, _enum(PRINCIPAL_KINDS), _one_of(PRINCIPAL_KINDS, "principal kind")]
ActionName = Annotated[str, _enum(frozenset(ACTIONS)), _one_of(frozenset(ACTIONS), "action")]
ResourceKind = Annotated[str, _enum(RESOURCE_KINDS), _one_of(RESOURCE_KINDS, "resource kind")]
ScopeName = Annotated[str, _enum(SCOPES), _one_of(SCOPES, "scope")]
FileName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_. -]{0,99}$")]
ResourceName = Annotated[str, StringConstraints(min_length=1, max_length=200,
                                                pattern=r"^[\x21-\x7e]+$")]


class PolicyUpload(s.RequestBody):
    """A policy document to check, as the text of its YAML file; ``name`` is how messages name
    it."""

    text: Annotated[str, StringConstraints(max_length=MAX_POLICY_CHARS)]
    name: FileName = "upload.yaml"


class SamplePrincipal(s.RequestBody):
    """Who asks. ``scopes`` default to every scope the active set grants the kind (a token as
    issued)."""

    kind: PrincipalKind
    subject: s.Subject = "sample"
    project: s.Name | None = None
    scopes: list[ScopeName] | None = Field(default=None, max_length=len(SCOPES))


class SampleResource(s.RequestBody):
    kind: ResourceKind
    project: s.Name | None = None
    name: ResourceName | None = None


class SampleRequest(s.RequestBody):
    principal: SamplePrincipal
    action: ActionName
    resource: SampleResource


class PolicyProblemOut(s.ResponseBody):
    field: str  # "document" for the file as a whole
    line: int | None  # in the uploaded text, where one can be named
    message: str


class PolicyCheck(s.ResponseBody):
    valid: bool
    errors: list[PolicyProblemOut]
    summary: str
    digest: str | None  # of the set the text describes, comparable with the active set's


class SampleDecision(s.ResponseBody):
    allowed: bool
    rule: str
    reason: str
    digest: str  # of the active set that decided


def _summary(policy: PolicySet) -> str:
    doc = policy.describe()
    return (f"valid: {len(doc['rules'])} rules, {len(doc['roles'])} roles, "
            f"{len(doc['tokens'])} token kinds")


async def check_policy(request: web.Request) -> web.Response:
    body = await parse_body(request, PolicyUpload, max_bytes=MAX_POLICY_BODY)
    active = request.app[SERVICES].policies.current
    policy, problems = check_text(body.text, body.name)
    errors = [PolicyProblemOut(field=p.field or "document", line=p.line, message=p.message)
              for p in problems]
    if policy is None:
        return reply(PolicyCheck(valid=False, errors=errors, digest=None,
                                 summary=f"{len(errors)} problem(s); nothing was activated"))
    same = " (the active set)" if policy.digest == active.digest else ""
    return reply(PolicyCheck(valid=True, errors=[], digest=policy.digest,
                             summary=_summary(policy) + same))


async def decide_sample(request: web.Request) -> web.Response:
    body = await parse_body(request, SampleRequest)
    policy = request.app[SERVICES].policies.current
    asked = body.principal
    scopes = policy.scopes_for(asked.kind) if asked.scopes is None else frozenset(asked.scopes)
    decision = policy.decide(
        Principal(kind=asked.kind, subject=asked.subject, project=asked.project, scopes=scopes),
        body.action,
        Resource(kind=body.resource.kind, project=body.resource.project, name=body.resource.name))
    return reply(SampleDecision(allowed=decision.allowed, rule=decision.rule,
                                reason=decision.reason, digest=policy.digest))


ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec("POST", "/api/v1/policies/validate", check_policy,
              "Check a policy document as a reload would; nothing is activated", PolicyCheck,
              200, "policies:check", ADMIN, _singleton("policy"), PolicyUpload, tag="policies",
              max_body=MAX_POLICY_BODY),
    RouteSpec("POST", "/api/v1/policies/decide", decide_sample,
              "What the active policy set decides for a sample request", SampleDecision, 200,
              "policies:decide", ADMIN, _singleton("policy"), SampleRequest, tag="policies"),
)
