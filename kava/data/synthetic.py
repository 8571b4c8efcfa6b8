"""The embedded demo task: templated GSM8k-AUG-shaped arithmetic word problems.

Each problem is a chain of 2, 3 or 4 dependent steps (equally likely) using
``+``, ``-`` and ``*``:

- every intermediate value stays within 1..200 (so within the 0..200 of
  ``docs/DEMO_SIZING.md``);
- additions and subtractions use operands 1..50, multiplications 2..12;
- the first step is either an operation on a stated starting amount, or a
  product ("3 bags with 7 marbles in each bag");
- two story shapes: one person whose amount changes ("She then ends up with 3
  times as many"), or a chain of people compared to the previous one ("Ben has
  4 fewer stickers than Anna");
- some phrasings are compound and hide the operand ("doubles", "twice as many").

Both CoT styles exist for the same problem (:func:`make_example`):

- ``equations``: ``["<<12+7=19>>", "<<19*3=57>>"]`` (GSM8k-AUG style);
- ``nl``: ``["Tom has 12 + 7 = 19 apples.", "Tom has 19 * 3 = 57 apples."]``.

The answer (the last value) never appears as a number in the question, so
answering without working it out is hard (the sizing run: about 4% without CoT
against 93% with it).
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from kava.data import Example

__all__ = [
    "Problem",
    "sample_problem",
    "generate_problem",
    "make_example",
    "make_splits",
    "write_jsonl",
    "MAX_VALUE",
    "NumberRanges",
    "DEFAULT_RANGES",
    "TASKS",
    "STYLES",
]

STYLES = ("equations", "nl")  # how the CoT steps are written: <<12+7=19>>, or sentences
STYLE_CHOICES = " or ".join(map(repr, STYLES))  # for error messages

MAX_VALUE = 200  # every intermediate value is in 1..MAX_VALUE
ADD_RANGE = (1, 50)  # operands of + and -
MUL_RANGE = (2, 12)  # operands of *
START_RANGE = (2, 50)  # a stated starting amount


@dataclass(frozen=True)
class NumberRanges:
    """How large the numbers get; the defaults are the DEMO_SIZING task (values 1..200)."""

    max_value: int = MAX_VALUE  # every intermediate value is in 1..max_value
    add: tuple[int, int] = ADD_RANGE  # operands of + and -
    mul: tuple[int, int] = MUL_RANGE  # operands of *
    start: tuple[int, int] = START_RANGE  # a stated starting amount

    def __post_init__(self) -> None:
        for name in ("add", "mul", "start"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi <= self.max_value:
                raise ValueError(f"NumberRanges.{name}={(lo, hi)}: expected 1 <= lo <= hi <= max_value={self.max_value}")
        if self.mul[0] < 2 or self.mul[0] * self.mul[0] > self.max_value:
            raise ValueError(f"NumberRanges.mul={self.mul}: expected lo >= 2 and lo*lo <= max_value={self.max_value}")
        if self.start[0] < 2:
            raise ValueError(f"NumberRanges.start={self.start}: expected lo >= 2 (a first step must stay >= 1)")


DEFAULT_RANGES = NumberRanges()
# Named tasks for `kava demo --task`. "sizing" is the DEMO_SIZING.md task; "small" keeps every value within
# 1..60, the demo's default: a latent must hold each intermediate result as one vector, computed in one pass,
# and at 1..200 the 1.9M-parameter demo model could not (docs/results.md).
TASKS = {
    "small": NumberRanges(max_value=60, add=(1, 15), mul=(2, 5), start=(2, 20)),
    "sizing": DEFAULT_RANGES,
}

# name, subject pronoun, object pronoun, possessive
_PEOPLE = [
    ("Tom", "he", "him", "his"), ("Anna", "she", "her", "her"), ("Ben", "he", "him", "his"),
    ("Lucy", "she", "her", "her"), ("Sam", "he", "him", "his"), ("Mia", "she", "her", "her"),
    ("Jack", "he", "him", "his"), ("Emma", "she", "her", "her"), ("Leo", "he", "him", "his"),
    ("Nora", "she", "her", "her"), ("Omar", "he", "him", "his"), ("Zoe", "she", "her", "her"),
    ("Ravi", "he", "him", "his"), ("Ella", "she", "her", "her"), ("Max", "he", "him", "his"),
    ("Ivy", "she", "her", "her"), ("Carlos", "he", "him", "his"), ("Grace", "she", "her", "her"),
    ("Finn", "he", "him", "his"), ("Sara", "she", "her", "her"),
]
_ITEMS = [
    "apples", "marbles", "stickers", "cookies", "books", "pencils", "shells", "cards",
    "coins", "balloons", "crayons", "stamps", "candies", "beads", "eggs", "toy cars",
]
# (plural, singular)
_CONTAINERS = [("boxes", "box"), ("bags", "bag"), ("packs", "pack"), ("jars", "jar"), ("baskets", "basket")]
_RELATIVES = ["sister", "brother", "friend", "cousin", "neighbor", "teacher"]

# Templates for one person whose amount changes. Fields: S (subject, capitalised),
# O (object pronoun), P (possessive), item, n, rel.
_ACTOR_OPS = {
    "+": [
        "{S} buys {n} more {item}.",
        "{S} finds {n} more {item}.",
        "A friend gives {O} {n} {item}.",
        "{S} gets {n} more {item} from {P} {rel}.",
        "Then {S_low} receives {n} more.",
    ],
    "-": [
        "{S} gives {n} {item} to {P} {rel}.",
        "{S} loses {n} of them.",
        "{S} uses {n} {item}.",
        "Then {S_low} sells {n} of {P} {item}.",
    ],
    "*": [
        "{S} then ends up with {n} times as many {item}.",
        "After a month, {S_low} has {n} times as many {item} as before.",
        "{S} multiplies {P} {item} by {n}.",
    ],
}
_ACTOR_MUL_WORDS = {2: ["{S} doubles {P} {item}.", "{S} then ends up with twice as many."],
                    3: ["{S} triples {P} {item}."]}
_ACTOR_QUESTIONS = ["How many {item} does {name} have now?", "How many {item} does {name} end up with?",
                    "How many {item} does {name} have at the end?"]

# Templates comparing a new person to the previous one. Fields: new, prev, item, n.
_COMPARE_OPS = {
    "+": ["{new} has {n} more {item} than {prev}.", "{new} has {n} {item} more than {prev} does."],
    "-": ["{new} has {n} fewer {item} than {prev}.", "{new} has {n} {item} less than {prev} does."],
    "*": ["{new} has {n} times as many {item} as {prev}.", "{new} collects {n} times as many {item} as {prev}."],
}
_COMPARE_MUL_WORDS = {2: ["{new} has twice as many {item} as {prev}."],
                      3: ["{new} has three times as many {item} as {prev}."]}
_COMPARE_QUESTIONS = ["How many {item} does {name} have?", "How many {item} does {name} have in total?"]


@dataclass
class Problem:
    """One generated problem with its worked solution in both CoT styles."""

    question: str
    equations: list[str]  # "<<a op b=r>>" per step
    nl_steps: list[str]  # "Tom has a op b = r apples." per step
    answer: str
    values: list[int] = field(default_factory=list)  # result of every step
    kind: str = "actor"  # "actor" | "compare"

    @property
    def num_steps(self) -> int:
        return len(self.equations)


def _choose_op(rng: random.Random, v: int, r: NumberRanges) -> tuple[str, int]:
    """A feasible operation on ``v`` keeping the result in 1..r.max_value."""
    ops = []
    if v + r.add[0] <= r.max_value:
        ops.append("+")
    if v - r.add[0] >= 1:
        ops.append("-")
    if 1 <= v and v * r.mul[0] <= r.max_value:
        ops.append("*")
    op = rng.choice(ops)
    if op == "+":
        return op, rng.randint(r.add[0], min(r.add[1], r.max_value - v))
    if op == "-":
        return op, rng.randint(r.add[0], min(r.add[1], v - 1))
    return op, rng.randint(r.mul[0], min(r.mul[1], r.max_value // v))


def _apply(v: int, op: str, n: int) -> int:
    return v + n if op == "+" else v - n if op == "-" else v * n


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _sample_once(rng: random.Random, num_steps: int, ranges: NumberRanges) -> Problem:
    kind = rng.choice(["actor", "compare"])
    item = rng.choice(_ITEMS)
    people = rng.sample(_PEOPLE, num_steps + 1)
    first = people[0]
    sentences: list[str] = []
    eqs: list[str] = []
    nls: list[str] = []
    values: list[int] = []

    # the starting amount: stated, or a product (which is then the first step)
    if rng.random() < 0.35:
        a = rng.randint(*ranges.mul)
        b = rng.randint(ranges.mul[0], min(ranges.mul[1], ranges.max_value // a))
        cont, cont1 = rng.choice(_CONTAINERS)
        v = a * b
        sentences.append(f"{first[0]} has {a} {cont} with {b} {item} in each {cont1}.")
        eqs.append(f"<<{a}*{b}={v}>>")
        nls.append(f"{first[0]} has {a} * {b} = {v} {item}.")
        values.append(v)
    else:
        v = rng.randint(*ranges.start)
        sentences.append(f"{first[0]} has {v} {item}.")

    holder = first
    while len(eqs) < num_steps:
        op, n = _choose_op(rng, v, ranges)
        r = _apply(v, op, n)
        if kind == "actor":
            name, subj, obj, poss = first
            pool = list(_ACTOR_OPS[op])
            if op == "*" and n in _ACTOR_MUL_WORDS:
                pool += _ACTOR_MUL_WORDS[n] * 2  # the worded forms are common for 2 and 3
            tpl = rng.choice(pool)
            # after the first sentence, refer to the person by pronoun most of the time
            s = _cap(subj) if rng.random() < 0.7 else name
            sentences.append(tpl.format(S=s, S_low=subj, O=obj, P=poss, item=item, n=n, rel=rng.choice(_RELATIVES)))
            nls.append(f"{name} has {v} {op} {n} = {r} {item}.")
        else:
            new = people[len(eqs) + 1]
            pool = list(_COMPARE_OPS[op])
            if op == "*" and n in _COMPARE_MUL_WORDS:
                pool += _COMPARE_MUL_WORDS[n] * 2
            tpl = rng.choice(pool)
            sentences.append(tpl.format(new=new[0], prev=holder[0], item=item, n=n))
            nls.append(f"{new[0]} has {v} {op} {n} = {r} {item}.")
            holder = new
        eqs.append(f"<<{v}{op}{n}={r}>>")
        values.append(r)
        v = r

    if kind == "actor":
        q = rng.choice(_ACTOR_QUESTIONS).format(item=item, name=first[0])
    else:
        q = rng.choice(_COMPARE_QUESTIONS).format(item=item, name=holder[0])
    question = " ".join(sentences + [q])
    return Problem(question=question, equations=eqs, nl_steps=nls, answer=str(v), values=values, kind=kind)


def _mentions(question: str, number: str) -> bool:
    return re.search(rf"(?<!\d){re.escape(number)}(?!\d)", question) is not None


def sample_problem(rng: random.Random, num_steps: int | None = None,
                   ranges: NumberRanges = DEFAULT_RANGES) -> Problem:
    """Draw one problem; ``num_steps`` in 2..4 (default: uniform over 2, 3, 4).

    Problems whose answer appears as a number in the question are redrawn.
    """
    if num_steps is None:
        num_steps = rng.choice([2, 3, 4])
    if not 1 <= num_steps <= len(_PEOPLE) - 1:
        raise ValueError(f"num_steps={num_steps}: expected 1..{len(_PEOPLE) - 1} (the demo uses 2..4)")
    for _ in range(1000):
        p = _sample_once(rng, num_steps, ranges)
        if not _mentions(p.question, p.answer):
            return p
    raise RuntimeError("could not draw a problem whose question hides its answer")  # pragma: no cover


def check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style={style!r}: expected {STYLE_CHOICES}")


def make_example(problem: Problem, style: str = "equations") -> Example:
    """The problem as an :class:`Example` with ``equations`` or ``nl`` CoT steps."""
    if style == "equations":
        steps = list(problem.equations)
    elif style == "nl":
        steps = list(problem.nl_steps)
    else:
        raise ValueError(f"style={style!r}: expected {STYLE_CHOICES}")
    return Example(question=problem.question, steps=steps, answer=problem.answer)


def generate_problem(rng: random.Random, num_steps: int | None = None, style: str = "equations",
                     ranges: NumberRanges = DEFAULT_RANGES) -> Example:
    """One problem as an :class:`Example` (equation-style steps by default)."""
    return make_example(sample_problem(rng, num_steps, ranges), style)


def make_splits(n_train: int, n_test: int, seed: int = 0, style: str = "equations",
                ranges: NumberRanges = DEFAULT_RANGES) -> tuple[list[Example], list[Example]]:
    """Deterministic train and test sets, disjoint by question text and free of duplicates.

    The first ``n_test`` distinct questions drawn from ``random.Random(seed)`` form
    the test set; the next ``n_train`` distinct ones form the training set.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"make_splits: sizes must be >= 0, got n_train={n_train}, n_test={n_test}")
    check_style(style)
    drawn = _distinct_problems(random.Random(seed), n_test + n_train, set(), ranges,
                               f"make_splits: could not draw {n_train + n_test} distinct problems")
    examples = [make_example(p, style) for p in drawn]
    return examples[n_test:], examples[:n_test]


def _distinct_problems(rng: random.Random, n: int, seen: set[str], ranges: NumberRanges, failure: str) -> list[Problem]:
    """``n`` problems from ``rng`` whose questions are new to ``seen`` (which grows); RuntimeError(failure)
    after ``20 n + 1000`` draws."""
    out: list[Problem] = []
    budget = 20 * n + 1000
    while len(out) < n:
        budget -= 1
        if budget < 0:
            raise RuntimeError(failure)
        p = sample_problem(rng, ranges=ranges)
        if p.question in seen:
            continue
        seen.add(p.question)
        out.append(p)
    return out


def make_heldout(n: int, exclude: Iterable[Example], seed: int = 0, name: str = "valid",
                 style: str = "equations", ranges: NumberRanges = DEFAULT_RANGES) -> list[Example]:
    """``n`` more distinct problems, none of whose questions is in ``exclude`` (e.g. the train and test sets).

    They come from their own random stream (seeded by ``seed`` and ``name``), so adding a validation split
    leaves make_splits' train and test sets unchanged.
    """
    if n < 0:
        raise ValueError(f"make_heldout: n must be >= 0, got {n}")
    check_style(style)
    seen = {e.question for e in exclude}
    drawn = _distinct_problems(random.Random(f"{seed}:{name}"), n, seen, ranges,
                               f"make_heldout: could not draw {n} problems outside the {len(seen)} excluded")
    return [make_example(p, style) for p in drawn]


def write_jsonl(examples: Iterable[Example], path: str | Path) -> Path:
    """Write examples in the gsm8k-aug schema (``question``, ``steps``, ``answer``), one per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps({"question": ex.question, "steps": list(ex.steps), "answer": ex.answer},
                                ensure_ascii=False) + "\n")
    return path
