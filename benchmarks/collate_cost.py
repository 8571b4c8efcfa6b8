"""Host cost of collating one training micro-batch: tokenising its examples at every step (the old
``train_step``) against collating the Segments tokenised once at data preparation (``SegmentStore``).

    OMP_NUM_THREADS=1 python benchmarks/collate_cost.py [--batch 32] [--reps 200]

Demo size: the demo preset's tokenizer (512-token BPE) and synthetic task (``small``), a batch of 32 (the demo's
micro-batch). The two paths run interleaved, on the same random batches; prints median ms per batch and the
ratio, and checks the batches are identical.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kava.data.collate import SegmentCache, batches_from_segments, make_batches  # noqa: E402
from kava.demo import DemoSizes, demo_config, prepare_task  # noqa: E402
from kava.model import KavaModel  # noqa: E402
from kava.train import prepare_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--n-train", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        files = prepare_task(Path(tmp), seed=0, sizes=DemoSizes(n_train=args.n_train, n_test=8, n_valid=8))
        cfg = demo_config(files.model_dir, files.train, 0, []).resolved()
        encoder = KavaModel.from_config(cfg).encoder
        cache = SegmentCache(encoder)
        t0 = time.perf_counter()
        train, _, _ = prepare_data(cfg, cache)
        store = cache.store(train)
        prep = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    old, new = [], []
    for r in range(args.reps):
        idx = torch.randint(len(train), (args.batch,), generator=g).tolist()
        runs = [("old", old), ("new", new)] if r % 2 == 0 else [("new", new), ("old", old)]
        out = {}
        for name, times in runs:
            t = time.perf_counter()
            if name == "old":
                out[name] = make_batches([train[i] for i in idx], encoder, cfg)
            else:
                out[name] = batches_from_segments([store[i] for i in idx], encoder.pad, cfg)
            times.append(time.perf_counter() - t)
        for a, b in zip(out["old"], out["new"]):
            assert all(torch.equal(getattr(a, f.name), getattr(b, f.name)) if isinstance(getattr(a, f.name), torch.Tensor)
                       else getattr(a, f.name) == getattr(b, f.name) for f in fields(a))
    mo, mn = statistics.median(old) * 1e3, statistics.median(new) * 1e3
    print(f"{len(train)} demo examples, batch {args.batch}, {args.reps} interleaved reps; "
          f"prepare_data + store: {prep:.2f} s (one tokenisation per example)")
    print(f"tokenise each step: {mo:.2f} ms/batch   from SegmentStore: {mn:.2f} ms/batch   ratio {mo / mn:.1f}x")


if __name__ == "__main__":
    main()
