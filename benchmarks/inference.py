"""Inference cost: latent generation vs CoT generation, and batched latent-eval throughput.

Part 1 -- latent vs CoT. Same model, same questions (the test split of
``kava.data.synthetic.make_splits``), batch 1 and 16:

- ``cot``: ``model.generate_batch(questions, mode="cot", max_new_tokens=n)`` decodes ``C <eot> P A <eos>``.
- ``latent``: ``model.generate_batch(questions, mode="latent", max_new_tokens=a)``: pass 0 + T Jacobi passes,
  the ``<eot> P`` pass, then ``A <eos>``.

A random-weight model does not stop where a trained one would, so the decode length is forced to
what a trained model writes: n = len(C) + len(<eot> P) + len(A <eos>) and a = len(A <eos>), counted with
the model's tokenizer on the reference solution. The stop test in ``KavaModel._greedy`` compares
each token to ``model.encoder.eos``; while timing we set ``encoder.eos = -1`` (an id ``argmax`` never
returns), so every row decodes exactly ``max_new_tokens`` tokens. A batch decodes until its
longest row is done, so at batch 16 the budget is the batch maximum.

Workloads: ``equations`` (GSM8k-AUG-style CoT), ``nl`` (natural-language CoT, the demo tokenizer
gives ~45 tokens) and ``nl90`` (the NL questions with the CoT length set to ``--nl-cot-len``, 90 by
default, the length scale of GSM8k-AUG-NL CoTs under a LLaMA tokenizer).

Per question (batch 1, from the ``GenerationBatch`` records): forward passes, generated tokens, KV-cache
bytes (GenerationBatch.kv_bytes). Time: median over interleaved rounds of t(cot)/t(latent) (on CPU
process CPU time, wall-clock ratio recorded too; see common.interleaved).
At batch 1 each timed call runs ``--b1-questions`` questions one after another.

Part 2 -- batched latent eval throughput on the same ``--throughput-questions`` (32) questions at
batch 1, 8, 32 (all questions per timed call, sorted by token length as ``kava.evaluate`` does,
answer length forced to the longest answer). Useful GFLOP/s counts the forward FLOPs without
padding (common.forward_flops); a reference matmul rate (common.gemm_gflops) is the yardstick.
speedup(B) = throughput(B) / throughput(1); linear scaling would be speedup(B) = B;
efficiency vs linear = speedup(B) / B. The goal "0.7x linear from batch 1 to 32" is read as
efficiency(32) >= 0.7, i.e. throughput(32) >= 22.4 x throughput(1).

    python benchmarks/inference.py
    python benchmarks/inference.py --quick
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from kava.data.synthetic import make_splits  # noqa: E402

GOALS = {"nl speedup >= 5x": 5.0, "nl pass reduction >= 80%": 80.0, "throughput efficiency(32) >= 0.7": 0.7}


@contextlib.contextmanager
def ignore_eos(model):
    """Every row decodes exactly max_new_tokens tokens (see module doc)."""
    eos = model.encoder.eos
    model.encoder.eos = -1
    try:
        yield
    finally:
        model.encoder.eos = eos


def token_counts(model, examples, cot_len: int | None = None) -> list[dict]:
    """Per example: Q (with BOS and <bot>), C, P (<eot> + prompt), A (answer + <eos>)."""
    out = []
    for ex in examples:
        s = model.encoder.segments(ex)
        c = cot_len if cot_len is not None else len(s.cot)
        out.append({"Q": len(s.question), "C": c, "P": len(s.prompt), "A": len(s.answer)})
    return out


def cot_budget(c: dict) -> int:
    return c["C"] + c["P"] + c["A"]


def gen_fn(model, chunks: list[tuple[list[str], int]], mode: str, records: list | None = None, fix: bool = False):
    """Run generate over each (questions, budget) chunk in turn; keep the GenerationBatch records if asked.
    fix: with the trainable-token rows merged once (common.merged_token_rows, a candidate fix)."""
    def run():
        with ignore_eos(model), (common.merged_token_rows(model) if fix else contextlib.nullcontext()):
            for qs, budget in chunks:
                g = model.generate_batch(qs, mode=mode, max_new_tokens=budget)
                if records is not None:
                    records.append(g)
    return run


def mean(xs) -> float:
    return float(statistics.fmean(xs))


def part_latent_vs_cot(model, args, device, repeats) -> list[dict]:
    M, T = model.cfg.latent.num_tokens, model.cfg.latent.num_iterations
    results = []
    pools = {}
    for style in ("equations", "nl"):
        _, test = make_splits(0, max(args.batch_sizes + [args.b1_questions]), seed=args.seed, style=style)
        pools[style] = test
    workloads = [("equations", "equations", None), ("nl", "nl", None), (f"nl{args.nl_cot_len}", "nl", args.nl_cot_len)]
    if args.quick:
        workloads = workloads[:2]
    if args.workloads:
        workloads = [w for w in workloads if w[0] in args.workloads]
    for name, style, forced in workloads:
        exs = pools[style]
        for bs in args.batch_sizes:
            if bs == 1:
                chosen = exs[: args.b1_questions]
                counts = token_counts(model, chosen, forced)
                chunks_cot = [([e.question], cot_budget(c)) for e, c in zip(chosen, counts)]
                chunks_lat = [([e.question], c["A"]) for e, c in zip(chosen, counts)]
            else:
                chosen = exs[:bs]
                counts = token_counts(model, chosen, forced)
                qs = [e.question for e in chosen]
                chunks_cot = [(qs, max(cot_budget(c) for c in counts))]
                chunks_lat = [(qs, max(c["A"] for c in counts))]
            rec = {"cot": [], "latent": []}
            gen_fn(model, chunks_cot, "cot", rec["cot"])()  # records (also a warm-up)
            gen_fn(model, chunks_lat, "latent", rec["latent"])()
            fns = {"cot": gen_fn(model, chunks_cot, "cot"), "latent": gen_fn(model, chunks_lat, "latent")}
            if args.compare_fix:
                fns.update({"cot+fix": gen_fn(model, chunks_cot, "cot", fix=True),
                            "latent+fix": gen_fn(model, chunks_lat, "latent", fix=True)})
            both: dict = {}
            times = common.interleaved(fns, repeats=repeats, warmup=args.warmup, device=device, both=both)
            r = common.paired_ratio(times, "cot", "latent")

            def per_q(mode, field):
                return mean([x for g in rec[mode] for x in getattr(g, field)])

            passes_cot, passes_lat = per_q("cot", "forward_passes"), per_q("latent", "forward_passes")
            row = {
                "workload": name, "batch": bs, "questions_per_call": len(chosen),
                "tokens_mean": {k: mean([c[k] for c in counts]) for k in ("Q", "C", "P", "A")},
                "budget": {"cot": [b for _, b in chunks_cot], "latent": [b for _, b in chunks_lat]},
                "time_s_median": {k: common.median(v) for k, v in times.items()},
                "clock": both["clock"],
                "time_s_all": {c: both[c] for c in ("wall", "cpu")},
                "wall_speedup": common.paired_ratio(both["wall"], "cot", "latent"),
                "speedup_cot_over_latent": r["median"], "speedup_quartiles": r,
                "forward_passes_per_question": {"cot": passes_cot, "latent": passes_lat},
                "pass_reduction_pct": 100 * (1 - passes_lat / passes_cot),
                "generated_tokens_per_question": {"cot": per_q("cot", "generated_tokens"), "latent": per_q("latent", "generated_tokens")},
                "kv_bytes_per_question": {"cot": per_q("cot", "kv_bytes"), "latent": per_q("latent", "kv_bytes")},
                "expected_passes_per_question": {"cot": mean([cot_budget(c) for c in counts]),
                                                 "latent": mean([1 + T + c["A"] for c in counts])},
                "M": M, "T": T,
            }
            if args.compare_fix:
                row["fix"] = {"cot+fix/cot": common.paired_ratio(times, "cot+fix", "cot")["median"],
                              "latent+fix/latent": common.paired_ratio(times, "latent+fix", "latent")["median"],
                              "speedup_with_fix": common.paired_ratio(times, "cot+fix", "latent+fix")["median"]}
            if name.startswith("nl") and bs == 1:
                row["goals"] = {"speedup >= 5x": row["speedup_cot_over_latent"] >= 5.0,
                                "pass reduction >= 80%": row["pass_reduction_pct"] >= 80.0}
            results.append(row)
            print(f"[inference] {name} bs={bs}: cot/latent time {r['median']:.2f}x, passes "
                  f"{passes_cot:.1f} -> {passes_lat:.1f}", file=sys.stderr, flush=True)
    return results


def part_throughput(model, args, device, repeats) -> dict:
    n = args.throughput_questions
    _, test = make_splits(0, n, seed=args.seed, style="equations")
    # sorted by token length, as kava.evaluate batches them
    test = sorted(test, key=lambda e: len(model.encoder.question_ids(e.question)))
    qs = [e.question for e in test]
    budget = max(c["A"] for c in token_counts(model, test))
    sizes = [b for b in args.throughput_batches if b <= n]
    fix = bool(getattr(args, "fix", False))
    fns = {f"b{b}": gen_fn(model, [(qs[i: i + b], budget) for i in range(0, n, b)], "latent", fix=fix) for b in sizes}
    both: dict = {}
    times = common.interleaved(fns, repeats=repeats, warmup=args.warmup, device=device, both=both)
    lens = [len(model.encoder.question_ids(q)) for q in qs]
    M, T = model.cfg.latent.num_tokens, model.cfg.latent.num_iterations
    P = 1 + len(model.encoder.prompt_ids)
    # useful forward FLOPs of the whole workload (padding excluded), the same at every batch size
    flops = sum(common.forward_flops(model, common.latent_generate_passes(q, M, T, P, budget)) for q in lens)
    out = {"questions": n, "answer_tokens_forced": budget, "batch_sizes": sizes, "useful_gflop": flops / 1e9, "fix": fix,
           "clock": common.default_clock(device), "rows": []}
    for b in sizes:
        # time(b1)/time(b) per round = throughput(b)/throughput(1)
        r = common.paired_ratio(times, "b1", f"b{b}") if b != 1 else {"median": 1.0, "q1": 1.0, "q3": 1.0}
        chunks = [lens[i: i + b] for i in range(0, n, b)]
        pad = 1 - sum(lens) / sum(max(c) * len(c) for c in chunks)
        out["rows"].append({
            "batch": b, "time_s_median": common.median(times[f"b{b}"]),
            "questions_per_s": n / common.median(times[f"b{b}"]),
            "speedup_vs_b1": r["median"], "speedup_quartiles": r,
            "wall_speedup_vs_b1": common.paired_ratio(both["wall"], "b1", f"b{b}")["median"] if b != 1 else 1.0,
            "efficiency_vs_linear": r["median"] / b,
            "time_per_question_vs_b1": 1 / r["median"],
            "prefix_padding_fraction": pad,
            "useful_gflop_per_s": flops / 1e9 / common.median(times[f"b{b}"]),
        })
    out["reference_gemm_gflop_per_s"] = common.gemm_gflops(model.config.hidden_size, device, next(model.parameters()).dtype)
    last = out["rows"][-1]
    out["goals"] = {f"efficiency({last['batch']}) >= 0.7": last["efficiency_vs_linear"] >= 0.7}
    out["clock"] = both["clock"]
    out["time_s_all"] = {c: both[c] for c in ("wall", "cpu")}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "inference")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="latent vs CoT at these batch sizes (1 16)")
    p.add_argument("--b1-questions", type=int, default=None, help="questions per timed call at batch 1 (4)")
    p.add_argument("--nl-cot-len", type=int, default=90, help="forced CoT length of the nlXX workload")
    p.add_argument("--throughput-batches", type=int, nargs="+", default=None, help="(1 8 32)")
    p.add_argument("--throughput-questions", type=int, default=None, help="(32)")
    p.add_argument("--M", type=int, default=None, help="latent tokens (24)")
    p.add_argument("--T", type=int, default=None, help="Jacobi iterations (3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workloads", nargs="+", default=None, help="subset of: equations nl nl90")
    p.add_argument("--compare-fix", action="store_true",
                   help="also time generation with the trainable-token rows merged once per call (candidate fix)")
    p.add_argument("--fix", action="store_true", help="part 2 with the candidate fix (merged trainable-token rows)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--only-throughput", action="store_true", help="skip part 1 (latent vs CoT)")
    args = p.parse_args(argv)
    common.finish_common_args(args)
    q = args.quick
    args.batch_sizes = args.batch_sizes or ([1, 4] if q else [1, 16])
    args.b1_questions = args.b1_questions or (1 if q else 4)
    args.throughput_batches = args.throughput_batches or ([1, 4] if q else [1, 8, 32])
    args.throughput_questions = args.throughput_questions or (4 if q else 32)
    M = args.M or (3 if q else 24)
    T = args.T if args.T is not None else (1 if q else 3)
    repeats = args.repeats or (1 if q else 7)
    device = torch.device(args.device)
    env = common.env_info(device)  # load average at the start
    with common.tmpdir() as work:
        model = common.build_model(args, work, M, T)
    model.eval()

    results = [] if args.only_throughput else part_latent_vs_cot(model, args, device, repeats)
    throughput = None if args.skip_throughput else part_throughput(model, args, device, repeats)

    headers = ["workload", "batch", "CoT tokens (C)", "t(cot)/t(latent)", "passes/q cot", "passes/q latent",
               "pass reduction %", "gen tokens cot", "gen tokens latent", "KV KiB/q cot", "KV KiB/q latent"]
    rows = [[r["workload"], r["batch"], r["tokens_mean"]["C"], r["speedup_cot_over_latent"],
             r["forward_passes_per_question"]["cot"], r["forward_passes_per_question"]["latent"], r["pass_reduction_pct"],
             r["generated_tokens_per_question"]["cot"], r["generated_tokens_per_question"]["latent"],
             r["kv_bytes_per_question"]["cot"] / 1024, r["kv_bytes_per_question"]["latent"] / 1024] for r in results]
    if rows:
        print(common.markdown_table(headers, rows))
    if throughput:
        print()
        print(common.markdown_table(
            ["batch", "questions/s", "speedup vs batch 1", "linear", "efficiency = speedup/batch", "time/question vs batch 1",
             "prefix padding", "useful GFLOP/s"],
            [[x["batch"], x["questions_per_s"], x["speedup_vs_b1"], x["batch"], x["efficiency_vs_linear"],
              x["time_per_question_vs_b1"], x["prefix_padding_fraction"], x["useful_gflop_per_s"]] for x in throughput["rows"]]))
    return common.save_results(args, "inference", env, common.describe_model(model), repeats, results,
                               throughput=throughput)


if __name__ == "__main__":
    main()
