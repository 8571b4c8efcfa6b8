"""Sweeps at tiny size: runs and report, resume (finished and killed sweeps), the shared warm start against
training from scratch, the test split without retraining, spec errors, warm-start grouping."""
from __future__ import annotations

import json
from dataclasses import replace
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from kava import sweep
from kava.config import KavaConfig
from kava.stats import mcnemar_exact, paired_bootstrap_ci

SEEDS = [0, 1]
VARIANTS = ["kava", "pccot"]
BUDGET = 6
WARM_STEPS = 2
SPEC = {
    "base": "demo",
    "task": "small",
    "sizes": {"quick": True},
    "budget": BUDGET,
    "seeds": SEEDS,
    "reference": "kava",
    # save_every=3 + keep_last=2: every run keeps step-000003 next to its final step-000006.
    "sets": [f"train.curriculum_cot_steps={WARM_STEPS}", "train.global_batch_size=4", "train.micro_batch_size=4",
             "train.save_every=3", "train.keep_last=2", "train.log_every=1", "eval.batch_size=4"],
    "variants": {"kava": [], "pccot": ["method=pccot"]},
}
TIMING_KEYS = {"examples_per_s", "latency_s"}


def write_spec(path: Path, **changes) -> Path:
    d = json.loads(json.dumps(SPEC))
    d.update(changes)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def snapshot(root: Path, skip=lambda rel: False) -> dict[str, tuple[int, int]]:
    """relative path -> (mtime_ns, size) of every file under root."""
    snap = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not skip(rel):
            st = p.stat()
            snap[rel] = (st.st_mtime_ns, st.st_size)
    return snap


def weights(step_dir: Path, rng: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: model weights, projection, optimizer state (and the RNG states).

    The saved numpy RNG state is that of the process (training seeds torch only, and uses nothing else), so
    it differs between a worker and the test process: compared only between runs of the same sweep.
    """
    out = {}
    for f in sorted(step_dir.rglob("*.safetensors")):
        if f.name == "rng.safetensors" and not rng:
            continue
        for k, v in load_file(f).items():
            out[f"{f.relative_to(step_dir)}:{k}"] = v
    assert any(k.startswith("model/") for k in out) and any(k.startswith("projection") for k in out)
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k}: max |diff| {(a[k].double() - b[k].double()).abs().max().item()}"


def outcomes(run_dir: Path, split: str = "valid") -> list[bool]:
    rows = sorted(read_jsonl(run_dir / f"predictions_{split}_latent.jsonl"), key=lambda r: r["index"])
    assert [r["index"] for r in rows] == list(range(len(rows)))
    return [bool(r["correct"]) for r in rows]


def check_report_against_files(out: Path, split: str) -> dict:
    """The report's numbers recomputed by hand from the per-question prediction files with kava.stats."""
    report = json.loads((out / f"report_{split}.json").read_text())
    assert report["split"] == split and report["reference"] == "kava" and report["seeds"] == SEEDS
    assert list(report["variants"]) == VARIANTS
    for name in VARIANTS:
        v = report["variants"][name]
        accs = []
        for seed in SEEDS:
            run = out / f"seed{seed}" / name
            preds = read_jsonl(run / f"predictions_{split}_latent.jsonl")
            row = v["per_seed"][str(seed)]
            assert row["mode"] == "latent" and row["n"] == len(preds)
            assert row["accuracy"] == sum(p["correct"] for p in preds) / len(preds)
            assert row["forward_passes_mean"] == pytest.approx(np.mean([p["forward_passes"] for p in preds]))
            accs.append(row["accuracy"])
            if name != "kava":
                a, b = outcomes(run, split), outcomes(out / f"seed{seed}" / "kava", split)
                d, lo, hi = paired_bootstrap_ci([(a, b)], seed=seed)
                assert row["diff"] == pytest.approx(np.mean(a) - np.mean(b), abs=1e-12) == d
                assert row["diff_ci95"] == [lo, hi]
                assert row["mcnemar_p"] == mcnemar_exact(a, b)
        assert v["mean"] == pytest.approx(np.mean(accs), abs=1e-12)
        assert v["std"] == pytest.approx(np.std(accs, ddof=1), abs=1e-12)
        if name != "kava":
            pairs = [(outcomes(out / f"seed{s}" / name, split), outcomes(out / f"seed{s}" / "kava", split)) for s in SEEDS]
            d, lo, hi = paired_bootstrap_ci(pairs)
            assert v["pooled_diff"] == d and v["pooled_diff_ci95"] == [lo, hi]
        else:
            assert "diff" not in v["per_seed"]["0"] and "pooled_diff" not in v
    md = (out / f"report_{split}.md").read_text()
    assert f"# Sweep report ({split} split)" in md and "| kava |" in md and "| pccot |" in md and "(reference)" in md
    assert (out / f"report_{split}.png").stat().st_size > 1000
    return report


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[Path, Path]:
    """One finished 2-variant x 2-seed sweep (~25 s on 2 busy cores); tests that change it leave it finished."""
    root = tmp_path_factory.mktemp("sweep")
    spec = write_spec(root / "spec.yaml")
    out = root / "out"
    assert sweep.main([str(spec), "--output", str(out), "--workers", "2"]) == 0
    return spec, out


# ---- a full sweep --------------------------------------------------------------------------------------

def test_sweep_trains_every_variant_and_seed_and_reports(swept):
    spec, out = swept
    assert yaml.safe_load((out / "spec.yaml").read_text())["variants"] == SPEC["variants"]
    questions = {}
    for seed in SEEDS:
        seed_dir = out / f"seed{seed}"
        valid = read_jsonl(seed_dir / "data" / "valid.jsonl")
        questions[seed] = [q["question"] for q in valid]
        # One warm start per seed (kava and pccot share the teacher-only steps), stopped at the curriculum's end.
        warms = sorted(seed_dir.glob("warm_*"))
        assert len(warms) == 1
        warm_ckpt = warms[0] / "checkpoints" / f"step-{WARM_STEPS:06d}"
        assert (warm_ckpt / "COMPLETE").exists()
        assert [p.name for p in (warms[0] / "checkpoints").iterdir()] == [warm_ckpt.name]
        for name in VARIANTS:
            run = seed_dir / name
            for f in ("config.yaml", "metrics.jsonl", "result_valid.json", "predictions_valid_latent.jsonl", "DONE"):
                assert (run / f).is_file(), run / f
            cfg = KavaConfig.from_yaml(run / "config.yaml")
            assert (cfg.method, cfg.train.seed, cfg.train.max_steps) == (name, seed, BUDGET)
            assert Path(cfg.model.name_or_path) == seed_dir / "base_model"
            assert Path(cfg.data.train_path) == seed_dir / "data" / "train.jsonl"
            assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
            assert run / (run / "DONE").read_text().strip() == run / "checkpoints" / "step-000006"
            assert json.loads((run / "init_from.json").read_text()) == {"checkpoint": str(warm_ckpt.resolve()),
                                                                       "step": WARM_STEPS}
            # The run continued from the warm start: metrics of steps 3..6 only, one row per step.
            assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(WARM_STEPS + 1, BUDGET + 1))
            result = json.loads((run / "result_valid.json").read_text())
            assert (result["variant"], result["seed"], result["split"], result["primary_mode"]) == (name, seed, "valid", "latent")
            assert Path(result["held_out"]) == seed_dir / "data" / "valid.jsonl"
            # Predictions: one per held-out question, in the order of the file (kava and pccot are paired).
            preds = sorted(read_jsonl(run / "predictions_valid_latent.jsonl"), key=lambda r: r["index"])
            assert [p["question"] for p in preds] == questions[seed]
            assert result["modes"]["latent"]["n"] == len(preds) == 8
            assert result["modes"]["latent"]["accuracy"] == sum(p["correct"] for p in preds) / len(preds)
    assert questions[0] != questions[1]  # each seed draws its own task
    report = check_report_against_files(out, "valid")
    # The last logged training metrics of each run, as in its metrics.jsonl (kv is logged for pccot too).
    for seed in SEEDS:
        for name in VARIANTS:
            last = read_jsonl(out / f"seed{seed}" / name / "metrics.jsonl")[-1]
            got = report["variants"][name]["per_seed"][str(seed)]["final_train_metrics"]
            assert got == {k: last[k] for k in ("ce_student", "ce_teacher", "codi", "kv", "step")}
    assert not (out / "report_test.json").exists()


def test_report_is_kava_stats_of_the_prediction_files(swept, tmp_path):
    """Tiny runs score 0 everywhere; give the report's input files real disagreements and reread them."""
    spec, out = swept
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    rng = np.random.default_rng(0)
    for seed in SEEDS:
        for name in VARIANTS:
            run = copy / f"seed{seed}" / name
            preds = read_jsonl(run / "predictions_valid_latent.jsonl")
            p_right = 0.7 if name == "pccot" else 0.3
            for p in preds:
                p["correct"] = bool(rng.random() < p_right)
            rng.shuffle(preds)  # the report pairs by question index, not by line
            (run / "predictions_valid_latent.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
            result = json.loads((run / "result_valid.json").read_text())
            result["modes"]["latent"]["accuracy"] = sum(p["correct"] for p in preds) / len(preds)
            (run / "result_valid.json").write_text(json.dumps(result))
    for f in ("report_valid.json", "report_valid.md", "report_valid.png"):
        (copy / f).unlink()
    # A spec may add report-only pairs to a finished sweep: here kava - pccot, the reverse of the reference column.
    spec = write_spec(tmp_path / "spec_pairs.yaml", pairs=[["kava", "pccot"]])
    assert sweep.main([str(spec), "--output", str(copy), "--no-train"]) == 0
    report = check_report_against_files(copy, "valid")
    (pair,) = report["pairs"]
    assert (pair["a"], pair["b"]) == ("kava", "pccot")
    for seed in SEEDS:
        a, b = outcomes(copy / f"seed{seed}" / "kava"), outcomes(copy / f"seed{seed}" / "pccot")
        d, lo, hi = paired_bootstrap_ci([(a, b)], seed=seed)
        row = pair["per_seed"][str(seed)]
        assert (row["diff"], row["diff_ci95"], row["mcnemar_p"]) == (d, [lo, hi], mcnemar_exact(a, b))
        assert row["diff"] == pytest.approx(-report["variants"]["pccot"]["per_seed"][str(seed)]["diff"], abs=1e-12)
    d, lo, hi = paired_bootstrap_ci([(outcomes(copy / f"seed{s}" / "kava"), outcomes(copy / f"seed{s}" / "pccot"))
                                     for s in SEEDS])
    assert pair["pooled_diff"] == d and pair["pooled_diff_ci95"] == [lo, hi]
    assert f"| `kava` − `pccot` |" in (copy / "report_valid.md").read_text()
    rows = [report["variants"]["pccot"]["per_seed"][str(s)] for s in SEEDS]
    assert any(r["diff"] != 0 for r in rows) and any(r["mcnemar_p"] < 1 for r in rows)
    md = (copy / "report_valid.md").read_text()
    for r in rows:
        assert f"{100 * r['diff']:+.1f} [{100 * r['diff_ci95'][0]:+.1f}, {100 * r['diff_ci95'][1]:+.1f}] " \
               f"p={r['mcnemar_p']:.2g}" in md
    assert f"**{100 * report['variants']['pccot']['pooled_diff']:+.1f}**" in md


# ---- resume -------------------------------------------------------------------------------------------

def test_rerun_of_a_finished_sweep_trains_nothing(swept):
    spec, out = swept
    report = (out / "report_valid.json").read_text()
    before = snapshot(out, skip=lambda rel: rel.startswith("report_"))
    assert sweep.main([str(spec), "--output", str(out), "--workers", "2"]) == 0
    after = snapshot(out, skip=lambda rel: rel.startswith("report_"))
    assert after == before  # no file written, none added (no checkpoint, no metrics row, no result)
    assert (out / "report_valid.json").read_text() == report


def test_killed_sweep_redoes_only_the_interrupted_run_and_resumes_it(swept, capfd):
    spec, out = swept
    run = out / "seed0" / "pccot"
    final, middle = run / "checkpoints" / "step-000006", run / "checkpoints" / "step-000003"
    want_weights = weights(final, rng=True)
    want_preds = read_jsonl(run / "predictions_valid_latent.jsonl")
    want_metrics = read_jsonl(run / "metrics.jsonl")
    want_result = json.loads((run / "result_valid.json").read_text())
    others = snapshot(out, skip=lambda rel: rel.startswith(("report_", "seed0/pccot/")))
    kept = snapshot(run, skip=lambda rel: not rel.startswith(("checkpoints/step-000003/", "init_from.json")))
    config = (run / "config.yaml").read_text()
    # Killed after step 5: its last checkpoint is step 3, the log has rows up to step 5, no result, no marker.
    shutil.rmtree(final)
    for f in run.glob("*"):
        if f.name.startswith(("result_", "predictions_", "DONE", "sweep_timing")):
            f.unlink()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in want_metrics if r["step"] <= 5))
    capfd.readouterr()

    assert sweep.main([str(spec), "--output", str(out), "--workers", "2"]) == 0
    captured = capfd.readouterr()
    assert f"resumed from {middle} at step 3/{BUDGET}" in captured.out + captured.err
    assert snapshot(out, skip=lambda rel: rel.startswith(("report_", "seed0/pccot/"))) == others
    assert snapshot(run, skip=lambda rel: not rel.startswith(("checkpoints/step-000003/", "init_from.json"))) == kept
    assert (run / "config.yaml").read_text() == config
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    # The resumed run equals the uninterrupted one: weights, optimizer state, log, predictions, result.
    assert_same_tensors(weights(final, rng=True), want_weights)
    got_metrics = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in got_metrics] == [r["step"] for r in want_metrics] == [3, 4, 5, 6]

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

    assert strip(got_metrics) == strip(want_metrics)
    assert strip(read_jsonl(run / "predictions_valid_latent.jsonl")) == strip(want_preds)
    got_result = json.loads((run / "result_valid.json").read_text())
    assert got_result["modes"]["latent"]["accuracy"] == want_result["modes"]["latent"]["accuracy"]
    assert run / (run / "DONE").read_text().strip() == final
    check_report_against_files(out, "valid")


# ---- the shared warm start -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", VARIANTS)
def test_branch_off_the_shared_warm_start_equals_training_from_scratch(swept, tmp_path, name):
    from kava.train import run_training

    spec, out = swept
    run = out / "seed0" / name
    init = json.loads((run / "init_from.json").read_text())
    assert init["step"] == WARM_STEPS and Path(init["checkpoint"]).parent.parent.name.startswith("warm_")
    cfg = KavaConfig.from_yaml(run / "config.yaml")
    assert cfg.method == name and cfg.train.curriculum_cot_steps == WARM_STEPS < cfg.train.max_steps == BUDGET
    final = run_training(cfg, tmp_path / "scratch")
    assert final == tmp_path / "scratch" / "checkpoints" / "step-000006"
    assert not (tmp_path / "scratch" / "init_from.json").exists()
    assert_same_tensors(weights(final), weights(run / "checkpoints" / "step-000006"))


# ---- the test split ------------------------------------------------------------------------------------

def test_test_split_is_scored_without_retraining(swept):
    spec, out = swept
    before = snapshot(out, skip=lambda rel: rel.endswith("sweep_timing.json"))
    timings = {p: p.read_text() for p in out.glob("seed*/*/sweep_timing.json")}
    assert sweep.main([str(spec), "--output", str(out), "--split", "test", "--no-train", "--workers", "2"]) == 0
    after = snapshot(out, skip=lambda rel: rel.endswith("sweep_timing.json"))
    # Everything that was there is untouched (checkpoints, logs, valid results and report) ...
    assert {k: after[k] for k in before} == before
    assert {p: p.read_text() for p in out.glob("seed*/*/sweep_timing.json")} == timings
    # ... and only the test results and report were added.
    added = sorted(set(after) - set(before))
    assert added == sorted(["report_test.json", "report_test.md", "report_test.png"]
                           + [f"seed{s}/{n}/{f}" for s in SEEDS for n in VARIANTS
                              for f in ("result_test.json", "predictions_test_latent.jsonl")])
    for seed in SEEDS:
        test_q = [q["question"] for q in read_jsonl(out / f"seed{seed}" / "data" / "test.jsonl")]
        for name in VARIANTS:
            run = out / f"seed{seed}" / name
            res = json.loads((run / "result_test.json").read_text())
            assert res["split"] == "test" and Path(res["held_out"]) == out / f"seed{seed}" / "data" / "test.jsonl"
            assert Path(res["checkpoint"]) == run / "checkpoints" / "step-000006"
            preds = sorted(read_jsonl(run / "predictions_test_latent.jsonl"), key=lambda r: r["index"])
            assert [p["question"] for p in preds] == test_q
    check_report_against_files(out, "test")
    assert "# Sweep report (test split)" in (out / "report_test.md").read_text()


def test_no_train_before_training_is_a_clear_error(tmp_path, capsys):
    from kava.cli import main

    spec = write_spec(tmp_path / "spec.yaml")
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--output", str(out), "--no-train"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("kava: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "not trained yet: seed0/kava, seed1/kava, seed0/pccot, seed1/pccot" in errors[0]  # variant by variant
    assert "without --no-train" in errors[0]
    assert not list(out.rglob("checkpoints")) and not list(out.rglob("report_*"))


# ---- spec errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"budgte": 6}, "unknown key(s) budgte"),
    ({"reference": "codi"}, "reference 'codi' is not one of the variants (kava, pccot)"),
    ({"seeds": []}, "'seeds' must be a non-empty list of distinct integers"),
    ({"seeds": [0, 0]}, "'seeds' must be a non-empty list of distinct integers"),
    ({"budget": 0}, "'budget' must be a positive integer"),
    ({"sizes": {"quick": True, "n_tset": 3}}, "sizes: unknown field(s) n_tset"),
    ({"variants": {"kava": [], "seed2": []}}, "variant name 'seed2'"),
    ({"pairs": [["kava", "codi"]]}, "pairs: 'codi' is not one of the variants (kava, pccot)"),
    ({"pairs": [["kava", "kava"]]}, "pairs: [kava, kava] compares a variant with itself"),
    ({"pairs": ["kava"]}, "'pairs' must be a list of [variant, variant] pairs"),
    ({"style": "prose"}, "style 'prose': expected 'equations' or 'nl'"),
    ({"task": None, "valid": "valid.jsonl", "style": "nl"}, "'style' applies to the synthetic 'task' only"),
    (None, "no such sweep spec"),
])
def test_bad_spec_is_a_one_line_error(tmp_path, capsys, change, message):
    from kava.cli import main

    spec = write_spec(tmp_path / "spec.yaml", **change) if change is not None else tmp_path / "missing.yaml"
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kava: error:") and "Traceback" not in err
    assert message in err
    assert not out.exists()  # refused before anything was written


def test_variant_with_an_unknown_config_key_names_variant_and_key(tmp_path, capsys):
    from kava.cli import main

    spec = write_spec(tmp_path / "spec.yaml", seeds=[0],
                      variants={"kava": [], "typo": ["loss.kv_reductoin=sum"]})
    assert main(["sweep", str(spec), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("kava: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "variant 'typo'" in errors[0] and "loss.kv_reductoin" in errors[0] and str(spec) in errors[0]
    assert not list((tmp_path / "out").rglob("checkpoints"))


def test_a_corrected_spec_may_reuse_the_output_dir_of_a_rejected_one(tmp_path, capsys):
    from kava.cli import main

    bad = write_spec(tmp_path / "spec.yaml", seeds=[0], variants={"kava": [], "typo": ["loss.kv_reductoin=sum"]})
    out = tmp_path / "out"
    assert main(["sweep", str(bad), "--output", str(out)]) == 2
    assert not out.exists()
    fixed = write_spec(tmp_path / "spec.yaml", seeds=[0], variants={"kava": [], "typo": ["loss.kv_reduction=sum"]})
    capsys.readouterr()
    assert main(["sweep", str(fixed), "--output", str(out), "--no-train"]) == 2
    assert "not trained yet" in capsys.readouterr().err


# ---- warm-start grouping -------------------------------------------------------------------------------

def test_an_interrupted_warm_start_resumes_to_the_same_weights(swept, tmp_path, monkeypatch):
    """A warm start killed after its first step (a checkpoint on disk) resumes from it, bit for bit, instead of
    starting again."""
    import kava.train
    from kava.train import run_training

    spec, out = swept
    (warm,) = [j for j in sweep.plan(sweep.SweepSpec.from_yaml(spec), out) if j.kind == "warm" and j.seed == 0]
    done = sweep.warm_done(warm)
    assert done is not None and WARM_STEPS >= 2
    copy = replace(warm, run_dir=tmp_path / warm.name)
    run_training(KavaConfig.from_dict(warm.config), copy.run_dir, stop_after_steps=1)
    assert sweep.warm_done(copy) is None
    calls = []
    monkeypatch.setattr(kava.train, "run_training", lambda *a, **k: calls.append(k) or run_training(*a, **k))
    assert sweep.run_warm(copy) == warm.name
    assert [(c.get("resume") is not None, c["stop_after_steps"]) for c in calls] == [(True, WARM_STEPS - 1)]
    resumed = sweep.warm_done(copy)
    assert resumed is not None and resumed.name == done.name
    steps = [json.loads(x)["step"] for x in (copy.run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, WARM_STEPS + 1))  # step 1 was not trained again
    assert_same_tensors(weights(resumed), weights(done))


def test_an_nl_task_has_the_same_questions_with_sentence_steps(tmp_path):
    """style: nl draws the same questions as the equations task, with natural-language steps; the saved spec
    names the style only when it is not the default (so older sweep directories keep matching their spec)."""
    eq_spec = sweep.SweepSpec.from_yaml(write_spec(tmp_path / "eq.yaml", seeds=[0]))
    nl_spec = sweep.SweepSpec.from_yaml(write_spec(tmp_path / "nl.yaml", seeds=[0], style="nl"))
    assert "style" not in eq_spec.to_dict() and nl_spec.to_dict()["style"] == "nl"
    rows = {}
    for name, spec in (("eq", eq_spec), ("nl", nl_spec)):
        sweep.plan(spec, tmp_path / name)
        data = tmp_path / name / "seed0" / "data"
        assert json.loads((data / "task.json").read_text())["style"] == ("nl" if name == "nl" else "equations")
        rows[name] = read_jsonl(data / "valid.jsonl")
    assert [r["question"] for r in rows["nl"]] == [r["question"] for r in rows["eq"]]
    assert [r["answer"] for r in rows["nl"]] == [r["answer"] for r in rows["eq"]]
    for eq, nl in zip(rows["eq"], rows["nl"]):
        assert len(nl["steps"]) == len(eq["steps"])
        assert all(s.startswith("<<") for s in eq["steps"]) and all(s.endswith(".") and "<<" not in s for s in nl["steps"])


def test_warm_key_groups_variants_that_share_the_teacher_only_steps():
    variants = {
        "kava": [], "pccot": ["method=pccot"], "sum": ["loss.kv_reduction=sum"],
        "evict": ["eviction.method=importance", "latent.num_iterations=2"], "ckpt": ["train.save_every=5"],
        "fsdp": ["train.fsdp=true"],
        "lr": ["train.lr=0.001"], "wd": ["train.weight_decay_scope=matrices"], "noproj": ["latent.use_projection=false"],
        "tw": ["loss.teacher_weight=0.5"], "batch": ["train.global_batch_size=8", "train.micro_batch_size=8"],
        "grouped": ["train.group_by_length=true"], "sorted": ["train.sort_micro_batches=true"],
    }
    spec = sweep.SweepSpec.from_dict(json.loads(json.dumps({**SPEC, "variants": variants})))
    keys = {name: sweep.warm_key(sweep.variant_config(spec, name, 0)) for name in variants}
    assert None not in keys.values()
    shared = {keys[n] for n in ("kava", "pccot", "sum", "evict", "ckpt", "fsdp")}
    assert len(shared) == 1
    separate = [keys[n] for n in ("lr", "wd", "noproj", "tw", "batch", "grouped", "sorted")]
    assert len(set(separate)) == len(separate) and not set(separate) & shared
    # Another seed never shares; nothing to share without a curriculum or for a method without latents.
    assert sweep.warm_key(sweep.variant_config(spec, "kava", 1)) != keys["kava"]
    cfg = sweep.variant_config(spec, "kava", 0)
    assert sweep.warm_key(cfg.override(["train.curriculum_cot_steps=0"])) is None
    assert sweep.warm_key(cfg.override(["method=cot"])) is None
    # A key added later is left out at its default: warm starts already on disk keep their names.
    assert "group_by_length" not in keys["kava"] and "group_by_length" in keys["grouped"]
    assert "sort_micro_batches" not in keys["kava"] and "sort_micro_batches" in keys["sorted"]


def test_plan_branches_only_groups_of_two_or_more_off_a_warm_start(tmp_path):
    spec = sweep.SweepSpec.from_dict(json.loads(json.dumps(
        {**SPEC, "seeds": [3], "variants": {"kava": [], "lr": ["train.lr=0.001"], "pccot": ["method=pccot"]}})))
    jobs = sweep.plan(spec, tmp_path)
    assert [(j.kind, j.name) for j in jobs][1:] == [("run", "kava"), ("run", "lr"), ("run", "pccot")]
    warm = jobs[0]
    assert warm.kind == "warm" and warm.name.startswith("warm_") and warm.run_dir == tmp_path / "seed3" / warm.name
    assert {j.name: j.warm for j in jobs[1:]} == {"kava": warm.name, "lr": None, "pccot": warm.name}
    assert warm.config == jobs[1].config  # the warm start trains the first variant's config
    assert all(j.config["train"]["seed"] == 3 and j.seed == 3 for j in jobs)
    assert (tmp_path / "seed3" / "data" / "valid.jsonl").exists()


def test_curve_groups_pair_variants_that_differ_only_in_steps():
    from kava.sweep import curve_groups

    report = {"variants": {
        "a": {"sets": [], "max_steps": 10},
        "b": {"sets": ["train.max_steps=20"], "max_steps": 20},
        "c": {"sets": ["method=nocot", "train.max_steps=30"], "max_steps": 30},
        "d": {"sets": ["method=nocot"], "max_steps": 10},
    }}
    assert curve_groups(report) == {"(base)": [(10, "a"), (20, "b")], "method=nocot": [(10, "d"), (30, "c")]}


def test_a_run_trained_under_another_config_is_refused(swept, capsys):
    """A preset or spec edit after training must not be reported as if the runs had used it."""
    from kava.cli import main

    spec_path, out = swept
    # One saved config differs from what the spec gives in train.lr only.
    cfg_file = out / "seed0" / "kava" / "config.yaml"
    original = cfg_file.read_text()
    try:
        cfg_file.write_text(original.replace("lr: 0.0015", "lr: 0.002"))
        assert "lr: 0.002" in cfg_file.read_text()
        assert main(["sweep", str(spec_path), "--output", str(out), "--no-train"]) == 2
        err = capsys.readouterr().err
        assert "trained with another config" in err and "train.lr" in err and "Traceback" not in err
    finally:
        cfg_file.write_text(original)


def test_a_moved_sweep_is_scored_from_its_own_checkpoints(swept, tmp_path, monkeypatch):
    """DONE names the run's final checkpoint relative to the run; a marker from an older kava (a path relative to
    another working directory) still leads to the run's own checkpoint, so a copied sweep scores where it is."""
    spec, out = swept
    copy = tmp_path / "moved"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*_test*", "report_test.*"))
    for seed in SEEDS:
        for name in VARIANTS:
            marker = copy / f"seed{seed}" / name / "DONE"
            assert marker.read_text() == f"checkpoints/step-{BUDGET:06d}"
            marker.write_text(f"runs/elsewhere/seed{seed}/{name}/checkpoints/step-{BUDGET:06d}")  # old style
    monkeypatch.chdir(tmp_path)
    assert sweep.main([str(spec), "--output", str(copy), "--split", "test", "--no-train", "--workers", "1"]) == 0
    for seed in SEEDS:
        for name in VARIANTS:
            result = json.loads((copy / f"seed{seed}" / name / "result_test.json").read_text())
            assert Path(result["checkpoint"]).resolve() == (copy / f"seed{seed}" / name / "checkpoints"
                                                            / f"step-{BUDGET:06d}").resolve()
    (copy / f"seed{SEEDS[0]}" / VARIANTS[0] / "result_test.json").unlink()
    shutil.rmtree(copy / f"seed{SEEDS[0]}" / VARIANTS[0] / "checkpoints" / f"step-{BUDGET:06d}")
    assert sweep.main([str(spec), "--output", str(copy), "--split", "test", "--no-train"]) == 1


def test_a_spec_that_adds_a_variant_trains_only_that_variant(swept, tmp_path, capsys):
    """A sweep may grow: a spec that keeps every variant and seed and adds one trains only the new runs."""
    from kava.cli import main

    spec, out = swept
    copy = tmp_path / "grown"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*_test*", "report_test.*"))
    kept = snapshot(copy, skip=lambda rel: rel.startswith(("report_", "spec.yaml")) or "/sum" in rel or "/warm_" in rel)
    grown = write_spec(tmp_path / "grown.yaml", variants={**SPEC["variants"], "sum": ["loss.kv_reduction=sum"]})
    assert sweep.main([str(grown), "--output", str(copy), "--workers", "1"]) == 0
    assert snapshot(copy, skip=lambda rel: rel.startswith(("report_", "spec.yaml")) or "/sum" in rel
                    or "/warm_" in rel) == kept
    for seed in SEEDS:
        assert (copy / f"seed{seed}" / "sum" / "DONE").exists()
    report = json.loads((copy / "report_valid.json").read_text())
    assert set(report["variants"]) == {"kava", "pccot", "sum"}
    assert yaml.safe_load((copy / "spec.yaml").read_text())["variants"]["sum"] == ["loss.kv_reduction=sum"]
    # Changing a variant that has runs (or the shared sets) is another experiment: refused, nothing written.
    for changed in ({"variants": {"kava": ["train.lr=0.001"], "pccot": ["method=pccot"]}},
                    {"sets": SPEC["sets"] + ["train.lr=0.001"]}, {"seeds": [0]}):
        before = snapshot(copy)
        bad = write_spec(tmp_path / "changed.yaml", **changed)
        assert main(["sweep", str(bad), "--output", str(copy)]) == 2
        assert "may only add variants or seeds" in capsys.readouterr().err
        assert snapshot(copy) == before


def test_runs_start_in_variant_order_even_when_the_first_waits_for_its_warm_start(tmp_path):
    """One worker: kava and pccot (which wait for their shared teacher-only warm start) run before nocot (which
    needs none), in the spec's order."""
    spec = write_spec(tmp_path / "spec.yaml", seeds=[0], variants={
        "kava": [], "pccot": ["method=pccot"], "nocot": ["method=nocot", "train.curriculum_cot_steps=0"]})
    out = tmp_path / "out"
    assert sweep.main([str(spec), "--output", str(out), "--workers", "1"]) == 0
    done = [(out / "seed0" / name / "DONE").stat().st_mtime_ns for name in ("kava", "pccot", "nocot")]
    (warm,) = (out / "seed0").glob("warm_*")
    assert (warm / "checkpoints").stat().st_mtime_ns < done[0] < done[1] < done[2]


def test_runs_already_started_go_first_when_the_sweep_resumes(tmp_path):
    """One worker: nocot, the last variant, has a checkpoint from an earlier call (as after a spec grew): it
    resumes and finishes before kava and pccot, which then run in the spec's order."""
    from kava.train import run_training

    spec_path = write_spec(tmp_path / "spec.yaml", seeds=[0], variants={
        "kava": [], "pccot": ["method=pccot"], "nocot": ["method=nocot", "train.curriculum_cot_steps=0"]})
    out = tmp_path / "out"
    spec = sweep.SweepSpec.from_yaml(spec_path)
    (nocot,) = [j for j in sweep.plan(spec, out) if j.name == "nocot"]
    run_training(KavaConfig.from_dict(nocot.config), nocot.run_dir, stop_after_steps=1)
    assert sweep.started(nocot.run_dir) and not (nocot.run_dir / "DONE").exists()
    assert sweep.main([str(spec_path), "--output", str(out), "--workers", "1"]) == 0
    done = [(out / "seed0" / name / "DONE").stat().st_mtime_ns for name in ("nocot", "kava", "pccot")]
    assert done == sorted(done)
    steps = [json.loads(line)["step"] for line in (nocot.run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps[0] == 1 and steps == sorted(set(steps))  # one run, resumed: no step trained twice


@pytest.mark.parametrize("path", sorted((Path(sweep.__file__).parent / "presets" / "sweeps").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_packaged_spec_resolves_every_variant(path):
    spec = sweep.SweepSpec.from_yaml(path)
    for name in spec.variants:
        for seed in spec.seeds:
            sweep.variant_config(spec, name, seed)


def test_partial_report_leaves_out_unfinished_variants(swept, tmp_path, capsys):
    from kava.cli import main

    spec, out = swept
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*_test*", "report_*"))
    for f in ("DONE", "result_valid.json"):
        (copy / f"seed{SEEDS[-1]}" / "pccot" / f).unlink()
    assert main(["sweep", str(spec), "--output", str(copy), "--no-train"]) == 2
    assert "--partial" in capsys.readouterr().err and not (copy / "report_valid.json").exists()
    assert sweep.main([str(spec), "--output", str(copy), "--no-train", "--partial"]) == 0
    report = json.loads((copy / "report_valid.json").read_text())
    assert list(report["variants"]) == ["kava"] and report["left_out"] == ["pccot"]
    assert "**Partial report**: not trained yet, left out: `pccot`." in (copy / "report_valid.md").read_text()
    assert not (copy / f"seed{SEEDS[-1]}" / "pccot" / "DONE").exists()  # nothing trained
    for f in ("DONE", "result_valid.json"):
        (copy / f"seed{SEEDS[0]}" / "kava" / f).unlink(missing_ok=True)
    assert main(["sweep", str(spec), "--output", str(copy), "--no-train", "--partial"]) == 2
    assert "the reference 'kava' is not trained yet" in capsys.readouterr().err


def test_a_report_of_some_seeds_leaves_the_unfinished_seeds_out(swept, tmp_path, capsys):
    """--no-train --seeds 0: the report of seed 0 alone, while the other seed is not trained; the saved spec keeps
    every seed, and naming a seed the spec lacks is refused."""
    from kava.cli import main

    spec, out = swept
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*_test*", "report_*"))
    for name in ("kava", "pccot"):
        for f in ("DONE", "result_valid.json"):
            (copy / f"seed{SEEDS[-1]}" / name / f).unlink()
    assert main(["sweep", str(spec), "--output", str(copy), "--no-train"]) == 2
    capsys.readouterr()
    assert sweep.main([str(spec), "--output", str(copy), "--no-train", "--seeds", str(SEEDS[0])]) == 0
    report = json.loads((copy / "report_valid.json").read_text())
    assert report["seeds"] == [SEEDS[0]] and set(report["variants"]) == {"kava", "pccot"}
    full = json.loads((out / "report_valid.json").read_text())
    for name in ("kava", "pccot"):
        assert report["variants"][name]["per_seed"][str(SEEDS[0])]["accuracy"] == \
            full["variants"][name]["per_seed"][str(SEEDS[0])]["accuracy"]
    assert yaml.safe_load((copy / "spec.yaml").read_text())["seeds"] == SEEDS
    assert not (copy / f"seed{SEEDS[-1]}" / "pccot" / "DONE").exists()  # nothing trained
    assert main(["sweep", str(spec), "--output", str(copy), "--no-train", "--seeds", "7"]) == 2
    assert "expected some of the spec's seeds" in capsys.readouterr().err


def test_a_selection_of_seeds_and_variants_trains_only_those_runs_and_the_reference(swept, tmp_path, capsys):
    """--seeds 1 --variants pccot under a grown spec: only seed 1's missing runs of pccot and the reference are
    trained, the new variant waits, every other file is untouched, and the report covers the selection."""
    from kava.cli import main

    spec, out = swept
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*_test*", "report_*"))
    for name in ("kava", "pccot"):
        shutil.rmtree(copy / f"seed{SEEDS[-1]}" / name)
    grown = write_spec(tmp_path / "grown.yaml", variants={**SPEC["variants"], "sum": ["loss.kv_reduction=sum"]},
                       pairs=[["pccot", "kava"], ["sum", "pccot"]])
    kept = snapshot(copy, skip=lambda rel: rel.startswith(("report_", "spec.yaml")))
    assert sweep.main([str(grown), "--output", str(copy), "--seeds", str(SEEDS[-1]), "--variants", "pccot"]) == 0
    for name in ("kava", "pccot"):
        assert (copy / f"seed{SEEDS[-1]}" / name / "DONE").exists()
    assert not any(copy.glob("seed*/sum"))
    assert {k: v for k, v in snapshot(copy).items() if k in kept} == kept
    report = json.loads((copy / "report_valid.json").read_text())
    assert report["seeds"] == [SEEDS[-1]] and list(report["variants"]) == ["kava", "pccot"]
    assert [(p["a"], p["b"]) for p in report["pairs"]] == [("pccot", "kava")]
    assert yaml.safe_load((copy / "spec.yaml").read_text())["variants"] == {**SPEC["variants"], "sum": ["loss.kv_reduction=sum"]}
    assert main(["sweep", str(grown), "--output", str(copy), "--variants", "typo"]) == 2
    assert "expected some of the spec's variants kava, pccot, sum" in capsys.readouterr().err


def test_the_report_pairs_the_primary_mode_with_every_other_mode(swept, tmp_path):
    """A sweep scored in a second mode (spec extra_modes, e.g. direct) reports primary − that mode per variant,
    paired per seed and pooled, as kava.stats computes it from the two prediction files."""
    spec, out = swept
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*_test*", "report_*"))
    for seed in SEEDS:
        for name in VARIANTS:
            run = copy / f"seed{seed}" / name
            rows = read_jsonl(run / "predictions_valid_latent.jsonl")
            direct = [{**r, "correct": (i + seed) % 3 == 0} for i, r in enumerate(rows)]  # a made-up second mode
            (run / "predictions_valid_direct.jsonl").write_text("".join(json.dumps(r) + "\n" for r in direct))
            result = json.loads((run / "result_valid.json").read_text())
            result["modes"]["direct"] = {**result["modes"]["latent"],
                                         "accuracy": sum(r["correct"] for r in direct) / len(direct)}
            (run / "result_valid.json").write_text(json.dumps(result))
    assert sweep.main([str(spec), "--output", str(copy), "--no-train"]) == 0
    report = json.loads((copy / "report_valid.json").read_text())
    for name in VARIANTS:
        got = report["variants"][name]["vs_modes"]["direct"]
        pairs = []
        for seed in SEEDS:
            run = copy / f"seed{seed}" / name
            direct = sorted(read_jsonl(run / "predictions_valid_direct.jsonl"), key=lambda r: r["index"])
            a, b = outcomes(run, "valid"), [r["correct"] for r in direct]
            d, lo, hi = paired_bootstrap_ci([(a, b)], seed=seed)
            assert got["per_seed"][str(seed)] == {"diff": d, "diff_ci95": [lo, hi], "mcnemar_p": mcnemar_exact(a, b)}
            pairs.append((a, b))
        d, lo, hi = paired_bootstrap_ci(pairs)
        assert (got["pooled_diff"], got["pooled_diff_ci95"]) == (d, [lo, hi])
    assert "| kava | − direct |" in (copy / "report_valid.md").read_text()
