"""``train.fsdp``: two CPU processes (torchrun + gloo) sharded with FSDP2 train, validate, save and resume as one
process does, and their checkpoints are the full state, loadable by one process (kava/sharding.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, perturb_trainables, tiny_config
from kava.checkpoint import _load_state, verify_checkpoint
from kava.config import ConfigError, KavaConfig
from kava.train import build_optimizer, run_training
from test_distributed import rows

# The three 2-process tests share one module fixture (two torchrun launches and a 1-process run): about 80 s
# on 2 busy cores, well inside make test's budget, so they run in the default suite (issue #11).
needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def torchrun(args: list[str], tmp_path: Path) -> None:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` (gloo on the CPU), as the README launches training."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def logged(run_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(training records, validation records) of ``metrics.jsonl``, by step."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if "loss" in r}, {r["step"]: r for r in recs if "val_loss" in r}


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the KavaModel one process loads from ``checkpoint`` (its state dict, frozen base included)."""
    from kava.model import KavaModel

    return {k: v.detach() for k, v in KavaModel.load(checkpoint, is_trainable=True).state_dict().items()}


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    """One 2-process FSDP run of 4 steps (validation and a checkpoint every 2 steps), its resume from step 2
    under FSDP, and the same config trained by one process."""
    tmp = tmp_path_factory.mktemp("fsdp")
    (tmp / "train.jsonl").write_text(rows(10))
    (tmp / "valid.jsonl").write_text(rows(5))
    # 4 micro-batches of 1 per step: one process runs all 4, two processes 2 each. grad_clip 0.5 clips every
    # step, so a per-shard norm would change the updates.
    cfg = tiny_config(tiny_llama_dir, **{
        "data.train_path": str(tmp / "train.jsonl"), "data.eval_path": str(tmp / "valid.jsonl"),
        "train.max_steps": 4, "train.global_batch_size": 4, "train.micro_batch_size": 1, "train.log_every": 1,
        "train.warmup_ratio": 0.0, "train.lr": 1e-2, "train.grad_clip": 0.5, "lora.dropout": 0.0,
        "train.eval_every": 2, "train.save_every": 2, "train.keep_last": 5, "eval.batch_size": 2,
        "train.fsdp": True,
    })
    cfg.to_yaml(tmp / "run.yaml")
    common = ["--config", str(tmp / "run.yaml")]
    # The uninterrupted run, through a probe that also dumps the directly gathered full state at each save.
    torchrun([str(REPO / "tests" / "fsdp_probe.py"), *common, "--output", str(tmp / "fsdp")], tmp)
    torchrun(["-m", "kava.train", *common, "--output", str(tmp / "resumed"),
              "--resume", str(ckpt(tmp / "fsdp", 2))], tmp)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(cfg.override(["train.fsdp=false"]), tmp / "one")
    finally:
        torch.set_num_threads(before)
    return SimpleNamespace(fsdp=tmp / "fsdp", resumed=tmp / "resumed", one=tmp / "one")


@needs_gloo
def test_fsdp_trains_validates_and_saves_as_one_process(runs):
    """Per-step loss, global gradient norm and validation metrics of the 2-process FSDP run equal one process's
    to 1e-4; every rank validated (a rank-0-only forward would hang on the others' collectives)."""
    (train_a, val_a), (train_b, val_b) = logged(runs.one), logged(runs.fsdp)
    assert sorted(train_a) == sorted(train_b) == [1, 2, 3, 4]
    for s in train_a:
        assert abs(train_a[s]["loss"] - train_b[s]["loss"]) < 1e-4, (s, train_a[s], train_b[s])
        # clipped at 0.5 at every step: the norm is the full gradient's, not a shard's
        assert train_a[s]["grad_norm"] > 0.5
        assert abs(train_a[s]["grad_norm"] - train_b[s]["grad_norm"]) < 1e-4 * train_a[s]["grad_norm"], s
    assert sorted(val_a) == sorted(val_b) == [2, 4]
    for s in val_a:
        assert val_b[s]["val_examples"] == val_a[s]["val_examples"] == 5
        assert val_a[s].keys() == val_b[s].keys()
        for k in val_a[s]:
            assert abs(val_a[s][k] - val_b[s][k]) < 1e-4, (s, k, val_a[s][k], val_b[s][k])
    for step in (2, 4):
        assert verify_checkpoint(ckpt(runs.fsdp, step)) is None
    state = json.loads((ckpt(runs.fsdp, 4) / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4
    assert KavaConfig.from_yaml(ckpt(runs.fsdp, 4) / "config.yaml").train.fsdp is True


@needs_gloo
def test_fsdp_checkpoint_loads_in_one_process_and_equals_the_gathered_state(runs):
    """A single process loads the FSDP checkpoint (KavaModel.load) to exactly the full state the shards gathered
    when it was saved, every tensor (LoRA, new-token rows, projection, frozen base); its weights and optimizer
    state are those of the 1-process run to float tolerance."""
    for step in (2, 4):
        gathered = load_file(runs.fsdp / f"gathered-{step:06d}.safetensors")
        loaded = weights(ckpt(runs.fsdp, step))
        assert loaded.keys() == gathered.keys()
        for k in loaded:
            assert torch.equal(loaded[k], gathered[k]), (step, k)
        one = weights(ckpt(runs.one, step))
        for k in one:
            assert torch.allclose(one[k], loaded[k], atol=1e-5, rtol=1e-4), (step, k)
        a, b = _load_state(ckpt(runs.one, step), "optimizer"), _load_state(ckpt(runs.fsdp, step), "optimizer")
        assert a["param_groups"] == b["param_groups"]
        assert a["state"].keys() == b["state"].keys()
        for i in a["state"]:
            assert a["state"][i].keys() == b["state"][i].keys()
            for k in a["state"][i]:
                assert torch.allclose(a["state"][i][k], b["state"][i][k], atol=1e-6, rtol=1e-4), (step, i, k)


@needs_gloo
def test_fsdp_resume_continues_exactly(runs):
    """Resumed under FSDP from the step-2 checkpoint, steps 3-4 log the same losses, gradient norms and
    validation, and end with the same weights and optimizer state, bit for bit, as the uninterrupted FSDP run."""
    (train_a, val_a), (train_b, val_b) = logged(runs.fsdp), logged(runs.resumed)
    assert sorted(train_b) == [3, 4]
    for s in train_b:
        assert (train_a[s]["loss"], train_a[s]["grad_norm"]) == (train_b[s]["loss"], train_b[s]["grad_norm"]), s
    assert val_a[4] == val_b[4]
    a, b = weights(ckpt(runs.fsdp, 4)), weights(ckpt(runs.resumed, 4))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa, ob = _load_state(ckpt(runs.fsdp, 4), "optimizer"), _load_state(ckpt(runs.resumed, 4), "optimizer")
    assert oa["param_groups"] == ob["param_groups"]
    for i in oa["state"]:
        for k in oa["state"][i]:
            assert torch.equal(oa["state"][i][k], ob["state"][i][k]), (i, k)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_saving_gathered_state_writes_the_files_of_an_unsharded_save(tiny_llama_dir, tmp_path, lora):
    """KavaModel.save with sharding.full_model_state as its state_dict writes the bytes KavaModel.save writes (adapter or full
    weights with the tied head deduplicated, projection, config, tokenizer); sharding.full_optimizer_state is
    optimizer.state_dict() (index-keyed). Here on an unsharded model, where both must agree."""
    from kava import sharding
    from kava.model import KavaModel

    cfg = tiny_config(tiny_llama_dir, **{"lora.enabled": lora})
    model = KavaModel.from_config(cfg)
    perturb_trainables(model)
    model.save(tmp_path / "plain")
    model.save(tmp_path / "gathered", state_dict=sharding.full_model_state(model))
    files = sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "gathered") for p in (tmp_path / "gathered").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "plain" / f).read_bytes() == (tmp_path / "gathered" / f).read_bytes(), f

    optimizer = build_optimizer(cfg, model)
    loss, _ = model([_example()])
    loss.backward()
    optimizer.step()
    full, ref = sharding.full_optimizer_state(model, optimizer), optimizer.state_dict()
    assert full["param_groups"] == ref["param_groups"]
    assert full["state"].keys() == ref["state"].keys()
    for i in ref["state"]:
        for k in ref["state"][i]:
            assert torch.equal(full["state"][i][k], ref["state"][i][k]), (i, k)


def _example():
    from kava.data import Example

    return Example(question="Tom has 5 apples and buys 3 more. How many apples does he have?",
                   steps=["<<5+3=8>>", "<<8*2=16>>"], answer="16")


def test_accelerate_fsdp_plugin_is_refused(tiny_llama_dir, tmp_path, monkeypatch):
    """accelerate launch --use_fsdp (its plugin needs a GPU, so here a stand-in Accelerator) is a ConfigError
    that says to use train.fsdp: the plugin's checkpoints and validation were rank 0's shard."""
    import kava.train as train
    from accelerate.utils import DistributedType

    monkeypatch.setattr(train, "make_accelerator", lambda cfg: SimpleNamespace(distributed_type=DistributedType.FSDP))
    with pytest.raises(ConfigError, match="--use_fsdp.*train.fsdp=true"):
        run_training(tiny_config(tiny_llama_dir), tmp_path / "run")


def test_fsdp_config_round_trips_and_refuses_fp16(tiny_llama_dir, tmp_path):
    cfg = tiny_config(tiny_llama_dir, **{"train.fsdp": True})
    cfg.to_yaml(tmp_path / "c.yaml")
    assert KavaConfig.from_yaml(tmp_path / "c.yaml").train.fsdp is True
    assert cfg.resolved().train.fsdp is True
    assert KavaConfig().train.fsdp is False
    with pytest.raises(ConfigError, match="train.fsdp"):
        tiny_config(tiny_llama_dir, **{"train.fsdp": True, "train.mixed_precision": "fp16"})
