"""Trainable rows for KaVa's new tokens (``<bot>``, ``<eot>``, ``<latent>``) without V x D copies.

With LoRA, the new rows train through peft's ``trainable_token_indices``: peft keeps them as
``trainable_tokens_delta`` (what adapters and optimizer states store), and its forward builds
``W = base_weight.index_copy(0, rows, delta)``, a new V x D matrix at every embedding call and every
tied-LM-head call; autograd then computes a dense V x D weight gradient for it as well.

:class:`RowTokensLayer` is peft's layer with only that arithmetic replaced. The module tree, parameter
names, state dict, adapter files, ``merge``/``unmerge`` and ``merge_and_unload`` stay peft's, so every
checkpoint reads and writes as before. Its forward:

- embedding: the frozen base lookup, with the trainable rows put in where the ids are new tokens;
- tied LM head: the frozen base logits, with the trainable rows' logits written into their columns.

Same values and gradients as peft's forward (tests/test_token_rows.py). :func:`use_row_forward` switches a
model to it (``KavaModel`` does this for every backbone); :func:`peft_token_rows` switches back for a while.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from torch import nn


class RowTokensLayer(TrainableTokensLayer):
    """peft's ``TrainableTokensLayer`` that never materialises the V x D merged weight."""

    def forward_adapters(self, x: torch.Tensor, active_adapters, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        # Anything but one unmerged adapter on a plain Embedding/Linear: peft's own path (same result, rare).
        if (self.disable_adapters or self.merged or len(active_adapters) != 1 or args or kwargs
                or not _plain(base)):
            return super().forward_adapters(x, active_adapters, *args, **kwargs)
        name = active_adapters[0]
        rows = self.token_indices[name]
        delta = self.trainable_tokens_delta[name].to(base.weight)
        index = self._index(name, rows, base.weight.device)
        if isinstance(base, nn.Embedding):
            if base.padding_idx is not None and base.padding_idx in rows:
                # F.embedding gives the padding row no gradient: neither does its trainable copy.
                keep = torch.tensor([r != base.padding_idx for r in rows], device=delta.device)[:, None]
                delta = torch.where(keep, delta, delta.detach())
            out = F.embedding(x, base.weight, padding_idx=base.padding_idx)
            hits = x[..., None] == index                                    # [..., k]; ids are unique rows
            slot = (hits.long() * torch.arange(len(rows), device=x.device)).sum(-1)
            out = torch.where(hits.any(-1, keepdim=True), F.embedding(slot, delta), out)
            scale = self._get_embed_scale()  # e.g. Gemma's scaled embedding, as peft applies it
            return out * scale.to(out.dtype) if scale is not None else out
        # Tied LM head: logits of the frozen weight (no weight gradient), then the k trainable columns.
        out = F.linear(x, base.weight)
        # In place: mm's backward needs its inputs, not its output, so overwriting the output is safe
        # and spares a copy of the logits.
        return out.index_copy_(-1, index, F.linear(x, delta))

    def _index(self, name: str, rows: list[int], device: torch.device) -> torch.Tensor:
        """The row ids as a tensor on ``device``, built once (a fresh host-to-device copy per call costs a launch)."""
        cache = self.__dict__.setdefault("_row_index", {})
        key = (name, device)
        if key not in cache:
            cache[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return cache[key]


def _plain(layer: nn.Module) -> bool:
    """An Embedding without max_norm / frequency scaling / sparse grads, or a bias-free Linear: what the row
    forward reproduces exactly. Others keep peft's path."""
    if isinstance(layer, nn.Embedding):
        return layer.max_norm is None and not layer.scale_grad_by_freq and not layer.sparse
    return isinstance(layer, nn.Linear) and layer.bias is None


def use_row_forward(model: nn.Module) -> int:
    """Switch every peft ``TrainableTokensLayer`` in ``model`` to :class:`RowTokensLayer`, in place.

    Only the class changes (parameters, buffers and state-dict keys are untouched). -> number switched.
    """
    n = 0
    for m in model.modules():
        if type(m) is TrainableTokensLayer:
            m.__class__ = RowTokensLayer
            n += 1
    return n


@contextlib.contextmanager
def peft_token_rows(model: nn.Module) -> Iterator[None]:
    """peft's own forward (a V x D merged weight per call) for the duration: the reference the row forward is
    tested and benchmarked against."""
    layers = [m for m in model.modules() if type(m) is RowTokensLayer]
    for m in layers:
        m.__class__ = TrainableTokensLayer
    try:
        yield
    finally:
        for m in layers:
            m.__class__ = RowTokensLayer
