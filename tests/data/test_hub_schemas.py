"""The hub datasets kava names, loaded through the real ``datasets`` library from files in each hub's own
storage form, exact columns and dtypes (tests/data/fixtures/README.md gives each schema, its evidence and which
rows are real).

Only ``datasets.load_dataset`` is replaced, and only to map a hub id to the ``json`` / ``parquet`` builder over
local files, the way the hub itself serves these repos (one config each, except openai/gsm8k's ``main``;
split names from the file names). The real library builds the real ``Dataset`` with the real features, and
kava's own loaders (``load_examples``, ``load_benchmark``, ``kava.evaluate.load_dataset`` behind ``kava eval
--data``) parse it. Where ../shared/data holds a dataset, its rows are written into the hub form at test time
(never copied into the repository); the two without a local copy have small committed files.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kava.answers import parse_number
from kava.data import Example
from kava.data.formats import DataError, load_benchmark, load_examples

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
FIXTURES = Path(__file__).parent / "fixtures" / "hub"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED}")


class Hub:
    """``datasets.load_dataset`` for the hub ids given with :meth:`add`, served by the real library's json /
    parquet builders from local files. Like the hub: a repo with several configs needs its config name, an
    unknown id or config raises, ``split=None`` returns every split (a DatasetDict)."""

    def __init__(self, monkeypatch, tmp_path: Path):
        import datasets

        self.real = datasets.load_dataset
        self.cache = tmp_path / "hf-cache"
        self.repos: dict[str, tuple[str, dict]] = {}
        self.calls: list[tuple] = []
        monkeypatch.setattr(datasets, "load_dataset", self)

    def add(self, hub_id: str, builder: str, splits: dict[str, Path], config: str | None = None) -> None:
        self.repos.setdefault(hub_id, (builder, {}))[1][config] = {k: str(v) for k, v in splits.items()}

    def __call__(self, path, name=None, split=None, **kw):
        self.calls.append((path, name, split))
        if path not in self.repos:
            raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed.")
        builder, configs = self.repos[path]
        if name not in configs:
            raise ValueError(f"Config name is missing. Please pick one among the available configs: {sorted(map(str, configs))}")
        return self.real(builder, data_files=configs[name], split=split, cache_dir=str(self.cache))


@pytest.fixture
def hub(monkeypatch, tmp_path) -> Hub:
    return Hub(monkeypatch, tmp_path)


def _features(hub: Hub, hub_id: str, split: str, config: str | None = None) -> dict[str, str]:
    """Column -> dtype of one split as the datasets library builds it (the schema the loaders see)."""
    ds = hub(hub_id, config, split=split)
    return {k: str(v) for k, v in ds.features.items()}


def _parquet(path: Path, rows: list[dict], features: dict) -> Path:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=datasets.Features(features)).to_parquet(str(path))
    return path


def _jsonl_rows(name: str, n: int) -> list[dict]:
    with (SHARED / name).open(encoding="utf-8") as fh:
        return [json.loads(next(fh)) for _ in range(n)]


# ----------------------------------------------------------------------------
# openai/gsm8k: parquet, config "main" (and "socratic"), splits train / test; question, answer (strings)
# ----------------------------------------------------------------------------
@needs_shared
def test_openai_gsm8k(hub, tmp_path):
    import datasets

    s = datasets.Value("string")
    test_rows, train_rows = _jsonl_rows("gsm8k_test.jsonl", 3), _jsonl_rows("gsm8k_train.jsonl", 2)
    hub.add("openai/gsm8k", "parquet", {
        "train": _parquet(tmp_path / "main" / "train-00000-of-00001.parquet", train_rows, {"question": s, "answer": s}),
        "test": _parquet(tmp_path / "main" / "test-00000-of-00001.parquet", test_rows, {"question": s, "answer": s}),
    }, config="main")
    assert _features(hub, "openai/gsm8k", "test", "main") == {"question": "Value('string')", "answer": "Value('string')"}

    local = load_examples(str(SHARED / "gsm8k_test.jsonl")).examples[:3]
    res = load_benchmark("gsm8k", local_dir=tmp_path / "none")  # no local file: the hub id, config and split
    assert hub.calls[-1] == ("openai/gsm8k", "main", "test") and res.format == "gsm8k"
    assert res.examples == local
    assert res.examples[0] == Example(test_rows[0]["question"], ["<<16-3-4=9>>", "<<9*2=18>>"], "18")
    # kava eval --data openai/gsm8k: the hub id of a benchmark gets the benchmark's config and split
    from kava.evaluate import load_dataset

    assert load_dataset("openai/gsm8k").examples == local and hub.calls[-1] == ("openai/gsm8k", "main", "test")
    # training from the hub id picks config main too (kava.train._load); NL style strips the annotations
    nl = load_examples("openai/gsm8k", split="train", hub_config="main", cot_style="nl").examples
    assert nl == load_examples(str(SHARED / "gsm8k_train.jsonl"), cot_style="nl").examples[:2]
    # the hub refuses the id without its config: kava reports it in one line
    with pytest.raises(DataError, match=r"openai/gsm8k\[test\]: could not load from the Hugging Face hub .*Config name is missing"):
        load_examples("openai/gsm8k", split="test")


# ----------------------------------------------------------------------------
# reasoning-machines/gsm-hard: one JSON-lines file (gsmhardv2.jsonl), so one split "train"; input, code, target
# ----------------------------------------------------------------------------
@needs_shared
def test_reasoning_machines_gsm_hard(hub, tmp_path):
    lines = (SHARED / "gsm_hard.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    hard = tmp_path / "gsmhardv2.jsonl"
    hard.write_text("\n".join(lines) + "\n", encoding="utf-8")
    hub.add("reasoning-machines/gsm-hard", "json", {"train": hard})
    assert _features(hub, "reasoning-machines/gsm-hard", "train") == {
        "input": "Value('string')", "code": "Value('string')", "target": "Value('float64')"}

    res = load_benchmark("gsm-hard", local_dir=tmp_path / "none")
    assert hub.calls[-1] == ("reasoning-machines/gsm-hard", None, "train") and res.format == "gsm-hard"
    assert res.examples == load_examples(str(SHARED / "gsm_hard.jsonl")).examples[:3]
    first = res.examples[0]
    assert first.question.startswith("Janet’s ducks lay 16 eggs") and first.steps == [] and first.answer == "-9867630"
    from kava.evaluate import load_dataset

    assert load_dataset("reasoning-machines/gsm-hard").examples == res.examples


# ----------------------------------------------------------------------------
# whynlp/gsm8k-aug: parquet, splits train / validation / test; question (string), steps (list of strings), answer
# ----------------------------------------------------------------------------
def _icot_to_hub(line: str) -> dict:
    """A GSM8k-AUG row in da03's text form -> the hub row: the question, the <<...>> equations as a list, the answer."""
    question, rest = line.split("||", 1)
    cot, answer = rest.rsplit("####", 1)
    return {"question": question, "steps": re.findall(r"<<.*?>>", cot), "answer": answer.strip()}


@needs_shared
def test_whynlp_gsm8k_aug(hub, tmp_path):
    import datasets

    s = datasets.Value("string")
    feats = {"question": s, "steps": datasets.Sequence(s), "answer": s}
    valid = [_icot_to_hub(x) for x in (SHARED / "gsm8k_aug_valid.icot.txt").read_text(encoding="utf-8").splitlines()[:4]]
    test = [_icot_to_hub(x) for x in (SHARED / "gsm8k_aug_test.icot.txt").read_text(encoding="utf-8").splitlines()[:2]]
    hub.add("whynlp/gsm8k-aug", "parquet", {
        "validation": _parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", valid, feats),
        "test": _parquet(tmp_path / "data" / "test-00000-of-00001.parquet", test, feats),
    })
    f = _features(hub, "whynlp/gsm8k-aug", "validation")
    assert f["question"] == f["answer"] == "Value('string')" and "string" in f["steps"] and f["steps"] != "Value('string')"

    res = load_examples("whynlp/gsm8k-aug", split="validation")  # the AUG presets' validation source
    assert hub.calls[-1] == ("whynlp/gsm8k-aug", None, "validation") and res.format == "gsm8k-aug"
    assert res.examples == load_examples(str(SHARED / "gsm8k_aug_valid.icot.txt")).examples[:4]
    assert res.examples[0].steps == ["<<4-2=2>>", "<<2/.5=4>>", "<<12/4=3>>", "<<100*3=300>>"]
    assert res.examples[0].answer == "300" and res.examples[0].question.startswith("John cuts his grass to 2 inches.  It")
    # a row slice is taken by kava from the whole split; without a split the hub's several splits are refused
    assert load_examples("whynlp/gsm8k-aug", split="validation[-2:]").examples == res.examples[2:]
    with pytest.raises(DataError, match="several splits"):
        load_examples("whynlp/gsm8k-aug")


# ----------------------------------------------------------------------------
# ChilleD/SVAMP: parquet under data/, splits train (700) / test (300); ID, Body, Question, Equation, Answer, Type,
# question_concat. Answer's dtype is not verified (fixtures/README.md): both are tested.
# ----------------------------------------------------------------------------
@needs_shared
@pytest.mark.parametrize("answer_dtype", ["string", "float64"])
def test_chilled_svamp(answer_dtype, hub, tmp_path):
    import datasets

    s = datasets.Value("string")
    raw = json.loads((SHARED / "svamp.json").read_text(encoding="utf-8"))[:5]
    rows = [{**r, "Answer": str(r["Answer"]) if answer_dtype == "string" else r["Answer"],
             "question_concat": f"{r['Body'].strip()} {r['Question'].strip()}"} for r in raw]
    feats = {"ID": s, "Body": s, "Question": s, "Equation": s, "Answer": datasets.Value(answer_dtype), "Type": s,
             "question_concat": s}
    hub.add("ChilleD/SVAMP", "parquet", {
        "train": _parquet(tmp_path / "data" / "train-00000-of-00001.parquet", rows[:3], feats),
        "test": _parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows[3:], feats),
    })
    assert _features(hub, "ChilleD/SVAMP", "test")["Answer"] == f"Value('{answer_dtype}')"

    res = load_benchmark("svamp", local_dir=tmp_path / "none")  # the union of the hub's two splits
    assert hub.calls[-1] == ("ChilleD/SVAMP", None, "train+test") and res.format == "svamp"
    local = load_examples(str(SHARED / "svamp.json")).examples[:5]
    assert [e.question for e in res.examples] == [e.question for e in local] == [r["question_concat"] for r in rows]
    assert all(e.steps == [] for e in res.examples)
    assert [parse_number(e.answer) for e in res.examples] == [r["Answer"] for r in raw]
    if answer_dtype == "float64":
        assert res.examples == local  # a number is written canonically: 51.0 -> "51"
    assert res.examples[0].question == ("Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on "
                                        "each pack How much do you have to pay to buy each pack?")
    from kava.evaluate import load_dataset

    assert load_dataset("ChilleD/SVAMP").examples == res.examples and hub.calls[-1][2] == "train+test"


# ----------------------------------------------------------------------------
# ChilleD/MultiArith: two JSON files, train.json / test.json; question (string), final_ans (string)
# ----------------------------------------------------------------------------
def test_chilled_multiarith(hub, tmp_path):
    d = FIXTURES / "ChilleD__MultiArith"
    hub.add("ChilleD/MultiArith", "json", {"train": d / "train.json", "test": d / "test.json"})
    assert _features(hub, "ChilleD/MultiArith", "train") == {"question": "Value('string')", "final_ans": "Value('string')"}

    res = load_benchmark("multiarith")  # no local copy anywhere: always the hub, train and test together
    assert hub.calls[-1] == ("ChilleD/MultiArith", None, "train+test") and res.format == "multiarith"
    assert [e.answer for e in res.examples] == ["39", "8", "2", "7", "40"]
    assert all(e.steps == [] for e in res.examples)
    assert res.examples[0] == Example("For Halloween Debby and her sister combined the candy they received. Debby had "
                                      "32 pieces of candy while her sister had 42. If they ate 35 pieces the first "
                                      "night, how many pieces do they have left?", [], "39")
    from kava.evaluate import load_dataset

    assert load_dataset("ChilleD/MultiArith").examples == res.examples
    assert load_dataset("multiarith").examples == res.examples


# ----------------------------------------------------------------------------
# zen-E/GSM8k-Aug-NL: one JSON file, so one split "train"; question, cot (one string of sentences), answer (string)
# ----------------------------------------------------------------------------
def test_zen_e_gsm8k_aug_nl(hub):
    hub.add("zen-E/GSM8k-Aug-NL", "json", {"train": FIXTURES / "zen-E__GSM8k-Aug-NL" / "gsm8k_aug_nl.json"})
    assert _features(hub, "zen-E/GSM8k-Aug-NL", "train") == {
        "question": "Value('string')", "cot": "Value('string')", "answer": "Value('string')"}

    # the NL presets' split form: rows of the one train split (format auto resolves the id to the codi schema)
    res = load_examples("zen-E/GSM8k-Aug-NL", split="train[:-1]")
    assert hub.calls[-1] == ("zen-E/GSM8k-Aug-NL", None, "train") and res.format == "codi"
    jen = res.examples[0]
    assert jen.question.startswith("Jen shared a pack of chocolates") and jen.answer == "12.5"
    assert jen.steps == [  # sentences; "12.5" and "%" do not split
        "The total percentage given to Lucy and Sarah is 20% + 30% = 50%.",
        "So, the remaining percentage that was shared among the others is 100% - 50% = 50%.",
        "The total number of chocolates shared among the others is 100 * 50 / 100 = 50 chocolates.",
        "So, each of the four others received 50 / 4 = 12.5 chocolates.",
    ]
    assert [e.answer for e in res.examples] == ["12.5", "26", "1800"]  # thousands comma removed
    # a row with a null answer (CODI's loader skips these as bad data) is an error naming its row, or skipped
    with pytest.raises(DataError, match=r"zen-E/GSM8k-Aug-NL\[train\]:4: field 'answer' must be a string or a number, got NoneType"):
        load_examples("zen-E/GSM8k-Aug-NL", split="train")
    skipped = load_examples("zen-E/GSM8k-Aug-NL", split="train", skip_bad_rows=True)
    assert skipped.examples == res.examples and skipped.skipped == {"wrong_type": 1}
