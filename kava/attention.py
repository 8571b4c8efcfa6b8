"""Importance capture: answer-query -> CoT-key attention rows, without eager attention.

A wrapper around the backend attention function (sdpa, flash-attention) is
registered in transformers' ``AttentionInterface`` under ``kava_<backend>``
(plus the matching mask function in ``AttentionMaskInterface``). It runs the
backend unchanged and, when an :class:`ImportanceCapture` is passed as the
``kava_capture`` keyword of the model call, recomputes only the rows it needs:
the answer queries against the CoT keys, per layer. Nothing of size N x N is
ever materialised.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "kava_"


@dataclass
class ImportanceCapture:
    """What to capture in one teacher forward, and where the results go.

    Shapes: ``query_index``/``query_valid`` [B, Na] (answer-query positions),
    ``cot_index``/``cot_valid`` [B, Nc] (CoT positions), ``key_valid`` [B, N]
    (the 2D attention mask) and ``positions`` [B, N] (causality for the
    whole-row softmax). Result: ``scores[layer]`` = [B, H_kv, Nc].
    """

    query_index: torch.Tensor
    query_valid: torch.Tensor
    cot_index: torch.Tensor
    cot_valid: torch.Tensor
    key_valid: torch.Tensor
    softmax_over: str = "cot"  # "cot": CoT keys only; "row": whole causal row
    scores: dict[int, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def record(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """query [B, Hq, N, d] (post-RoPE), key [B, H_kv, N, d] -> scores[layer_idx] [B, H_kv, Nc]."""
        B, Hq, N, d = query.shape
        Hkv = key.shape[1]
        q = torch.gather(query, 2, self.query_index[:, None, :, None].expand(B, Hq, -1, d))
        q = q.view(B, Hkv, Hq // Hkv, -1, d).float()  # [B, Hkv, G, Na, d]
        k = key.float()
        if self.softmax_over == "cot":
            k_c = torch.gather(k, 2, self.cot_index[:, None, :, None].expand(B, Hkv, -1, d))
            logits = torch.einsum("bhgad,bhcd->bhgac", q, k_c) * scaling
            logits = logits.masked_fill(~self.cot_valid[:, None, None, None, :], float("-inf"))
            probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        else:
            # Whole causal row: normalise over every key the query may attend to, then keep CoT columns.
            logits = torch.einsum("bhgad,bhnd->bhgan", q, k) * scaling
            allowed = self.key_valid[:, None, :] & (
                torch.arange(N, device=q.device)[None, None, :] <= self.query_index[:, :, None]
            )  # [B, Na, N]
            logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
            probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
            probs = torch.gather(probs, 4, self.cot_index[:, None, None, None, :].expand(*probs.shape[:4], -1))
            probs = probs * self.cot_valid[:, None, None, None, :]
        w = self.query_valid[:, None, None, :, None].to(probs.dtype)
        mean_over_queries = (probs * w).sum(3) / w.sum(3).clamp_min(1.0)  # [B, Hkv, G, Nc]
        self.scores[layer_idx] = mean_over_queries.amax(dim=2)  # max over the query heads of a group

    def stacked(self, num_layers: int) -> torch.Tensor:
        """[B, L, H_kv, Nc]; raises if a layer did not report (wrong attention backend)."""
        missing = [i for i in range(num_layers) if i not in self.scores]
        if missing:
            raise RuntimeError(
                f"importance was not captured for layers {missing}: load the model with "
                f"attn_implementation='{PREFIX}sdpa' (kava.backbone.load_backbone does this)"
            )
        return torch.stack([self.scores[i] for i in range(num_layers)], dim=1)


def _make_wrapper(base_name: str):
    def attention_with_capture(module, query, key, value, attention_mask, **kwargs):
        capture: ImportanceCapture | None = kwargs.pop("kava_capture", None)
        base = ALL_ATTENTION_FUNCTIONS[base_name]
        out = base(module, query, key, value, attention_mask, **kwargs)
        if capture is not None:
            scaling = kwargs.get("scaling")
            capture.record(module.layer_idx, query, key, scaling if scaling is not None else query.shape[-1] ** -0.5)
        return out

    attention_with_capture.__name__ = f"{PREFIX}{base_name}_attention"
    return attention_with_capture


def capturing_attention_name(base_name: str) -> str:
    """Register (idempotently) and return the name of the capturing wrapper around ``base_name``."""
    if base_name.startswith(PREFIX):
        base_name = base_name[len(PREFIX):]
    if base_name == "eager":
        raise ValueError(
            "model.attn_implementation='eager': importance capture wraps a registered kernel; "
            "use 'sdpa' or 'flash_attention_2'"
        )
    if base_name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        raise ValueError(
            f"model.attn_implementation={base_name!r}: unknown attention kernel "
            f"(known: {', '.join(sorted(ALL_ATTENTION_FUNCTIONS._global_mapping))})"
        )
    name = PREFIX + base_name
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(name, _make_wrapper(base_name))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    return name
