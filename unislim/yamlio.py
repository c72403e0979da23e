"""YAML as pipeline files need it: PyYAML's safe loader, strict about two things it allows.

- A key given twice in one mapping is an error naming the key and both lines (PyYAML keeps the
  last one silently). Keys brought in by a merge (`<<: *base`) may be overridden, as YAML says.
- Aliases may not add more than `MAX_VALUES` values to the document, and may not refer to
  themselves. An alias costs nothing to load (the value is shared), but everything after it —
  validation, error messages, hashing the config — walks the expanded tree, so the "billion
  laughs" file would run until killed. The size is counted on the node graph before anything is
  constructed, and the error never renders the value.

Both raise a `yaml.MarkedYAMLError` subclass, so code that catches `yaml.YAMLError` catches them.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

MAX_VALUES = 100_000  # values aliases may add; a full pipeline.yaml has a few hundred values in all

_MERGE = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.MarkedYAMLError):
    pass


class AliasExpansionError(yaml.MarkedYAMLError):
    pass


class Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` that rejects duplicate keys and bounds alias expansion."""

    def compose_document(self) -> Node:
        # Composer.compose_document, keeping the anchors long enough to name one in an error
        self.get_event()  # DocumentStart
        node = self.compose_node(None, None)
        self.get_event()  # DocumentEnd
        anchors, self.anchors = self.anchors, {}
        _check_expansion(node, anchors)
        return node

    def construct_mapping(self, node: Node, deep: bool = False) -> dict:
        if isinstance(node, MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: PyYAML reports it itself
                    continue
                if first is not key_node.start_mark:
                    raise DuplicateKeyError(
                        None, None, f"duplicate key {_short(key)} (first given at line {first.line + 1}; "
                        "YAML would keep only the last value)", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _short(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 60 else text[:59] + "…"


def _check_expansion(root: Node | None, anchors: dict[str, Node]) -> None:
    """Raise if aliases make the tree `root` more than MAX_VALUES nodes bigger than it is written."""
    if root is None:
        return
    sizes: dict[int, int] = {}
    names = {id(n): a for a, n in anchors.items()}
    active: set[int] = set()
    active.add(id(root))
    stack: list[tuple[Node, list[Node], int]] = [(root, _children(root), 0)]  # (node, children, next child)
    while stack:  # iterative post-order: a deep document must not overflow the Python stack
        node, children, i = stack[-1]
        if i < len(children):
            stack[-1] = (node, children, i + 1)
            child = children[i]
            if id(child) in active:
                raise AliasExpansionError(None, None, f"alias *{names.get(id(child), '?')} refers to "
                                          "the value that contains it (a recursive alias)", child.start_mark)
            if id(child) not in sizes:
                active.add(id(child))
                stack.append((child, _children(child), 0))
            continue
        stack.pop()
        active.discard(id(node))
        size = 1 + sum(sizes[id(c)] for c in children)
        sizes[id(node)] = size
        if size - len(sizes) > MAX_VALUES:  # more than MAX_VALUES of `size` are copies made by aliases
            biggest = max((n for n in anchors.values() if id(n) in sizes), key=lambda n: sizes[id(n)], default=None)
            where = (f"; anchor &{names[id(biggest)]} at line {biggest.start_mark.line + 1} alone expands to "
                     f"{sizes[id(biggest)]:,}") if biggest is not None else ""
            raise AliasExpansionError(None, None, f"aliases expand the document by more than {MAX_VALUES:,} "
                                      f"values{where} (is it a 'billion laughs' file?)", (biggest or node).start_mark)


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return node.value
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


class NestingError(yaml.YAMLError):
    pass


def load(text: str) -> Any:
    """Parse one YAML document with `Loader` (raises `yaml.YAMLError`)."""
    try:
        return yaml.load(text, Loader=Loader)  # a SafeLoader subclass
    except RecursionError:  # PyYAML composes and constructs recursively
        raise NestingError("values nested too deeply (thousands of levels)") from None


def describe(e: yaml.YAMLError) -> str:
    """One line for a YAML error: `line L, column C: problem` (no snippet of the source)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{where}{problem}{f' ({context})' if context else ''}".split())
