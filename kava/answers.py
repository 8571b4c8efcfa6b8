"""Numeric answers: parsing gold answers, extracting predictions, comparing them.

The prediction is the first number in the decoded text after the answer prompt
``P`` (the caller strips P). Numbers may carry thousands commas (``1,000``), a
sign (``-3``, ``−3``), decimals (``3.5``, ``.5``, ``12.``), a currency symbol
(``$5``, ``-$5``, ``$-5``), a percent sign or a unit word (``12 dollars``), and
may be a simple fraction (``1/2``).
"""
from __future__ import annotations

import math
import re
from decimal import Decimal

__all__ = ["parse_number", "extract_answer", "answers_match", "wilson_ci", "format_number"]

_MINUS = "-\u2212"  # ASCII hyphen-minus and the unicode minus sign
_CURRENCY = "$\u20ac\u00a3\u00a5"  # $ € £ ¥

# Unsigned magnitude: thousands-grouped first (so "1,000" is one number), then
# plain digits with optional decimals, then a bare leading-dot decimal (".5").
_MAG = r"(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"

# A number inside free text. The leading sign only counts when it is not glued
# to a preceding word, digit or dot ("x-5" and "3-5" give 5 and 3, not -5).
_NUM_IN_TEXT = re.compile(
    rf"(?P<sign>(?<![\w.{_MINUS}])[{_MINUS}+])?"
    rf"(?P<cur>[{re.escape(_CURRENCY)}])?"
    rf"(?P<sign2>(?<=[{re.escape(_CURRENCY)}])[{_MINUS}])?"
    rf"(?P<mag>{_MAG})"
    rf"(?:/(?P<den>\d+)(?![\d.]))?"
)

# A whole string that is one number (parse_number is strict: "12 apples" is not a number).
_NUM_FULL = re.compile(
    rf"(?P<sign>[{_MINUS}+])?"
    rf"(?P<cur>[{re.escape(_CURRENCY)}])?"
    rf"(?P<sign2>(?<=[{re.escape(_CURRENCY)}])[{_MINUS}])?"
    rf"(?P<mag>{_MAG})"
    rf"(?:/(?P<den>\d+))?"
    r"%?\.?"
)
_SCI = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d+")


def _value(m: re.Match) -> float | None:
    mag = m.group("mag")
    try:
        val = float(mag.replace(",", ""))
    except ValueError:  # pragma: no cover - the regex only admits valid floats
        return None
    den = m.group("den")
    if den is not None and "." not in mag and "," not in mag and int(den) != 0:
        val = val / int(den)
    sign = m.group("sign")
    negative = (sign is not None and sign in _MINUS) or m.group("sign2") is not None
    val = -val if negative else val
    return val if math.isfinite(val) else None


def parse_number(s: str | float | int | None) -> float | None:
    """Parse a string that is exactly one number; ``None`` for anything else.

    Accepts ``"1,000"``, ``"-3.5"``, ``"$12"``, ``"12."``, ``"5%"`` (-> 5.0),
    ``"1/2"`` (-> 0.5), ``"1e5"``; surrounding whitespace is ignored. Numbers
    (int/float, not bool) are passed through; NaN and infinities give ``None``.
    """
    if s is None or isinstance(s, bool):
        return None
    if isinstance(s, (int, float)):
        v = float(s)
        return v if math.isfinite(v) else None
    if not isinstance(s, str):
        return None
    t = s.strip()
    if not t:
        return None
    m = _NUM_FULL.fullmatch(t)
    if m is not None:
        return _value(m)
    if _SCI.fullmatch(t):
        v = float(t)
        return v if math.isfinite(v) else None
    return None


def extract_answer(text: str | None) -> float | None:
    """The first number in ``text`` (e.g. the decoded answer after the prompt), or ``None``."""
    if not text:
        return None
    for m in _NUM_IN_TEXT.finditer(text):
        v = _value(m)
        if v is not None:
            return v
    return None


def answers_match(pred: float | str | None, gold: float | str | int | None) -> bool:
    """True when ``pred`` equals ``gold`` numerically: ``|pred - gold| < 1e-4 * max(1, |gold|)``.

    ``gold`` may be a string (``"1,000"``); a string ``pred`` is parsed with
    :func:`extract_answer`. A missing or non-numeric side never matches.
    """
    g = parse_number(gold)
    if g is None:
        return False
    if isinstance(pred, str):
        p = extract_answer(pred)
    else:
        p = parse_number(pred)
    if p is None:
        return False
    return abs(p - g) < 1e-4 * max(1.0, abs(g))


def format_number(x: float | int) -> str:
    """Canonical answer string for a number: ``5.0 -> "5"``, ``2.5 -> "2.5"``, ``-1e6 -> "-1000000"``."""
    if isinstance(x, bool):
        raise TypeError("format_number: expected a number, got bool")
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"format_number: {x!r} is not finite")
    if v.is_integer():
        return str(int(v))
    r = repr(v)
    if "e" in r or "E" in r:  # very small non-integers: positional notation, same digits
        r = format(Decimal(r), "f")
    return r


def wilson_ci(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` trials, clipped to [0, 1].

    ``n == 0`` gives the uninformative ``(0.0, 1.0)``.
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson_ci: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)
