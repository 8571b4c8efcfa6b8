"""Data: source loaders, filters, the synthetic demo task and batch collation."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Example:
    """One problem: a question, its CoT steps (may be empty) and the gold answer string."""

    question: str
    steps: list[str] = field(default_factory=list)
    answer: str = ""
