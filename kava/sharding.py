"""FSDP2 sharding of a :class:`~kava.model.KavaModel` (``train.fsdp``), and its full-state checkpoints.

accelerate's FSDP plugin refuses to run without a GPU, so kava shards the model itself with FSDP2
(``torch.distributed.fsdp.fully_shard``), the same way on CPU (gloo) and GPU (nccl), under any launcher
(``torchrun``, or ``accelerate launch`` without ``--use_fsdp``); accelerate keeps the process group, devices,
mixed precision and the optimizer. docs/design.md ("FSDP") explains the choices:

- :func:`shard`: one FSDP unit per decoder layer (the backbone's ``_no_split_modules`` classes), one for the
  projection (fp32, also beside a bf16 backbone trained whole: one unit's trainable tensors share a dtype), then the root (embeddings, new-token rows, final norm, LM head). Frozen and trainable parameters
  share a unit (FSDP2 keeps ``requires_grad`` per parameter). Parameters stay gathered from a unit's first
  forward in a step until :func:`reshard` after the step's backward: a KaVa step runs every layer many times
  (teacher, latent passes, answer) and later passes take gradients through the earlier passes' K/V cache,
  which does not go through the layer's outputs where FSDP2 re-gathers for backward. At rest (and so for the
  optimizer state, the master weights and the reduced gradients) everything is 1/P per process.
- :func:`full_model_state` / :func:`full_optimizer_state`: the full trainable weights and optimizer state,
  gathered with ``torch.distributed.checkpoint.state_dict`` onto rank 0's CPU; every rank must call them.
  The optimizer state comes back keyed by parameter index, as ``optimizer.state_dict()`` of an unsharded
  run, so :mod:`kava.checkpoint` writes the same files either way.
- :func:`load_optimizer_state`: a saved (index-keyed, full) optimizer state into the sharded optimizer.
- :func:`gathered`: every unit gathered on every rank, so each rank can run its own share of validation
  (different batches, generation that stops early) without collectives.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The backbone's decoder layers: the modules whose class its ``_no_split_modules`` names."""
    lm = model.lm
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        from kava.config import ConfigError

        raise ConfigError(f"train.fsdp=true: {type(base).__name__} names no decoder layer class in "
                          f"_no_split_modules ({sorted(names)}), so it cannot be sharded per layer")
    return layers


def shard(model: nn.Module, device: torch.device | str) -> None:
    """Shard ``model`` (a KavaModel on ``device``) in place over every process of the default process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=False)
    if any(True for _ in model.projection.parameters()):
        fully_shard(model.projection, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    model.set_reshard_after_backward(False)  # :func:`reshard` after the step's backward (see the module doc)


def _units(model: nn.Module) -> list[nn.Module]:
    """Every FSDP unit of ``model``, in module order (the same on every rank)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model: nn.Module) -> None:
    """Free every unit's gathered parameters (after a step's backward, before the optimizer updates the shards)."""
    for m in _units(model):
        m.reshard()


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients without reducing them (the micro-batches before the last), as DDP's ``no_sync``."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every unit gathered on every rank for the duration (a collective on entry): forwards then need none."""
    units = _units(model)
    try:
        for m in units:
            m.unshard()
        yield
    finally:
        for m in units:
            m.reshard()


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a DTensor's full value (e.g. the global gradient norm), anything else as it is."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The weights a checkpoint holds, full, on rank 0's CPU (other ranks: empty dicts). A collective.

    ``{"lm": {key of model.lm.state_dict(): tensor} for its trainable tensors (aliases of one tensor share
    it, as in ``state_dict()``), "projection": model.projection.state_dict()}``.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    # Gathered per submodule: KavaModel's ``decoder_stack`` / ``lm_head`` alias modules of ``lm``, and
    # ignore_frozen_params drops a frozen tensor under its first name only.
    lm = get_model_state_dict(model.lm, options=_options(cpu_offload=True, ignore_frozen_params=True))
    projection = get_model_state_dict(model.projection, options=_options(cpu_offload=True))
    if _rank() != 0:  # cpu_offload gathers onto rank 0 only
        return {"lm": {}, "projection": {}}
    first = {}
    for name, p in model.lm.named_parameters():
        first.setdefault(id(p), name)
    trainable = {}
    for name, p in model.lm.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            trainable[name] = lm[first[id(p)]]  # a tied alias is the same tensor, as save_pretrained expects
    return {"lm": trainable, "projection": projection}


def _param_names(model: nn.Module, optimizer) -> list[list[str]]:
    """The name of every parameter of ``optimizer``, per group, as ``model.named_parameters()`` gives it."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def full_optimizer_state(model: nn.Module, optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` of the unsharded run (full tensors, keyed by parameter index) on rank 0's CPU;
    ``{}`` on other ranks. A collective. ``optimizer``: the torch optimizer over the sharded parameters."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if _rank() != 0:
        return {}
    groups = _param_names(model, optimizer)
    index = {name: i for i, name in enumerate(n for g in groups for n in g)}
    unknown = sorted(set(osd["state"]) - set(index))
    if unknown:
        raise RuntimeError(f"gathered optimizer state for parameters the optimizer does not hold: {unknown[:4]}")
    return {
        "state": {index[name]: osd["state"][name] for name in sorted(osd["state"], key=index.__getitem__)},
        "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in names]}
                         for g, names in zip(osd["param_groups"], groups)],
    }


def load_optimizer_state(model: nn.Module, optimizer, saved: dict[str, Any]) -> None:
    """Load a full, index-keyed optimizer state (:func:`full_optimizer_state`, or an unsharded run's
    ``optimizer.state_dict()``) into the sharded ``optimizer``; every rank passes the whole state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    groups = _param_names(model, optimizer)
    order = [n for g in groups for n in g]
    state = {
        "state": {order[int(i)]: value for i, value in saved["state"].items()},
        "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [order[int(i)] for i in g["params"]]}
                         for g in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, state, options=_options())
    for group, g in zip(optimizer.param_groups, saved["param_groups"]):  # as saved (betas a tuple, not a list)
        group.update({k: v for k, v in g.items() if k != "params"})
