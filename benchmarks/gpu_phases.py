"""Where the KaVa step's time goes on a GPU: teacher forward, student forward, eviction, loss, backward.

Same LLaMA-1B-shaped model and batch as benchmarks/gpu.sh. Each phase is timed with CUDA synchronisation
around it (median over rounds), then one step runs under torch.profiler: top ops by self CUDA time and by
self CPU time. Run on the GPU machine: ``python3 benchmarks/gpu_phases.py --out $OUT/gpu_phases.json``;
``--quick`` runs a tiny shape on the CPU (smoke test).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--out", default="runs/bench/gpu_phases.json")
p.add_argument("--quick", action="store_true")
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--autocast", action="store_true", help="bf16 autocast around the forward, as accelerate's mixed_precision=bf16")
args = p.parse_args()
device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
if args.quick:
    shape, dtype, batch, tlen, M, T, r = common.SHAPES["tiny"], "float32", 2, 48, 3, 1, 4
else:
    shape, dtype, batch, tlen, M, T, r = common.SHAPES["llama1b"], "bfloat16", 16, 256, 24, 3, 128
cfg = common.kava_config("in-memory", dtype, M=M, T=T, lora_r=r)
model = common.build_model_in_memory(shape, cfg, device, attn="sdpa")
model.train()
segs, L = common.synthetic_segments(model, tlen, batch)
tb, sb = common.make_batches(model, segs, device)
from kava.losses import total_loss  # noqa: E402


def phases() -> dict[str, float]:
    out = {}

    def mark(name, t0):
        common.sync(device)
        out[name] = time.perf_counter() - t0
        return time.perf_counter()

    common.sync(device)
    t = time.perf_counter()
    ac = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast)
    ac.__enter__()
    # As KavaModel.training_loss: the student reuses the teacher's question pass when the config says so.
    share = model.cfg.train.share_question_pass
    teacher = model.teacher(tb, question_mask=sb.prefix_mask if share else None)
    t = mark("teacher_forward", t)
    student = model.student(sb, question=teacher.question)
    t = mark("student_forward", t)
    compressed = model.compress_teacher_kv(teacher)
    t = mark("compress_teacher_kv", t)
    loss, _ = total_loss(ce_student=student.ce, ce_teacher=teacher.ce, student_h=student.hidden,
                         teacher_h=teacher.hidden, latent_kv=student.trace.latent_kv, teacher_kv=compressed,
                         cfg=model.cfg.loss)
    t = mark("losses", t)
    ac.__exit__(None, None, None)
    loss.backward()
    t = mark("backward", t)
    model.zero_grad(set_to_none=True)
    return out


def teacher_only() -> float:
    common.sync(device)
    t = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
        loss, _ = model.training_loss(tb, sb, teacher_only=True)
    loss.backward()
    model.zero_grad(set_to_none=True)
    common.sync(device)
    return time.perf_counter() - t


for _ in range(2):
    phases()
    teacher_only()
rounds = [phases() for _ in range(args.rounds)]
cot = [teacher_only() for _ in range(args.rounds)]
med = {k: common.median([r_[k] for r_ in rounds]) for k in rounds[0]}
total = sum(med.values())
cot_med = common.median(cot)
rows = [[k, v * 1e3, f"{100 * v / total:.1f}%", v / cot_med] for k, v in med.items()]
rows.append(["KaVa step (sum)", total * 1e3, "100%", total / cot_med])
rows.append(["CoT-SFT step (teacher only, fwd+bwd)", cot_med * 1e3, "", 1.0])
print(common.markdown_table(["phase", "ms (median)", "share", "x CoT-SFT step"], rows))


def one_step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
        loss, _ = model.training_loss(tb, sb)
    loss.backward()
    model.zero_grad(set_to_none=True)
    common.sync(device)


from torch.profiler import ProfilerActivity, profile  # noqa: E402

acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
with common._quiet_profiler(), profile(activities=acts) as prof:
    one_step()
ka = prof.key_averages()
top = {}
for key in (["self_device_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total"]:
    tot = sum(getattr(e, key) for e in ka)
    top[key] = [{"op": e.key, "calls": e.count, "ms": getattr(e, key) / 1e3, "share": getattr(e, key) / max(tot, 1)}
                for e in sorted(ka, key=lambda e: getattr(e, key), reverse=True)[:15]]
    print(f"\ntop ops by {key} (total {tot / 1e3:.1f} ms)")
    print(common.markdown_table(["op", "calls", "ms", "share"], [[x["op"][:60], x["calls"], x["ms"], f"{100 * x['share']:.1f}%"]
                                                                 for x in top[key]]))
common.write_json(args.out, {"benchmark": "gpu_phases", "env": common.env_info(device), "phases_ms": {k: v * 1e3 for k, v in med.items()},
                             "cot_step_ms": cot_med * 1e3, "top_ops": top,
                             "shape": {"batch": batch, "teacher_len": tlen, "M": M, "T": T, "lora_r": r}})
