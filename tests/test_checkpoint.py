"""Checkpoints: round trip, atomic writes, rotation, checksums, config refusal, no pickle."""
from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO, tiny_config
from kava.checkpoint import (
    MARKER,
    MUST_MATCH,
    CheckpointError,
    check_compatible,
    flatten_state,
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    unflatten_state,
    verify_checkpoint,
)
from kava.config import ConfigError
from kava.data import Example


EXAMPLES = [
    Example("Tom has 5 apples and buys 3 more. How many apples does he have?", ["<<5+3=8>>", "<<8*2=16>>"], "16"),
    Example("Sara reads 12 pages a day for 4 days. How many pages?", ["<<12*4=48>>"], "48"),
]


def build(model_dir: Path, **overrides):
    """A tiny KavaModel after one optimizer step (so the optimizer has state), with its optimizer and schedule."""
    from kava.model import KavaModel
    from kava.train import build_optimizer, build_scheduler, make_batches

    cfg = tiny_config(model_dir, **{"lora.dropout": 0.1, **overrides}).resolved()
    model = KavaModel.from_config(cfg)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, max_steps=10)
    teacher, student = make_batches(cfg, model.encoder, EXAMPLES, "cpu")
    loss, _ = model.training_loss(teacher, student)
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return model, opt, sched


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def flat_tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from flat_tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flat_tensors(v, f"{prefix}.{i}")


@pytest.fixture(scope="module")
def trained(tiny_llama_dir):
    return build(tiny_llama_dir)


@pytest.fixture
def run_dir(tmp_path, trained) -> Path:
    model, opt, sched = trained
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, opt, sched, {"epoch": 0}, keep_last=5)
    return tmp_path


def test_round_trip_restores_weights_optimizer_schedule_and_rng(tiny_llama_dir, trained, tmp_path):
    model, opt, sched = trained
    random.seed(7)
    torch.manual_seed(7)
    path = save_checkpoint(tmp_path, 3, model, opt, sched, {"epoch": 1, "position": 5}, keep_last=2)
    expected_draw = (torch.rand(3), random.random())
    assert path.name == "step-000003" and verify_checkpoint(path) is None

    fresh, fresh_opt, fresh_sched = build(tiny_llama_dir)  # different state: one more random step
    torch.manual_seed(123)
    state = load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    assert state["step"] == 3 and state["position"] == 5
    a, b = trainable(model), trainable(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    want, got = dict(flat_tensors(opt.state_dict())), dict(flat_tensors(fresh_opt.state_dict()))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert fresh_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert fresh_sched.state_dict() == sched.state_dict()
    draw = (torch.rand(3), random.random())
    assert torch.equal(draw[0], expected_draw[0]) and draw[1] == expected_draw[1]


def test_full_finetune_round_trip(tiny_llama_dir, tmp_path):
    model, opt, sched = build(tiny_llama_dir, **{"lora.enabled": False})
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {}, keep_last=1)
    fresh, fresh_opt, fresh_sched = build(tiny_llama_dir, **{"lora.enabled": False})
    load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    a, b = trainable(model), trainable(fresh)
    assert len(a) > 20 and all(torch.equal(a[k], b[k]) for k in a)


def test_failure_mid_write_leaves_nothing_that_is_picked_up(trained, run_dir, monkeypatch):
    model, opt, sched = trained

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("kava.checkpoint.rng_state", boom)  # fails after model + optimizer were written
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(run_dir, 3, model, opt, sched, {}, keep_last=5)
    ckpts = run_dir / "checkpoints"
    assert not (ckpts / "step-000003").exists()
    assert [p.name for p in ckpts.iterdir() if ".tmp-" in p.name]  # the partial write stays out of the way
    assert latest_checkpoint(run_dir).name == "step-000002"
    monkeypatch.undo()
    save_checkpoint(run_dir, 3, model, opt, sched, {}, keep_last=5)
    assert latest_checkpoint(run_dir).name == "step-000003"


def test_keep_last(trained, tmp_path):
    model, opt, sched = trained
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, opt, sched, {}, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004", "step-000005"]


def test_missing_marker_is_skipped_with_a_warning(run_dir, caplog):
    (run_dir / "checkpoints" / "step-000002" / MARKER).unlink()
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(run_dir).name == "step-000001"
    assert any("incomplete checkpoint" in r.getMessage() and "step-000002" in r.getMessage() for r in caplog.records)
    assert resolve_resume(run_dir).name == "step-000001"
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(run_dir / "checkpoints" / "step-000002")


def test_checksum_mismatch_is_detected(trained, run_dir, caplog):
    bad = run_dir / "checkpoints" / "step-000002"
    target = bad / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    assert "checksum mismatch in optimizer.safetensors" in verify_checkpoint(bad)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(run_dir).name == "step-000001"
    assert any("step-000002" in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)
    model, opt, sched = trained
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(bad, model, opt, sched)


def test_resume_path_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_resume(tmp_path / "nope")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume(tmp_path)


@pytest.mark.parametrize("key", MUST_MATCH)
def test_mismatched_config_is_refused(tiny_llama_dir, trained, run_dir, key):
    model, _, _ = trained
    other = {
        "model.name_or_path": "/elsewhere", "latent.num_tokens": 5, "latent.use_projection": False,
        "lora.enabled": False, "lora.r": 8,
    }[key]
    cfg = model.cfg.override([f"{key}={other}"])
    with pytest.raises(ConfigError, match=re.escape(key)):
        check_compatible(run_dir / "checkpoints" / "step-000002", cfg)


def test_load_refuses_a_checkpoint_of_another_shape(tiny_llama_dir, run_dir):
    model, opt, sched = build(tiny_llama_dir, **{"latent.num_tokens": 4})
    with pytest.raises(ConfigError, match="latent.num_tokens=3 but this run has latent.num_tokens=4"):
        load_checkpoint(run_dir / "checkpoints" / "step-000002", model, opt, sched)


def test_checkpoint_holds_no_pickle(run_dir):
    files = [p for p in (run_dir / "checkpoints" / "step-000002").rglob("*") if p.is_file()]
    suffixes = {p.suffix for p in files}
    assert suffixes <= {".safetensors", ".json", ".yaml", ".md", ".jinja", ".txt", ""}, suffixes
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in files)
    marker = json.loads((run_dir / "checkpoints" / "step-000002" / MARKER).read_text())
    assert set(marker["files"]) == {str(p.relative_to(run_dir / "checkpoints" / "step-000002")) for p in files if p.name != MARKER}


PICKLE_USE = re.compile(
    r"torch\.(load|save)\(|^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b"
    r"|\bpickle\.(loads?|dumps?|Unpickler)\b|weights_only\s*=\s*False|allow_pickle\s*=\s*True"
)


def test_package_source_never_unpickles():
    offenders = []
    for path in sorted((REPO / "kava").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if PICKLE_USE.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


leaves = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=False),
                   st.text(max_size=5), st.builds(lambda n: torch.arange(n, dtype=torch.float32), st.integers(0, 4)))
states = st.recursive(
    leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3),
        st.tuples(kids, kids),
        st.dictionaries(st.one_of(st.integers(0, 9), st.text(max_size=4)), kids, max_size=3),
    ),
    max_leaves=12,
)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


@settings(max_examples=80, deadline=None)
@given(states)
def test_state_flattening_round_trips_through_json(state):
    tensors: dict = {}
    structure = json.loads(json.dumps(flatten_state(state, tensors)))
    assert _same(unflatten_state(structure, tensors), state)


def test_loss_scaler_state_round_trips(tiny_llama_dir, trained, tmp_path, caplog):
    """fp16: the GradScaler's scale and growth tracker come back on resume; a checkpoint without them
    (saved without fp16, or by an older kava) loads and leaves the scaler as it was, with a warning."""
    model, opt, sched = trained
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=7)
    scaler.load_state_dict({**scaler.state_dict(), "scale": 2.0**5, "_growth_tracker": 3})
    path = save_checkpoint(tmp_path / "a", 1, model, opt, sched, {}, keep_last=1, scaler=scaler)
    plain = save_checkpoint(tmp_path / "b", 1, model, opt, sched, {}, keep_last=1)
    assert (path / "scaler.json").is_file() and not (plain / "scaler.json").exists()

    fresh, fresh_opt, fresh_sched = build(tiny_llama_dir)
    restored = torch.amp.GradScaler("cpu")
    load_checkpoint(path, fresh, fresh_opt, fresh_sched, scaler=restored)
    assert restored.state_dict() == scaler.state_dict() and restored.get_scale() == 2.0**5

    untouched = torch.amp.GradScaler("cpu", init_scale=2.0**9)
    with caplog.at_level(logging.WARNING):
        load_checkpoint(plain, fresh, fresh_opt, fresh_sched, scaler=untouched)
    assert untouched.get_scale() == 2.0**9 and any("no loss-scaler state" in r.getMessage() for r in caplog.records)


def test_branch_refuses_other_parameter_groups(tiny_llama_dir, run_dir):
    model, opt, sched = build(tiny_llama_dir, **{"train.weight_decay_scope": "all"})  # 1 group; the checkpoint has 2
    with pytest.raises(ConfigError, match="train.weight_decay_scope"):
        load_checkpoint(run_dir / "checkpoints" / "step-000002", model, opt, sched, branch=True)
