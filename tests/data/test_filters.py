"""Drop Last, the numeric-answer filter and the length filter, with their counts."""
from __future__ import annotations

from kava.data import Example
from kava.data.filters import COUNT_KEYS, apply_filters, format_counts


def _examples():
    return [
        Example("q1", ["<<1+1=2>>", "<<2*3=6>>"], "6"),            # 2 steps -> last dropped
        Example("q2", ["<<5-1=4>>"], "4"),                         # 1 step -> kept as is
        Example("q3", [], "7"),                                    # no steps
        Example("q4", ["a", "b", "c"], "twelve"),                  # non-numeric answer
        Example("q5 " + "long " * 50, ["x", "y"], "1,000"),        # too long (numeric with commas)
        Example("q6", ["s1", "s2", "s3"], "-2.5"),
    ]


def _words(ex: Example) -> int:
    return len(ex.question.split()) + len(ex.steps)


def test_all_filters_and_counts():
    src = _examples()
    kept, counts = apply_filters(src, drop_last_step=True, max_tokens=20, count_tokens=_words)
    assert kept == [
        Example("q1", ["<<1+1=2>>"], "6"),
        Example("q2", ["<<5-1=4>>"], "4"),
        Example("q3", [], "7"),
        Example("q6", ["s1", "s2"], "-2.5"),
    ]
    assert counts == {"input": 6, "kept": 4, "last_step_dropped": 4, "non_numeric_answer": 1, "too_long": 1}
    # inputs untouched
    assert src == _examples()
    assert format_counts(counts) == "kept 4/6 (last_step_dropped=4, non_numeric_answer=1, too_long=1)"


def test_length_is_counted_after_drop_last():
    ex = [Example("a b c", ["s1", "s2"], "1")]  # 3 words + 2 steps = 5; after Drop Last 4
    assert apply_filters(ex, drop_last_step=True, max_tokens=4, count_tokens=_words)[1]["too_long"] == 0
    assert apply_filters(ex, drop_last_step=False, max_tokens=4, count_tokens=_words)[1]["too_long"] == 1
    # the boundary: equal to max_tokens is kept
    assert len(apply_filters(ex, drop_last_step=False, max_tokens=5, count_tokens=_words)[0]) == 1


def test_switches_off_and_zero_counts():
    src = _examples()
    kept, counts = apply_filters(src, drop_last_step=False, max_tokens=20, count_tokens=None,
                                 require_numeric_answer=False)
    assert kept == src and kept[0] is not src[0]
    assert counts == {"input": 6, "kept": 6, "last_step_dropped": 0, "non_numeric_answer": 0, "too_long": 0}
    kept, counts = apply_filters([], drop_last_step=True, max_tokens=8, count_tokens=_words)
    assert kept == [] and set(counts) == set(COUNT_KEYS) and not any(counts.values())
    # max_tokens <= 0 disables the length filter
    kept, counts = apply_filters(src, drop_last_step=False, max_tokens=0, count_tokens=_words)
    assert counts["too_long"] == 0 and len(kept) == 5


def test_drop_last_on_a_natural_language_cot_drops_its_last_sentence():
    """NL CoTs (codi schema, e.g. zen-E/GSM8k-Aug-NL) are split into sentences; Drop Last removes the last one,
    the sentence that computes the answer, as CODI's loader does (cot.split(". ")[:-1], docs/design.md)."""
    from kava.data.formats import _parse_codi

    cot = ("Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May. "
           "The clips cost $1.50 each, so she earned 72 * 1.5 = 108 dollars.")
    ex = _parse_codi({"question": "How much?", "cot": cot, "answer": "108"}, {})
    assert len(ex.steps) == 3  # "$1.50" does not end a sentence
    (kept,), counts = apply_filters([ex], drop_last_step=True, max_tokens=None, count_tokens=None)
    assert counts["last_step_dropped"] == 1
    codi = ". ".join(cot.split(". ")[:-1]) + "."  # CODI's text for the teacher CoT (before its trailing newline)
    assert " ".join(kept.steps) == codi
    # a one-sentence CoT is kept (CODI would train that example with an empty CoT)
    one = _parse_codi({"question": "Q?", "cot": "So 2 + 2 = 4.", "answer": "4"}, {})
    (kept,), _ = apply_filters([one], drop_last_step=True, max_tokens=None, count_tokens=None)
    assert kept.steps == ["So 2 + 2 = 4."]
