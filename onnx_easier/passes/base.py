"""What every graph pass returns."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PassResult:
    """Outcome of one graph pass: ``changed`` counts rewrites applied; ``notes`` says in words what was done
    and why candidates were refused (one line each)."""

    name: str
    changed: int = 0
    notes: list[str] = field(default_factory=list)
