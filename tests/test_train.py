"""End to end on CPU: both training stages on the tiny synthetic world, in-process and under
torchrun."""
import json
import os
import subprocess
import sys

import torch

import train_stage1
import train_stage2
from checkpoint import load_cia, load_pretrained
from conftest import TINY_TRAIN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_stage1_trains_the_adapter_and_improves_heldout_retrieval(tiny_world, tmp_path):
    out = train_stage1.main(["--data", str(tiny_world), "--out", str(tmp_path), "--preset", "demo",
                             "--epochs", "25", "--batch-size", "16", "--holdout", "16",
                             "--log-every", "5"])
    assert out["after"] > out["before"]
    losses = [r["loss"] for r in read_log(out["run_dir"]) if "loss" in r]
    assert losses[-1] < losses[0]
    cia = load_cia(os.path.join(out["run_dir"], "cia.pt"))
    assert cia.ratio == 0.2 and not any(p.requires_grad for p in cia.parameters())
    assert os.path.exists(os.path.join(out["run_dir"], "config.json"))


def test_stage2_loss_falls_and_checkpoint_reloads(tiny_world, tmp_path):
    run_dir = train_stage2.main(["--data", str(tiny_world), "--out", str(tmp_path), "--no-cia",
                                 *TINY_TRAIN, "--epochs", "6", "--lr", "3e-3"])
    log = read_log(run_dir)
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) >= 30 and sum(losses[-5:]) < sum(losses[:5])
    assert any("val_fused_top1" in r for r in log)
    ckpt = torch.load(os.path.join(run_dir, "latest.pt"), weights_only=True)
    assert ckpt["step"] == len(losses) and ckpt["epoch"] == 6 and ckpt["batch_in_epoch"] == 0
    m = load_pretrained(os.path.join(run_dir, "latest.pt"))
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in m.state_dict().items())
    info = json.load(open(os.path.join(run_dir, "config.json")))
    assert info["args"]["scaling"] == "tiny" and info["packages"]["torch"]


def test_stage2_uses_the_stage1_adapter_by_default(tiny_world, tmp_path):
    train_stage1.main(["--data", str(tiny_world), "--out", str(tmp_path), "--preset", "demo",
                       "--epochs", "1", "--batch-size", "16", "--holdout", "8"])
    run_dir = train_stage2.main(["--data", str(tiny_world), "--out", str(tmp_path), *TINY_TRAIN,
                                 "--max-steps", "2", "--val", "none"])
    assert read_log(run_dir)[-1]["step"] == 2


def torchrun(args, env_extra=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_stage2_under_torchrun_two_processes(tiny_world, tmp_path):
    proc = torchrun(["train_stage2.py", "--data", str(tiny_world), "--out", str(tmp_path),
                     "--no-cia", *TINY_TRAIN, "--max-steps", "3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = read_log(os.path.join(tmp_path, "stage2"))
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert torch.load(os.path.join(tmp_path, "stage2", "latest.pt"), weights_only=True)["step"] == 3


def test_validation_does_not_change_the_training(tiny_world, tmp_path):
    """Monitoring only: a run with periodic validation ends with the same weights as one without."""
    runs = [train_stage2.main(["--data", str(tiny_world), "--out", str(tmp_path / v), "--no-cia",
                               *TINY_TRAIN, "--epochs", "2", "--eval-every", "1", "--val", v])
            for v in ("val", "none")]
    with_val, without = (torch.load(os.path.join(r, "latest.pt"), weights_only=True)["model"]
                         for r in runs)
    assert any("val_fused_top1" in r for r in read_log(runs[0]))
    assert all(torch.equal(with_val[k], without[k]) for k in with_val)
