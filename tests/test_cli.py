"""CLI: help texts, one-line user errors with exit status 2, generate/eval/analyze on a tiny checkpoint."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, tiny_config
from kava.cli import main
from kava.model import KavaModel

T = 2


def run_kava(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    import os

    return subprocess.run([sys.executable, "-m", "kava", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, **env})


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("kava: error:")]


@pytest.fixture(scope="module")
def checkpoint(tiny_llama_dir, tmp_path_factory) -> Path:
    model = KavaModel.from_config(tiny_config(tiny_llama_dir, **{"eval.max_answer_tokens": 3, "eval.max_cot_tokens": 5}))
    return model.save(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def config_file(tmp_path, tiny_llama_dir) -> Path:
    p = tmp_path / "cfg.yaml"
    tiny_config(tiny_llama_dir).to_yaml(p)
    return p


def test_top_level_help():
    r = run_kava("--help")
    assert r.returncode == 0, r.stderr
    for cmd in ("train", "eval", "generate", "analyze", "demo"):
        assert cmd in r.stdout


def test_train_help_lists_every_config_field():
    from kava.config import iter_fields

    r = run_kava("train", "--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "--preset" in out and "--config" in out and "--set" in out and "--resume" in out
    line = next(ln for ln in out.splitlines() if ln.split()[:1] == ["latent.num_iterations"])
    assert "T: Jacobi iterations after pass 0" in line
    for key, _, _, help_text in iter_fields():
        assert key in out and help_text in out, key


@pytest.mark.parametrize("cmd", ["eval", "generate", "analyze"])
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "--checkpoint" in capsys.readouterr().out


def test_malformed_set_is_one_line_exit_2(config_file, tmp_path):
    r = run_kava("train", "--config", str(config_file), "--set", "latent.num_iterations", "--output", str(tmp_path / "o"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kava: error:"), r.stderr
    assert "latent.num_iterations" in lines[0]


@pytest.mark.parametrize("pair,needle", [
    ("latent.bogus=1", "latent.bogus"),
    ("latent.num_iterations=many", "latent.num_iterations"),
    ("=3", "'=3'"),
    ("lora r=4", "lora r=4"),
])
def test_bad_set_pairs(pair, needle, config_file, tmp_path, capsys):
    rc = main(["train", "--config", str(config_file), "--set", pair, "--output", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_missing_config_file(tmp_path, capsys):
    rc = main(["train", "--config", str(tmp_path / "nope.yaml"), "--output", str(tmp_path / "o")])
    assert rc == 2
    assert len(error_lines(capsys.readouterr().err)) == 1


def test_train_calls_run_training_with_overrides(config_file, tmp_path, monkeypatch, capsys):
    train = pytest.importorskip("kava.train")
    seen = {}

    def fake_run(cfg, output_dir, resume=None, init_from=None):
        seen.update(cfg=cfg, output_dir=output_dir, resume=resume, init_from=init_from)
        return Path(output_dir) / "final"

    monkeypatch.setattr(train, "run_training", fake_run)
    rc = main(["train", "--config", str(config_file), "--set", "latent.num_iterations=5", "--set", "loss.alpha_kv=2",
               "--output", str(tmp_path / "run")])
    assert rc == 0
    assert seen["cfg"].latent.num_iterations == 5 and seen["cfg"].loss.alpha_kv == 2.0
    assert seen["cfg"].latent.num_tokens == 3  # from the file
    assert seen["output_dir"] == str(tmp_path / "run") and seen["resume"] is None
    assert str(tmp_path / "run" / "final") in capsys.readouterr().out
    ckpt = tmp_path / "warm"
    ckpt.mkdir()
    assert main(["train", "--config", str(config_file), "--output", str(tmp_path / "b"), "--init-from", str(ckpt)]) == 0
    assert seen["init_from"] == str(ckpt) and seen["resume"] is None

    def interrupted(cfg, output_dir, resume=None, init_from=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run_training", interrupted)  # a second Ctrl-C: no checkpoint, status 130
    assert main(["train", "--config", str(config_file), "--output", str(tmp_path / "run")]) == 130

    def aborted(cfg, output_dir, resume=None, init_from=None):
        raise train.TrainingAborted("5 non-finite steps in a row")

    monkeypatch.setattr(train, "run_training", aborted)
    assert main(["train", "--config", str(config_file), "--output", str(tmp_path / "run")]) == 1


def test_unknown_preset(tmp_path, capsys):
    pytest.importorskip("kava.train")
    rc = main(["train", "--preset", "no-such-preset", "--output", str(tmp_path / "o")])
    assert rc == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "no-such-preset" in lines[0]


def test_eval_missing_checkpoint_exits_2(tmp_path):
    r = run_kava("eval", "--checkpoint", str(tmp_path / "missing"), "--data", "gsm8k", "--output", str(tmp_path / "o"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kava: error:") and "missing" in lines[0], r.stderr


def test_eval_missing_data_exits_2(checkpoint, tmp_path, capsys):
    rc = main(["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "none.jsonl"), "--output", str(tmp_path)])
    assert rc == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "none.jsonl" in lines[0]


def test_generate_prints_latents_answer_and_passes(checkpoint, capsys):
    rc = main(["generate", "--checkpoint", str(checkpoint), "--top-k", "2", "Tom has 5 apples and buys 3 more."])
    assert rc == 0
    out = capsys.readouterr().out
    assert "question: Tom has 5 apples" in out
    assert len(re.findall(r"^  z\d+", out, re.M)) == 3  # M = 3 latents
    assert re.search(r"^answer: ", out, re.M)
    m = re.search(r"^forward passes: (\d+) \(1 \+ 2 latent \+ (\d+) answer tokens\)", out, re.M)
    assert m, out
    assert int(m.group(1)) == 1 + T + int(m.group(2))


def test_generate_cot_mode(checkpoint, capsys):
    rc = main(["generate", "--checkpoint", str(checkpoint), "--mode", "cot", "A cat"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "z1" not in out and re.search(r"^answer: ", out, re.M)
    m = re.search(r"^forward passes: (\d+) \((\d+) tokens\)", out, re.M)
    assert m and m.group(1) == m.group(2)


def test_eval_and_analyze_commands(checkpoint, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"q": "Tom has 5 apples", "a": "5"}, {"q": "A cat", "a": "1"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    rc = main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--question-field", "q",
               "--answer-field", "a", "--output", str(out), "--batch-size", "2", "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report[str(data)]["n"] == 2
    assert "| dataset | accuracy %" in capsys.readouterr().out

    cot = tmp_path / "cot.jsonl"
    cot.write_text(json.dumps({"question": "A cat", "steps": ["<<1+1=2>>", "<<2+2=4>>"], "answer": "4"}) + "\n")
    rc = main(["analyze", "--checkpoint", str(checkpoint), "--data", str(cot), "--output", str(tmp_path / "an"),
               "--limit", "1"])
    assert rc == 0
    assert (tmp_path / "an" / "analysis.json").is_file() and (tmp_path / "an" / "kv_cosine_layer1.png").is_file()


def test_no_command_and_bad_arguments(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit) as e:
        main(["eval", "--checkpoint", "x"])  # missing required options: argparse's usage error
    assert e.value.code == 2


def test_demo_is_delegated(monkeypatch):
    demo = pytest.importorskip("kava.demo")
    seen = []
    monkeypatch.setattr(demo, "main", lambda argv: seen.append(argv) or 0)
    assert main(["demo", "--quick", "x"]) == 0
    assert seen == [["--quick", "x"]]
