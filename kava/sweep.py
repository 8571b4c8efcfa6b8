"""Sweeps: variants x seeds, trained in parallel worker processes, compared on the same questions.

A spec (YAML) names the base preset or config, the variants (a name and a list of ``key=value`` overrides
each), the seeds, the budget and the reference variant::

    base: demo                 # a preset name or a config file
    task: small                # the synthetic demo task, drawn per seed (kava.demo.prepare_task)
    style: equations           # its CoT steps: equations, or nl (sentences; the same questions)
    sizes: {n_test: 2000}      # kava.demo.DemoSizes fields
    budget: 2500               # train.max_steps of every run
    seeds: [0, 1, 2]
    reference: kava
    sets: []                   # overrides for every variant, before its own
    variants:
      kava: []
      pccot: [method=pccot]
    pairs: [[pccot, kava]]     # optional: more paired differences for the report (may be added later)

Without ``task`` the base config's own data is trained on and ``valid:`` / ``test:`` name the held-out files.

Layout of ``--output DIR``: ``seed{S}/`` holds the task (``data/``, ``base_model/``), the shared warm start
(``warm_*``) and one run directory per variant with its resolved ``config.yaml``, ``metrics.jsonl``, its
checkpoints and, per split, ``result_{split}.json`` and ``predictions_{split}_{mode}.jsonl``. A run whose
result file exists is skipped; an interrupted run resumes from its last checkpoint, so a killed sweep
continues where it stopped. ``--seeds`` and ``--variants`` select the runs a call trains and reports (the
reference is always selected). ``report.md``, ``report.json`` and ``report.png`` (per split) compare every
variant with the reference: accuracy per seed, mean and spread, the paired bootstrap CI per seed and pooled
over seeds, and the exact McNemar p per seed (kava.stats).

Variants whose configs agree on everything the teacher-only curriculum steps use (only loss, latent,
eviction and method in kava/pccot/codi may differ) branch off one warm start per seed and group, which
gives the same result as training each from scratch (tests/test_sweep.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, fields, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Optional

import yaml

from kava.config import ConfigError, KavaConfig, read_yaml_mapping

log = logging.getLogger(__name__)

SPLITS = ("valid", "test")
# Keys the teacher-only curriculum steps do not read: variants that differ only here share a warm start.
_WARM_FREE_PREFIXES = ("loss.", "latent.", "eviction.", "eval.")
_WARM_NOT_FREE = ("loss.teacher_weight", "latent.use_projection")
_WARM_FREE_KEYS = ("train.curriculum_ramp_steps", "train.save_every", "train.keep_last", "train.log_every",
                   "train.eval_every", "train.tensorboard", "train.fsdp")  # fsdp: the layout, not the steps
_LATENT_METHODS = ("kava", "pccot", "codi")
# Keys added after sweeps were first written: left out of the warm key at their default, so that the warm starts
# of an existing sweep directory keep their names.
_WARM_KEY_NEWER = {"train.group_by_length": False, "train.sort_micro_batches": False}
# Spec keys added after sweeps were first written: left out of the saved spec at their default, so that the spec.yaml
# of an existing sweep directory still matches.
_SPEC_KEY_NEWER = {"style": "equations"}


class SweepError(RuntimeError):
    """Some runs of a sweep failed (the others are kept)."""


@dataclass
class SweepSpec:
    base: str
    variants: dict[str, list[str]]
    seeds: list[int]
    reference: str
    budget: Optional[int] = None
    task: Optional[str] = None
    style: str = "equations"  # the synthetic task's CoT steps: equations (<<12+7=19>>) or nl (sentences)
    sizes: dict[str, Any] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)
    valid: Optional[str] = None
    test: Optional[str] = None
    extra_modes: list[str] = field(default_factory=list)
    pairs: list[list[str]] = field(default_factory=list)  # [a, b]: also report a - b, paired (report only)
    source: str = "spec"

    @classmethod
    def from_dict(cls, d: Any, source: str = "spec") -> "SweepSpec":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of sweep keys, got {type(d).__name__}")
        known = {f.name for f in fields(cls)} - {"source"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
        for key in ("base", "variants", "seeds", "reference"):
            if key not in d:
                raise ConfigError(f"{source}: missing key '{key}'")
        variants = d["variants"]
        if not isinstance(variants, dict) or not variants:
            raise ConfigError(f"{source}: 'variants' must map names to lists of key=value overrides")
        for name, sets in variants.items():
            if not isinstance(name, str) or not name or "/" in name or name.startswith(("seed", "warm_", ".")):
                raise ConfigError(f"{source}: variant name {name!r} must be a non-empty string without '/' "
                                  f"that does not start with 'seed', 'warm_' or '.'")
            if sets is None:
                variants[name] = []
            elif not isinstance(sets, list) or not all(isinstance(x, str) for x in sets):
                raise ConfigError(f"{source}: variants.{name}: expected a list of 'key=value' strings")
        seeds = d["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
                or len(set(seeds)) != len(seeds):
            raise ConfigError(f"{source}: 'seeds' must be a non-empty list of distinct integers, got {seeds!r}")
        if d["reference"] not in variants:
            raise ConfigError(f"{source}: reference {d['reference']!r} is not one of the variants ({', '.join(variants)})")
        budget = d.get("budget")
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
            raise ConfigError(f"{source}: 'budget' must be a positive integer (train.max_steps), got {budget!r}")
        spec = cls(**{k: v for k, v in d.items()}, source=source)
        if not isinstance(spec.sets, list) or not all(isinstance(x, str) for x in spec.sets):
            raise ConfigError(f"{source}: 'sets' must be a list of 'key=value' strings")
        if spec.task is None and spec.valid is None:
            raise ConfigError(f"{source}: give 'task' (the synthetic demo task) or 'valid' (a held-out file)")
        if spec.task is None and "style" in d:
            raise ConfigError(f"{source}: 'style' applies to the synthetic 'task' only (a data file has its own steps)")
        if spec.task is not None:
            from kava.data.synthetic import STYLE_CHOICES, STYLES, TASKS
            from kava.demo import DemoSizes

            if spec.task not in TASKS:
                raise ConfigError(f"{source}: task {spec.task!r}: expected one of {', '.join(sorted(TASKS))}")
            if spec.style not in STYLES:
                raise ConfigError(f"{source}: style {spec.style!r}: expected {STYLE_CHOICES}")
            if not isinstance(spec.sizes, dict):
                raise ConfigError(f"{source}: 'sizes' must map kava.demo.DemoSizes fields to values")
            bad = sorted(set(spec.sizes) - {f.name for f in fields(DemoSizes)} - {"quick"})
            if bad:
                raise ConfigError(f"{source}: sizes: unknown field(s) {', '.join(bad)}")
        if not isinstance(spec.pairs, list) or not all(
                isinstance(pr, list) and len(pr) == 2 and all(isinstance(x, str) for x in pr) for pr in spec.pairs):
            raise ConfigError(f"{source}: 'pairs' must be a list of [variant, variant] pairs, got {spec.pairs!r}")
        for a, b in spec.pairs:
            for x in (a, b):
                if x not in variants:
                    raise ConfigError(f"{source}: pairs: {x!r} is not one of the variants ({', '.join(variants)})")
            if a == b:
                raise ConfigError(f"{source}: pairs: [{a}, {b}] compares a variant with itself")
        for mode in spec.extra_modes:
            if mode not in ("cot", "direct"):
                raise ConfigError(f"{source}: extra_modes: expected 'cot' or 'direct', got {mode!r}")
        return spec

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SweepSpec":
        return cls.from_dict(read_yaml_mapping(path, "sweep spec"), source=str(path))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}
        return {k: v for k, v in d.items() if not (k in _SPEC_KEY_NEWER and v == _SPEC_KEY_NEWER[k])}

    def demo_sizes(self):
        from kava.demo import QUICK, DemoSizes

        sizes = dict(self.sizes)
        base = QUICK if sizes.pop("quick", False) else DemoSizes()
        return replace(base, task=self.task, **sizes)


# ---- planning ----------------------------------------------------------------------------------------

def base_config(spec: SweepSpec) -> KavaConfig:
    from kava.train import preset_path

    p = Path(spec.base)
    path = p if p.suffix in (".yaml", ".yml") or p.is_file() else preset_path(spec.base)
    cfg = KavaConfig.from_yaml(path)
    if spec.budget is not None:
        cfg = cfg.override([f"train.max_steps={spec.budget}"])
    return cfg


def variant_config(spec: SweepSpec, name: str, seed: int, task_files=None) -> KavaConfig:
    sets = [f"train.seed={seed}"]
    if task_files is not None:
        sets += [f"model.name_or_path={task_files.model_dir}", f"data.train_path={task_files.train}"]
    try:
        return base_config(spec).override([*sets, *spec.sets, *spec.variants[name]]).resolved()
    except ConfigError as e:
        raise ConfigError(f"{spec.source}: variant {name!r}: {e}") from None


def warm_key(cfg: KavaConfig) -> Optional[str]:
    """What the teacher-only curriculum steps depend on (None: nothing to share)."""
    from kava.config import iter_fields, config_value

    if cfg.train.curriculum_cot_steps <= 0 or cfg.method not in _LATENT_METHODS:
        return None
    kept = {}
    for key, *_ in iter_fields():
        free = (key.startswith(_WARM_FREE_PREFIXES) and key not in _WARM_NOT_FREE) or key in _WARM_FREE_KEYS
        if not free and key != "method":
            value = config_value(cfg, key)
            if key not in _WARM_KEY_NEWER or value != _WARM_KEY_NEWER[key]:
                kept[key] = value
    return json.dumps(kept, sort_keys=True, default=str)


@dataclass
class Job:
    kind: str                  # "warm" or "run"
    seed: int
    name: str                  # variant name, or the warm start's directory name
    run_dir: Path
    config: dict
    warm: Optional[str] = None  # run jobs: the warm start they branch off (its name)


def plan(spec: SweepSpec, out: Path) -> list[Job]:
    """Every job of the sweep (warm starts first); prepares each seed's task on the way."""
    jobs: list[Job] = []
    for seed in spec.seeds:
        seed_dir = out / f"seed{seed}"
        files = None
        if spec.task is not None:
            from kava.demo import prepare_task

            files = prepare_task(seed_dir, seed, spec.demo_sizes(), style=spec.style)
        cfgs = {name: variant_config(spec, name, seed, files) for name in spec.variants}
        groups: dict[str, list[str]] = {}
        for name, cfg in cfgs.items():
            key = warm_key(cfg)
            if key is not None:
                groups.setdefault(key, []).append(name)
        warm_of: dict[str, str] = {}
        for key, names in groups.items():
            if len(names) < 2:
                continue
            warm = "warm_" + hashlib.sha256(key.encode()).hexdigest()[:10]
            jobs.append(Job("warm", seed, warm, seed_dir / warm, cfgs[names[0]].to_dict()))
            warm_of.update({n: warm for n in names})
        for name, cfg in cfgs.items():
            jobs.append(Job("run", seed, name, seed_dir / name, cfg.to_dict(), warm=warm_of.get(name)))
    return jobs


def extends(new: dict, old: dict) -> bool:
    """``new`` keeps every key, variant and seed of ``old`` and only adds variants or seeds.

    The finished runs of ``old`` are then runs of ``new`` too (their configs are still checked one by one).
    """
    same = all(new.get(k) == old.get(k) for k in set(new) | set(old) if k not in ("variants", "seeds", "pairs"))
    kept = all(new["variants"].get(name) == sets for name, sets in old["variants"].items())
    return same and kept and set(old["seeds"]) <= set(new["seeds"])


def check_trained_configs(jobs: list[Job], ignore: tuple[str, ...] = ()) -> None:
    """Refuse runs (and warm starts) already on disk under another resolved config, e.g. after a preset changed."""
    for j in jobs:
        saved = j.run_dir / "config.yaml"
        if saved.exists():
            had = KavaConfig.from_yaml(saved).to_dict()
            keys = [f"{sec}.{k}" for sec, v in j.config.items() if isinstance(v, dict)
                    for k in v if had.get(sec, {}).get(k) != v[k]]
            keys += [k for k, v in j.config.items() if not isinstance(v, dict) and had.get(k) != v]
            keys = [k for k in keys if k not in ignore]
            if keys:
                raise ConfigError(f"{saved}: trained with another config than the spec now gives "
                                  f"(differs in {', '.join(keys)}); use another --output or delete {j.run_dir}")


def started(run_dir: Path) -> bool:
    """Trained, or a checkpoint written (complete or not: this only orders the runs)."""
    from kava.checkpoint import step_dirs

    return (run_dir / "DONE").exists() or bool(step_dirs(run_dir))


def held_out_path(spec: SweepSpec, seed_dir: Path, split: str) -> Path:
    if spec.task is not None:
        return seed_dir / "data" / f"{split}.jsonl"
    path = getattr(spec, split)
    if path is None:
        raise ConfigError(f"{spec.source}: no '{split}' file given")
    return Path(path)


# ---- running (in worker processes) ------------------------------------------------------------------

def _init_worker(threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)


def warm_done(job: Job) -> Optional[Path]:
    from kava.checkpoint import latest_checkpoint, step_dir_name

    cfg = KavaConfig.from_dict(job.config)
    done = job.run_dir / "checkpoints" / step_dir_name(cfg.train.curriculum_cot_steps)
    return done if latest_checkpoint(job.run_dir) == done else None


def run_warm(job: Job) -> str:
    """The teacher-only curriculum steps of a group, trained once (an interrupted one resumes from its checkpoint)."""
    from kava.checkpoint import latest_checkpoint, step_of
    from kava.train import run_training

    if warm_done(job) is not None:
        return job.name
    cfg = KavaConfig.from_dict(job.config)
    steps = cfg.train.curriculum_cot_steps
    last = latest_checkpoint(job.run_dir)
    reached = step_of(last) if last is not None else 0
    if last is not None and reached < steps:
        run_training(cfg, job.run_dir, resume=last, stop_after_steps=steps - reached)  # bit-exact resume
        return job.name
    if job.run_dir.exists():  # nothing to resume from (or past the curriculum: another config wrote it)
        shutil.rmtree(job.run_dir)
    run_training(cfg, job.run_dir, stop_after_steps=steps)
    return job.name


def train_run(job: Job, warm_checkpoint: Optional[Path]) -> Path:
    """Train one variant to its last step (resume if interrupted) and mark it DONE."""
    from kava.checkpoint import latest_checkpoint, step_dir_name
    from kava.train import run_training

    cfg = KavaConfig.from_dict(job.config)
    marker = job.run_dir / "DONE"
    final = job.run_dir / "checkpoints" / step_dir_name(cfg.train.max_steps)
    if marker.exists():
        # The run's own final checkpoint, wherever the sweep directory is now (older markers held a cwd-relative path).
        if not final.is_dir():
            raise FileNotFoundError(f"{marker}: marks the run trained, but its final checkpoint {final} is missing")
        return final
    if latest_checkpoint(job.run_dir) is not None:
        final = run_training(cfg, job.run_dir, resume=job.run_dir)
    else:
        final = run_training(cfg, job.run_dir, init_from=warm_checkpoint)
    if final.name != step_dir_name(cfg.train.max_steps):
        raise RuntimeError(f"{job.run_dir}: training stopped early at {final}; run the sweep again to resume it")
    marker.write_text(str(final.relative_to(job.run_dir)) if final.is_relative_to(job.run_dir) else str(final))
    return final


def evaluate_run(job: Job, final: Path, split: str, held_out: Path, extra_modes: list[str]) -> dict:
    """Score a finished run on one held-out split; writes result_{split}.json and the predictions."""
    from kava.data.formats import load_examples
    from kava.evaluate import evaluate, load_checkpoint, resolve_mode

    cfg = KavaConfig.from_dict(job.config)
    model = load_checkpoint(final)
    examples = load_examples(str(held_out)).examples
    primary = resolve_mode(cfg.method, "latent")
    result: dict[str, Any] = {"variant": job.name, "seed": job.seed, "split": split, "held_out": str(held_out),
                              "checkpoint": str(final), "primary_mode": primary, "modes": {}}
    for mode in [primary, *[m for m in extra_modes if m != primary]]:
        rep, preds = evaluate(model, examples, mode=mode, batch_size=cfg.eval.batch_size, progress=False)
        result["modes"][mode] = rep.as_dict()
        with (job.run_dir / f"predictions_{split}_{mode}.jsonl").open("w") as fh:
            for p in preds:
                fh.write(json.dumps(p.as_dict()) + "\n")
    tmp = job.run_dir / f"result_{split}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(job.run_dir / f"result_{split}.json")  # atomic: a result file is always whole
    return result


def run_job(job: Job, warm_checkpoint: Optional[Path], split: str, held_out: Path, extra_modes: list[str]) -> str:
    already = (job.run_dir / "DONE").exists()
    t0 = time.perf_counter()
    final = train_run(job, warm_checkpoint)
    train_s = time.perf_counter() - t0
    res = evaluate_run(job, final, split, held_out, extra_modes)
    res["already_trained"] = already
    timing = job.run_dir / "sweep_timing.json"  # wall seconds of each call that trained (a resumed run has several)
    calls = json.loads(timing.read_text())["train_calls_s"] if timing.exists() else []
    if not res.get("already_trained"):
        timing.write_text(json.dumps({"train_calls_s": [*calls, train_s]}))
    return f"{job.seed}/{job.name}: {res['primary_mode']} {100 * res['modes'][res['primary_mode']]['accuracy']:.1f}%"


def run_sweep(spec: SweepSpec, out: Path, workers: int = 1, threads: int = 1, split: str = "valid",
              train: bool = True, partial: bool = False, seeds: Optional[list[int]] = None,
              variants: Optional[list[str]] = None) -> dict:
    """Run (or continue) every job, then write the report for ``split``; returns the report dict.

    ``train=False`` only scores and reports runs that are already trained (e.g. the test split, once).
    ``partial`` (with ``train=False``): report the variants trained at every seed and leave out the others
    (a look at a long sweep before it ends); the reference must be trained.
    ``seeds`` / ``variants``: train and report only these of the spec's seeds and variants (the reference is always
    kept, for the paired differences), e.g. the runs that decide a question first; the saved spec keeps all of
    them, and the same call without a selection trains the rest.
    """
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if seeds is not None and (not seeds or set(seeds) - set(spec.seeds)):
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: expected some of the spec's seeds "
                          f"{', '.join(map(str, spec.seeds))}")
    if variants is not None and (not variants or set(variants) - set(spec.variants)):
        raise ConfigError(f"--variants {' '.join(variants)}: expected some of the spec's variants "
                          f"{', '.join(spec.variants)}")
    for seed in spec.seeds:  # a bad override fails here, before the directory is claimed by this spec
        for name in spec.variants:
            variant_config(spec, name, seed)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "spec.yaml"
    now = json.loads(json.dumps(spec.to_dict()))
    before = yaml.safe_load(saved.read_text()) if saved.exists() else None
    if before is not None and before != now:
        if not extends(now, before):
            raise ConfigError(f"{saved}: this sweep directory holds another spec (a spec may only add variants "
                              f"or seeds to it); use another --output or delete {out}")
        log.info("sweep %s: the spec adds variants or seeds; the finished runs are kept", out)
    if before != now:
        saved.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    if seeds is not None:  # checked above, before anything was written
        spec = replace(spec, seeds=[x for x in spec.seeds if x in seeds])
    if variants is not None:
        kept = {spec.reference, *variants}
        spec = replace(spec, variants={n: v for n, v in spec.variants.items() if n in kept},
                       pairs=[p for p in spec.pairs if set(p) <= kept])
    jobs = plan(spec, out)
    # With a synthetic task the model and data paths are the sweep's own per-seed files (a moved copy differs).
    check_trained_configs(jobs, ignore=("model.name_or_path", "data.train_path") if spec.task else ())
    warm_jobs = {(j.seed, j.name): j for j in jobs if j.kind == "warm"}
    # Runs already started (a checkpoint on disk, or trained and not scored) first, so that a sweep resumed under a
    # grown spec finishes them before the new seeds; then variant by variant (all seeds of the first, then the
    # next): a sweep stopped early has whole variants.
    order = list(spec.variants)
    todo = sorted((j for j in jobs if j.kind == "run" and not (j.run_dir / f"result_{split}.json").exists()),
                  key=lambda j: (not started(j.run_dir), order.index(j.name), spec.seeds.index(j.seed)))
    left_out: list[str] = []
    if not train:
        untrained = [j for j in todo if not (j.run_dir / "DONE").exists()]
        if untrained and partial:
            left_out = [n for n in spec.variants if any(j.name == n for j in untrained)]
            if spec.reference in left_out:
                raise ConfigError(f"{out}: the reference {spec.reference!r} is not trained yet; --partial needs it")
            spec = replace(spec, variants={n: v for n, v in spec.variants.items() if n not in left_out},
                           pairs=[p for p in spec.pairs if not set(p) & set(left_out)])
            todo = [j for j in todo if j.name not in left_out]
            jobs = [j for j in jobs if j.name not in left_out]
            log.warning("sweep %s: not trained yet, left out of the report: %s", out, ", ".join(left_out))
        elif untrained:
            raise ConfigError(f"{out}: not trained yet: {', '.join(f'seed{j.seed}/{j.name}' for j in untrained)}; "
                              f"run the sweep without --no-train first "
                              f"(or report the finished variants with --partial)")
    log.info("sweep %s: %d runs, %d to do, %d workers", out, sum(j.kind == 'run' for j in jobs), len(todo), workers)

    def held(j: Job) -> Path:
        return held_out_path(spec, out / f"seed{j.seed}", split)

    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        pending: dict[Future, tuple[str, Any]] = {}
        queue = list(todo)  # in order; a run leaves it when it starts
        ready_warm: dict[tuple[int, str], Path] = {}
        started_warm: set[tuple[int, str]] = set()
        for key in {(j.seed, j.warm) for j in todo if j.warm is not None and not (j.run_dir / "DONE").exists()}:
            done = warm_done(warm_jobs[key])
            if done is not None:
                ready_warm[key] = done

        def next_job() -> Optional[tuple[str, Job]]:
            """The first run in order that can start, or the warm start of the first one that waits for it: jobs
            go to the pool one per free worker, so runs start in order (a queue filled up front would let runs
            without a warm start overtake every run that waits for one)."""
            for j in queue:
                key = (j.seed, j.warm)
                if j.warm is None or (j.run_dir / "DONE").exists() or key in ready_warm:
                    queue.remove(j)
                    return "run", j
                if key not in started_warm:
                    started_warm.add(key)
                    return "warm", warm_jobs[key]
            return None

        def fill() -> None:
            while len(pending) < max(1, workers) and (job := next_job()) is not None:
                kind, j = job
                fut = pool.submit(run_warm, j) if kind == "warm" else pool.submit(
                    run_job, j, ready_warm.get((j.seed, j.warm)), split, held(j), spec.extra_modes)
                pending[fut] = job

        failures = []
        fill()
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                kind, j = pending.pop(fut)
                err = fut.exception()
                if err is not None:
                    failures.append(f"seed{j.seed}/{j.name}: {type(err).__name__}: {err}")
                    log.error("sweep: %s failed: %s", j.name, err)
                    if kind == "warm":
                        queue[:] = [w for w in queue if (w.seed, w.warm) != (j.seed, j.name)]
                    continue
                if kind == "warm":
                    ready_warm[(j.seed, j.name)] = warm_done(j)
                else:
                    log.info("sweep: %s", fut.result())
            fill()
        if failures:
            raise SweepError("sweep: failed runs (finished ones are kept; run the sweep again to retry):\n  "
                               + "\n  ".join(failures))
    return write_report(spec, out, split, [j for j in jobs if j.kind == "run"], left_out)


# ---- the report -------------------------------------------------------------------------------------

def _outcomes(run_dir: Path, split: str, mode: str) -> list[bool]:
    rows = [json.loads(x) for x in (run_dir / f"predictions_{split}_{mode}.jsonl").read_text().splitlines() if x.strip()]
    rows.sort(key=lambda r: r["index"])
    return [bool(r["correct"]) for r in rows]


def compare(spec: SweepSpec, results: dict[tuple[str, int], dict], outcomes: dict[tuple[str, int], list[bool]]) -> dict:
    """Per variant: accuracy per seed, mean and spread, and the paired comparison with the reference."""
    import numpy as np

    report: dict[str, Any] = {"reference": spec.reference, "seeds": spec.seeds, "variants": {}}
    for name in spec.variants:
        vs_ref = paired_difference(spec, name, spec.reference, outcomes) if name != spec.reference else None
        per_seed = {}
        for seed in spec.seeds:
            r = results[(name, seed)]
            rep = r["modes"][r["primary_mode"]]
            per_seed[seed] = {"accuracy": rep["accuracy"], "ci95": rep["ci95"], "n": rep["n"],
                              "forward_passes_mean": rep["forward_passes_mean"], "mode": r["primary_mode"],
                              "other_modes": {m: v["accuracy"] for m, v in r["modes"].items() if m != r["primary_mode"]},
                              **(vs_ref["per_seed"][seed] if vs_ref else {})}
        accs = [per_seed[s]["accuracy"] for s in spec.seeds]
        entry: dict[str, Any] = {"sets": spec.variants[name], "per_seed": per_seed, "mean": float(np.mean(accs)),
                                 "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                                 "forward_passes_mean": float(np.mean([per_seed[s]["forward_passes_mean"] for s in spec.seeds]))}
        if vs_ref:
            entry.update(pooled_diff=vs_ref["pooled_diff"], pooled_diff_ci95=vs_ref["pooled_diff_ci95"])
        report["variants"][name] = entry
    report["pairs"] = [paired_difference(spec, a, b, outcomes) for a, b in spec.pairs]
    return report


def paired_difference(spec: SweepSpec, a: str, b: str, outcomes: dict[tuple[str, int], list[bool]]) -> dict:
    """``a`` - ``b`` on the same questions: per seed (bootstrap CI, McNemar p) and pooled over the seeds."""
    from kava.stats import paired_bootstrap_ci, paired_summary

    per_seed = {seed: paired_summary(outcomes[(a, seed)], outcomes[(b, seed)], seed=seed) for seed in spec.seeds}
    d, lo, hi = paired_bootstrap_ci([(outcomes[(a, s)], outcomes[(b, s)]) for s in spec.seeds])
    return {"a": a, "b": b, "per_seed": per_seed, "pooled_diff": d, "pooled_diff_ci95": [lo, hi]}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _delta_cell(r: dict) -> str:
    return f"{100 * r['diff']:+.1f} [{100 * r['diff_ci95'][0]:+.1f}, {100 * r['diff_ci95'][1]:+.1f}] p={r['mcnemar_p']:.2g}"


def format_report(spec: SweepSpec, report: dict, split: str) -> str:
    ref = spec.reference
    task = f", task `{spec.task}`" + (f" ({spec.style} CoT)" if spec.style != "equations" else "") if spec.task else ""
    lines = [f"# Sweep report ({split} split)", "",
             f"Base `{spec.base}`" + task
             + (f", budget {spec.budget} steps" if spec.budget else "") + f"; seeds {', '.join(map(str, spec.seeds))}; "
             f"reference `{ref}`. Accuracy % (primary mode of each method); paired differences against `{ref}` on "
             "the same questions: 95% paired bootstrap CI over questions, exact McNemar p.", "",
             "| variant | " + " | ".join(f"seed {s}" for s in spec.seeds) + " | mean ± sd | fwd/q | "
             + " | ".join(f"Δ seed {s} [CI] p" for s in spec.seeds) + " | Δ pooled [95% CI] |",
             "|---" * (3 + 2 * len(spec.seeds)) + "|---|"]
    for name, v in report["variants"].items():
        accs = " | ".join(_pct(v["per_seed"][s]["accuracy"]) for s in spec.seeds)
        if name == ref:
            deltas = " | ".join("" for _ in spec.seeds) + " | (reference)"
        else:
            deltas = " | ".join(_delta_cell(v["per_seed"][s]) for s in spec.seeds)
            lo, hi = v["pooled_diff_ci95"]
            deltas += f" | **{100 * v['pooled_diff']:+.1f}** [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        spread = f"{_pct(v['mean'])} ± {_pct(v['std'])}" if len(spec.seeds) > 1 else f"{_pct(v['mean'])} (1 seed)"
        lines.append(f"| {name} | {accs} | {spread} | {v['forward_passes_mean']:.1f} | {deltas} |")
    if report.get("pairs"):
        lines += ["", "Other pairs, paired on the same questions:", "",
                  "| pair | " + " | ".join(f"Δ seed {s} [CI] p" for s in spec.seeds) + " | Δ pooled [95% CI] |",
                  "|---" * (2 + len(spec.seeds)) + "|"]
        for pr in report["pairs"]:
            cells = " | ".join(_delta_cell(pr["per_seed"][s]) for s in spec.seeds)
            lo, hi = pr["pooled_diff_ci95"]
            lines.append(f"| `{pr['a']}` − `{pr['b']}` | {cells} | **{100 * pr['pooled_diff']:+.1f}** "
                         f"[{100 * lo:+.1f}, {100 * hi:+.1f}] |")
    other = [(name, s, m, a) for name, v in report["variants"].items() for s in spec.seeds
             for m, a in v["per_seed"][s]["other_modes"].items()]
    if other:
        lines += ["", "Other modes: " + "; ".join(f"{n} seed {s} {m} {_pct(a)}" for n, s, m, a in other) + "."]
    vs = [(name, m, d) for name, v in report["variants"].items() for m, d in v.get("vs_modes", {}).items()]
    if vs:
        lines += ["", "Each variant's primary mode against its other modes, paired on the same questions (against "
                  "`direct`: what the latent positions add to the same model's answer):", "",
                  "| variant | primary − mode | " + " | ".join(f"Δ seed {s} [CI] p" for s in spec.seeds)
                  + " | Δ pooled [95% CI] |", "|---|---|" + "---|" * len(spec.seeds) + "---|"]
        for name, m, d in vs:
            lines.append(f"| {name} | − {m} | " + " | ".join(_delta_cell(d["per_seed"][s]) for s in spec.seeds)
                         + f" | **{100 * d['pooled_diff']:+.1f}** [{100 * d['pooled_diff_ci95'][0]:+.1f}, "
                         f"{100 * d['pooled_diff_ci95'][1]:+.1f}] |")
    lines += ["", "Last logged training metrics, mean over seeds (the KV loss is logged for every latent method, "
              "trained or not):", "", "| variant | " + " | ".join(TRAIN_METRICS) + " |",
              "|---" * (1 + len(TRAIN_METRICS)) + "|"]
    for name, v in report["variants"].items():
        rows = [v["per_seed"][s].get("final_train_metrics", {}) for s in spec.seeds]
        cells = []
        for k in TRAIN_METRICS:
            xs = [r[k] for r in rows if k in r]
            cells.append(f"{sum(xs) / len(xs):.4g}" if len(xs) == len(rows) else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Overrides per variant: " + "; ".join(f"`{n}`: {' '.join(v['sets']) or '(none)'}"
                                                       for n, v in report["variants"].items()) + "."]
    if report.get("left_out"):
        lines += ["", "**Partial report**: not trained yet, left out: " + ", ".join(f"`{n}`" for n in report["left_out"]) + "."]
    lines += ["", f"![accuracy per variant](report_{split}.png)"]
    return "\n".join(lines) + "\n"


def curve_groups(report: dict) -> dict[str, list[tuple[int, str]]]:
    """Variants that differ only in train.max_steps, as learning curves: label -> [(steps, variant)], sorted."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for name, v in report["variants"].items():
        label = " ".join(s for s in v["sets"] if not s.startswith("train.max_steps=")) or "(base)"
        groups.setdefault(label, []).append((v["max_steps"], name))
    return {k: sorted(g) for k, g in groups.items()}


def plot_report(spec: SweepSpec, report: dict, path: Path) -> bool:
    """Bars: mean accuracy per variant with each seed as a dot; beside them, when variants differ in
    train.max_steps, accuracy against optimizer steps per group of otherwise equal variants.
    False (and a warning) without matplotlib (the ``kava[plots]`` extra)."""
    from kava.optional import have_matplotlib

    if not have_matplotlib(path.name):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    curves = curve_groups(report) if len({v["max_steps"] for v in report["variants"].values()}) > 1 else {}
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(max(5, 1.2 * len(names)) + (5 if curves else 0), 3.6),
                             squeeze=False)
    ax = axes[0][0]
    if curves:
        cax = axes[0][1]
        for label, pts in curves.items():
            xs = [st for st, _ in pts]
            cax.plot(xs, [100 * report["variants"][n]["mean"] for _, n in pts], marker="o", label=label)
            for st, n in pts:
                seeds = report["variants"][n]["per_seed"].values()
                cax.scatter([st] * len(seeds), [100 * r["accuracy"] for r in seeds], color="k", s=8, zorder=3)
        cax.set_xlabel("optimizer steps (finished schedules)")
        cax.set_ylabel("accuracy %")
        cax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18))  # below: never over a point
    for i, name in enumerate(names):
        v = report["variants"][name]
        accs = [100 * v["per_seed"][s]["accuracy"] for s in spec.seeds]
        ax.bar(i, 100 * v["mean"], color="C0" if name != spec.reference else "C1", alpha=0.6)
        ax.scatter([i] * len(accs), accs, color="k", s=12, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy % (bars: mean, dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


TRAIN_METRICS = ("ce_student", "ce_teacher", "codi", "kv")


def final_train_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged training metrics of a run (TRAIN_METRICS; ``kv`` is logged even where it is not trained)."""
    last: dict = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "loss" in row:
                last = row
    return {k: last[k] for k in TRAIN_METRICS if k in last} | ({"step": last["step"]} if "step" in last else {})


def write_report(spec: SweepSpec, out: Path, split: str, runs: list[Job], left_out: list[str] = ()) -> dict:
    results, outcomes = {}, {}
    for j in runs:
        r = json.loads((j.run_dir / f"result_{split}.json").read_text())
        results[(j.name, j.seed)] = r
        outcomes[(j.name, j.seed)] = _outcomes(j.run_dir, split, r["primary_mode"])
    report = compare(spec, results, outcomes)
    for name, v in report["variants"].items():
        # The primary mode against each other mode scored at every seed (``extra_modes``), paired: with ``direct``
        # that is what the latent positions add to the same model's answer.
        runs_of = [j for j in runs if j.name == name]
        primary = results[(name, runs_of[0].seed)]["primary_mode"]
        modes = set.intersection(*(set(results[(name, j.seed)]["modes"]) for j in runs_of)) - {primary}
        v["vs_modes"] = {}
        for mode in sorted(modes):
            per = {("primary", j.seed): outcomes[(name, j.seed)] for j in runs_of}
            per.update({(mode, j.seed): _outcomes(j.run_dir, split, mode) for j in runs_of})
            v["vs_modes"][mode] = paired_difference(spec, "primary", mode, per)
    report["split"] = split
    report["left_out"] = list(left_out)
    for j in runs:
        v = report["variants"][j.name]
        v["max_steps"] = j.config["train"]["max_steps"]
        v["per_seed"][j.seed]["final_train_metrics"] = final_train_metrics(j.run_dir)
    (out / f"report_{split}.json").write_text(json.dumps(report, indent=1))
    text = format_report(spec, report, split)
    (out / f"report_{split}.md").write_text(text)
    if not plot_report(spec, report, out / f"report_{split}.png"):
        (out / f"report_{split}.md").write_text(text.replace(f"\n\n![accuracy per variant](report_{split}.png)", ""))
    print(text)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kava sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="sweep spec (YAML), or the name of one in kava's sweeps/ folder")
    p.add_argument("--output", required=True, help="sweep directory (resumable: run the same command again)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (0 = torch default)")
    p.add_argument("--split", default="valid", choices=SPLITS,
                   help="held-out split to score and report (make choices on valid; score test once, at the end)")
    p.add_argument("--no-train", action="store_true", help="only score runs that are already trained")
    p.add_argument("--partial", action="store_true",
                   help="with --no-train: report the variants trained at every seed, leave out the others")
    p.add_argument("--seeds", type=int, nargs="+", metavar="N",
                   help="train and report only these of the spec's seeds (the rest later, by the same command "
                        "without --seeds)")
    p.add_argument("--variants", nargs="+", metavar="NAME",
                   help="train and report only these of the spec's variants, and the reference")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers: must be >= 1, got {args.workers}")
    if args.partial and not args.no_train:
        p.error("--partial: only with --no-train (a training sweep reports when every run is done)")
    spec = SweepSpec.from_yaml(resolve_spec(args.spec))
    try:
        run_sweep(spec, Path(args.output), workers=args.workers, threads=args.threads, split=args.split,
                  train=not args.no_train, partial=args.partial, seeds=args.seeds,
                  variants=args.variants)
    except SweepError as e:
        print(f"kava sweep: {e}", file=sys.stderr)
        return 1
    return 0


def resolve_spec(name: str) -> Path:
    """A spec file, or the name of one shipped in kava/presets/sweeps/ (beside the presets)."""
    from kava.train import PRESETS_DIR

    p = Path(name)
    if p.is_file():
        return p
    sweeps = PRESETS_DIR / "sweeps"
    packaged = sweeps / f"{name[:-5] if name.endswith('.yaml') else name}.yaml"
    if packaged.is_file():
        return packaged
    known = sorted(x.stem for x in sweeps.glob("*.yaml"))
    raise ConfigError(f"{name}: no such sweep spec file, nor a name in {sweeps} (available: {', '.join(known) or 'none'})")


if __name__ == "__main__":
    raise SystemExit(main())
