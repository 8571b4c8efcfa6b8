"""Paired comparison of prediction files (``kava compare``): two models, or two modes of one, on the same questions.

Reads the ``predictions*.jsonl`` that ``kava eval`` and ``kava sweep`` write (one JSON object per line with
``question`` and ``correct``; rows are matched by ``dataset`` and ``index`` when every row has an ``index``).
Each (A, B) pair of files is one seed: the difference A - B with a paired-bootstrap 95% CI over its questions and
the exact McNemar p; with several pairs, the difference pooled over them (:func:`kava.stats.paired_bootstrap_ci`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from kava.config import ConfigError
from kava.data.formats import DataError
from kava.stats import paired_bootstrap_ci, paired_summary


def read_outcomes(path: str | Path) -> tuple[list[str], list[bool]]:
    """(questions, correct) of a predictions file, in question order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such predictions file")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict) or "question" not in row or not isinstance(row.get("correct"), bool):
            raise DataError(f"{path}:{lineno}: expected a JSON object with 'question' and a boolean 'correct' "
                            "(a predictions file of kava eval or kava sweep)")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no predictions")
    if all("index" in r for r in rows):
        rows.sort(key=lambda r: (str(r.get("dataset", "")), r["index"]))
    return [r["question"] for r in rows], [r["correct"] for r in rows]


def compare_files(a_files: Sequence[str | Path], b_files: Sequence[str | Path]) -> dict[str, Any]:
    """A - B per pair of files (seed) and pooled; refuses pairs whose questions differ."""
    if not a_files or len(a_files) != len(b_files):
        raise ConfigError(f"--a and --b: expected the same number of files (one pair per seed), "
                          f"got {len(a_files)} and {len(b_files)}")
    pairs, per_pair = [], []
    for a, b in zip(a_files, b_files):
        (qa, oa), (qb, ob) = read_outcomes(a), read_outcomes(b)
        if len(qa) != len(qb):
            raise DataError(f"{a} ({len(qa)} questions) and {b} ({len(qb)}): not the same questions")
        for i, (x, y) in enumerate(zip(qa, qb)):
            if x != y:
                raise DataError(f"{a} and {b}: question {i} differs ({x[:60]!r} against {y[:60]!r}); "
                                "a paired comparison needs the same questions")
        per_pair.append({"a": str(a), "b": str(b), "n": len(oa), "accuracy_a": sum(oa) / len(oa),
                         "accuracy_b": sum(ob) / len(ob), **paired_summary(oa, ob)})
        pairs.append((oa, ob))
    diff, lo, hi = paired_bootstrap_ci(pairs)
    return {"pairs": per_pair, "pooled_diff": diff, "pooled_diff_ci95": [lo, hi]}


def format_markdown(result: dict[str, Any]) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:+.1f}"

    lines = ["| A | B | n | A % | B % | A - B [95% CI] | McNemar p |", "|---|---|---|---|---|---|---|"]
    for p in result["pairs"]:
        lo, hi = p["diff_ci95"]
        lines.append(f"| {p['a']} | {p['b']} | {p['n']} | {100 * p['accuracy_a']:.1f} | {100 * p['accuracy_b']:.1f} "
                     f"| {pct(p['diff'])} [{pct(lo)}, {pct(hi)}] | {p['mcnemar_p']:.2g} |")
    lo, hi = result["pooled_diff_ci95"]
    lines += ["", f"pooled over {len(result['pairs'])} pair(s): A - B {pct(result['pooled_diff'])} "
                  f"[{pct(lo)}, {pct(hi)}] points"]
    return "\n".join(lines) + "\n"
