"""A small byte-level BPE tokenizer for the embedded demo (trained in seconds, offline).

- Byte-level: the 256-byte alphabet is always in the vocabulary, so any text
  encodes without unknown tokens and decodes back exactly.
- Every digit is its own token (``Digits(individual_digits=True)`` splits them
  before BPE, and BPE never merges across pre-tokens). A number is therefore
  spelled the same way wherever it appears (in the CoT and in the answer), and a
  space before a number is a separate token.
- Special tokens ``<pad>`` (id 0), ``<s>`` (id 1), ``</s>`` (id 2), set as the
  pad/bos/eos tokens. No post-processor: encoding adds no special tokens; the
  caller places BOS/EOS itself. The model code adds ``<bot>``, ``<eot>`` and
  ``<latent>`` later.
- Deterministic: the same texts (in the same order) give the same vocabulary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["build_demo_tokenizer", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def build_demo_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, save_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    ``vocab_size`` counts the 256 bytes and the 3 special tokens, so it must be
    at least 259. With ``save_dir`` the tokenizer is saved with
    ``save_pretrained`` and can be reloaded with ``AutoTokenizer.from_pretrained``.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size}: must be >= {len(alphabet) + len(SPECIAL_TOKENS)} (bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(save_dir))
    return fast
