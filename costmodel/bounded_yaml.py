"""Bounded YAML: how meshplan reads every plan and cluster file (safe_load semantics, with limits).

A plan or cluster file is input a person edits or receives, so reading it must stay cheap whatever it holds:

- size: at most MAX_FILE_BYTES (a 1000-layer plan is about 1 MiB); larger files are refused before parsing;
- nesting: at most MAX_DEPTH levels of mappings and lists (plans use 5); deeper documents are refused while
  composing, before PyYAML's recursive composer can hit Python's recursion limit;
- aliases: at most MAX_ALIASES `*alias` references, and the document with every alias expanded at most
  MAX_EXPANDED_NODES nodes (an "alias bomb" of 9 nested lists of 9 aliases expands to 9**9 nodes; meshplan
  walks and prints values, so the expanded size is what costs);
- duplicate keys in one mapping are an error (PyYAML keeps the last silently, so a second `pipeline:` would
  quietly win).

Only SafeLoader's constructors are used: tags that would build Python objects are refused as with safe_load.
`brief` shortens any value for an error message, so no message reprs an unbounded value.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError

MAX_FILE_BYTES = 8 * 2**20
"""Largest plan or cluster file read (8 MiB)."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and lists."""
MAX_ALIASES = 1000
"""Most `*alias` references in one document."""
MAX_EXPANDED_NODES = 1_000_000
"""Most nodes of the document with every alias expanded."""
BRIEF_CHARS = 80
"""Longest repr of a value quoted in an error message."""


class YAMLLimitError(yaml.YAMLError):
    """A document over one of the limits above (or with a duplicate key); the message says which and how far."""


def brief(value: Any, limit: int = BRIEF_CHARS) -> str:
    """repr(value), cut to `limit` characters with the length left out said (never walks a huge value fully)."""
    if isinstance(value, (dict, list, tuple, set)) and len(value) > 8:
        kind = type(value).__name__
        return f"<{kind} of {len(value)} items>"
    try:
        text = repr(value)
    except RecursionError:  # a self-referencing alias (`&a [*a]`)
        return f"<self-referencing {type(value).__name__}>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit:,} more characters)"


class BoundedSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents deeper than MAX_DEPTH, with too many aliases, or with duplicate keys."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise YAMLLimitError(f"more than {MAX_ALIASES} aliases (*name references){mark}; meshplan "
                                     "files need none, write the values out")
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YAMLLimitError(f"nested more than {MAX_DEPTH} levels deep{mark}; plans and cluster "
                                     "profiles nest a few levels, so this is not one")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:
                    continue  # unhashable: the base class reports it with its mark
                if duplicate:
                    raise ConstructorError("while constructing a mapping", node.start_mark,
                                           f"found duplicate key {brief(key)}; a later value would silently "
                                           "replace the earlier one, so keep one of them", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_nodes(root: yaml.Node) -> int:
    """Nodes of the document with aliases expanded, counted without expanding them (memoised per node), and
    stopping as soon as the count passes MAX_EXPANDED_NODES."""
    sizes: dict[int, int] = {}
    order: list[tuple[yaml.Node, bool]] = [(root, False)]
    on_path: set[int] = set()
    while order:
        node, children_done = order.pop()
        key = id(node)
        if key in sizes:
            continue
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if not children_done:
            if key in on_path:  # a recursive alias: infinite when expanded
                return MAX_EXPANDED_NODES + 1
            on_path.add(key)
            order.append((node, True))
            order.extend((child, False) for child in children if id(child) not in sizes)
            continue
        on_path.discard(key)
        total = 1
        for child in children:
            if id(child) not in sizes:  # the child is an ancestor: a recursive alias
                return MAX_EXPANDED_NODES + 1
            total += sizes[id(child)]
        if total > MAX_EXPANDED_NODES:
            return total
        sizes[key] = total
    return sizes.get(id(root), 1)


def load_bounded(text: str, what: str = "file") -> Any:
    """safe_load `text` within the limits above; raises yaml.YAMLError (YAMLLimitError for a limit)."""
    if len(text) > MAX_FILE_BYTES:
        raise YAMLLimitError(f"the {what} is {len(text):,} characters, more than the {MAX_FILE_BYTES:,} "
                             "(8 MiB) meshplan reads; a plan or cluster profile is far smaller, so check that "
                             "this is the right file")
    loader = BoundedSafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded = _expanded_nodes(node)
        if expanded > MAX_EXPANDED_NODES:
            raise YAMLLimitError(f"its aliases expand to more than {MAX_EXPANDED_NODES:,} nodes (an alias bomb, "
                                 "or a recursive alias); meshplan files need no aliases, write the values out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_bounded_text(path, what: str = "file") -> str:
    """The UTF-8 text of `path`, refusing (before reading it) a file larger than MAX_FILE_BYTES.

    Raises OSError and UnicodeDecodeError as Path.read_text does, and YAMLLimitError for a file too large."""
    with open(path, "rb") as handle:
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise YAMLLimitError(f"the {what} is larger than the {MAX_FILE_BYTES:,} bytes (8 MiB) meshplan reads; a "
                             "plan or cluster profile is far smaller, so check that this is the right file")
    return data.decode("utf-8")
