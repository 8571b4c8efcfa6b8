"""Scripts in experiments/ that turn results into figures."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))


def test_plot_learning_curves_draws_every_method_of_a_curves_report(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    import plot_learning_curves

    def variant(steps, acc):
        return {"max_steps": steps, "per_seed": {"0": {"accuracy": acc, "ci95": [acc - 0.02, acc + 0.02]}}}

    report = {"seeds": [0], "variants": {
        "kava_1x": variant(1400, 0.2), "kava_2x": variant(2300, 0.3), "pccot_1x": variant(1400, 0.25),
        "pccot_2x": variant(2300, 0.1), "nocot_1x": variant(1400, 0.09), "nocot_2x": variant(2300, 0.1)}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    cot = tmp_path / "cot.json"
    cot.write_text(json.dumps({"valid.jsonl": {"accuracy": 0.97}, "_meta": {"checkpoint": "runs/x/checkpoints/step-002300"}}))
    drawn = []
    real = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, x, y, **k: drawn.append((k["label"], list(x), list(y))) or real(self, x, y, **k))
    out = tmp_path / "curves.png"
    assert plot_learning_curves.main([str(tmp_path / "report.json"), "--cot", str(cot), "--note", "pccot_2x=diverged",
                                      "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    # x = KaVa steps (max_steps - the 500 teacher-only steps), sorted; y in percent
    assert ("KaVa (latent)", [900, 1800], [20.0, 30.0]) in drawn
    assert {label for label, _, _ in drawn} == {"KaVa (latent)", "PCCoT (latent, no KV loss)", "No-CoT"}
