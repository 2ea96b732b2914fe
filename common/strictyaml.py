"""One YAML reader for everything an operator or admin writes: configurations, policies, templates.

It is PyYAML's safe loader (plain data only, no Python objects) that additionally refuses aliases
(no "billion laughs" expansion) and a mapping key given twice (PyYAML would keep the last one
silently, so a reviewer could read one value while another applies).
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

YAMLError = yaml.YAMLError


class FileError(Exception):
    """A YAML file that cannot be read or parsed; the message names the file and the problem."""


class StrictLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
            raise yaml.composer.ComposerError(None, None, "aliases are not allowed",
                                              event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                break  # SafeLoader's own construct_mapping names the unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class _AliasFreeDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(data: Any) -> str:
    """YAML text that ``load`` reads back: shared objects are written out again, never aliased."""
    return yaml.dump(data, Dumper=_AliasFreeDumper, sort_keys=False)


def load(text: str | bytes) -> Any:
    """Parse one YAML document strictly; raises ``YAMLError`` with the position of the problem."""
    return yaml.load(text, Loader=StrictLoader)


def load_file(path: Path, max_bytes: int) -> Any:
    """The one document of file ``path``, of at most ``max_bytes``; FileError says what is wrong
    in one line (where in the file, for a syntax error)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise FileError(f"{path} is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        return load(raw)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise FileError(f"{path} is not valid YAML: {problem}{where}") from None


def load_with_nodes(text: str | bytes) -> tuple[Any, yaml.Node | None]:
    """``load``, also returning the document's node tree, whose nodes know their lines (for
    messages naming where in the text a value is)."""
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        return (None if node is None else loader.construct_document(node)), node
    except RecursionError:
        # The parser recurses per nesting level: a small text can nest deeper than the stack.
        raise YAMLError("nested too deeply") from None
    finally:
        loader.dispose()
