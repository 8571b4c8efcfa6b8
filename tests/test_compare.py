"""kava compare: paired comparison of two prediction files."""
from __future__ import annotations

import json

import pytest

from kava.cli import main
from kava.stats import mcnemar_exact, paired_bootstrap_ci

A = [True, True, False, False, True, True]
B = [True, False, False, True, False, False]


def write_predictions(path, outcomes, order=None, dataset=None):
    rows = [{"index": i, "question": f"question {i}?", "gold": "1", "correct": c, **({"dataset": dataset} if dataset else {})}
            for i, c in enumerate(outcomes)]
    path.write_text("".join(json.dumps(rows[i]) + "\n" for i in (order or range(len(rows)))))
    return path


def test_compare_gives_the_paired_statistics_of_kava_stats(tmp_path, capsys):
    # B's rows are written in another order (and with a dataset key, as kava eval writes them): matched by index.
    a = write_predictions(tmp_path / "a.jsonl", A)
    b = write_predictions(tmp_path / "b.jsonl", B, order=[5, 3, 1, 0, 2, 4], dataset="valid.jsonl")
    out = tmp_path / "cmp.json"
    assert main(["compare", "--a", str(a), "--b", str(b), "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    (pair,) = res["pairs"]
    assert (pair["n"], pair["accuracy_a"], pair["accuracy_b"]) == (6, 4 / 6, 2 / 6)
    diff, lo, hi = paired_bootstrap_ci([(A, B)])
    assert pair["diff"] == pytest.approx(2 / 6) and (pair["diff"], *pair["diff_ci95"]) == pytest.approx((diff, lo, hi))
    # discordant: A alone right on 3 questions, B alone on 1 -> two-sided exact binomial 2 * P(X <= 1 | 4, 1/2)
    assert pair["mcnemar_p"] == pytest.approx(2 * 5 / 16) == mcnemar_exact(A, B)
    assert "+33.3" in capsys.readouterr().out


def test_compare_pools_pairs_over_seeds(tmp_path):
    files = {(s, k): write_predictions(tmp_path / f"{k}{s}.jsonl", v if s == 0 else v[::-1])
             for s in (0, 1) for k, v in (("a", A), ("b", B))}
    out = tmp_path / "cmp.json"
    assert main(["compare", "--a", str(files[0, "a"]), str(files[1, "a"]),
                 "--b", str(files[0, "b"]), str(files[1, "b"]), "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    want = paired_bootstrap_ci([(A, B), (A[::-1], B[::-1])])
    assert (res["pooled_diff"], *res["pooled_diff_ci95"]) == pytest.approx(want)
    assert len(res["pairs"]) == 2


@pytest.mark.parametrize("case, message", [
    ("other_questions", "question 0 differs"),
    ("fewer", "not the same questions"),
    ("not_json", "b.jsonl:2: not a JSON object"),
    ("no_correct", "b.jsonl:1: expected a JSON object with 'question' and a boolean 'correct'"),
    ("missing", "no such predictions file"),
    ("unpaired", "expected the same number of files"),
])
def test_compare_refuses_bad_input_with_one_line(case, message, tmp_path, capsys):
    a = write_predictions(tmp_path / "a.jsonl", A)
    b = tmp_path / "b.jsonl"
    extra = []
    if case == "other_questions":
        b.write_text("".join(json.dumps({"index": i, "question": f"other {i}?", "correct": c}) + "\n" for i, c in enumerate(B)))
    elif case == "fewer":
        write_predictions(b, B[:4])
    elif case == "not_json":
        b.write_text(json.dumps({"index": 0, "question": "question 0?", "correct": True}) + "\n{oops\n")
    elif case == "no_correct":
        b.write_text(json.dumps({"index": 0, "question": "question 0?", "correct": "yes"}) + "\n")
    elif case == "unpaired":
        write_predictions(b, B)
        extra = [str(a)]
    assert main(["compare", "--a", str(a), *extra, "--b", str(b)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
