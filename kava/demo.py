"""The embedded demo: KaVa vs No-CoT trained from scratch on a synthetic GSM8k-AUG-shaped task, on a CPU.

Steps (``kava demo``):
1. draw disjoint train / held-out problems (kava.data.synthetic), write them as jsonl;
2. train a byte-level BPE tokenizer and save a randomly initialised small LLaMA;
3. train KaVa (teacher + student in one model) and No-CoT with the same model size and optimizer steps;
4. evaluate KaVa in latent mode, the same model in CoT (teacher) mode, and No-CoT, on >= 500 held-out problems;
5. write report.md, report.json and training_curves.png; print the table.

``kava demo --ablate`` runs METHOD.md's ablations on the same task instead: the sweep spec
kava/presets/sweeps/ablate-demo.yaml (kava.sweep).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from kava.config import KavaConfig
from kava.train import preset_path

log = logging.getLogger(__name__)

@dataclass
class DemoSizes:
    task: str = "small"  # a name in kava.data.synthetic.TASKS
    n_train: int = 40000
    n_test: int = 500
    n_valid: int = 2000  # drawn after train and test from its own stream; choices are made on it
    vocab_size: int = 512
    hidden: int = 192
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 576


QUICK = DemoSizes(n_train=64, n_test=8, n_valid=8, vocab_size=300, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64)


@dataclass(frozen=True)
class TaskFiles:
    """What prepare_task writes: the three splits (disjoint by question) and the random-init model."""
    train: Path
    valid: Path
    test: Path
    model_dir: Path


def prepare_task(out: Path, seed: int, sizes: DemoSizes, style: str = "equations") -> TaskFiles:
    """Write train/valid/test jsonl, a tokenizer and a random-init LLaMA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kava.data.synthetic import TASKS, make_heldout, make_splits, write_jsonl
    from kava.data.tokenizer import build_demo_tokenizer

    data_dir = out / "data"
    train_path, test_path, model_dir = data_dir / "train.jsonl", data_dir / "test.jsonl", out / "base_model"
    valid_path = data_dir / "valid.jsonl"
    ranges = TASKS[sizes.task]
    task = {"task": sizes.task, "ranges": asdict(ranges), "seed": seed, "style": style,
            "n_train": sizes.n_train, "n_test": sizes.n_test, "n_valid": sizes.n_valid}
    task_file = data_dir / "task.json"
    if (train_path.exists() or test_path.exists()) and not task_file.exists():
        raise SystemExit(f"{data_dir}: data without a task.json (an older demo run); cannot tell which task it "
                         f"holds. Use another --output or delete {out}.")
    if task_file.exists():
        found = json.loads(task_file.read_text())
        if found != json.loads(json.dumps(task)):
            raise SystemExit(f"{task_file}: this run directory holds another task ({found}); "
                             f"expected {task}. Use another --output or delete {out}.")
    if not train_path.exists() or not test_path.exists() or not valid_path.exists():
        train, test = make_splits(sizes.n_train, sizes.n_test, seed=seed, style=style, ranges=ranges)
        valid = make_heldout(sizes.n_valid, [*train, *test], seed=seed, name="valid", style=style, ranges=ranges)
        write_jsonl(train, train_path)
        write_jsonl(test, test_path)
        write_jsonl(valid, valid_path)
        task_file.write_text(json.dumps(task, indent=1))
    if not (model_dir / "config.json").exists():
        from kava.data.formats import load_examples

        train = load_examples(str(train_path)).examples
        texts = [" ".join([e.question, *e.steps, e.answer]) for e in train[:5000]]
        tok = build_demo_tokenizer(texts, sizes.vocab_size, model_dir)
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
            num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads, num_key_value_heads=sizes.kv_heads,
            max_position_embeddings=512, tie_word_embeddings=True,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )
        LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    return TaskFiles(train=train_path, valid=valid_path, test=test_path, model_dir=model_dir)


def demo_root(cfg: KavaConfig) -> Path | None:
    """``DIR`` when the config trains on the demo layout: model ``DIR/base_model``, data ``DIR/data/train.jsonl``."""
    model, train = Path(cfg.model.name_or_path), Path(cfg.data.train_path)
    if model.name == "base_model" and train.name == "train.jsonl" and train.parent.name == "data" \
            and train.parent.parent == model.parent:
        return model.parent
    return None


def ensure_demo_task(cfg: KavaConfig, sizes: DemoSizes | None = None) -> TaskFiles | None:
    """``kava train --preset demo``: write the demo data and random-init model first when they are missing.

    Only for a config on the demo layout (:func:`demo_root`); the task's seed is ``train.seed``, as in
    ``kava demo --seed N``, so a later ``kava demo --output DIR`` reuses what this wrote. -> the files, or
    ``None`` when nothing had to be written.
    """
    from kava.config import ConfigError

    root = demo_root(cfg)
    if root is None or ((root / "base_model" / "config.json").is_file() and Path(cfg.data.train_path).is_file()):
        return None
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # every rank would write the same files: leave it to
        return None                                      # the missing-path error, which names 'kava demo'
    log.info("%s: preparing the demo task and its random-init model (as 'kava demo --output %s' does)", root, root)
    try:
        return prepare_task(root, cfg.train.seed, sizes or DemoSizes())
    except SystemExit as e:  # another task already in DIR: one line, exit 2
        raise ConfigError(str(e)) from None


def demo_config(model_dir: Path, train_path: Path, seed: int, extra: list[str]) -> KavaConfig:
    cfg = KavaConfig.from_yaml(preset_path("demo"))
    return cfg.override([f"model.name_or_path={model_dir}", f"data.train_path={train_path}",
                         f"train.seed={seed}", *extra])


def data_parallel_config(cfg: KavaConfig, processes: int) -> KavaConfig:
    """``cfg`` with its micro-batch split over ``processes`` data-parallel processes: the same global batch and
    examples per step (kava.train gives process r the micro-batches r, r + P, ...)."""
    t = cfg.train
    if t.global_batch_size % processes:
        raise SystemExit(f"--processes {processes}: train.global_batch_size={t.global_batch_size} cannot be shared "
                         f"evenly by {processes} processes")
    micro = min(t.micro_batch_size, t.global_batch_size // processes)
    while (t.global_batch_size // processes) % micro:
        micro -= 1
    return cfg.override([f"train.micro_batch_size={micro}"])


def launch_training(cfg: KavaConfig, run_dir: Path, processes: int, resume: bool,
                    init_from: Path | None = None) -> Path:
    """Train one run with ``torchrun --nproc_per_node processes -m kava.train`` (DDP through accelerate; gloo on
    the CPU), one torch thread per process. -> the final checkpoint."""
    import subprocess
    import sys

    from kava.checkpoint import latest_checkpoint

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir / "launch_config.yaml"
    cfg.to_yaml(cfg_file)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "kava.train", "--config", str(cfg_file), "--output", str(run_dir)]
    cmd += ["--resume", str(run_dir)] if resume else ["--init-from", str(init_from)] if init_from else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log.info("training %s in %d processes: %s", run_dir.name, processes, " ".join(cmd))
    proc = subprocess.run(cmd, env=env)
    final = latest_checkpoint(run_dir)
    if proc.returncode != 0 or final is None:
        raise SystemExit(f"{run_dir.name}: training in {processes} processes failed (exit status {proc.returncode}); "
                         f"its output is above, its log in {run_dir}")
    return final


def train_and_eval(name: str, cfg: KavaConfig, out: Path, test_path: Path, modes: list[str],
                   init_from: Path | None = None, processes: int = 1) -> dict:
    """Train one run (or reuse a finished one; ``init_from``: branch off that checkpoint) and evaluate it.
    ``processes`` > 1: train with that many data-parallel single-thread processes (:func:`launch_training`)."""
    from kava.data.formats import load_examples
    from kava.evaluate import evaluate, load_checkpoint
    from kava.train import run_training

    from kava.checkpoint import latest_checkpoint, step_dir_name

    run_dir = out / name
    t0 = time.perf_counter()
    # A finished run is reused (make demo twice = evaluate again); an unfinished one resumes.
    final = latest_checkpoint(run_dir) if (run_dir / "DONE").exists() else None
    if final is None:
        resume = latest_checkpoint(run_dir) is not None
        if processes > 1:
            final = launch_training(data_parallel_config(cfg, processes), run_dir, processes, resume, init_from)
        elif resume:
            final = run_training(cfg, run_dir, resume=run_dir)
        else:
            final = run_training(cfg, run_dir, init_from=init_from)
        if final.name != step_dir_name(cfg.train.max_steps):
            raise SystemExit(f"{name}: training stopped early at {final}; run the demo again to resume it")
        (run_dir / "DONE").write_text(str(final))
    train_s = time.perf_counter() - t0
    model = load_checkpoint(final)
    test = load_examples(str(test_path)).examples
    result = {"train_s": train_s, "run_dir": str(run_dir)}
    for mode in modes:
        rep, preds = evaluate(model, test, mode=mode, batch_size=cfg.eval.batch_size, progress=False)
        result[mode] = rep.as_dict()
        result[mode]["accuracy_by_steps"] = accuracy_by_steps(test, preds)
        with (run_dir / f"predictions_{mode}.jsonl").open("w") as fh:
            for p in preds:
                fh.write(json.dumps(p.as_dict()) + "\n")
    return result


def accuracy_by_steps(examples, preds) -> dict[str, float]:
    """Accuracy per number of reasoning steps (2 / 3 / 4 on the demo task)."""
    groups: dict[int, list[bool]] = {}
    for ex, pred in zip(examples, preds, strict=True):
        groups.setdefault(len(ex.steps), []).append(bool(pred.correct))
    return {str(n): sum(v) / len(v) for n, v in sorted(groups.items())}


def plot_curves(runs: dict[str, Path], path: Path) -> bool:
    """Training curves as a PNG; False (and a warning) without matplotlib (the ``kava[plots]`` extra)."""
    from kava.optional import have_matplotlib

    if not have_matplotlib(path.name):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["loss", "ce_student", "ce_teacher", "codi", "kv"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for label, run_dir in runs.items():
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "step" in r and "loss" in r]
        for ax, key in zip(axes, keys):
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] != 0.0]
            if pts:
                ax.plot(*zip(*pts), label=label)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _row(label: str, rep: dict, train_s: float | None) -> str:
    lo, hi = rep["ci95"]
    t = f"{train_s:.0f}" if train_s is not None else ""
    return (f"| {label} | {100 * rep['accuracy']:.1f} | [{100 * lo:.1f}, {100 * hi:.1f}] | {rep['n']} | "
            f"{rep['forward_passes_mean']:.1f} | {t} |")


def _describe_task(name: str) -> str:
    from kava.data.synthetic import TASKS

    r = TASKS[name]
    return (f"values 1..{r.max_value}, + and - operands {r.add[0]}..{r.add[1]}, "
            f"* operands {r.mul[0]}..{r.mul[1]}, starting amounts {r.start[0]}..{r.start[1]}")


def run_demo(out: Path, seed: int, sizes: DemoSizes, extra: list[str], workers: int = 1, processes: int = 1) -> dict:
    """``workers=1``: KaVa, then No-CoT, in this process at its torch thread count. ``workers=2``: side by side in
    two single-thread processes (the same results as ``workers=1`` at one thread); on the 2-core machine of
    docs/results.md this was slower than one process with 2 threads, so it is not the default. ``processes=P``:
    KaVa, then No-CoT, each trained data-parallel over P single-thread processes (DDP; the same global batch, the
    micro-batch split), evaluated here; docs/perf.md section 12 measured 2 processes 1.26x faster than 2 threads."""
    if workers > 1 and processes > 1:
        raise SystemExit("--workers and --processes: choose one (side by side, or each run data-parallel)")
    t_start = time.perf_counter()
    task = prepare_task(out, seed, sizes)
    train_path, test_path, model_dir = task.train, task.test, task.model_dir
    kava_cfg = demo_config(model_dir, train_path, seed, extra)
    nocot_cfg = kava_cfg.override(["method=nocot", "train.curriculum_cot_steps=0"])
    # direct on the KaVa model: the same model with no latent positions, to pair against its latent answers
    jobs = {"kava": (kava_cfg, ["latent", "cot", "direct"]), "nocot": (nocot_cfg, ["direct"])}
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        from kava.sweep import _init_worker

        with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(1,)) as pool:
            futures = {name: pool.submit(train_and_eval, name, cfg, out, test_path, modes)
                       for name, (cfg, modes) in jobs.items()}
            done = {name: f.result() for name, f in futures.items()}
    else:
        done = {name: train_and_eval(name, cfg, out, test_path, modes, processes=processes)
                for name, (cfg, modes) in jobs.items()}
    kava, nocot = done["kava"], done["nocot"]
    plotted = plot_curves({"KaVa": out / "kava", "No-CoT": out / "nocot"}, out / "training_curves.png")
    wall = time.perf_counter() - t_start
    lat, nc = kava["latent"], nocot["direct"]
    gap = 100 * (lat["accuracy"] - nc["accuracy"])
    disjoint = lat["ci95"][0] > nc["ci95"][1]
    bar = gap >= 10 and disjoint
    from kava.compare import compare_files

    kava_dir = out / "kava"
    (pair,) = compare_files([kava_dir / "predictions_latent.jsonl"], [kava_dir / "predictions_direct.jsonl"])["pairs"]
    added = {k: pair[k] for k in ("diff", "diff_ci95", "mcnemar_p")}
    lines = [
        f"# KaVa demo (seed {seed})",
        "",
        f"Held-out synthetic problems (task `{sizes.task}`: {_describe_task(sizes.task)}), greedy decoding; "
        f"{kava_cfg.train.max_steps} optimizer steps per run, "
        f"batch {kava_cfg.train.global_batch_size}; M={kava_cfg.latent.num_tokens}, T={kava_cfg.latent.num_iterations}.",
        "",
        "| run | accuracy % | 95% CI | n | forward passes / question | train s |",
        "|---|---|---|---|---|---|",
        _row("KaVa student (latent)", lat, kava["train_s"]),
        _row("same model, CoT (teacher) mode", kava["cot"], None),
        _row("same model, no latents (direct)", kava["direct"], None),
        _row("No-CoT", nc, nocot["train_s"]),
        "",
        f"KaVa-latent minus No-CoT: {gap:+.1f} points; CIs {'do not overlap' if disjoint else 'overlap'}. "
        f"Bar (>= +10 points, disjoint CIs): {'MET' if bar else 'NOT MET'}.",
        f"What the latents add (latent minus direct, the same model on the same questions): "
        f"{100 * added['diff']:+.1f} [{100 * added['diff_ci95'][0]:+.1f}, "
        f"{100 * added['diff_ci95'][1]:+.1f}] points, McNemar p = {added['mcnemar_p']:.2g}.",
        f"Wall time of this demo: {wall:.0f} s "
        + ("(KaVa and No-CoT trained side by side, one thread each)." if workers > 1 else
           f"(KaVa, then No-CoT, each data-parallel over {processes} single-thread processes)." if processes > 1 else
           f"(KaVa, then No-CoT; {torch.get_num_threads()} torch threads)."),
        "",
        "Accuracy % by number of reasoning steps: " + "; ".join(
            f"{label} " + " / ".join(f"{k}: {100 * v:.0f}" for k, v in rep["accuracy_by_steps"].items())
            for label, rep in (("latent", lat), ("CoT mode", kava["cot"]), ("No-CoT", nc))) + ".",
        "",
        "![training curves](training_curves.png)" if plotted else "(No training curves: matplotlib is not installed.)",
    ]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    result = {"seed": seed, "task": sizes.task, "kava": kava, "nocot": nocot, "gap_points": gap, "ci_disjoint": disjoint,
              "latent_minus_direct": added,
              "bar_met": bar, "wall_s": wall, "workers": workers, "processes": processes}
    (out / "report.json").write_text(json.dumps(result, indent=1))
    print(text)
    return result


def run_ablation(out: Path, seed: int, task: str, extra: list[str], workers: int = 1, quick: bool = False) -> dict:
    """METHOD.md's ablations: the packaged sweep spec ``ablate-demo`` (kava/presets/sweeps/) at this seed and task."""
    from kava.sweep import SweepSpec, resolve_spec, run_sweep

    spec = SweepSpec.from_yaml(resolve_spec("ablate-demo"))
    sizes = {"quick": True, "n_test": QUICK.n_test, "n_valid": QUICK.n_valid} if quick else spec.sizes
    spec = replace(spec, seeds=[seed], task=task, sets=[*spec.sets, *extra], sizes=sizes)
    return run_sweep(spec, out, workers=workers, threads=1)


def main(argv: list[str] | None = None) -> int:
    from kava.data.synthetic import TASKS

    p = argparse.ArgumentParser(prog="kava demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/demo", help="run directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the task, the model init and the data order")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--ablate", action="store_true",
                   help="run METHOD.md's ablations instead of the demo: the sweep spec kava/presets/sweeps/ablate-demo.yaml "
                        "(the same as 'kava sweep ablate-demo'; report_valid.md in --output)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel single-thread worker processes (default 1; demo: 2 trains KaVa and No-CoT side "
                        "by side, 1 one after the other at --threads)")
    p.add_argument("--processes", type=int, default=1,
                   help="train each run data-parallel over this many single-thread processes (torchrun, DDP; "
                        "the same global batch); evaluation stays in this process")
    p.add_argument("--task", default="small", choices=sorted(TASKS),
                   help="number sizes of the synthetic problems: small (values <= 60, the default) or "
                        "sizing (values <= 200, the task of docs/DEMO_SIZING)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads with --workers 1 (0 = torch default; workers use 1 each)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = replace(QUICK if args.quick else DemoSizes(), task=args.task)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers: must be >= 1, got {args.workers}")
    if args.processes < 1:
        p.error(f"--processes: must be >= 1, got {args.processes}")
    if args.ablate:
        if args.processes > 1:
            p.error("--processes: not with --ablate (the sweep runs its runs in --workers processes)")
        run_ablation(out, args.seed, args.task, args.sets, args.workers or 1, quick=args.quick)
    else:
        if (args.workers or 1) > 1 and args.processes > 1:
            p.error("--workers and --processes: choose one (side by side, or each run data-parallel)")
        run_demo(out, args.seed, sizes, args.sets, workers=args.workers or 1, processes=args.processes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
