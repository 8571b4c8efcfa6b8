"""Command-line interface: ``kava train | eval | generate | analyze | demo``.

A thin argparse layer over :mod:`kava.train`, :mod:`kava.evaluate`,
:mod:`kava.analyze` and :mod:`kava.demo`. User errors (bad config, bad data,
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
        description="Train a model. The config comes from --preset (configs/NAME.yaml) or --config FILE;\n"
                    "each --set key=value overrides one field (the value is parsed as YAML).\n"
                    "A run stopped by a signal (Ctrl-C, SIGTERM) exits normally, with status 0.",
        epilog="config fields (for --set key=value and YAML files):\n" + format_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", metavar="NAME", help="a preset config shipped in configs/NAME.yaml")
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
        progress=not args.no_progress,
    )
    from kava.evaluate import format_markdown

    table = format_markdown({k: v for k, v in report.items() if not k.startswith("_")})
    print(table, end="")
    print(f"reports written to {args.output}")
    return 0


def cmd_generate(args) -> int:
    from kava.analyze import decode_latents
    from kava.answers import extract_answer, format_number
    from kava.evaluate import answer_text, load_checkpoint, resolve_mode

    model = load_checkpoint(args.checkpoint)
    cfg = model.cfg
    mode = resolve_mode(cfg.method, args.mode)
    if mode != args.mode:
        print(f"(method {cfg.method}: {mode} mode)")
    gen = model.generate(list(args.questions), mode=mode, max_new_tokens=args.max_new_tokens)
    tokens = decode_latents(model, gen.latents, k=args.top_k) if gen.latents is not None else None
    T = cfg.latent.num_iterations if cfg.latent.mode == "jacobi" else cfg.latent.num_tokens
    for i, q in enumerate(args.questions):
        if i:
            print()
        print(f"question: {q}")
        if tokens is not None:
            print(f"latents ({len(tokens[i])}, top-{args.top_k} tokens through the LM head):")
            for j, toks in enumerate(tokens[i]):
                print(f"  z{j + 1:<3} " + "  ".join(repr(t) for t in toks))
        text = gen.texts[i]
        if mode == "cot":
            print(f"generated: {text}")
        else:
            print(f"generated after '{cfg.data.answer_prompt}': {text}")
        part = answer_text(text, mode, cfg.data.answer_prompt)
        value = extract_answer(part) if part is not None else None
        print(f"answer: {format_number(value) if value is not None else '(none)'}")
        n, k = gen.forward_passes[i], gen.generated_tokens[i]
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


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "analyze": cmd_analyze}


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
