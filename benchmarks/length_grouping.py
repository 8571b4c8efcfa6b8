"""Padding on the demo's model and task: step time of shuffled batches against ``train.group_by_length`` and
``train.sort_micro_batches``.

Round r takes global step ``7 r`` of epoch 0 as :func:`kava.train.global_batch` gives it shuffled and
length-grouped, and runs one KaVa optimizer step on each (the demo preset's model and losses), interleaved ABBA
in one run (common.interleaved):
- ``shuffled``: the shuffled batch in one micro-batch (the demo);
- ``grouped``: the length-grouped batch (other examples) in one micro-batch;
- ``plainK`` / ``sortedK`` (``--micro K``): the shuffled batch (the same examples) in micro-batches of K, as
  drawn, or sorted by length first (:func:`kava.train.sort_for_micro_batches`), one backward per micro-batch.
Reported: the median over rounds of each variant's time over ``shuffled``'s, and the padded teacher tokens of each.

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
from kava.train import global_batch, sort_for_micro_batches  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=24, help="rounds (one distinct global step each)")
    p.add_argument("--batch", type=int, default=32, help="global batch (the demo's 32)")
    p.add_argument("--n-train", type=int, default=8000, help="training problems drawn for the task")
    p.add_argument("--micro", type=int, nargs="*", default=[8, 16], help="micro-batch sizes for plainK / sortedK")
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
        micros = [m for m in (args.micro if not args.quick else [2]) if m < batch and batch % m == 0]
        names = ["shuffled", "grouped"] + [f"{kind}{m}" for m in micros for kind in ("plain", "sorted")]
        padded: dict[str, list[int]] = {name: [] for name in names}
        fns: dict[str, list] = {name: [] for name in names}

        def losses(micro_batches):
            """One backward per micro-batch but the last, whose loss the step function backpropagates."""
            collated = [batches_from_segments([store[i] for i in mb], model.encoder.pad, cfg) for mb in micro_batches]

            def fn():
                for tb, sb in collated[:-1]:
                    model.training_loss(tb, sb, log_metrics=False)[0].backward()
                return model.training_loss(*collated[-1], log_metrics=False)
            return fn

        for r in range(repeats + 1):  # round 0 is the warm-up
            s = (7 * r) % steps_per_epoch
            shuffled = global_batch(n, s, steps_per_epoch, batch, cfg.train.seed)
            plans = {"shuffled": [shuffled], "grouped": [global_batch(n, s, steps_per_epoch, batch, cfg.train.seed, lengths)]}
            for m in micros:
                for kind, order in (("plain", shuffled), ("sorted", sort_for_micro_batches(shuffled, lengths, m, 1))):
                    plans[f"{kind}{m}"] = [order[i:i + m] for i in range(0, batch, m)]
            for name, micro_batches in plans.items():
                padded[name].append(sum(len(mb) * max(lengths[i] for i in mb) - sum(lengths[i] for i in mb)
                                        for mb in micro_batches))
                fns[name].append(step(losses(micro_batches)))
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats + 1):  # one distinct set of batches per round, ABBA across rounds
            got = common.interleaved({name: fns[name][r] for name in fns}, repeats=1, warmup=0)
            if r:
                for name in times:
                    times[name] += got[name]
            fns = dict(reversed(list(fns.items())))  # the other order next round
        ratios = {name: common.paired_ratio(times, name, "shuffled") for name in names if name != "shuffled"}
        print(f"threads={threads} n_train={n} batch={batch} rounds={repeats}")
        print(common.markdown_table(
            ["batches", "median s/step", "time / shuffled (q1-q3)", "padded teacher tokens per step (mean)"],
            [[name, f"{common.median(times[name]):.3f}",
              "1" if name == "shuffled" else f"{ratios[name]['median']:.3f} ({ratios[name]['q1']:.3f}-{ratios[name]['q3']:.3f})",
              f"{statistics.mean(padded[name][1:]):.0f}"] for name in names]))
        if args.out:
            results = {"times": times, "padded_teacher_tokens": padded, "ratio_over_shuffled": ratios,
                       "ratio_grouped_over_shuffled": ratios["grouped"],
                       "mean_teacher_len": sum(lengths) / n, "n_train": n, "batch": batch}
            common.save_results(args, "length_grouping", common.env_info("cpu"), common.describe_model(model),
                                repeats, results, threads=threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
