"""The classic MAWPS release schema (AddSub, MultiArith, SingleEq, SingleOp): sQuestion + lSolutions (a list)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kava.data import Example
from kava.data.formats import FORMATS, DataError, load_examples

FIXTURE = Path(__file__).parent / "fixtures" / "mawps_sample.json"
EXPECTED = [
    Example("Joan found 70 seashells on the beach. She gave Sam some of her seashells. She has 27 seashells left. "
            "How many seashells did she give to Sam?", [], "43"),
    Example("There are 4 boxes with 12 pencils in each box. How many pencils are there in all?", [], "48"),
    Example("A baker made 2.5 kilograms of dough and used 0.75 kilograms. How much dough is left?", [], "1.75"),
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mawps_is_a_format_and_is_auto_detected():
    assert "mawps" in FORMATS
    res = load_examples(str(FIXTURE))
    assert res.format == "mawps" and res.skipped == {}
    assert res.examples == EXPECTED
    assert load_examples(str(FIXTURE), format="mawps").examples == EXPECTED


def test_mawps_field_mapping_accepts_a_one_element_list():
    res = load_examples(str(FIXTURE), question_field="sQuestion", answer_field="lSolutions")
    assert res.format == "generic" and res.examples == EXPECTED


def test_mawps_scalar_and_string_solutions(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"sQuestion": "Q one?", "lSolutions": 7},
                                           {"sQuestion": "Q two?", "lSolutions": ["1,200"]}])
    assert [e.answer for e in load_examples(str(p)).examples] == ["7", "1200"]


@pytest.mark.parametrize("bad, reason, needle", [
    ([3.0, 4.0], "several_answers", "field 'lSolutions' holds 2 values [3.0, 4.0]; expected exactly one answer"),
    ([], "no_answer", "field 'lSolutions' holds 0 values []; expected exactly one answer"),
])
def test_mawps_rows_without_exactly_one_answer_are_reported_never_dropped(tmp_path, bad, reason, needle):
    rows = [{"sQuestion": "Q one?", "lSolutions": [1.0]}, {"sQuestion": "Q two?", "lSolutions": bad},
            {"sQuestion": "Q three?", "lSolutions": [3.0]}]
    p = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_examples(str(p))
    msg = str(e.value)
    assert msg.startswith(f"{p}:2: ") and needle in msg and "\n" not in msg
    res = load_examples(str(p), skip_bad_rows=True)  # counted per reason, as every skipped row is
    assert [x.answer for x in res.examples] == ["1", "3"] and res.skipped == {reason: 1}


def test_mawps_missing_or_wrong_fields(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"sQuestion": "Q?", "lSolutions": [1]}, {"sQuestion": "Q?"}])
    with pytest.raises(DataError, match=r"m.jsonl:2: missing field 'lSolutions' \(expected keys sQuestion, lSolutions"):
        load_examples(str(p))
    p = write_jsonl(tmp_path / "n.jsonl", [{"sQuestion": "Q?", "lSolutions": [{"x": 1}]}])
    with pytest.raises(DataError, match="field 'lSolutions' must be a string or a number, got dict"):
        load_examples(str(p))


def test_unknown_schema_message_names_the_eval_flag(tmp_path):
    p = write_jsonl(tmp_path / "u.jsonl", [{"text": "Q?", "sol": 1}])
    with pytest.raises(DataError, match=r"cannot guess the format .*mawps.*pass format=\.\.\., or --format in kava eval"):
        load_examples(str(p))
