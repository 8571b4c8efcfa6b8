"""kava/token_rows.py: the new-token rows without V x D copies give peft's values and gradients, and peft's files."""
from __future__ import annotations

import pytest
import torch
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from torch import nn

from conftest import perturb_trainables, tiny_config
from kava.data import Example
from kava.model import KavaModel
from kava.token_rows import RowTokensLayer, peft_token_rows, use_row_forward

EXAMPLES = [
    Example("Tom has 5 apples and buys 3 more. How many apples does he have?", ["<<5+3=8>>", "<<8*2=16>>"], "16"),
    Example("Sara reads 12 pages", ["<<12*4=48>>"], "48"),
    Example("Each box holds 7 pens. There are 9 boxes, 3 are empty. How many pens are in the full boxes?",
            ["<<9-3=6>>", "<<6*7=42>>", "<<42+1=43>>"], "42"),
]


def make_model(model_dir, **overrides) -> KavaModel:
    model = KavaModel.from_config(tiny_config(model_dir, **overrides))
    perturb_trainables(model)
    return model.train()


def loss_and_grads(model: KavaModel, examples=EXAMPLES):
    model.zero_grad(set_to_none=True)
    loss, metrics = model.training_loss(list(examples), generator=torch.Generator().manual_seed(0))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), metrics, grads


def big_saved_tensors(model: KavaModel, fn) -> list[tuple[int, ...]]:
    """Shapes of V x D (or D x V) tensors autograd saves during ``fn()`` that are not the (frozen) weight itself."""
    weight = model.decoder_stack.embed_tokens.token_adapter.base_layer.weight
    V, D = weight.shape
    found = []

    def pack(t):
        # Either orientation (linear saves W.t()); the weight's own storage is no copy.
        if sorted(t.shape) == sorted((V, D)) and t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
            found.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return found


@pytest.mark.parametrize("method", ["kava", "cot", "codi"])
def test_row_forward_matches_peft_loss_and_gradients(tiny_dir, method):
    """Same loss, metrics and every gradient (LoRA, new-token rows, projection) as peft's forward, tied
    (llama) and untied (qwen2) embeddings; the rows do get a gradient, so the check has teeth."""
    model = make_model(tiny_dir, method=method, **{"loss.alpha_kv": 1.0})
    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]
    tied = bool(model.config.tie_word_embeddings)
    assert [type(m) for m in layers] == [RowTokensLayer] * (2 if tied else 1)
    new = loss_and_grads(model)
    with peft_token_rows(model):
        assert all(type(m) is TrainableTokensLayer for m in layers)
        ref = loss_and_grads(model)
    assert all(type(m) is RowTokensLayer for m in layers)
    torch.testing.assert_close(new[0], ref[0], atol=1e-6, rtol=1e-6)
    assert new[1].keys() == ref[1].keys() and all(abs(new[1][k] - ref[1][k]) < 1e-5 for k in ref[1])
    assert new[2].keys() == ref[2].keys()
    for k in ref[2]:
        torch.testing.assert_close(new[2][k], ref[2][k], atol=1e-6, rtol=1e-5, msg=k)
    rows = [g for k, g in new[2].items() if "trainable_tokens_delta" in k]
    assert rows and all(g.abs().sum() > 0 for g in rows)


def test_row_forward_saves_no_vocab_sized_copy(tiny_llama_dir):
    """peft saves a merged V x D weight for backward at every embedding / tied-head call; the row forward none."""
    model = make_model(tiny_llama_dir)
    tb, sb = model.make_batches(EXAMPLES)
    assert big_saved_tensors(model, lambda: model.training_loss(tb, sb)) == []
    with peft_token_rows(model):
        assert len(big_saved_tensors(model, lambda: model.training_loss(tb, sb))) >= 2


def test_layer_matches_peft_with_padding_row_and_unusual_inputs():
    """Layer level: a trainable row that is the padding row gets no gradient (as F.embedding gives it), ids of any
    shape, a tied Linear head on 3-D input; values and gradients equal peft's."""
    torch.manual_seed(0)
    V, D, rows = 11, 6, [2, 7, 9]
    emb = nn.Embedding(V, D, padding_idx=7)
    head = nn.Linear(D, V, bias=False)
    head.weight = emb.weight
    emb.weight.requires_grad_(False)
    layer = TrainableTokensLayer(emb, "default")
    layer.update_layer("default", token_indices=rows)
    tied = TrainableTokensLayer(head, "default", tied_adapter=layer)
    with torch.no_grad():
        layer.trainable_tokens_delta["default"].add_(torch.randn(len(rows), D))
    ids = torch.tensor([[[1, 2, 7], [9, 9, 0]], [[7, 3, 2], [4, 5, 6]]])
    x = torch.randn(2, 5, D, requires_grad=True)

    def run(head: bool):
        for p in (layer.trainable_tokens_delta["default"], x):
            p.grad = None
        out = layer(ids).square().sum() + (tied(x).sin().sum() if head else 0)
        out.backward()
        return out.detach(), layer.trainable_tokens_delta["default"].grad.clone(), x.grad
    ref = [run(False), run(True)]
    layer.__class__ = tied.__class__ = RowTokensLayer
    new = [run(False), run(True)]
    for got, want in zip(new, ref):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    grad_rows = new[0][1]
    assert torch.all(grad_rows[1] == 0) and grad_rows[0].abs().sum() > 0  # rows[1] = 7 is the padding row


def test_lora_disabled_has_no_token_layer_and_trains_the_rows(tiny_dir):
    """Full fine-tuning: no peft layer to switch; the new rows train as part of the embedding."""
    model = make_model(tiny_dir, **{"lora.enabled": "false"})
    assert use_row_forward(model) == 0
    _, _, grads = loss_and_grads(model)
    ids = [model.special_ids[t] for t in ("<bot>", "<eot>", "<latent>")]
    g = grads["lm.model.embed_tokens.weight"]
    assert g[ids].abs().sum(-1).gt(0).all()


def test_checkpoint_of_the_peft_path_loads_into_the_row_path(tiny_dir, tmp_path):
    """The adapter files are peft's either way: a checkpoint written while peft's forward ran loads with the row
    forward, every parameter bit-identical and the same loss as the saved model computed."""
    model = make_model(tiny_dir)
    with peft_token_rows(model):
        model.save(tmp_path / "ckpt")
        ref, _, _ = loss_and_grads(model.eval())
    loaded = KavaModel.load(tmp_path / "ckpt", is_trainable=True).eval()
    assert any(type(m) is RowTokensLayer for m in loaded.modules())
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    new, _, _ = loss_and_grads(loaded)
    torch.testing.assert_close(new, ref, atol=1e-6, rtol=1e-6)
