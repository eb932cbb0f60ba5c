"""Hypothesis strategies shared by the adapter tests."""

from __future__ import annotations

from hypothesis import strategies as st

from particlize import ParticleMap


@st.composite
def removal_sets(draw, pm: ParticleMap, allow_all_blocks: bool = False) -> dict[str, list[int]]:
    """A random removal mapping valid for physical pruning: groups are never emptied (a block group too, unless
    ``allow_all_blocks``: removing every block of a model is refused), grouped-query heads are removed evenly
    across key/value groups, and a coarse group (key/value heads) is not cut with the finer one it contains."""
    remove: dict[str, list[int]] = {}
    for g in pm.groups:
        if not draw(st.booleans()) or g.contains in remove:  # key/value heads and their query heads: not both at once
            continue
        if g.kind == "block":
            hi = g.size if allow_all_blocks else g.size - 1
            idx = draw(st.lists(st.integers(0, g.size - 1), max_size=hi, unique=True))
        elif g.balanced > 1:
            chunk = g.size // g.balanced
            keep = draw(st.integers(1, chunk))
            idx = []
            for c in range(g.balanced):
                kept = draw(st.lists(st.integers(0, chunk - 1), min_size=keep, max_size=keep, unique=True))
                idx += [c * chunk + i for i in range(chunk) if i not in kept]
        else:
            idx = draw(st.lists(st.integers(0, g.size - 1), max_size=g.size - 1, unique=True))
        if idx:
            remove[g.name] = sorted(idx)
    return remove
