"""Source loaders on the real local data files, the generic format, errors and the hub path."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kava.data import Example
from kava.data.formats import (
    BENCHMARKS,
    DataError,
    load_benchmark,
    load_examples,
    resolve_benchmark,
    split_cot,
)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED}")

JANET = (
    "Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
    "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 per "
    "fresh duck egg. How much in dollars does she make every day at the farmers' market?"
)
JEROME = (
    "Jerome had 4 friends who came to visit him on a certain day. The first friend pressed on the doorbell "
    "20 times before Jerome opened, the second friend pressed on the doorbell 1/4 times more than Jerome's "
    "first friend. The third friend pressed on the doorbell 10 times more than the fourth friend. If the "
    "fourth friend pressed on the doorbell 60 times, how many doorbell rings did the doorbell make?"
)
JEROME_STEPS = ["<<1/4*20=5>>", "<<20+5=25>>", "<<25+20=45>>", "<<60+10=70>>", "<<70+60=130>>", "<<130+45=175>>"]


# ----------------------------------------------------------------------------
# real files: counts and exact parses of fixed rows
# ----------------------------------------------------------------------------
@needs_shared
@pytest.mark.parametrize(
    "fname, fmt, n",
    [
        ("gsm8k_train.jsonl", "gsm8k", 7473),
        ("gsm8k_test.jsonl", "gsm8k", 1319),
        ("gsm8k_aug_valid.icot.txt", "icot", 500),
        ("gsm8k_aug_test.icot.txt", "icot", 1319),
        ("gsm_hard.jsonl", "gsm-hard", 1319),
        ("svamp.json", "svamp", 1000),
    ],
)
def test_real_files_counts_and_auto_format(fname, fmt, n):
    res = load_examples(str(SHARED / fname))
    assert res.format == fmt
    assert len(res.examples) == n
    assert res.skipped == {}
    assert res.source == str(SHARED / fname)
    assert all(isinstance(e, Example) and e.question == e.question.strip() and e.question for e in res.examples)
    # explicit format gives the same result
    assert load_examples(str(SHARED / fname), format=fmt).examples == res.examples


@needs_shared
def test_gsm8k_train_rows_equations_and_nl():
    eq = load_examples(str(SHARED / "gsm8k_train.jsonl")).examples
    nl = load_examples(str(SHARED / "gsm8k_train.jsonl"), cot_style="nl").examples
    q0 = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May?")
    assert eq[0] == Example(q0, ["<<48/2=24>>", "<<48+24=72>>"], "72")
    assert nl[0] == Example(
        q0, ["Natalia sold 48/2 = 24 clips in May.", "Natalia sold 48+24 = 72 clips altogether in April and May."], "72"
    )
    q100 = ("A craft store makes a third of its sales in the fabric section, a quarter of its sales in the jewelry "
            "section, and the rest in the stationery section. They made 36 sales today. How many sales were in "
            "the stationery section?")
    assert eq[100] == Example(q100, ["<<36/3=12>>", "<<36/4=9>>", "<<36-12-9=15>>"], "15")
    assert nl[100] == Example(q100, [
        "The craft store made 36 / 3 = 12 sales in the fabric section.",
        "It made 36 / 4 = 9 sales in the jewelry section.",
        "Thus, there were 36 - 12 - 9 = 15 sales in the stationery section.",
    ], "15")
    # "#### 1,080": commas removed; "$<<36*30=1080>>1080" keeps the "$" in NL style
    assert eq[345].answer == "1080"
    assert eq[345].steps == ["<<40/10=4>>", "<<40-4=36>>", "<<36*30=1080>>"]
    assert nl[345].steps[-1] == "This means that in 30 days he earns $36 * 30 = $1080."
    # a solution without calculator annotations: no equation steps, but NL steps
    assert eq[29].steps == [] and eq[29].answer == "1000"
    assert nl[29].steps[0] == "Let her previous monthly income be p" and len(nl[29].steps) == 8
    # the same question text in both styles, every row
    assert [e.question for e in eq] == [e.question for e in nl]


@needs_shared
def test_gsm8k_test_rows():
    ex = load_examples(str(SHARED / "gsm8k_test.jsonl")).examples
    assert ex[0] == Example(JANET, ["<<16-3-4=9>>", "<<9*2=18>>"], "18")
    assert ex[100] == Example(JEROME, JEROME_STEPS, "175")


@needs_shared
def test_icot_rows():
    valid = load_examples(str(SHARED / "gsm8k_aug_valid.icot.txt")).examples
    assert valid[0] == Example(
        "John cuts his grass to 2 inches.  It grows .5 inches per month.  When it gets to 4 inches he cuts it "
        "back down to 2 inches.  It cost $100 to get his grass cut.  How much does he pay per year?",
        ["<<4-2=2>>", "<<2/.5=4>>", "<<12/4=3>>", "<<100*3=300>>"],
        "300",
    )
    assert valid[100] == Example(
        "Mary and Ann are going sledding. Mary slides down a hill that's 630 feet long at a speed of 90 "
        "feet/minute. Ann slides down a hill that's 800 feet long at a rate of 40 feet/minute. How much longer "
        "does Ann's trip take than Mary?",
        ["<<630/90=7>>", "<<800/40=20>>", "<<20-7=13>>"],
        "13",
    )
    assert valid[192].answer == "5000"  # "#### 5,000"
    test = load_examples(str(SHARED / "gsm8k_aug_test.icot.txt")).examples
    assert test[0] == Example(JANET, ["<<16-3-4=9>>", "<<9*2=18>>"], "18")
    assert test[100] == Example(JEROME, JEROME_STEPS, "175")
    # GSM8k-AUG test = GSM8K test questions, same order
    gsm_test = load_examples(str(SHARED / "gsm8k_test.jsonl")).examples
    assert [e.question for e in test] == [e.question for e in gsm_test]


@needs_shared
def test_gsm_hard_rows():
    ex = load_examples(str(SHARED / "gsm_hard.jsonl")).examples
    assert ex[0] == Example(JANET.replace("with four", "with 4933828"), [], "-9867630")
    assert ex[100] == Example(
        "Mark took a test yesterday that consisted of 75 questions. He completed the test at a rate of 5 questions "
        "per hour. Today, he took another test of 4865117 questions at the same rate. If Mark had 8 hours to "
        "complete the first test and 6 hours to complete the second one, how many questions did he leave "
        "incomplete?",
        [],
        "4865122",
    )
    assert ex[7].answer == "3244047.0999999996"  # non-integer targets keep their digits
    assert ex[12].answer == "14053029.666666666"


@needs_shared
def test_svamp_rows():
    ex = load_examples(str(SHARED / "svamp.json")).examples
    assert ex[0] == Example(
        "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
        "How much do you have to pay to buy each pack?", [], "51")
    assert ex[100] == Example(
        "Allan brought 3 balloons and Jake brought 5 balloons to the park. Allan then bought 2 more balloons at "
        "the park. How many balloons did Allan and Jake have in the park?", [], "10")
    assert ex[999].answer == "11"


@needs_shared
def test_resolve_benchmark_prefers_local(tmp_path, monkeypatch):
    for name in ("gsm8k", "gsm-hard", "svamp"):
        path, fmt, split, config = resolve_benchmark(name, local_dir=SHARED)
        assert path == str(SHARED / BENCHMARKS[name][3]) and fmt == name and split is None and config is None
    # MultiArith has no local file: the hub id with its splits
    assert resolve_benchmark("multiarith", local_dir=SHARED) == ("ChilleD/MultiArith", "multiarith", "train+test", None)
    # nothing local: the hub
    assert resolve_benchmark("gsm8k", local_dir=tmp_path) == ("openai/gsm8k", "gsm8k", "test", "main")
    assert resolve_benchmark("GSM_Hard", local_dir=tmp_path)[0] == "reasoning-machines/gsm-hard"
    # KAVA_DATA_DIR is the default local dir
    monkeypatch.setenv("KAVA_DATA_DIR", str(tmp_path))
    assert resolve_benchmark("svamp")[0] == "ChilleD/SVAMP"
    monkeypatch.setenv("KAVA_DATA_DIR", str(SHARED))
    assert resolve_benchmark("svamp")[0] == str(SHARED / "svamp.json")
    assert len(load_benchmark("svamp").examples) == 1000
    with pytest.raises(DataError, match="unknown benchmark"):
        resolve_benchmark("mathqa")


# ----------------------------------------------------------------------------
# generic format and the other schemas on small temporary files
# ----------------------------------------------------------------------------
def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_generic_jsonl_field_mapping(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [
        {"problem": " What is 2+3? ", "solution": ["<<2+3=5>>"], "final": "5"},
        {"problem": "What is 1,000+1?", "solution": "First add. Then stop.", "final": 1001.0},
        {"problem": "Q3", "solution": "<<1+1=2>> <<2*3=6>>", "final": "1,000"},
    ])
    res = load_examples(str(p), question_field="problem", answer_field="final", cot_field="solution")
    assert res.format == "generic"
    assert res.examples == [
        Example("What is 2+3?", ["<<2+3=5>>"], "5"),
        Example("What is 1,000+1?", ["First add.", "Then stop."], "1001"),
        Example("Q3", ["<<1+1=2>>", "<<2*3=6>>"], "1000"),
    ]
    # no CoT field -> no steps
    res = load_examples(str(p), format="generic", question_field="problem", answer_field="final")
    assert [e.steps for e in res.examples] == [[], [], []]


def test_generic_csv_json_parquet(tmp_path):
    rows = [{"q": "How many?", "a": "7", "c": "Add them.\nThen count."}, {"q": "And now?", "a": "8", "c": ""}]
    want = [Example("How many?", ["Add them.", "Then count."], "7"), Example("And now?", [], "8")]
    kw = dict(question_field="q", answer_field="a", cot_field="c")

    import csv

    with (tmp_path / "d.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["q", "a", "c"])
        w.writeheader()
        w.writerows(rows)
    assert load_examples(str(tmp_path / "d.csv"), **kw).examples == want

    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert load_examples(str(tmp_path / "d.json"), **kw).examples == want
    # a JSON object holding splits
    (tmp_path / "s.json").write_text(json.dumps({"train": rows, "test": rows[:1]}))
    assert load_examples(str(tmp_path / "s.json"), split="test", **kw).examples == want[:1]

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"q": "How many?", "a": 7, "c": ["Add them.", "Then count."]},
                                  {"q": "And now?", "a": 8, "c": []}])
    pq.write_table(table, tmp_path / "d.parquet")
    assert load_examples(str(tmp_path / "d.parquet"), **kw).examples == want


def test_auto_detects_schemas_by_fields(tmp_path):
    cases = {
        "gsm8k-aug": ({"question": "Q?", "steps": ["<<1+2=3>>", "<<3*2=6>>"], "answer": "6"},
                      Example("Q?", ["<<1+2=3>>", "<<3*2=6>>"], "6")),
        "codi": ({"question": "Q?", "cot": "<<1+2=3>> <<3*2=6>>", "answer": "6"},
                 Example("Q?", ["<<1+2=3>>", "<<3*2=6>>"], "6")),
        "gsm-hard": ({"input": "Q?", "code": "", "target": 6.0}, Example("Q?", [], "6")),
        "multiarith": ({"question": " Q? ", "final_ans": "6"}, Example("Q?", [], "6")),
        "gsm8k": ({"question": "Q?", "answer": "1+2=<<1+2=3>>3\n#### 3"}, Example("Q?", ["<<1+2=3>>"], "3")),
        "generic": ({"question": "Q?", "answer": "6"}, Example("Q?", [], "6")),
    }
    for fmt, (row, want) in cases.items():
        p = _write_jsonl(tmp_path / f"{fmt}.jsonl", [row])
        res = load_examples(str(p))
        assert (res.format, res.examples) == (fmt, [want]), fmt
    # NL CoT in the codi schema (GSM8k-Aug-NL): sentences
    p = _write_jsonl(tmp_path / "nl.jsonl", [{"question": "Q?", "cot": "He has 1+2=3. Then 3*2=6.", "answer": "6"}])
    assert load_examples(str(p)).examples[0].steps == ["He has 1+2=3.", "Then 3*2=6."]
    # svamp as a JSON list; multiarith with 'answer' instead of 'final_ans'
    (tmp_path / "sv.json").write_text(json.dumps([{"Body": "A has 3.", "Question": "How many?", "Answer": 3.0}]))
    assert load_examples(str(tmp_path / "sv.json")).examples == [Example("A has 3. How many?", [], "3")]
    p = _write_jsonl(tmp_path / "ma.jsonl", [{"question": "Q?", "answer": "4"}])
    assert load_examples(str(p), format="multiarith").examples == [Example("Q?", [], "4")]
    # format="synthetic" reads the gsm8k-aug schema
    assert load_examples(str(tmp_path / "gsm8k-aug.jsonl"), format="synthetic").format == "gsm8k-aug"


def test_non_numeric_answer_is_kept_raw(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "steps": [], "answer": " twelve "}])
    assert load_examples(str(p)).examples == [Example("Q?", [], "twelve")]


def test_split_cot():
    assert split_cot("<<1+2=3>> <<3*4=12>>") == ["<<1+2=3>>", "<<3*4=12>>"]
    assert split_cot("A is 1+2=<<1+2=3>>3.\nB is 6.") == ["A is 1+2=3.", "B is 6."]
    assert split_cot("He has 0.5 kg. She has 2! Why? Because.") == ["He has 0.5 kg.", "She has 2!", "Why?", "Because."]
    assert split_cot("  ") == []


# ----------------------------------------------------------------------------
# malformed rows
# ----------------------------------------------------------------------------
def test_bad_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "Q1", "steps": [], "answer": "1"}\n\n{"question": "Q2", oops\n'
                 '{"question": "Q3", "steps": [], "answer": "3"}\n')
    with pytest.raises(DataError) as ei:
        load_examples(str(p))
    msg = str(ei.value)
    assert msg.startswith(f"{p}:3: not valid JSON") and "\n" not in msg
    res = load_examples(str(p), skip_bad_rows=True)
    assert [e.question for e in res.examples] == ["Q1", "Q3"]
    assert res.skipped == {"bad_json": 1}


def test_missing_field_wrong_type_empty_question(tmp_path):
    p = _write_jsonl(tmp_path / "x.jsonl", [
        {"question": "Q1", "steps": ["<<1+1=2>>"], "answer": "2"},
        {"question": "Q2", "steps": ["<<1+1=2>>"], "answer": "2"},
        {"question": "Q3", "steps": ["<<1+1=2>>"]},                      # line 3: missing answer
        {"question": "Q4", "steps": "<<1+1=2>>", "answer": "2"},         # line 4: steps not a list
        {"question": "   ", "steps": [], "answer": "2"},                 # line 5: empty question
        {"question": ["Q6"], "steps": [], "answer": "2"},                # line 6: question not a string
        {"question": "Q7", "steps": [], "answer": None},                 # line 7: answer null
        [1, 2],                                                          # line 8: not an object
    ])
    with pytest.raises(DataError, match=r"x\.jsonl:3: missing field 'answer' \(expected keys question, steps"):
        load_examples(str(p))
    res = load_examples(str(p), skip_bad_rows=True)
    assert [e.question for e in res.examples] == ["Q1", "Q2"]
    assert res.skipped == {"missing_field": 1, "wrong_type": 4, "empty_question": 1}
    # each error is reported at its own line
    for i in range(3, 9):
        lines = p.read_text().splitlines()
        q = tmp_path / f"one{i}.jsonl"
        q.write_text(lines[0] + "\n" + lines[i - 1] + "\n")
        with pytest.raises(DataError, match=rf"one{i}\.jsonl:2: "):
            load_examples(str(q), format="gsm8k-aug")


def test_icot_malformed_line(tmp_path):
    p = tmp_path / "d.icot.txt"
    p.write_text("Q1?||<<1+1=2>> #### 2\nQ2? <<1+1=2>> #### 2\nQ3?||<<1+1=2>>\n||<<1+1=2>> #### 2\n")
    with pytest.raises(DataError, match=r"d\.icot\.txt:2: no '\|\|'"):
        load_examples(str(p))
    res = load_examples(str(p), skip_bad_rows=True)
    assert res.examples == [Example("Q1?", ["<<1+1=2>>"], "2")]
    assert res.skipped == {"malformed_line": 2, "empty_question": 1}


def test_gsm8k_solution_without_answer_marker(tmp_path):
    p = _write_jsonl(tmp_path / "g.jsonl", [{"question": "Q?", "answer": "1+1=<<1+1=2>>2\n#### 2"},
                                            {"question": "Q?", "answer": "no marker"}])
    with pytest.raises(DataError, match=r"g\.jsonl:2: solution has no '#### N'"):
        load_examples(str(p), format="gsm8k")


def test_csv_row_numbers(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("q,a\nQ1,1\nQ2\nQ3,3,extra\n,4\n")
    with pytest.raises(DataError, match=r"d\.csv:3: fewer cells"):
        load_examples(str(p), question_field="q", answer_field="a")
    res = load_examples(str(p), question_field="q", answer_field="a", skip_bad_rows=True)
    assert res.examples == [Example("Q1", [], "1")]
    assert res.skipped == {"malformed_line": 2, "empty_question": 1}


def test_empty_and_all_bad_and_unknown(tmp_path):
    for name in ("empty.jsonl", "empty.json", "empty.icot.txt", "empty.csv"):
        p = tmp_path / name
        p.write_text("\n" if name.endswith(".jsonl") else "")
        with pytest.raises(DataError, match=rf"{name.replace('.', chr(92) + '.')}:1: no rows"):
            load_examples(str(p), format="generic" if name.endswith(".csv") else "auto")
    p = tmp_path / "allbad.jsonl"
    p.write_text("{oops\n{nope\n")
    with pytest.raises(DataError, match=r"allbad\.jsonl:1: no usable rows, all 2 were malformed \(bad_json=2\)"):
        load_examples(str(p), skip_bad_rows=True)
    p = _write_jsonl(tmp_path / "weird.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match=r"weird\.jsonl:1: cannot guess the format from fields \[foo\]"):
        load_examples(str(p))
    (tmp_path / "whole.json").write_text('[{"question": "Q", "answer": "1"},\n oops]')
    with pytest.raises(DataError, match=r"whole\.json:2: not valid JSON"):
        load_examples(str(tmp_path / "whole.json"))
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_examples(str(tmp_path / "d.xlsx"))
    with pytest.raises(DataError, match="unknown format"):
        load_examples(str(tmp_path / "weird.jsonl"), format="nope")


# ----------------------------------------------------------------------------
# the hub path (monkeypatched: no network)
# ----------------------------------------------------------------------------
class _FakeHub:
    def __init__(self, rows):
        self.rows = rows
        self.calls = []

    def __call__(self, path, name=None, split=None, **kw):
        self.calls.append((path, name, split))
        if split is None:
            return {"train": self.rows, "test": self.rows}
        return list(self.rows)


def test_hub_ids_are_loaded_with_load_dataset(monkeypatch):
    import datasets

    gsm_rows = [{"question": "Q?", "answer": "A is 1+1=<<1+1=2>>2.\n#### 2"}]
    fake = _FakeHub(gsm_rows)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    res = load_examples("openai/gsm8k", hub_config="main", split="test")
    assert fake.calls == [("openai/gsm8k", "main", "test")]
    assert (res.format, res.examples) == ("gsm8k", [Example("Q?", ["<<1+1=2>>"], "2")])
    assert res.source == "openai/gsm8k:main[test]"
    res = load_examples("openai/gsm8k", hub_config="main", split="test", cot_style="nl")
    assert res.examples[0].steps == ["A is 1+1=2."]

    # known ids map to their schema even when the fields would say otherwise
    fake.rows = [{"question": "Q?", "cot": "<<1+1=2>>", "answer": "2"}]
    assert load_examples("zen-E/GSM8k-Aug-NL", split="train").format == "codi"
    fake.rows = [{"ID": "x", "Body": "B.", "Question": "Q?", "Answer": 2.0}]
    assert load_examples("ChilleD/SVAMP", split="train+test").examples == [Example("B. Q?", [], "2")]
    fake.rows = [{"question": "Q?", "final_ans": "2"}]
    res = load_benchmark("multiarith")
    assert fake.calls[-1] == ("ChilleD/MultiArith", None, "train+test") and res.format == "multiarith"

    # unknown ids: the schema is guessed from the fields; a row error names the id and row
    fake.rows = [{"question": "Q?", "steps": ["<<1+1=2>>"], "answer": "2"}, {"question": "Q?", "steps": []}]
    with pytest.raises(DataError, match=r"someone/data\[train\]:2: missing field 'answer'"):
        load_examples("someone/data", split="train")
    # split=None with several splits asks for one
    with pytest.raises(DataError, match="several splits"):
        load_examples("someone/data")


def test_hub_failure_and_missing_local_file(monkeypatch):
    import datasets

    def boom(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(DataError, match=r"whynlp/gsm8k-aug\[train\]: could not load from the Hugging Face hub"):
        load_examples("whynlp/gsm8k-aug", split="train")

    def never(*a, **k):  # a missing local path is not sent to the hub
        raise AssertionError("hub called for a local path")

    monkeypatch.setattr(datasets, "load_dataset", never)
    for missing in ("data/missing.jsonl", "./x", "/abs/path/file.json"):
        with pytest.raises(DataError, match="file not found"):
            load_examples(missing)


# ----------------------------------------------------------------------------
# sliced splits: a held-out slice of a train split, local files and hub alike
# ----------------------------------------------------------------------------
def _codi_rows(n):
    return [{"question": f"Q{i}?", "cot": f"A is {i}. B is {i} + 1 = {i + 1}.", "answer": str(i + 1)} for i in range(n)]


def test_sliced_split_of_a_local_file_holds_out_the_last_rows(tmp_path):
    path = tmp_path / "aug_nl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _codi_rows(5)))
    train = load_examples(str(path), split="train[:-2]")
    held = load_examples(str(path), split="train[-2:]")
    assert train.format == held.format == "codi"
    assert [e.question for e in train.examples] == ["Q0?", "Q1?", "Q2?"]
    assert [e.question for e in held.examples] == ["Q3?", "Q4?"]
    # a JSON object of splits: the slice applies to the named list
    obj = tmp_path / "splits.json"
    obj.write_text(json.dumps({"train": _codi_rows(4), "test": _codi_rows(1)}))
    assert [e.answer for e in load_examples(str(obj), split="train[1:3]").examples] == ["2", "3"]


def test_sliced_split_errors_name_the_row_of_the_whole_file(tmp_path):
    rows = _codi_rows(4)
    del rows[3]["cot"]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"bad.jsonl:4: missing field 'cot'"):
        load_examples(str(path), format="codi", split="train[-1:]")
    assert len(load_examples(str(path), format="codi", split="train[:-1]").examples) == 3  # the bad row is not in this slice
    with pytest.raises(DataError, match=r"split train\[10:\] selects no rows of the 4 in 'train'"):
        load_examples(str(path), split="train[10:]")
    with pytest.raises(DataError, match=r"malformed split 'train\[:5%\]'"):
        load_examples(str(path), split="train[:5%]")


def test_sliced_hub_split_loads_the_whole_split_then_slices(monkeypatch):
    import datasets

    fake = _FakeHub(_codi_rows(6))
    monkeypatch.setattr(datasets, "load_dataset", fake)
    res = load_examples("zen-E/GSM8k-Aug-NL", split="train[-2:]")
    assert fake.calls == [("zen-E/GSM8k-Aug-NL", None, "train")]  # kava slices, so hub and local files agree
    assert res.format == "codi" and res.source == "zen-E/GSM8k-Aug-NL[train[-2:]]"
    assert [e.question for e in res.examples] == ["Q4?", "Q5?"]
    fake.rows = fake.rows[:5] + [{"question": "Q5?", "answer": "6"}]
    with pytest.raises(DataError, match=r"zen-E/GSM8k-Aug-NL\[train\[-2:\]\]:6: missing field 'cot'"):
        load_examples("zen-E/GSM8k-Aug-NL", split="train[-2:]")


def test_splits_disjoint():
    from kava.data.formats import splits_disjoint

    assert splits_disjoint("train[:-500]", "train[-500:]") and splits_disjoint("train[-500:]", "train[:-500]")
    assert splits_disjoint("train[:1000]", "train[1000:]") and splits_disjoint("train", "validation")
    assert not splits_disjoint("train", "train[-500:]")
    assert not splits_disjoint("train[:-400]", "train[-500:]")
    assert not splits_disjoint("train[:-5]", "train[10:]")  # depends on the split's length: not provable
    assert not splits_disjoint("train+test", "test")


def test_codi_answer_with_the_gsm8k_marker():
    from kava.data.formats import _parse_codi

    row = {"question": "Q?", "cot": "A is 2. So 2 + 16 = 18.", "answer": "#### 18"}
    assert _parse_codi(row, {}) == Example("Q?", ["A is 2.", "So 2 + 16 = 18."], "18")
