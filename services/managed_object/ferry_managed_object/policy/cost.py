"""A static bound on what one evaluation of a policy expression may cost."""

from __future__ import annotations

from typing import Any

from lark import Token, Tree

from ferry_common.messages.limits import MAX_JSON_ITEMS

# A static bound on what one evaluation may cost, in syntax-tree nodes visited: each
# comprehension macro (all, exists, exists_one, map, filter) may visit its body once per item
# of a list or map, and no JSON container holds more than MAX_JSON_ITEMS. Nested
# comprehensions multiply; 1 KiB of text could otherwise ask for 256^n steps.
MAX_COST = 10_000  # about 0.1 s of cel-python on this machine
_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})


def cost(tree: Any) -> int:
    """The most nodes one evaluation of the parsed expression ``tree`` can visit."""
    if not isinstance(tree, Tree):
        return 1
    if tree.data == "member_dot_arg" and len(tree.children) >= 3:
        name = tree.children[1]
        if isinstance(name, Token) and str(name) in _MACROS:
            target, _, args = tree.children[0], name, tree.children[2]
            return 1 + cost(target) + MAX_JSON_ITEMS * cost(args)
    return 1 + sum(cost(c) for c in tree.children)

