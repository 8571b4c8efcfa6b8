"""Shared fixtures: tiny random LLaMA / Qwen2 models with GQA, saved as safetensors with a local tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread avoids spin-wait thrashing when the 2 cores are shared (~100x on a busy machine).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

CORPUS = [
    "Tom has 5 apples and buys 3 more. How many apples does he have?",
    "<<5+3=8>> <<8*2=16>> The answer is: 16",
    "Sara reads 12 pages a day for 4 days. How many pages? <<12*4=48>>",
    "Each box holds 7 pens. There are 9 boxes, 3 are empty.",
] * 4


def build_tokenizer(save_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(save_dir)
    return fast


def build_tiny_model(save_dir: Path, family: str = "llama", seed: int = 0) -> Path:
    """A 2-layer GQA model (4 query heads, 2 KV heads) with random weights, saved with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    save_dir = Path(save_dir)
    tok = build_tokenizer(save_dir)
    common = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=(family == "llama"),
    )
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.save_pretrained(save_dir, safe_serialization=True)
    return save_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen"), "qwen2")


def tiny_config(model_dir: Path, **overrides):
    from kava.config import KavaConfig

    cfg = KavaConfig()
    sets = [
        f"model.name_or_path={model_dir}",
        "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
        "latent.num_tokens=3", "latent.num_iterations=2",
        "train.global_batch_size=4", "train.micro_batch_size=2",
        "data.max_tokens=200",
    ]
    sets += [f"{k}={v}" for k, v in overrides.items()]
    return cfg.override(sets)


def perturb_trainables(model, seed: int = 1) -> None:
    """LoRA B starts at zero; give every trainable tensor random values so tests see the adapters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(params=["llama", "qwen2"])
def tiny_dir(request, tiny_llama_dir, tiny_qwen_dir) -> Path:
    return tiny_llama_dir if request.param == "llama" else tiny_qwen_dir
