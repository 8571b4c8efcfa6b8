"""KavaModel invariants: padding/batch invariance, Jacobi = sequential, importance = eager rows, gradients, save/load."""
from __future__ import annotations

import pytest
import torch

from conftest import perturb_trainables, tiny_config
from kava.data import Example
from kava.data.collate import collate_student, collate_teacher
from kava.model import KavaModel

EXAMPLES = [
    Example("Tom has 5 apples and buys 3 more. How many apples does he have?", ["<<5+3=8>>", "<<8*2=16>>"], "16"),
    Example("Sara reads 12 pages", ["<<12*4=48>>"], "48"),
    Example("Each box holds 7 pens. There are 9 boxes, 3 are empty. How many pens are in the full boxes?",
            ["<<9-3=6>>", "<<6*7=42>>", "<<42+1=43>>"], "42"),
    Example("A cat", ["<<1+1=2>>"], "2"),
]
ATOL = 1e-5


def make_model(model_dir, **overrides) -> KavaModel:
    model = KavaModel.from_config(tiny_config(model_dir, **overrides))
    perturb_trainables(model)
    return model.eval()


def batches(model, examples):
    segs = [model.encoder.segments(e) for e in examples]
    return collate_teacher(segs, model.encoder.pad), collate_student(segs, model.encoder.pad)


def test_special_tokens_and_frozen_base(tiny_dir):
    model = KavaModel.from_config(tiny_config(tiny_dir))
    vocab = model.tokenizer.get_vocab()
    for tok in ("<bot>", "<eot>", "<latent>"):
        assert tok in vocab
    assert model.decoder_stack.embed_tokens.weight.shape[0] >= len(model.tokenizer) if hasattr(
        model.decoder_stack.embed_tokens, "weight") else True
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert any("trainable_tokens_delta" in n for n in trainable)
    assert any(n.startswith("projection.") for n in trainable)
    frozen_base = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("mlp" in n for n in frozen_base) and any("base_layer" in n for n in frozen_base)
    assert not any("mlp" in n for n in trainable)


def test_projection_switch(tiny_llama_dir):
    model = make_model(tiny_llama_dir, **{"latent.use_projection": "false"})
    assert not any(n.startswith("projection.") for n, _ in model.named_parameters())
    h = torch.randn(2, 3, model.config.hidden_size)
    assert torch.equal(model.projection(h), h)


@pytest.mark.parametrize("lora", ["true", "false"])
def test_projection_scale_embedding_matches_token_norm(tiny_llama_dir, lora):
    """projection_scale=embedding: latents start at the mean token-embedding norm (unit: at ~sqrt(D))."""
    torch.manual_seed(0)
    norms = {}
    for scale in ("unit", "embedding"):
        model = KavaModel.from_config(tiny_config(tiny_llama_dir, **{"latent.projection_scale": scale, "lora.enabled": lora}))
        D = model.config.hidden_size
        emb = model.decoder_stack.embed_tokens
        emb = emb.base_layer if hasattr(emb, "base_layer") else emb  # peft's trainable-token wrapper
        token_norm = emb.weight.float().norm(dim=-1).mean()
        norms[scale] = model.projection(torch.randn(64, 8, D)).norm(dim=-1).mean()
        if scale == "embedding":
            assert torch.allclose(norms[scale], token_norm, rtol=0.05)
    assert torch.allclose(norms["unit"], torch.tensor(model.config.hidden_size ** 0.5), rtol=0.05)


@pytest.mark.parametrize("mode", ["jacobi", "sequential"])
def test_batch_invariance(tiny_dir, mode):
    """Each example alone == inside a batch padded with longer and shorter examples."""
    model = make_model(tiny_dir, **{"latent.mode": mode})
    tb_all, sb_all = batches(model, EXAMPLES)
    with torch.no_grad():
        t_all = model.teacher(tb_all)
        c_all = model.compress_teacher_kv(t_all)
        s_all = model.student(sb_all)
        g_all = model.generate([e.question for e in EXAMPLES], mode="latent", max_new_tokens=4)
        gc_all = model.generate([e.question for e in EXAMPLES], mode="cot", max_new_tokens=6)
    final = max(s_all.trace.latent_kv)
    for i, ex in enumerate(EXAMPLES):
        tb, sb = batches(model, [ex])
        with torch.no_grad():
            t = model.teacher(tb)
            c = model.compress_teacher_kv(t)
            s = model.student(sb)
            g = model.generate([ex.question], mode="latent", max_new_tokens=4)
            gc = model.generate([ex.question], mode="cot", max_new_tokens=6)
        torch.testing.assert_close(s.trace.latents[0], s_all.trace.latents[i], atol=ATOL, rtol=0)
        for it in s.trace.latent_kv:
            for a, b in zip(s.trace.latent_kv[it], s_all.trace.latent_kv[it]):
                torch.testing.assert_close(a[0], b[i], atol=ATOL, rtol=0)
        torch.testing.assert_close(s.hidden[0], s_all.hidden[i], atol=ATOL, rtol=0)
        torch.testing.assert_close(s.ce, model.student(batches(model, [ex])[1]).ce, atol=ATOL, rtol=0)
        n = int(tb.cot_valid.sum())
        torch.testing.assert_close(t.importance[0, ..., :n], t_all.importance[i, ..., :n], atol=ATOL, rtol=0)
        torch.testing.assert_close(t.cot_keys[0, ..., :n, :], t_all.cot_keys[i, ..., :n, :], atol=ATOL, rtol=0)
        torch.testing.assert_close(t.hidden[0], t_all.hidden[i], atol=ATOL, rtol=0)
        torch.testing.assert_close(c.keys[0], c_all.keys[i], atol=ATOL, rtol=0)
        torch.testing.assert_close(c.values[0], c_all.values[i], atol=ATOL, rtol=0)
        assert torch.equal(c.index[0], c_all.index[i]) and torch.equal(c.slot_mask[0], c_all.slot_mask[i])
        assert g[0].token_ids == g_all[i].token_ids and g[0].forward_passes == g_all[i].forward_passes
        torch.testing.assert_close(g[0].latents, g_all[i].latents, atol=ATOL, rtol=0)
        assert gc[0].token_ids == gc_all[i].token_ids
    assert final >= 0


def test_student_logits_batch_invariant(tiny_llama_dir):
    """Answer-pass logits of one example equal its logits inside a padded batch."""
    model = make_model(tiny_llama_dir)
    _, sb_all = batches(model, EXAMPLES)
    with torch.no_grad():
        ce_each = [model.student(batches(model, [e])[1]).ce for e in EXAMPLES]
        # Per-example CE recovered from the batch by masking the others' labels.
        for i in range(len(EXAMPLES)):
            labels = sb_all.suffix_labels.clone()
            labels[torch.arange(len(EXAMPLES)) != i] = -100
            sb_i = type(sb_all)(**{**sb_all.__dict__, "suffix_labels": labels})
            torch.testing.assert_close(model.student(sb_i).ce, ce_each[i], atol=ATOL, rtol=0)


@pytest.mark.parametrize("M", [3, 5])
def test_jacobi_reproduces_sequential(tiny_dir, M):
    seq = make_model(tiny_dir, **{"latent.mode": "sequential", "latent.num_tokens": M})
    jac = make_model(tiny_dir, **{"latent.mode": "jacobi", "latent.num_tokens": M, "latent.num_iterations": M})
    jac.load_state_dict(seq.state_dict())
    _, sb = batches(seq, EXAMPLES)
    with torch.no_grad():
        ts = seq.latent_reasoning(sb.prefix_ids, sb.prefix_mask)
        tj = jac.latent_reasoning(sb.prefix_ids, sb.prefix_mask, keep_history=True)
    torch.testing.assert_close(tj.latents, ts.latents, atol=ATOL, rtol=0)
    assert torch.equal(tj.latents, tj.history[M - 1])  # the inputs of the last pass, z^(T-1), not z^T
    (ks, vs), (kj, vj) = ts.latent_kv[max(ts.latent_kv)], tj.latent_kv[M]
    torch.testing.assert_close(kj, ks, atol=ATOL, rtol=0)
    torch.testing.assert_close(vj, vs, atol=ATOL, rtol=0)
    # After iteration t, slots 1..t+1 already match sequential decoding.
    for t, z in enumerate(tj.history):
        k = min(t + 1, M)
        torch.testing.assert_close(z[:, :k], ts.latents[:, :k], atol=ATOL, rtol=0)
        if k < M:
            assert not torch.allclose(z[:, k:], ts.latents[:, k:], atol=1e-3)
    # The answer pass then sees the same cache: same student loss.
    with torch.no_grad():
        torch.testing.assert_close(jac.student(sb).ce, seq.student(sb).ce, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode,T", [("jacobi", 2), ("jacobi", 0), ("sequential", 2)])
def test_answer_pass_attends_to_the_kv_of_trace_latents(tiny_dir, mode, T):
    """``LatentTrace.latents`` are the latents the answer used: one pass on them rebuilds the answer's cache
    and the final ``latent_kv`` (in Jacobi mode z^(T-1), not the unused update z^T), and the student CE."""
    from kava.latent import replay_final_pass

    model = make_model(tiny_dir, **{"latent.mode": mode, "latent.num_tokens": 4, "latent.num_iterations": T})
    _, sb = batches(model, EXAMPLES)
    decoder = model._decoder_fn()
    with torch.no_grad():
        trace = model.latent_reasoning(sb.prefix_ids, sb.prefix_mask)
        own = replay_final_pass(decoder, trace, trace.latents)
        other = replay_final_pass(decoder, trace, trace.latents.roll(1, dims=0))
    n = trace.mask.shape[1] - 4
    for a, b, c in zip(own.layers, trace.cache.layers, other.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.values, b.values, atol=ATOL, rtol=0)
        torch.testing.assert_close(c.keys[..., :n, :], b.keys[..., :n, :], atol=ATOL, rtol=0)  # prefix kept
        if T > 0 or mode == "sequential":  # (T = 0: every row's latents are the <latent> embedding)
            assert not torch.allclose(c.keys[..., n:, :], b.keys[..., n:, :], atol=1e-3)  # latents swapped
    kf, vf = trace.latent_kv[max(trace.latent_kv)]
    torch.testing.assert_close(torch.stack([layer.keys[..., n:, :] for layer in own.layers], 1), kf, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack([layer.values[..., n:, :] for layer in own.layers], 1), vf, atol=ATOL, rtol=0)
    with torch.no_grad():
        ce, _ = model.answer_pass(sb, replay_final_pass(decoder, trace, trace.latents), trace.mask, trace.next_position)
        torch.testing.assert_close(ce, model.student(sb).ce, atol=ATOL, rtol=0)
    # generate() hands back the same latents, one [M, D] per question
    for i, g in enumerate(model.generate([e.question for e in EXAMPLES], max_new_tokens=1)):
        torch.testing.assert_close(g.latents, trace.latents[i], atol=ATOL, rtol=0)


@pytest.mark.parametrize("softmax_over", ["cot", "row"])
@pytest.mark.parametrize("queries", ["prompt_and_answer", "answer"])
def test_importance_matches_eager_attention(tiny_dir, softmax_over, queries):
    model = make_model(tiny_dir, **{"eviction.importance_softmax": softmax_over, "eviction.importance_queries": queries})
    segs = [model.encoder.segments(e) for e in EXAMPLES]
    tb = collate_teacher(segs, model.encoder.pad, importance_queries=queries)
    with torch.no_grad():
        imp = model.teacher(tb).importance  # [B, L, Hkv, Nc]
        base = model.lm.get_base_model()
        base.set_attn_implementation("eager")
        try:
            out = model.decoder_stack(input_ids=tb.input_ids, attention_mask=tb.attention_mask,
                                      position_ids=tb.position_ids, output_attentions=True)
        finally:
            base.set_attn_implementation("kava_sdpa")
    att = torch.stack(out.attentions, 1)  # [B, L, Hq, N, N]
    B, L, Hq = att.shape[:3]
    Hkv = model.config.num_key_value_heads
    for b in range(B):
        q = tb.query_index[b][tb.query_valid[b]]
        c = tb.cot_index[b][tb.cot_valid[b]]
        rows = att[b][:, :, q][:, :, :, c]  # [L, Hq, Na, Nc]
        if softmax_over == "cot":
            rows = rows / rows.sum(-1, keepdim=True)
        ref = rows.mean(2).view(L, Hkv, Hq // Hkv, -1).amax(2)
        torch.testing.assert_close(imp[b, :, :, : len(c)], ref, atol=1e-6, rtol=1e-5)
        assert torch.all(imp[b, :, :, len(c):] == 0)


def test_gradients_teacher_detached_student_trained(tiny_llama_dir):
    model = make_model(tiny_llama_dir, **{"loss.alpha_kv": 1.0})
    model.train()
    tb, sb = batches(model, EXAMPLES)
    t = model.teacher(tb)
    assert not t.cot_keys.requires_grad and not t.cot_values.requires_grad and not t.hidden.requires_grad
    assert t.ce.requires_grad  # the teacher CE trains the shared weights
    s = model.student(sb)
    k_last, v_last = s.trace.latent_kv[max(s.trace.latent_kv)]
    assert k_last.requires_grad and v_last.requires_grad
    compressed = model.compress_teacher_kv(t)
    from kava.losses import kv_loss

    kv = kv_loss(k_last, v_last, compressed.keys, compressed.values, compressed.slot_mask)
    gk, gv = torch.autograd.grad(kv, [k_last, v_last], retain_graph=True)
    assert gk.abs().sum() > 0 and gv.abs().sum() > 0
    kv.backward()
    named = dict(model.named_parameters())
    for key in ("projection.net.0.weight", ):
        assert named[key].grad is not None and named[key].grad.abs().sum() > 0
    assert any("lora_B" in n and p.grad is not None and p.grad.abs().sum() > 0 for n, p in named.items())
    assert any("trainable_tokens_delta" in n and p.grad is not None and p.grad.abs().sum() > 0 for n, p in named.items())
    for n, p in named.items():
        if not p.requires_grad:
            assert p.grad is None, n


@pytest.mark.parametrize("mode", ["jacobi", "sequential"])
def test_shared_question_pass_gives_the_same_loss_and_gradients(tiny_dir, mode):
    """Reusing the teacher's Q <bot> KV is an optimisation only: loss, metrics and every gradient match."""
    results = []
    for share in (False, True):
        model = make_model(tiny_dir, **{"latent.mode": mode, "train.share_question_pass": share,
                                        "loss.alpha_kv": 1.0, "loss.alpha_codi": 1.0})
        model.train()
        tb, sb = batches(model, EXAMPLES)
        loss, metrics = model.training_loss(tb, sb, torch.Generator().manual_seed(0))
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), metrics, grads))
    (l0, m0, g0), (l1, m1, g1) = results
    torch.testing.assert_close(l1, l0, atol=ATOL, rtol=0)
    assert m1.keys() == m0.keys() and all(abs(m1[k] - m0[k]) < 1e-4 for k in m0)
    assert g1.keys() == g0.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-5, rtol=1e-4, msg=k)
    assert any(g.abs().sum() > 0 for g in g1.values())


def test_question_from_teacher_matches_the_student_prefix(tiny_llama_dir):
    from kava.model import question_from_teacher

    model = make_model(tiny_llama_dir)
    tb, sb = batches(model, EXAMPLES)
    with torch.no_grad():
        out = model.decoder_stack(input_ids=tb.input_ids, attention_mask=tb.attention_mask,
                                  position_ids=tb.position_ids, use_cache=True)
        q = question_from_teacher(out.cache, out.last_hidden_state, sb.prefix_mask)
        own, _ = model._prefix_pass(sb.prefix_ids, sb.prefix_mask)
    valid = sb.prefix_mask[:, None, :, None]
    for (k, v), layer in zip(q.kv, own.cache.layers):
        torch.testing.assert_close(torch.where(valid, k, 0.0), torch.where(valid, layer.keys, 0.0), atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.where(valid, v, 0.0), torch.where(valid, layer.values, 0.0), atol=ATOL, rtol=0)
    torch.testing.assert_close(q.last_hidden, own.last_hidden_state[:, -1], atol=ATOL, rtol=0)


def test_kv_supervision_all_changes_gradient(tiny_llama_dir):
    grads = {}
    for mode in ("last", "all"):
        model = make_model(tiny_llama_dir, **{"loss.kv_supervision": mode, "loss.alpha_codi": 0.0})
        tb, sb = batches(model, EXAMPLES)
        loss, metrics = model.training_loss(tb, sb)
        assert {"kv_loss_iter_1", "kv_loss_iter_2"} <= set(metrics)
        loss.backward()
        grads[mode] = model.projection.net[0].weight.grad.clone()
    assert not torch.allclose(grads["last"], grads["all"])


def test_save_load_roundtrip(tiny_dir, tmp_path):
    model = make_model(tiny_dir)
    questions = [e.question for e in EXAMPLES]
    before = model.generate(questions, mode="latent", max_new_tokens=5)
    before_cot = model.generate(questions, mode="cot", max_new_tokens=5)
    model.save(tmp_path / "ckpt")
    loaded = KavaModel.load(tmp_path / "ckpt").eval()
    after = loaded.generate(questions, mode="latent", max_new_tokens=5)
    assert [g.token_ids for g in after] == [g.token_ids for g in before]
    assert [g.token_ids for g in loaded.generate(questions, mode="cot", max_new_tokens=5)] == [g.token_ids for g in before_cot]
    for a, b in zip(after, before):
        torch.testing.assert_close(a.latents, b.latents, atol=0, rtol=0)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_load_refuses_mismatched_config(tiny_llama_dir, tmp_path):
    from kava.config import ConfigError

    model = make_model(tiny_llama_dir)
    model.save(tmp_path / "ckpt")
    other = tiny_config(tiny_llama_dir, **{"latent.num_tokens": 7})
    with pytest.raises(ConfigError, match="latent.num_tokens"):
        KavaModel.load(tmp_path / "ckpt", expect=other)


@pytest.mark.parametrize("mode", ["jacobi", "sequential", "direct"])
def test_generation_starts_where_training_ends(tiny_dir, mode):
    """The hidden state that generate() decodes its first answer token from is the one the student CE trains.

    A train/inference mismatch (another prompt, other positions, latents run differently) would make the
    latent accuracy unrelated to what was trained, with every invariant above still green.
    """
    model = make_model(tiny_dir, **({"latent.mode": mode} if mode != "direct" else {}))
    _, sb = batches(model, EXAMPLES)
    with torch.no_grad():
        trained = model.student(sb, use_latents=mode != "direct").hidden[:, -1]  # last layer, at the last P token
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    try:
        model.generate([e.question for e in EXAMPLES], mode="latent" if mode != "direct" else "direct", max_new_tokens=1)
    finally:
        hook.remove()
    torch.testing.assert_close(seen[0], trained, atol=ATOL, rtol=0)


def test_forward_pass_count(tiny_llama_dir):
    model = make_model(tiny_llama_dir, **{"latent.num_iterations": 2})
    for g in model.generate([e.question for e in EXAMPLES], mode="latent", max_new_tokens=4):
        assert g.forward_passes == 1 + 2 + g.tokens
    for g in model.generate([e.question for e in EXAMPLES], mode="cot", max_new_tokens=4):
        assert g.forward_passes == g.tokens


# ---- no work that nothing uses (issue 13, item 3) -----------------------------------------------------------
SKIP_CASES = {
    "kava_last": ("kava", {}),                                          # unsupervised iterations' KV losses
    "kava_all": ("kava", {"loss.kv_supervision": "all"}),               # pass 0's KV loss
    "pccot": ("pccot", {}),                                             # alpha_kv = 0: no capture, no compression
    "codi": ("codi", {}),
    "kava_alpha0": ("kava", {"loss.alpha_kv": 0.0}),
    "rkv_lam0": ("kava", {"eviction.lam": 0.0}),                        # rkv without importance
    "importance": ("kava", {"eviction.method": "importance"}),
    "redundancy": ("kava", {"eviction.method": "redundancy"}),
    "crop": ("kava", {"eviction.method": "crop"}),
    "random": ("kava", {"eviction.method": "random"}),
}


@pytest.mark.parametrize("case", list(SKIP_CASES))
def test_log_metrics_off_skips_unused_work_with_the_same_loss_and_gradients(tiny_llama_dir, case, monkeypatch):
    """``training_loss(log_metrics=False)`` (off logging steps) computes no importance nobody reads, no compression
    when the KV loss has weight 0 and no KV loss of an unsupervised iteration; loss, the metrics it still reports
    and every gradient are bit-identical to the full computation."""
    import kava.attention
    import kava.model
    from kava.eviction import needs_importance

    method, sets = SKIP_CASES[case]
    model = make_model(tiny_llama_dir, method=method, **{"loss.alpha_codi": 1.0, **sets})
    model.train()
    cfg = model.cfg
    calls = {"record": 0, "compress": 0}
    record, compress = kava.attention.ImportanceCapture.record, kava.model.compress_kv

    def counting_record(self, *a, **k):
        calls["record"] += 1
        return record(self, *a, **k)

    def counting_compress(*a, **k):
        calls["compress"] += 1
        return compress(*a, **k)

    monkeypatch.setattr(kava.attention.ImportanceCapture, "record", counting_record)
    monkeypatch.setattr(kava.model, "compress_kv", counting_compress)
    tb, sb = batches(model, EXAMPLES)
    out = {}
    for flag in (True, False):
        calls.update(record=0, compress=0)
        model.zero_grad(set_to_none=True)
        loss, metrics = model.training_loss(tb, sb, torch.Generator().manual_seed(0), log_metrics=flag)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        out[flag] = (loss.detach(), metrics, grads, dict(calls))
    (l1, m1, g1, c1), (l0, m0, g0, c0) = out[True], out[False]
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and g1
    for k in g1:
        assert torch.equal(g0[k], g1[k]), k
    kv_weighted = cfg.loss.alpha_kv != 0
    T = cfg.latent.num_iterations
    iters = set(range(T + 1)) if cfg.latent.mode == "jacobi" else {T}
    # Logging steps: every metric, as before.
    assert {f"kv_loss_iter_{t}" for t in iters} <= m1.keys()
    assert c1["compress"] == 1 and c1["record"] == (model.num_layers if needs_importance(
        cfg.eviction.method, cfg.eviction.lam) else 0)
    # Other steps: only what the loss reads; what is reported equals the full computation's value.
    supervised = {T} if cfg.loss.kv_supervision == "last" else set(range(1, T + 1))
    assert {k for k in m0 if k.startswith("kv_loss_iter_")} == ({f"kv_loss_iter_{t}" for t in supervised}
                                                                  if kv_weighted else set())
    assert c0["compress"] == int(kv_weighted)
    assert c0["record"] == (model.num_layers if kv_weighted and needs_importance(
        cfg.eviction.method, cfg.eviction.lam) else 0)
    for k in m0:
        if kv_weighted or k != "kv":
            assert m0[k] == m1[k], k
    assert case != "rkv_lam0" or c1["record"] == 0  # lam = 0 never captures importance


@pytest.mark.parametrize("mode", ["jacobi", "sequential"])
def test_prefix_cache_by_reference_gives_the_same_loss_and_gradients(tiny_dir, mode, monkeypatch):
    """The latent passes reference the prefix KV instead of copying it into a fresh DynamicCache per iteration
    (``latent._cache_from``): loss, latents and every gradient equal the copying cache's, which was the code before."""
    import kava.latent
    from transformers import DynamicCache

    results = []
    for copy in (True, False):
        model = make_model(tiny_dir, **{"latent.mode": mode, "loss.alpha_kv": 1.0, "loss.kv_supervision": "all"})
        model.train()
        if copy:
            monkeypatch.setattr(kava.latent, "_cache_from", lambda kv: DynamicCache(ddp_cache_data=kv))
        else:
            monkeypatch.undo()
        tb, sb = batches(model, EXAMPLES)
        loss, metrics = model.training_loss(tb, sb, torch.Generator().manual_seed(0))
        loss.backward()
        with torch.no_grad():
            latents = model.latent_reasoning(sb.prefix_ids, sb.prefix_mask).latents
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), metrics, grads, latents))
    (l1, m1, g1, z1), (l0, m0, g0, z0) = results
    assert torch.equal(l0, l1) and m0 == m1 and torch.equal(z0, z1)
    assert g0.keys() == g1.keys() and g1
    for k in g1:
        assert torch.equal(g0[k], g1[k]), k  # the same values through one concatenation fewer: bit-identical


def test_prefix_cache_references_the_prefix_tensors():
    from kava.latent import _cache_from

    kv = [(torch.randn(2, 2, 5, 4)[..., :3, :], torch.randn(2, 2, 3, 4)) for _ in range(2)]
    cache = _cache_from(kv)
    assert cache.get_seq_length() == 3 and len(cache.layers) == 2
    for layer, (k, v) in zip(cache.layers, kv):
        assert layer.keys is k and layer.values is v
    k_new = torch.randn(2, 2, 1, 4)
    keys, _ = cache.layers[0].update(k_new, k_new)
    assert torch.equal(keys, torch.cat([kv[0][0], k_new], -2)) and kv[0][0].shape[-2] == 3  # prefix untouched


def old_masked_ce(hidden, labels, lm_head):
    """The boolean-mask formulation masked_ce had before the host-built label index (two host syncs)."""
    from kava.data.collate import IGNORE

    targets = labels[:, 1:]
    where = targets != IGNORE
    return torch.nn.functional.cross_entropy(lm_head(hidden[:, :-1][where]).float(), targets[where])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_ce_with_the_host_label_index_equals_the_boolean_mask(dtype):
    """Same loss and gradients, bit for bit, as the boolean mask: the same rows in the same order."""
    from kava.data.collate import IGNORE, label_positions
    from kava.model import masked_ce

    g = torch.Generator().manual_seed(0)
    B, N, D, V = 3, 7, 8, 11
    labels = torch.randint(0, V, (B, N), generator=g)
    labels[torch.rand(B, N, generator=g) < 0.4] = IGNORE
    labels[1] = IGNORE  # a row with no label
    labels[2, 0] = 5  # column 0 predicts nothing, labelled or not
    head = torch.nn.Linear(D, V, bias=False).to(dtype)
    out = {}
    for name, fn in {"old": lambda h: old_masked_ce(h, labels, head),
                     "index": lambda h: masked_ce(h, labels, head, label_positions(labels)),
                     "derived": lambda h: masked_ce(h, labels, head)}.items():
        hidden = torch.randn(B, N, D, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_(True)
        head.zero_grad(set_to_none=True)
        loss = fn(hidden)
        loss.backward()
        out[name] = (loss.detach(), hidden.grad, head.weight.grad)
    assert label_positions(labels).numel() == (labels[:, 1:] != IGNORE).sum() > 0
    for name in ("index", "derived"):
        for a, b in zip(out[name], out["old"]):
            assert torch.equal(a, b), name


def test_collated_batches_carry_their_label_index(tiny_llama_dir):
    """The collator builds the CE positions on the host; they move with the batch and count its CE tokens."""
    from kava.data.collate import IGNORE, label_positions

    model = make_model(tiny_llama_dir, **{"loss.student_ce_on_prompt": True})
    tb, sb = model.make_batches(EXAMPLES)
    for labels, batch in ((tb.labels, tb), (sb.suffix_labels, sb)):
        assert torch.equal(batch.label_index, label_positions(labels))
        assert batch.num_labels == int((labels[:, 1:] != IGNORE).sum())
        assert torch.equal(labels.flatten()[batch.label_index], labels[:, 1:][labels[:, 1:] != IGNORE])
    moved = tb.to("cpu", non_blocking=True)
    assert torch.equal(moved.label_index, tb.label_index)
