"""Template documents: the ``Template`` model, its YAML text parsed and checked statically, and
the shipped directory (``templates/``) the store is seeded from.

A template is a YAML document: ``name``, ``kind`` (``dsn`` or ``job``), ``description``, typed
``parameters`` a user sets, typed ``site`` values only the admin sets (``site.NAME`` in the body)
and a jinja2 ``body`` (format: ``templates/README.md``). Building a ``Template``
checks the declarations and the body's grammar; the dry render an admin's save also needs is
``render.check_template``.

The only module of the package with I/O: ``load_template``/``load_templates``/``read_shipped``
read the shipped directory.
"""

from __future__ import annotations

import functools
import re
import sysconfig
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator

from common import strictyaml
from controlplane.errors import ConfigurationError, InvalidRequest, NotFound
from controlplane.templates.base import FieldErrors, Kind, Strict, field_errors, invalid, show
from controlplane.templates.parameters import COMMAND_TYPES, Parameter, SiteValue
from controlplane.templates.sandbox import parse_body

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
MAX_SOURCE_BYTES = 256 * 1024
MAX_BODY_CHARS = 64 * 1024
KIND_DIRECTORIES: dict[Kind, str] = {"dsn": "dsn", "job": "jobs"}
_NAME = re.compile(NAME_PATTERN)
ParamName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


class Template(Strict):
    """A template whose declarations are coherent and whose body passed the static check."""

    name: str = Field(pattern=NAME_PATTERN)
    kind: Kind
    description: str = Field(default="", max_length=2000)
    parameters: dict[ParamName, Parameter] = Field(default_factory=dict, max_length=64)
    site: dict[ParamName, SiteValue] = Field(default_factory=dict, max_length=64)
    body: str = Field(min_length=1, max_length=MAX_BODY_CHARS)

    @field_validator("parameters")
    @classmethod
    def _no_user_commands(cls, parameters: dict[str, Parameter]) -> dict[str, Parameter]:
        commands = sorted(name for name, p in parameters.items() if p.type in COMMAND_TYPES)
        if commands:
            raise ValueError(f"{', '.join(commands)}: a command is code the job runs; declare it "
                             "under site, where only an admin sets it")
        return parameters

    @field_validator("body")
    @classmethod
    def _body_is_safe(cls, body: str, info: ValidationInfo) -> str:
        kind = info.data.get("kind")
        if kind is not None:  # else the kind's own error is reported
            parse_body(kind, body)
        return body


def _yaml_error(exc: yaml.YAMLError, field: str) -> dict[str, Any]:
    return {"field": field, "message": " ".join(str(exc).split())}


def load_yaml(text: str, field: str) -> Any:
    """YAML read by ``common.strictyaml`` (no aliases, no duplicate keys); InvalidRequest naming
    ``field`` otherwise."""
    try:
        return strictyaml.load(text)
    except strictyaml.YAMLError as exc:
        raise invalid("not valid YAML", [_yaml_error(exc, field)]) from None


def _key_line(node: yaml.Node, field: str) -> tuple[int, yaml.Node | None]:
    """The file line (1 = first) of the deepest key on ``field``'s dotted path that the document
    has (parts it lacks, such as pydantic's union tags, are skipped), and that key's value."""
    line, found = node.start_mark.line + 1, None
    for part in field.split("."):
        if isinstance(node, yaml.MappingNode):
            match = next((value for key, value in node.value
                          if isinstance(key, yaml.ScalarNode) and key.value == part), None)
            if match is not None:
                line = next(key.start_mark.line + 1 for key, value in node.value if value is match)
                node = found = match
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = found = node.value[int(part)]
            line = node.start_mark.line + 1
    return line, found


def _line(root: yaml.Node, error: dict[str, Any]) -> int:
    if error["field"] == "config":  # the rendered output: its body made it
        return _key_line(root, "body")[0]
    line, node = _key_line(root, error["field"])
    body_line = error.get("body_line")
    # A literal block (body: |) keeps the file's lines: the body's line k is k lines below "|".
    if body_line is not None and isinstance(node, yaml.ScalarNode) and node.style == "|":
        return int(node.start_mark.line) + 1 + int(body_line)
    return line


def located(errors: FieldErrors, source_text: str) -> FieldErrors:
    """``errors`` of the template ``source_text``, each with ``line``: where in the file its
    field is (an admin edits the file, so a line within the body or a JSON request means
    nothing to them)."""
    try:
        root = yaml.compose(source_text, Loader=strictyaml.StrictLoader)
    except yaml.YAMLError:
        root = None
    out = []
    for error in errors:
        fixed = {key: value for key, value in error.items() if key != "body_line"}
        if "line" not in fixed:
            fixed["line"] = 1 if root is None else _line(root, error)
        out.append(fixed)
    return out


def parse_template(source_text: str) -> Template:
    """A template document (YAML) as a ``Template``; InvalidRequest lists every problem by field
    and file line."""
    if not isinstance(source_text, str) or len(source_text.encode()) > MAX_SOURCE_BYTES:
        raise invalid("template rejected", [
            {"field": "(top level)", "message": f"must be YAML text of at most "
                                                f"{MAX_SOURCE_BYTES} bytes", "line": 1}])
    try:
        data = strictyaml.load(source_text)
    except strictyaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        error = {**_yaml_error(exc, "(top level)"), "line": mark.line + 1 if mark else 1}
        raise invalid("template rejected: not valid YAML", [error]) from None
    try:
        return Template.model_validate(data)
    except ValidationError as exc:
        raise invalid("template rejected",
                      located(field_errors(exc, ""), source_text)) from None


# Checking a template costs milliseconds and every session open needs its template: a template's
# text decides the result, and Templates are frozen, so one parse per text serves every request.
parse_template_cached = functools.lru_cache(maxsize=128)(parse_template)


def shipped_templates_dir() -> Path:
    """The templates shipped with the package: the source tree's, else the installed data copy."""
    source = Path(__file__).resolve().parents[2] / "templates"  # above controlplane/templates/
    if source.is_dir():
        return source
    return Path(sysconfig.get_paths()["purelib"]) / "dsn_data" / "templates"


def _template_file(root: Path, name: str) -> tuple[Path, Kind] | None:
    base = root.resolve()
    for kind, directory in KIND_DIRECTORIES.items():
        path = (base / directory / f"{name}.yaml").resolve()
        if not path.is_relative_to(base):  # a symbolic link out of the directory
            raise invalid("invalid template name", [
                {"field": "name", "message": f"{name!r} resolves outside {root}"}])
        if path.is_file():
            return path, kind
    return None


def load_template(root: Path, name: Any) -> Template:
    """The template ``name`` from ``root/dsn`` or ``root/jobs``; names never leave ``root``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise invalid("invalid template name", [
            {"field": "name", "message": f"{show(name)} does not match {NAME_PATTERN}"}])
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


def read_shipped() -> dict[str, tuple[str, str]]:
    """The shipped templates' kinds and source texts (validated by ``load_templates``)."""
    root = shipped_templates_dir()
    return {name: (t.kind, (root / KIND_DIRECTORIES[t.kind] / f"{name}.yaml").read_text("utf-8"))
            for name, t in load_templates(root).items()}
