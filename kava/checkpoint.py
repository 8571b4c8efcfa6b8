"""Training checkpoints: atomic, checksummed, pickle-free.

Layout of one checkpoint (``<run>/checkpoints/step-000123/``)::

    config.yaml  kava_meta.json  tokenizer/  adapter/ | model/  projection.safetensors   <- KavaModel.save
    optimizer.safetensors  optimizer.json      tensors of optimizer.state_dict() + the rest as JSON
    scheduler.json                             scheduler.state_dict() as JSON
    scaler.json                                fp16 runs only: the GradScaler's state (loss scale, growth tracker)
    rng.safetensors  rng.json                  torch CPU/CUDA RNG (uint8 tensors), python ``random``, numpy
    train_state.json                           step, epoch, data position, bad-step counters, data counts
    COMPLETE                                   written last: {"step": ..., "files": {relative path: sha256}}

Atomicity: everything is written to ``step-000123.tmp-<pid>/``, flushed to disk, the
``COMPLETE`` marker is written last, and only then the directory is renamed with
``os.replace``. A reader (:func:`latest_checkpoint`) ignores any directory without a
``COMPLETE`` marker, or whose files do not match the checksums in it, with a warning
that names the directory. Every model loader (``KavaModel.load``, so ``kava eval``/``generate``/
``analyze``/``export``) calls :func:`verify_for_loading` first: a corrupt file is a :class:`CheckpointError`
(a ``ConfigError``: one line, exit 2 in the CLI) that names it.

Nothing here uses pickle: tensors go through safetensors, everything else through JSON.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kava.config import ConfigError, KavaConfig, config_value

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Keys that must agree between a checkpoint and the run that loads it.
MUST_MATCH = ("model.name_or_path", "latent.num_tokens", "latent.use_projection", "lora.enabled", "lora.r")
# A branch (--init-from) may change anything that does not change the parameter set.
SHAPE_KEYS = ("model.name_or_path", "latent.use_projection", "lora.enabled", "lora.r")


class CheckpointError(ConfigError):
    """A checkpoint is missing, incomplete, corrupt or does not belong to this run."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# ----------------------------------------------------------------------------
# pickle-free (de)serialisation of nested state dicts: tensors -> safetensors, rest -> JSON
# ----------------------------------------------------------------------------
def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Return a JSON-able copy of ``obj``; every tensor is moved to ``tensors`` under a fresh name."""
    if isinstance(obj, torch.Tensor):
        name = f"{prefix}.{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten_state(v, tensors, prefix) for k, v in obj.items()}
        return {"__dict__": [[flatten_state(k, tensors, prefix), flatten_state(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint without pickle")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__dict__"}:
            return {_hashable(unflatten_state(k, tensors)): unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def _hashable(x: Any) -> Any:
    return tuple(x) if isinstance(x, list) else x


def _save_state(state: Any, directory: Path, name: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten_state(state, tensors)
    save_file(tensors, directory / f"{name}.safetensors")
    (directory / f"{name}.json").write_text(json.dumps(structure))


def _load_state(directory: Path, name: str) -> Any:
    tensors = load_file(directory / f"{name}.safetensors")
    return unflatten_state(json.loads((directory / f"{name}.json").read_text()), tensors)


# ----------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------
def rng_state() -> dict:
    state: dict[str, Any] = {"torch_cpu": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        np = None
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda = state["torch_cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint has CUDA RNG state for %d devices, this machine has %d: not restored",
                        len(cuda), torch.cuda.device_count())
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached_gaussian"]))


# ----------------------------------------------------------------------------
# checksums
# ----------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(directory: str | Path) -> str | None:
    """``None`` when the checkpoint is complete and intact, else the reason it is not."""
    d = Path(directory)
    marker = d / MARKER
    if not d.is_dir():
        return "not a directory"
    if not marker.is_file():
        return f"no {MARKER} marker (the write was interrupted)"
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"unreadable {MARKER} marker"
    for rel, digest in files.items():
        p = d / rel
        if not p.is_file():
            return f"missing file {rel}"
        if _sha256(p) != digest:
            return f"checksum mismatch in {rel}"
    return None


def safetensors_problem(path: str | Path) -> str | None:
    """``None`` when a safetensors file is whole, else what is wrong with it. Reads only the header.

    A whole file is ``8-byte header length | JSON header | data``, the header's data offsets
    covering the data exactly; a truncated (or padded) file has another size.
    """
    p = Path(path)
    size = p.stat().st_size
    try:
        with p.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"truncated: {size} bytes, not even the 8-byte header length"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"truncated: the header alone should be {n} bytes, the file has {size}"
            header = json.loads(fh.read(n))
        end = 0
        for key, info in header.items():
            if key != "__metadata__":
                end = max(end, int(info["data_offsets"][1]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        return f"unreadable safetensors header ({type(e).__name__})"
    if 8 + n + end != size:
        what = "truncated" if size < 8 + n + end else "trailing bytes"
        return f"{what}: its header describes {8 + n + end} bytes, the file has {size}"
    return None


def verify_for_loading(directory: str | Path) -> None:
    """Refuse to load a checkpoint with a corrupt file: :class:`CheckpointError` naming the file.

    With a ``COMPLETE`` marker (training checkpoints, ``kava export``) every listed file must
    exist and match its sha256, as on resume. Without one (a bare :meth:`KavaModel.save`),
    every ``*.safetensors`` file must be whole (its size must match its header).
    """
    d = Path(directory)
    marker = d / MARKER
    if marker.is_file():
        try:
            files = json.loads(marker.read_text())["files"]
            items = list(files.items())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{marker}: unreadable checkpoint marker; refusing to load {d}") from None
        for rel, digest in items:
            p = d / rel
            if not p.is_file():
                raise CheckpointError(f"{p}: missing from the checkpoint (listed in {marker}); refusing to load")
            if _sha256(p) != digest:
                raise CheckpointError(f"{p}: corrupt checkpoint file (sha256 differs from the one recorded in "
                                      f"{marker} when it was written); refusing to load")
        return
    for p in sorted(d.rglob("*.safetensors")):
        problem = safetensors_problem(p)
        if problem is not None:
            raise CheckpointError(f"{p}: corrupt checkpoint file ({problem}); refusing to load")


def seal(directory: str | Path, **info: Any) -> Path:
    """Write the ``COMPLETE`` marker: ``info`` plus the sha256 of every other file, all fsynced. -> the marker."""
    d = Path(directory)
    files = _files(d)
    for p in files:
        _fsync(p)
    marker = {**info, "files": {str(p.relative_to(d)): _sha256(p) for p in files}}
    (d / MARKER).write_text(json.dumps(marker, indent=1))
    _fsync(d / MARKER)
    return d / MARKER


# ----------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------
def save_checkpoint(output_dir: str | Path, step: int, model, optimizer, scheduler, train_state: dict,
                    keep_last: int, scaler=None, *, model_state: dict | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write ``output_dir/checkpoints/step-XXXXXX`` atomically; keep the newest ``keep_last``. -> its path.

    ``model`` is the (unwrapped) :class:`kava.model.KavaModel`; ``scaler`` the fp16 loss scaler
    (``accelerator.scaler``; None without one). A sharded (``train.fsdp``) run passes the full states its
    ranks gathered (:func:`kava.sharding.full_model_state`, :func:`kava.sharding.full_optimizer_state`):
    the weights and the optimizer state are then written from them, in the same files.
    """
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    model.save(tmp, state_dict=model_state)  # model_state: a sharded run's gathered weights
    _save_state(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp, "optimizer")
    (tmp / "scheduler.json").write_text(json.dumps(flatten_state(scheduler.state_dict(), _no_tensors("scheduler"))))
    if scaler is not None and scaler.is_enabled():
        (tmp / "scaler.json").write_text(json.dumps(flatten_state(scaler.state_dict(), _no_tensors("loss scaler"))))
    _save_state(rng_state(), tmp, "rng")
    (tmp / "train_state.json").write_text(json.dumps({**train_state, "step": step}, indent=1))

    seal(tmp, step=step)

    if final.exists():  # the same step saved again (e.g. the end of a resumed, finished run)
        old = root / f"{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    _rotate(root, keep_last, keep=final)
    return final


class _no_tensors(dict):
    """A tensor sink that refuses tensors (scheduler state must be plain JSON)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def __setitem__(self, key, value):
        raise TypeError(f"{self.what} state holds a tensor; expected plain numbers")


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every ``step-N`` directory (complete or not), newest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def step_dirs(output_dir: str | Path) -> list[Path]:
    """The ``step-N`` checkpoint directories of a run (complete or not), newest first."""
    return [p for _, p in _step_dirs(Path(output_dir) / CHECKPOINTS)]


def step_of(checkpoint: str | Path) -> int:
    """N of a ``step-N`` checkpoint directory."""
    m = _STEP_DIR.match(Path(checkpoint).name)
    if m is None:
        raise CheckpointError(f"{checkpoint}: not a step-N checkpoint directory")
    return int(m.group(1))


def _rotate(root: Path, keep_last: int, keep: Path) -> None:
    complete = [p for _, p in _step_dirs(root) if (p / MARKER).is_file()]
    for p in complete[keep_last:]:
        if p != keep:
            shutil.rmtree(p, ignore_errors=True)
    # Temporary directories left by killed runs (another pid) are garbage: nothing reads them.
    for p in root.iterdir():
        if ".tmp-" in p.name and not p.name.endswith(f".tmp-{os.getpid()}"):
            log.warning("removing %s: left by an interrupted checkpoint write", p)
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------
# find / resolve
# ----------------------------------------------------------------------------
def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete, intact checkpoint under ``output_dir/checkpoints``; others are skipped with a warning."""
    for _, p in _step_dirs(Path(output_dir) / CHECKPOINTS):
        reason = verify_checkpoint(p)
        if reason is None:
            return p
        log.warning("incomplete checkpoint %s ignored: %s", p, reason)
    return None


def is_checkpoint_dir(path: Path) -> bool:
    return (path / MARKER).exists() or (path / "kava_meta.json").exists() or bool(_STEP_DIR.match(path.name))


def resolve_resume(path: str | Path) -> Path:
    """``--resume``: a run directory (-> its latest complete checkpoint) or one checkpoint directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"--resume {p}: no such directory")
    if is_checkpoint_dir(p):
        reason = verify_checkpoint(p)
        if reason is not None:
            raise CheckpointError(f"--resume {p}: incomplete or corrupt checkpoint ({reason}); refusing to resume from it")
        return p
    if (p / CHECKPOINTS).is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise CheckpointError(f"--resume {p}: no complete checkpoint under {p / CHECKPOINTS}")
        return found
    raise CheckpointError(f"--resume {p}: neither a run directory (with {CHECKPOINTS}/) nor a checkpoint directory")


# ----------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------
def check_compatible(path: Path, cfg: KavaConfig, keys: tuple[str, ...] = MUST_MATCH) -> None:
    """Refuse a checkpoint whose architecture-defining keys differ from the current run's."""
    theirs = KavaConfig.from_yaml(path / "config.yaml")
    for key in keys:
        a, b = config_value(cfg, key), config_value(theirs, key)
        if a != b:
            raise CheckpointError(f"{path}: checkpoint has {key}={b!r} but this run has {key}={a!r}; refusing to load")


def load_model_weights(path: Path, model) -> None:
    """Load adapter (or full) weights and the projection from ``path`` into an existing KavaModel, in place."""
    if model.cfg.lora.enabled:
        from peft import set_peft_model_state_dict

        state = load_file(path / "adapter" / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model.lm, state)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise CheckpointError(f"{path}: adapter weights do not fit this model (unexpected: {unexpected[:4]})")
    else:
        state: dict[str, torch.Tensor] = {}
        for f in sorted((path / "model").glob("*.safetensors")):
            state.update(load_file(f))
        if not state:
            raise CheckpointError(f"{path}: no model/*.safetensors")
        result = model.lm.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        missing = [k for k in result.missing_keys if k not in tied]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{path}: model weights do not fit (missing {missing[:4]}, unexpected {result.unexpected_keys[:4]})")
    if model.projection.enabled:
        model.projection.load_state_dict(load_file(path / "projection.safetensors"))


def load_checkpoint_weights(path: str | Path, model, branch: bool = False) -> None:
    """Verify a complete checkpoint, check it fits ``model``'s config, load its weights into ``model``.

    A sharded run calls this before sharding (every rank reads the files; ``fully_shard`` then keeps each
    rank's slice of them), then :func:`load_checkpoint` with ``weights=False`` for the rest.
    """
    p = Path(path)
    reason = verify_checkpoint(p)
    if reason is not None:
        raise CheckpointError(f"{p}: incomplete or corrupt checkpoint ({reason}); refusing to load")
    check_compatible(p, model.cfg, SHAPE_KEYS if branch else MUST_MATCH)
    load_model_weights(p, model)


def load_checkpoint(path: str | Path, model, optimizer, scheduler, branch: bool = False, scaler=None, *,
                    weights: bool = True, set_optimizer_state=None) -> dict:
    """Restore model weights, optimizer, scheduler, loss scaler and RNG from a complete checkpoint. -> train_state.

    ``branch``: the loading run has its own config (an ablation branching off a shared warm start);
    only the keys that shape the parameters must agree, and the optimizer's hyper-parameters (lr, betas,
    eps, weight decay) and the schedule's base lr are this run's, as ``optimizer`` / ``scheduler`` were
    built: the checkpoint gives the optimizer's moments and the position in the schedule only.
    ``scheduler`` is the :class:`torch.optim.lr_scheduler.LambdaLR` of ``kava.train.build_scheduler``.
    ``scaler``: the fp16 GradScaler; a checkpoint without ``scaler.json`` (no fp16, or an older kava)
    leaves it at its initial scale.
    ``weights=False``: the files were verified and the weights loaded already (:func:`load_checkpoint_weights`),
    so neither is done again. ``set_optimizer_state(state)``: loads the saved (full, index-keyed) optimizer state instead of
    ``optimizer.load_state_dict`` (a sharded optimizer: :func:`kava.sharding.load_optimizer_state`).
    """
    p = Path(path)
    if weights:
        load_checkpoint_weights(p, model, branch)
    if optimizer is not None:
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        saved = _load_state(p, "optimizer")
        ours = [len(g["params"]) for g in optimizer.param_groups]
        theirs = [len(g["params"]) for g in saved["param_groups"]]
        if ours != theirs:
            raise CheckpointError(f"{p}: the checkpoint's optimizer has parameter groups of sizes {theirs}, this run's "
                                  f"{ours} (train.weight_decay_scope or the trainable parameters differ); refusing to load")
        (optimizer.load_state_dict if set_optimizer_state is None else set_optimizer_state)(saved)
        if branch:  # a branch trains under its own config: every hyper-parameter as this run built it
            for group, own in zip(optimizer.param_groups, fresh):
                group.update(own)
    if scheduler is not None:
        state = unflatten_state(json.loads((p / "scheduler.json").read_text()), {})
        if branch and optimizer is not None:
            # The checkpoint's position in the schedule, this run's peak lr (base_lrs) and schedule (lr_lambdas).
            base = list(scheduler.base_lrs)
            lrs = [b * f(state["last_epoch"]) for b, f in zip(base, scheduler.lr_lambdas)]
            state = {**state, "base_lrs": base, "_last_lr": lrs}
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
        scheduler.load_state_dict(state)
    if scaler is not None and scaler.is_enabled():
        if (p / "scaler.json").is_file():
            scaler.load_state_dict(unflatten_state(json.loads((p / "scaler.json").read_text()), {}))
        else:
            log.warning("%s holds no loss-scaler state (saved without fp16, or by an older kava): "
                        "the loss scale starts again at %s", p, scaler.get_scale())
    set_rng_state(_load_state(p, "rng"))
    return json.loads((p / "train_state.json").read_text())
