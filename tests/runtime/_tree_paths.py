"""Trees of candidates for the tree-attention tests of both runtimes: each node's path, and the
scripted proposals their proposers make."""

from __future__ import annotations

from collections.abc import Sequence

from infercc.runtime.speculative.proposer import Proposal


def paths(tree: Sequence[int]) -> list[list[int]]:
    """Each node's path from the row's first token (row indices; ``tree`` holds parents, -1 root)."""
    out = []
    for i in range(len(tree)):
        path = [i]
        while tree[path[0]] >= 0:
            path.insert(0, tree[path[0]])
        out.append(path)
    return out


def scripted(truth: Sequence[int], vocab: int, call: int) -> Proposal:
    """The proposal of the ``call``-th step before the 3 ``truth`` tokens: every third a chain of
    wrong guesses, else a tree whose true path runs through a wrong sibling at each depth."""
    t = list(truth)
    wrong = [(x + 1) % vocab for x in t]
    if call % 3 == 0:
        return Proposal([wrong[0], wrong[1], wrong[2]], parents=[-1, 0, 0])
    return Proposal([wrong[0], t[0], wrong[1], t[1], wrong[2], t[2]], parents=[-1, -1, 0, 1, 1, 3])
