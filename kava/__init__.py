"""KaVa: latent reasoning via compressed KV-cache distillation.

Public API::

    from kava import KavaModel, KavaConfig, Example
    model = KavaModel.from_pretrained("ckpt")            # or from_config(cfg), from_backbone(hf_model, tokenizer, cfg)
    loss, metrics = model.training_loss([Example(...)])  # model(...) is the same call (DDP / HF-style loops)
    trace = model.latent_reasoning(["question"])          # LatentTrace
    outs = model.generate(["question"], mode="latent")    # list[Generation]
    model.save_pretrained("ckpt")

The torch-backed names (KavaModel, LatentTrace, Generation, compress_kv, rkv_scores) are imported on
first use, so ``import kava`` (and ``kava --help``) stays fast.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kava.config import ConfigError, KavaConfig
from kava.data import Example

__all__ = ["KavaModel", "KavaConfig", "ConfigError", "Example", "LatentTrace", "Generation", "compress_kv",
           "rkv_scores"]
__version__ = "0.1.0"

_LAZY = {
    "KavaModel": "kava.model",
    "Generation": "kava.model",
    "LatentTrace": "kava.latent",
    "compress_kv": "kava.eviction",
    "rkv_scores": "kava.eviction",
}

if TYPE_CHECKING:
    from kava.eviction import compress_kv, rkv_scores
    from kava.latent import LatentTrace
    from kava.model import Generation, KavaModel


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kava' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
