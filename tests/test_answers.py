"""Answer parsing, extraction, comparison and the Wilson interval."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kava.answers import answers_match, extract_answer, format_number, parse_number, wilson_ci


@pytest.mark.parametrize(
    "s, want",
    [
        ("1,000", 1000.0),
        ("-3.5", -3.5),
        ("$12", 12.0),
        ("12.", 12.0),
        ("1/2", 0.5),
        ("5%", 5.0),
        (" 7 ", 7.0),
        ("-$5", -5.0),
        ("$-5", -5.0),
        (".5", 0.5),
        ("1,234,567.25", 1234567.25),
        ("1e5", 100000.0),
        ("\u22127", -7.0),  # unicode minus
        (3, 3.0),
        (2.5, 2.5),
    ],
)
def test_parse_number_valid(s, want):
    assert parse_number(s) == want


@pytest.mark.parametrize("s", ["", "abc", "12 apples", "1,0000", "3,4", "nan", "inf", "--5", "1_000", None, True, float("nan")])
def test_parse_number_rejects_non_numbers(s):
    assert parse_number(s) is None


@pytest.mark.parametrize(
    "text, want",
    [
        ("1,000 dollars", 1000.0),
        ("The total is $5.", 5.0),
        ("5%", 5.0),
        ("12 dollars and 3 cents", 12.0),
        ("-3.5 degrees", -3.5),
        ("-$5.50 total", -5.5),
        ("it is .5 of it", 0.5),
        ("12. Done", 12.0),
        ("3-5 apples", 3.0),  # a range: the first number, not -5
        ("x-5", 5.0),  # a hyphen glued to a word is not a sign
        ("1,0000", 1.0),  # not a thousands group
        ("$1,000,000.25!", 1000000.25),
        ("\u22127 below", -7.0),
        ("3/4 of the cake", 0.75),
        (" 18</s>", 18.0),
    ],
)
def test_extract_answer_cases(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize("text", ["", "no number here", "-", "$", ".", None])
def test_extract_answer_none(text):
    assert extract_answer(text) is None


def test_answers_match():
    assert answers_match(1000.0, "1,000")
    assert answers_match(1000.0, 1000)
    assert answers_match(3.00001, 3)
    assert not answers_match(3.001, 3)
    assert answers_match(3244047.0999999996, "3244047.1")  # relative tolerance for large golds
    assert answers_match(3244048.0, "3244047.1")  # within 1e-4 relative: the spec's tolerance
    assert not answers_match(3244500.0, "3244047.1")
    assert not answers_match(None, 3)
    assert not answers_match(3.0, "three")
    assert answers_match("18 dollars", 18.0)


def test_format_number():
    assert format_number(5.0) == "5"
    assert format_number(-9867630.0) == "-9867630"
    assert format_number(2.5) == "2.5"
    assert format_number(3244047.0999999996) == "3244047.0999999996"
    assert format_number(1e-7) == "0.0000001"
    for x in (5.0, 2.5, 1e-7, -2.5e-10, 1e22, 0.1 + 0.2):
        assert parse_number(format_number(x)) == x


def test_wilson_ci():
    lo, hi = wilson_ci(929, 1000)
    assert (round(lo, 3), round(hi, 3)) == (0.911, 0.943)  # the sizing doc's 92.9% [91.1, 94.3]
    lo, hi = wilson_ci(40, 1000)
    assert (round(lo, 3), round(hi, 3)) == (0.030, 0.054)  # 4.0% [3.0, 5.4]
    assert wilson_ci(0, 10)[0] == 0.0 and wilson_ci(10, 10)[1] == 1.0
    assert wilson_ci(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_ci(5, 3)


@given(k=st.integers(0, 500), extra=st.integers(0, 500))
def test_wilson_ci_contains_p(k, extra):
    n = k + extra
    lo, hi = wilson_ci(k, n)
    assert 0.0 <= lo <= hi <= 1.0
    if n:
        assert lo - 1e-12 <= k / n <= hi + 1e-12


_WORD = st.text(alphabet=st.characters(categories=["L"]), min_size=1, max_size=8)
_PREFIX = st.lists(_WORD, max_size=5).map(" ".join)
_SUFFIX = st.lists(st.one_of(_WORD, st.integers(0, 999).map(str)), max_size=5).map(" ".join)
_UNIT = st.sampled_from(["", " dollars", "%", " apples", ".", ",", "!", " km/h", "/hour", " per day."])


@settings(max_examples=300, deadline=None)
@given(
    prefix=_PREFIX,
    int_part=st.integers(0, 10**9),
    frac=st.one_of(st.none(), st.text(alphabet="0123456789", min_size=1, max_size=4)),
    negative=st.booleans(),
    commas=st.booleans(),
    currency=st.sampled_from(["", "$"]),
    unit=_UNIT,
    suffix=_SUFFIX,
)
def test_extract_answer_property(prefix, int_part, frac, negative, commas, currency, unit, suffix):
    digits = f"{int_part:,}" if commas else str(int_part)
    number = digits + (f".{frac}" if frac is not None else "")
    sign = "-" if negative else ""
    text = " ".join(p for p in (prefix, f"{sign}{currency}{number}{unit}", suffix) if p)
    want = float(number.replace(",", ""))
    want = -want if negative else want
    got = extract_answer(text)
    assert got == want, text
    assert answers_match(got, number if not negative else "-" + number)
    assert not math.isnan(got)
