"""Rough edges a new user hit (issue 12): missing local model paths and the demo preset, corrupt checkpoints
under every loader, ``kava eval --format`` on the MAWPS schema, and ``kava export --merged``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, perturb_trainables, tiny_config
from kava.checkpoint import MARKER, CheckpointError, safetensors_problem, save_checkpoint, verify_for_loading
from kava.cli import main
from kava.config import ConfigError
from kava.model import KavaModel

MAWPS = REPO / "tests" / "data" / "fixtures" / "mawps_sample.json"
QUESTIONS = ["Tom has 5 apples and buys 3 more. How many apples does he have?", "A cat", "Each box holds 7 pens."]


def run_kava(*args: str, cwd: Path = REPO, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "kava", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env)


def columns(model, questions, mode):
    """Generation as columns (texts, token_ids, forward_passes, latents), whatever ``generate`` returns."""
    fn = getattr(model, "generate_batch", None) or model.generate
    return fn(questions, mode=mode)


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("kava: error:")]


def lora_checkpoint(model_dir: Path, out: Path) -> Path:
    cfg = tiny_config(model_dir, **{"eval.max_answer_tokens": 4, "eval.max_cot_tokens": 6, "eval.batch_size": 4})
    model = KavaModel.from_config(cfg)
    perturb_trainables(model)  # LoRA B, trainable token rows and the projection all away from their init
    return model.save(out)


@pytest.fixture(scope="module")
def ckpt(tiny_llama_dir, tmp_path_factory) -> Path:
    return lora_checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("ckpt"))


# ----------------------------------------------------------------------------
# 1. a local-looking model path that does not exist; kava train --preset demo on a fresh checkout
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, local", [
    ("runs/demo/base_model", True), ("./model", True), ("../model", True), ("/abs/model", True), ("~/model", True),
    ("a\\b", True), ("a/b/c", True),
    ("HuggingFaceTB/SmolLM2-135M", False), ("gpt2", False), ("meta-llama/Llama-3.2-1B", False),
])
def test_local_path_rule(name, local):
    from kava.backbone import looks_like_local_path

    assert looks_like_local_path(name) is local


def test_one_slash_after_an_existing_directory_is_local(tmp_path, monkeypatch):
    from kava.backbone import looks_like_local_path

    monkeypatch.chdir(tmp_path)
    assert not looks_like_local_path("runs/model")
    (tmp_path / "runs").mkdir()
    assert looks_like_local_path("runs/model")


def test_train_with_a_missing_demo_model_names_the_command_that_builds_it(tmp_path, tiny_llama_dir, monkeypatch):
    import kava.train as train

    monkeypatch.setattr(train, "run_training", lambda *a, **k: pytest.fail("must fail before training"))
    missing = tmp_path / "runs" / "demo" / "base_model"
    cfg = tmp_path / "cfg.yaml"
    tiny_config(tiny_llama_dir, **{"model.name_or_path": str(missing)}).to_yaml(cfg)
    r = run_kava("train", "--config", str(cfg), "--output", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(missing) in lines[0] and f"kava demo --output {missing.parent}" in lines[0]
    assert "Repo id must be" not in r.stderr


def test_the_python_loader_gives_the_same_error(tmp_path):
    cfg = tiny_config(tmp_path / "runs" / "demo" / "base_model")
    with pytest.raises(ConfigError, match=r"no such local directory.*kava demo --output"):
        KavaModel.from_config(cfg)


def test_train_with_a_missing_demo_data_file(tmp_path, tiny_llama_dir, capsys):
    cfg = tmp_path / "cfg.yaml"
    tiny_config(tiny_llama_dir, **{"data.train_path": "elsewhere/data/train.jsonl"}).to_yaml(cfg)
    assert main(["train", "--config", str(cfg), "--output", str(tmp_path / "o")]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "data.train_path='elsewhere/data/train.jsonl'" in line and "kava demo --output elsewhere" in line


def test_train_preset_demo_prepares_the_demo_files_itself(tmp_path, monkeypatch, capsys):
    import kava.demo as demo
    import kava.train as train

    monkeypatch.chdir(tmp_path)  # a fresh checkout: no runs/demo
    monkeypatch.setattr(demo, "DemoSizes", lambda: demo.QUICK)
    seen = []
    monkeypatch.setattr(train, "run_training", lambda cfg, out, **k: seen.append(cfg) or Path(out))
    assert main(["train", "--preset", "demo", "--output", "runs/t"]) == 0
    (cfg,) = seen
    assert cfg.model.name_or_path == "runs/demo/base_model" and cfg.data.train_path == "runs/demo/data/train.jsonl"
    assert (tmp_path / "runs/demo/base_model/config.json").is_file()
    assert (tmp_path / "runs/demo/data/train.jsonl").is_file() and (tmp_path / "runs/demo/data/task.json").is_file()
    # the same files as 'kava demo --output runs/demo --quick' would write: a second run reuses them
    assert demo.ensure_demo_task(cfg) is None
    assert demo.prepare_task(Path("runs/demo"), 0, demo.QUICK).model_dir == Path("runs/demo/base_model")


def test_train_preset_demo_refuses_another_task_in_one_line(tmp_path, monkeypatch, capsys):
    import kava.demo as demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "DemoSizes", lambda: demo.QUICK)
    data = tmp_path / "runs/demo/data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("{}\n")  # an older demo's data without task.json
    assert main(["train", "--preset", "demo", "--output", "runs/t"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "task.json" in line


# ----------------------------------------------------------------------------
# 2. corrupt checkpoints: every loader verifies, names the file, exits 2, no traceback
# ----------------------------------------------------------------------------
def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def truncated(ckpt, tmp_path) -> tuple[Path, Path]:
    """A copy of the bare (no COMPLETE marker) checkpoint with its adapter weights cut in half."""
    bad = shutil.copytree(ckpt, tmp_path / "bad")
    f = bad / "adapter" / "adapter_model.safetensors"
    truncate(f)
    return bad, f


@pytest.fixture(scope="module")
def sealed(tiny_llama_dir, tmp_path_factory) -> Path:
    """A training checkpoint (COMPLETE marker with checksums)."""
    cfg = tiny_config(tiny_llama_dir, **{"eval.max_answer_tokens": 3})
    model = KavaModel.from_config(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_checkpoint(tmp_path_factory.mktemp("run"), 1, model, opt, sched, {}, keep_last=1)


def test_safetensors_problem(ckpt, tmp_path):
    f = shutil.copy(ckpt / "projection.safetensors", tmp_path / "p.safetensors")
    assert safetensors_problem(f) is None
    whole = Path(f).read_bytes()
    Path(f).write_bytes(whole + b"\0")
    assert "trailing bytes" in safetensors_problem(f)
    Path(f).write_bytes(whole[:-1])
    assert "truncated" in safetensors_problem(f)
    Path(f).write_bytes(whole[:5])
    assert "truncated" in safetensors_problem(f)
    Path(f).write_bytes(b"\xff" * 64)
    assert safetensors_problem(f) is not None


@pytest.mark.parametrize("kind", ["bare", "training"])
def test_eval_on_a_truncated_checkpoint_exits_2_naming_the_file(kind, truncated, sealed, tmp_path):
    if kind == "bare":  # KavaModel.save only: the safetensors header must match the file's size
        bad, f = truncated
        why = "truncated"
    else:  # a training checkpoint (as kava train writes it): the COMPLETE marker's checksums
        bad = shutil.copytree(sealed, tmp_path / "run" / "checkpoints" / sealed.name)
        f = bad / "adapter" / "adapter_model.safetensors"
        truncate(f)
        why = "sha256 differs"
    r = run_kava("eval", "--checkpoint", str(bad), "--data", str(MAWPS), "--output", str(tmp_path / "o"), "--no-progress")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    (line,) = error_lines(r.stderr)
    assert str(f) in line and why in line and "refusing to load" in line


@pytest.mark.parametrize("argv", [
    ["generate", "--checkpoint", "{ckpt}", "A cat"],
    ["analyze", "--checkpoint", "{ckpt}", "--data", str(MAWPS), "--output", "{out}", "--limit", "1"],
    ["eval", "--checkpoint", "{ckpt}", "--data", str(MAWPS), "--output", "{out}", "--no-progress"],
    ["export", "--checkpoint", "{ckpt}", "--output", "{out}", "--merged"],
])
def test_every_cli_loader_refuses_a_corrupt_checkpoint(argv, truncated, tmp_path, capsys):
    bad, f = truncated
    args = [a.format(ckpt=bad, out=tmp_path / "out") for a in argv]
    assert main(args) == 2  # any exception other than the one-line user error would propagate here
    (line,) = error_lines(capsys.readouterr().err)
    assert str(f) in line


def test_python_loaders_raise_checkpoint_error(truncated):
    bad, f = truncated
    assert issubclass(CheckpointError, ConfigError)
    with pytest.raises(CheckpointError, match=str(f)):
        KavaModel.load(bad)
    if hasattr(KavaModel, "from_pretrained"):
        with pytest.raises(CheckpointError, match=str(f)):
            KavaModel.from_pretrained(str(bad))


@pytest.mark.parametrize("target", ["adapter/adapter_model.safetensors", "projection.safetensors", "config.yaml",
                                    "tokenizer/tokenizer.json"])
def test_checksums_are_verified_when_the_checkpoint_has_a_marker(sealed, tmp_path, target, capsys):
    bad = shutil.copytree(sealed, tmp_path / "bad")
    f = bad / target
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the checksum can tell
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{f}: corrupt checkpoint file \(sha256 differs"):
        verify_for_loading(bad)
    assert main(["generate", "--checkpoint", str(bad), "A cat"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert str(f) in line


def test_a_file_missing_from_a_sealed_checkpoint(sealed, tmp_path):
    bad = shutil.copytree(sealed, tmp_path / "bad")
    (bad / "projection.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"projection.safetensors: missing from the checkpoint"):
        KavaModel.load(bad)


def test_intact_checkpoints_still_load(ckpt, sealed):
    verify_for_loading(ckpt)
    verify_for_loading(sealed)
    assert KavaModel.load(sealed).cfg.latent.num_tokens == 3


# ----------------------------------------------------------------------------
# 3. kava eval on the classic MAWPS schema, and --format
# ----------------------------------------------------------------------------
def test_eval_reads_the_mawps_schema(ckpt, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(MAWPS), "--output", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report[str(MAWPS)]["n"] == 3
    golds = [json.loads(ln)["gold"] for ln in (out / "predictions.jsonl").read_text().splitlines()]
    assert golds == ["43", "48", "1.75"]
    out2 = tmp_path / "eval2"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(MAWPS), "--format", "mawps", "--output", str(out2),
                 "--no-progress"]) == 0
    assert json.loads((out2 / "report.json").read_text())[str(MAWPS)]["n"] == 3


def test_eval_format_flag_is_applied(ckpt, tmp_path, capsys):
    rc = main(["eval", "--checkpoint", str(ckpt), "--data", str(MAWPS), "--format", "gsm8k-aug",
               "--output", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{MAWPS}:1: missing field 'question'" in line
    with pytest.raises(SystemExit) as e:
        main(["eval", "--checkpoint", str(ckpt), "--data", str(MAWPS), "--format", "nope", "--output", "o"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------
# 4. kava export --merged
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied and untied LM head
def test_merged_export_loads_as_a_full_model_and_generates_the_same(family, tiny_llama_dir, tiny_qwen_dir, tmp_path,
                                                                    capsys):
    src = lora_checkpoint(tiny_llama_dir if family == "llama" else tiny_qwen_dir, tmp_path / "src")
    out = tmp_path / "merged"
    assert main(["export", "--checkpoint", str(src), "--output", str(out), "--merged"]) == 0
    assert capsys.readouterr().out.strip() == str(out)

    assert (out / "model").is_dir() and not (out / "adapter").exists() and (out / MARKER).is_file()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt")), "safetensors only"
    meta = json.loads((out / "kava_meta.json").read_text())
    assert meta["lora"] is False and meta["merged_lora"]["r"] == 4 and meta["exported_from"] == str(src)
    verify_for_loading(out)

    lora = KavaModel.load(src).eval()
    merged = KavaModel.load(out).eval()
    assert merged.cfg.lora.enabled is False and not hasattr(merged.lm, "peft_config")
    assert sum(p.numel() for p in merged.parameters()) < sum(p.numel() for p in lora.parameters())
    for mode in ("latent", "cot"):
        a, b = columns(lora, QUESTIONS, mode), columns(merged, QUESTIONS, mode)
        assert a.texts == b.texts and a.token_ids == b.token_ids and a.forward_passes == b.forward_passes
        if mode == "latent":
            torch.testing.assert_close(a.latents, b.latents, atol=1e-4, rtol=1e-4)
    if hasattr(KavaModel, "from_pretrained"):
        again = KavaModel.from_pretrained(str(out)).eval()
        assert columns(again, QUESTIONS, "latent").texts == columns(lora, QUESTIONS, "latent").texts


def test_plain_export_keeps_the_adapter_and_drops_training_state(sealed, tmp_path):
    from kava.export import export_checkpoint

    out = export_checkpoint(sealed.parent.parent, tmp_path / "x")  # a run directory: its latest checkpoint
    assert (out / "adapter").is_dir() and not (out / "optimizer.safetensors").exists()
    assert not (out / "rng.safetensors").exists() and (out / MARKER).is_file()
    assert KavaModel.load(out).cfg.lora.enabled is True


def test_export_refuses_a_non_empty_output(ckpt, tmp_path, capsys):
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(out), "--merged"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert str(out) in line and "not empty" in line
    assert (out / "keep.txt").read_text() == "mine"
