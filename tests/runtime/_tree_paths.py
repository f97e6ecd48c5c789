"""Paths of a tree of candidates, for the tree-attention tests of both runtimes."""

from __future__ import annotations

from collections.abc import Sequence


def paths(tree: Sequence[int]) -> list[list[int]]:
    """Each node's path from the row's first token (row indices; ``tree`` holds parents, -1 root)."""
    out = []
    for i in range(len(tree)):
        path = [i]
        while tree[path[0]] >= 0:
            path.insert(0, tree[path[0]])
        out.append(path)
    return out
