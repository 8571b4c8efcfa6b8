"""Smoke tests of the benchmarks: each --quick mode runs and writes JSON with the expected keys.

No timing assertions (times on a shared machine say nothing); the FLOP floor and the FLOP
count are checked against hand-computed values.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import common  # noqa: E402


def test_flop_floor_hand_computed():
    # N = 512, answer prompt <eot> + 5 tokens: Q = round(.35 * 512) = 179, C = round(.55 * 512) = 282, A = 51.
    L = common.split_lengths(512, prompt_len=6)
    assert (L.Q, L.C, L.A) == (179, 282, 51)
    assert L.student(M=24, T=3) == 179 + 4 * 24 + 51 == 326
    assert common.flop_floor(L.teacher, L.student(24, 3)) == pytest.approx((512 + 326) / 512) == pytest.approx(1.63671875)
    # N = 128: Q = 45, C = 70, A = 13 -> student 45 + 96 + 13 = 154 -> (128 + 154) / 128
    L = common.split_lengths(128, prompt_len=6)
    assert (L.Q, L.C, L.A) == (45, 70, 13)
    assert common.flop_floor(L.teacher, L.student(24, 3)) == pytest.approx(282 / 128)


def test_short_sequences_keep_the_answer_prompt():
    L = common.split_lengths(24, prompt_len=6)  # A would be 3: take the missing tokens from Q
    assert (L.Q, L.C, L.A) == (3, 13, 8)


def test_train_flops_hand_computed():
    class Stub:
        decoder_stack = nn.ModuleDict({"q_proj": nn.Linear(4, 4, bias=False), "lora_A": nn.Linear(4, 2, bias=False)})
        config = type("C", (), {"hidden_size": 4, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 10})()

    # one row, 2 new tokens after 1 cached: pairs = 2*1 + (1 + 2) = 5; 1 logit position.
    # 4*16*2 + 6*8*2 + 12*1*2*2*5 + 4*4*10*1 = 128 + 96 + 240 + 160
    assert common.train_flops(Stub(), [(1, 2, 1, 1)]) == 624


def test_peak_memory_counts_live_tensors():
    def fn():
        a = torch.empty(1024, 256)  # 1 MiB
        b = torch.empty(1024, 256)  # 1 MiB, both live
        del a, b
        torch.empty(1024, 256)
    assert common.peak_memory(fn, "cpu") == 2 * 1024 * 256 * 4


@pytest.fixture(autouse=True)
def _keep_threads():
    """The benchmarks set torch's thread count (1 by default); give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _load(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert {"benchmark", "env", "model", "results"} <= set(data)
    assert data["env"]["date"] and data["env"]["torch"]
    return data


def test_step_cost_quick(tmp_path):
    import step_cost

    out = tmp_path / "step_cost.json"
    step_cost.main(["--quick", "--out", str(out)])
    data = _load(out)
    (row,) = data["results"]
    assert {"tokens", "time_s_median", "peak_mem_bytes", "ratios", "goals", "naive_loss_abs_diff"} <= set(row)
    assert set(row["time_s_median"]) == {"cot", "kava", "naive", "kava_unshared"}
    assert {"time_b/a", "time_c/b", "time_d/b", "mem_b/a", "mem_c/b", "flop_floor_b/a", "time_b/a_over_floor"} <= set(row["ratios"])
    t = row["tokens"]
    assert t["student"] == (row["T"] + 1) * row["M"] + t["A"]  # the question pass is the teacher's
    assert row["ratios"]["flop_floor_b/a"] == pytest.approx((t["teacher"] + t["student"]) / t["teacher"])
    assert all(v > 0 for v in row["peak_mem_bytes"].values())
    # the naive step optimises the same objective as the KaVa step
    assert row["naive_loss_abs_diff"] < 1e-4


def test_step_paths_quick(tmp_path):
    """The old/new-path step comparison runs, and the old path is put back afterwards."""
    import step_paths

    import kava.latent
    import kava.model

    cache_from, masked_ce = kava.latent._cache_from, kava.model.masked_ce
    out = tmp_path / "step_paths.json"
    step_paths.main(["--quick", "--out", str(out)])
    (row,) = _load(out)["results"]
    assert set(row["time_s_median"]) == {"a_old", "a_new", "b_old", "b_new", "b_log", "b_dev", "b_hgd"}
    assert {"a_new/a_old", "b_new/b_old", "b_log/b_old", "b_dev/b_new"} <= set(row["ratios"])
    assert kava.latent._cache_from is cache_from and kava.model.masked_ce is masked_ce


def test_importance_overhead_quick(tmp_path):
    import importance_overhead

    out = tmp_path / "io.json"
    importance_overhead.main(["--quick", "--out", str(out)])
    data = _load(out)
    assert {r["mode"] for r in data["results"]} == {"nograd", "grad"}
    for r in data["results"]:
        assert {"teacher_len", "time_s_median", "ratio", "overhead_pct", "goals"} <= set(r)
        assert set(r["time_s_median"]) == {"plain", "capture"}


def test_inference_quick(tmp_path):
    import inference

    out = tmp_path / "inf.json"
    inference.main(["--quick", "--out", str(out)])
    data = _load(out)
    assert {r["workload"] for r in data["results"]} == {"equations", "nl"}
    M, T = 3, 1
    for r in data["results"]:
        assert {"speedup_cot_over_latent", "forward_passes_per_question", "pass_reduction_pct",
                "generated_tokens_per_question", "kv_bytes_per_question"} <= set(r)
        if r["batch"] == 1:  # forced lengths: passes are exactly what a trained model needs
            assert r["forward_passes_per_question"] == pytest.approx(r["expected_passes_per_question"])
            assert r["M"] == M and r["T"] == T
    th = data["throughput"]
    assert [x["batch"] for x in th["rows"]] == [1, 4]
    assert {"questions_per_s", "speedup_vs_b1", "efficiency_vs_linear"} <= set(th["rows"][0])


def test_gpu_script_quick_on_cpu(tmp_path):
    """benchmarks/gpu.sh --quick OUT_DIR: every variant of the GPU check (old / new / compiled path, KaVa and
    CoT-SFT) runs on the tiny shape and OUT_DIR gets the JSON and the log. One batch size keeps it short (the
    script's own --quick runs two)."""
    out = tmp_path / "gpu_out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--quick", str(out), "--batches", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert (out / "gpu.log").read_text().strip().endswith("s)")  # the log holds the run's output to its end
    data = _load(out / "gpu.json")
    assert data["complete"] and data["args"]["quick"]
    (row,) = data["results"]
    assert row["batch"] == 2 and not row["errors"]
    assert set(row["variants"]) == {"cot_old", "cot_new", "kava_old", "kava_new", "kava_hguard", "kava_comp"}
    for v in row["variants"].values():
        assert {"ms_per_step", "tokens_per_s", "model_tflop_per_step", "mfu", "peak_mem_bytes"} <= set(v)
        assert v["mfu"] is None and v["peak_mem_bytes"] > 0  # no peak given on CPU
    assert {"kava_old/cot_old", "kava_new/cot_new", "kava_comp/cot_new", "kava_new/kava_old",
            "kava_comp/kava_new", "kava_new/kava_hguard"} <= set(row["ratios"])
    assert set(row["kava/cot_over_floor"]) == {"kava_old/cot_old", "kava_new/cot_new", "kava_comp/cot_new"}
    t = row["tokens"]
    assert t["student"] == (data["args"]["T"] + 1) * data["args"]["M"] + t["A"]  # the shared question pass
    assert row["token_floor_kava/cot"] == pytest.approx((row["teacher_len"] + t["student"]) / row["teacher_len"])
    assert row["flop_kava/cot"] > 1
    assert row["dynamo"]["frames_compiled"] == 1 and row["dynamo"]["graph_breaks"] == 0
    assert "MFU" in proc.stdout and "ratio / floor" in proc.stdout


def test_candidate_fixes_keep_the_loss(tmp_path):
    """The trainable-token fixes measured in docs/perf.md (both now the library's default: merged rows in
    generation, the row forward in training) compute peft's loss and leave the model as it was."""
    import argparse

    args = argparse.Namespace(model=None, shape="tiny", dtype="float32", lora_r=4, device="cpu")
    model = common.build_model(args, tmp_path, M=3, T=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    segs, _ = common.synthetic_segments(model, 48, 2)
    tb, sb = common.make_batches(model, segs, "cpu")
    model.eval()
    emb = model.decoder_stack.embed_tokens.token_adapter.base_layer.weight.detach().clone()
    with torch.no_grad():
        ref = float(model.training_loss(tb, sb)[0])
        with common.merged_token_rows(model):
            merged = float(model.training_loss(tb, sb)[0])
        with common.peft_token_rows(model):
            peft = float(model.training_loss(tb, sb)[0])
    assert merged == pytest.approx(ref, abs=1e-5) and peft == pytest.approx(ref, abs=1e-5)
    assert torch.equal(model.decoder_stack.embed_tokens.token_adapter.base_layer.weight, emb)


def test_length_grouping_quick(tmp_path):
    import length_grouping

    out = tmp_path / "lg.json"
    length_grouping.main(["--quick", "--out", str(out)])
    data = _load(out)
    res = data["results"]
    assert set(res["times"]) == {"shuffled", "grouped", "plain2", "sorted2"}
    assert len(res["times"]["sorted2"]) == data["repeats"]
    assert {len(v) for v in res["padded_teacher_tokens"].values()} == {data["repeats"] + 1}  # + the warm-up round
    assert {"median", "q1", "q3"} <= set(res["ratio_grouped_over_shuffled"])
    assert set(res["ratio_over_shuffled"]) == {"grouped", "plain2", "sorted2"}
    pad = res["padded_teacher_tokens"]
    assert all(s <= p for s, p in zip(pad["sorted2"], pad["plain2"])) and sum(pad["sorted2"]) < sum(pad["plain2"])


def test_padding_counts_less_with_sorted_micro_batches(tmp_path, tiny_llama_dir):
    import padding
    from conftest import tiny_config

    rows = [{"question": "Tom has " + "very " * (i % 7) + f"many apples, {i} of them. How many?",
             "steps": [f"<<{i}+1={i + 1}>>"] * (1 + i % 3), "answer": str(i + 1)} for i in range(40)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preset = tmp_path / "preset.yaml"
    tiny_config(tiny_llama_dir, **{"data.train_path": str(train), "train.global_batch_size": 8,
                                   "train.micro_batch_size": 2}).to_yaml(preset)
    out = tmp_path / "padding.json"
    assert padding.main(["--preset", str(preset), "--steps", "20", "--processes", "2", "--out", str(out)]) == 0
    totals = json.loads(out.read_text())["totals"]
    drawn, sorted_ = totals["as drawn"], totals["sorted"]
    assert drawn["real_teacher"] == sorted_["real_teacher"]  # the same examples
    assert sorted_["real_teacher"] <= sorted_["teacher"] < drawn["teacher"]
    assert sorted_["busiest_teacher"] < drawn["busiest_teacher"]
