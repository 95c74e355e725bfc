"""Full-scale readiness on a CPU: the paths only a GPU takes, exercised as far as a CPU allows.

- tools/gpu_check.py: without a GPU it says so and exits non-zero; its CPU rehearsal runs every
  check (the Triton kernels under TRITON_INTERPRET=1, gloo for NCCL) and writes its report.
- torch.compile (--compile): the compiled stage-2 model gives the eager loss and trains; the flag
  compiles the model that trains.
- Training under autocast on the CPU with the CUDA run's dtype boundaries: the grouping on fp32
  coordinates, the encoder in bf16, the heads and the loss in fp32; a bf16 step agrees with fp32;
  fp16 with a GradScaler skips overflowing and non-finite steps.
- Runs that survive a lost worker: torchrun --max-restarts restarts the group and every rank resumes
  from latest.pt; the data order does not depend on the world size.
- Errors at scale: a user error inside a DataLoader worker is one line; broken shapes are named a
  few times, then counted, and all listed in a file.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

import data
import model
import runtime
import train_stage2
from checkpoint import load_pretrained
from conftest import TINY_TRAIN
from tools import bench, gpu_check
from training import BrokenShapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
CPU = torch.device("cpu")


def python(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=REPO, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


# ---- tools/gpu_check.py --------------------------------------------------------------------------

def test_gpu_check_without_a_gpu_says_so_and_exits_non_zero():
    proc = python("-m", "tools.gpu_check", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no GPU" in lines[0] and "Traceback" not in proc.stderr


def test_gpu_check_rehearsal_runs_every_check_and_writes_its_report(tmp_path):
    """Every check but compile (tested below, in-process), at toy sizes on the CPU."""
    checks = ["environment", "kernels", "speed", "precision", "collectives", "run"]
    proc = python("-m", "tools.gpu_check", "--cpu-rehearsal", "--out", str(tmp_path), "--only",
                  *checks, env={"TRITON_INTERPRET": "1", "TRITON_CACHE_DIR": str(tmp_path / "tc")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    results = {r["check"]: r for r in report["results"]}
    assert all(r["status"] in ("PASS", "INFO") and r["expected"] and r["got"]
               for r in report["results"]), report["results"]
    for name in ("FPS centres, Triton = PyTorch", "ball-query rows, Triton = PyTorch",
                 "encoder output, Triton vs PyTorch grouping", "bf16 loss vs fp32",
                 "gloo all_gather with gradient (one process)", "DDP step over gloo",
                 "loss goes down"):
        assert results[name]["status"] == "PASS", results[name]
    assert "training step, ours bf16 vs release-style fp32" in results  # the bench's CUDA rows ran
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| loss goes down |" in markdown and report["summary"] in markdown


# ---- torch.compile -------------------------------------------------------------------------------

def test_compile_gives_the_eager_loss_and_trains():
    rows = {r["check"]: r for r in gpu_check.check_compile(CPU, gpu_check.REHEARSAL)}
    assert rows["compiled loss vs eager"]["value"] <= 1e-4
    losses = rows["compiled model trains"]["value"]
    assert losses[-1] < losses[0] and all(np.isfinite(losses))


def test_compile_flag_compiles_the_model_that_trains(tiny_world, tmp_path, monkeypatch):
    compiled = []

    def spy(module, **kwargs):
        compiled.append(module)
        return module
    monkeypatch.setattr(train_stage2.torch, "compile", spy)
    train_stage2.main(["--data", str(tiny_world), "--out", str(tmp_path), "--no-cia", *TINY_TRAIN,
                       "--max-steps", "1", "--val", "none", "--compile"])
    assert len(compiled) == 1 and isinstance(compiled[0], model.TAMM)


# ---- training under autocast on the CPU ----------------------------------------------------------

def test_bf16_training_keeps_fp32_where_the_cuda_run_does(tiny_world, tmp_path, monkeypatch):
    """What train_stage2.main --precision bf16 computes in which dtype, seen from inside a step."""
    seen = {}
    real_group = model.group

    def group_spy(xyz, feats, *args, **kwargs):
        seen["grouping input"] = (xyz.dtype, feats.dtype)
        seen["autocast in grouping"] = torch.is_autocast_enabled("cpu")
        return real_group(xyz, feats, *args, **kwargs)

    class Watched(model.TAMM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.encoder.blocks[0].fc1.register_forward_hook(
                lambda m, i, o: seen.__setitem__("transformer", o.dtype))
            self.adapters.image.register_forward_hook(
                lambda m, i, o: seen.__setitem__("image head", (i[0].dtype, o.dtype)))
            self.adapters.text.register_forward_hook(
                lambda m, i, o: seen.__setitem__("text head", (i[0].dtype, o.dtype)))

    real_loss = train_stage2.contrastive_loss

    def loss_spy(anchors, targets, logit_scale, mask=None):
        res = real_loss(anchors, targets, logit_scale, mask)
        seen["loss"] = res.loss.dtype
        return res
    monkeypatch.setattr(model, "group", group_spy)
    monkeypatch.setattr(train_stage2, "TAMM", Watched)
    monkeypatch.setattr(train_stage2, "contrastive_loss", loss_spy)
    train_stage2.main(["--data", str(tiny_world), "--out", str(tmp_path), "--no-cia", *TINY_TRAIN,
                       "--max-steps", "1", "--val", "none", "--precision", "bf16"])
    fp32 = torch.float32
    assert seen == {"grouping input": (fp32, fp32), "autocast in grouping": False,
                    "transformer": torch.bfloat16, "image head": (fp32, fp32),
                    "text head": (fp32, fp32), "loss": fp32}


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory):
    """A tiny model trained for 24 steps, and a batch of training shapes with their 5 targets."""
    out = tmp_path_factory.mktemp("trained")
    train_stage2.main(["--data", str(tiny_world), "--out", str(out), "--no-cia", *TINY_TRAIN,
                       "--epochs", "4", "--lr", "3e-3", "--val", "none"])
    tamm = load_pretrained(os.path.join(out, "stage2", "latest.pt")).train()
    shapes = data.TrainTriplets(str(tiny_world), num_points=256, augment=False)
    batch = torch.utils.data.default_collate([shapes[i] for i in range(32)])
    targets = torch.cat([batch["image_feat"].transpose(0, 1), batch["text_feat"][None]])
    return tamm, batch["points"], targets


def test_bf16_step_agrees_with_fp32_on_a_trained_model(trained):
    """Loss within 1e-3 relative and gradients with cosine >= 0.99 (measured: about 1e-4 and
    0.998). At initialisation the agreement is worse (bench.precision_agreement says why)."""
    agree = bench.precision_agreement(*trained)
    assert agree["loss_rel"] <= 1e-3 and agree["grad_cos"] >= 0.99, agree


def test_fp16_grad_scaler_skips_overflowing_steps_on_the_cpu(trained):
    """A loss scale fp16 cannot hold: the gradients overflow, the step updates nothing and the
    scale backs off. A scale it can hold: the step updates every weight with a finite value."""
    tamm = model.TAMM(trained[0].cfg)  # a copy: this test changes the weights
    tamm.load_state_dict(trained[0].state_dict())
    points, targets = trained[1][:8], trained[2][:, :8]
    optimizer = torch.optim.AdamW(tamm.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in tamm.named_parameters()}

    def step(scaler):
        optimizer.zero_grad(set_to_none=True)
        loss = bench.tamm_loss(tamm, points, targets, torch.float16)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    overflowing = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    assert torch.isfinite(step(overflowing))
    assert overflowing.get_scale() == 2.0**39  # backed off by half
    assert all(torch.equal(p, before[n]) for n, p in tamm.named_parameters())  # nothing updated
    step(torch.amp.GradScaler("cpu", init_scale=1.0))
    changed = [not torch.equal(p, before[n]) for n, p in tamm.named_parameters()]
    assert sum(changed) > len(changed) // 2
    assert all(torch.isfinite(p).all() for p in tamm.parameters())


def test_fp16_training_on_the_cpu_skips_a_nonfinite_step(tiny_world, tmp_path, monkeypatch):
    real, calls = train_stage2.contrastive_loss, []

    def poisoned(*a, **kw):
        res = real(*a, **kw)
        calls.append(1)
        if len(calls) == 2:
            nan = torch.tensor(float("nan"))
            return res._replace(loss=res.loss * nan, per_target=res.per_target * nan)
        return res
    monkeypatch.setattr(train_stage2, "contrastive_loss", poisoned)
    run_dir = train_stage2.main(["--data", str(tiny_world), "--out", str(tmp_path), "--no-cia",
                                 *TINY_TRAIN, "--max-steps", "4", "--val", "none",
                                 "--precision", "fp16"])
    log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    assert [r["step"] for r in log if "event" in r] == [2]
    ckpt = torch.load(os.path.join(run_dir, "latest.pt"), weights_only=True)
    assert ckpt["step"] == 4 and ckpt["scaler"]["scale"] > 0  # the GradScaler's state is saved
    assert all(torch.isfinite(v.float()).all() for v in ckpt["model"].values())


# ---- errors at scale -----------------------------------------------------------------------------

def test_broken_shapes_are_named_ten_times_then_counted_and_all_listed(tmp_path):
    broken = BrokenShapes(str(tmp_path), rank=0, world_size=1)
    batch = {"error": [f"shape{i}.npy: truncated" for i in range(15)] + [""] * 5,
             "valid": torch.tensor([False] * 15 + [True] * 5)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        broken.note(batch)
        broken.note({"error": ["shape99.npy: NaN"], "valid": torch.tensor([False])})
    messages = [str(w.message) for w in caught]
    assert len(messages) == 11 and "shape0.npy" in messages[0] and "shape9.npy" in messages[9]
    assert "further broken shapes are counted" in messages[10]
    listed = (tmp_path / "broken_shapes.txt").read_text().splitlines()
    assert len(listed) == 16 and listed[-1] == "shape99.npy: NaN"


def one_line_error(proc):
    lines = proc.stderr.strip().splitlines()
    return (proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
            and "Traceback" not in proc.stderr and "Caught" not in proc.stderr)


def test_a_user_error_in_a_dataloader_worker_is_one_line(tiny_world, tmp_path):
    world = shutil.copytree(tiny_world, tmp_path / "world")
    args = ["train_stage2.py", "--data", str(world), "--no-cia", *TINY_TRAIN, "--workers", "2",
            "--val", "none", "--max-steps", "2"]
    for path in world.glob("*/*/*.npy"):  # every shape file damaged: a strict run stops at one
        path.write_bytes(b"truncated")
    strict = python(*args, "--strict", "--out", str(tmp_path / "strict"))
    assert one_line_error(strict), strict.stderr[-2000:]
    assert re.search(r"error: \S+\.npy: cannot read", strict.stderr), strict.stderr
    for path in world.glob("*/*/*.npy"):  # every shape file of the split gone
        path.unlink()
    gone = python(*args, "--out", str(tmp_path / "gone"))
    assert one_line_error(gone) and "cannot be read" in gone.stderr, gone.stderr[-2000:]


# ---- runs that survive a lost worker -------------------------------------------------------------

def worker_pids(parent):
    """The train_stage2.py processes below `parent` (torchrun's agent and its workers)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
                cmdline = open(f"/proc/{entry}/cmdline").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append((int(entry), cmdline))
    found, todo = [], [parent]
    while todo:
        for pid, cmdline in children.get(todo.pop(), []):
            todo.append(pid)
            if "train_stage2.py" in cmdline and "torch.distributed.run" not in cmdline:
                found.append(pid)
    return found


def test_restarts_with_torchruns_shared_store_get_the_advice(monkeypatch):
    """torchrun shares its rendezvous store with the workers unless told not to; a restarted group
    can then read its predecessor's addresses (pytorch/pytorch#135712, seen in our CI)."""
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert runtime.restarts_share_a_store()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # with ..._SHARE_RDZV_TCP_STORE=1
    assert not runtime.restarts_share_a_store()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert not runtime.restarts_share_a_store()


def test_a_killed_worker_restarts_the_group_and_the_run_ends_as_if_uninterrupted(tiny_world,
                                                                                tmp_path):
    """torchrun --max-restarts=1: SIGKILL one worker mid-run; the agent restarts both, every rank
    resumes from latest.pt (weights, optimizer, its RNG, the data position), and the final
    weights equal, bit for bit, those of a run nobody killed (gloo, one thread each: every sum is
    done in the same order)."""
    args = ["train_stage2.py", "--data", str(tiny_world), "--no-cia", *TINY_TRAIN, "--epochs", "4",
            "--save-every", "2", "--val", "none"]
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    whole = subprocess.run([*run, *args, "--out", str(tmp_path / "whole")], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "killed"
    latest = out / "stage2" / "latest.pt"
    own_store = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # as the README says
    proc = subprocess.Popen([*run, "--max-restarts=1", *args, "--out", str(out)], cwd=REPO,
                            env=own_store, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and killed is None:
        if latest.exists():
            ckpt = torch.load(latest, weights_only=True)
            if ckpt["epoch"] >= 1 and ckpt["batch_in_epoch"] > 0:
                pids = worker_pids(proc.pid)
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed = ckpt["step"]
        time.sleep(0.02)
    output = proc.communicate(timeout=600)[0]
    assert killed is not None, "the run ended before a worker could be killed"
    assert proc.returncode == 0, output[-3000:]
    assert re.search(r"resumed from .*latest.pt at step \d+", output), output[-3000:]
    a = torch.load(tmp_path / "whole" / "stage2" / "latest.pt", weights_only=True)
    b = torch.load(latest, weights_only=True)
    assert a["step"] == b["step"] == 24
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    record = json.loads((out / "stage2" / "config.json").read_text())
    assert record["resumed"] and record["resumed"][-1]["step"] <= 24


def test_the_global_batches_do_not_depend_on_the_world_size(tiny_world):
    """What a resume with another world size keeps: the shapes of global batch j, for every j, and
    so the data order of the rest of the run (dropout is re-seeded: a documented difference)."""
    shapes = data.TrainTriplets(str(tiny_world), num_points=64, augment=False)

    def global_batches(world, start_step=0, steps=12, batch_size=16):
        local = batch_size // world
        per_rank = []
        for rank in range(world):
            sampler = data.ShardedSampler(shapes, rank, world, seed=3)
            steps_per_epoch = len(sampler) // local
            batches, step = [], start_step
            while len(batches) < steps:
                epoch, done = divmod(step, steps_per_epoch)
                sampler.set_epoch(epoch)
                sampler.skip(done * local)
                order = list(sampler)
                batches.append(sorted(order[:local]))
                step += 1
            per_rank.append(batches)
        return [sorted(i for rank in per_rank for i in rank[j]) for j in range(steps)]

    one = global_batches(1)
    for world in (2, 4):
        assert global_batches(world) == one
        assert global_batches(world, start_step=5, steps=7) == one[5:]  # resumed mid-epoch
