"""Evaluation: batched greedy generation, numeric answer matching, reports.

``evaluate`` scores one list of examples with a loaded :class:`~kava.model.KavaModel`;
``run_eval`` loads a checkpoint, evaluates it on benchmarks or files and writes
``report.json``, ``report.md`` and ``predictions.jsonl``.

The prediction is the first number after the answer prompt P (METHOD.md). In
``latent`` and ``direct`` mode the model is fed ``<eot> P`` and the decoded text
already starts after P; in ``cot`` mode the model writes ``C <eot> P A`` and the
answer is read from what follows the first P in the decoded text (no P, no
prediction).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from kava.answers import answers_match, extract_answer, parse_number, wilson_ci
from kava.data import Example

log = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "REPORT_KEYS",
    "DatasetReport",
    "Prediction",
    "evaluate",
    "run_eval",
    "resolve_mode",
    "load_dataset",
    "answer_text",
    "format_markdown",
]

MODES = ("latent", "direct", "cot")
# Exactly the keys of one dataset's entry in report.json.
REPORT_KEYS = ("accuracy", "ci95", "n", "forward_passes_mean", "tokens_mean", "latency_s_mean", "kv_bytes_mean")


@dataclass
class DatasetReport:
    """Summary of one dataset. ``ci95`` is the Wilson 95% interval of ``accuracy``; means are per question."""

    accuracy: float
    ci95: list[float]
    n: int
    forward_passes_mean: float
    tokens_mean: float
    latency_s_mean: float
    kv_bytes_mean: float

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in REPORT_KEYS}


@dataclass
class Prediction:
    """One question's outcome (``index`` is its position in the input list)."""

    index: int
    question: str
    gold: str
    prediction: float | None
    correct: bool
    text: str
    forward_passes: int
    tokens: int
    kv_bytes: int
    latency_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_mode(method: str, requested: str = "latent") -> str:
    """The generation mode for a checkpoint trained with ``method``.

    ``latent`` means "the checkpoint's own way of answering": latents for
    kava/pccot/codi, ``direct`` (no latents) for nocot, ``cot`` for cot.
    ``cot`` and ``direct`` are honoured for any checkpoint.
    """
    if requested not in MODES:
        raise ValueError(f"mode={requested!r}: expected one of {', '.join(MODES)}")
    if requested != "latent":
        return requested
    return {"nocot": "direct", "cot": "cot"}.get(method, "latent")


def answer_text(text: str, mode: str, answer_prompt: str) -> str | None:
    """The part of a generated text that holds the answer, or ``None`` when there is none.

    latent/direct: the whole text (generation started after P). cot: what follows the
    first occurrence of ``answer_prompt``; ``None`` if the model never wrote it.
    """
    if mode != "cot":
        return text
    at = text.find(answer_prompt)
    if at < 0:
        return None
    return text[at + len(answer_prompt):]


def _length_key(model, question: str) -> int:
    enc = getattr(model, "encoder", None)
    if enc is not None and hasattr(enc, "question_ids"):
        try:
            return len(enc.question_ids(question))
        except Exception:  # pragma: no cover - any tokenizer trouble: fall back to characters
            pass
    return len(question)


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def evaluate(
    model,
    examples: Sequence[Example],
    mode: str = "latent",
    batch_size: int = 32,
    limit: int | None = None,
    progress: bool = True,
) -> tuple[DatasetReport, list[Prediction]]:
    """Generate an answer for every example and score it.

    Questions are sorted by token length and generated in batches of
    ``batch_size`` (the model's generation is batch-invariant, so results do not
    depend on the batching); predictions come back in input order. Latency per
    question is the batch wall time divided by the batch size.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    examples = list(examples)
    if limit is not None and limit > 0:
        examples = examples[:limit]
    prompt = model.cfg.data.answer_prompt
    order = sorted(range(len(examples)), key=lambda i: (_length_key(model, examples[i].question), i))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(examples), desc=f"eval[{mode}]", unit="q", leave=False)
        except ImportError:  # pragma: no cover
            bar = None

    preds: list[Prediction | None] = [None] * len(examples)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        for idx in batches:
            questions = [examples[i].question for i in idx]
            t0 = time.perf_counter()
            gens = model.generate(questions, mode=mode)  # one kava.model.Generation per question
            per_q = (time.perf_counter() - t0) / len(idx)
            for g, i in zip(gens, idx):
                ex = examples[i]
                text = g.text
                part = answer_text(text, mode, prompt)
                pred = extract_answer(part) if part is not None else None
                preds[i] = Prediction(
                    index=i,
                    question=ex.question,
                    gold=ex.answer,
                    prediction=pred,
                    correct=bool(pred is not None and answers_match(pred, ex.answer)),
                    text=text,
                    forward_passes=int(g.forward_passes),
                    tokens=int(g.tokens),
                    kv_bytes=int(g.kv_bytes),
                    latency_s=per_q,
                )
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
        if was_training and hasattr(model, "train"):
            model.train()

    done: list[Prediction] = [p for p in preds if p is not None]
    return summarize(done), done


def summarize(preds: Sequence[Prediction]) -> DatasetReport:
    """Aggregate predictions into a :class:`DatasetReport`."""
    n = len(preds)
    k = sum(p.correct for p in preds)
    lo, hi = wilson_ci(k, n)
    return DatasetReport(
        accuracy=k / n if n else float("nan"),
        ci95=[lo, hi],
        n=n,
        forward_passes_mean=_mean([p.forward_passes for p in preds]),
        tokens_mean=_mean([p.tokens for p in preds]),
        latency_s_mean=_mean([p.latency_s for p in preds]),
        kv_bytes_mean=_mean([p.kv_bytes for p in preds]),
    )


# ----------------------------------------------------------------------------
# datasets, checkpoints, files
# ----------------------------------------------------------------------------
def load_dataset(
    name: str,
    question_field: str | None = None,
    answer_field: str | None = None,
    cot_field: str | None = None,
    format: str = "auto",
):
    """A benchmark name (gsm8k, gsm-hard, svamp, multiarith) or a data file / hub id -> ``LoadResult``.

    An existing path always wins over a benchmark name. Field names apply to
    files and hub ids (``generic`` format when they differ from the defaults);
    ``format`` (one of :data:`kava.data.formats.FORMATS`) names their schema instead of guessing it.
    """
    from kava.data.formats import DataError, load_examples, resolve_benchmark

    name = name.strip()
    if not name:
        raise DataError("empty dataset name (expected gsm8k, gsm-hard, svamp, multiarith or a file path)")
    fields = {}
    if question_field:
        fields["question_field"] = question_field
    if answer_field:
        fields["answer_field"] = answer_field
    if cot_field:
        fields["cot_field"] = cot_field
    if not Path(name).expanduser().exists():
        try:
            path, fmt, split, config = resolve_benchmark(name)
        except DataError:
            pass  # not a benchmark: a hub id or a missing file, which load_examples reports
        else:
            if question_field or answer_field or format not in ("auto", fmt):
                log.warning("%s: --question-field/--answer-field/--format are ignored for a known benchmark", name)
            return load_examples(path, format=fmt, split=split, hub_config=config)
    return load_examples(name, format=format or "auto", **fields)


def dataset_label(name: str) -> str:
    """Report key of a dataset: the canonical benchmark name, else the name as given."""
    from kava.data.formats import BENCHMARKS

    if Path(name).expanduser().exists():
        return name
    key = name.strip().lower().replace("_", "-")
    key = {"gsmhard": "gsm-hard", "gsm8k-test": "gsm8k"}.get(key, key)
    return key if key in BENCHMARKS else name


def check_checkpoint(checkpoint: str | Path) -> Path:
    """The model directory to load: ``checkpoint`` itself, or the latest complete checkpoint of a
    training run directory. Fails early, with one clear line, when there is none."""
    p = Path(checkpoint)
    if not p.exists():
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
    if not p.is_dir():
        raise FileNotFoundError(f"{checkpoint}: not a directory (expected a KaVa checkpoint directory)")
    if (p / "kava_meta.json").is_file():
        return p
    if (p / "checkpoints").is_dir():
        from kava.checkpoint import latest_checkpoint

        latest = latest_checkpoint(p)
        if latest is None:
            raise FileNotFoundError(f"{checkpoint}: training run without a complete checkpoint")
        log.info("%s: using its latest checkpoint %s", checkpoint, latest)
        return latest
    raise FileNotFoundError(f"{checkpoint}: not a KaVa checkpoint directory (no kava_meta.json)")


def load_checkpoint(checkpoint: str | Path, device: str | None = None):
    """Load a checkpoint for inference on ``device`` (default: cuda when available)."""
    path = check_checkpoint(checkpoint)
    import torch

    from kava.model import KavaModel

    model = KavaModel.load(path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()


def _fmt_num(x: float, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def format_markdown(report: dict[str, Any]) -> str:
    """The Markdown table of a report dict ({dataset: {REPORT_KEYS}, "_meta": {...}})."""
    meta = report.get("_meta", {})
    lines = []
    if meta:
        lines.append(f"# Evaluation: `{meta.get('checkpoint', '')}`")
        lines.append("")
        bits = [f"mode: {meta.get('mode')}"]
        if meta.get("method"):
            bits.append(f"method: {meta['method']}")
        bits.append(f"date: {meta.get('date')}")
        if meta.get("limit"):
            bits.append(f"limit: {meta['limit']}")
        lines.append(", ".join(bits))
        lines.append("")
    lines.append("| dataset | accuracy % [95% CI] | n | fwd passes | tokens | latency s | KV bytes |")
    lines.append("|---|---|---|---|---|---|---|")
    for name, r in report.items():
        if name.startswith("_"):
            continue
        lo, hi = r["ci95"]
        acc = f"{100 * r['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" if r["n"] else "-"
        lines.append(
            f"| {name.replace('|', '/')} | {acc} | {r['n']} | {_fmt_num(r['forward_passes_mean'], 1)} | "
            f"{_fmt_num(r['tokens_mean'], 1)} | {_fmt_num(r['latency_s_mean'], 4)} | {_fmt_num(r['kv_bytes_mean'], 0)} |"
        )
    return "\n".join(lines) + "\n"


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def run_eval(
    checkpoint: str | Path,
    datasets: Iterable[str],
    mode: str = "latent",
    output_dir: str | Path = "eval",
    limit: int | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    model=None,
    format: str = "auto",
) -> dict[str, Any]:
    """Evaluate a checkpoint on several datasets; write report.json, report.md, predictions.jsonl.

    ``mode="latent"`` follows the checkpoint's method (see :func:`resolve_mode`);
    ``mode="cot"`` forces CoT decoding. ``model`` may be passed to skip loading.
    ``format``: the schema of the data files (default: guessed; see :func:`load_dataset`).
    Returns the report dict.
    """
    datasets = list(dict.fromkeys(d.strip() for d in datasets if d and d.strip()))  # unique, in order
    if not datasets:
        from kava.data.formats import DataError

        raise DataError("no dataset given (expected gsm8k, gsm-hard, svamp, multiarith or a file path)")
    if model is None:
        checkpoint = check_checkpoint(checkpoint)
    # Load the data before the model: a bad path should fail before a slow model load.
    loaded = []
    for name in datasets:
        res = load_dataset(name, question_field, answer_field, format=format)
        examples = res.examples
        bad = [e for e in examples if parse_number(e.answer) is None]
        if bad:
            log.warning("%s: dropping %d example(s) whose gold answer is not a number", name, len(bad))
            examples = [e for e in examples if parse_number(e.answer) is not None]
        if limit is not None and limit > 0:
            examples = examples[:limit]
        if not examples:
            from kava.data.formats import DataError

            raise DataError(f"{name}: no examples with a numeric answer to evaluate")
        loaded.append((dataset_label(name), examples, len(bad), res.skipped))

    if model is None:
        model = load_checkpoint(checkpoint)
    method = model.cfg.method
    eff_mode = resolve_mode(method, mode)
    if eff_mode != mode:
        log.info("checkpoint method %s: evaluating in %s mode", method, eff_mode)
    bs = batch_size or model.cfg.eval.batch_size

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    dropped: dict[str, int] = {}
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as fh:
        for label, examples, n_bad, skipped in loaded:
            t0 = time.perf_counter()
            rep, preds = evaluate(model, examples, mode=eff_mode, batch_size=bs, progress=progress)
            log.info(
                "%s: accuracy %.2f%% [%.1f, %.1f] on %d questions, %.1f forward passes, %.1fs",
                label, 100 * rep.accuracy, 100 * rep.ci95[0], 100 * rep.ci95[1], rep.n,
                rep.forward_passes_mean, time.perf_counter() - t0,
            )
            report[label] = rep.as_dict()
            if n_bad or skipped:
                dropped[label] = n_bad + sum(skipped.values())
            for p in preds:
                row = {
                    "dataset": label,
                    "index": p.index,
                    "question": p.question,
                    "gold": p.gold,
                    "prediction": p.prediction,
                    "correct": p.correct,
                    "text": p.text,
                    "forward_passes": p.forward_passes,
                    "tokens": p.tokens,
                }
                fh.write(json.dumps(_json_safe(row), ensure_ascii=False) + "\n")
    report["_meta"] = {
        "checkpoint": str(checkpoint),
        "mode": eff_mode,
        "requested_mode": mode,
        "method": method,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "limit": limit,
        "batch_size": bs,
        "dropped": dropped,
    }
    (out / "report.json").write_text(json.dumps(_json_safe(report), indent=1) + "\n")
    (out / "report.md").write_text(format_markdown(report))
    return report
