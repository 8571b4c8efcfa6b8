"""Cost of one optimizer step: CoT-SFT vs the KaVa step vs a naive KaVa step.

Variants (same model, same batch, same AdamW + grad clip; one optimizer step each):

  a  cot    CoT-SFT on the teacher sequences alone: ``training_loss(..., teacher_only=True)``.
  b  kava   the KaVa step: ``training_loss(teacher_batch, student_batch)`` (rkv eviction, importance
            captured inside the sdpa wrapper, Jacobi on the cached prefix, logits at labelled positions).
  d  kava_unshared  the KaVa step with ``train.share_question_pass`` off: the student runs its own
            ``Q <bot>`` pass instead of reusing the teacher's (same loss and gradients).
  c  naive  a straightforward implementation of the same loss, written here:
            - the teacher runs twice, in eager attention: once with grad for the CE, once under
              no_grad with ``output_attentions=True`` for the KV / hidden-state targets and for the
              importance, computed from the returned L x H x N x N attention maps;
            - the Jacobi loop recomputes ``Q <bot>`` + latents from scratch in every iteration
              (no prefix-cache reuse); the student passes use sdpa;
            - teacher and student CE take full-vocabulary logits over the whole sequence.

Reported: the ratios b/a, c/b and d/b of time per step (median over interleaved rounds of the
per-round ratio; on CPU of process CPU time, wall-clock ratios beside it, see common.py), of peak tensor memory (common.peak_memory), and the FLOP floor of b/a from
token counts (common.flop_floor): (N_teacher + N_student) / N_teacher with N_teacher = Q + C + A,
N_student = (T+1) M + A (the question pass is the teacher's; Q + (T+1) M + A for d).

    python benchmarks/step_cost.py                    # hidden-512 8-layer random LLaMA, N = 128 512
    python benchmarks/step_cost.py --quick            # smoke test
    python benchmarks/step_cost.py --profile          # + top ops of each variant at the largest N
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from kava.data.collate import IGNORE, positions_from_mask  # noqa: E402
from kava.latent import _split_cache  # noqa: E402
from kava.losses import total_loss  # noqa: E402
from kava.model import KavaModel, TeacherOutput  # noqa: E402

VARIANTS = {"a": "cot", "b": "kava", "c": "naive", "d": "kava_unshared"}
GOALS = {"b/a <= 1.15 x floor": 1.15, "c/b >= 1.5 at 512": 1.5, "mem c/b >= 2 at 512": 2.0}


# ---------------------------------------------------------------------------
# the naive KaVa loss
# ---------------------------------------------------------------------------
def full_vocab_ce(model: KavaModel, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model.lm_head(hidden)  # [B, N, V]: every position, full vocabulary
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def importance_from_maps(attentions, tb, Hkv: int) -> torch.Tensor:
    """[B, L, Hkv, Nc] from eager maps (answer-query rows, CoT columns, softmax over CoT, max per group)."""
    B = tb.input_ids.shape[0]
    out = []
    for att in attentions:  # [B, Hq, N, N]
        Hq, N = att.shape[1], att.shape[-1]
        rows = torch.gather(att, 2, tb.query_index[:, None, :, None].expand(B, Hq, -1, N))  # [B, Hq, Na, N]
        rows = torch.gather(rows, 3, tb.cot_index[:, None, None, :].expand(B, Hq, rows.shape[2], -1))  # [.., Nc]
        rows = rows * tb.cot_valid[:, None, None, :]
        rows = rows / rows.sum(-1, keepdim=True).clamp_min(1e-30)
        w = tb.query_valid[:, None, :, None].to(rows.dtype)
        mean_q = (rows * w).sum(2) / w.sum(2).clamp_min(1.0)  # [B, Hq, Nc]
        out.append(mean_q.view(B, Hkv, Hq // Hkv, -1).amax(2).float())
    return torch.stack(out, 1)


NAIVE_PARTS = ("eager", "twice", "recompute", "full_logits")


def _ce(model: KavaModel, hidden, labels, full: bool):
    if full:
        return full_vocab_ce(model, hidden, labels)
    from kava.model import masked_ce

    return masked_ce(hidden, labels, model.lm_head)


def naive_teacher(model: KavaModel, tb, parts=NAIVE_PARTS) -> TeacherOutput:
    """eager: maps from eager attention (output_attentions) instead of the capturing wrapper;
    twice: CE pass with grad + a no_grad pass for the targets; full_logits: full-vocab CE."""
    base = model.lm.get_base_model()
    previous = base.config._attn_implementation
    eager, twice, full = "eager" in parts, "twice" in parts, "full_logits" in parts
    if eager:
        base.set_attn_implementation("eager")
    try:
        kw = dict(input_ids=tb.input_ids, attention_mask=tb.attention_mask, position_ids=tb.position_ids)
        capture = None
        if not eager:
            from kava.attention import ImportanceCapture

            capture = ImportanceCapture(query_index=tb.query_index, query_valid=tb.query_valid, cot_index=tb.cot_index,
                                        cot_valid=tb.cot_valid, key_valid=tb.attention_mask,
                                        softmax_over=model.cfg.eviction.importance_softmax)
        target_kw = dict(use_cache=True, output_hidden_states=True, output_attentions=eager)
        if capture is not None:
            target_kw["kava_capture"] = capture
        if twice:
            out = model.decoder_stack(**kw, use_cache=False)
            ce = _ce(model, out.last_hidden_state, tb.labels, full)
            with torch.no_grad():
                tgt = model.decoder_stack(**kw, **target_kw)
        else:
            tgt = model.decoder_stack(**kw, **target_kw)
            ce = _ce(model, tgt.last_hidden_state, tb.labels, full)
        with torch.no_grad():
            B = tb.input_ids.shape[0]
            rows = torch.arange(B, device=tb.input_ids.device)
            keys, values = [], []
            for layer in tgt.cache.layers:
                H, d = layer.keys.shape[1], layer.keys.shape[-1]
                gi = tb.cot_index[:, None, :, None].expand(B, H, -1, d)
                keys.append(torch.gather(layer.keys, 2, gi))
                values.append(torch.gather(layer.values, 2, gi))
            hidden = torch.stack([h[rows, tb.prompt_last] for h in tgt.hidden_states[1:]], dim=1)
            if eager:
                importance = importance_from_maps(tgt.attentions, tb, model.config.num_key_value_heads)
            else:
                importance = capture.stacked(model.num_layers)
    finally:
        if eager:
            base.set_attn_implementation(previous)
    return TeacherOutput(ce=ce, cot_keys=torch.stack(keys, 1).detach(), cot_values=torch.stack(values, 1).detach(),
                         cot_valid=tb.cot_valid, hidden=hidden.detach(), importance=importance)


def naive_student(model: KavaModel, sb, parts=NAIVE_PARTS):
    """recompute: Jacobi latents recomputing Q <bot> in every pass (else model.latent_reasoning);
    then the answer pass; full_logits: full-vocab CE over the whole suffix."""
    if "recompute" not in parts:
        s = model.student(sb) if "full_logits" not in parts else None
        if s is not None:
            return s.ce, s.hidden, s.trace.latent_kv
        trace = model.latent_reasoning(sb.prefix_ids, sb.prefix_mask)
        cache, mask, n_next = trace.cache, trace.mask, trace.next_position
        latent_kv = trace.latent_kv
    else:
        lat = model.cfg.latent
        M, T = lat.num_tokens, lat.num_iterations
        B, Nq = sb.prefix_ids.shape
        dev = sb.prefix_ids.device
        n_valid = sb.prefix_mask.long().sum(-1)
        latent_pos = n_valid[:, None] + torch.arange(M, device=dev)[None]
        mask = torch.cat([sb.prefix_mask, sb.prefix_mask.new_ones(B, M)], 1)
        pos = torch.cat([positions_from_mask(sb.prefix_mask), latent_pos], 1)
        prefix_emb = model.embed(sb.prefix_ids)
        z = model.embed(torch.full((B, M), model.special_ids["<latent>"], dtype=torch.long, device=dev))
        latent_kv = {}
        out = model._decode(torch.cat([prefix_emb, z], 1), mask, pos, None)
        _, latent_kv[0] = _split_cache(out.cache, Nq)
        z = model.projection(out.last_hidden_state[:, Nq - 1: Nq + M - 1])
        for t in range(1, T + 1):
            out = model._decode(torch.cat([prefix_emb, z], 1), mask, pos, None)  # the prefix again, from scratch
            _, latent_kv[t] = _split_cache(out.cache, Nq)
            z = torch.cat([z[:, :1], model.projection(out.last_hidden_state[:, Nq:-1])], 1)
        cache, n_next = out.cache, n_valid + M
    ans = model._decode(model.embed(sb.suffix_ids), torch.cat([mask, sb.suffix_mask], 1),
                        positions_from_mask(sb.suffix_mask, n_next), cache, output_hidden_states=True)
    ce = _ce(model, ans.last_hidden_state, sb.suffix_labels, "full_logits" in parts)
    hidden = torch.stack([h[:, sb.prompt_last] for h in ans.hidden_states[1:]], dim=1)
    return ce, hidden, latent_kv


def naive_loss(model: KavaModel, tb, sb, parts=NAIVE_PARTS):
    """The KaVa objective with the naive ``parts`` switched on (all four by default = variant c)."""
    t = naive_teacher(model, tb, parts)
    ce_s, hidden_s, latent_kv = naive_student(model, sb, parts)
    compressed = model.compress_teacher_kv(t)
    return total_loss(ce_student=ce_s, ce_teacher=t.ce, student_h=hidden_s, teacher_h=t.hidden,
                      latent_kv=latent_kv, teacher_kv=compressed, cfg=model.cfg.loss)


# ---------------------------------------------------------------------------
# one optimizer step per variant
# ---------------------------------------------------------------------------
def make_steps(model: KavaModel, tb, sb, grad_clip: float = 2.0, ablations: bool = False):
    step = common.optimizer_steps(model, grad_clip)

    def unshared():
        train_cfg = model.cfg.train
        train_cfg.share_question_pass = False
        try:
            return model.training_loss(tb, sb)
        finally:
            train_cfg.share_question_pass = True

    steps = {
        "a": step(lambda: model.training_loss(tb, sb, teacher_only=True)),
        "b": step(lambda: model.training_loss(tb, sb)),
        "c": step(lambda: naive_loss(model, tb, sb)),
        "d": step(unshared),
    }
    if ablations:  # the KaVa step with one naive ingredient switched on
        for part in NAIVE_PARTS:
            steps[f"b+{part}"] = step(lambda part=part: naive_loss(model, tb, sb, parts=(part,)))
    return steps


def check_naive_matches(model: KavaModel, tb, sb) -> float:
    """|loss(naive) - loss(kava)| with dropout off: the naive step computes the same objective."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            a, _ = model.training_loss(tb, sb)
            b, _ = naive_loss(model, tb, sb)
        return abs(float(a) - float(b))
    finally:
        model.train(was)


def measure_length(model, args, n, batch, M, T, repeats, device, timed: bool = True) -> dict:
    segs, L = common.synthetic_segments(model, n, batch)
    tb, sb = common.make_batches(model, segs, device)
    steps = make_steps(model, tb, sb, ablations=args.ablate)
    P = 1 + len(model.encoder.prompt_ids)
    if not model.cfg.train.share_question_pass:
        raise ValueError("step_cost: variant b is the default KaVa step, with train.share_question_pass on")
    floor = common.flop_floor(L.teacher, L.student(M, T, shared_question=True))
    flop_ratio = (common.train_flops(model, common.step_passes(L, batch, M, T, P, kava=True, shared_question=True))
                  / common.train_flops(model, common.step_passes(L, batch, M, T, P, kava=False)))
    mem = {k: common.peak_memory(fn, device) for k, fn in steps.items()}
    name = lambda k: VARIANTS.get(k, k)  # noqa: E731
    row = {
        "teacher_len": n, "batch": batch, "M": M, "T": T, "timed": timed,
        "tokens": {"Q": L.Q, "C": L.C, "A": L.A, "teacher": L.teacher,
                   "student": L.student(M, T, shared_question=True)},
        "peak_mem_bytes": {name(k): v for k, v in mem.items()},
        "ratios": {"mem_b/a": mem["b"] / mem["a"], "mem_c/b": mem["c"] / mem["b"],
                   "flop_floor_b/a": floor, "model_flop_ratio_b/a": flop_ratio},
        "naive_loss_abs_diff": check_naive_matches(model, tb, sb),
    }
    if args.ablate:
        row["ablation_mem_over_b"] = {f"b+{p}": mem[f"b+{p}"] / mem["b"] for p in NAIVE_PARTS}
    row["goals"] = {}
    if n >= 512:
        row["goals"]["mem c/b >= 2"] = row["ratios"]["mem_c/b"] >= 2.0
    if timed:
        timed_steps = steps if args.ablate else {k: steps[k] for k in "abcd"}
        both: dict = {}
        times = common.interleaved(timed_steps, repeats=repeats, warmup=args.warmup, device=device, both=both)
        r_ba = common.paired_ratio(times, "b", "a")
        r_cb = common.paired_ratio(times, "c", "b")
        r_db = common.paired_ratio(times, "d", "b")
        row.update({
            "clock": both["clock"],
            "time_s_median": {name(k): common.median(v) for k, v in times.items()},
            "time_s_all": {c: {name(k): v for k, v in both[c].items()} for c in ("wall", "cpu")},
            "ratio_quartiles": {"time_b/a": r_ba, "time_c/b": r_cb, "time_d/b": r_db},
            "wall_ratios": {"time_b/a": common.paired_ratio(both["wall"], "b", "a"),
                            "time_c/b": common.paired_ratio(both["wall"], "c", "b")},
        })
        row["ratios"].update({"time_b/a": r_ba["median"], "time_c/b": r_cb["median"], "time_d/b": r_db["median"],
                              "time_b/a_over_floor": r_ba["median"] / floor})
        if args.ablate:
            row["ablation_time_over_b"] = {f"b+{p}": common.paired_ratio(times, f"b+{p}", "b")["median"] for p in NAIVE_PARTS}
        row["goals"]["b/a <= 1.15 x floor"] = row["ratios"]["time_b/a_over_floor"] <= 1.15
        if n >= 512:
            row["goals"]["c/b >= 1.5"] = row["ratios"]["time_c/b"] >= 1.5
        if args.profile and n == max(args.teacher_len):
            row["top_ops"] = {name(k): common.profile_top_ops(steps[k]) for k in "abc"}
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "step_cost")
    p.add_argument("--teacher-len", type=int, nargs="+", default=None, help="teacher tokens per example (default 128 512)")
    p.add_argument("--mem-only-len", type=int, nargs="*", default=[], help="extra lengths: peak memory only, no timing")
    p.add_argument("--batch", type=int, default=None, help="examples per step (default 4)")
    p.add_argument("--M", type=int, default=None, help="latent tokens (default 24)")
    p.add_argument("--T", type=int, default=None, help="Jacobi iterations (default 3)")
    p.add_argument("--ablate", action="store_true",
                   help="also the KaVa step with one naive ingredient at a time (eager, twice, recompute, full_logits)")
    p.add_argument("--profile", action="store_true", help="also record the top ops of each variant at the largest length")
    args = p.parse_args(argv)
    common.finish_common_args(args)
    q = args.quick
    args.teacher_len = args.teacher_len or ([48] if q else [128, 512])
    batch = args.batch or (2 if q else 4)
    M = args.M or (3 if q else 24)
    T = args.T if args.T is not None else (1 if q else 3)
    repeats = args.repeats or (1 if q else 7)
    device = torch.device(args.device)
    env = common.env_info(device)  # load average at the start

    with common.tmpdir() as work:
        model = common.build_model(args, work, M, T)
    model.train()
    info = common.describe_model(model)
    results = []
    for n in args.teacher_len + [x for x in args.mem_only_len if x not in args.teacher_len]:
        row = measure_length(model, args, n, batch, M, T, repeats, device, timed=n in args.teacher_len)
        results.append(row)
        x = row["ratios"]
        print(f"[step_cost] N={n}: b/a={x.get('time_b/a', float('nan')):.3f} (floor {x['flop_floor_b/a']:.3f}) "
              f"c/b={x.get('time_c/b', float('nan')):.3f} d/b={x.get('time_d/b', float('nan')):.3f} mem b/a={x['mem_b/a']:.2f} c/b={x['mem_c/b']:.2f}",
              file=sys.stderr, flush=True)

    headers = ["N teacher", "Q/C/A", "N student", "t(a) s", "t(b) s", "t(c) s", "b/a (q1-q3)", "floor b/a",
               "(b/a)/floor", "c/b (q1-q3)", "d/b (q1-q3)", "mem a MiB", "mem b MiB", "mem c MiB", "mem b/a", "mem c/b"]
    rows = []
    for r in results:
        m, x = r["peak_mem_bytes"], r["ratios"]
        t = r.get("time_s_median", {"cot": "-", "kava": "-", "naive": "-"})
        qt = r.get("ratio_quartiles")
        fmt = (lambda k: f"{x[k]:.3f} ({qt[k]['q1']:.2f}-{qt[k]['q3']:.2f})") if qt else (lambda k: "-")
        rows.append([r["teacher_len"], f"{r['tokens']['Q']}/{r['tokens']['C']}/{r['tokens']['A']}", r["tokens"]["student"],
                     t["cot"], t["kava"], t["naive"], fmt("time_b/a"), x["flop_floor_b/a"],
                     x.get("time_b/a_over_floor", "-"), fmt("time_c/b"), fmt("time_d/b"), common.mib(m["cot"]), common.mib(m["kava"]),
                     common.mib(m["naive"]), x["mem_b/a"], x["mem_c/b"]])
    print(common.markdown_table(headers, rows))
    if args.ablate:
        print()
        print(common.markdown_table(
            ["N teacher", "variant", "mem / mem(b)", "time / time(b)"],
            [[r["teacher_len"], k, v, r.get("ablation_time_over_b", {}).get(k, "-")]
             for r in results for k, v in r["ablation_mem_over_b"].items()]))
    return common.save_results(args, "step_cost", env, info, repeats, results)


if __name__ == "__main__":
    main()
