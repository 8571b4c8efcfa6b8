"""Training loop: every method runs, exact resume, SIGKILL / SIGTERM, non-finite steps, data checks."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO, tiny_config
from kava.checkpoint import MARKER, verify_checkpoint
from kava.config import ConfigError, KavaConfig
from kava.data.formats import DataError
from kava.train import (
    TrainingAborted,
    build_optimizer,
    build_scheduler,
    global_batch,
    is_decay_exempt,
    main,
    my_micro_batches,
    preset_path,
    run_training,
    sort_for_micro_batches,
)

NAMES = ["Tom", "Sara", "Ben", "Ann"]


def example_row(i: int) -> dict:
    a, b = 2 + i % 7, 1 + i % 5
    return {
        "question": f"{NAMES[i % 4]} has {a} apples and buys {b} more. How many apples does he have?",
        "steps": [f"<<{a}+{b}={a + b}>>", f"<<{a + b}*2={2 * (a + b)}>>", f"<<{2 * (a + b)}-1={2 * (a + b) - 1}>>"],
        "answer": str(2 * (a + b) - 1),
    }


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    return {
        "train": write_rows(d / "train.jsonl", [example_row(i) for i in range(12)]),
        "eval": write_rows(d / "eval.jsonl", [example_row(100 + i) for i in range(3)]),
    }


def make_cfg(model_dir: Path, data: dict, **overrides) -> KavaConfig:
    base = {
        "data.train_path": str(data["train"]),
        "train.max_steps": 4,
        "train.save_every": 0,
        "train.log_every": 1,
        "train.warmup_ratio": 0.0,
        "train.lr": 1e-2,
        "lora.dropout": 0.1,
        "eviction.method": "random",  # the random-eviction generator must be restored too
    }
    base.update(overrides)
    return tiny_config(model_dir, **base)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "loss" in r]


def trainable(ckpt: Path) -> dict[str, torch.Tensor]:
    """Trainable weights as the public loader (KavaModel.load) sees them: adapter, new-token rows, projection."""
    from kava.model import KavaModel

    m = KavaModel.load(ckpt, is_trainable=True)
    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"differ: {diff[:5]}"


@pytest.fixture(scope="module")
def straight(tiny_llama_dir, data, tmp_path_factory) -> dict:
    """The reference: 4 steps in one go (dropout 0.1, random eviction)."""
    out = tmp_path_factory.mktemp("straight")
    cfg = make_cfg(tiny_llama_dir, data)
    final = run_training(cfg, out)
    return {"cfg": cfg, "out": out, "final": final, "weights": trainable(final)}


# ----------------------------------------------------------------------------
# every method
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["kava", "pccot", "codi", "cot", "nocot"])
def test_each_method_trains_logs_and_checkpoints(method, tiny_llama_dir, data, tmp_path):
    cfg = make_cfg(tiny_llama_dir, data, method=method, **{
        "train.max_steps": 2, "eviction.method": "rkv", "data.eval_path": str(data["eval"]),
        "data.eval_max_examples": 2, "eval.max_answer_tokens": 3, "eval.max_cot_tokens": 6,
    })
    final = run_training(cfg, tmp_path)
    steps = step_records(tmp_path)
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and not r["skipped"]
        assert {"lr", "bad_steps", "examples_per_s"} <= r.keys()
    if method in ("kava", "pccot", "codi"):
        assert {"ce_student", "ce_teacher", "codi"} <= steps[0].keys()
    if method == "kava":
        assert steps[0]["kv"] > 0
    if method == "cot":
        assert not steps[0].get("ce_student") and steps[0]["ce_teacher"] > 0
    if method == "nocot":
        assert not steps[0].get("ce_teacher") and steps[0]["ce_student"] > 0
    val = [r for r in records(tmp_path) if "val_accuracy" in r]
    assert len(val) == 1 and val[0]["val_examples"] == 2 and math.isfinite(val[0]["val_loss"])
    assert verify_checkpoint(final) is None and final.name == "step-000002"
    saved = KavaConfig.from_yaml(tmp_path / "config.yaml")
    assert saved.method == method and saved == cfg.resolved()


def test_curriculum_first_steps_train_the_teacher_only(tiny_llama_dir, data, tmp_path):
    cfg = make_cfg(tiny_llama_dir, data, **{"train.max_steps": 2, "train.curriculum_cot_steps": 1,
                                            "train.tensorboard": True})
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.warns(RuntimeWarning, match="tensorboard is not installed"):
            run_training(cfg, tmp_path)
    else:
        run_training(cfg, tmp_path)
        assert any((tmp_path / "tensorboard").iterdir())
    first, second = step_records(tmp_path)
    assert not first.get("ce_student") and not first.get("kv") and first["ce_teacher"] > 0
    assert second["ce_student"] > 0 and second["kv"] > 0


# ----------------------------------------------------------------------------
# exact resume
# ----------------------------------------------------------------------------
def test_exact_resume_is_bit_identical(straight, tmp_path):
    cfg = straight["cfg"]
    mid = run_training(cfg, tmp_path, stop_after_steps=2)
    assert mid.name == "step-000002"
    final = run_training(cfg, tmp_path, resume=tmp_path)
    assert final.name == "step-000004"
    assert_identical(trainable(final), straight["weights"])
    # The log continues: one record per step, the same losses as the straight run.
    ours, ref = step_records(tmp_path), step_records(straight["out"])
    assert [r["step"] for r in ours] == [1, 2, 3, 4]
    assert [r["loss"] for r in ours] == [r["loss"] for r in ref]


def test_branch_off_a_warm_start_equals_training_the_variant_from_scratch(tiny_llama_dir, data, tmp_path):
    """--init-from: a variant branched off the shared teacher-only steps == the variant trained from step 0."""
    common = {"train.curriculum_cot_steps": 2, "eviction.method": "rkv"}
    base = make_cfg(tiny_llama_dir, data, **common)
    variant = make_cfg(tiny_llama_dir, data, **common, **{"latent.num_tokens": 2, "loss.kv_supervision": "all"})
    scratch = run_training(variant, tmp_path / "scratch")
    warm = run_training(base, tmp_path / "base", stop_after_steps=2)
    branched = run_training(variant, tmp_path / "branch", init_from=warm)
    assert branched.name == "step-000004"
    assert_identical(trainable(branched), trainable(scratch))
    ours, ref = step_records(tmp_path / "branch"), step_records(tmp_path / "scratch")
    assert [r["step"] for r in ours] == [3, 4]
    assert [r["loss"] for r in ours] == [r["loss"] for r in ref[2:]]
    assert json.loads((tmp_path / "branch" / "init_from.json").read_text())["step"] == 2
    # The branch keeps its own config; a change of parameter set is refused.
    assert KavaConfig.from_yaml(tmp_path / "branch" / "config.yaml").latent.num_tokens == 2
    with pytest.raises(ConfigError, match="latent.use_projection"):
        run_training(variant.override(["latent.use_projection=false"]), tmp_path / "bad", init_from=warm)


def test_branch_trains_at_its_own_optimizer_hyperparameters(tiny_llama_dir, data, tmp_path):
    """--init-from keeps the optimizer's moments and the schedule position, but lr, betas, weight decay
    and the schedule are the branch's config, not the checkpoint's saved param groups / base_lrs."""
    common = {"train.curriculum_cot_steps": 2}
    # The warm start has T = 0 (prj frozen, but still in the optimizer), the branch T = 2: same parameter groups.
    base = make_cfg(tiny_llama_dir, data, **common, **{"latent.num_iterations": 0})
    warm = run_training(base, tmp_path / "base", stop_after_steps=2)
    variant = make_cfg(tiny_llama_dir, data, **common, **{
        "train.lr": 3e-3, "train.betas": [0.8, 0.99], "train.weight_decay": 0.05, "train.warmup_ratio": 0.5})
    final = run_training(variant, tmp_path / "branch", init_from=warm)
    # warm-up ceil(0.5 * 4) = 2 steps, then cosine over 2: steps 3 and 4 run at lr * 1 and lr * 0.5.
    assert [(r["step"], r["lr"]) for r in step_records(tmp_path / "branch")] == [(3, 3e-3), (4, pytest.approx(1.5e-3))]
    groups = json.loads((final / "optimizer.json").read_text())["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(g["betas"] == {"__tuple__": [0.8, 0.99]} and g["initial_lr"] == 3e-3 for g in groups)
    assert json.loads((final / "scheduler.json").read_text())["base_lrs"] == [3e-3, 3e-3]
    # ... and the updates used them: at lr 1e-12 the branch stays at the warm start (the saved lr, 1e-2, moves it).
    still = trainable(run_training(variant.override(["train.lr=1e-12"]), tmp_path / "still", init_from=warm))
    start = trainable(warm)
    for k in start:
        torch.testing.assert_close(still[k], start[k], rtol=0, atol=1e-9, msg=k)


def test_length_grouped_run_resumes_bit_identically_and_trains_on_grouped_batches(tiny_llama_dir, data, tmp_path,
                                                                                    monkeypatch):
    import kava.train as kt

    cfg = make_cfg(tiny_llama_dir, data, **{"train.group_by_length": True, "train.global_batch_size": 2,
                                            "train.micro_batch_size": 1})
    seen = []
    real = kt.global_batch
    monkeypatch.setattr(kt, "global_batch", lambda *a: seen.append(a[-1]) or real(*a))
    straight = run_training(cfg, tmp_path / "straight")
    lengths = seen[0]
    assert len(seen) == 4 and lengths is not None and all(s is lengths for s in seen)
    from kava.data.formats import load_examples
    assert len(lengths) == len(load_examples(str(data["train"])).examples) and min(lengths) > 0
    run_training(cfg, tmp_path / "resumed", stop_after_steps=2)
    final = run_training(cfg, tmp_path / "resumed", resume=tmp_path / "resumed")
    assert_identical(trainable(final), trainable(straight))


def test_resume_refuses_changed_data_order(straight, tmp_path):
    shutil.copytree(straight["out"] / "checkpoints", tmp_path / "checkpoints")
    cfg = straight["cfg"].override(["train.seed=1"])
    with pytest.raises(ConfigError, match="train.seed"):
        run_training(cfg, tmp_path, resume=tmp_path)


def test_fresh_run_refuses_a_dir_with_checkpoints(straight):
    with pytest.raises(ConfigError, match="--resume"):
        run_training(straight["cfg"], straight["out"])


# ----------------------------------------------------------------------------
# SIGKILL and SIGTERM (real subprocesses)
# ----------------------------------------------------------------------------
DRIVER = """
import sys, time, torch
torch.set_num_threads({threads})
import kava.train as t
save, step = t.save_checkpoint, t.train_step
def slow_save(*a, **k):
    out = save(*a, **k)
    time.sleep({save_sleep})
    return out
def slow_step(*a, **k):
    time.sleep({step_sleep})
    return step(*a, **k)
t.save_checkpoint, t.train_step = slow_save, slow_step
sys.exit(t.main(sys.argv[1:]))
"""


def launch(cfg: KavaConfig, out: Path, tmp: Path, save_sleep=0.0, step_sleep=0.0) -> subprocess.Popen:
    cfg_file = tmp / "run.yaml"
    cfg.to_yaml(cfg_file)
    driver = tmp / "driver.py"
    driver.write_text(DRIVER.format(threads=torch.get_num_threads(), save_sleep=save_sleep, step_sleep=step_sleep))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, str(driver), "--config", str(cfg_file), "--output", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(pred, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training exited early ({proc.returncode}):\n{out}\n{err[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("timed out waiting for the training subprocess")


def test_sigkill_then_resume_uses_last_complete_checkpoint(straight, tmp_path, caplog):
    out = tmp_path / "run"
    cfg = straight["cfg"].override(["train.save_every=1", "train.keep_last=5"])
    proc = launch(cfg, out, tmp_path, save_sleep=2.0)
    ckpts = out / "checkpoints"
    wait_for(lambda: (ckpts / "step-000002" / MARKER).exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    # A half-written newer checkpoint (no COMPLETE marker) must be ignored, with a warning naming it.
    half = ckpts / "step-000003"
    shutil.copytree(ckpts / "step-000002", half)
    (half / MARKER).unlink()
    with caplog.at_level(logging.WARNING):
        final = run_training(cfg, out, resume=out)
    assert any("incomplete checkpoint" in r.getMessage() and "step-000003" in r.getMessage() for r in caplog.records)
    assert final.name == "step-000004"
    assert_identical(trainable(final), straight["weights"])
    assert [r["step"] for r in step_records(out)] == [1, 2, 3, 4]


def test_sigterm_saves_a_checkpoint_and_exits_zero(straight, tmp_path):
    out = tmp_path / "run"
    cfg = straight["cfg"]  # save_every=0: the only checkpoint is the one SIGTERM causes
    proc = launch(cfg, out, tmp_path, step_sleep=1.0)
    wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip(), proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    line = [ln for ln in stdout.splitlines() if ln.startswith("interrupted: checkpoint saved to ")]
    assert line, stdout
    saved = Path(line[0].split(" to ", 1)[1])
    assert saved.parent == out / "checkpoints" and verify_checkpoint(saved) is None
    assert json.loads((saved / "train_state.json").read_text())["step"] < 4
    # ... and that checkpoint continues to the same weights as the uninterrupted run.
    final = run_training(cfg, out, resume=saved)
    assert_identical(trainable(final), straight["weights"])


# ----------------------------------------------------------------------------
# numerical faults
# ----------------------------------------------------------------------------
def nan_on_calls(monkeypatch, bad_calls):
    from kava.model import KavaModel

    original = KavaModel.training_loss
    calls = {"n": 0}

    def patched(self, *a, **k):
        calls["n"] += 1
        loss, metrics = original(self, *a, **k)
        if bad_calls is None or calls["n"] in bad_calls:
            return loss * float("nan"), metrics
        return loss, metrics

    monkeypatch.setattr(KavaModel, "training_loss", patched)


@pytest.mark.parametrize("guard", ["host", "device"])
def test_nonfinite_loss_skips_the_update_and_counts(guard, tiny_llama_dir, data, tmp_path, monkeypatch):
    # 2 micro-batches per step: call 3 is the first micro-batch of step 2.
    nan_on_calls(monkeypatch, {3})
    cfg = make_cfg(tiny_llama_dir, data, **{"train.save_every": 1, "train.keep_last": 5,
                                            "train.nonfinite_guard": guard})
    with pytest.warns(RuntimeWarning, match="non-finite"):
        final = run_training(cfg, tmp_path)
    steps = step_records(tmp_path)
    assert [r["skipped"] for r in steps] == [False, True, False, False]
    assert steps[1]["bad_steps"] == 1 and steps[2]["bad_steps"] == 0 and steps[-1]["bad_steps_total"] == 1
    ck = tmp_path / "checkpoints"
    assert_identical(trainable(ck / "step-000001"), trainable(ck / "step-000002"))  # no update at step 2
    assert all(torch.isfinite(w).all() for w in trainable(final).values())
    assert json.loads((final / "train_state.json").read_text())["bad_steps_total"] == 1


@pytest.mark.parametrize("guard", ["host", "device"])
def test_abort_after_max_bad_steps_in_a_row(guard, tiny_llama_dir, data, tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, None)
    cfg = make_cfg(tiny_llama_dir, data, **{"train.max_bad_steps": 2, "train.nonfinite_guard": guard})
    with pytest.warns(RuntimeWarning), pytest.raises(TrainingAborted, match="2 consecutive steps .*max_bad_steps=2"):
        run_training(cfg, tmp_path)
    assert len(step_records(tmp_path)) == 2


# ----------------------------------------------------------------------------
# the non-finite guard on the device (train.nonfinite_guard=device)
# ----------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(bad=st.lists(st.booleans(), min_size=1, max_size=6), decay=st.sampled_from([0.0, 0.1]))
def test_step_unless_is_exactly_no_step_where_the_flag_is_set(bad, decay):
    """Fused AdamW stepped through ``step_unless`` on a sequence of good and bad steps ends bit-identical to the
    same optimizer stepped on the good steps only: weights, both moments and the step count (bad steps carry
    NaN gradients, as they would)."""
    from kava.train import step_unless

    def run(skip_on_device: bool):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=decay, fused=True)
        good = 0
        for is_bad in bad:
            if is_bad and not skip_on_device:
                continue
            g = torch.Generator().manual_seed(good)
            for p in params:
                p.grad = torch.full_like(p, float("nan")) if is_bad else torch.randn(p.shape, generator=g)
            step_unless(opt, torch.tensor(is_bad))
            opt.zero_grad(set_to_none=True)
            good += not is_bad
        return params, opt

    (pa, oa), (pb, ob) = run(True), run(False)
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    for a, b in zip(pa, pb):
        sa, sb = oa.state.get(a, {}), ob.state.get(b, {})
        if not sb:  # only bad steps: the reference never stepped; the guarded one holds zero moments, step 0
            assert not sa or (float(sa["step"]) == 0 and not sa["exp_avg"].any() and not sa["exp_avg_sq"].any())
            continue
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sb)


@pytest.mark.parametrize("device, fp16, fsdp, guard, expected", [
    ("cuda", False, False, "auto", True),  # the GPU default: no host read per step
    ("cpu", False, False, "auto", False),  # CPU keeps plain AdamW and its numbers
    ("cuda", True, False, "auto", False),  # fp16: the loss scaler skips steps itself
    ("cuda", False, True, "auto", False),  # FSDP2: untested with fused AdamW
    ("cpu", False, False, "device", True),
    ("cuda", False, False, "host", False),
])
def test_auto_guard_is_on_the_device_for_cuda_only(device, fp16, fsdp, guard, expected):
    from types import SimpleNamespace

    from kava.train import guard_on_device

    cfg = KavaConfig().override([f"train.nonfinite_guard={guard}", f"train.fsdp={str(fsdp).lower()}"])
    acc = SimpleNamespace(device=torch.device(device), scaler=object() if fp16 else None)
    assert guard_on_device(cfg, acc) is expected


def test_step_unless_refuses_an_unfused_optimizer():
    from kava.train import step_unless

    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(RuntimeError, match="fused"):
        step_unless(torch.optim.AdamW([p]), torch.tensor(False))


def test_device_guard_counts_bad_steps_off_logging_steps_and_matches_the_host_guard(tiny_llama_dir, data, tmp_path,
                                                                                       monkeypatch):
    """A bad step between logging steps is skipped on the device, counted and warned about at the next read; the
    run ends where the host-guarded run ends (fused vs plain AdamW: the same update, other rounding)."""
    cfg = {"train.log_every": 3, "train.max_steps": 4}
    nan_on_calls(monkeypatch, {3})  # step 2, off the logging steps (1, 3, 4)
    with pytest.warns(RuntimeWarning, match="1 optimizer step.*skipped since the last read.*non-finite"):
        dev = run_training(make_cfg(tiny_llama_dir, data, **cfg, **{"train.nonfinite_guard": "device"}),
                           tmp_path / "device")
    nan_on_calls(monkeypatch, {3})
    with pytest.warns(RuntimeWarning, match="non-finite"):
        host = run_training(make_cfg(tiny_llama_dir, data, **cfg, **{"train.nonfinite_guard": "host"}),
                            tmp_path / "host")
    rows = step_records(tmp_path / "device")
    assert [r["step"] for r in rows] == [1, 3, 4]
    assert [(r["bad_steps"], r["bad_steps_total"]) for r in rows] == [(0, 0), (0, 1), (0, 1)]
    assert json.loads((dev / "train_state.json").read_text())["bad_steps_total"] == 1
    assert [r["step"] for r in step_records(tmp_path / "host")] == [1, 2, 3, 4]  # the host guard logs the bad step
    a, b = trainable(dev), trainable(host)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_device_guard_resume_is_bit_identical(tiny_llama_dir, data, tmp_path):
    """Fused AdamW keeps its step counts as tensors: stopping and resuming under the device guard still gives the
    straight run's weights bit for bit."""
    cfg = make_cfg(tiny_llama_dir, data, **{"train.nonfinite_guard": "device"})
    straight = run_training(cfg, tmp_path / "straight")
    run_training(cfg, tmp_path / "resumed", stop_after_steps=2)
    final = run_training(cfg, tmp_path / "resumed", resume=tmp_path / "resumed")
    assert_identical(trainable(final), trainable(straight))


# ----------------------------------------------------------------------------
# host syncs in a training step
# ----------------------------------------------------------------------------
class HostReads:
    """Counts the ops of a training step that read device data on the host: on a GPU each waits for the queue.

    On the CPU nothing syncs, so the ops are counted instead: ``_local_scalar_dense`` (item, float, bool, int),
    ``nonzero`` / ``masked_select`` / boolean indexing (data-dependent shapes) and ``Tensor.tolist`` (no dispatch
    on the CPU). Not counted: torch's AdamW reads its step counters, which it keeps on the CPU (no device sync),
    and transformers' causal-mask builder, which reads whether the padding mask is all ones (docs/perf.md
    section 8). Host-to-device copies cannot be seen on the CPU.
    """

    EXEMPT = ("/torch/optim/", "/transformers/masking_utils.py")

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten
        reads = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}
        masked = {aten.index, aten.index_put, aten.index_put_}
        self.events: list[str] = []
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                hit = func in reads or (func.overloadpacket in masked and any(
                    isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]))
                if hit:
                    outer.note(str(func))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def note(self, what: str) -> None:
        import traceback

        stack = traceback.extract_stack()
        if not any(x in f.filename for f in stack for x in self.EXEMPT):
            self.events.append(f"{what} at {' < '.join(f'{Path(f.filename).name}:{f.lineno}' for f in stack[-8:-2])}")


@pytest.mark.parametrize("guard", ["host", "device"])
def test_a_training_step_reads_the_device_once(guard, tiny_llama_dir, data, tmp_path, monkeypatch):
    """Off a logging step the only host read is the non-finite guard's flag, and none with the guard on the
    device; at a logging step it is the one read of the loss, gradient norm and metrics (the host guard uses it;
    the device guard's counters come with it). The CE, the metrics, the loss shares and the guard make no
    other. The counted window starts after the batches are collated and counted on the host."""
    import kava.train as kt

    reads = {}  # step -> HostReads
    real_shares, real_step, real_tolist = kt.micro_batch_shares, kt.train_step, torch.Tensor.tolist
    current = {"step": None}

    def shares(*a, **k):
        out = real_shares(*a, **k)
        current["step"] = current.pop("pending")
        reads[current["step"]].mode.__enter__()
        return out

    def step(run, s):
        reads[s], current["pending"] = HostReads(), s
        try:
            return real_step(run, s)
        finally:
            reads[s].mode.__exit__(None, None, None)
            current["step"] = None

    def tolist(self):
        if current.get("step") is not None:
            reads[current["step"]].note("tolist")
        return real_tolist(self)

    monkeypatch.setattr(kt, "micro_batch_shares", shares)
    monkeypatch.setattr(kt, "train_step", step)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    # 2 micro-batches per step, random eviction, every KaVa term; step 2 (index 1) is off the logging steps.
    cfg = make_cfg(tiny_llama_dir, data, **{"train.max_steps": 3, "train.log_every": 3,
                                            "train.nonfinite_guard": guard})
    run_training(cfg, tmp_path)
    assert sorted(reads) == [0, 1, 2]
    if guard == "host":
        assert len(reads[1].events) == 1 and "_local_scalar_dense" in reads[1].events[0], reads[1].events
        assert "train.py" in reads[1].events[0]
    else:
        assert reads[1].events == []
    for s in (0, 2):  # logging steps
        assert len(reads[s].events) == 1 and reads[s].events[0].startswith("tolist"), reads[s].events
    assert [r["step"] for r in step_records(tmp_path)] == [1, 3]


# ----------------------------------------------------------------------------
# data checks
# ----------------------------------------------------------------------------
def test_data_report_counts_are_saved(tiny_llama_dir, data, tmp_path):
    rows = [example_row(i) for i in range(6)]
    rows.append({**example_row(7), "answer": "many"})  # non-numeric answer
    rows.append({**example_row(8), "question": "How many? " * 80})  # too long
    rows.append("{not json")  # malformed row, skipped with skip_bad_rows
    train = write_rows(tmp_path / "train.jsonl", rows)
    cfg = make_cfg(tiny_llama_dir, data, **{"data.train_path": str(train), "data.skip_bad_rows": True,
                                            "train.max_steps": 1})
    run_training(cfg, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    tr = report["train"]
    assert sum(tr["skipped"].values()) == 1 and tr["rows_loaded"] == 8
    assert tr["filters"]["non_numeric_answer"] == 1 and tr["filters"]["too_long"] == 1 and tr["filters"]["kept"] == 6
    assert report["eval"] is None
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000001" / "train_state.json").read_text())
    assert state["data_counts"] == tr["filters"] and state["n_train"] == 6


def test_crop_budget_larger_than_cot_is_a_config_error(tiny_llama_dir, data, tmp_path):
    cfg = make_cfg(tiny_llama_dir, data, **{"eviction.method": "crop", "latent.num_tokens": 40})
    with pytest.raises(ConfigError, match="latent.num_tokens=40"):
        run_training(cfg, tmp_path)


def _batch_fields(batch) -> dict:
    from dataclasses import fields

    return {} if batch is None else {f.name: getattr(batch, f.name) for f in fields(batch)}


def test_batches_from_segments_tokenised_once_equal_tokenising_each_step(tiny_dir, tmp_path):
    """Training collates from the Segments its data preparation tokenised (SegmentCache -> SegmentStore): the
    batches are bit-identical to tokenising the examples at every step, for both tokenizer conventions."""
    from kava.data.collate import SegmentCache, batches_from_segments, make_batches
    from kava.model import KavaModel
    from kava.train import prepare_data

    rows = [example_row(i) for i in range(10)]
    rows.append({**example_row(3), "steps": ["Tom has 5 apples.", "He buys 3 more, so 8."]})  # NL steps
    rows.append({**example_row(4), "steps": ["<<2+2=4>>"]})  # one step: Drop Last keeps it
    rows.append(example_row(0))  # a duplicate
    path = write_rows(tmp_path / "train.jsonl", rows)
    cfg = tiny_config(tiny_dir, **{"data.train_path": str(path)})
    encoder = KavaModel.from_config(cfg).encoder
    cache = SegmentCache(encoder)
    train, _, _ = prepare_data(cfg, cache)
    # the length filter tokenised every example (the store reuses that); a fresh cache tokenises in store()
    for store in (cache.store(train), SegmentCache(encoder).store(train)):
        assert len(store) == len(train) == 13
        assert [store[i] for i in range(len(train))] == [encoder.segments(ex) for ex in train]
        for method in ("kava", "cot", "nocot"):
            c = cfg.override([f"method={method}", "loss.student_ce_on_prompt=true"])
            for idx in ([0, 1, 2, 3], [12, 10, 11, 0], [5]):
                for teacher_only in (False, True):
                    got = batches_from_segments([store[i] for i in idx], encoder.pad, c, teacher_only)
                    want = make_batches([train[i] for i in idx], encoder, c, teacher_only)
                    for g, w in zip(got, want):
                        assert (g is None) == (w is None)
                        gf, wf = _batch_fields(g), _batch_fields(w)
                        assert gf.keys() == wf.keys()
                        for k in gf:
                            if isinstance(gf[k], torch.Tensor):
                                assert gf[k].dtype == wf[k].dtype and torch.equal(gf[k], wf[k]), (method, idx, k)
                            else:
                                assert gf[k] == wf[k]


def test_a_run_tokenises_each_training_example_once(tiny_llama_dir, data, tmp_path, monkeypatch):
    """Each training example is tokenised once, when the data are prepared, whatever the number of steps."""
    from kava.data.collate import SegmentEncoder

    calls = []
    real = SegmentEncoder.segments

    def counted(self, ex):
        calls.append(ex.question)
        return real(self, ex)

    monkeypatch.setattr(SegmentEncoder, "segments", counted)
    for steps in (1, 4):
        calls.clear()
        run_training(make_cfg(tiny_llama_dir, data, **{"train.max_steps": steps}), tmp_path / f"run{steps}")
        assert len(calls) == len(set(calls)) == 12, (steps, len(calls))


def test_each_source_is_loaded_on_the_main_process_first(tiny_llama_dir, data, monkeypatch):
    """Rank 0 loads (downloads) each source before the other ranks, which then read the datasets cache."""
    import contextlib

    import kava.train as t

    events = []

    class Acc:
        is_main_process = True

        @contextlib.contextmanager
        def main_process_first(self):
            events.append("enter")
            yield
            events.append("exit")

    real = t._load
    monkeypatch.setattr(t, "_load", lambda *a, **k: (events.append("load"), real(*a, **k))[1])
    cfg = make_cfg(tiny_llama_dir, data, **{"data.eval_path": str(data["eval"])})
    class Enc:
        def segments(self, ex):
            return type("S", (), {"teacher_len": 10})()

    train, evals, _ = t.prepare_data(cfg, Enc(), Acc())
    assert events == ["enter", "load", "exit"] * 2 and len(train) == 12 and len(evals) == 3


def test_nothing_left_after_filtering_is_a_data_error(tiny_llama_dir, data, tmp_path):
    cfg = make_cfg(tiny_llama_dir, data, **{"data.max_tokens": 8})
    with pytest.raises(DataError, match="no train examples left"):
        run_training(cfg, tmp_path)


def test_main_maps_config_errors_to_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("latent: {num_tokens: 0}\n")
    assert main(["--config", str(bad), "--output", str(tmp_path / "out")]) == 2
    assert "latent.num_tokens" in capsys.readouterr().err
    assert main(["--preset", "no-such-preset", "--output", str(tmp_path / "out")]) == 2
    assert main(["--config", str(tmp_path / "missing.yaml"), "--output", str(tmp_path / "out")]) == 2


def test_preset_path_lists_presets_when_unknown():
    assert preset_path("smollm2-gsm8k").is_file()
    with pytest.raises(ConfigError, match="available: .*smollm2-gsm8k"):
        preset_path("gpt-17")


# ----------------------------------------------------------------------------
# data order and schedule (pure functions)
# ----------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 40), micro=st.integers(1, 4), k=st.integers(1, 4), world=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 5), step=st.integers(0, 30), grouped=st.booleans(), data=st.data())
def test_data_order_is_deterministic_and_independent_of_process_count(n, micro, k, world, seed, step, grouped, data):
    g = micro * k * world
    spe = math.ceil(n / g)
    lengths = tuple(data.draw(st.lists(st.integers(1, 9), min_size=n, max_size=n))) if grouped else None

    def batch_at(s: int) -> list[int]:
        return global_batch(n, s, spe, g, seed, lengths)

    batch = batch_at(step)
    assert batch == batch_at(step) and len(batch) == g
    # the processes' micro-batches partition the global batch, whatever the process count
    parts = [mb for r in range(world) for mb in my_micro_batches(batch, micro, r, world)]
    assert sorted(j for j, _ in parts) == list(range(g // micro))
    assert sorted(i for _, mb in parts for i in mb) == sorted(batch)
    assert len({len(my_micro_batches(batch, micro, r, world)) for r in range(world)}) == 1
    # one epoch sees every example
    epoch = step // spe
    seen = {i for b in range(spe) for i in batch_at(epoch * spe + b)}
    assert seen == set(range(n))


@settings(max_examples=40, deadline=None)
@given(g=st.integers(1, 6), batches=st.integers(1, 120), seed=st.integers(0, 5), data=st.data())
def test_length_grouped_batches_cover_the_epoch_with_less_padding(g, batches, seed, data):
    """An epoch of length-grouped batches holds each example once (n a multiple of the batch), and pads no more
    than the shuffled epoch: within a megabatch (the same examples as the shuffled batches at its place) sorted
    chunks minimise the sum of the batch maxima."""
    n = g * batches
    lengths = tuple(data.draw(st.lists(st.integers(1, 50), min_size=n, max_size=n)))
    grouped = [global_batch(n, b, batches, g, seed, lengths) for b in range(batches)]
    shuffled = [global_batch(n, b, batches, g, seed) for b in range(batches)]
    assert sorted(i for b in grouped for i in b) == list(range(n))
    padded = [sum(max(lengths[i] for i in b) for b in bs) for bs in (grouped, shuffled)]
    assert padded[0] <= padded[1]


def test_length_grouped_batches_are_sorted_within_megabatches_and_visited_shuffled():
    from kava.train import LENGTH_GROUP_BATCHES

    g, batches = 4, 2 * LENGTH_GROUP_BATCHES
    n = g * batches
    lengths = tuple((7 * i) % 97 + 1 for i in range(n))
    grouped = [global_batch(n, b, batches, g, 0, lengths) for b in range(batches)]
    shuffled = [global_batch(n, b, batches, g, 0) for b in range(batches)]
    # a batch holds neighbours in length: far less padding than shuffled batches
    pad = [sum(g * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in bs) for bs in (grouped, shuffled)]
    assert pad[0] * 5 < pad[1]
    # each megabatch's examples are the shuffled order's examples at that place
    order = [i for b in sorted(grouped, key=lambda b: -max(lengths[i] for i in b)) for i in b]
    assert sorted(order) == list(range(n))
    # the batches are not visited longest-first within a megabatch (no sawtooth over the schedule)
    first = [max(lengths[i] for i in b) for b in grouped[:LENGTH_GROUP_BATCHES]]
    assert first != sorted(first, reverse=True)


@settings(max_examples=80, deadline=None)
@given(micro=st.integers(1, 4), k=st.integers(1, 4), world=st.sampled_from([1, 2, 3]), data=st.data())
def test_sorted_micro_batches_hold_the_batch_sorted_and_share_it_evenly(micro, k, world, data):
    """train.sort_micro_batches: the same examples; every micro-batch a run of the sorted batch (so it pads only
    to its own longest); every process as many micro-batches, and in each row of P micro-batches one each."""
    g = micro * k * world
    batch = data.draw(st.permutations(range(g)))
    lengths = tuple(data.draw(st.lists(st.integers(1, 30), min_size=g, max_size=g)))
    out = sort_for_micro_batches(batch, lengths, micro, world)
    assert sorted(out) == sorted(batch)
    micro_batches = [out[i:i + micro] for i in range(0, g, micro)]
    by_length = sorted(batch, key=lambda i: lengths[i])
    runs = [by_length[i:i + micro] for i in range(0, g, micro)]
    assert sorted(map(sorted, micro_batches)) == sorted(map(sorted, runs))
    for r in range(world):
        mine = my_micro_batches(out, micro, r, world)
        assert len(mine) == k
        # the r-th process takes one micro-batch of each row of P sorted runs
        assert sorted(runs.index(mb) // world for _, mb in mine) == list(range(k))
    if world == 1:
        assert [lengths[i] for i in out] == sorted(lengths)


def test_sorted_micro_batches_deal_the_rows_in_snake_order():
    lengths = tuple(range(8))  # example i has length i
    assert sort_for_micro_batches([5, 3, 7, 1, 0, 6, 2, 4], lengths, 2, 2) == [0, 1, 2, 3, 6, 7, 4, 5]
    # process 0 gets the shortest and the longest run, process 1 the two middle ones
    assert [mb for _, mb in my_micro_batches([0, 1, 2, 3, 6, 7, 4, 5], 2, 0, 2)] == [[0, 1], [6, 7]]


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = KavaConfig().override(["train.warmup_ratio=0.2", "train.min_lr_ratio=0.1", "train.lr=1.0"])
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_scheduler(cfg, opt, max_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    lrs.append(sched.get_last_lr()[0])
    assert lrs[0] == 0.0 and lrs[1] == 0.5 and lrs[2] == 1.0
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] == pytest.approx(0.1)


def test_student_weight_ramp():
    from kava.train import student_weight_at

    assert [student_weight_at(s, 3, 0) for s in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert [student_weight_at(s, 2, 4) for s in range(8)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [student_weight_at(s, 0, 2) for s in range(3)] == [0.5, 1.0, 1.0]


def test_student_weight_scales_only_the_student_terms(tiny_llama_dir):
    from conftest import perturb_trainables
    from kava.model import KavaModel
    from test_model import EXAMPLES, batches

    model = KavaModel.from_config(tiny_config(tiny_llama_dir, **{"loss.alpha_kv": 1.0}))
    perturb_trainables(model)
    model.eval()
    tb, sb = batches(model, EXAMPLES)
    with torch.no_grad():
        full, m = model.training_loss(tb, sb, torch.Generator().manual_seed(0))
        part, m2 = model.training_loss(tb, sb, torch.Generator().manual_seed(0), student_weight=0.25)
    student = m["ce_student"] + model.cfg.loss.alpha_codi * m["codi"] + model.cfg.loss.alpha_kv * m["kv"]
    teacher = model.cfg.loss.teacher_weight * m["ce_teacher"]
    assert float(full) == pytest.approx(student + teacher, rel=1e-5)
    assert float(part) == pytest.approx(0.25 * student + teacher, rel=1e-5)
    assert m2["ce_student"] == pytest.approx(m["ce_student"])  # metrics stay unscaled


# ----------------------------------------------------------------------------
# optimizer: weight-decay groups
# ----------------------------------------------------------------------------
def optimizer_groups(model, opt) -> tuple[dict[str, float], list[dict]]:
    """{parameter name: weight_decay of its group}, checking each trainable tensor is in exactly one group."""
    names = {id(p): n for n, p in model.named_parameters()}
    in_groups = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups)), "a parameter is in two groups"
    assert set(in_groups) == {n for n, p in model.named_parameters() if p.requires_grad}
    return {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}, opt.param_groups


def test_is_decay_exempt_rule():
    assert is_decay_exempt("lm.model.norm.weight", torch.zeros(8))
    assert is_decay_exempt("projection.net.0.bias", torch.zeros(8))
    assert is_decay_exempt("x.token_adapter.trainable_tokens_delta.default", torch.zeros(3, 8))
    assert not is_decay_exempt("lm.model.layers.0.mlp.up_proj.weight", torch.zeros(16, 8))
    assert not is_decay_exempt("q_proj.lora_A.default.weight", torch.zeros(4, 8))


def test_full_ft_decays_matrices_only(tiny_dir):
    from kava.model import KavaModel

    cfg = tiny_config(tiny_dir, **{"lora.enabled": False, "train.weight_decay": 0.05})
    assert cfg.train.weight_decay_scope == "matrices"  # the default
    model = KavaModel.from_config(cfg)
    opt = build_optimizer(cfg, model)
    wd, groups = optimizer_groups(model, opt)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]
    params = dict(model.named_parameters())
    norms = [n for n in wd if "norm" in n or n.startswith("projection.net.3.")]
    biases = [n for n in wd if n.endswith(".bias")]
    matrices = [n for n in wd if n.startswith("lm.") and params[n].dim() == 2]
    assert len(norms) >= 5 and biases and len(matrices) >= 14
    if model.config.model_type == "qwen2":  # Qwen2 has q/k/v biases in the backbone
        assert any(n.startswith("lm.") and "self_attn" in n for n in biases)
    assert all(wd[n] == 0.0 for n in norms + biases), [n for n in norms + biases if wd[n]]
    assert all(wd[n] == 0.05 for n in matrices), [n for n in matrices if wd[n] != 0.05]
    assert all(wd[n] == (0.0 if params[n].dim() < 2 else 0.05) for n in wd)
    assert wd["projection.net.0.weight"] == wd["projection.net.2.weight"] == 0.05
    # lr and betas reach every group
    assert all(g["lr"] == cfg.train.lr and g["betas"] == tuple(cfg.train.betas) for g in groups)


def test_lora_new_token_rows_are_not_decayed(tiny_llama_dir):
    from kava.model import KavaModel

    cfg = tiny_config(tiny_llama_dir)
    assert cfg.lora.enabled
    model = KavaModel.from_config(cfg)
    wd, _ = optimizer_groups(model, build_optimizer(cfg, model))
    tokens = [n for n in wd if "trainable_tokens" in n]
    lora = [n for n in wd if "lora_A" in n or "lora_B" in n]
    assert tokens and all(wd[n] == 0.0 for n in tokens)
    assert any(dict(model.named_parameters())[n].dim() == 2 for n in tokens)  # exempt by name, not by shape
    assert lora and all(wd[n] == cfg.train.weight_decay > 0 for n in lora)
    assert all(wd[n] == 0.0 for n in wd if n.endswith(".bias"))


@pytest.mark.parametrize("lora", [True, False])
def test_weight_decay_scope_all_is_one_group(tiny_llama_dir, lora):
    from kava.model import KavaModel

    cfg = tiny_config(tiny_llama_dir, **{"lora.enabled": lora, "train.weight_decay_scope": "all"})
    model = KavaModel.from_config(cfg)
    opt = build_optimizer(cfg, model)
    wd, groups = optimizer_groups(model, opt)
    assert len(groups) == 1 and groups[0]["weight_decay"] == cfg.train.weight_decay > 0
    assert set(wd.values()) == {cfg.train.weight_decay}


@pytest.mark.parametrize("lora", [True, False])
def test_zero_grad_adamw_step_decays_only_matrices(tiny_llama_dir, lora):
    """With zero gradients Adam's update is 0, so only the decoupled decay moves a tensor."""
    from conftest import perturb_trainables
    from kava.model import KavaModel

    cfg = tiny_config(tiny_llama_dir, **{"lora.enabled": lora, "train.lr": 0.1, "train.weight_decay": 0.5})
    model = KavaModel.from_config(cfg)
    perturb_trainables(model)  # LoRA B starts at zero: make every tensor visibly non-zero
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in named.items()}
    opt = build_optimizer(cfg, model)
    for p in named.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    exempt = [n for n, p in named.items() if is_decay_exempt(n, p)]
    decayed = [n for n in named if n not in exempt]
    assert exempt and decayed
    if lora:
        assert any("trainable_tokens" in n for n in exempt)
    else:
        assert any("norm" in n for n in exempt)
    for n in exempt:
        assert torch.equal(named[n], before[n]), n
    for n in decayed:  # AdamW: p <- p * (1 - lr * wd)
        torch.testing.assert_close(named[n].detach(), before[n] * (1 - 0.1 * 0.5), msg=n)


# ----------------------------------------------------------------------------
# mixed precision: the fp16 loss scaler, bf16 autocast
# ----------------------------------------------------------------------------
@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """Train through accelerate's fp16 code path on the CPU.

    accelerate refuses fp16 without a GPU, so the CPU Accelerator is given what ``mixed_precision="fp16"``
    gives it on a GPU: fp16 autocast around the model (``native_amp``) and a ``torch.amp.GradScaler`` (the
    class used on CUDA, here for the CPU), which accelerate uses in ``backward`` (scale), ``clip_grad_norm_``
    (unscale_) and ``AcceleratedOptimizer.step`` (scaler.step, scaler.update). The scale starts at 2**40,
    which overflows fp16 gradients at once; one back-off (factor 2**-30) brings it to 2**10.
    """
    from accelerate.state import AcceleratorState

    import kava.train as kt

    real = kt.make_accelerator

    def make(cfg):
        if AcceleratorState._shared_state:  # an earlier run of this test: back to what real() asks for
            AcceleratorState._shared_state["_mixed_precision"] = "no"
        acc = real(cfg)
        monkeypatch.setattr(acc.state, "_mixed_precision", "fp16")  # restored after the test
        acc.native_amp = True
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-30)
        return acc

    monkeypatch.setattr(kt, "make_accelerator", make)


def initial_trainables(cfg: KavaConfig) -> dict[str, torch.Tensor]:
    from kava.model import KavaModel

    return {n: p.detach().clone() for n, p in KavaModel.from_config(cfg).named_parameters() if p.requires_grad}


def test_fp16_overflow_is_skipped_by_the_scaler_which_backs_off(fp16_on_cpu, tiny_llama_dir, data, tmp_path):
    cfg = make_cfg(tiny_llama_dir, data, **{"train.max_steps": 3, "train.save_every": 1, "train.keep_last": 5})
    final = run_training(cfg, tmp_path)  # step 2 raised in unscale_ when step 1 did not reach the scaler
    steps = step_records(tmp_path)
    assert [r["skipped"] for r in steps] == [True, False, False]
    assert [r["overflow"] for r in steps] == [True, False, False]
    assert [r["loss_scale"] for r in steps] == [2.0**10] * 3  # backed off once, then steady
    assert all(math.isfinite(r["loss"]) for r in steps) and math.isfinite(steps[1]["grad_norm"])
    # An overflow is the scaler's business, not a bad step.
    assert steps[-1]["bad_steps_total"] == 0 and steps[-1]["overflow_steps_total"] == 1
    ck = tmp_path / "checkpoints"
    assert_identical(trainable(ck / "step-000001"), initial_trainables(cfg))  # no update at step 1
    assert not any(torch.equal(a, b) for a, b in zip(trainable(ck / "step-000002").values(),
                                                     trainable(ck / "step-000001").values()))
    assert json.loads((final / "scaler.json").read_text())["scale"] == 2.0**10
    assert json.loads((final / "train_state.json").read_text())["overflow_steps_total"] == 1


def test_fp16_resume_restores_the_loss_scale(fp16_on_cpu, tiny_llama_dir, data, tmp_path, caplog):
    from kava.checkpoint import seal

    cfg = make_cfg(tiny_llama_dir, data, **{"train.max_steps": 3})
    straight = run_training(cfg, tmp_path / "straight")
    mid = run_training(cfg, tmp_path / "split", stop_after_steps=1)
    final = run_training(cfg, tmp_path / "split", resume=mid)
    # With the scale saved at 2**10 the resumed step 2 does not overflow (a fresh 2**40 would).
    assert [r["skipped"] for r in step_records(tmp_path / "split")] == [True, False, False]
    assert_identical(trainable(final), trainable(straight))
    # A checkpoint without scaler.json (older kava, or saved without fp16) still loads; the scale starts afresh.
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "split" / "checkpoints", old / "checkpoints")
    (old / "checkpoints" / "step-000001" / "scaler.json").unlink()
    (old / "checkpoints" / "step-000001" / MARKER).unlink()
    seal(old / "checkpoints" / "step-000001", step=1)
    shutil.rmtree(old / "checkpoints" / "step-000003")
    with caplog.at_level(logging.WARNING):
        run_training(cfg, old, resume=old / "checkpoints" / "step-000001")
    assert any("no loss-scaler state" in r.getMessage() for r in caplog.records)
    assert [(r["step"], r["skipped"]) for r in step_records(old)] == [(2, True), (3, False)]


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process; let this test choose its own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_bf16_autocast_trains_on_cpu(fresh_accelerate_state, tiny_llama_dir, data, tmp_path, monkeypatch):
    from kava.model import KavaModel

    seen = []
    original = KavaModel.training_loss

    def spy(self, *a, **k):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return original(self, *a, **k)

    monkeypatch.setattr(KavaModel, "training_loss", spy)
    cfg = make_cfg(tiny_llama_dir, data, **{"train.max_steps": 2, "train.mixed_precision": "bf16"})
    final = run_training(cfg, tmp_path)
    assert seen and set(seen) == {torch.bfloat16}
    steps = step_records(tmp_path)
    assert [r["skipped"] for r in steps] == [False, False] and all(math.isfinite(r["loss"]) for r in steps)
    assert "loss_scale" not in steps[0] and not (final / "scaler.json").exists()
    after, before = trainable(final), initial_trainables(cfg)
    assert all(torch.isfinite(w).all() for w in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in before)


# ----------------------------------------------------------------------------
# gradient accumulation: the step's objective does not depend on micro_batch_size
# ----------------------------------------------------------------------------
def one_sgd_step_gradients(cfg: KavaConfig, out: Path) -> tuple[dict[str, torch.Tensor], float]:
    """The gradient of one training step (plain SGD at lr 1, no clipping: the update is minus the gradient)."""
    final = run_training(cfg, out)
    after, before = trainable(final), initial_trainables(cfg)
    return {k: before[k] - after[k] for k in before}, step_records(out)[0]["loss"]


@pytest.mark.parametrize("case", ["distinct", "duplicated"])
def test_gradient_accumulation_equals_the_full_batch(case, tiny_llama_dir, data, tmp_path, monkeypatch):
    """One micro-batch of 4 and two of 2 give the same loss and gradient.

    distinct: 4 examples of different lengths, and M above some CoT lengths, so the micro-batches hold
    different numbers of CE tokens and of valid KV slots; with the std normalisers off (alpha_codi = 0,
    no layer-wise KV std) the objectives are equal. duplicated: the batch [a, b, a, b], whose micro-batches
    [a, b] have the global batch's teacher std, with every default term (CODI, layer-wise KV std) on.
    """
    import kava.train as kt

    monkeypatch.setattr(kt, "build_optimizer", lambda cfg, model, fused=False: torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=1.0))
    common = {"train.max_steps": 1, "train.global_batch_size": 4, "train.grad_clip": 0.0, "lora.dropout": 0.0,
              "eviction.method": "rkv", "latent.num_tokens": 28}
    if case == "distinct":
        rows = [example_row(i) for i in (0, 1, 2, 10)]
        rows[1]["steps"] = rows[1]["steps"][:1]  # a short CoT: fewer valid KV slots than M
        rows[3]["question"] = "Yesterday, in the big shop at the corner, " + rows[3]["question"]
        common.update({"loss.alpha_codi": 0.0, "loss.kv_layerwise_std": False})
    else:
        rows = [example_row(0), {**example_row(5), "steps": example_row(5)["steps"][:1]}]
    train = write_rows(tmp_path / "train.jsonl", rows)
    cfgs = {m: make_cfg(tiny_llama_dir, data, **common, **{"data.train_path": str(train), "train.micro_batch_size": m})
            for m in (4, 2)}
    (g4, loss4), (g2, loss2) = (one_sgd_step_gradients(cfgs[m], tmp_path / f"micro{m}") for m in (4, 2))
    assert loss2 == pytest.approx(loss4, rel=1e-6, abs=1e-6)
    assert g4.keys() == g2.keys() and any(g.abs().max() > 1e-3 for g in g4.values())
    for k in g4:
        torch.testing.assert_close(g2[k], g4[k], rtol=1e-5, atol=1e-6, msg=k)


def test_sorted_micro_batches_give_the_full_batch_gradient_with_less_padding(tiny_llama_dir, data, tmp_path,
                                                                             monkeypatch):
    """train.sort_micro_batches with micro-batches of 2 gives the loss and gradient of one micro-batch of 4 (the
    std normalisers off, as in the distinct case above), and its micro-batches are the sorted batch's halves,
    which the unsorted order's are not."""
    import kava.train as kt

    monkeypatch.setattr(kt, "build_optimizer", lambda cfg, model, fused=False: torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=1.0))
    collated = []
    real = kt.batches_from_segments
    monkeypatch.setattr(kt, "batches_from_segments",
                        lambda segs, *a: collated.append([s.teacher_len for s in segs]) or real(segs, *a))
    rows = [example_row(i) for i in (0, 1, 2, 10)]
    rows[1]["steps"] = rows[1]["steps"][:1]
    rows[3]["question"] = "Yesterday, in the big shop at the corner, " + rows[3]["question"]
    train = write_rows(tmp_path / "train.jsonl", rows)
    common = {"train.max_steps": 1, "train.global_batch_size": 4, "train.grad_clip": 0.0, "lora.dropout": 0.0,
              "eviction.method": "rkv", "latent.num_tokens": 28, "loss.alpha_codi": 0.0,
              "loss.kv_layerwise_std": False, "data.train_path": str(train),
              "train.seed": 1}  # seed 1's batch order pairs a short example with a long one
    runs = {}
    for name, sets in (("full", {"train.micro_batch_size": 4}), ("plain", {"train.micro_batch_size": 2}),
                       ("sorted", {"train.micro_batch_size": 2, "train.sort_micro_batches": True})):
        collated.clear()
        runs[name] = one_sgd_step_gradients(make_cfg(tiny_llama_dir, data, **common, **sets), tmp_path / name)
        runs[name] += (list(collated),)
    (g4, loss4, full), (_, _, plain), (gs, loss_s, sorted_) = runs["full"], runs["plain"], runs["sorted"]
    lengths = sorted(full[0])
    assert len(set(lengths)) == 4
    assert sorted_ == [lengths[:2], lengths[2:]]
    assert plain != sorted_ and sorted(map(sorted, plain)) != [lengths[:2], lengths[2:]]  # the flag is what sorts
    padded = {k: sum(len(mb) * max(mb) for mb in v) for k, v in (("plain", plain), ("sorted", sorted_))}
    assert padded["sorted"] < padded["plain"]
    assert loss_s == pytest.approx(loss4, rel=1e-6, abs=1e-6)
    for k in g4:
        torch.testing.assert_close(gs[k], g4[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("method", ["kava", "pccot"])
def test_metric_only_work_runs_at_log_steps_and_does_not_change_training(method, tiny_llama_dir, data, tmp_path,
                                                                        monkeypatch):
    """log_every=3 skips the unsupervised iterations' KV losses (and PCCoT's KV terms) off logging steps: the
    trained weights are the same as logging every step, and every logged step has every metric."""
    import kava.losses

    calls = []
    real = kava.losses.kv_loss
    monkeypatch.setattr(kava.losses, "kv_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = {"method": method, "eviction.method": "rkv", "loss.kv_supervision": "last"}
    every = run_training(make_cfg(tiny_llama_dir, data, **common), tmp_path / "every")
    n_every, calls[:] = len(calls), []
    sparse = run_training(make_cfg(tiny_llama_dir, data, **common, **{"train.log_every": 3}), tmp_path / "sparse")
    assert 0 < len(calls) < n_every  # step 2 computes only the supervised KV loss (PCCoT: none)
    assert_identical(trainable(every), trainable(sparse))
    logged = {r["step"]: r for r in step_records(tmp_path / "sparse")}
    assert sorted(logged) == [1, 3, 4]
    full = {r["step"]: r for r in step_records(tmp_path / "every")}
    for step, r in logged.items():
        assert {k for k in r if k.startswith("kv")} == {k for k in full[step] if k.startswith("kv")}
        assert {"kv", "kv_loss_iter_0"} <= set(r)
        assert r["loss"] == full[step]["loss"] and r["kv"] == full[step]["kv"]
