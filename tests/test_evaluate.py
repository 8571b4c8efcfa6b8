"""Evaluation: report schema and arithmetic, pass counts per mode, batch invariance, answer extraction."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import SHARED_DATA, perturb_trainables, tiny_config
from kava.config import KavaConfig
from kava.data import Example
from kava.data.formats import DataError, load_examples
from kava.evaluate import REPORT_KEYS, answer_text, evaluate, resolve_mode, run_eval
from kava.model import GenerationBatch, KavaModel

T = 2  # latent.num_iterations in tiny_config

ROWS = [
    {"question": "Tom has 5 apples and buys 3 more. How many apples does he have?", "steps": ["<<5+3=8>>"], "answer": "8"},
    {"question": "Sara reads 12 pages a day for 4 days. How many pages?", "steps": ["<<12*4=48>>"], "answer": "48"},
    {"question": "Each box holds 7 pens. There are 9 boxes, 3 are empty. How many pens?",
     "steps": ["<<9-3=6>>", "<<6*7=42>>"], "answer": "42"},
    {"question": "A cat", "steps": ["<<1+1=2>>"], "answer": "2"},
    {"question": "Tom has 5 boxes", "steps": ["<<5*2=10>>"], "answer": "10"},
]


@pytest.fixture(scope="module")
def checkpoint(tiny_llama_dir, tmp_path_factory) -> Path:
    cfg = tiny_config(tiny_llama_dir, **{"eval.max_answer_tokens": 4, "eval.max_cot_tokens": 6, "eval.batch_size": 2})
    model = KavaModel.from_config(cfg)
    perturb_trainables(model)
    return model.save(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def model(checkpoint) -> KavaModel:
    return KavaModel.load(checkpoint).eval()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "small.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return p


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def test_run_eval_latent_report(checkpoint, data_file, tmp_path):
    out = tmp_path / "eval"
    report = run_eval(checkpoint, [str(data_file)], mode="latent", output_dir=out, progress=False)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(on_disk) == {str(data_file), "_meta"}
    r = on_disk[str(data_file)]
    assert list(r) == list(REPORT_KEYS)
    assert r["n"] == len(ROWS)
    k = round(r["accuracy"] * r["n"])
    assert math.isclose(r["accuracy"], k / r["n"])
    lo, hi = r["ci95"]
    assert 0.0 <= lo <= r["accuracy"] <= hi <= 1.0
    # passes = 1 (pass 0) + T (Jacobi iterations) + answer tokens
    assert r["forward_passes_mean"] == pytest.approx(1 + T + r["tokens_mean"])
    assert 1 <= r["tokens_mean"] <= 4
    assert r["latency_s_mean"] > 0 and r["kv_bytes_mean"] > 0
    meta = on_disk["_meta"]
    assert meta["mode"] == "latent" and meta["checkpoint"] == str(checkpoint) and meta["limit"] is None
    assert "date" in meta

    preds = read_jsonl(out / "predictions.jsonl")
    assert len(preds) == len(ROWS)
    assert [p["index"] for p in preds] == list(range(len(ROWS)))
    for p, row in zip(preds, ROWS):
        assert {"dataset", "index", "question", "gold", "prediction", "correct", "text", "forward_passes"} <= set(p)
        assert p["question"] == row["question"] and p["gold"] == row["answer"]
        assert p["forward_passes"] == 1 + T + p["tokens"]
    assert sum(p["correct"] for p in preds) == k

    md = (out / "report.md").read_text()
    assert "| dataset | accuracy % [95% CI] | n | fwd passes | tokens | latency s | KV bytes |" in md
    assert f"| {data_file} |" in md


@pytest.mark.skipif(not (SHARED_DATA / "svamp.json").is_file(), reason="no local SVAMP copy")
def test_run_eval_cot_mode_on_svamp(checkpoint, tmp_path):
    # The first 6 rows of the real SVAMP file, through the benchmark name.
    ref = load_examples(str(SHARED_DATA / "svamp.json")).examples[:6]
    out = tmp_path / "eval"
    report = run_eval(checkpoint, ["svamp"], mode="cot", output_dir=out, limit=6, progress=False)
    r = report["svamp"]
    assert r["n"] == 6 and report["_meta"]["mode"] == "cot" and report["_meta"]["limit"] == 6
    preds = read_jsonl(out / "predictions.jsonl")
    assert [p["question"] for p in preds] == [e.question for e in ref]
    assert [p["gold"] for p in preds] == [e.answer for e in ref]
    for p in preds:
        assert p["forward_passes"] == p["tokens"]  # CoT decoding: one pass per generated token
        assert p["tokens"] <= 6
        if "The answer is:" not in p["text"]:
            assert p["prediction"] is None and not p["correct"]
    assert r["forward_passes_mean"] == pytest.approx(r["tokens_mean"])


def test_batch_size_invariance(model):
    examples = [Example(r["question"], r["steps"], r["answer"]) for r in ROWS]
    rep1, p1 = evaluate(model, examples, mode="latent", batch_size=1, progress=False)
    rep3, p3 = evaluate(model, examples, mode="latent", batch_size=3, progress=False)
    assert [p.index for p in p1] == [p.index for p in p3] == list(range(len(examples)))
    assert [p.text for p in p1] == [p.text for p in p3]
    assert [p.prediction for p in p1] == [p.prediction for p in p3]
    assert [p.forward_passes for p in p1] == [p.forward_passes for p in p3]
    assert [p.kv_bytes for p in p1] == [p.kv_bytes for p in p3]
    assert rep1.accuracy == rep3.accuracy and rep1.n == rep3.n == 5
    _, lim = evaluate(model, examples, batch_size=2, limit=2, progress=False)
    assert [p.question for p in lim] == [e.question for e in examples[:2]]


def test_nocot_checkpoint_answers_directly(model, data_file, tmp_path):
    nocot = SimpleNamespace(**{k: getattr(model, k) for k in ("encoder", "generate")})
    nocot.cfg = model.cfg.override(["method=nocot"])
    report = run_eval("nocot-ckpt", [str(data_file)], mode="latent", output_dir=tmp_path, progress=False, model=nocot)
    assert report["_meta"]["mode"] == "direct"
    r = report[str(data_file)]
    assert r["forward_passes_mean"] == pytest.approx(1 + r["tokens_mean"])  # question pass + answer tokens


def test_resolve_mode():
    assert resolve_mode("kava") == resolve_mode("pccot") == resolve_mode("codi") == "latent"
    assert resolve_mode("nocot") == "direct"
    assert resolve_mode("cot") == "cot"
    for method in ("kava", "nocot", "cot"):
        assert resolve_mode(method, "cot") == "cot"
    with pytest.raises(ValueError):
        resolve_mode("kava", "beam")


def test_answer_text():
    assert answer_text(" 42 apples", "latent", "The answer is:") == " 42 apples"
    assert answer_text("<<2*3=6>> The answer is: 6", "cot", "The answer is:") == " 6"
    assert answer_text("<<2*3=6>> so 6", "cot", "The answer is:") is None


class FakeModel:
    """Returns known texts per question; records the batches it was asked for."""

    def __init__(self, texts: dict[str, str]):
        self.texts = texts
        self.cfg = KavaConfig()
        self.calls: list[list[str]] = []

    def generate(self, questions, mode="latent", max_new_tokens=None):
        self.calls.append(list(questions))
        texts = [self.texts[q] for q in questions]
        n = [len(t.split()) + 1 for t in texts]
        passes = [x if mode == "cot" else 1 + T + x for x in n]
        batch = GenerationBatch(texts, [[0] * x for x in n], passes, n, [100 * x for x in n], None)
        return batch.split(list(questions), mode, self.cfg.data.answer_prompt)  # one Generation per question


def wilson_by_hand(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_exact_accuracy_with_known_texts():
    examples = [
        Example("a much longer question about apples and pears", [], "12"),
        Example("short", [], "1,000"),
        Example("medium question", [], "7"),
    ]
    fake = FakeModel({
        examples[0].question: " 12 apples",
        examples[1].question: " $1,000.00",
        examples[2].question: " 8",
    })
    rep, preds = evaluate(fake, examples, mode="latent", batch_size=2, progress=False)
    assert [p.correct for p in preds] == [True, True, False]
    assert [p.prediction for p in preds] == [12.0, 1000.0, 8.0]
    assert rep.n == 3
    assert round(rep.accuracy, 4) == 0.6667
    lo, hi = wilson_by_hand(2, 3)
    assert rep.ci95 == pytest.approx([lo, hi], abs=1e-9)
    assert rep.ci95 == pytest.approx([0.2077, 0.9385], abs=1e-4)
    # batched shortest first, predictions back in input order
    assert fake.calls == [["short", "medium question"], [examples[0].question]]
    assert rep.forward_passes_mean == pytest.approx(1 + T + rep.tokens_mean)
    assert rep.kv_bytes_mean == pytest.approx(100 * rep.tokens_mean)


def test_cot_answers_read_after_the_prompt():
    examples = [Example("q1", [], "6"), Example("q2", [], "6"), Example("q3", [], "4")]
    fake = FakeModel({
        "q1": "<<2*3=6>> The answer is: 6",
        "q2": "<<2*3=6>> 6",  # the model never wrote P: no prediction
        "q3": "<<1+2=3>> The answer is: 4 then The answer is: 5",
    })
    rep, preds = evaluate(fake, examples, mode="cot", progress=False)
    assert [p.prediction for p in preds] == [6.0, None, 4.0]
    assert [p.correct for p in preds] == [True, False, True]
    assert rep.forward_passes_mean == pytest.approx(rep.tokens_mean)


def test_run_eval_errors(checkpoint, tmp_path):
    with pytest.raises(DataError):
        run_eval(checkpoint, [str(tmp_path / "missing.jsonl")], output_dir=tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError):
        run_eval(tmp_path / "no-such-ckpt", ["gsm8k"], output_dir=tmp_path / "o", progress=False)
    with pytest.raises(DataError):
        run_eval(checkpoint, ["not-a-benchmark.jsonl"], output_dir=tmp_path / "o", progress=False)


def test_checkpoint_resolution(checkpoint, tmp_path):
    from kava.evaluate import check_checkpoint

    assert check_checkpoint(checkpoint) == Path(checkpoint)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("method: kava\n")
    with pytest.raises(FileNotFoundError, match="not a KaVa checkpoint"):
        check_checkpoint(tmp_path / "run")
    (tmp_path / "run" / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="without a complete checkpoint"):
        check_checkpoint(tmp_path / "run")
