#!/usr/bin/env bash
# KaVa training-step throughput and MFU on one GPU (prepared for a lent H200), in under 10 minutes.
#
# Model: a random-weight LLaMA-3.2-1B-shaped backbone (hidden 2048, 16 layers, 32 heads, 8 KV heads,
# intermediate 8192, vocab 128256, tied embeddings), bf16 weights, attention = KaVa's capturing
# wrapper around sdpa (and around flash_attention_2 when flash_attn imports). LoRA r=128 (alpha 32)
# on q,k,v,o; batch 16 x 256 teacher tokens (Q/C/A = 35/55/10 %); M=24, T=3.
# Steps timed (fwd + bwd + grad clip + AdamW, interleaved, median): the KaVa step
# (training_loss) and the CoT-SFT step (training_loss(teacher_only=True)).
# Also: latent-eval throughput at batch 1, 8, 32 (32 questions), as in benchmarks/inference.py.
#
# Reports tokens/s and MFU = model FLOPs per step / (time per step * peak). Model FLOPs follow
# benchmarks/common.py:train_flops (LoRA: the frozen base pays forward + input-gradient backward,
# 4 * W * tokens; LoRA weights 6 * W_lora * tokens; attention 3x its forward, 12 * L * H * d * pairs;
# LM head 4 * D * V per logit position). Peak: --peak-tflops, default 989 (H200 bf16 dense).
#
# Usage:
#   bash benchmarks/gpu.sh                 # on the GPU machine (results in $OUT or runs/bench)
#   bash benchmarks/gpu.sh --quick         # CPU smoke test: tiny shape, seconds, MFU not reported
# Python: $PYTHON, else ./.venv/bin/python, else python3. With --make-venv and no usable python,
# a venv with system site-packages is created in .venv-gpu and kava installed into it with its dependency
# ranges, which keep the machine's CUDA torch (needs network access, which the lent machine does not have:
# bring transformers/peft with it).
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
MAKE_VENV=0
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1; ARGS+=("--quick") ;;
    --make-venv) MAKE_VENV=1 ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import torch, transformers, peft, safetensors, yaml, tokenizers" 2>/dev/null; then
  if [[ "$MAKE_VENV" == 1 ]]; then
    python3 -m venv --system-site-packages .venv-gpu
    .venv-gpu/bin/pip install -q -e .
    PY=.venv-gpu/bin/python
  else
    echo "gpu.sh: $PY lacks torch/transformers/peft; set PYTHON=... or pass --make-venv" >&2
    exit 2
  fi
fi
DEFAULT_OUT="${OUT:-runs/bench}/gpu.json"
[[ "$QUICK" == 1 ]] && DEFAULT_OUT="runs/bench/gpu_quick.json"

exec timeout 590 "$PY" - --default-out "$DEFAULT_OUT" "${ARGS[@]}" <<'PYEOF'
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path("benchmarks").resolve()))
import common  # noqa: E402
import torch  # noqa: E402

t_start = time.time()
p = argparse.ArgumentParser()
p.add_argument("--default-out")
p.add_argument("--out", default=None)
p.add_argument("--quick", action="store_true")
p.add_argument("--device", default=None)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--teacher-len", type=int, default=256)
p.add_argument("--M", type=int, default=24)
p.add_argument("--T", type=int, default=3)
p.add_argument("--lora-r", type=int, default=128)
p.add_argument("--repeats", type=int, default=10)
p.add_argument("--peak-tflops", type=float, default=None, help="default 989 on cuda (H200 bf16 dense), none on cpu")
p.add_argument("--budget-s", type=float, default=480, help="stop adding timed rounds after this many seconds")
p.add_argument("--skip-inference", action="store_true")
p.add_argument("--autocast", action="store_true", help="bf16 autocast around the forward, as accelerate's mixed_precision=bf16")
args = p.parse_args()
out_path = args.out or args.default_out
device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
env = common.env_info(device)
if args.quick:
    shape, args.batch, args.teacher_len, args.M, args.T, args.lora_r, args.repeats = common.SHAPES["tiny"], 2, 48, 3, 1, 4, 2
    dtype = "float32"
else:
    shape, dtype = common.SHAPES["llama1b"], "bfloat16"
    if device.type != "cuda":
        print("gpu.sh: no CUDA device; use --quick for the CPU smoke test", file=sys.stderr)
        sys.exit(2)
common.setup_threads(None if device.type == "cpu" else 8)
peak = args.peak_tflops if args.peak_tflops is not None else (989.0 if device.type == "cuda" else None)
if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True

attns = ["sdpa"]
try:
    import flash_attn  # noqa: F401
    if device.type == "cuda":
        attns.append("flash_attention_2")
except Exception:
    pass

cfg = common.kava_config("in-memory", dtype, M=args.M, T=args.T, lora_r=args.lora_r)
model = common.build_model_in_memory(shape, cfg, device, attn="sdpa")
model.train()
info = common.describe_model(model)
segs, L = common.synthetic_segments(model, args.teacher_len, args.batch)
tb, sb = common.make_batches(model, segs, device)
P = 1 + len(model.encoder.prompt_ids)
flops = {
    "cot": common.train_flops(model, common.step_passes(L, args.batch, args.M, args.T, P, kava=False)),
    "kava": common.train_flops(model, common.step_passes(L, args.batch, args.M, args.T, P, kava=True)),
}
tokens = {"cot": args.batch * L.teacher, "kava": args.batch * (L.teacher + L.student(args.M, args.T))}
params = [p_ for p_ in model.parameters() if p_.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-7, weight_decay=0.1)


def step(teacher_only):
    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
            loss, _ = model.training_loss(tb, sb, teacher_only=teacher_only)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run


fns = {"cot": step(True), "kava": step(False)}
results = []
for attn in attns:
    if attn != "sdpa":
        from kava.attention import capturing_attention_name
        try:
            model.lm.get_base_model().set_attn_implementation(capturing_attention_name(attn))
            fns["kava"]()
        except Exception as e:  # flash-attn unusable here: report and go on
            results.append({"attn": attn, "error": repr(e)[:300]})
            continue
    mem = {k: common.peak_memory(fn, device) for k, fn in fns.items()}
    times = {k: [] for k in fns}
    common.interleaved(fns, repeats=0, warmup=2, device=device)
    for r in range(args.repeats):
        if time.time() - t_start > args.budget_s and r >= 2:
            break
        t = common.interleaved(fns, repeats=1, warmup=0, device=device)
        for k in fns:
            times[k] += t[k]
    row = {"attn": attn, "rounds": len(times["cot"]), "variants": {}}
    for k in fns:
        med = common.median(times[k])
        v = {"time_s_median": med, "time_s_all": times[k], "tokens_per_step": tokens[k],
             "tokens_per_s": tokens[k] / med, "model_tflop_per_step": flops[k] / 1e12,
             "achieved_tflops": flops[k] / med / 1e12, "peak_mem_bytes": mem[k]}
        v["mfu"] = v["achieved_tflops"] / peak if peak else None
        row["variants"][k] = v
    row["time_kava/cot"] = common.paired_ratio(times, "kava", "cot")
    row["flop_kava/cot"] = flops["kava"] / flops["cot"]
    row["token_floor_kava/cot"] = common.flop_floor(L.teacher, L.student(args.M, args.T))
    results.append(row)
    print(f"[gpu] {attn}: kava/cot time {row['time_kava/cot']['median']:.3f}", file=sys.stderr, flush=True)

throughput = None
if not args.skip_inference and time.time() - t_start < args.budget_s:
    import inference  # benchmarks/inference.py

    ns = argparse.Namespace(throughput_questions=4 if args.quick else 32, seed=0, warmup=1,
                            throughput_batches=[1, 4] if args.quick else [1, 8, 32])
    from kava.attention import capturing_attention_name
    model.lm.get_base_model().set_attn_implementation(capturing_attention_name("sdpa"))
    model.eval()
    throughput = inference.part_throughput(model, ns, device, repeats=1 if args.quick else 3)

print(f"model: {info}  teacher Q/C/A = {L.Q}/{L.C}/{L.A}, batch {args.batch}, M={args.M}, T={args.T}, device {device}")
rows = []
for r in results:
    if "error" in r:
        rows.append([r["attn"], "error", r["error"][:60], "", "", "", "", ""])
        continue
    for k, v in r["variants"].items():
        rows.append([r["attn"], k, v["time_s_median"] * 1e3, v["tokens_per_s"], v["model_tflop_per_step"],
                     v["achieved_tflops"], f"{100 * v['mfu']:.1f}%" if v["mfu"] is not None else "n/a",
                     common.mib(v["peak_mem_bytes"])])
print(common.markdown_table(["attention", "step", "ms/step", "tokens/s", "model TFLOP/step", "TFLOP/s", "MFU", "peak MiB"], rows))
for r in results:
    if "error" not in r:
        print(f"{r['attn']}: time kava/cot = {r['time_kava/cot']['median']:.3f}, FLOP kava/cot = {r['flop_kava/cot']:.3f}, "
              f"token floor = {r['token_floor_kava/cot']:.3f}")
if throughput:
    print(common.markdown_table(["batch", "questions/s", "speedup vs 1", "efficiency = speedup/batch", "useful GFLOP/s"],
                                [[x["batch"], x["questions_per_s"], x["speedup_vs_b1"], x["efficiency_vs_linear"],
                                  x["useful_gflop_per_s"]] for x in throughput["rows"]]))
payload = {"benchmark": "gpu", "env": env, "model": info, "peak_tflops": peak,
           "args": vars(args), "tokens": {"Q": L.Q, "C": L.C, "A": L.A}, "results": results,
           "throughput": throughput, "wall_s": time.time() - t_start}
common.write_json(out_path, payload)
print(f"wrote {out_path} ({time.time() - t_start:.0f} s)", file=sys.stderr)
PYEOF
