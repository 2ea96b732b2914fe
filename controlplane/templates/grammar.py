"""The grammar of template bodies: the small jinja2 subset an admin may write, checked statically
on the parsed tree when a template is built.

Only output, ``if`` and non-nested ``for`` over ``params``/``site``/``system`` are allowed, every
interpolation must end in ``| yaml`` (DSN) or ``| shquote`` (job), and no call, assignment,
arithmetic, include, macro, unknown name, underscore or internal attribute may appear. A render
bomb therefore cannot even be written. The sandbox (``sandbox``) enforces the same loop attributes
and tests again at render time.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from jinja2 import nodes

from controlplane.templates.base import BodyError

_ROOTS = frozenset({"params", "site", "system"})
LOOP_ATTRS = frozenset({"index", "index0", "revindex", "revindex0", "first", "last", "length"})
_OUTPUT_FILTER: dict[str, str] = {"dsn": "yaml", "job": "shquote"}
TESTS = frozenset({"defined", "none", "true", "false"})
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
    filters: Collection[str]  # the names the kind's sandbox environment defines
    problems: list[tuple[int | None, str]]
    loop_names: set[str]
    loop_depth: int = 0

    def fail(self, node: nodes.Node, message: str) -> None:
        self.problems.append((node.lineno, message))

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
            self.fail(node, f"{node.name!r} is not available; templates see only params, site, "
                            "system and loop variables")
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
        elif isinstance(owner, nodes.Name) and owner.name == "loop" and key not in LOOP_ATTRS:
            self.fail(node, f"loop.{key} is not allowed; use one of {sorted(LOOP_ATTRS)}")

    def visit_Filter(self, node: nodes.Filter, depth: int) -> bool:
        if node.name not in self.filters:
            self.fail(node, f"filter {node.name!r} is not allowed in a {self.kind} template; "
                            f"use {sorted(self.filters)}")
        self._no_arguments(node)
        return True

    def visit_Test(self, node: nodes.Test, depth: int) -> bool:
        if node.name not in TESTS:
            self.fail(node, f"test {node.name!r} is not allowed; use {sorted(TESTS)}")
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
            self.fail(node, "a loop may only iterate over params, site or system values")
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


def check_body(tree: nodes.Template, kind: str, filters: Collection[str]) -> None:
    """BodyError listing every construct of ``tree`` outside the allowed subset, by line;
    ``filters`` come from the sandbox, which defines them, so the grammar never imports it."""
    checker = _BodyChecker(kind, filters, [], set())
    checker.visit(tree)
    if checker.problems:
        raise BodyError(checker.problems)
