"""tools/bench.py: its rows compare equal computations (the release-style encoder of
tools/reference.py has our weights and our function), its measuring helpers, and
`main(["--quick", ...])` end to end on CPU. No assertion on speed: speed is a benchmark figure, not
a test."""
import json
import math

import pytest
import torch

import model
from tools import bench, reference

CPU = torch.device("cpu")


def test_baseline_encoder_same_weights_release_modules_and_exact_parity_in_float64():
    torch.manual_seed(0)
    ours = model.PointBert(model.CONFIGS["tiny"]).train().double()
    base = reference.baseline_encoder(ours)
    for (n, p), (_, q) in zip(ours.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), n
    assert base.blocks[0].attn.forward.__func__ is reference.eager_attention
    assert base.patch_embed.forward.__func__ is reference.release_patch_embed
    # ours untouched
    assert "forward" not in vars(ours.blocks[0].attn) and "forward" not in vars(ours.patch_embed)
    pts = bench.cloud(2, 1024, CPU, seed=3).double()
    a, b = bench.train_step(ours, pts), bench.train_step(base, pts)
    assert len(a) == 1 + len(list(ours.parameters()))
    for x, y in zip(a, b):  # same function: in float64 only rounding remains
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)


def test_baseline_encoder_parity_check_in_float32():
    torch.manual_seed(0)
    ours = model.PointBert(model.CONFIGS["tiny"]).train()
    base = reference.baseline_encoder(ours)
    pts = bench.cloud(2, 1024, CPU, seed=4)
    a, b = bench.train_step(ours, pts), bench.train_step(base, pts)
    assert bench.same_step(a, b)
    wrong = [a[0] * 1.01] + a[1:]
    assert not bench.same_step(wrong, b)


def test_median_ratio_on_known_numbers():
    assert bench.median_ratio([3.0, 1.0, 2.0], [1.0, 0.5, 4.0]) == (2.0, 1.0, 2.0)
    assert bench.median_ratio([1.0, 2.0, 3.0, 4.0], [2.0, 2.0]) == (2.5, 2.0, 1.25)
    assert bench.median_ratio([1.0], [0.0])[2] == math.inf


def test_interleaved_runs_warm_up_then_alternates():
    calls = []
    fns = {"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}
    outs, times = bench.interleaved(fns, 3, CPU)
    assert outs == {"a": 1, "b": 2} and calls == ["a", "b"] * 4
    assert len(times["a"]) == len(times["b"]) == 3 and all(t >= 0 for t in times["a"] + times["b"])


def ones_ops(mb, device):
    """Allocates and touches `mb` MB, alive until the end of the call (module level: the child
    imports it)."""
    return {"ours": lambda: torch.ones(mb * 2 ** 18).sum(), "broken": lambda: 1 / 0}


def test_peak_memory_in_a_fresh_child_sees_the_allocation_and_nothing_else():
    assert 240 < bench.peak_extra_mb(ones_ops, (256,), "ours", CPU) < 300
    assert bench.peak_extra_mb(ones_ops, (0,), "ours", CPU) < 10
    # 256 MB allocated and freed here: not the child's business
    junk = [torch.ones(2 ** 20) for _ in range(64)]
    del junk
    assert bench.peak_extra_mb(ones_ops, (0,), "ours", CPU) < 10


def test_peak_memory_child_failure_is_reported():
    with pytest.raises(RuntimeError, match="ones_ops broken failed"):
        bench.peak_extra_mb(ones_ops, (0,), "broken", CPU)


def test_main_quick_writes_every_row(tmp_path, tiny_world):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--repeats", "2", "--mem-repeats", "1", "--workers", "2",
                "--world", str(tiny_world), "--out", str(out)])
    res = json.loads(out.read_text())
    assert {"cpu", "cores", "torch", "device"} <= res["machine"].keys()
    assert res["machine"]["device"] == "cpu"
    rows = {r["name"]: r for r in res["rows"]}
    measured = ["ball_query_memory", "ball_query_time", "fps_time", "encoder_step_time",
                "encoder_step_memory", "launches_grouping", "launches_loss", "launches_step",
                "eval_bf16", "data_reader"]
    assert set(measured) <= rows.keys()
    for name in measured:
        r = rows[name]
        assert isinstance(r["ratio"], float) and r["ratio"] > 0 and math.isfinite(r["ratio"]), r
        assert r["status"] in ("PASS", "MISS") and r["equal"] is True, r
    if not torch.cuda.is_available():
        assert {rows[n]["status"] for n in ("cuda_step", "cuda_grouping_share",
                                            "cuda_grouping_time")} == {"skipped"}
    assert rows["data_reader"]["samples_per_s"] > 0
    train = rows["train_bf16"]  # bf16 against fp32 training steps: a speed ratio and the agreement
    assert train["ratio"] > 0 and 0 <= train["loss_rel"] < 0.1 and train["grad_cos"] > 0.5
    assert train["status"] in ("PASS", "MISS", "info")
    # the CUDA path's grouping is the 3 Triton kernels and one gather, with no host sync; the eager
    # path has the FPS loop (8 launches a sample) and the ball query's nonzero
    counts = rows["launches_grouping"]["counts"]
    assert counts["ours"]["grouping"] == 4 and counts["eager"]["grouping"] > 8 * 64
    assert rows["syncs_forward"]["status"] == "PASS" and counts["eager"]["grouping syncs"] >= 1
    # fused AdamW: a few launches in all
    assert counts["ours"]["optimizer"] < counts["eager"]["optimizer"]


def test_main_only_picks_rows(tmp_path):
    out = tmp_path / "b.json"
    bench.main(["--quick", "--only", "fps", "--repeats", "1", "--out", str(out)])
    assert [r["name"] for r in json.loads(out.read_text())["rows"]] == ["fps_time"]
