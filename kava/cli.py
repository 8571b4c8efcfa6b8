"""Command-line interface: ``kava train | eval | generate | analyze | compare | export | demo``.

A thin argparse layer over :mod:`kava.train`, :mod:`kava.evaluate`,
:mod:`kava.analyze`, :mod:`kava.compare` and :mod:`kava.demo`. User errors (bad config, bad data,
missing checkpoint) print one line ``kava: error: <message>`` and exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

PROG = "kava"
EXIT_USAGE = 2
EXIT_FAILURE = 1

log = logging.getLogger("kava")


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from kava.config import format_help
    from kava.data.formats import FORMATS

    p = argparse.ArgumentParser(
        prog=PROG,
        description="KaVa: latent reasoning via compressed KV-cache distillation.",
        epilog="Run 'kava COMMAND --help' for the options of a command.",
    )
    from kava import __version__

    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    # ---- train -------------------------------------------------------------
    t = sub.add_parser(
        "train",
        help="train a model (KaVa or a baseline) from a preset or a YAML config",
        description="Train a model. The config comes from --preset NAME (shipped with kava: kava/presets/NAME.yaml)\n"
                    "or --config FILE; each --set key=value overrides one field (the value is parsed as YAML).\n"
                    "A run stopped by a signal (Ctrl-C, SIGTERM) exits normally, with status 0.",
        epilog="config fields (for --set key=value and YAML files):\n" + format_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", metavar="NAME",
                     help="a preset shipped with kava (kava/presets/NAME.yaml); an unknown NAME lists them")
    src.add_argument("--config", metavar="FILE", help="a YAML config file")
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set latent.num_iterations=3 (repeatable, one pair each)")
    t.add_argument("--output", required=True, metavar="DIR", help="run directory (checkpoints, logs, final model)")
    t.add_argument("--resume", metavar="DIR", help="resume from this checkpoint directory")
    t.add_argument("--init-from", metavar="DIR", help="branch off this checkpoint (weights, optimizer, schedule, step) "
                   "under the given config, e.g. an ablation off a shared teacher warm start")

    # ---- eval --------------------------------------------------------------
    e = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on benchmarks or data files",
        description="Evaluate a checkpoint: accuracy (95% Wilson CI), forward passes, generated tokens, "
                    "latency and KV-cache bytes per question. Writes report.json, report.md and predictions.jsonl.",
    )
    e.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory (written by kava train)")
    e.add_argument("--data", required=True, metavar="NAMES|PATH",
                   help="comma-separated benchmark names (gsm8k, gsm-hard, svamp, multiarith) and/or data file paths")
    e.add_argument("--question-field", metavar="F", help="question column of a generic data file")
    e.add_argument("--answer-field", metavar="F", help="answer column of a generic data file")
    e.add_argument("--format", default="auto", choices=("auto", *FORMATS), metavar="FORMAT",
                   help="schema of the data files: auto (guess from the fields, the default), " + ", ".join(FORMATS))
    e.add_argument("--mode", choices=("latent", "cot", "direct"), default="latent",
                   help="latent: the checkpoint's own way (latents; no-CoT checkpoints answer directly, "
                        "CoT checkpoints write a CoT); cot: force CoT decoding; direct: no latents (default: latent)")
    e.add_argument("--output", required=True, metavar="DIR", help="where to write the reports")
    e.add_argument("--limit", type=_positive_int, metavar="N", help="evaluate the first N questions of each data set")
    e.add_argument("--batch-size", type=_positive_int, metavar="N", help="questions per batch (default: eval.batch_size)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    # ---- generate ----------------------------------------------------------
    g = sub.add_parser(
        "generate",
        help="answer one question and show the latent trace",
        description="Answer questions with a checkpoint; print each latent as its nearest vocabulary tokens "
                    "(through the LM head), the answer and the number of forward passes.",
    )
    g.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory")
    g.add_argument("--mode", choices=("latent", "cot", "direct"), default="latent", help="as in 'kava eval' (default: latent)")
    g.add_argument("--top-k", type=_positive_int, default=3, metavar="K", help="tokens shown per latent (default: 3)")
    g.add_argument("--max-new-tokens", type=_positive_int, metavar="N", help="decoding budget (default: from the config)")
    g.add_argument("questions", nargs="+", metavar="QUESTION", help="question text (quote it)")

    # ---- analyze -----------------------------------------------------------
    a = sub.add_parser(
        "analyze",
        help="decode latents and compare student latent KV with the compressed teacher KV",
        description="Write per-layer heatmaps of cosine(student latent KV, compressed teacher KV), "
                    "latents.md (each latent's nearest tokens) and analysis.json.",
    )
    a.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory")
    a.add_argument("--data", required=True, metavar="NAME|PATH",
                   help="a benchmark name or a data file; use data with a CoT for the KV comparison")
    a.add_argument("--question-field", metavar="F", help="question column of a generic data file")
    a.add_argument("--answer-field", metavar="F", help="answer column of a generic data file")
    a.add_argument("--output", required=True, metavar="DIR", help="where to write the figures and tables")
    a.add_argument("--limit", type=_positive_int, default=32, metavar="N", help="number of examples (default: 32)")
    a.add_argument("--top-k", type=_positive_int, default=5, metavar="K", help="tokens kept per latent (default: 5)")

    # ---- compare -----------------------------------------------------------
    c = sub.add_parser(
        "compare",
        help="paired comparison of prediction files: A - B on the same questions, 95%% CI and McNemar p",
        description="Paired comparison of the predictions files of kava eval or kava sweep (two models, or two "
                    "modes of one model, on the same questions): accuracy of each, A - B with a paired-bootstrap "
                    "95%% CI over the questions and the exact McNemar p, per pair of files and, with one pair per "
                    "seed, pooled over the pairs.",
    )
    c.add_argument("--a", nargs="+", required=True, metavar="FILE", help="predictions of A (one file per seed)")
    c.add_argument("--b", nargs="+", required=True, metavar="FILE", help="predictions of B, in the same seed order")
    c.add_argument("--output", metavar="FILE", help="also write the result as JSON")

    # ---- export ------------------------------------------------------------
    x = sub.add_parser(
        "export",
        help="write an inference-only copy of a checkpoint (--merged: LoRA merged into the weights)",
        description="Write an inference-only checkpoint (config, tokenizer, weights, projection; no optimizer "
                    "or RNG state), checksummed like a training checkpoint. It loads like any checkpoint "
                    "(kava eval/generate/analyze, KavaModel.load). With --merged, the LoRA adapter and the "
                    "trained special-token rows are merged into the backbone weights: a full-model "
                    "checkpoint (lora.enabled=false) that decodes without the adapter overhead.",
    )
    x.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory, or a run directory (its latest)")
    x.add_argument("--output", required=True, metavar="DIR", help="new directory to write (must not exist or be empty)")
    x.add_argument("--merged", action="store_true", help="merge the LoRA adapter into the weights (peft merge_and_unload)")

    # ---- demo --------------------------------------------------------------
    sub.add_parser(
        "demo",
        help="train and evaluate a small model end to end on a synthetic task (see 'kava demo --help')",
        add_help=False,
    )
    return p


# ----------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------
def _check_sets(sets: list[str]) -> None:
    from kava.config import ConfigError

    for pair in sets:
        key = pair.split("=", 1)[0].strip() if "=" in pair else ""
        if "=" not in pair or not key or any(c.isspace() for c in key):
            raise ConfigError(f"--set {pair!r}: expected exactly one key=value pair, e.g. latent.num_iterations=3")


def _check_local_paths(cfg) -> None:
    """A missing local model or data path: one line naming it (and the command that builds a demo file)."""
    from kava.backbone import check_model_path, missing_path_hint
    from kava.config import ConfigError
    from kava.data.formats import _looks_like_path

    check_model_path(cfg.model.name_or_path)
    for key, path in (("data.train_path", cfg.data.train_path), ("data.eval_path", cfg.data.eval_path)):
        if path and not Path(path).expanduser().exists() and _looks_like_path(path):
            hint = missing_path_hint(path)
            raise ConfigError(f"{key}={path!r}: no such file" + (f"; {hint}" if hint else ""))


def cmd_train(args) -> int:
    from kava.config import ConfigError, KavaConfig

    _check_sets(args.sets)
    if args.preset:
        from kava.train import preset_path

        path = Path(preset_path(args.preset))
        if not path.is_file():
            avail = sorted(q.stem for q in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
            raise ConfigError(f"unknown preset {args.preset!r} (available: {', '.join(avail) or 'none'})")
    else:
        path = Path(args.config)
    cfg = KavaConfig.from_yaml(path)
    if args.sets:
        cfg = cfg.override(args.sets)
    if args.preset and Path(args.preset).stem == "demo":
        from kava.demo import ensure_demo_task

        ensure_demo_task(cfg)  # a fresh checkout: write the demo data and model that the preset trains on
    _check_local_paths(cfg)
    if args.resume and not Path(args.resume).exists():
        raise FileNotFoundError(f"{args.resume}: checkpoint to resume from not found")
    import kava.train as train

    log.info("training %s from %s into %s", cfg.method, path, args.output)
    try:
        final = train.run_training(cfg, args.output, resume=args.resume, init_from=args.init_from)
    except KeyboardInterrupt:
        # A first SIGINT/SIGTERM makes run_training save and return normally (exit 0, above);
        # this is a second Ctrl-C that cut the run short without a checkpoint for the current step.
        print(f"{PROG}: training interrupted", file=sys.stderr)
        return 130
    except train.TrainingAborted as e:
        print(f"{PROG}: error: training aborted: {e}", file=sys.stderr)
        return EXIT_FAILURE
    if final is not None:
        print(final)
    return 0


def cmd_eval(args) -> int:
    from kava.evaluate import run_eval

    datasets = [d.strip() for d in args.data.split(",") if d.strip()]
    report = run_eval(
        args.checkpoint, datasets, mode=args.mode, output_dir=args.output, limit=args.limit,
        question_field=args.question_field, answer_field=args.answer_field, batch_size=args.batch_size,
        progress=not args.no_progress, format=args.format,
    )
    from kava.evaluate import format_markdown

    table = format_markdown({k: v for k, v in report.items() if not k.startswith("_")})
    print(table, end="")
    print(f"reports written to {args.output}")
    return 0


def cmd_compare(args) -> int:
    import json

    from kava.compare import compare_files, format_markdown

    result = compare_files(args.a, args.b)
    print(format_markdown(result), end="")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))
        print(f"written to {args.output}")
    return 0


def cmd_generate(args) -> int:
    from kava.analyze import decode_latents
    from kava.answers import format_number
    from kava.evaluate import load_checkpoint, resolve_mode

    model = load_checkpoint(args.checkpoint)
    cfg = model.cfg
    mode = resolve_mode(cfg.method, args.mode)
    if mode != args.mode:
        print(f"(method {cfg.method}: {mode} mode)")
    gens = model.generate(list(args.questions), mode=mode, max_new_tokens=args.max_new_tokens)
    T = cfg.latent.num_iterations if cfg.latent.mode == "jacobi" else cfg.latent.num_tokens
    for i, g in enumerate(gens):
        if i:
            print()
        print(f"question: {g.question}")
        if g.latents is not None:  # the latents whose KV the answer attended to
            tokens = decode_latents(model, g.latents[None], k=args.top_k)[0]
            print(f"latents ({len(tokens)}, top-{args.top_k} tokens through the final norm and the LM head):")
            for j, toks in enumerate(tokens):
                print(f"  z{j + 1:<3} " + "  ".join(repr(t) for t in toks))
        if mode == "cot":
            print(f"generated: {g.text}")
        else:
            print(f"generated after '{cfg.data.answer_prompt}': {g.text}")
        print(f"answer: {format_number(g.answer) if g.answer is not None else '(none)'}")
        n, k = g.forward_passes, g.tokens
        if mode == "latent":
            detail = f" (1 + {T} latent + {k} answer tokens)" if cfg.latent.mode == "jacobi" else f" ({k} answer tokens)"
        else:
            detail = f" ({k} tokens)"
        print(f"forward passes: {n}{detail}")
    return 0


def cmd_analyze(args) -> int:
    from kava.analyze import run_analyze

    res = run_analyze(
        args.checkpoint, args.data, args.output, limit=args.limit,
        question_field=args.question_field, answer_field=args.answer_field, top_k=args.top_k,
    )
    means = ", ".join("-" if v is None else f"{v:.3f}" for v in res["kv_cosine_diag_mean_per_layer"])
    print(f"{res['n']} examples; mean diagonal KV cosine per layer: {means}")
    print(f"written to {args.output}")
    return 0


def cmd_export(args) -> int:
    from kava.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output, merged=args.merged)
    print(out)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "analyze": cmd_analyze, "compare": cmd_compare,
            "export": cmd_export}


def _user_errors() -> tuple[type[BaseException], ...]:
    from kava.config import ConfigError

    errs: list[type[BaseException]] = [ConfigError, FileNotFoundError]
    try:
        from kava.data.formats import DataError

        errs.append(DataError)
    except ImportError:  # pragma: no cover - formats is part of the package
        pass
    return tuple(errs)


def _one_line(e: BaseException) -> str:
    msg = str(e) if str(e) else type(e).__name__
    if isinstance(e, FileNotFoundError) and e.filename and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    return " ".join(msg.split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kava`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    errors = _user_errors()
    if argv and argv[0] in ("demo", "sweep"):
        try:
            import importlib

            return int(importlib.import_module(f"kava.{argv[0]}").main(argv[1:]) or 0)
        except errors as e:
            print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except errors as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
