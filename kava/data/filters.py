"""Data preparation filters (as in CODI and PCCoT): Drop Last, numeric answers, length.

Order of operations, per example:

1. **Drop Last**: when ``drop_last_step`` is set and the example has at least
   two CoT steps, its last step is removed (it usually restates the answer).
   An example with a single step keeps it, so that the teacher always has a
   CoT to compress. This is counted under ``last_step_dropped``; it does not
   remove the example.
2. **Numeric answer**: with ``require_numeric_answer``, an example whose answer
   does not parse as a number (:func:`kava.answers.parse_number`) is removed
   (``non_numeric_answer``).
3. **Length**: when ``count_tokens`` is given and ``max_tokens > 0``, an example
   with ``count_tokens(example) > max_tokens`` is removed (``too_long``). The
   count is taken after Drop Last, i.e. on what will be trained on.

Input examples are never mutated; order is preserved.
"""
from __future__ import annotations

from typing import Callable, Iterable

from kava.answers import parse_number
from kava.data import Example

__all__ = ["apply_filters", "format_counts", "COUNT_KEYS"]

COUNT_KEYS = ("input", "kept", "last_step_dropped", "non_numeric_answer", "too_long")


def apply_filters(
    examples: Iterable[Example],
    *,
    drop_last_step: bool,
    max_tokens: int | None,
    count_tokens: Callable[[Example], int] | None,
    require_numeric_answer: bool = True,
) -> tuple[list[Example], dict[str, int]]:
    """Apply Drop Last, the numeric-answer filter and the length filter.

    Returns the kept examples (new objects) and counts with every key of
    :data:`COUNT_KEYS`, zeros included: ``input``, ``kept``,
    ``last_step_dropped`` (examples whose last step was dropped, not a removal),
    ``non_numeric_answer`` and ``too_long`` (removals).
    """
    counts = {k: 0 for k in COUNT_KEYS}
    kept: list[Example] = []
    limit = max_tokens if (count_tokens is not None and max_tokens is not None and max_tokens > 0) else None
    for ex in examples:
        counts["input"] += 1
        steps = list(ex.steps)
        if drop_last_step and len(steps) >= 2:
            steps = steps[:-1]
            counts["last_step_dropped"] += 1
        new = Example(question=ex.question, steps=steps, answer=ex.answer)
        if require_numeric_answer and parse_number(ex.answer) is None:
            counts["non_numeric_answer"] += 1
            continue
        if limit is not None and count_tokens(new) > limit:
            counts["too_long"] += 1
            continue
        kept.append(new)
    counts["kept"] = len(kept)
    return kept, counts


def format_counts(counts: dict[str, int]) -> str:
    """One log line, e.g. ``kept 7400/7473 (last_step_dropped=7380, non_numeric_answer=0, too_long=73)``."""
    extra = [k for k in counts if k not in COUNT_KEYS]
    parts = [f"{k}={counts.get(k, 0)}" for k in ("last_step_dropped", "non_numeric_answer", "too_long", *extra)]
    return f"kept {counts.get('kept', 0)}/{counts.get('input', 0)} ({', '.join(parts)})"
