"""Shared helpers for the KaVa benchmarks: model building, synthetic batches, timing, memory, output.

Measurement rules (every benchmark follows them):

- **Ratios within one run.** Absolute times on a shared machine are noisy, so every
  figure we report is a ratio between variants measured in the same process. The
  variants are interleaved ABBA-style (``a b c``, ``c b a``, ``a b c`` ...) after a
  warm-up, and the reported ratio is the **median over rounds of the per-round
  ratio** (both variants of a round ran within seconds of each other). Medians of
  the absolute times are reported too, for orientation only.
- **Clock.** On CPU the primary clock is the process CPU time with one torch thread
  (see :func:`interleaved`: it does not count the time spent waiting for a core
  while other jobs run); wall-clock ratios are recorded beside it. On CUDA: wall
  time between ``torch.cuda.synchronize()`` calls.
- **Peak memory** (:func:`peak_memory`) is the peak of *tensor* bytes allocated
  while the measured call runs, above what was live when it started (weights,
  optimizer state, the batch). On CUDA: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus ``memory_allocated`` before the call. On CPU:
  the same quantity, replayed from the allocation/free events of the PyTorch CPU
  allocator recorded by ``torch.profiler`` (``profile_memory=True``). It counts
  every tensor storage (activations saved for backward, gradients, attention
  maps, temporaries) and nothing else: not Python objects, not oneDNN/MKL scratch
  buffers, not allocator caching. It is deterministic, so it is measured in one
  separate call per variant (the profiler's time overhead does not matter there).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO))

from kava.config import KavaConfig  # noqa: E402
from kava.data.collate import Segments, collate_segments  # noqa: E402
from kava.model import KavaModel  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------
# model shapes and building
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """A LLaMA shape. ``vocab=0`` means: the demo tokenizer's size (no extra rows)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 0
    tie: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES = {
    # For --quick smoke runs: seconds, ratios meaningless.
    "tiny": Shape(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64),
    # The CPU benchmark model: LLaMA-3.2-1B proportions scaled down (head_dim 64, 4 query heads per KV
    # head, MLP 4x, tied embeddings, embedding/LM-head ~26% of all weights as in LLaMA-1B) so that the
    # matmuls, not Python overhead, dominate a training step at 128-512 tokens.
    "small": Shape(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=2048, vocab=16384),
    # The demo's model (kava demo, kava/demo.py DemoSizes): 1.9 M parameters, trained without LoRA.
    "demo": Shape(hidden=192, layers=4, heads=4, kv_heads=2, intermediate=576),
    # LLaMA-3.2-1B shape (random weights), for gpu.sh.
    "llama1b": Shape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256),
}


def setup_threads(n: int | None = None) -> int:
    """Default 1 thread: on this shared 2-core machine, 2 OpenMP threads stall at every barrier whenever
    another job holds a core (a hidden-32 training step measured 500x slower with 2 threads than with 1)."""
    n = n or int(os.environ.get("BENCH_THREADS", "0")) or 1
    torch.set_num_threads(n)
    return n


def corpus_texts(n: int = 300) -> list[str]:
    """Texts of the synthetic demo task (both CoT styles) to train the demo tokenizer on."""
    from kava.data.synthetic import make_splits

    texts: list[str] = []
    for style in ("equations", "nl"):
        train, _ = make_splits(n, 0, seed=123, style=style)
        texts += [e.question for e in train] + [" ".join(e.steps) + " The answer is: " + e.answer for e in train]
    return texts


def write_random_llama(directory: str | Path, shape: Shape, seed: int = 0, dtype: str = "float32") -> Path:
    """A random-weight LlamaForCausalLM of ``shape`` plus the 512-token demo tokenizer, saved to ``directory``.

    With ``shape.vocab`` larger than the tokenizer the extra embedding rows are never fed as input but
    the LM head still computes them (so logits cost what they would with a real vocabulary).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from kava.data.tokenizer import build_demo_tokenizer

    directory = Path(directory)
    tok = build_demo_tokenizer(corpus_texts(), vocab_size=512, save_dir=directory)
    vocab = max(shape.vocab, len(tok))
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=shape.tie,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(DTYPES[dtype])
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def kava_config(model_path: str | Path, dtype: str = "float32", M: int = 24, T: int = 3, lora_r: int = 32,
                extra: Iterable[str] = ()) -> KavaConfig:
    """KaVa defaults (rkv eviction, smooth-L1 KV loss, projection, LoRA on q,k,v,o with alpha/r = 1/4)."""
    sets = [
        f"model.name_or_path={model_path}", f"model.dtype={dtype}",
        f"latent.num_tokens={M}", f"latent.num_iterations={T}",
        f"lora.r={lora_r}", f"lora.alpha={lora_r / 4}",
    ]
    return KavaConfig().override(sets + list(extra))


def build_model(args, workdir: str | Path, M: int, T: int, extra: Iterable[str] = ()) -> KavaModel:
    """KavaModel.from_config on ``--model`` or on a random LLaMA of ``--shape`` written to ``workdir``."""
    if getattr(args, "model", None):
        path = args.model
    else:
        path = write_random_llama(Path(workdir) / "model", SHAPES[args.shape], dtype=args.dtype)
    cfg = kava_config(path, args.dtype, M=M, T=T, lora_r=args.lora_r, extra=extra)
    model = KavaModel.from_config(cfg)
    return model.to(torch.device(args.device))


def describe_model(model: KavaModel) -> dict:
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "hidden": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads, "intermediate": c.intermediate_size, "vocab": c.vocab_size,
        "params": total, "trainable_params": trainable, "lora_r": model.cfg.lora.r,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attn_implementation": model.config._attn_implementation,
    }


# ---------------------------------------------------------------------------
# synthetic batches of an exact teacher length
# ---------------------------------------------------------------------------
@dataclass
class Lengths:
    """Token counts of one synthetic example: teacher = Q + C + A (A = <eot> P answer <eos>)."""

    Q: int
    C: int
    A: int

    @property
    def teacher(self) -> int:
        return self.Q + self.C + self.A

    def student(self, M: int, T: int, shared_question: bool = False) -> int:
        """Tokens the student passes process; the shared question pass (the default) takes Q from the teacher."""
        return (0 if shared_question else self.Q) + (T + 1) * M + self.A


def split_lengths(teacher_len: int, prompt_len: int, q_frac: float = 0.35, c_frac: float = 0.55) -> Lengths:
    """Q ~35%, C ~55%, the rest A (>= the answer prompt + 2 tokens), summing to ``teacher_len``."""
    Q = max(3, round(q_frac * teacher_len))
    C = max(1, round(c_frac * teacher_len))
    A = teacher_len - Q - C
    need = prompt_len + 2
    if A < need:  # short sequences: take the missing answer tokens from the question
        Q -= need - A
        A = need
    if Q < 3 or C < 1:
        raise ValueError(f"teacher_len={teacher_len} is too short for an answer prompt of {prompt_len} tokens")
    return Lengths(Q, C, A)


def synthetic_segments(model: KavaModel, teacher_len: int, batch: int, seed: int = 0) -> tuple[list[Segments], Lengths]:
    """``batch`` examples of exactly ``teacher_len`` teacher tokens with random ordinary token ids."""
    enc = model.encoder
    prompt = [enc.eot] + enc.prompt_ids
    L = split_lengths(teacher_len, len(prompt))
    special = {enc.pad, enc.eos, enc.bot, enc.eot, enc.latent, *enc.bos}
    pool = [i for i in range(len(model.tokenizer)) if i not in special]
    rng = random.Random(seed)
    segs = []
    for _ in range(batch):
        draw = lambda n: [rng.choice(pool) for _ in range(n)]  # noqa: E731
        q = enc.bos + draw(L.Q - 1 - len(enc.bos)) + [enc.bot]
        segs.append(Segments(question=q, cot=draw(L.C), prompt=list(prompt), answer=draw(L.A - len(prompt) - 1) + [enc.eos]))
    assert all(s.teacher_len == teacher_len for s in segs)
    return segs, L


def make_batches(model: KavaModel, segs: list[Segments], device):
    tb, sb = collate_segments(segs, model.encoder.pad, model.cfg)  # collated as training does
    return tb.to(device), sb.to(device)


def flop_floor(teacher_tokens: int, student_tokens: int) -> float:
    """Lower bound of time(KaVa step) / time(CoT-SFT step) from token counts.

    Both steps run forward + backward over every token they process. Under the same cost per
    token, a KaVa step costs (N_teacher + N_student) / N_teacher CoT-SFT steps, with
    N_teacher = Q + C + A and N_student = Q + (T + 1) * M + A (pass 0 over Q <bot> + M latent
    slots, T Jacobi passes over M slots, the answer pass over A = <eot> P answer <eos>); without
    the Q term when the student reuses the teacher's question pass (``train.share_question_pass``).
    """
    return (teacher_tokens + student_tokens) / teacher_tokens


# ---------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def default_clock(device) -> str:
    """``cpu`` (process CPU seconds) on CPU, ``wall`` on CUDA. See :func:`interleaved`."""
    return "wall" if torch.device(device).type == "cuda" else "cpu"


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, device="cpu",
                clock: str | None = None, both: dict | None = None) -> dict[str, list[float]]:
    """Seconds per call of each fn, interleaved ABBA: a b c, c b a, a b c, ...

    ``warmup`` rounds run first and are discarded. Python's GC is collected before and disabled
    during every timed call. Two clocks are read around every call: ``wall``
    (``time.perf_counter``) and ``cpu`` (``time.process_time``: CPU seconds of this process, all
    threads). On a CPU shared with other jobs the wall time of a call includes the time this
    process waited for a core, which comes and goes with the neighbours' load; the CPU time counts
    only the work done, so with one torch thread it is the time the call takes on an idle core
    (cache and memory-bandwidth interference from the neighbours remain). The times of ``clock``
    (default: :func:`default_clock`) are returned; pass ``both={}`` to also get
    ``both["wall"]`` and ``both["cpu"]``.
    """
    clock = clock or default_clock(device)
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
        sync(device)
    rec = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            gc.collect()
            gc.disable()
            try:
                sync(device)
                w0, c0 = time.perf_counter(), time.process_time()
                fns[n]()
                sync(device)
                rec["wall"][n].append(time.perf_counter() - w0)
                rec["cpu"][n].append(time.process_time() - c0)
            finally:
                gc.enable()
    if both is not None:
        both.update(rec)
        both["clock"] = clock
    return rec[clock]


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> dict:
    """Median (and quartiles, and the ratio of the minima) over rounds of times[num][r] / times[den][r]."""
    rs = sorted(a / b for a, b in zip(times[num], times[den]))
    q = statistics.quantiles(rs, n=4, method="inclusive") if len(rs) >= 2 else [rs[0]] * 3
    return {"median": float(statistics.median(rs)), "q1": float(q[0]), "q3": float(q[2]), "n": len(rs),
            "ratio_of_min": float(min(times[num]) / min(times[den]))}


def peak_memory(fn: Callable[[], Any], device) -> int:
    """Peak tensor bytes allocated during ``fn()`` above those live at its start (see module doc)."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            cur += e.nbytes()
            peak = max(peak, cur)
    return int(peak)


@contextlib.contextmanager
def _quiet_profiler():
    """Kineto prints a line on start/stop to fd 2; keep benchmark output clean."""
    try:
        fd = os.dup(2)
    except OSError:  # pragma: no cover
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(fd, 2)
    finally:
        os.close(fd)


def profile_top_ops(fn: Callable[[], Any], top: int = 12) -> list[dict]:
    """Top ops by self CPU time (CUDA time where available) for one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with _quiet_profiler(), profile(activities=acts) as prof:
        fn()
    rows = []
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    for e in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        rows.append({"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                     "share": e.self_cpu_time_total / max(total, 1)})
    return rows


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------
def env_info(device) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    info = {
        "date": _dt.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": list(load) if load else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception:  # pragma: no cover
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    payload.setdefault("env", {})["loadavg_at_end"] = list(load) if load else None
    path.write_text(json.dumps(payload, indent=1, default=_jsonable))
    return path


def save_results(args, benchmark: str, env: dict, model_info: dict, repeats: int, results, **extra) -> dict:
    """The benchmark's JSON (``args.out``): what ran, where, and its results. -> the payload."""
    payload = {"benchmark": benchmark, "env": env, "model": model_info, "args": vars(args), "repeats": repeats,
               "results": results, **extra}
    write_json(args.out, payload)
    print(f"wrote {args.out}", file=sys.stderr)
    return payload


def optimizer_steps(model, grad_clip: float = 2.0) -> Callable:
    """``step(loss_fn, context=nullcontext, host_reads=False, device_guard=False) -> run``: ``run()`` is one AdamW
    step on ``model``'s trainable weights (forward and backward inside ``context()``). A tiny lr: the weights
    barely move, so every round measures the same model (and no denormals). ``host_reads``: read the loss, the
    metrics and the grad norm back every step, as the training loop did before issue 13 item 1 (each read waits
    for the device). ``device_guard``: the step of ``train.nonfinite_guard=device`` (the default on CUDA): fused
    AdamW, skipped on the device when the loss or grad norm is non-finite (``kava.train.step_unless``).
    ``host_guard``: the step of ``train.nonfinite_guard=host``: AdamW, skipped after reading that flag."""
    from kava.train import step_unless

    params = [p for p in model.parameters() if p.requires_grad]
    opts = {False: torch.optim.AdamW(params, lr=1e-7, weight_decay=0.1)}

    def step(loss_fn: Callable, context: Callable = contextlib.nullcontext,
             host_reads: bool = False, device_guard: bool = False, host_guard: bool = False) -> Callable[[], None]:
        if device_guard and True not in opts:
            opts[True] = torch.optim.AdamW(params, lr=1e-7, weight_decay=0.1, fused=True)
        opt = opts[device_guard]

        def run():
            with context():
                loss, metrics = loss_fn()
                loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
            if host_reads:
                loss.item(), dict(metrics), norm.item()
            if device_guard:
                step_unless(opt, ~(torch.isfinite(loss.detach()) & torch.isfinite(norm)))
            elif not host_guard or bool(torch.isfinite(loss.detach()) & torch.isfinite(norm)):
                opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    return step


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def mib(n: float) -> float:
    return n / 2**20


def add_common_args(p, name: str, default_shape: str = "small") -> None:
    p.add_argument("--model", default=None, help="HF model dir or id (default: a random LLaMA of --shape)")
    p.add_argument("--shape", default=default_shape, choices=sorted(SHAPES), help="random LLaMA shape when --model is not given")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per variant (median over rounds)")
    p.add_argument("--warmup", type=int, default=1, help="discarded rounds before timing")
    p.add_argument("--lora-r", type=int, default=32, help="LoRA rank (alpha = r/4)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1, or $BENCH_THREADS)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (ratios meaningless)")
    p.add_argument("--out", default=f"runs/bench/{name}.json", help="JSON results file")


def finish_common_args(args) -> None:
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.quick:
        args.warmup = 0
        if not args.model:
            args.shape = "tiny"
            args.lora_r = 4
    setup_threads(args.threads)


def tmpdir():
    return tempfile.TemporaryDirectory(prefix="kava_bench_")


def is_finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---------------------------------------------------------------------------
# in-memory construction (large random models: no disk round trip) and FLOP counting
# ---------------------------------------------------------------------------
def build_model_in_memory(shape: Shape, cfg: KavaConfig, device, attn: str = "sdpa") -> KavaModel:
    """What ``KavaModel.from_config`` does, with the random LLaMA built directly on ``device``.

    Same steps as from_config/load_backbone: seed, capturing attention wrapper around ``attn``,
    the special tokens, LoRA (peft), the projection head.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from kava.attention import capturing_attention_name
    from kava.backbone import add_special_tokens, apply_lora
    from kava.data.tokenizer import build_demo_tokenizer

    tok = build_demo_tokenizer(corpus_texts(), vocab_size=512)
    lcfg = LlamaConfig(
        vocab_size=max(shape.vocab, len(tok)), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=shape.tie,
    )
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        base = LlamaForCausalLM._from_config(lcfg, attn_implementation=capturing_attention_name(attn),
                                             dtype=DTYPES[cfg.model.dtype])
    base.eval()
    special = add_special_tokens(base, tok)
    lm = apply_lora(base, cfg.lora, list(special.values()))
    return KavaModel(cfg, lm, tok, special).to(device)


def _matmul_params(model: KavaModel) -> tuple[int, int]:
    """(frozen decoder matmul weights, trainable LoRA weights) -- embeddings and LM head excluded."""
    frozen = lora = 0
    for name, p in model.decoder_stack.named_parameters():
        if p.dim() != 2 or "embed_tokens" in name:
            continue
        if "lora_" in name:
            lora += p.numel()
        else:
            frozen += p.numel()
    return frozen, lora


def _pass_counts(passes: list[tuple[int, int, int, int]]) -> tuple[int, int, int]:
    """(tokens, causal (query, key) pairs, logit rows) of ``passes`` = [(rows, new, cached, logits)]."""
    tok = pairs = logits = 0
    for rows, new, cached, lg in passes:
        tok += rows * new
        pairs += rows * (new * cached + new * (new + 1) // 2)
        logits += rows * lg
    return tok, pairs, logits


def train_flops(model: KavaModel, passes: list[tuple[int, int, int, int]]) -> float:
    """Model FLOPs of one LoRA training step (forward + backward), padding excluded.

    ``passes``: one (rows, new_tokens, cached_tokens, logit_positions) per model call; each row
    processes ``new_tokens`` tokens that attend causally to themselves and to ``cached_tokens``
    earlier ones, and ``logit_positions`` per row go through the LM head.

    Forward FLOPs per token: 2 * W_frozen + 2 * W_lora (decoder matmul weights) and per
    (query, key) pair 4 * L * H_q * d_head (Q.K and P.V); per logit position 2 * D * V.
    Backward: the frozen weights (decoder and tied LM head) still need the input gradient,
    1x their forward (no weight gradient); LoRA weights 2x their forward (input and weight
    gradients); attention 2x its forward (dQ, dK, dV). Hence

        step = 4 * W_frozen * tok + 6 * W_lora * tok + 12 * L * H_q * d_head * pairs + 4 * D * V * logits

    (the usual 6 * N * tokens when everything trains; recomputation inside flash kernels is not counted).
    """
    c = model.config
    frozen, lora = _matmul_params(model)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    tok, pairs, logits = _pass_counts(passes)
    return float(4 * frozen * tok + 6 * lora * tok + 12 * c.num_hidden_layers * c.num_attention_heads * head_dim * pairs
                 + 4 * c.hidden_size * c.vocab_size * logits)


def forward_flops(model: KavaModel, passes: list[tuple[int, int, int, int]]) -> float:
    """Forward-only model FLOPs of ``passes`` (same tuples as :func:`train_flops`), padding excluded:
    2 * (W_frozen + W_lora) per token, 4 * L * H_q * d_head per (query, key) pair, 2 * D * V per logit."""
    c = model.config
    frozen, lora = _matmul_params(model)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    tok, pairs, logits = _pass_counts(passes)
    return float(2 * (frozen + lora) * tok + 4 * c.num_hidden_layers * c.num_attention_heads * head_dim * pairs
                 + 2 * c.hidden_size * c.vocab_size * logits)


def gemm_gflops(hidden: int, device, dtype=torch.float32, rows: int = 2048, repeats: int = 5) -> float:
    """Reference matmul rate: [rows, hidden] @ [hidden, 4 * hidden] (an MLP up-projection), median
    over ``repeats`` on :func:`default_clock`. A yardstick for the useful GFLOP/s of a workload."""
    a = torch.randn(rows, hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, 4 * hidden, device=device, dtype=dtype)
    times = interleaved({"mm": lambda: a @ b}, repeats=repeats, warmup=2, device=device)["mm"]
    return 2 * rows * hidden * 4 * hidden / median(times) / 1e9


def latent_generate_passes(Q: int, M: int, T: int, P: int, answer_tokens: int) -> list[tuple[int, int, int, int]]:
    """Model calls of ``generate(mode="latent")`` for one question of Q prefix tokens: pass 0 (Q + M),
    T Jacobi passes (M on Q cached), the ``<eot> P`` pass (1 logit), then answer_tokens - 1 decode steps."""
    out = [(1, Q + M, 0, 0)] + [(1, M, Q, 0)] * T + [(1, P, Q + M, 1)]
    out += [(1, 1, Q + M + P + i, 1) for i in range(answer_tokens - 1)]
    return out


def step_passes(L: Lengths, batch: int, M: int, T: int, answer_prompt_len: int, kava: bool,
                shared_question: bool = False) -> list[tuple[int, int, int, int]]:
    """The model calls of a CoT-SFT step (teacher only) or a KaVa step (teacher + Jacobi student), for train_flops."""
    teacher = [(batch, L.teacher, 0, L.C + L.A)]  # labels on C, <eot>, P, A, <eos>
    if not kava:
        return teacher
    pass0 = (batch, M, L.Q, 0) if shared_question else (batch, L.Q + M, 0, 0)
    student = [pass0] + [(batch, M, L.Q, 0)] * T + [(batch, L.A, L.Q + M, L.A - answer_prompt_len)]
    return teacher + student


# ---------------------------------------------------------------------------
# the trainable-token fixes of docs/perf.md section 5, both now in the library
# ---------------------------------------------------------------------------
def merged_token_rows(model: KavaModel):
    """The generation fix (``KavaModel.merged_token_rows``; ``generate`` always uses it)."""
    return model.merged_token_rows()


def peft_token_rows(model: KavaModel):
    """peft's own trainable-token forward (a V x D merged weight per call) for the duration: the path before
    ``kava/token_rows.py`` became the default, for before/after figures."""
    from kava.token_rows import peft_token_rows as peft_path

    return peft_path(model)


@contextlib.contextmanager
def old_step_path(model: KavaModel, host_syncs: bool = False):
    """The training step as it was before issue 13 items 2-3, for before/after figures: peft's trainable-token
    forward and a DynamicCache that copies the prefix KV in every latent pass. (The third change, skipping
    metric-only work off logging steps, is the caller's ``training_loss(..., log_metrics=True)``.)

    ``host_syncs``: also item 1's, the CE terms on a boolean mask (:func:`boolean_mask_ce`, whose count is read
    back); the per-step reads of the loss, metrics and grad norm are ``optimizer_steps``' ``host_reads``."""
    import kava.latent
    import kava.model
    from transformers import DynamicCache

    new_cache_from, new_ce = kava.latent._cache_from, kava.model.masked_ce
    kava.latent._cache_from = lambda kv: DynamicCache(ddp_cache_data=kv)
    if host_syncs:
        kava.model.masked_ce = boolean_mask_ce
    try:
        with peft_token_rows(model):
            yield
    finally:
        kava.latent._cache_from, kava.model.masked_ce = new_cache_from, new_ce


def boolean_mask_ce(hidden: torch.Tensor, labels: torch.Tensor, lm_head, label_index=None) -> torch.Tensor:
    """``kava.model.masked_ce`` before issue 13 item 1: the labelled positions picked with a boolean mask on the
    device (two reads of its count per call), not the host-built ``label_index``. Same value."""
    import torch.nn.functional as F

    from kava.data.collate import IGNORE

    targets = labels[:, 1:]
    where = targets != IGNORE
    return F.cross_entropy(lm_head(hidden[:, :-1][where]).float(), targets[where])


# ---------------------------------------------------------------------------
# issue 13 item 4: the compiled latent passes (latent.compile)
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def compiled_latents(model: KavaModel, compiled):
    """The KaVa step with ``latent.compile`` on, running ``compiled`` (a ``kava.latent.compile_fixed_pass`` of
    this model) for the duration: variants with different compiled passes can be interleaved on one model."""
    from dataclasses import replace

    cfg, had = model.cfg, model.__dict__.get("_compiled_pass")
    model.cfg = replace(cfg, latent=replace(cfg.latent, compile=True))
    model.__dict__["_compiled_pass"] = compiled
    try:
        yield
    finally:
        model.cfg = cfg
        if had is None:
            model.__dict__.pop("_compiled_pass", None)
        else:
            model.__dict__["_compiled_pass"] = had


def dynamo_counts(functions: int = 1) -> dict:
    """torch._dynamo's counters so far: frames compiled, graphs, graph breaks, and recompilations (frames compiled
    again after a guard failed: frames compiled minus the ``functions`` compiled, here the one latent pass)."""
    from torch._dynamo.utils import counters

    frames = int(counters["frames"].get("ok", 0))
    return {"frames_compiled": frames, "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "recompiles": max(0, frames - functions), "graph_breaks": int(sum(counters["graph_break"].values()))}
