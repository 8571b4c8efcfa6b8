#!/usr/bin/env bash
# Issue 13's GPU check: the KaVa and CoT-SFT training steps on the old and the new path, on one GPU (prepared
# for a lent H200), within one 10-minute command.
#
#   bash benchmarks/gpu.sh OUT_DIR                # on the GPU machine: OUT_DIR/gpu.json and OUT_DIR/gpu.log
#   bash benchmarks/gpu.sh --quick OUT_DIR        # CPU smoke test: tiny shape, ~30 s of CPU, no MFU
#
# Model: a random-weight LLaMA-3.2-1B-shaped backbone (hidden 2048, 16 layers, 32 heads, 8 KV heads,
# intermediate 8192, vocab 128256, tied embeddings), bf16 weights, bf16 autocast (as mixed_precision=bf16),
# KaVa's capturing wrapper around sdpa. LoRA r=128 (alpha 32) on q,k,v,o; 256 teacher tokens per example
# (Q/C/A = 35/55/10 %); M=24, T=3; the student reuses the teacher's question pass (the default).
#
# Variants, one optimizer step each (fwd + bwd + grad clip + AdamW), interleaved ABBA in one run, per batch size
# (16, then 64):
#   cot_old / kava_old  the library before issue 13 items 1-3: peft's trainable-token forward (a V x D weight
#                       per embedding / tied-head call), the prefix KV copied into a fresh cache in every latent
#                       pass, every metric computed (log_metrics=True), CE on a boolean mask (host syncs), and
#                       the loss, metrics and grad norm read back every step (benchmarks/common.py old_step_path);
#   cot_new / kava_new  the library now, off a logging step (log_metrics=False), with its CUDA default
#                       train.nonfinite_guard=device (fused AdamW, the skip decided on the device: no host read);
#   kava_hguard         kava_new with train.nonfinite_guard=host instead (plain AdamW, one flag read per step):
#                       kava_new/kava_hguard is what the device guard, and auto's choice of it on CUDA, buys;
#   kava_comp           kava_new with latent.compile (issue 13 item 4: the M-slot passes through torch.compile,
#                       the graph latent.compile builds). Compiled after the timed eager rounds' warm-up; its
#                       compile time is reported; --no-compile leaves it out. On failure the error is recorded
#                       and the other variants still run. (--quick compiles with aot_eager: seconds on a CPU.)
#
# Reported per batch size: ms per step (median), tokens/s, model TFLOP per step, MFU = model FLOPs / (time x
# --peak-tflops, default 989 = H200 bf16 dense), peak memory above the live weights/optimizer state, and the
# KaVa/CoT-SFT time ratio (old/old, new/new, comp/new) against its token floor (N_teacher + N_student) / N_teacher.
# Model FLOPs follow benchmarks/common.py:train_flops (LoRA: the frozen base pays forward + input-gradient
# backward, 4 W tok; LoRA weights 6 W tok; attention 12 L H d pairs; LM head 4 D V per logit position).
#
# Time guard: the whole command runs under `timeout 590`; the script stops adding rounds after --budget-s
# (default 500 s) and skips what no longer fits: it compiles only with --compile-reserve-s (200 s) of the budget
# left, and stops a compile (SIGALRM) when --timing-reserve-s (100 s) is all that is left; after one failed or
# stopped compile kava_comp is left out. The JSON is rewritten after every phase, so a run cut short keeps its figures.
#
# Python: $PYTHON, else ./.venv/bin/python, else python3. With --make-venv and no usable python, a venv with
# system site-packages is created in .venv-gpu and kava installed into it with its dependency ranges, which keep
# the machine's CUDA torch (needs network access, which the lent machine does not have: bring transformers/peft).
set -euo pipefail
cd "$(dirname "$0")/.."

MAKE_VENV=0
OUT_DIR=""
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --make-venv) MAKE_VENV=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    --*) ARGS+=("$1")
         # options with a value
         if [[ "$1" =~ ^--(device|batches|teacher-len|M|T|lora-r|repeats|peak-tflops|budget-s|compile-reserve-s|timing-reserve-s|compile-backend)$ ]]; then
           ARGS+=("$2"); shift
         fi ;;
    *) if [[ -n "$OUT_DIR" ]]; then echo "gpu.sh: one output directory, got '$OUT_DIR' and '$1'" >&2; exit 2; fi
       OUT_DIR="$1" ;;
  esac
  shift
done
OUT_DIR="${OUT_DIR:-${OUT:-runs/bench/gpu}}"
mkdir -p "$OUT_DIR"

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
# (an interpreter given as $PYTHON is trusted: the check costs an import of torch and transformers)
if [[ -z "${PYTHON:-}" ]] && ! "$PY" -c "import torch, transformers, peft, safetensors, yaml, tokenizers" 2>/dev/null; then
  if [[ "$MAKE_VENV" == 1 ]]; then
    python3 -m venv --system-site-packages .venv-gpu
    .venv-gpu/bin/pip install -q -e .
    PY=.venv-gpu/bin/python
  else
    echo "gpu.sh: $PY lacks torch/transformers/peft; set PYTHON=... or pass --make-venv" >&2
    exit 2
  fi
fi

set +e
timeout 590 "$PY" - --out-dir "$OUT_DIR" "${ARGS[@]}" 2>&1 <<'PYEOF' | tee "$OUT_DIR/gpu.log"
import argparse
import signal
import sys
import time
import traceback
from pathlib import Path

t_start = time.time()
sys.path.insert(0, str(Path("benchmarks").resolve()))
import common  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--out-dir", required=True)
p.add_argument("--quick", action="store_true", help="tiny shape on the CPU: a smoke test, ratios meaningless")
p.add_argument("--device", default=None)
p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 16 64)")
p.add_argument("--teacher-len", type=int, default=256)
p.add_argument("--M", type=int, default=24)
p.add_argument("--T", type=int, default=3)
p.add_argument("--lora-r", type=int, default=128)
p.add_argument("--repeats", type=int, default=6, help="timed rounds per batch size (fewer when the budget ends)")
p.add_argument("--peak-tflops", type=float, default=None, help="default 989 on cuda (H200 bf16 dense), none on cpu")
p.add_argument("--budget-s", type=float, default=500, help="no new round or phase after this many seconds")
p.add_argument("--compile-reserve-s", type=float, default=200, help="compile only with this many seconds of budget left")
p.add_argument("--timing-reserve-s", type=float, default=100,
               help="a compile is stopped when less than this is left of the budget (for the timed rounds)")
p.add_argument("--no-compile", action="store_true", help="leave out kava_comp (latent.compile)")
p.add_argument("--compile-backend", default=None,
               help="torch.compile backend of kava_comp (default inductor, as latent.compile; aot_eager with --quick)")
p.add_argument("--no-autocast", action="store_true", help="bf16 weights without autocast")
args = p.parse_args()
out_path = Path(args.out_dir) / "gpu.json"
device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
if args.quick:
    shape, dtype = common.SHAPES["tiny"], "float32"
    args.teacher_len, args.M, args.T, args.lora_r, args.repeats = 48, 3, 1, 4, 1
    batches = args.batches or [2, 4]
else:
    shape, dtype = common.SHAPES["llama1b"], "bfloat16"
    batches = args.batches or [16, 64]
    if device.type != "cuda":
        print("gpu.sh: no CUDA device; use --quick for the CPU smoke test", file=sys.stderr)
        sys.exit(2)
autocast = device.type == "cuda" and not args.no_autocast
common.setup_threads(None if device.type == "cpu" else 8)
peak = args.peak_tflops if args.peak_tflops is not None else (989.0 if device.type == "cuda" else None)
env = common.env_info(device)


def left() -> float:
    return args.budget_s - (time.time() - t_start)


def log(msg: str) -> None:
    print(f"[gpu {time.time() - t_start:5.0f}s] {msg}", file=sys.stderr, flush=True)


cfg = common.kava_config("in-memory", dtype, M=args.M, T=args.T, lora_r=args.lora_r)
model = common.build_model_in_memory(shape, cfg, device, attn="sdpa")
model.train()
info = common.describe_model(model)
P = 1 + len(model.encoder.prompt_ids)
shared = model.cfg.train.share_question_pass
optimizer_step = common.optimizer_steps(model, grad_clip=2.0)
compiled = None
if not args.no_compile:
    from kava.latent import compile_fixed_pass

    torch._dynamo.reset()
    backend = args.compile_backend or ("aot_eager" if args.quick else "inductor")
    compiled = compile_fixed_pass(model._decoder_fn(), backend=backend)  # dynamic=None, as latent.compile
log(f"model built: {info['params'] / 1e6:.2f} M parameters, {info['trainable_params'] / 1e6:.2f} M trainable, "
    f"device {device}, autocast {autocast}")

payload = {"benchmark": "gpu", "env": env, "model": info, "peak_tflops": peak, "autocast_bf16": autocast,
           "args": vars(args), "results": [], "complete": False}


def save() -> None:
    payload["wall_s"] = time.time() - t_start
    common.write_json(out_path, payload)


def compile_timeout(signum, frame):
    raise TimeoutError("kava_comp: compiling did not finish within the time budget")


def steps_for(tb, sb) -> dict:
    def loss_fn(teacher_only: bool, log_metrics: bool):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                return model.training_loss(tb, sb, teacher_only=teacher_only, log_metrics=log_metrics)
        return run

    old = lambda: common.old_step_path(model, host_syncs=True)  # noqa: E731
    return {
        "cot_old": optimizer_step(loss_fn(True, True), old, host_reads=True),
        "cot_new": optimizer_step(loss_fn(True, False), device_guard=True),
        "kava_old": optimizer_step(loss_fn(False, True), old, host_reads=True),
        "kava_new": optimizer_step(loss_fn(False, False), device_guard=True),
        "kava_hguard": optimizer_step(loss_fn(False, False), host_guard=True),
        "kava_comp": optimizer_step(loss_fn(False, False), lambda: common.compiled_latents(model, compiled),
                                    device_guard=True),
    }


for batch in batches:
    if left() < 30:
        log(f"batch {batch}: skipped, budget spent")
        payload["results"].append({"batch": batch, "skipped": "time budget"})
        continue
    segs, L = common.synthetic_segments(model, args.teacher_len, batch)
    tb, sb = common.make_batches(model, segs, device)
    student = L.student(args.M, args.T, shared_question=shared)
    tokens = {"cot": batch * L.teacher, "kava": batch * (L.teacher + student)}
    flops = {"cot": common.train_flops(model, common.step_passes(L, batch, args.M, args.T, P, kava=False)),
             "kava": common.train_flops(model, common.step_passes(L, batch, args.M, args.T, P, kava=True,
                                                                   shared_question=shared))}
    row = {"batch": batch, "teacher_len": L.teacher, "tokens": {"Q": L.Q, "C": L.C, "A": L.A, "student": student},
           "token_floor_kava/cot": common.flop_floor(L.teacher, student),
           "flop_kava/cot": flops["kava"] / flops["cot"], "errors": {}}
    payload["results"].append(row)
    fns = steps_for(tb, sb)
    if compiled is None:
        fns.pop("kava_comp")
        if not args.no_compile:
            row["errors"]["kava_comp"] = "skipped: compiling failed at an earlier batch size"
    elif left() < args.compile_reserve_s:
        fns.pop("kava_comp")
        row["errors"]["kava_comp"] = "skipped: not enough time budget left to compile"
    else:
        save()
        allow = int(left() - args.timing_reserve_s)  # the compile may not eat this batch's timed rounds
        t0 = time.time()
        previous = signal.signal(signal.SIGALRM, compile_timeout)
        signal.alarm(max(allow, 1))
        try:
            fns["kava_comp"]()
            common.sync(device)
            row["compile_s"] = time.time() - t0
            row["dynamo"] = common.dynamo_counts()
            log(f"batch {batch}: kava_comp compiled in {row['compile_s']:.0f} s ({row['dynamo']})")
        except Exception as e:  # an untried path on this machine (or out of time): record it, measure the others
            fns.pop("kava_comp")
            row["errors"]["kava_comp"] = "".join(traceback.format_exception_only(e))[:600]
            compiled = None  # no second try at the next batch size
            log(f"batch {batch}: kava_comp failed after {time.time() - t0:.0f} s: {row['errors']['kava_comp']}")
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    mem = {k: common.peak_memory(fn, device) for k, fn in fns.items()}
    common.interleaved(fns, repeats=0, warmup=0 if args.quick else 2, device=device)  # (+1 call: peak memory)
    times = {k: [] for k in fns}
    for r in range(args.repeats):
        if r >= 2 and left() < 0:
            break
        t = common.interleaved(fns, repeats=1, warmup=0, device=device)
        for k in fns:
            times[k] += t[k]
    row["rounds"] = len(times["cot_new"])
    row["variants"] = {}
    for k in fns:
        kind = k.split("_")[0]
        med = common.median(times[k])
        v = {"ms_per_step": med * 1e3, "time_s_all": times[k], "tokens_per_step": tokens[kind],
             "tokens_per_s": tokens[kind] / med, "model_tflop_per_step": flops[kind] / 1e12,
             "achieved_tflops": flops[kind] / med / 1e12, "peak_mem_bytes": mem[k]}
        v["mfu"] = v["achieved_tflops"] / peak if peak else None
        row["variants"][k] = v
    pairs = {"kava_old/cot_old": ("kava_old", "cot_old"), "kava_new/cot_new": ("kava_new", "cot_new"),
             "kava_new/kava_old": ("kava_new", "kava_old"), "cot_new/cot_old": ("cot_new", "cot_old"),
             "kava_new/kava_hguard": ("kava_new", "kava_hguard")}
    if "kava_comp" in fns:
        pairs.update({"kava_comp/cot_new": ("kava_comp", "cot_new"), "kava_comp/kava_new": ("kava_comp", "kava_new")})
    row["ratios"] = {k: common.paired_ratio(times, *v) for k, v in pairs.items()}
    row["kava/cot_over_floor"] = {k: r_["median"] / row["token_floor_kava/cot"]
                                  for k, r_ in row["ratios"].items() if k.startswith("kava") and "/cot_" in k}
    save()
    log(f"batch {batch}: " + ", ".join(f"{k} {r_['median']:.3f}" for k, r_ in row["ratios"].items()))

payload["complete"] = True
save()

print(f"\nmodel: {info}\nteacher {args.teacher_len} tokens, M={args.M}, T={args.T}, device {device}, "
      f"bf16 autocast {autocast}, {env.get('gpu', '')}")
rows = []
for r in payload["results"]:
    for k, v in r.get("variants", {}).items():
        rows.append([r["batch"], k, v["ms_per_step"], v["tokens_per_s"], v["model_tflop_per_step"],
                     f"{100 * v['mfu']:.1f}%" if v["mfu"] is not None else "n/a", common.mib(v["peak_mem_bytes"])])
print(common.markdown_table(["batch", "step", "ms/step", "tokens/s", "model TFLOP/step", "MFU", "peak MiB"], rows))
rows = []
for r in payload["results"]:
    for k, x in r.get("ratios", {}).items():
        over = r["kava/cot_over_floor"].get(k)
        rows.append([r["batch"], k, x["median"], x["q1"], x["q3"], x["n"],
                     r["token_floor_kava/cot"] if over is not None else "", over if over is not None else ""])
print(common.markdown_table(["batch", "time ratio", "median", "q1", "q3", "rounds", "token floor", "ratio / floor"], rows))
for r in payload["results"]:
    for k, e in r.get("errors", {}).items():
        print(f"batch {r['batch']}: {k}: {e}")
print(f"wrote {out_path} ({time.time() - t_start:.0f} s)", file=sys.stderr)
PYEOF
rc=${PIPESTATUS[0]}
exit "$rc"
