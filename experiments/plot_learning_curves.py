"""Learning curves from a ``curves-demo`` sweep report: accuracy against KaVa steps per method, one panel a seed.

Reads ``report_valid.json`` of ``kava sweep curves-demo`` (variants ``<method>_<k>x``) and, optionally, the
``report.json`` of ``kava eval --mode cot`` runs for the KaVa model's own CoT mode. The x axis is the KaVa steps of
each finished schedule (max_steps minus the 500 teacher-only steps; No-CoT is drawn at the same total steps).
Error bars are the report's 95% Wilson intervals.

    python experiments/plot_learning_curves.py docs/sweeps/curves_demo_valid_seed0.json \
        --cot runs/curves_eval/kava_{1x,2x,4x}_cot/report.json --note pccot_4x=diverged \
        --out docs/sweeps/curves_demo_valid_seed0_curves.png
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

CURRICULUM = 500  # the demo preset's teacher-only steps (train.curriculum_cot_steps)
STYLE = {"kava": ("KaVa (latent)", "C0", "o"), "pccot": ("PCCoT (latent, no KV loss)", "C1", "s"),
         "nocot": ("No-CoT", "C2", "^")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", help="report_valid.json of the curves sweep")
    p.add_argument("--cot", nargs="*", default=[], help="kava eval --mode cot report.json of kava_<k>x checkpoints")
    p.add_argument("--note", nargs="*", default=[], metavar="VARIANT=TEXT", help="a label beside a point, e.g. pccot_4x=diverged")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(Path(args.report).read_text())
    notes = dict(n.split("=", 1) for n in args.note)
    seeds = [str(s) for s in report["seeds"]]
    fig, axes = plt.subplots(1, len(seeds), figsize=(6 * len(seeds), 4.2), squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        for method, (label, color, marker) in STYLE.items():
            points = []
            for name, v in report["variants"].items():
                if re.fullmatch(rf"{method}_\d+x", name) and seed in v["per_seed"]:
                    r = v["per_seed"][seed]
                    points.append((v["max_steps"] - CURRICULUM, 100 * r["accuracy"],
                                   100 * r["ci95"][0], 100 * r["ci95"][1]))
            for name, text in notes.items():
                v = report["variants"].get(name)
                if name.startswith(f"{method}_") and v and seed in v["per_seed"]:
                    ax.annotate(text, (v["max_steps"] - CURRICULUM, 100 * v["per_seed"][seed]["accuracy"]),
                                textcoords="offset points", xytext=(-10, 10), ha="right", color=color, fontsize=8)
            points.sort()
            if points:
                x, y, lo, hi = zip(*points)
                ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]],
                            label=label, color=color, marker=marker, capsize=3)
        cot = []
        for path in args.cot:
            rep = json.loads(Path(path).read_text())
            step = re.search(r"step-(\d+)", rep["_meta"]["checkpoint"])  # the checkpoint kava eval scored
            if step is None:
                raise SystemExit(f"{path}: its checkpoint {rep['_meta']['checkpoint']!r} names no step-N directory")
            acc = next(v["accuracy"] for k, v in rep.items() if not k.startswith("_"))
            cot.append((int(step.group(1)) - CURRICULUM, 100 * acc))
        if cot:
            cot.sort()
            ax.plot(*zip(*cot), "--", color="C0", alpha=0.6, label="the same KaVa model in CoT mode")
        ax.set(xlabel="KaVa steps (finished cosine schedules; No-CoT at the same total steps)",
               ylabel="accuracy % (validation, 2,000 problems)", title=f"seed {seed}", ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
