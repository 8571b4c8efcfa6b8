"""Two CPU processes (torchrun + gloo, through accelerate) train like one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_config
from kava.train import run_training

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def rows(n: int) -> str:
    out = []
    for i in range(n):
        a, b = 2 + i % 7, 1 + i % 5
        out.append(json.dumps({
            "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
            "steps": [f"<<{a}+{b}={a + b}>>", f"<<{a + b}*2={2 * (a + b)}>>"],
            "answer": str(2 * (a + b)),
        }))
    return "\n".join(out) + "\n"


def step_losses(run_dir: Path) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def test_two_processes_match_one_process(tiny_llama_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(rows(10))
    # 4 micro-batches of 1 per step: one process runs all 4, two processes run 2 each.
    cfg = tiny_config(tiny_llama_dir, **{
        "data.train_path": str(data), "train.max_steps": 3, "train.global_batch_size": 4, "train.micro_batch_size": 1,
        "train.log_every": 1, "train.warmup_ratio": 0.0, "train.lr": 1e-2, "lora.dropout": 0.0,
    })
    cfg_file = tmp_path / "run.yaml"
    cfg.to_yaml(cfg_file)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kava.train", "--config", str(cfg_file), "--output", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_training(cfg, tmp_path / "one")
    finally:
        torch.set_num_threads(before)

    two = tmp_path / "two" / "checkpoints" / "step-000003"
    assert json.loads((two / "train_state.json").read_text())["world_size"] == 2
    assert json.loads((one / "train_state.json").read_text())["world_size"] == 1
    a, b = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]  # logged once, by the main process
    for (_, la), (_, lb) in zip(a, b):
        assert abs(la - lb) < 1e-4, (a, b)

    from kava.model import KavaModel

    wa = {n: p for n, p in KavaModel.load(one, is_trainable=True).named_parameters() if p.requires_grad}
    wb = {n: p for n, p in KavaModel.load(two, is_trainable=True).named_parameters() if p.requires_grad}
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4), k
