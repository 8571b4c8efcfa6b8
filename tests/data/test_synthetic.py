"""The synthetic demo task: determinism, disjoint splits, ranges, correct arithmetic, both CoT styles."""
from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from kava.data import Example
from kava.data.formats import load_examples
from kava.data.synthetic import (
    DEFAULT_RANGES,
    NumberRanges,
    generate_problem,
    make_example,
    make_heldout,
    make_splits,
    sample_problem,
    write_jsonl,
)

EQ = re.compile(r"<<(\d+)([+\-*])(\d+)=(\d+)>>")
NL = re.compile(r"^[A-Z][a-z]+ has (\d+) ([+\-*]) (\d+) = (\d+) [a-z ]+\.$")


def _check_chain(steps: list[str], answer: str, pattern: re.Pattern, r: NumberRanges = DEFAULT_RANGES) -> None:
    prev = None
    for step in steps:
        m = pattern.fullmatch(step)
        assert m, step
        a, op, b, res = int(m[1]), m[2], int(m[3]), int(m[4])
        assert res == (a + b if op == "+" else a - b if op == "-" else a * b), step
        assert 1 <= res <= r.max_value and 1 <= a <= r.max_value
        if op == "*":
            assert r.mul[0] <= b <= r.mul[1]
        else:
            assert r.add[0] <= b <= r.add[1]
        if prev is not None:  # dependent: each step starts from the previous result
            assert a == prev, steps
        prev = res
    assert answer == str(prev)


def test_problems_are_correct_and_in_range():
    rng = random.Random(123)
    counts = Counter()
    kinds = Counter()
    for _ in range(2000):
        p = sample_problem(rng)
        counts[p.num_steps] += 1
        kinds[p.kind] += 1
        assert 2 <= p.num_steps <= 4
        assert len(p.nl_steps) == p.num_steps
        _check_chain(p.equations, p.answer, EQ)
        _check_chain(p.nl_steps, p.answer, NL)
        assert p.values[-1] == int(p.answer)
        # the answer never appears as a number in the question
        assert not re.search(rf"(?<!\d){p.answer}(?!\d)", p.question), p.question
        assert p.question.endswith("?")
    # 2, 3 and 4 steps about equally likely; both story shapes used
    assert set(counts) == {2, 3, 4} and min(counts.values()) > 550
    assert min(kinds.values()) > 800


def test_fixed_step_count_and_styles():
    rng = random.Random(0)
    for n in (2, 3, 4):
        p = sample_problem(rng, num_steps=n)
        assert p.num_steps == n
        eq, nl = make_example(p, "equations"), make_example(p, "nl")
        assert eq.question == nl.question == p.question and eq.answer == nl.answer == p.answer
        assert eq.steps == p.equations and nl.steps == p.nl_steps
    with pytest.raises(ValueError):
        make_example(p, "latex")
    ex = generate_problem(random.Random(5), 3)
    assert isinstance(ex, Example) and len(ex.steps) == 3 and EQ.fullmatch(ex.steps[0])
    assert generate_problem(random.Random(5), 3, style="nl").question == ex.question


def test_compound_phrasings_and_variety():
    rng = random.Random(7)
    qs = [sample_problem(rng).question for _ in range(3000)]
    text = " ".join(qs)
    for phrase in ("times as many", "twice as many", "doubles", "fewer", "more", " in each "):
        assert phrase in text, phrase
    assert len({q.split()[0] for q in qs}) >= 15  # many names
    assert len(set(qs)) > 2990  # almost no duplicates


def test_determinism_and_disjoint_splits():
    a_train, a_test = make_splits(600, 200, seed=3)
    b_train, b_test = make_splits(600, 200, seed=3)
    assert a_train == b_train and a_test == b_test
    c_train, c_test = make_splits(600, 200, seed=4)
    assert c_test != a_test
    assert len(a_train) == 600 and len(a_test) == 200
    tq, sq = [e.question for e in a_train], [e.question for e in a_test]
    assert len(set(tq)) == 600 and len(set(sq)) == 200 and not set(tq) & set(sq)
    # same seed, NL style: the same problems
    n_train, n_test = make_splits(600, 200, seed=3, style="nl")
    assert [e.question for e in n_test] == sq and [e.answer for e in n_train] == [e.answer for e in a_train]
    assert all(NL.fullmatch(s) for e in n_test for s in e.steps)
    # the most common test answer is rare: guessing it scores only a few percent
    top = Counter(e.answer for e in make_splits(0, 1000, seed=0)[1]).most_common(1)[0][1]
    assert top / 1000 < 0.05


def test_write_jsonl_roundtrip(tmp_path):
    train, _ = make_splits(50, 0, seed=1)
    path = write_jsonl(train, tmp_path / "sub" / "train.jsonl")
    res = load_examples(str(path))
    assert res.format == "gsm8k-aug" and res.examples == train
    nl_train, _ = make_splits(50, 0, seed=1, style="nl")
    assert load_examples(str(write_jsonl(nl_train, tmp_path / "nl.jsonl"))).examples == nl_train


def test_seed_zero_is_stable_across_runs():
    # pinned: a change here changes every demo dataset (and its reported numbers)
    q = ("Leo has 21 marbles. Carlos has 12 fewer marbles than Leo. Ivy collects 4 times as many marbles as "
         "Carlos. Ravi has 49 more marbles than Ivy. How many marbles does Ravi have in total?")
    assert generate_problem(random.Random(0)) == Example(q, ["<<21-12=9>>", "<<9*4=36>>", "<<36+49=85>>"], "85")
    assert generate_problem(random.Random(0), style="nl").steps == [
        "Carlos has 21 - 12 = 9 marbles.", "Ivy has 9 * 4 = 36 marbles.", "Ravi has 36 + 49 = 85 marbles."]


@pytest.mark.parametrize("ranges", [NumberRanges(100, (1, 20), (2, 6), (2, 30)), NumberRanges(60, (1, 15), (2, 5), (2, 20))])
def test_number_ranges_bound_every_step(ranges):
    rng = random.Random(5)
    for _ in range(1000):
        p = sample_problem(rng, ranges=ranges)
        _check_chain(p.equations, p.answer, EQ, ranges)
        _check_chain(p.nl_steps, p.answer, NL, ranges)
    train, test = make_splits(200, 50, seed=2, ranges=ranges)
    assert not {e.question for e in train} & {e.question for e in test}


@pytest.mark.parametrize("kw, key", [({"add": (0, 5)}, "add"), ({"mul": (1, 5)}, "mul"), ({"start": (1, 9)}, "start"),
                                     ({"max_value": 20, "mul": (5, 9), "add": (1, 9), "start": (2, 9)}, "mul"),
                                     ({"max_value": 10, "add": (1, 50)}, "add")])
def test_bad_number_ranges_name_the_field(kw, key):
    with pytest.raises(ValueError, match=rf"NumberRanges\.{key}"):
        NumberRanges(**kw)


def test_heldout_is_disjoint_from_train_and_test():
    train, test = make_splits(600, 200, seed=3)
    valid = make_heldout(150, train + test, seed=3)
    assert len(valid) == 150 and all(isinstance(e, Example) for e in valid)
    vq = [e.question for e in valid]
    assert len(set(vq)) == 150
    assert not set(vq) & {e.question for e in train + test}
    for e in valid:
        _check_chain(e.steps, e.answer, EQ)


def test_heldout_excludes_even_a_dense_exclude_set():
    # small number ranges: many collisions, so the exclusion really has to filter
    ranges = NumberRanges(60, (1, 15), (2, 5), (2, 20))
    rng = random.Random(1)
    drawn = [make_example(sample_problem(rng, ranges=ranges)) for _ in range(3000)]
    # the same stream make_heldout uses: its first draws must be skipped
    same_stream = random.Random("0:valid")
    exclude = drawn + [make_example(sample_problem(same_stream, ranges=ranges)) for _ in range(50)]
    valid = make_heldout(100, exclude, ranges=ranges)
    assert len({e.question for e in valid}) == 100
    assert not {e.question for e in valid} & {e.question for e in exclude}
    for e in valid:
        _check_chain(e.steps, e.answer, EQ, ranges)


def test_heldout_is_deterministic_and_named():
    train, test = make_splits(300, 100, seed=2)
    a = make_heldout(80, train + test, seed=2)
    assert a == make_heldout(80, train + test, seed=2)
    assert a == make_heldout(80, iter(train + test), seed=2)  # any iterable, even one-shot
    assert a == make_heldout(80, train + test, seed=2, name="valid")  # the default name
    b = make_heldout(80, train + test, seed=2, name="dev")
    assert [e.question for e in a] != [e.question for e in b]
    assert len({e.question for e in a} & {e.question for e in b}) < 10
    c = make_heldout(80, train + test, seed=5)
    assert [e.question for e in a] != [e.question for e in c]
    # NL style: the same problems with NL steps
    nl = make_heldout(80, train + test, seed=2, style="nl")
    assert [e.question for e in nl] == [e.question for e in a] and [e.answer for e in nl] == [e.answer for e in a]
    assert all(NL.fullmatch(s) for e in nl for s in e.steps)
    # a longer draw extends a shorter one
    assert make_heldout(30, train + test, seed=2) == a[:30]


def test_heldout_leaves_make_splits_unchanged():
    before = make_splits(200, 50, seed=7)
    random.seed(0)
    global_state = random.getstate()
    make_heldout(100, before[0] + before[1], seed=7)
    assert random.getstate() == global_state  # its own stream, not the global one
    assert make_splits(200, 50, seed=7) == before


def test_heldout_sizes():
    train, test = make_splits(20, 10, seed=0)
    assert make_heldout(0, train + test) == []
    assert make_heldout(0, []) == []
    assert len(make_heldout(5, [])) == 5
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        make_heldout(-1, train + test)
    with pytest.raises(ValueError, match="style"):
        make_heldout(3, [], style="latex")
