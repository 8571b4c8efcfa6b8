"""kava/backbone.py: the rows of the new special tokens, for backbones with and without spare embedding rows."""
from __future__ import annotations

import torch

from conftest import build_tokenizer
from kava.backbone import SPECIAL_TOKENS, add_special_tokens


def tiny_qwen_with_spare_rows(tmp_path, spare: int):
    """A tiny Qwen2 whose embedding and (untied) LM head have ``spare`` rows more than its tokenizer, as Qwen2.5's
    do; the spare rows hold a value no mean of real rows has."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer(tmp_path)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok) + spare, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=False))
    with torch.no_grad():
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            layer.weight[len(tok):] = 100.0
    return model, tok


def test_new_tokens_in_spare_rows_start_at_the_mean_of_the_known_rows(tmp_path):
    model, tok = tiny_qwen_with_spare_rows(tmp_path, spare=8)
    known, rows = len(tok), model.get_input_embeddings().weight.shape[0]
    before = {name: layer.weight.detach().clone() for name, layer in
              (("in", model.get_input_embeddings()), ("out", model.get_output_embeddings()))}
    ids = add_special_tokens(model, tok)
    assert sorted(ids.values()) == list(range(known, known + len(SPECIAL_TOKENS)))
    assert model.get_input_embeddings().weight.shape[0] == rows  # nothing resized: the spare rows are used
    for name, layer in (("in", model.get_input_embeddings()), ("out", model.get_output_embeddings())):
        w = layer.weight.detach()
        mean = before[name][:known].mean(0)
        for i in ids.values():
            torch.testing.assert_close(w[i], mean, rtol=0, atol=1e-6)
        assert torch.equal(w[:known], before[name][:known])
        assert torch.equal(w[known + len(SPECIAL_TOKENS):], before[name][known + len(SPECIAL_TOKENS):])


def test_new_tokens_past_the_last_row_start_at_the_mean_too(tmp_path):
    model, tok = tiny_qwen_with_spare_rows(tmp_path, spare=0)
    known = len(tok)
    mean = model.get_input_embeddings().weight.detach()[:known].mean(0)
    ids = add_special_tokens(model, tok)
    w = model.get_input_embeddings().weight.detach()
    assert w.shape[0] == known + len(SPECIAL_TOKENS)
    for i in ids.values():
        torch.testing.assert_close(w[i], mean, rtol=0, atol=1e-6)
