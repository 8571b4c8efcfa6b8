"""Training: setup -> data -> loop -> validation -> checkpoint.

Reads top to bottom:

1. :func:`run_training` — the entry point: resolves the config, builds the
   :class:`~accelerate.Accelerator`, the model (sharded with FSDP2 under
   ``train.fsdp``: :mod:`kava.sharding`), the data, the optimizer and the
   schedule, resumes from a checkpoint when asked, then calls :func:`fit`.
2. :func:`prepare_data` — load, filter, report (``data_report.json``).
3. :func:`global_batch` / :func:`my_micro_batches` — the deterministic data order.
4. :func:`train_step` — one optimizer step over one global batch (gradient
   accumulation over micro-batches, clipping, the non-finite guard).
5. :func:`fit` — the loop: logging, validation, checkpoints, signals.
6. :func:`validate` — loss and accuracy on the validation examples.

Determinism. The data order is a pure function of ``(train.seed, global step)``:
epoch ``e`` is a permutation of the example indices drawn from a generator
seeded with ``seed + e``, cut into global batches of ``train.global_batch_size``
(the last one wraps around to the start of the same permutation; with
``train.group_by_length`` the permutation is first sorted by length within
megabatches of 50 global batches, and the batches are visited in a shuffled
order). Each global batch is split into micro-batches of
``train.micro_batch_size`` (with ``train.sort_micro_batches`` after sorting it
by length: :func:`sort_for_micro_batches`); with P
processes, process r takes micro-batches r, r+P, ... Before each micro-batch
the torch RNG (dropout) and the random-eviction generator are seeded from
``(seed, step, micro-batch index)``. So resuming from a checkpoint, or running
on a different number of processes, sees the same examples with the same
random draws.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kava import sharding
from kava.checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_checkpoint_weights,
    resolve_resume,
    save_checkpoint,
    step_dir_name,
)
from kava.config import ConfigError, KavaConfig
from kava.data import Example
from kava.data.collate import SegmentCache, SegmentStore, batches_from_segments
from kava.data.collate import make_batches as collate_examples
from kava.data.filters import apply_filters, format_counts
from kava.data.formats import BENCHMARKS, DataError, load_examples, parse_split
from kava.losses import LossShares

# The presets ship inside the package (kava/presets/*.yaml, sweep specs in kava/presets/sweeps/), so that an
# installed wheel has them too.
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


class TrainingAborted(RuntimeError):
    """Training stopped because too many consecutive steps had a non-finite loss or gradient norm."""


def preset_path(name: str) -> Path:
    """``kava/presets/<name>.yaml`` (shipped with the package); a ConfigError lists the presets when unknown."""
    stem = name[:-5] if name.endswith(".yaml") else name
    path = PRESETS_DIR / f"{stem}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name!r} (available: {', '.join(known) or 'none'})")
    return path


def _info(msg: str, accelerator=None) -> None:
    if accelerator is None or accelerator.is_main_process:
        from tqdm import tqdm

        tqdm.write(msg)


def _warn(msg: str, accelerator=None) -> None:
    if accelerator is None or accelerator.is_main_process:
        warnings.warn(msg, RuntimeWarning, stacklevel=2)


# ============================================================================
# 1. entry point
# ============================================================================
@dataclass
class TrainState:
    """What the loop needs to continue exactly; saved as ``train_state.json`` in every checkpoint."""

    step: int = 0  # completed optimizer steps (skipped bad steps included)
    epoch: int = 0  # epoch of the next global batch
    batch_in_epoch: int = 0  # index of the next global batch inside its epoch
    examples_seen: int = 0
    bad_steps_total: int = 0
    consecutive_bad_steps: int = 0
    overflow_steps_total: int = 0  # fp16: updates the loss scaler skipped on overflowing gradients (not bad steps)
    max_steps: int = 0
    steps_per_epoch: int = 0
    n_train: int = 0
    data_fingerprint: str = ""
    seed: int = 0
    global_batch_size: int = 0
    world_size: int = 1
    data_counts: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Run:
    """Everything the loop touches, built once by :func:`run_training`."""

    cfg: KavaConfig
    out: Path
    accelerator: Any
    model: nn.Module  # the prepared KavaModel (DDP-wrapped under several processes); forward = training_loss
    kava: nn.Module  # the plain KavaModel (with train.fsdp: the sharded one, the same object as model)
    optimizer: Any
    scheduler: Any
    train: list[Example]
    eval: list[Example]
    state: TrainState
    log: "MetricsLog"
    train_segments: SegmentStore  # train's Segments, tokenised once; every step collates from them
    train_lengths: tuple[int, ...] = ()  # teacher length per example (train.group_by_length, sort_micro_batches)
    sharded: bool = False  # train.fsdp under several processes: FSDP2 units, no DDP (kava/sharding.py)
    # train.nonfinite_guard=device: [bad steps in a row, bad steps not yet read], on the device (float32)
    bad_counts: torch.Tensor | None = None


def student_weight_at(step: int, curriculum_cot_steps: int, ramp_steps: int) -> float:
    """Weight of the student terms at 0-based ``step``: 0 during the teacher-only curriculum, then
    (k + 1) / ramp_steps on the k-th step after it until it reaches 1."""
    if step < curriculum_cot_steps:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - curriculum_cot_steps + 1) / ramp_steps)


def run_training(cfg: KavaConfig, output_dir: str | Path, resume: str | Path | None = None, *,
                 init_from: str | Path | None = None, stop_after_steps: int | None = None) -> Path:
    """Train ``cfg`` into ``output_dir``; return the final checkpoint directory.

    ``resume``: a run directory (its latest complete checkpoint) or a checkpoint directory.
    ``init_from``: branch a new run off another run's checkpoint: its weights, optimizer, schedule position,
    RNG and step, under this (different) config. Ablations share one teacher-only warm start this way;
    a variant branched at step c equals the same variant trained from scratch (tests/test_train.py).
    ``stop_after_steps``: stop (with a checkpoint) after this many steps in this call, as a
    time-boxed job would; ``--resume`` continues with the same schedule and data order.
    SIGTERM / SIGINT finish the current step, save a checkpoint and return it.
    """
    from kava.model import KavaModel

    cfg = cfg.resolved()
    if cfg.method == "nocot" and cfg.train.curriculum_cot_steps > 0:
        raise ConfigError("train.curriculum_cot_steps must be 0 for method=nocot (it has no CoT teacher to warm up)")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if resume is not None and init_from is not None:
        raise ConfigError("give either resume or init_from, not both")
    checkpoint = resolve_resume(resume) if resume is not None else None
    branch = resolve_resume(init_from) if init_from is not None else None
    if checkpoint is None and latest_checkpoint(out) is not None:
        raise ConfigError(f"{out} already holds checkpoints of an earlier run; resume it (--resume {out}) or choose a new output dir")

    accelerator = make_accelerator(cfg)
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("accelerate's FSDP plugin (accelerate launch --use_fsdp) is not supported: its checkpoints "
                          "and validation would be rank 0's shard; set train.fsdp=true instead (kava shards with "
                          "FSDP2 itself) and launch with torchrun or accelerate launch without --use_fsdp")
    sharded = cfg.train.fsdp and accelerator.num_processes > 1
    if cfg.train.fsdp and not sharded:
        _info("train.fsdp=true with one process: nothing to shard, the model trains whole", accelerator)
    if accelerator.is_main_process:
        cfg.to_yaml(out / "config.yaml")
    kava = KavaModel.from_config(cfg)  # initial LoRA / projection values drawn from train.seed
    encoder = SegmentCache(kava.encoder)  # one tokenisation per example: the length filter's is trained on
    train, evals, report = prepare_data(cfg, encoder, accelerator)
    train_segments = encoder.store(train)  # aligned with train; every step collates from it
    if accelerator.is_main_process:
        (out / "data_report.json").write_text(json.dumps(report, indent=1))
    if cfg.method == "cot":  # the latent machinery is unused: keep it out of the optimizer
        kava.projection.requires_grad_(False)

    kava.to(accelerator.device)
    source = checkpoint or branch
    if source is not None:
        # The weights first, on every rank, into the whole model: sharding then keeps each rank's slice of them.
        load_checkpoint_weights(source, kava, branch=branch is not None)
    if sharded:
        sharding.shard(kava, accelerator.device)  # before the optimizer, which must hold the sharded parameters
    on_device = guard_on_device(cfg, accelerator)
    optimizer = build_optimizer(cfg, kava, fused=on_device)
    if cfg.uses_latents and not cfg.uses_projection:
        # Jacobi with T = 0 never reads prj. Frozen, DDP does not wait for its gradients (it would raise on the
        # second step); kept in the optimizer (no gradient, no update), so the parameter groups, and thus
        # checkpoints and --init-from, are the same as with T > 0.
        kava.projection.requires_grad_(False)
    steps_per_epoch = math.ceil(len(train) / cfg.train.global_batch_size)
    max_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    scheduler = build_scheduler(cfg, optimizer, max_steps)
    micro_total = cfg.train.global_batch_size // cfg.train.micro_batch_size
    if micro_total % accelerator.num_processes:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size}: its {micro_total} micro-batches of "
            f"{cfg.train.micro_batch_size} cannot be shared evenly by {accelerator.num_processes} processes"
        )

    state = TrainState(max_steps=max_steps, steps_per_epoch=steps_per_epoch, n_train=len(train),
                       data_fingerprint=fingerprint(train), seed=cfg.train.seed,
                       global_batch_size=cfg.train.global_batch_size, world_size=accelerator.num_processes,
                       data_counts=report["train"]["filters"])
    if sharded:  # no DDP around a sharded model: accelerate prepares the optimizer only
        model, optimizer = kava, accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(kava, optimizer)  # KavaModel.forward is training_loss
    if source is not None:
        # The optimizer state after prepare (and after sharding): into the optimizer that trains.
        set_optimizer_state = None
        if sharded:
            set_optimizer_state = functools.partial(sharding.load_optimizer_state, kava, optimizer.optimizer)
        saved = TrainState.from_dict(load_checkpoint(source, kava, optimizer, scheduler, branch=branch is not None,
                                                     scaler=accelerator.scaler, weights=False,
                                                     set_optimizer_state=set_optimizer_state))
        check_resumable(saved, state, source)
        if branch is not None and saved.step >= max_steps:
            raise CheckpointError(f"{source}: checkpoint is at step {saved.step}, not before this run's last step {max_steps}")
        state = TrainState(**{**asdict(saved), "max_steps": max_steps, "world_size": accelerator.num_processes})
        _info(f"{'resumed' if checkpoint else 'branched'} from {source} at step {state.step}/{max_steps}", accelerator)
        if branch is not None and accelerator.is_main_process:
            (out / "init_from.json").write_text(json.dumps({"checkpoint": str(branch.resolve()), "step": state.step}))

    run = Run(cfg=cfg, out=out, accelerator=accelerator, model=model, kava=kava, optimizer=optimizer,
              scheduler=scheduler, train=train, eval=evals, state=state, train_segments=train_segments,
              train_lengths=(tuple(s.teacher_len for s in train_segments)
                             if cfg.train.group_by_length or cfg.train.sort_micro_batches else ()),
              log=MetricsLog(out, accelerator.is_main_process, cfg.train.tensorboard, resume_step=state.step if checkpoint else None),
              sharded=sharded)
    if on_device:
        run.bad_counts = torch.tensor([float(state.consecutive_bad_steps), 0.0], device=accelerator.device)
    try:
        return fit(run, stop_after_steps=stop_after_steps)
    finally:
        run.log.close()


def make_accelerator(cfg: KavaConfig):
    """Accelerator with the configured mixed precision (``auto``: bf16 on a GPU that has it, else none)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # Steps that leave parameters unused (teacher-only curriculum, cot, nocot) need DDP to look for them.
    unused = not cfg.uses_latents or cfg.train.curriculum_cot_steps > 0
    # Several processes (torchrun / accelerate launch) and no GPU: accelerate needs cpu=True to use gloo.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=mp, cpu=cpu,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)])


def guard_on_device(cfg: KavaConfig, accelerator) -> bool:
    """Whether ``train.nonfinite_guard`` skips bad steps on the device (fused AdamW's ``found_inf``): ``auto`` is
    on for CUDA, where a host read stalls the launch queue, and off on CPU, with fp16 (its loss scaler skips
    steps itself) and with FSDP2 (untested)."""
    guard = cfg.train.nonfinite_guard
    if guard != "auto":
        return guard == "device"
    return accelerator.device.type == "cuda" and accelerator.scaler is None and not cfg.train.fsdp


def build_optimizer(cfg: KavaConfig, model: nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only (LoRA, new-token rows, projection; or all for full FT).

    With ``train.weight_decay_scope=matrices`` (as HF Trainer, which CODI and PCCoT use) biases, norm
    weights (every tensor of fewer than 2 dims) and the trainable new-token rows are not decayed.
    ``fused``: torch's fused kernel (HF Trainer's default optimizer since torch 2.8; the same update, other
    rounding), which can skip a step on a device flag (:func:`step_unless`).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("nothing to train: no parameter requires a gradient (check lora.*)")
    t = cfg.train
    if t.weight_decay_scope == "all":
        groups = [{"params": [p for _, p in named], "weight_decay": t.weight_decay}]
    else:
        decayed = [p for n, p in named if not is_decay_exempt(n, p)]
        exempt = [p for n, p in named if is_decay_exempt(n, p)]
        groups = [g for g in ({"params": decayed, "weight_decay": t.weight_decay},
                              {"params": exempt, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                             fused=True if fused else None)


def step_unless(optimizer, skip: torch.Tensor) -> None:
    """One fused-AdamW step that leaves the weights, both moments and the step count as they are where ``skip``
    (a device bool) is set: torch's ``found_inf`` protocol, as ``GradScaler`` drives it, with no host read."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    if not inner.defaults.get("fused"):
        raise RuntimeError("step_unless needs a fused AdamW (build_optimizer(..., fused=True))")
    inner.found_inf = skip.detach().float().reshape(())
    try:
        optimizer.step()
    finally:
        del inner.found_inf


def is_decay_exempt(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights and peft's trainable new-token rows get no weight decay."""
    return param.dim() < 2 or "trainable_tokens" in name


def build_scheduler(cfg: KavaConfig, optimizer, max_steps: int):
    """Linear warm-up over ``ceil(warmup_ratio * max_steps)`` steps, then cosine to ``lr * min_lr_ratio``."""
    warmup = math.ceil(cfg.train.warmup_ratio * max_steps)
    floor = cfg.train.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_resumable(saved: TrainState, now: TrainState, checkpoint: Path) -> None:
    """The data order can only continue if the data, the seed and the global batch are the same."""
    for key in ("seed", "global_batch_size"):
        if getattr(saved, key) != getattr(now, key):
            raise CheckpointError(f"{checkpoint}: checkpoint has train.{key}={getattr(saved, key)} but this run has "
                                  f"{getattr(now, key)}; the data order would not continue")
    if (saved.n_train, saved.data_fingerprint) != (now.n_train, now.data_fingerprint):
        raise CheckpointError(f"{checkpoint}: the training data differ from the checkpoint's ({saved.n_train} examples, "
                              f"fingerprint {saved.data_fingerprint}; now {now.n_train}, {now.data_fingerprint})")


# ============================================================================
# 2. data
# ============================================================================
def _load(cfg: KavaConfig, path: str, split: str, fmt: str):
    d = cfg.data
    local = Path(path).expanduser().exists()
    hub_config = next((c for hub, c, _, _ in BENCHMARKS.values() if hub.lower() == path.lower()), None)
    if local and parse_split(split, "split") is None:
        split = None  # a local file is read whole unless a row slice of it is asked for
    return load_examples(
        path, format=fmt, split=split, hub_config=None if local else hub_config,
        question_field=d.question_field, answer_field=d.answer_field, cot_field=d.cot_field,
        cot_style=d.cot_style, skip_bad_rows=d.skip_bad_rows,
    )


def prepare_data(cfg: KavaConfig, encoder, accelerator=None) -> tuple[list[Example], list[Example], dict]:
    """Load and filter the training (and validation) examples. -> (train, eval, report).

    Drop Last, numeric answers and the ``data.max_tokens`` length limit (teacher sequence
    length) are applied to both; ``data.max_examples`` cuts the training rows before the
    filters, ``data.eval_max_examples`` the validation examples after them. The validation
    file's format is guessed (``auto``); ``data.format`` names the training file's.
    """
    d = cfg.data

    def count_tokens(ex: Example) -> int:
        return encoder.segments(ex).teacher_len

    def one(name: str, path: str, split: str, fmt: str, cut: int, cut_after: bool):
        # Rank 0 downloads a hub dataset (into the datasets cache) first; the others then read that cache.
        with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
            loaded = _load(cfg, path, split, fmt)
        rows = loaded.examples
        if cut and not cut_after:
            rows = rows[:cut]
        kept, counts = apply_filters(rows, drop_last_step=d.drop_last_step, max_tokens=d.max_tokens,
                                     count_tokens=count_tokens)
        if cut and cut_after:
            kept = kept[:cut]
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(loaded.skipped.items())) or "none"
        _info(f"data[{name}]: {loaded.source} ({loaded.format}): {len(loaded.examples)} rows loaded, skipped: {skipped}", accelerator)
        _info(f"data[{name}]: filters: {format_counts(counts)}" + (f"; using {len(kept)}" if cut else ""), accelerator)
        if not kept:
            raise DataError(f"{loaded.source}: no {name} examples left after filtering ({format_counts(counts)}); "
                            "raise data.max_tokens or check the answers")
        report = {"source": loaded.source, "format": loaded.format, "rows_loaded": len(loaded.examples),
                  "skipped": dict(loaded.skipped), "filters": counts, "used": len(kept)}
        return kept, report

    train, train_report = one("train", d.train_path, d.train_split, d.format, d.max_examples, cut_after=False)
    evals, eval_report = [], None
    if d.eval_path:
        evals, eval_report = one("eval", d.eval_path, d.eval_split, "auto", d.eval_max_examples, cut_after=True)
    check_crop_budget(cfg, train, encoder)
    return train, evals, {"train": train_report, "eval": eval_report}


def check_crop_budget(cfg: KavaConfig, examples: list[Example], encoder) -> None:
    """``crop`` keeps the first M CoT tokens: every CoT must have at least M tokens."""
    if cfg.eviction.method != "crop" or not cfg.uses_latents or cfg.loss.alpha_kv == 0:
        return
    m = cfg.latent.num_tokens
    lengths = [len(encoder.segments(ex).cot) for ex in examples]
    short = [n for n in lengths if n < m]
    if short:
        raise ConfigError(
            f"latent.num_tokens={m} is larger than the CoT of {len(short)} of {len(lengths)} training examples "
            f"(shortest: {min(short)} tokens) with eviction.method=crop: the crop budget exceeds the CoT; "
            "lower latent.num_tokens or use another eviction.method"
        )


def fingerprint(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.question, ex.steps, ex.answer]).encode())
    return h.hexdigest()[:16]


# ============================================================================
# 3. data order
# ============================================================================
LENGTH_GROUP_BATCHES = 50  # global batches per megabatch with train.group_by_length, as HF's LengthGroupedSampler
BATCH_ORDER_SALT = 7919  # the batch order's generator differs from the example permutation's


def global_batch(n: int, step: int, steps_per_epoch: int, global_batch_size: int, seed: int,
                 lengths: tuple[int, ...] | None = None) -> list[int]:
    """Example indices of global step ``step`` (0-based). Pure function of its arguments.

    With ``lengths`` (one per example: ``train.group_by_length``) the epoch's permutation is cut into
    megabatches of :data:`LENGTH_GROUP_BATCHES` global batches, each sorted by length (longest first), and the
    epoch's batches are then visited in a shuffled order: an epoch still sees every example once, with less
    padding per batch, and the batch lengths do not follow the learning-rate schedule."""
    epoch, b = divmod(step, steps_per_epoch)
    order = _epoch_permutation(n, seed + epoch) if lengths is None else _length_grouped(seed + epoch, global_batch_size, lengths)
    if lengths is not None:
        b = _epoch_permutation(steps_per_epoch, seed + epoch + BATCH_ORDER_SALT)[b]
    start = b * global_batch_size
    return [order[(start + i) % n] for i in range(global_batch_size)]


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist())


@functools.lru_cache(maxsize=2)
def _length_grouped(seed: int, global_batch_size: int, lengths: tuple[int, ...]) -> tuple[int, ...]:
    perm = _epoch_permutation(len(lengths), seed)
    size = LENGTH_GROUP_BATCHES * global_batch_size
    return tuple(i for m in range(0, len(perm), size)
                 for i in sorted(perm[m:m + size], key=lambda i: -lengths[i]))  # stable: ties keep perm order


def sort_for_micro_batches(indices: list[int], lengths: tuple[int, ...], micro_batch_size: int,
                            world: int) -> list[int]:
    """``indices`` (one global batch) reordered for ``train.sort_micro_batches``: sorted by length, so each
    micro-batch pads only to its own longest example, with the micro-batches in snake order over the ``world``
    processes (row 0 dealt 0, 1, ..., P-1, row 1 back P-1, ..., 0), so that :func:`my_micro_batches`' round robin
    gives every process short and long micro-batches alike. The same examples, so the same objective up to
    the teacher-std normalisers (docs/design.md)."""
    ordered = sorted(indices, key=lambda i: lengths[i])  # stable: ties keep the batch's order
    micro = [ordered[i:i + micro_batch_size] for i in range(0, len(ordered), micro_batch_size)]
    rows = [micro[i:i + world] for i in range(0, len(micro), world)]
    return [i for r, row in enumerate(rows) for m in (row if r % 2 == 0 else row[::-1]) for i in m]


def my_micro_batches(indices: list[int], micro_batch_size: int, rank: int, world: int) -> list[tuple[int, list[int]]]:
    """(global micro-batch index, example indices) of the micro-batches process ``rank`` runs."""
    micro = [indices[i:i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]
    return [(j, micro[j]) for j in range(rank, len(micro), world)]


def micro_seed(seed: int, step: int, micro: int) -> int:
    return ((seed * 1_000_003 + step) * 10_007 + micro) % (2**62)


def make_batches(cfg: KavaConfig, encoder, examples: list[Example], device, teacher_only: bool = False):
    """(TeacherBatch | None, StudentBatch | None) for ``examples`` on ``device``: only what ``cfg.method`` uses
    (:func:`kava.data.collate.make_batches`, shared with ``KavaModel.training_loss(examples)`` and analysis)."""
    return to_device(collate_examples(examples, encoder, cfg, teacher_only), device)


def to_device(batches: tuple, device) -> tuple:
    """A (TeacherBatch | None, StudentBatch | None) pair on ``device``. To a GPU without a stream sync: a
    blocking host-to-device copy waits for every queued kernel (the previous step's update)."""
    non_blocking = torch.device(device).type == "cuda"
    return tuple(b.to(device, non_blocking=non_blocking) if b is not None else None for b in batches)


# ============================================================================
# 4. one optimizer step
# ============================================================================
@dataclass
class StepResult:
    loss: float | None  # None off logging steps: the values stay on the device (no host sync)
    grad_norm: float | None
    skipped: bool | None  # no update was applied; None: decided on the device and not read (nonfinite_guard=device)
    overflow: bool  # skipped by the fp16 loss scaler on overflowing gradients at a finite loss (not a bad step)
    metrics: dict[str, float]  # empty off logging steps
    # nonfinite_guard=device, at logging steps: (bad steps in a row, bad steps since the last read) after this one
    bad_counts: tuple[int, int] | None = None

    @property
    def logged(self) -> bool:
        """The values were read: a logging step, or a skipped one."""
        return self.loss is not None


def micro_batch_shares(cfg: KavaConfig, batches: list, accelerator) -> list[LossShares]:
    """Each micro-batch's :class:`~kava.losses.LossShares` of the step's global batch.

    ``batches``: this process's micro-batches as collated on the host, [(TeacherBatch | None, StudentBatch | None)]
    on the CPU. A share is the micro-batch's count (labelled student / teacher tokens, examples, valid KV slots)
    over that count summed over every process's micro-batches. The counts are read on the host, before the
    batches move to the device: one process needs no device work; several sum them with one all-reduce and keep
    the shares on the device (0-dim float32 tensors), so no step waits for the device here.
    """
    m = cfg.latent.num_tokens
    rows = []
    for teacher, student in batches:
        ids = teacher.input_ids if teacher is not None else student.prefix_ids  # [B, N]
        rows.append([
            student.num_labels if student is not None else 0,
            teacher.num_labels if teacher is not None else 0,
            ids.shape[0],
            # compress_kv keeps min(M, CoT length) entries of each example (host tensors: no device read)
            int(teacher.cot_valid.long().sum(-1).clamp_max(m).sum()) if teacher is not None else 0,
        ])
    local = torch.tensor(rows, dtype=torch.float64)
    if accelerator.num_processes == 1:
        total = local.sum(0)
        return [LossShares(*row) for row in torch.where(total > 0, local / total.clamp_min(1), 0.0).tolist()]
    local = local.to(accelerator.device)
    total = accelerator.reduce(local.sum(0), reduction="sum")
    shares = torch.where(total > 0, local / total.clamp_min(1), 0.0).float()  # float32(share): as a python float
    return [LossShares(*row.unbind()) for row in shares]


def train_step(run: Run, step: int) -> StepResult:
    """Forward/backward over this process's micro-batches of global batch ``step``, then one guarded update.

    Each micro-batch's loss is its share of the global batch's objective (:func:`micro_batch_shares`): CE per
    labelled token, L_CODI per example, L_KV per valid slot, so the accumulated gradient does not depend on
    ``train.micro_batch_size`` or the number of processes (up to the teacher-std normalisers, docs/design.md).

    Host syncs: the loss and the metrics stay on the device and are read at logging steps (and at skipped
    steps) in one ``.tolist()``. Off them the step reads one flag, "loss and gradient norm finite", to decide
    the update (docs/perf.md section 8), or none with ``train.nonfinite_guard=device``, which decides on the
    device and counts bad steps there; fp16 adds the loss scaler's own reads.
    """
    cfg, acc, st = run.cfg, run.accelerator, run.state
    t = cfg.train
    teacher_only = step < t.curriculum_cot_steps
    weight = student_weight_at(step, t.curriculum_cot_steps, t.curriculum_ramp_steps)
    indices = global_batch(len(run.train), step, st.steps_per_epoch, t.global_batch_size, t.seed,
                           run.train_lengths if t.group_by_length else None)
    if t.sort_micro_batches:
        indices = sort_for_micro_batches(indices, run.train_lengths, t.micro_batch_size, acc.num_processes)
    mine = my_micro_batches(indices, t.micro_batch_size, acc.process_index, acc.num_processes)
    # Tokenised once by run_training: no tokenizer call here.
    host = [batches_from_segments([run.train_segments[i] for i in idx], run.kava.encoder.pad, cfg, teacher_only)
            for _, idx in mine]
    shares = micro_batch_shares(cfg, host, acc)  # counts read on the host, before the copy to the device
    batches = [to_device(b, acc.device) for b in host]
    # Metric-only work (unsupervised iterations' KV losses, KV terms at alpha_kv = 0) runs at fit's logging steps.
    log_step = (step + 1) % t.log_every == 0 or step == 0 or step + 1 == st.max_steps
    names, metric_sum = None, None
    loss_sum = torch.zeros((), device=acc.device)
    # train.fsdp: FSDP2's own no_sync, and autocast here (accelerate wraps the forward of the models it prepares).
    no_sync, autocast = (sharding.no_sync, acc.autocast) if run.sharded else (acc.no_sync, contextlib.nullcontext)
    for k, ((j, _), (teacher, student), share) in enumerate(zip(mine, batches, shares)):
        torch.manual_seed(micro_seed(t.seed, step, j))  # dropout
        generator = torch.Generator().manual_seed(micro_seed(t.seed, step, j) + 1)  # random eviction
        sync = k == len(mine) - 1
        with contextlib.nullcontext() if sync else no_sync(run.model):
            with autocast():
                loss, metrics = run.model(teacher, student, generator, teacher_only, weight, shares=share,
                                          log_metrics=log_step)
            # The shares sum to 1 over every process's micro-batches; DDP (and FSDP's reduce-scatter) average
            # gradients over processes.
            acc.backward(loss * acc.num_processes)
        # Summed on the device (metrics are shares too); the guard reads the loss itself, not its metric.
        loss_sum = loss_sum + loss.detach().float()
        if names is None:
            names, metric_sum = metrics.names, metrics.tensor
        elif metrics.names != names:  # one config, one step: every micro-batch logs the same terms
            raise RuntimeError(f"micro-batches of step {step} returned different metrics: {names} vs {metrics.names}")
        else:
            metric_sum = metric_sum + metrics.tensor

    if run.sharded:
        sharding.reshard(run.model)  # the units stay gathered through the step's backward (kava/sharding.py)
    params = [p for p in run.model.parameters() if p.requires_grad]
    # Sharded: DTensor gradients, so the norm is the global one (the norm of the full gradient), a DTensor.
    grad_norm = acc.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
    if run.sharded and grad_norm is not None:
        grad_norm = sharding.full_tensor(grad_norm)
    grad = grad_norm.detach().float().reshape(1) if grad_norm is not None else loss_sum.new_zeros(1)
    local = torch.cat([loss_sum.reshape(1), metric_sum.to(loss_sum.device)])
    total = acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local  # a collective, no host read
    values = torch.cat([total[:1], grad, total[1:]])  # loss, grad norm, metrics
    on_device = run.bad_counts is not None  # train.nonfinite_guard=device
    # The logging step's one read (the host guard uses it too); the device guard reads after its update.
    read_values = values.tolist() if log_step and not on_device else None
    scaler = acc.scaler  # fp16 only
    if read_values is not None:
        loss_ok = math.isfinite(read_values[0])
        step_ok = loss_ok and math.isfinite(read_values[1])
    elif on_device:
        loss_ok = step_ok = None  # decided on the device, below
    elif scaler is None:
        # The host guard's one read off logging steps: update or skip (the device guard skips inside fused AdamW).
        step_ok = loss_ok = bool(torch.isfinite(values[:2]).all())
    else:
        loss_ok = bool(torch.isfinite(values[0]))  # the scaler checks the gradients itself
        step_ok = loss_ok
    extra, bad_counts = {}, None
    if on_device:
        # Skipped inside fused AdamW and counted on the device: no read. The same decision as the host guard's.
        bad = ~torch.isfinite(values[:2]).all()
        step_unless(run.optimizer, bad)
        in_a_row, unread = run.bad_counts.unbind()
        run.bad_counts = torch.stack([(in_a_row + 1) * bad, unread + bad])
        skipped, overflow = None, False  # not known on the host until a read
    elif scaler is None:
        skipped = not step_ok
        if not skipped:
            run.optimizer.step()
        overflow = False
    elif loss_ok:
        scale = scaler.get_scale()
        # The scaler skips the update itself when the (unscaled) gradients hold inf/NaN, and backs off its scale.
        run.optimizer.step()
        skipped = run.optimizer.step_was_skipped
        # At a scale <= 1 the overflow is not the scaler's doing: count it as a bad step.
        overflow = skipped and scale > 1.0
    else:
        # No update; update() still closes this step's unscale_ (clipping called it), or the next would raise.
        scaler.update()
        skipped, overflow = True, False
    run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        run.scheduler.step()  # a skipped step still uses up its place in the schedule (and its batch)
    if on_device and log_step:  # one read: the values and the device's bad-step counters
        *read_values, in_a_row, unread = torch.cat([values, run.bad_counts]).tolist()
        run.bad_counts[1] = 0  # read: the unread count starts again
        bad_counts = (int(in_a_row), int(unread))
        skipped = not (math.isfinite(read_values[0]) and math.isfinite(read_values[1]))
    if read_values is None and skipped:
        read_values = values.tolist()  # a skipped step is logged and warned about: read its values after all
    if read_values is None:
        return StepResult(loss=None, grad_norm=None, skipped=skipped, overflow=overflow, metrics={})
    if scaler is not None:
        extra["loss_scale"] = scaler.get_scale()
    loss_value, grad_value, *metric_values = read_values
    return StepResult(loss=loss_value, grad_norm=grad_value if grad_norm is not None else 0.0, skipped=skipped,
                      overflow=overflow, metrics={**dict(sorted(zip(names, metric_values))), **extra,
                                                  "student_weight": weight}, bad_counts=bad_counts)


def read_bad_counts(run: Run) -> None:
    """``train.nonfinite_guard=device``: bring the device's bad-step counters into ``run.state`` (one read), so a
    checkpoint's train_state.json has them exact."""
    if run.bad_counts is None:
        return
    in_a_row, unread = run.bad_counts.tolist()
    run.bad_counts[1] = 0
    _take_device_counts(run, int(in_a_row), int(unread))


def count_bad_steps(run: Run, res: StepResult) -> None:
    """Update the state's bad-step counters after a step, and warn of skipped ones."""
    st = run.state
    if res.bad_counts is not None:  # nonfinite_guard=device, a logging step: the device's counters were read
        _take_device_counts(run, *res.bad_counts)
    elif res.skipped is None:  # nonfinite_guard=device, off a logging step: counted on the device, not read
        return
    elif not res.skipped:
        st.consecutive_bad_steps = 0
    elif res.overflow:  # the fp16 loss scaler at work (typical in the first steps): not a bad step
        st.overflow_steps_total += 1
    else:
        st.bad_steps_total += 1
        st.consecutive_bad_steps += 1
        _warn(f"step {st.step}: non-finite loss ({res.loss}) or gradient norm ({res.grad_norm}); optimizer step "
              f"skipped ({st.consecutive_bad_steps} in a row, {st.bad_steps_total} in total)", run.accelerator)


def _take_device_counts(run: Run, in_a_row: int, unread: int) -> None:
    st = run.state
    st.bad_steps_total += unread
    st.consecutive_bad_steps = in_a_row
    if unread:
        _warn(f"step {st.step}: {unread} optimizer step(s) skipped since the last read (non-finite loss or gradient "
              f"norm, found on the device; {in_a_row} in a row, {st.bad_steps_total} in total)", run.accelerator)


# ============================================================================
# 5. the loop
# ============================================================================
def fit(run: Run, stop_after_steps: int | None = None) -> Path:
    from tqdm import tqdm

    cfg, acc, st = run.cfg, run.accelerator, run.state
    t = cfg.train
    run.model.train()
    start = st.step
    bar = tqdm(total=st.max_steps, initial=st.step, desc="train", dynamic_ncols=True, disable=not acc.is_main_process)
    last_saved: Path | None = None
    with StopSignals() as signals:
        while st.step < st.max_steps:
            tic = time.perf_counter()
            lr = run.scheduler.get_last_lr()[0]
            res = train_step(run, st.step)
            st.step += 1
            st.epoch, st.batch_in_epoch = divmod(st.step, st.steps_per_epoch)
            st.examples_seen += t.global_batch_size
            count_bad_steps(run, res)
            if res.logged:  # logging steps and skipped steps: train_step read their values
                run.log.write({"step": st.step, "epoch": st.step / st.steps_per_epoch, "lr": lr, **res.metrics,
                               "loss": res.loss, "grad_norm": res.grad_norm, "skipped": res.skipped,
                               "overflow": res.overflow, "bad_steps": st.consecutive_bad_steps,
                               "bad_steps_total": st.bad_steps_total, "overflow_steps_total": st.overflow_steps_total,
                               "examples_per_s": t.global_batch_size / max(time.perf_counter() - tic, 1e-9)})
                bar.set_postfix(loss=f"{res.loss:.4f}", lr=f"{lr:.2e}")
            bar.update(1)
            if st.consecutive_bad_steps >= t.max_bad_steps:
                bar.close()
                last = latest_checkpoint(run.out) if acc.is_main_process else None
                raise TrainingAborted(
                    f"aborted at step {st.step}: {st.consecutive_bad_steps} consecutive steps had a non-finite loss or "
                    f"gradient norm (train.max_bad_steps={t.max_bad_steps}); last good checkpoint: {last}. "
                    "Lower train.lr or check the data, then resume from that checkpoint."
                )
            if t.save_every and st.step % t.save_every == 0:
                last_saved = save(run)
            stop = signals.received is not None or (stop_after_steps is not None and st.step - start >= stop_after_steps)
            if _any_process(acc, stop) and st.step < st.max_steps:
                bar.close()
                if last_saved is None or last_saved.name != step_dir_name(st.step):
                    last_saved = save(run)
                if signals.received is not None and acc.is_main_process:
                    print(f"interrupted: checkpoint saved to {last_saved}", flush=True)
                else:
                    _info(f"stopped after {st.step - start} steps: checkpoint saved to {last_saved}", acc)
                return last_saved
            if run.eval and t.eval_every and st.step % t.eval_every == 0 and st.step < st.max_steps:
                run_validation(run)
        bar.close()
        if run.eval and signals.received is None:
            run_validation(run)
        if last_saved is None or last_saved.name != step_dir_name(st.step):
            last_saved = save(run)
    overflows = f", {st.overflow_steps_total} skipped by the fp16 loss scaler" if st.overflow_steps_total else ""
    _info(f"done: {st.step} steps, {st.bad_steps_total} skipped{overflows}; final checkpoint {last_saved}", acc)
    return last_saved


def save(run: Run) -> Path:
    """A checkpoint of the current step; every process calls it. Sharded, every process takes part in gathering
    the full weights and optimizer state onto rank 0, which writes the same files as an unsharded run."""
    acc = run.accelerator
    read_bad_counts(run)  # nonfinite_guard=device: the counters saved are the exact ones
    acc.wait_for_everyone()
    full = {}
    if run.sharded:
        full = {"model_state": sharding.full_model_state(run.kava),
                "optimizer_state": sharding.full_optimizer_state(run.kava, run.optimizer.optimizer)}
    if acc.is_main_process:
        save_checkpoint(run.out, run.state.step, acc.unwrap_model(run.model), run.optimizer, run.scheduler,
                        asdict(run.state), run.cfg.train.keep_last, scaler=acc.scaler, **full)
    acc.wait_for_everyone()
    return run.out / CHECKPOINTS / step_dir_name(run.state.step)


def _any_process(acc, flag: bool) -> bool:
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)


class StopSignals:
    """SIGTERM / SIGINT set a flag; the loop finishes the step, saves and returns. A second SIGINT raises."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step) and, optionally, TensorBoard. Main process only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        # Continue the file of the run being resumed, minus what was logged after its checkpoint.
        kept = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("train.tensorboard=true but tensorboard is not installed (pip install tensorboard); "
                              "logging to metrics.jsonl only", RuntimeWarning, stacklevel=2)
            else:
                self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ============================================================================
# 6. validation
# ============================================================================
def run_validation(run: Run) -> None:
    """Every process validates its share of the batches (:func:`validation_sums`); the sums are gathered.

    Sharded, every unit is gathered on every rank first (one collective), so each rank's forwards, whatever
    their number, need no other rank; with DDP the plain module runs, which needs none either.
    """
    from accelerate.utils import gather_object

    acc = run.accelerator
    with sharding.gathered(run.kava) if run.sharded else contextlib.nullcontext(), acc.autocast():
        part = validation_sums(run.kava, run.eval, run.cfg, seed=run.cfg.train.seed,
                               rank=acc.process_index, world=acc.num_processes)
    parts = gather_object([part]) if acc.num_processes > 1 else [part]
    if acc.is_main_process:
        metrics = combine_validation(parts)
        run.log.write({"step": run.state.step, **metrics})
        _info(f"step {run.state.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), acc)
    acc.wait_for_everyone()


@torch.no_grad()
def validate(model, examples: list[Example], cfg: KavaConfig, seed: int = 0) -> dict[str, float]:
    """Mean training loss (no dropout) and greedy accuracy on ``examples``. Keys start with ``val_``."""
    return combine_validation([validation_sums(model, examples, cfg, seed)])


@torch.no_grad()
def validation_sums(model, examples: list[Example], cfg: KavaConfig, seed: int = 0, rank: int = 0,
                    world: int = 1) -> dict:
    """Process ``rank``'s share of :func:`validate`: batches ``rank, rank + world, ...`` of ``eval.batch_size``
    examples (each seeded by its position, as in one process). -> {"n", "correct", "sums": metric * examples}."""
    from kava.evaluate import evaluate, resolve_mode

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    bs = cfg.eval.batch_size
    starts = list(range(0, len(examples), bs))[rank::world]
    sums: dict[str, float] = {}
    mine: list[Example] = []
    try:
        for i in starts:
            chunk = examples[i:i + bs]
            teacher, student = make_batches(cfg, model.encoder, chunk, device)
            _, metrics = model.training_loss(teacher, student, generator=torch.Generator().manual_seed(seed + i))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
            mine += chunk
        _, preds = evaluate(model, mine, mode=resolve_mode(cfg.method), batch_size=bs, progress=False) if mine else (None, [])
    finally:
        model.train(was_training)
    return {"n": len(mine), "correct": sum(p.correct for p in preds), "sums": sums}


def combine_validation(parts: list[dict]) -> dict[str, float]:
    """:func:`validate`'s metrics from every process's :func:`validation_sums`."""
    n = sum(p["n"] for p in parts)
    sums: dict[str, float] = {}
    for p in parts:
        for k, v in p["sums"].items():
            sums[k] = sums.get(k, 0.0) + v
    out = {f"val_{k}": v / n for k, v in sums.items()}
    out["val_accuracy"] = sum(p["correct"] for p in parts) / n if n else float("nan")
    out["val_examples"] = float(n)
    return out


# ============================================================================
# command line: ``python -m kava.train ARGS`` is ``kava train ARGS`` (one parser, kava.cli)
# ============================================================================
def main(argv: list[str] | None = None) -> int:
    """``kava train`` under another name (kept for ``torchrun -m kava.train`` and old scripts)."""
    from kava.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
