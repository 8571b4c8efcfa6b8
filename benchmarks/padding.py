"""Padding of a preset's batch layout on a data file: micro-batches as drawn against ``train.sort_micro_batches``.

No model runs: the preset's tokenizer encodes the training file (with the preset's filters, as
:func:`kava.train.prepare_data` does), and for ``--steps`` global batches of the run's data order
(:func:`kava.train.global_batch`) the teacher and question sequences of each micro-batch are padded to their
longest. Reported per layout: padded tokens over real tokens, teacher and question, and the teacher tokens a step
computes relative to the unsorted layout (the part of the step's cost that scales with padded length).

    python benchmarks/padding.py --preset smollm2-gsm8k --out docs/cpu/padding_smollm2_gsm8k.json
    python benchmarks/padding.py --preset smollm2-gsm8k --set data.train_path=../shared/data/gsm8k_aug_valid.icot.txt \
        --set data.format=gsm8k-aug --set data.train_split= --set train.global_batch_size=128 \
        --set train.micro_batch_size=8
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from kava.config import KavaConfig  # noqa: E402
from kava.data.collate import SegmentCache  # noqa: E402
from kava.model import KavaModel  # noqa: E402
from kava.train import global_batch, my_micro_batches, prepare_data, preset_path, sort_for_micro_batches  # noqa: E402


def padded_tokens(micro_batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(mb) * max(lengths[i] for i in mb) for mb in micro_batches)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="smollm2-gsm8k", help="preset name or YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--steps", type=int, default=400, help="global batches to count")
    p.add_argument("--processes", type=int, default=1, help="data-parallel processes (the busiest one's tokens count)")
    p.add_argument("--out", default=None, help="JSON output")
    args = p.parse_args(argv)
    path = Path(args.preset)
    cfg = KavaConfig.from_yaml(path if path.suffix in (".yaml", ".yml") else preset_path(args.preset)).override(args.set)
    cfg = cfg.resolved()
    t = cfg.train
    encoder = SegmentCache(KavaModel.from_config(cfg).encoder)
    train, _, _ = prepare_data(cfg, encoder)
    segments = encoder.store(train)
    teacher = [segments[i].teacher_len for i in range(len(segments))]
    question = [len(segments[i].question) for i in range(len(segments))]
    n, g, world = len(teacher), t.global_batch_size, args.processes
    steps_per_epoch = math.ceil(n / g)
    rows, totals = [], {}
    for layout in ("as drawn", "sorted"):
        padded = {"teacher": 0, "question": 0, "real_teacher": 0, "real_question": 0, "busiest_teacher": 0}
        for step in range(args.steps):
            batch = global_batch(n, step, steps_per_epoch, g, t.seed)
            if layout == "sorted":
                batch = sort_for_micro_batches(batch, tuple(teacher), t.micro_batch_size, world)
            per_process = [[mb for _, mb in my_micro_batches(batch, t.micro_batch_size, r, world)] for r in range(world)]
            micro = [mb for mine in per_process for mb in mine]
            padded["teacher"] += padded_tokens(micro, teacher)
            padded["question"] += padded_tokens(micro, question)
            padded["real_teacher"] += sum(teacher[i] for i in batch)
            padded["real_question"] += sum(question[i] for i in batch)
            # a data-parallel step waits for its busiest process
            padded["busiest_teacher"] += max(padded_tokens(mine, teacher) for mine in per_process)
        totals[layout] = padded
        rows.append([layout, f"{padded['teacher'] / padded['real_teacher']:.3f}",
                     f"{padded['question'] / padded['real_question']:.3f}",
                     f"{padded['busiest_teacher'] / totals['as drawn']['busiest_teacher']:.3f}"])
    print(f"preset={args.preset} examples={n} mean teacher={sum(teacher) / n:.1f} tokens (max {max(teacher)}) "
          f"global batch={g} micro-batch={t.micro_batch_size} processes={world} steps={args.steps}")
    print(common.markdown_table(["micro-batches", "padded / real teacher tokens", "padded / real question tokens",
                                 "busiest process's padded teacher tokens / as drawn"], rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "benchmark": "padding", "env": common.env_info("cpu"), "args": vars(args), "n_examples": n,
            "mean_teacher_len": sum(teacher) / n, "max_teacher_len": max(teacher), "totals": totals}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
