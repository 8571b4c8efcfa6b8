"""Analysis: latent decoding, student/teacher KV cosine maps, files written by run_analyze."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import perturb_trainables, tiny_config
from kava.analyze import (
    decode_latents, kv_features, kv_similarity, latent_swap_ce, masked_mean_cosine, pairwise_kv_cosine, run_analyze,
)
from kava.config import ConfigError
from kava.data import Example
from kava.eviction import CompressedKV
from kava.model import KavaModel

M, L = 3, 2  # tiny_config: latent.num_tokens=3; the tiny model has 2 layers

EXAMPLES = [
    Example("Tom has 5 apples and buys 3 more. How many apples does he have?", ["<<5+3=8>>", "<<8*2=16>>"], "16"),
    Example("Sara reads 12 pages", ["<<12*4=48>>"], "48"),
    Example("Each box holds 7 pens. There are 9 boxes, 3 are empty. How many pens?",
            ["<<9-3=6>>", "<<6*7=42>>", "<<42+1=43>>"], "42"),
    Example("A cat", ["<<1+1=2>>"], "2"),
]


@pytest.fixture(scope="module")
def checkpoint(tiny_llama_dir, tmp_path_factory) -> Path:
    model = KavaModel.from_config(tiny_config(tiny_llama_dir, **{"eval.max_answer_tokens": 3}))
    perturb_trainables(model)
    return model.save(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def model(checkpoint) -> KavaModel:
    return KavaModel.load(checkpoint).eval()


def test_kv_features_concatenate_heads():
    B, H, d = 2, 3, 4
    k = torch.randn(B, L, H, M, d)
    v = torch.randn(B, L, H, M, d)
    f = kv_features(k, v)
    assert f.shape == (B, L, M, 2 * H * d)
    assert torch.equal(f[1, 0, 2, :d], k[1, 0, 0, 2])
    assert torch.equal(f[1, 0, 2, d:2 * d], k[1, 0, 1, 2])
    assert torch.equal(f[1, 0, 2, H * d:H * d + d], v[1, 0, 0, 2])


def test_identical_kv_gives_unit_diagonal():
    torch.manual_seed(0)
    B, H, d = 3, 2, 5
    k = torch.randn(B, L, H, M, d)
    v = torch.randn(B, L, H, M, d)
    cos = pairwise_kv_cosine(k, v, k.clone(), v.clone())
    assert cos.shape == (B, L, M, M)
    assert torch.allclose(torch.diagonal(cos, dim1=-2, dim2=-1), torch.ones(B, L, M), atol=1e-6)
    assert cos.min() >= -1 and cos.max() <= 1
    # permuting the teacher slots moves the ones accordingly; negating gives -1
    perm = torch.tensor([2, 0, 1])
    cos_p = pairwise_kv_cosine(k, v, k[..., perm, :], v[..., perm, :])
    for j, i in enumerate(perm.tolist()):
        assert torch.allclose(cos_p[..., i, j], torch.ones(B, L), atol=1e-6)
    assert torch.allclose(torch.diagonal(pairwise_kv_cosine(k, v, -k, -v), dim1=-2, dim2=-1), -torch.ones(B, L, M), atol=1e-6)


def test_masked_mean_skips_padding_slots():
    cos = torch.stack([torch.full((L, M, M), 0.5), torch.full((L, M, M), -0.5)])  # [B=2, L, M, M]
    slot_mask = torch.tensor([[True, True, False], [True, False, False]])
    total, count = masked_mean_cosine(cos, slot_mask)
    assert count.tolist() == [2, 1, 0]
    mean = total / count.clamp_min(1)
    assert torch.allclose(mean[..., 0], torch.zeros(L, M))  # (0.5 - 0.5) / 2
    assert torch.allclose(mean[..., 1], torch.full((L, M), 0.5))  # only example 0 fills slot 1
    assert torch.allclose(mean[..., 2], torch.zeros(L, M))  # nothing (the caller turns this into NaN)


def test_kv_similarity_shape_and_range(model):
    sim = kv_similarity(model, EXAMPLES, batch_size=2)
    assert sim.shape == (L, M, M)
    finite = sim[torch.isfinite(sim)]
    assert finite.numel() > 0
    assert finite.min() >= -1 and finite.max() <= 1
    # every example has >= 1 CoT token, so slot 0 is always filled
    assert torch.isfinite(sim[..., 0]).all()


def test_kv_similarity_of_identical_kv_is_one_on_the_diagonal(model, monkeypatch):
    """Make the 'teacher' return the student's own latent KV: the whole pipeline must line up slots."""
    stash = {}
    real = model.latent_reasoning

    def latent_reasoning(prefix_ids, prefix_mask, keep_history=False):
        trace = real(prefix_ids, prefix_mask, keep_history)
        stash["kv"] = trace.latent_kv[max(trace.latent_kv)]
        return trace

    def compress(t, generator=None):
        k, v = stash["kv"]
        B = k.shape[0]
        return CompressedKV(keys=k.clone(), values=v.clone(), index=torch.zeros(B, L, k.shape[2], M, dtype=torch.long),
                            slot_mask=torch.ones(B, M, dtype=torch.bool))

    monkeypatch.setattr(model, "latent_reasoning", latent_reasoning)
    monkeypatch.setattr(model, "compress_teacher_kv", compress)
    sim = kv_similarity(model, EXAMPLES, batch_size=3)
    assert torch.allclose(torch.diagonal(sim, dim1=-2, dim2=-1), torch.ones(L, M), atol=1e-5)
    assert sim.min() >= -1 and sim.max() <= 1


def test_decode_latents(model):
    gens = model.generate([e.question for e in EXAMPLES[:2]], mode="latent")
    toks = decode_latents(model, torch.stack([g.latents for g in gens]), k=4)
    assert len(toks) == 2 and all(len(row) == M for row in toks)
    assert all(len(slot) == 4 and all(isinstance(t, str) for t in slot) for row in toks for slot in row)
    # a latent equal to a token's embedding direction, scaled up, decodes to that token (tied LM head)
    emb = model.lm_head.weight
    tid = model.tokenizer.convert_tokens_to_ids("<s>")
    z = (emb[tid] / emb[tid].norm() * 1e3)[None, None]
    with torch.no_grad():
        best = int(model.lm_head(model.final_norm(z)).argmax())
    assert decode_latents(model, z, k=1)[0][0][0] == model.tokenizer.decode([best])


def test_decode_latents_applies_the_final_norm(tiny_llama_dir):
    """Latents are decoded as the backbone decodes its last hidden state: lm_head(norm(z)), not lm_head(z)."""
    model = KavaModel.from_config(tiny_config(tiny_llama_dir))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a norm gain far from 1 (the random tiny model starts at all ones)
        model.final_norm.weight.copy_(torch.randn(model.final_norm.weight.shape, generator=g) * 3)
    z = torch.randn(2, 8, model.config.hidden_size, generator=g)
    with torch.no_grad():
        normed = model.lm_head(model.final_norm(z))[..., :len(model.tokenizer)].argmax(-1)
        raw = model.lm_head(z)[..., :len(model.tokenizer)].argmax(-1)
    assert not torch.equal(normed, raw)  # the check below can tell the two apart
    tok = model.tokenizer

    def shown(i: int) -> str:  # decode_latents shows the raw token for a lone byte of a multi-byte character
        return tok.convert_ids_to_tokens(i) if "\ufffd" in tok.decode([i]) else tok.decode([i])

    decoded = decode_latents(model, z, k=1)
    assert [[slot[0] for slot in row] for row in decoded] == [[shown(int(i)) for i in row] for row in normed]


def test_kv_similarity_collates_as_training_does(tiny_llama_dir, monkeypatch):
    """eviction.importance_queries reaches the analysis' teacher batches (not the collate default)."""
    model = KavaModel.from_config(tiny_config(tiny_llama_dir, **{"eviction.importance_queries": "answer"}))
    model.eval()
    seen = []
    real = model.teacher
    monkeypatch.setattr(model, "teacher", lambda tb, **kw: seen.append(tb) or real(tb, **kw))
    kv_similarity(model, EXAMPLES, batch_size=len(EXAMPLES), prepared=True)
    trained, _ = model.make_batches(EXAMPLES)
    assert torch.equal(seen[0].query_index, trained.query_index)
    assert torch.equal(seen[0].query_valid, trained.query_valid)


def test_run_analyze_writes_files(checkpoint, tmp_path):
    data = tmp_path / "cot.jsonl"
    data.write_text("".join(json.dumps({"question": e.question, "steps": e.steps, "answer": e.answer}) + "\n"
                            for e in EXAMPLES))
    out = tmp_path / "analysis"
    res = run_analyze(checkpoint, str(data), out, limit=3, top_k=4)
    for layer in range(L):
        assert (out / f"kv_cosine_layer{layer}.png").stat().st_size > 0
    assert (out / "kv_cosine.png").is_file()
    on_disk = json.loads((out / "analysis.json").read_text())
    assert on_disk["n"] == 3 and on_disk["num_layers"] == L and on_disk["num_latents"] == M
    arr = on_disk["kv_cosine"]
    assert len(arr) == L and all(len(r) == M and all(len(c) == M for c in r) for r in arr)
    vals = [x for r in arr for c in r for x in c if x is not None]
    assert vals and all(-1 <= x <= 1 for x in vals)
    assert len(on_disk["latents"]) == 3
    assert all(len(r["latent_tokens"]) == M and len(r["latent_tokens"][0]) == 4 for r in on_disk["latents"])
    md = (out / "latents.md").read_text()
    assert "| # | question | gold | prediction | z1 | z2 | z3 |" in md
    assert md.count("\n| ") >= 1 + 3 and EXAMPLES[1].question in md
    assert res["kv_cosine_diag_mean_per_layer"] == on_disk["kv_cosine_diag_mean_per_layer"]
    assert all(x is None or math.isfinite(x) for x in res["kv_cosine_mean_per_layer"])


def test_run_analyze_refuses_a_model_without_latents(model, tmp_path):
    data = tmp_path / "cot.jsonl"
    data.write_text(json.dumps({"question": "A cat", "steps": ["<<1+1=2>>"], "answer": "2"}) + "\n")

    class NoLatents:
        cfg = model.cfg.override(["method=nocot"])

    with pytest.raises(ConfigError, match="no latents"):
        run_analyze("x", str(data), tmp_path / "o", model=NoLatents())


@pytest.mark.parametrize("mode,ce_on_prompt", [("jacobi", False), ("sequential", False), ("jacobi", True)])
def test_latent_swap_own_is_the_training_ce_and_a_swap_changes_it(tiny_llama_dir, mode, ce_on_prompt):
    model = KavaModel.from_config(tiny_config(tiny_llama_dir, **{"latent.mode": mode,
                                                                 "loss.student_ce_on_prompt": ce_on_prompt}))
    perturb_trainables(model)
    model.eval()
    res = latent_swap_ce(model, EXAMPLES, batch_size=len(EXAMPLES), prepared=True)
    _, sb = model.make_batches(EXAMPLES)  # as training collates (loss.student_ce_on_prompt)
    with torch.no_grad():
        trained = float(model.student(sb).ce)
    assert res["n"] == len(EXAMPLES)
    assert res["ce_own"] == pytest.approx(trained, abs=1e-5)  # the re-run last pass reproduces training
    assert abs(res["ce_swapped"] - res["ce_own"]) > 1e-4      # and the answer reads the latents
