"""Smoke test of the demo pipeline at tiny size: task, tokenizer, both trainings, three evaluations, report."""
from __future__ import annotations

import json
from dataclasses import replace

from kava.demo import ABLATIONS, main


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    rc = main(["--quick", "--output", str(out), "--set", "train.max_steps=2", "--set", "train.curriculum_cot_steps=1",
               "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=4", "--set", "eval.max_cot_tokens=8"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("latent", "cot"):
        assert report["kava"][key]["n"] == 8
    assert report["nocot"]["direct"]["n"] == 8
    # Latent mode costs 1 + T + answer tokens; the report must say so for every question.
    preds = [json.loads(x) for x in (out / "kava" / "predictions_latent.jsonl").read_text().splitlines()]
    assert all(p["forward_passes"] == 1 + 3 + p["tokens"] for p in preds)
    # Accuracy by number of steps agrees with the per-question predictions.
    test = [json.loads(x) for x in (out / "data" / "test.jsonl").read_text().splitlines()]
    by = report["kava"]["latent"]["accuracy_by_steps"]
    for n, acc in by.items():
        rows = [p["correct"] for p, t in zip(preds, test) if len(t["steps"]) == int(n)]
        assert acc == sum(rows) / len(rows)
    assert sum(len([t for t in test if len(t["steps"]) == int(n)]) for n in by) == len(test)
    md = (out / "report.md").read_text()
    assert "KaVa student (latent)" in md and "No-CoT" in md and "95% CI" in md
    assert (out / "training_curves.png").stat().st_size > 1000
    # Train and test questions are disjoint.
    train = {json.loads(x)["question"] for x in (out / "data" / "train.jsonl").read_text().splitlines()}
    test = {json.loads(x)["question"] for x in (out / "data" / "test.jsonl").read_text().splitlines()}
    assert not train & test
    # The default task keeps every value small, and the run directory records which task it holds.
    assert json.loads((out / "data" / "task.json").read_text())["task"] == "small"
    assert all(int(t["answer"]) <= 60 for t in [json.loads(x) for x in (out / "data" / "test.jsonl").read_text().splitlines()])
    assert "task `small`" in md


def test_demo_refuses_a_run_directory_of_another_task(tmp_path):
    import pytest

    from kava.demo import QUICK, prepare_task

    out = tmp_path / "demo"
    prepare_task(out, 0, QUICK)
    prepare_task(out, 0, QUICK)  # same task: reused
    with pytest.raises(SystemExit, match="holds another task"):
        prepare_task(out, 0, replace(QUICK, task="sizing"))
    with pytest.raises(SystemExit, match="holds another task"):
        prepare_task(out, 1, QUICK)
    (out / "data" / "task.json").unlink()
    with pytest.raises(SystemExit, match="without a task.json"):
        prepare_task(out, 0, QUICK)


def test_ablation_list_covers_method_md():
    sets = {s for _, ss in ABLATIONS for s in ss}
    for needed in ("method=pccot", "loss.alpha_codi=0", "latent.use_projection=false", "loss.kv_supervision=all",
                   "eviction.method=importance", "eviction.method=redundancy", "eviction.method=crop",
                   "eviction.method=random", "latent.num_tokens=6", "latent.num_tokens=12", "latent.num_tokens=24",
                   "latent.num_iterations=0", "latent.num_iterations=1", "latent.num_iterations=3"):
        assert needed in sets


def test_ablation_trains_each_distinct_config_once(tmp_path, monkeypatch):
    """Variants equal to the demo default (M=6, T=3 when the demo uses them) reuse the kava run, marked in the table."""
    import kava.demo as demo

    calls = []

    def fake_train_and_eval(name, cfg, out, test_path, modes, init_from=None):
        calls.append((name, cfg.latent.use_projection, init_from))
        acc = 0.01 * len(calls)
        return {"train_s": 1.0, "latent": {"accuracy": acc, "ci95": [acc / 2, acc * 2], "n": 8,
                                           "forward_passes_mean": 5.0}}

    monkeypatch.setattr(demo, "train_and_eval", fake_train_and_eval)
    tiny = ["train.max_steps=3", "train.curriculum_cot_steps=2", "train.global_batch_size=4", "train.micro_batch_size=4"]
    rows = demo.run_ablation(tmp_path / "abl", 0, demo.QUICK, tiny, None)
    assert len(rows) == len(ABLATIONS)
    # One shared teacher-only warm start; every variant with the same parameter set branches off it.
    warm = tmp_path / "abl" / "warm_start" / "checkpoints" / "step-000002"
    assert (warm / "COMPLETE").exists()
    assert all(init == (warm if proj else None) for _, proj, init in calls)
    assert sum(1 for _, proj, _ in calls if not proj) == 1
    base = demo.demo_config(tmp_path, tmp_path, 0, [])
    dup_labels = {f"M={base.latent.num_tokens}", f"T={base.latent.num_iterations}"}
    assert len(calls) == len(ABLATIONS) - len(dup_labels)
    by_label = {r["variant"]: r for r in rows}
    for label in dup_labels:
        assert by_label[label]["same_run_as"] == "kava"
        assert by_label[label]["accuracy"] == by_label["kava"]["accuracy"]
    assert by_label["M=24"]["same_run_as"] is None
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert f"M={base.latent.num_tokens} (= kava)" in table
    # --only: a share of the variants, no table (a last call without it writes the table).
    calls.clear()
    (tmp_path / "abl" / "ablation.md").unlink()
    rows = demo.run_ablation(tmp_path / "abl", 0, demo.QUICK, tiny, None, only={3, 11})
    assert [r["variant"] for r in rows] == [ABLATIONS[3][0], ABLATIONS[11][0]] and len(calls) == 2
    assert not (tmp_path / "abl" / "ablation.md").exists()
