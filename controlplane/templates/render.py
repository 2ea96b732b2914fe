"""Rendering: user values validated against the policy, a render under a time and output-size
budget, and the output validated in turn; also the dry render that checks an admin's save.

Rendering runs in the sandbox (``sandbox``) under a budget checked on every loop step and output
chunk. DSN output is re-read with a safe YAML loader (no aliases, no duplicate keys) and
validated by ``common.config.parse_config``, the schema the gateway's own file uses; job output
must be a ``#!`` script free of control characters.
"""

from __future__ import annotations

import re
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import Template as CompiledTemplate
from jinja2 import TemplateError

from common.config import ConfigError, DSNConfig, parse_config
from controlplane.errors import InvalidRequest
from controlplane.policy import PolicySet
from controlplane.templates.base import invalid, show
from controlplane.templates.loader import Template, load_yaml, located, parse_template
from controlplane.templates.parameters import check_value
from controlplane.templates.sandbox import compiled_body
from controlplane.templates.system import SYSTEM_MODELS, System, sample_system, validate_system

DEFAULT_MAX_SECONDS = 1.0
DEFAULT_MAX_BYTES = 64 * 1024


def _param_field(name: Any) -> str:
    return f"params.{name}" if isinstance(name, str) and re.fullmatch(r"[a-z0-9_]{1,32}", name) \
        else "params"


def validate_params(template: Template, values: Any, policy: PolicySet) -> dict[str, Any]:
    """Every declared parameter's canonical value (user's, else default); InvalidRequest lists every
    bad, unknown or missing parameter under ``params.<name>``."""
    if not isinstance(values, Mapping):
        raise invalid("invalid parameters", [
            {"field": "params", "message": f"must be an object, not {show(values)}"}])
    known = sorted(template.parameters)
    errors = [{"field": _param_field(name),
               "message": f"unknown parameter {show(name)}; {template.name} takes {known}"}
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
        raise invalid(f"invalid parameters for template {template.name!r}", errors)
    return result


def validate_site(template: Template, policy: PolicySet) -> None:
    """The admin's site values checked against the policy too (their form was checked when the
    template was built); InvalidRequest names each bad one under ``site.<name>``."""
    errors = []
    for name, value in template.site.items():
        try:
            check_value(value, value.value, policy)
        except ValueError as exc:
            errors.append({"field": f"site.{name}", "message": str(exc)})
    if errors:
        raise invalid(f"invalid site values in template {template.name!r}", errors)


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
    data = load_yaml(text, "config")
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise invalid("the rendered configuration is invalid",
                      [{"field": "config", "message": str(exc)}]) from None


def _validated_script(text: str) -> str:
    if not text.startswith("#!"):
        raise invalid("the rendered job script is invalid",
                      [{"field": "body", "message": "a job script must start with #!"}])
    if any(not (c.isprintable() or c in "\n\t") for c in text):
        raise invalid("the rendered job script is invalid",
                      [{"field": "body", "message": "contains a control character"}])
    return text


def _body_line(exc: BaseException) -> int | None:
    """The body line a render failed at: jinja2 rewrites its traceback so that the template's
    own frames carry the template's line numbers."""
    lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__)
             if frame.filename == "<template>"]
    return lines[-1] if lines else None


def render(template: Template, params: Mapping[str, Any], system: System, *,
           max_seconds: float = DEFAULT_MAX_SECONDS,
           max_bytes: int = DEFAULT_MAX_BYTES) -> Rendered:
    """Render validated ``params`` (from ``validate_params``) and ``system`` (from
    ``validate_system``) within the time and size bounds, then validate the output."""
    if not isinstance(system, SYSTEM_MODELS[template.kind]):
        raise TypeError(f"a {template.kind} template needs {SYSTEM_MODELS[template.kind].__name__}")
    if set(params) != set(template.parameters):
        raise invalid("invalid parameters", [
            {"field": "params", "message": "pass the result of validate_params"}])
    budget = _Budget(max_seconds, max_bytes)
    context = {"params": _metered(dict(params), budget),
               "site": _metered({name: s.value for name, s in template.site.items()}, budget),
               "system": _metered(system.model_dump(mode="json"), budget)}
    try:
        text = _generate(compiled_body(template.kind, template.body), context, budget)
    except (TemplateError, _RenderLimit) as exc:
        line = _body_line(exc)
        raise invalid(f"template {template.name!r} failed to render", [
            {"field": "body", "message": str(exc), **({} if line is None else {"body_line": line})},
        ]) from None
    if template.kind == "dsn":
        return Rendered(text, _validated_config(text))
    return Rendered(_validated_script(text), None)


def render_values(template: Template, values: Any, system_values: Mapping[str, Any],
                  policy: PolicySet, *, max_seconds: float = DEFAULT_MAX_SECONDS,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> Rendered:
    """Validate user ``values``, the site values and ``system_values`` against ``policy``, then
    ``render``."""
    params = validate_params(template, values, policy)
    validate_site(template, policy)
    system = validate_system(template.kind, system_values, policy)
    try:
        return render(template, params, system, max_seconds=max_seconds, max_bytes=max_bytes)
    except InvalidRequest as exc:  # its caller holds no source to place a body line in
        raise InvalidRequest(exc.detail, errors=[
            {k: v for k, v in e.items() if k != "body_line"} for e in exc.errors]) from None


def _saved_value_errors(exc: InvalidRequest) -> InvalidRequest:
    """Parameter errors of a dry run are errors in the template's own defaults or examples."""
    errors = [{"field": e["field"].replace("params.", "parameters.", 1),
               "message": f"default or example: {e['message']}"} for e in exc.errors]
    return invalid("template rejected", errors)


def check_template(source_text: str, policy: PolicySet) -> Template:
    """Parse, statically check and dry-render a template an admin wants to save, with its
    defaults and examples, so that every error shows at save time, at its line in the file."""
    template = parse_template(source_text)
    try:
        validate_site(template, policy)
        examples = {name: p.example for name, p in template.parameters.items()
                    if p.example is not None}
        try:
            params = validate_params(template, examples, policy)
        except InvalidRequest as exc:
            raise _saved_value_errors(exc) from None
        system = validate_system(template.kind, sample_system(template.kind), policy)
        render(template, params, system)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.detail, errors=located(exc.errors, source_text)) from None
    return template
