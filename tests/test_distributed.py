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


def validation(run_dir: Path) -> dict[int, dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if "val_loss" in r}


def two_processes(cfg, out: Path, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 -m kava.train`` (gloo on the CPU, through accelerate)."""
    cfg_file = tmp_path / "run.yaml"
    cfg.to_yaml(cfg_file)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kava.train", "--config", str(cfg_file), "--output", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def one_process(cfg, out: Path) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_training(cfg, out)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("guard", ["host", "device"])
def test_two_processes_match_one_process(guard, tiny_llama_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(rows(10))
    (tmp_path / "valid.jsonl").write_text(rows(3))
    # 4 micro-batches of 1 per step: one process runs all 4, two processes run 2 each. Validation at steps 2
    # and 3: each process validates its share (batches of 2: rank 0 gets 2 examples, rank 1 one).
    cfg = tiny_config(tiny_llama_dir, **{
        "data.train_path": str(data), "train.max_steps": 3, "train.global_batch_size": 4, "train.micro_batch_size": 1,
        "train.log_every": 1, "train.warmup_ratio": 0.0, "train.lr": 1e-2, "lora.dropout": 0.0,
        "data.eval_path": str(tmp_path / "valid.jsonl"), "train.eval_every": 2, "eval.batch_size": 2,
        "train.nonfinite_guard": guard,  # device: fused AdamW through accelerate's wrapper, under DDP
    })
    two_processes(cfg, tmp_path / "two", tmp_path)
    one = one_process(cfg, tmp_path / "one")

    two = tmp_path / "two" / "checkpoints" / "step-000003"
    assert json.loads((two / "train_state.json").read_text())["world_size"] == 2
    assert json.loads((one / "train_state.json").read_text())["world_size"] == 1
    a, b = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]  # logged once, by the main process
    for (_, la), (_, lb) in zip(a, b):
        assert abs(la - lb) < 1e-4, (a, b)
    va, vb = validation(tmp_path / "one"), validation(tmp_path / "two")
    assert sorted(va) == sorted(vb) == [2, 3]
    for s in va:
        assert va[s].keys() == vb[s].keys() and vb[s]["val_examples"] == 3
        for k in va[s]:
            assert abs(va[s][k] - vb[s][k]) < 1e-4, (s, k, va[s][k], vb[s][k])

    from kava.model import KavaModel

    wa = {n: p for n, p in KavaModel.load(one, is_trainable=True).named_parameters() if p.requires_grad}
    wb = {n: p for n, p in KavaModel.load(two, is_trainable=True).named_parameters() if p.requires_grad}
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4), k


def test_two_processes_train_with_no_jacobi_iteration(tiny_llama_dir, tmp_path):
    """latent.num_iterations=0 (an ablation): prj feeds nothing, so it is neither run nor trained, and DDP
    (which raised on the second step, waiting for prj's gradients) trains as one process does."""
    from kava.model import KavaModel

    data = tmp_path / "train.jsonl"
    data.write_text(rows(8))
    cfg = tiny_config(tiny_llama_dir, **{
        "data.train_path": str(data), "train.max_steps": 2, "train.global_batch_size": 2, "train.micro_batch_size": 1,
        "train.log_every": 1, "train.warmup_ratio": 0.0, "train.lr": 1e-2, "lora.dropout": 0.0,
        "latent.num_iterations": 0,
    })
    two_processes(cfg, tmp_path / "two", tmp_path)
    one = one_process(cfg, tmp_path / "one")
    a, b = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert [s for s, _ in b] == [1, 2]
    for (_, la), (_, lb) in zip(a, b):
        assert abs(la - lb) < 1e-4, (a, b)
    # prj keeps its initial values; the checkpoint still holds it, as a T > 0 branch needs.
    init = KavaModel.from_config(cfg).projection.state_dict()
    for ckpt in (one, tmp_path / "two" / "checkpoints" / "step-000002"):
        saved = KavaModel.load(ckpt).projection.state_dict()
        assert saved.keys() == init.keys() and all(torch.equal(saved[k], init[k]) for k in init)
