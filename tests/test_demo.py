"""Smoke test of the demo pipeline at tiny size: task, tokenizer, both trainings, three evaluations, report."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from kava.demo import main


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    rc = main(["--quick", "--output", str(out), "--set", "train.max_steps=2", "--set", "train.curriculum_cot_steps=1",
               "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=4", "--set", "eval.max_cot_tokens=8"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("latent", "cot", "direct"):
        assert report["kava"][key]["n"] == 8
    assert report["nocot"]["direct"]["n"] == 8
    # What the latents add: the KaVa model's latent answers paired with its own direct answers.
    latent_ok, direct_ok = ([json.loads(x)["correct"] for x in (out / "kava" / f"predictions_{m}.jsonl").read_text().splitlines()]
                            for m in ("latent", "direct"))
    added = report["latent_minus_direct"]
    assert added["diff"] == pytest.approx((sum(latent_ok) - sum(direct_ok)) / 8)
    assert added["diff_ci95"][0] <= added["diff"] <= added["diff_ci95"][1] and 0 <= added["mcnemar_p"] <= 1
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
    assert "KaVa student (latent)" in md and "No-CoT" in md and "95% CI" in md and "What the latents add" in md
    assert (out / "training_curves.png").stat().st_size > 1000
    # Train and test questions are disjoint.
    train = {json.loads(x)["question"] for x in (out / "data" / "train.jsonl").read_text().splitlines()}
    test = {json.loads(x)["question"] for x in (out / "data" / "test.jsonl").read_text().splitlines()}
    assert not train & test
    # The default task keeps every value small, and the run directory records which task it holds.
    assert json.loads((out / "data" / "task.json").read_text())["task"] == "small"
    assert all(int(t["answer"]) <= 60 for t in [json.loads(x) for x in (out / "data" / "test.jsonl").read_text().splitlines()])
    assert "task `small`" in md


def test_side_by_side_demo_equals_the_one_after_the_other_demo_at_one_thread(tmp_path):
    """Two single-thread workers (--workers 2) train and score exactly what one single-thread process does."""
    from safetensors.torch import load_file

    sets = ["--set", "train.max_steps=2", "--set", "train.curriculum_cot_steps=1", "--set", "train.global_batch_size=8",
            "--set", "train.micro_batch_size=4", "--set", "eval.max_cot_tokens=8"]
    reports = {}
    for name, args in (("side_by_side", ["--workers", "2"]), ("sequential", ["--threads", "1"])):
        before = torch.get_num_threads()
        try:
            assert main(["--quick", "--output", str(tmp_path / name), *sets, *args]) == 0
        finally:
            torch.set_num_threads(before)
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    a, b = reports["side_by_side"], reports["sequential"]
    assert (a["workers"], b["workers"]) == (2, 1)
    for run, mode in (("kava", "latent"), ("kava", "cot"), ("nocot", "direct")):
        assert a[run][mode]["accuracy"] == b[run][mode]["accuracy"], (run, mode)
        pa, pb = ([{k: v for k, v in json.loads(x).items() if k != "latency_s"}
                   for x in (tmp_path / d / run / f"predictions_{mode}.jsonl").read_text().splitlines()]
                  for d in ("side_by_side", "sequential"))
        assert pa == pb, (run, mode)
    for run in ("kava", "nocot"):
        final = sorted((tmp_path / "side_by_side" / run / "checkpoints").glob("step-*"))[-1].name
        # every weight file; not rng.safetensors, the process's generator state (steps reseed from (seed, step))
        files = [f for f in (tmp_path / "side_by_side" / run / "checkpoints" / final).rglob("*.safetensors")
                 if f.name != "rng.safetensors"]
        assert files
        for f in sorted(files):
            rel = f.relative_to(tmp_path / "side_by_side")
            wa, wb = load_file(f), load_file(tmp_path / "sequential" / rel)
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (run, rel)


def test_data_parallel_demo_trains_what_one_process_trains(tmp_path, monkeypatch):
    """--processes 2: each run trains in two DDP processes (torchrun) with the micro-batch split; the losses are
    the one-process run's at that micro-batch, to float summation order."""
    import os
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    sets = ["--set", "train.max_steps=3", "--set", "train.curriculum_cot_steps=1", "--set", "train.global_batch_size=8",
            "--set", "train.micro_batch_size=8", "--set", "eval.max_cot_tokens=8", "--set", "train.log_every=1"]
    before = torch.get_num_threads()
    try:
        assert main(["--quick", "--output", str(tmp_path / "ddp"), *sets, "--processes", "2"]) == 0
        assert main(["--quick", "--output", str(tmp_path / "one"), *sets, "--set", "train.micro_batch_size=4",
                     "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(before)
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["processes"] == 2 and "data-parallel over 2" in (tmp_path / "ddp" / "report.md").read_text()
    for run in ("kava", "nocot"):
        cfg = (tmp_path / "ddp" / run / "config.yaml").read_text()
        assert "micro_batch_size: 4" in cfg  # the global batch of 8 split over the two processes

        def losses(d):
            rows = [json.loads(x) for x in (d / run / "metrics.jsonl").read_text().splitlines()]
            return [r["loss"] for r in rows if "loss" in r]

        a, b = losses(tmp_path / "ddp"), losses(tmp_path / "one")
        assert len(a) == len(b) == 3
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


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


def test_ablation_spec_covers_method_md():
    """The packaged ablate-demo spec has METHOD.md's ablations, and every override is a valid config key."""
    from kava.sweep import SweepSpec, resolve_spec, variant_config

    spec = SweepSpec.from_yaml(resolve_spec("ablate-demo"))
    sets = {s for ss in spec.variants.values() for s in ss}
    for needed in ("method=pccot", "method=codi", "latent.mode=sequential", "loss.alpha_codi=0",
                   "latent.use_projection=false", "loss.kv_supervision=all", "loss.kv_reduction=sum",
                   "eviction.method=importance", "eviction.method=redundancy", "eviction.method=crop",
                   "eviction.method=random", "latent.num_tokens=12", "latent.num_tokens=24",
                   "latent.num_iterations=0", "latent.num_iterations=1"):
        assert needed in sets
    assert spec.reference == "kava" and spec.variants["kava"] == []
    configs = {name: variant_config(spec, name, 0).to_yaml() for name in spec.variants}
    assert len(set(configs.values())) == len(configs), "two variants are the same run"
    assert spec.sizes["n_valid"] >= 2000


def test_demo_ablate_runs_the_sweep_spec(tmp_path, monkeypatch):
    """kava demo --ablate is the ablate-demo sweep at the given seed, task and extra overrides."""
    import kava.sweep

    seen = {}

    def fake_run_sweep(spec, out, workers=1, threads=1, split="valid", train=True):
        seen.update(spec=spec, out=out, workers=workers)
        return {}

    monkeypatch.setattr(kava.sweep, "run_sweep", fake_run_sweep)
    assert main(["--ablate", "--quick", "--seed", "3", "--task", "sizing", "--workers", "2",
                 "--output", str(tmp_path / "abl"), "--set", "train.max_steps=9"]) == 0
    spec = seen["spec"]
    assert spec.seeds == [3] and spec.task == "sizing" and spec.sets[-1] == "train.max_steps=9"
    assert spec.sizes["quick"] is True and seen["workers"] == 2 and seen["out"] == tmp_path / "abl"
