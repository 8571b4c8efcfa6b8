"""Inspection of a trained latent model: what the latents decode to, and how close the
student's latent KV is to the compressed teacher KV it was distilled from.

- :func:`decode_latents`: each latent vector through the backbone's final norm and the LM head, top-k
  vocabulary tokens (the paper "decodes each latent through the LM head").
- :func:`kv_similarity`: per layer, the [M, M] cosine similarity between the student's
  latent KV (final iteration) and the compressed teacher CoT KV, averaged over examples.
- :func:`run_analyze`: both, for a checkpoint and a data set; writes heatmaps,
  ``latents.md`` and ``analysis.json``.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from kava.data import Example
from kava.eviction import needs_importance

log = logging.getLogger(__name__)

__all__ = ["decode_latents", "kv_features", "pairwise_kv_cosine", "kv_similarity", "latent_swap_ce", "run_analyze",
           "latent_table"]


# ----------------------------------------------------------------------------
# latents -> tokens
# ----------------------------------------------------------------------------
@torch.no_grad()
def decode_latents(model, latents: torch.Tensor, k: int = 5) -> list[list[list[str]]]:
    """Top-``k`` vocabulary tokens of every latent: ``lm_head(final_norm(latent))``, as the backbone decodes
    its own last hidden state (``model.vocab_logits``).

    latents: ``[B, M, D]`` (``LatentTrace.latents``: the latents the answer attended to) -> ``[B][M][k]``
    decoded token strings (best first).
    """
    if latents.dim() != 3:
        raise ValueError(f"latents: expected shape [B, M, D], got {tuple(latents.shape)}")
    logits = model.vocab_logits(latents).float()
    vocab = len(model.tokenizer)
    logits = logits[..., :vocab]
    k = max(1, min(k, logits.shape[-1]))
    ids = logits.topk(k, dim=-1).indices.tolist()
    tok = model.tokenizer

    def show(i: int) -> str:
        s = tok.decode([i])
        # a lone byte of a multi-byte character decodes to U+FFFD: show the raw token instead
        return tok.convert_ids_to_tokens(i) if "\ufffd" in s else s

    return [[[show(i) for i in slot] for slot in row] for row in ids]


# ----------------------------------------------------------------------------
# KV cosine similarity
# ----------------------------------------------------------------------------
def kv_features(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``[B, L, H, M, d]`` keys and values -> ``[B, L, M, 2*H*d]``: each slot's keys and values,
    concatenated over heads (keys first)."""
    if keys.dim() != 5 or keys.shape != values.shape:
        raise ValueError(f"keys/values: expected equal shapes [B, L, H, M, d], got {tuple(keys.shape)} and {tuple(values.shape)}")
    B, L, H, M, d = keys.shape
    k = keys.transpose(2, 3).reshape(B, L, M, H * d)
    v = values.transpose(2, 3).reshape(B, L, M, H * d)
    return torch.cat([k, v], dim=-1)


def pairwise_kv_cosine(student_keys, student_values, teacher_keys, teacher_values) -> torch.Tensor:
    """Cosine similarity of every student slot i with every teacher slot j: ``[B, L, M_s, M_t]``."""
    s = F.normalize(kv_features(student_keys, student_values).float(), dim=-1)
    t = F.normalize(kv_features(teacher_keys, teacher_values).float(), dim=-1)
    if s.shape[:2] != t.shape[:2] or s.shape[-1] != t.shape[-1]:
        raise ValueError(f"student features {tuple(s.shape)} and teacher features {tuple(t.shape)} do not match")
    return (s @ t.transpose(-1, -2)).clamp(-1.0, 1.0)


def masked_mean_cosine(cos: torch.Tensor, slot_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over the batch of ``cos`` [B, L, M, M] at valid teacher slots, and the count per teacher slot.

    Returns ``(sum [L, M, M], count [M])``; invalid (padding) teacher slots contribute nothing.
    """
    m = slot_mask.to(cos.dtype)  # [B, M]
    return (cos * m[:, None, None, :]).sum(0), m.sum(0)


def _prepare(model, examples: Sequence[Example]) -> list[Example]:
    """What training sees: Drop Last when the config says so (no removals)."""
    from kava.data.filters import apply_filters

    kept, _ = apply_filters(
        examples, drop_last_step=model.cfg.data.drop_last_step, max_tokens=None, count_tokens=None,
        require_numeric_answer=False,
    )
    return kept


@torch.no_grad()
def kv_similarity(model, examples: Sequence[Example], batch_size: int | None = None,
                  prepared: bool = False) -> torch.Tensor:
    """Mean over examples of the per-layer cosine similarity between the student's latent KV
    (final iteration) and the compressed teacher KV: ``[L, M, M]`` (rows: student latents,
    columns: kept teacher entries). Teacher slots that no example fills (CoT shorter than M)
    are NaN. Examples get Drop Last as in training unless ``prepared``.
    """
    from kava.data.collate import collate_segments

    if not examples:
        raise ValueError("kv_similarity: no examples")
    exs = list(examples) if prepared else _prepare(model, examples)
    cfg = model.cfg
    bs = batch_size or cfg.eval.batch_size
    device = next(model.parameters()).device
    enc = model.encoder
    gen = torch.Generator().manual_seed(cfg.train.seed)
    total = count = None
    for s in range(0, len(exs), bs):
        tb, sb = collate_segments([enc.segments(e) for e in exs[s:s + bs]], enc.pad, cfg)  # as training collates
        tb, sb = tb.to(device), sb.to(device)
        trace = model.latent_reasoning(sb.prefix_ids, sb.prefix_mask)
        t = model.teacher(tb, capture_importance=needs_importance(cfg.eviction.method, cfg.eviction.lam))
        comp = model.compress_teacher_kv(t, gen if device.type == "cpu" else None)
        sk, sv = trace.latent_kv[max(trace.latent_kv)]
        cos = pairwise_kv_cosine(sk, sv, comp.keys, comp.values)
        part_sum, part_cnt = masked_mean_cosine(cos, comp.slot_mask.to(cos.device))
        total = part_sum if total is None else total + part_sum
        count = part_cnt if count is None else count + part_cnt
    if float(count.sum()) == 0:
        log.warning("kv_similarity: no example has a CoT; the teacher KV is empty")
    mean = total / count.clamp_min(1)[None, None, :]
    return torch.where(count[None, None, :] > 0, mean, torch.full_like(mean, float("nan"))).cpu()


# ----------------------------------------------------------------------------
# do the latents carry the question?
# ----------------------------------------------------------------------------
@torch.no_grad()
def latent_swap_ce(model, examples: Sequence[Example], batch_size: int | None = None,
                   prepared: bool = False) -> dict[str, float]:
    """Student answer CE with each question's own latents, and with the latents of another question.

    The latent inputs the answer pass consumed (``trace.latents``) are shifted by one within the batch;
    the final latent pass is re-run on each question's own prefix cache, at its own positions, so only
    the latents change. ``ce_swapped - ce_own`` near 0 means the answer does not depend on the latents:
    they carry no question-specific information. Returns the token-weighted means and ``n``.
    Examples get Drop Last as in training unless ``prepared``.
    """
    from kava.data.collate import collate_segments
    from kava.latent import replay_final_pass

    exs = [e for e in (list(examples) if prepared else _prepare(model, examples)) if e.answer]
    if len(exs) < 2:
        raise ValueError("latent_swap_ce: needs at least 2 examples with an answer")
    cfg = model.cfg
    bs = max(2, batch_size or cfg.eval.batch_size)
    device = next(model.parameters()).device
    enc = model.encoder
    sums = {"own": 0.0, "swapped": 0.0}
    tokens = 0
    for s in range(0, len(exs), bs):
        chunk = exs[s:s + bs]
        if len(chunk) < 2:  # a lone last example has nobody to swap with: join it to the previous chunk
            chunk = exs[s - 1:s + 1]
        _, sb = collate_segments([enc.segments(e) for e in chunk], enc.pad, cfg, teacher=False)  # as training
        sb = sb.to(device)
        trace = model.latent_reasoning(sb.prefix_ids, sb.prefix_mask)
        n_tok = int((sb.suffix_labels[:, 1:] != -100).sum())
        for name, z in (("own", trace.latents), ("swapped", trace.latents.roll(1, dims=0))):
            cache = replay_final_pass(model._decoder_fn(), trace, z)
            ce, _ = model.answer_pass(sb, cache, trace.mask, trace.next_position)
            sums[name] += float(ce) * n_tok
        tokens += n_tok
    return {"ce_own": sums["own"] / tokens, "ce_swapped": sums["swapped"] / tokens, "n": len(exs)}


# ----------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------
def _cell(tokens: Sequence[str]) -> str:
    shown = []
    for t in tokens:
        s = "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in t)  # newlines etc. escaped
        s = s.replace("`", "'").replace("|", "\\|")
        shown.append(f"`{s}`" if s.strip() else f"`{s or '∅'}`")
    return " ".join(shown)


def latent_table(rows: Sequence[dict[str, Any]], k: int = 3) -> str:
    """Markdown table: one row per question, one column per latent (its top-``k`` tokens)."""
    if not rows:
        return "(no questions)\n"
    M = len(rows[0]["latent_tokens"])
    head = ["#", "question", "gold", "prediction"] + [f"z{i + 1}" for i in range(M)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        q = r["question"].replace("|", "\\|").replace("\n", " ")
        pred = "-" if r["prediction"] is None else f"{r['prediction']:g}"
        cells = [str(r["index"]), q, str(r["gold"]), pred] + [_cell(z[:k]) for z in r["latent_tokens"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _heatmaps(sim: torch.Tensor, out: Path) -> list[str]:
    from kava.optional import have_matplotlib

    if not have_matplotlib("the KV cosine heatmaps"):
        return []
    # Agg canvases on bare Figures: no pyplot, no global backend switch, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    L, M, _ = sim.shape
    arr = sim.numpy()
    written = []
    for layer in range(L):
        fig = Figure(figsize=(5, 4.2))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(arr[layer], vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
        ax.set_title(f"layer {layer}: KV cosine, student vs teacher", fontsize=10)
        ax.set_xlabel("teacher slot (kept CoT entry)")
        ax.set_ylabel("student latent")
        fig.colorbar(im, ax=ax, label="cosine")
        fig.tight_layout()
        name = f"kv_cosine_layer{layer}.png"
        fig.savefig(out / name, dpi=100)
        written.append(name)
    cols = min(L, 4)
    rows = math.ceil(L / cols)
    fig = Figure(figsize=(3.2 * cols + 1, 3 * rows))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(L)]
    im = None
    for layer, ax in enumerate(axes):
        im = ax.imshow(arr[layer], vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.tick_params(labelsize=6)
    fig.suptitle("cosine(student latent KV, compressed teacher KV)")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(out / "kv_cosine.png", dpi=100)
    written.append("kv_cosine.png")
    return written


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def run_analyze(
    checkpoint: str | Path,
    data: str,
    output_dir: str | Path,
    limit: int = 32,
    question_field: str | None = None,
    answer_field: str | None = None,
    top_k: int = 5,
    batch_size: int | None = None,
    model=None,
) -> dict[str, Any]:
    """Decode latents and measure student/teacher KV similarity on ``limit`` examples of ``data``.

    Writes ``kv_cosine_layer{l}.png`` (and ``kv_cosine.png``, all layers), ``latents.md`` and
    ``analysis.json`` into ``output_dir``; returns the analysis dict.
    """
    from kava.config import ConfigError
    from kava.evaluate import check_checkpoint, load_checkpoint, load_dataset

    if model is None:
        checkpoint = check_checkpoint(checkpoint)
    res = load_dataset(data, question_field, answer_field)
    examples = res.examples[:limit] if limit and limit > 0 else res.examples
    if model is None:
        model = load_checkpoint(checkpoint)
    cfg = model.cfg
    if not cfg.uses_latents:
        raise ConfigError(f"{checkpoint}: method {cfg.method!r} has no latents to analyse (expected kava, pccot or codi)")
    prepared = _prepare(model, examples)
    n_cot = sum(1 for e in prepared if e.steps)
    if n_cot == 0:
        log.warning("%s: no example has a CoT, so there is no teacher KV to compare with "
                    "(use a data set with CoT, e.g. a gsm8k file)", data)
    sim = kv_similarity(model, prepared, batch_size=batch_size, prepared=True)

    bs = batch_size or cfg.eval.batch_size
    rows: list[dict[str, Any]] = []
    for s in range(0, len(prepared), bs):
        chunk = prepared[s:s + bs]
        gens = model.generate([e.question for e in chunk], mode="latent")
        toks = decode_latents(model, torch.stack([g.latents for g in gens]), k=top_k)
        for j, (e, g) in enumerate(zip(chunk, gens)):
            rows.append({
                "index": s + j,
                "question": e.question,
                "gold": e.answer,
                "prediction": g.answer,
                "text": g.text,
                "forward_passes": g.forward_passes,
                "latent_tokens": toks[j],
            })

    swap = latent_swap_ce(model, prepared, batch_size=batch_size, prepared=True) if len(prepared) >= 2 else None

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = _heatmaps(sim, out)
    (out / "latents.md").write_text(
        f"# Latents of `{checkpoint}` on `{data}`\n\n"
        f"Each latent the answer attended to, decoded through the final norm and the LM head "
        f"(top-{min(3, top_k)} tokens; all {top_k} in analysis.json).\n\n"
        + latent_table(rows, k=min(3, top_k))
        + (f"\nAnswer CE with each question's own latents: {swap['ce_own']:.4f}; with another question's latents: "
           f"{swap['ce_swapped']:.4f} (n={swap['n']}). Equal values mean the latents carry nothing the answer uses.\n"
           if swap else "")
    )
    L = sim.shape[0]
    diag = torch.diagonal(sim, dim1=-2, dim2=-1)  # [L, M]
    analysis = {
        "checkpoint": str(checkpoint),
        "data": data,
        "method": cfg.method,
        "n": len(prepared),
        "n_with_cot": n_cot,
        "num_layers": L,
        "num_latents": sim.shape[1],
        "kv_cosine": _nan_to_none(sim.tolist()),
        "kv_cosine_mean_per_layer": _nan_to_none([float(torch.nanmean(sim[layer])) for layer in range(L)]),
        "kv_cosine_diag_mean_per_layer": _nan_to_none([float(torch.nanmean(diag[layer])) for layer in range(L)]),
        "figures": figures,
        "latent_swap": swap,
        "latents": rows,
    }
    (out / "analysis.json").write_text(json.dumps(analysis, indent=1, ensure_ascii=False) + "\n")
    log.info("analysis of %d examples written to %s", len(prepared), out)
    return analysis
