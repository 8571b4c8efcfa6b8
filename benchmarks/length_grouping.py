"""``train.group_by_length`` on the demo's model and task: padding and step time, shuffled vs length-grouped batches.

Round r takes global step ``7 r`` of epoch 0 twice, as :func:`kava.train.global_batch` gives it shuffled and
length-grouped, and runs one KaVa optimizer step on each (the demo preset's model and losses, micro-batch =
global batch), interleaved ABBA in one run (common.interleaved). Reported: the median over rounds of the
grouped/shuffled time ratio, and the padded teacher tokens of each (what the padding costs).

    OMP_NUM_THREADS=1 python benchmarks/length_grouping.py --repeats 24 --out docs/cpu/length_grouping.json
    python benchmarks/length_grouping.py --quick
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from kava.data.collate import SegmentCache, batches_from_segments  # noqa: E402
from kava.data.formats import load_examples  # noqa: E402
from kava.demo import QUICK, DemoSizes, demo_config, prepare_task  # noqa: E402
from kava.model import KavaModel  # noqa: E402
from kava.train import global_batch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=24, help="rounds (one distinct global step each)")
    p.add_argument("--batch", type=int, default=32, help="global batch (the demo's 32)")
    p.add_argument("--n-train", type=int, default=8000, help="training problems drawn for the task")
    p.add_argument("--quick", action="store_true", help="tiny model and task: a smoke run")
    p.add_argument("--out", default=None, help="JSON output")
    args = p.parse_args(argv)
    threads = common.setup_threads()
    sizes = QUICK if args.quick else DemoSizes(n_train=args.n_train, n_test=8, n_valid=8)
    batch = min(args.batch, 8) if args.quick else args.batch
    repeats = 2 if args.quick else args.repeats
    with common.tmpdir() as tmp:
        task = prepare_task(Path(tmp), seed=0, sizes=sizes)
        cfg = demo_config(task.model_dir, task.train, 0, [f"train.global_batch_size={batch}",
                                                          f"train.micro_batch_size={batch}"])
        model = KavaModel.from_config(cfg)
        model.train()
        encoder = SegmentCache(model.encoder)
        store = encoder.store(load_examples(str(task.train)).examples)
        n = len(store)
        lengths = tuple(store[i].teacher_len for i in range(n))
        steps_per_epoch = -(-n // batch)
        step = common.optimizer_steps(model, grad_clip=cfg.train.grad_clip)
        padded = {"shuffled": [], "grouped": []}
        fns: dict[str, list] = {"shuffled": [], "grouped": []}
        for r in range(repeats + 1):  # round 0 is the warm-up
            s = (7 * r) % steps_per_epoch
            for name, lens in (("shuffled", None), ("grouped", lengths)):
                idx = global_batch(n, s, steps_per_epoch, batch, cfg.train.seed, lens)
                tb, sb = batches_from_segments([store[i] for i in idx], model.encoder.pad, cfg)
                padded[name].append(len(idx) * max(lengths[i] for i in idx) - sum(lengths[i] for i in idx))
                fns[name].append(step(lambda tb=tb, sb=sb: model.training_loss(tb, sb, log_metrics=False)))
        times: dict[str, list[float]] = {"shuffled": [], "grouped": []}
        for r in range(repeats + 1):  # one distinct pair of batches per round, ABBA across rounds
            got = common.interleaved({name: fns[name][r] for name in fns}, repeats=1, warmup=0)
            if r:
                for name in times:
                    times[name] += got[name]
            fns = dict(reversed(list(fns.items())))  # the other one first next round
        ratio = common.paired_ratio(times, "grouped", "shuffled")
        print(f"threads={threads} n_train={n} batch={batch} rounds={repeats}")
        print(common.markdown_table(
            ["batches", "median s/step", "padded teacher tokens per step (mean)"],
            [[name, f"{common.median(times[name]):.3f}", f"{statistics.mean(padded[name][1:]):.0f}"] for name in times]))
        print(f"grouped/shuffled time: {ratio['median']:.3f} (q1-q3 {ratio['q1']:.3f}-{ratio['q3']:.3f})")
        if args.out:
            results = {"times": times, "padded_teacher_tokens": padded, "ratio_grouped_over_shuffled": ratio,
                       "mean_teacher_len": sum(lengths) / n, "n_train": n, "batch": batch}
            common.save_results(args, "length_grouping", common.env_info("cpu"), common.describe_model(model),
                                repeats, results, threads=threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
