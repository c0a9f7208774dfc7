"""What every graph pass returns."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PassResult:
    """Outcome of one graph pass. Every graph pass returns one, and logs one INFO line per run saying what it did.

    name:    the pass's name ("cleanup", "linearize", ...).
    changed: how many rewrites were applied (0: the graph is unchanged).
    notes:   what was done and why candidates were refused, in words, one line each.
    """

    name: str
    changed: int = 0
    notes: list[str] = field(default_factory=list)
