"""Before/after of issue 13 items 1-3 on CPU: the CoT-SFT and KaVa steps on the old and the new path.

Variants (same model and batch, one optimizer step each, interleaved in one run; see common.py):

  a_old / a_new  CoT-SFT step (``training_loss(..., teacher_only=True)``) as before issue 13 / now. Old: peft's
                 trainable-token forward (a V x D copy per embedding / tied-head call), CE on a boolean mask
                 (item 1: its count is read back), loss, metrics and grad norm read back every step. New:
                 ``kava/token_rows.py``, host-built label positions, no reads off logging steps.
  b_old          KaVa step as before: the old path above, plus the prefix KV copied into a fresh cache in every
                 latent pass and every metric computed (``log_metrics=True``, what every step did).
  b_new          KaVa step off a logging step: row forward, prefix KV by reference, ``log_metrics=False``.
  b_log          KaVa step at a logging step on the new path (``log_metrics=True``).
  b_dev          b_new with ``train.nonfinite_guard=device`` (the CUDA default): fused AdamW, skipped on a device
                 flag (``kava.train.step_unless``). b_new has no guard at all; b_hgd is b_new with the host
                 guard (``train.nonfinite_guard=host``, the CPU default: one flag read, then AdamW).

With ``--compiled`` (issue 13 item 4, ``latent.compile``), two more, both b_new with the M-slot passes compiled
(inductor):

  b_comp         the graph training runs: ``dynamic=None`` as ``latent.compile`` sets it, warmed up on a second
                 question length first, so the timed calls run the dynamic-size graph a run compiles at its first
                 change of question length.
  b_cstat        one static graph for this shape (``dynamic=False``), what bucketed question lengths would run.

The compile time (first calls) is reported apart, with dynamo's counts of graphs, recompilations and graph breaks.
``--full-ft`` trains every weight (``lora.enabled=false``), as the demo does; ``--shape demo`` is the demo's model.

    python benchmarks/step_paths.py --teacher-len 512 --repeats 5
    python benchmarks/step_paths.py --shape demo --full-ft --teacher-len 96 --batch 32 --M 6 --T 3 --compiled
    python benchmarks/step_paths.py --quick [--compiled]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

import common  # noqa: E402


def make_steps(model, tb, sb, grad_clip: float = 2.0, compiled: dict | None = None):
    """The variants' optimizer steps; ``compiled``: {variant name: compiled latent pass} for the compiled ones."""
    optimizer_step = common.optimizer_steps(model, grad_clip)

    def step(loss_fn, old: bool, device_guard: bool = False):
        if old:  # the whole pre-issue-13 path, as benchmarks/gpu.sh times it
            return optimizer_step(loss_fn, lambda: common.old_step_path(model, host_syncs=True), host_reads=True)
        return optimizer_step(loss_fn, contextlib.nullcontext, device_guard=device_guard)

    steps = {
        "a_old": step(lambda: model.training_loss(tb, sb, teacher_only=True), old=True),
        "a_new": step(lambda: model.training_loss(tb, sb, teacher_only=True), old=False),
        "b_old": step(lambda: model.training_loss(tb, sb, log_metrics=True), old=True),
        "b_new": step(lambda: model.training_loss(tb, sb, log_metrics=False), old=False),
        "b_log": step(lambda: model.training_loss(tb, sb, log_metrics=True), old=False),
        "b_dev": step(lambda: model.training_loss(tb, sb, log_metrics=False), old=False, device_guard=True),
        "b_hgd": optimizer_step(lambda: model.training_loss(tb, sb, log_metrics=False), host_guard=True),
    }
    for name, fn in (compiled or {}).items():
        steps[name] = optimizer_step(lambda: model.training_loss(tb, sb, log_metrics=False),
                                     lambda fn=fn: common.compiled_latents(model, fn))
    return steps


def warm_compiled(model, steps: dict, compiled: dict, other_len: int, batch: int, device) -> dict:
    """Compile the compiled variants before timing; -> their compile times (process CPU s and wall s).

    b_comp first runs a batch of another question length (compiled static), then this one: that recompiles with
    the varying sizes symbolic, the graph a training run settles on. b_cstat compiles once for this shape.
    """
    out = {}
    for name, fn in compiled.items():
        c0, w0 = time.process_time(), time.perf_counter()
        if name == "b_comp":
            segs, _ = common.synthetic_segments(model, other_len, batch, seed=1)
            tb2, sb2 = common.make_batches(model, segs, device)
            common.optimizer_steps(model)(lambda: model.training_loss(tb2, sb2, log_metrics=False),
                                          lambda: common.compiled_latents(model, fn))()
        steps[name]()
        common.sync(device)
        out[name] = {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "step_paths")
    p.add_argument("--teacher-len", type=int, nargs="+", default=None, help="teacher tokens per example (default 512)")
    p.add_argument("--batch", type=int, default=None, help="examples per step (default 4)")
    p.add_argument("--M", type=int, default=None, help="latent tokens (default 24)")
    p.add_argument("--T", type=int, default=None, help="Jacobi iterations (default 3)")
    p.add_argument("--compiled", action="store_true", help="also b_comp and b_cstat: the latent passes compiled")
    p.add_argument("--full-ft", action="store_true", help="train every weight (lora.enabled=false), as the demo")
    args = p.parse_args(argv)
    common.finish_common_args(args)
    q = args.quick
    lengths = args.teacher_len or ([48] if q else [512])
    batch = args.batch or (2 if q else 4)
    M = args.M or (3 if q else 24)
    T = args.T if args.T is not None else (1 if q else 3)
    repeats = args.repeats or (1 if q else 5)
    device = torch.device(args.device)
    env = common.env_info(device)
    with common.tmpdir() as work:
        model = common.build_model(args, work, M, T, extra=["lora.enabled=false"] if args.full_ft else ())
    model.train()
    compiled = {}
    if args.compiled:
        from kava.latent import compile_fixed_pass

        torch._dynamo.reset()
        compiled = {"b_comp": compile_fixed_pass(model._decoder_fn(), dynamic=None),
                    "b_cstat": compile_fixed_pass(model._decoder_fn(), dynamic=False)}
    results = []
    for n in lengths:
        segs, L = common.synthetic_segments(model, n, batch)
        tb, sb = common.make_batches(model, segs, device)
        steps = make_steps(model, tb, sb, compiled=compiled)
        compile_s = warm_compiled(model, steps, compiled, n + 16, batch, device) if compiled else {}
        both: dict = {}
        times = common.interleaved(steps, repeats=repeats, warmup=args.warmup, device=device, both=both)
        pairs = {"a_new/a_old": ("a_new", "a_old"), "b_new/b_old": ("b_new", "b_old"),
                 "b_log/b_old": ("b_log", "b_old"), "b_old/a_old": ("b_old", "a_old"),
                 "b_new/a_new": ("b_new", "a_new"), "b_dev/b_new": ("b_dev", "b_new"),
                 "b_dev/b_hgd": ("b_dev", "b_hgd")}
        if compiled:
            pairs.update({"b_comp/b_new": ("b_comp", "b_new"), "b_cstat/b_new": ("b_cstat", "b_new"),
                          "b_comp/a_new": ("b_comp", "a_new")})
        ratios = {k: common.paired_ratio(times, *v) for k, v in pairs.items()}
        wall = {k: common.paired_ratio(both["wall"], *v)["median"] for k, v in pairs.items()}
        results.append({"teacher_len": n, "batch": batch, "M": M, "T": T, "clock": both["clock"],
                        "tokens": {"Q": L.Q, "C": L.C, "A": L.A},
                        "time_s_median": {k: common.median(v) for k, v in times.items()},
                        "time_s_all": both, "ratios": ratios, "wall_ratio_medians": wall,
                        "token_floor_b/a": common.flop_floor(L.teacher, L.student(M, T, shared_question=True))})
        if compiled:
            results[-1].update({"compile_s": compile_s, "dynamo": common.dynamo_counts(functions=len(compiled))})
        print(f"[step_paths] N={n}: " + " ".join(f"{k}={r['median']:.3f}" for k, r in ratios.items()),
              file=sys.stderr, flush=True)
    print(common.markdown_table(
        ["N teacher", "ratio", "median", "q1", "q3", "wall median"],
        [[r["teacher_len"], k, v["median"], v["q1"], v["q3"], r["wall_ratio_medians"][k]]
         for r in results for k, v in r["ratios"].items()]))
    return common.save_results(args, "step_paths", env, common.describe_model(model), repeats, results)


if __name__ == "__main__":
    main()
