"""Overhead of importance capture in the teacher forward.

Same model, same batch: ``model.teacher(batch, capture_importance=True)`` (the sdpa wrapper also
computes the answer-query -> CoT-key softmax rows per layer) against
``capture_importance=False`` (the wrapper calls sdpa and returns). Both variants do everything
else ``teacher`` does (KV gather, hidden states, masked CE).

Modes: ``nograd`` = the forward under ``torch.no_grad``; ``grad`` = the forward with autograd on
plus ``ce.backward()`` (what a training step pays; the capture itself runs under no_grad).
Overhead % = 100 * (median over interleaved rounds of t(capture)/t(plain) - 1), on CPU with the
process CPU time (common.interleaved; wall-clock ratio recorded too). Goal: <= 5%.

    python benchmarks/importance_overhead.py            # N = 128 512, hidden-512 8-layer random LLaMA
    python benchmarks/importance_overhead.py --quick
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

GOAL_PCT = 5.0


def make_fns(model, tb, mode: str):
    def fwd(capture: bool):
        def run():
            if mode == "nograd":
                with torch.no_grad():
                    model.teacher(tb, capture_importance=capture)
            else:
                out = model.teacher(tb, capture_importance=capture)
                out.ce.backward()
                model.zero_grad(set_to_none=True)
        return run

    return {"plain": fwd(False), "capture": fwd(True)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "importance_overhead")
    p.add_argument("--teacher-len", type=int, nargs="+", default=None, help="default 128 512")
    p.add_argument("--batch", type=int, default=None, help="default 4")
    p.add_argument("--modes", nargs="+", default=["nograd", "grad"], choices=["nograd", "grad"])
    p.add_argument("--softmax-over", default="cot", choices=["cot", "row"], help="eviction.importance_softmax")
    args = p.parse_args(argv)
    common.finish_common_args(args)
    q = args.quick
    lens = args.teacher_len or ([48] if q else [128, 512])
    batch = args.batch or (2 if q else 4)
    repeats = args.repeats or (2 if q else 15)
    device = torch.device(args.device)
    env = common.env_info(device)  # load average at the start
    with common.tmpdir() as work:
        model = common.build_model(args, work, M=3 if q else 24, T=1 if q else 3,
                                   extra=[f"eviction.importance_softmax={args.softmax_over}"])
    model.train()
    results = []
    for n in lens:
        segs, L = common.synthetic_segments(model, n, batch)
        tb, _ = common.make_batches(model, segs, device)
        with torch.no_grad():  # sanity: capture returns [B, L, Hkv, Nc]; plain returns None
            t = model.teacher(tb, capture_importance=True)
            assert t.importance is not None and t.importance.shape[:2] == (batch, model.num_layers)
        for mode in args.modes:
            fns = make_fns(model, tb, mode)
            both: dict = {}
            times = common.interleaved(fns, repeats=repeats, warmup=args.warmup, device=device, both=both)
            r = common.paired_ratio(times, "capture", "plain")
            row = {
                "teacher_len": n, "batch": batch, "mode": mode,
                "answer_queries": int(tb.query_valid.sum(-1).max()), "cot_keys": int(tb.cot_valid.sum(-1).max()),
                "time_s_median": {k: common.median(v) for k, v in times.items()},
                "clock": both["clock"],
                "time_s_all": {c: both[c] for c in ("wall", "cpu")},
                "wall_ratio": common.paired_ratio(both["wall"], "capture", "plain"),
                "ratio": r["median"], "ratio_quartiles": r,
                "overhead_pct": 100 * (r["median"] - 1),
            }
            row["goals"] = {f"overhead <= {GOAL_PCT}%": row["overhead_pct"] <= GOAL_PCT}
            results.append(row)
            print(f"[importance_overhead] N={n} {mode}: {row['overhead_pct']:+.2f}%", file=sys.stderr, flush=True)

    headers = ["N teacher", "mode", "answer queries x CoT keys", "t(plain) ms", "t(capture) ms",
               "capture/plain (q1-q3)", "overhead %", "goal <= 5%"]
    rows = [[r["teacher_len"], r["mode"], f"{r['answer_queries']} x {r['cot_keys']}",
             1e3 * r["time_s_median"]["plain"], 1e3 * r["time_s_median"]["capture"],
             f"{r['ratio']:.3f} ({r['ratio_quartiles']['q1']:.3f}-{r['ratio_quartiles']['q3']:.3f})",
             r["overhead_pct"], "met" if r["goals"][f"overhead <= {GOAL_PCT}%"] else "missed"] for r in results]
    print(common.markdown_table(headers, rows))
    return common.save_results(args, "importance_overhead", env, common.describe_model(model), repeats, results)


if __name__ == "__main__":
    main()
