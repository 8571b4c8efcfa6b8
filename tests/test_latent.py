"""kava/latent.py: the fixed-shape M-slot pass and its compiled form (``latent.compile``, issue 13 item 4).

The compiled pass must give the eager loss and every trainable parameter's gradient to 1e-5. The default-suite
test compiles with the ``aot_eager`` backend (dynamo's graph capture and AOTAutograd's joint forward/backward
graph, run without code generation: seconds); the slow test uses inductor, the backend ``latent.compile`` runs,
over two question lengths (the automatic-dynamic recompile) on a CPU, which takes minutes there.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch._dynamo.utils import counters

import kava.latent
from conftest import perturb_trainables, tiny_config
from kava.data.collate import collate_student, collate_teacher
from kava.model import KavaModel
from test_model import EXAMPLES  # mixed question lengths, one-step and three-step CoTs

TOL = 1e-5  # the tolerance, for inductor (other kernels, other summation orders)
TOL_AOT_EAGER = 2e-6  # aot_eager runs the eager kernels: measured differences <= 3e-7 (a 1e-4 relative error
# in the passes' keys moves the loss by ~4e-6, which 1e-5 would miss on this tiny model)


@pytest.fixture
def fresh_dynamo():
    """Compiled graphs and dynamo's counters are per process: start and leave them empty."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def make_model(model_dir, **sets) -> KavaModel:
    model = KavaModel.from_config(tiny_config(model_dir, **{"loss.alpha_kv": 1.0, "loss.alpha_codi": 1.0,
                                                            "loss.kv_supervision": "all", **sets}))
    perturb_trainables(model)
    return model.train()


def with_compile(model: KavaModel, on: bool) -> None:
    model.cfg = dataclasses.replace(model.cfg, latent=dataclasses.replace(model.cfg.latent, compile=on))


def loss_and_grads(model: KavaModel, examples) -> tuple[torch.Tensor, dict, dict]:
    segs = [model.encoder.segments(e) for e in examples]
    tb, sb = collate_teacher(segs, model.encoder.pad), collate_student(segs, model.encoder.pad)
    model.zero_grad(set_to_none=True)
    loss, metrics = model.training_loss(tb, sb, torch.Generator().manual_seed(0))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), dict(metrics), grads


def assert_same(compiled, eager, model: KavaModel, tol: float = TOL) -> None:
    (l1, m1, g1), (l0, m0, g0) = compiled, eager
    torch.testing.assert_close(l1, l0, atol=tol, rtol=0)
    assert m1.keys() == m0.keys() and all(abs(m1[k] - m0[k]) <= tol for k in m0), (m1, m0)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert g1.keys() == g0.keys() == trainable
    for k in trainable:  # every trainable tensor has a gradient on both paths, and they agree
        assert g0[k] is not None and g1[k] is not None, k
        torch.testing.assert_close(g1[k], g0[k], atol=tol, rtol=0, msg=k)
    lora_b = [k for k in trainable if "lora_B" in k]
    assert lora_b and all(g1[k].abs().sum() > 0 for k in lora_b)  # the compiled passes train the adapters


@pytest.mark.parametrize("share", [True, False])
def test_compiled_latent_passes_give_the_eager_loss_and_gradients(tiny_llama_dir, fresh_dynamo, monkeypatch, share):
    """``latent.compile``: the M-slot passes (pass 0 on the shared question KV, the Jacobi iterations) run as one
    captured graph, with the loss, the metrics and every trainable gradient of the eager step to 1e-5."""
    backend = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(kava.latent, "COMPILE_BACKEND", backend)
    model = make_model(tiny_llama_dir, **{"train.share_question_pass": share})
    with_compile(model, True)
    compiled = loss_and_grads(model, EXAMPLES[:2])
    with_compile(model, False)
    eager = loss_and_grads(model, EXAMPLES[:2])
    assert_same(compiled, eager, model, TOL_AOT_EAGER)
    # The compiled path did run, as one graph: no graph break, one compilation for all the passes of the step.
    assert backend.frame_count == 1 and backend.op_count > 0
    assert not counters["graph_break"]


@pytest.mark.slow
def test_inductor_compiled_latent_passes_over_question_lengths(tiny_llama_dir, fresh_dynamo):
    """The backend ``latent.compile`` uses (inductor): loss and every gradient of the eager step to 1e-5, over
    three batches of two question lengths; the second length recompiles once (dynamic sizes), then no more."""
    assert kava.latent.COMPILE_BACKEND == "inductor"
    model = make_model(tiny_llama_dir)
    graphs = []
    for batch in (EXAMPLES[:2], EXAMPLES[2:], EXAMPLES[:2]):
        with_compile(model, True)
        compiled = loss_and_grads(model, batch)
        graphs.append(counters["stats"]["unique_graphs"])
        with_compile(model, False)
        assert_same(compiled, loss_and_grads(model, batch), model)
    assert graphs == [1, 2, 2]
    assert not counters["graph_break"]


def test_fixed_shape_pass_returns_the_cache_and_the_stacked_slot_kv(tiny_llama_dir):
    """Eager, the fixed pass is the decoder call on the prefix cache: the hidden states, the prefix + slot KV per
    layer (the answer pass's cache) and the slots' KV stacked [B, L, H, M, d] (what the KV loss reads)."""
    model = make_model(tiny_llama_dir).eval()
    B, Nq, M, D = 2, 5, 3, model.config.hidden_size
    with torch.no_grad():
        out = model.decoder_stack(inputs_embeds=torch.randn(B, Nq, D), use_cache=True)
        prefix = [(layer.keys, layer.values) for layer in out.cache.layers]
        z = torch.randn(B, M, D)
        mask = torch.ones(B, Nq + M, dtype=torch.bool)
        pos = torch.arange(Nq, Nq + M)[None].expand(B, M)
        h, full, (k, v) = kava.latent.fixed_shape_pass(model._decoder_fn())(z, mask, pos, prefix)
        ref = model.decoder_stack(inputs_embeds=z, attention_mask=mask, position_ids=pos,
                                  cache=kava.latent._cache_from(prefix), use_cache=True)
    assert torch.equal(h, ref.last_hidden_state)
    assert len(full) == model.num_layers and k.shape == (B, model.num_layers, 2, M, full[0][0].shape[-1])
    for i, (layer, (fk, fv)) in enumerate(zip(ref.cache.layers, full)):
        assert torch.equal(fk, layer.keys) and torch.equal(fv, layer.values)
        assert torch.equal(fk[..., :Nq, :], prefix[i][0])
        assert torch.equal(k[:, i], fk[..., Nq:, :]) and torch.equal(v[:, i], fv[..., Nq:, :])
