"""Reliability: exact resume after SIGKILL, atomic checkpoints, DDP == one process, distributed
evaluation, bad input at the command line, non-finite losses, weights_only loading. CPU + gloo
only."""
import contextlib
import copy
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import evaluate
import train_stage1
import train_stage2
from cli import run_cli
from conftest import TINY_TRAIN
from test_data import break_shape

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# same threads => same float sums
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def python(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def torchrun(*args, timeout=300):
    return python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                  timeout=timeout)


# ---- 1. exact resume -----------------------------------------------------------------------------

def test_sigkill_mid_epoch_then_resume_gives_bitwise_identical_weights(tiny_world, tmp_path):
    """Bitwise (torch.equal), not a tolerance: on CPU every op here is deterministic for a fixed
    thread count, the data order and augmentation are functions of (seed, epoch, index), and the
    checkpoint carries the RNG state, so a resumed run replays exactly the same arithmetic."""
    args = ["train_stage2.py", "--data", str(tiny_world), "--no-cia", *TINY_TRAIN, "--epochs", "4",
            "--save-every", "2", "--val", "none"]
    whole = python(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]

    out = tmp_path / "killed"
    latest = out / "stage2" / "latest.pt"
    proc = subprocess.Popen([sys.executable, *args, "--out", str(out)], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.exists():
            # safe to read at any moment: writes are atomic
            ckpt = torch.load(latest, weights_only=True)
            if ckpt["epoch"] >= 1 and ckpt["batch_in_epoch"] > 0:
                proc.send_signal(signal.SIGKILL)
                killed_at = ckpt["step"]
                break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL and killed_at is not None, (
        "the run ended before it could be killed")
    assert torch.load(latest, weights_only=True)["step"] < 24

    # no --resume: finds OUT/stage2/latest.pt by itself
    resumed = python(*args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a = torch.load(tmp_path / "whole" / "stage2" / "latest.pt", weights_only=True)
    b = torch.load(latest, weights_only=True)
    assert a["step"] == b["step"] == 24
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(),
                                                  b["optimizer"]["state"][0].values()))


# ---- 2. atomic checkpoints -----------------------------------------------------------------------

def test_kill_during_checkpoint_write_leaves_previous_latest_loadable(tmp_path):
    writer = (f"import sys, torch; sys.path.insert(0, {REPO!r}); from files import atomic_save\n"
              "for step in range(1, 1000):\n"
              f"    atomic_save({{'step': step, 'w': torch.full((40_000_000,), float(step))}}, "
              f"{str(tmp_path / 'latest.pt')!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", writer], env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline:
        temps = glob.glob(str(tmp_path / ".tmp-*"))
        if (tmp_path / "latest.pt").exists() and temps and os.path.getsize(temps[0]) > 1_000_000:
            # mid-write: the temp file exists and is partly written
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL
    assert glob.glob(str(tmp_path / ".tmp-*")), "the kill should have interrupted a write"
    ckpt = torch.load(tmp_path / "latest.pt", weights_only=True)
    # complete, and one consistent version
    assert ckpt["step"] >= 1 and torch.all(ckpt["w"] == ckpt["step"])


def test_atomic_writes_follow_the_umask_and_leave_no_temp_file(tmp_path):
    """Checkpoints and the release-format files we write (the synthetic world, CLIP features) are
    ordinary files: readable by the group and others under the usual umask, not private as a mkstemp
    file would be."""
    from files import atomic_save, save_npy
    old = os.umask(0o022)
    try:
        atomic_save({"step": 1}, str(tmp_path / "latest.pt"))
        save_npy(tmp_path / "shape.npy", {"xyz": np.zeros((4, 3))})
    finally:
        os.umask(old)
    assert [(tmp_path / f).stat().st_mode & 0o777
            for f in ("latest.pt", "shape.npy")] == [0o644, 0o644]
    assert not glob.glob(str(tmp_path / ".tmp-*"))
    assert np.load(tmp_path / "shape.npy", allow_pickle=True).item()["xyz"].shape == (4, 3)


# ---- 3. distributed equivalence ------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_process_step(tmp_path_factory):
    """tests/ddp_step.py alone: one step on the whole global batch (nothing to synchronise)."""
    out = tmp_path_factory.mktemp("ddp_one")
    proc = python("tests/ddp_step.py", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(out / "world1_all.pt")


def test_two_process_step_equals_one_process_on_the_concatenated_batch(one_process_step, tmp_path):
    proc = torchrun("tests/ddp_step.py", str(tmp_path))  # --sync-bn all: the default
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = one_process_step, torch.load(tmp_path / "world2_all.pt")
    assert abs(one["loss"] - two["loss"]) < 1e-10
    assert torch.allclose(one["accuracy"], two["accuracy"])
    for k in one["grads"]:
        assert torch.allclose(one["grads"][k], two["grads"][k], atol=1e-10, rtol=1e-8), k
    for k in one["state"]:  # updated weights and the SyncBatchNorm running statistics
        assert torch.allclose(one["state"][k].double(), two["state"][k].double(), atol=1e-10,
                              rtol=1e-8), k
    assert not torch.equal(one["state"]["encoder.patch_embed.norms.0.running_mean"],
                           torch.zeros(64))
    for rank in two["batchnorm"]:  # every rank holds the same statistics
        assert all(torch.allclose(rank[k], one["state"][k], atol=1e-10, rtol=1e-8) for k in rank)


@contextlib.contextmanager
def default_float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def test_sync_bn_encoder_leaves_the_heads_batchnorm_per_process(one_process_step, tmp_path):
    """--sync-bn encoder (the release, part of --release-exact): the encoder's BatchNorm uses the
    global batch, so both ranks hold the one-process statistics; each head's BatchNorm sees only its
    rank's half of the batch, so each rank holds the statistics of its own half, computed here by
    running the initial heads on that half of the (globally normalised, hence one-process) encoder
    output."""
    import ddp_step
    proc = torchrun("tests/ddp_step.py", str(tmp_path), "encoder")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = torch.load(tmp_path / "world2_encoder.pt")["batchnorm"]
    assert len(ranks) == 2 and ranks[0].keys() == one_process_step["batchnorm"][0].keys()
    encoder = [k for k in ranks[0] if k.startswith("encoder.")]
    heads = [k for k in ranks[0] if k.startswith("adapters.")]
    # 3 PointNet BatchNorms; 2 per head; mean, var, count each
    assert len(encoder) == 9 and len(heads) == 12
    for k in encoder:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        assert torch.allclose(ranks[0][k], one_process_step["batchnorm"][0][k], atol=1e-10,
                              rtol=1e-8), k

    with default_float64(), torch.no_grad():
        model, points, _, _, _ = ddp_step.build()
        # (8, dim): what the synchronised encoder gives each rank for its rows
        f = model.encoder.train()(points)
        half = len(points) // 2
        for rank, rows in enumerate((slice(0, half), slice(half, None))):
            own = copy.deepcopy(model.adapters).train()
            own(f[rows])
            expected = {f"adapters.{n}": b for n, b in own.named_buffers()}
            for k in heads:
                assert torch.allclose(ranks[rank][k].double(), expected[k].double(), atol=1e-10,
                                      rtol=1e-8), (rank, k)
            # the first BatchNorm by hand: momentum 0.1 from (0, 1), the unbiased variance of the
            # local batch
            h = model.adapters.image[0](f[rows])
            assert torch.allclose(ranks[rank]["adapters.image.1.running_mean"], 0.1 * h.mean(0),
                                  atol=1e-10)
            assert torch.allclose(ranks[rank]["adapters.image.1.running_var"],
                                  0.9 + 0.1 * h.var(0), atol=1e-10)
    for k in heads:
        if not k.endswith("num_batches_tracked"):
            # two halves, two sets of statistics
            assert not torch.allclose(ranks[0][k], ranks[1][k], atol=1e-6), k


# ---- 4. distributed evaluation -------------------------------------------------------------------

def test_evaluation_under_torchrun_counts_every_sample_once(world_copy, tmp_path):
    from model import CONFIGS, TAMM
    mn = os.path.join(world_copy, "meta_data", "modelnet40")  # drop one shape: 35 over 2 ranks
    split = json.load(open(os.path.join(mn, "test_split.json")))
    json.dump(split[:-1], open(os.path.join(mn, "test_split.json"), "w"))
    np.save(os.path.join(mn, "test_pc.npy"),
            np.load(os.path.join(mn, "test_pc.npy"), allow_pickle=True)[:-1])
    torch.manual_seed(0)
    m = TAMM(CONFIGS["tiny"]).eval()
    ckpt = tmp_path / "tiny.pt"
    torch.save({"model": m.state_dict(), "config": m.config()}, ckpt)
    common = ["--ckpt", str(ckpt), "--data", str(world_copy), "--tasks", "zero-shot",
              "--num-points", "256", "--batch-size", "5", "--workers", "0",
              "--benchmarks", "modelnet40", "lvis"]
    one = python("evaluate.py", *common, "--out", str(tmp_path / "one"))
    two = torchrun("evaluate.py", *common, "--out", str(tmp_path / "two"))
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    r1 = json.load(open(tmp_path / "one" / "eval_tiny.json"))
    r2 = json.load(open(tmp_path / "two" / "eval_tiny.json"))
    sizes = {name: r1["zero_shot"][name]["num_samples"] for name in ("modelnet40", "lvis")}
    assert sizes["modelnet40"] == 35, sizes  # does not split evenly over 2 ranks
    assert r1["zero_shot"] == r2["zero_shot"]


# ---- 5. bad input at the command line ------------------------------------------------------------

def cli(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


@pytest.fixture
def world_copy(tiny_world, tmp_path):
    return shutil.copytree(tiny_world, tmp_path / "world")


def shape_paths(root):
    return sorted(glob.glob(os.path.join(root, "*", "*", "*.npy")))


@pytest.mark.parametrize("how", ["truncated", "not_a_dict", "no_xyz", "nan", "image_width"])
def test_broken_shape_stops_a_strict_run_and_is_skipped_otherwise(world_copy, tmp_path, capsys,
                                                                   how):
    victim = shape_paths(world_copy)[5]
    break_shape(victim, how)
    args = ["--data", str(world_copy), "--no-cia", *TINY_TRAIN, "--epochs", "1", "--val", "none"]
    code, err = cli(train_stage2.main, [*args, "--out", str(tmp_path / "strict"), "--strict"],
                    capsys)
    assert code == 2 and os.path.basename(victim) in err
    assert "\n" not in err and "Traceback" not in err
    with pytest.warns(UserWarning, match=os.path.basename(victim)):
        run_dir = train_stage2.main([*args, "--out", str(tmp_path / "lenient")])
    log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    assert log[-1]["skipped_shapes"] == 1 and log[-1]["step"] == 6


def test_bad_inputs_exit_2_with_one_line_and_overwrite_nothing(tiny_world, world_copy, tmp_path,
                                                                capsys):
    from model import CONFIGS, TAMM
    from test_checkpoint import release_checkpoint
    empty = tmp_path / "empty"
    empty.mkdir()
    no_meta = shutil.copytree(tiny_world, tmp_path / "no_meta")
    os.remove(os.path.join(no_meta, "meta_data", "modelnet40", "cat_name_pt_feat.npy"))
    good = tmp_path / "good.pt"
    torch.save({"model": TAMM(CONFIGS["tiny"]).state_dict(),
                "config": TAMM(CONFIGS["tiny"]).config()}, good)
    release_tiny = tmp_path / "release_tiny.pt"
    torch.save(release_checkpoint(CONFIGS["tiny"]), release_tiny)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[:5000])
    bad_ply = tmp_path / "bad.ply"
    bad_ply.write_text("ply\nformat ascii 1.0\nelement vertex two\nend_header\n0 0 0\n")
    cloud = tmp_path / "cloud.npy"
    np.save(cloud, np.random.rand(300, 3).astype(np.float32))
    stage1 = tmp_path / "stage1.pt"
    torch.save({"model": {}, "config": {"dim": 1280, "ratio": 0.2}}, stage1)
    other = tmp_path / "other" / "stage2"
    other.mkdir(parents=True)
    torch.save({"model": {}, "config": TAMM(CONFIGS[1]).config()}, other / "latest.pt")
    results = tmp_path / "results"
    results.mkdir()
    (results / "eval_good.json").write_text("previous results")
    ev = ["--tasks", "zero-shot", "--num-points", "256", "--workers", "0"]
    cases = [
        (train_stage2.main, ["--data", str(tmp_path / "nowhere"), "--no-cia"], "nowhere"),
        (train_stage1.main, ["--data", str(empty)], "split"),
        (evaluate.main, ["--ckpt", str(good), "--data", str(no_meta), *ev], "cat_name_pt_feat.npy"),
        (evaluate.main, ["--ckpt", str(release_tiny), "--scaling", "4", "--data", str(tiny_world),
                         *ev], "release_tiny.pt"),
        (evaluate.main, ["--ckpt", str(corrupt), "--data", str(tiny_world), *ev], "corrupt.pt"),
        (evaluate.main, ["--ckpt", str(good), "--pc", str(bad_ply), "--dump-features",
                         str(tmp_path / "f.npz")], "bad.ply"),
        (evaluate.main, ["--ckpt", str(good), "--pc", str(cloud), "--labels", " , "], "labels"),
        (evaluate.main, ["--ckpt", str(good), "--data", str(tiny_world), "--out",
                         "/sys/kernel/tamm-eval", *ev], "tamm-eval"),
        (train_stage2.main, ["--data", str(world_copy), "--no-cia", "--out",
                             "/sys/kernel/tamm-train"], "tamm-train"),
        (evaluate.main, ["--ckpt", str(corrupt), "--data", str(tiny_world), "--out", str(results),
                         *ev], "corrupt.pt"),
        (evaluate.main, ["--ckpt", str(stage1), "--data", str(tiny_world), *ev],
         "stage-1 checkpoint"),
        (train_stage2.main, ["--data", str(tiny_world), "--no-cia", "--out",
                             str(tmp_path / "other"), *TINY_TRAIN],
         "checkpoint of another model"),
    ]
    for main, argv, needle in cases:
        code, err = cli(main, argv, capsys)
        assert code == 2, (argv, err)
        assert needle in err and err.count("\n") == 0 and "Traceback" not in err, (argv, err)
    assert (results / "eval_good.json").read_text() == "previous results"
    assert os.listdir(results) == ["eval_good.json"]


# ---- 6. non-finite loss --------------------------------------------------------------------------

def test_nonfinite_losses_are_skipped_then_stop_the_run_with_the_last_good_checkpoint(
        tiny_world, tmp_path, monkeypatch):
    real, calls = train_stage2.contrastive_loss, []

    def poisoned(*a, **kw):
        res = real(*a, **kw)
        calls.append(1)
        if len(calls) in (2,) or len(calls) >= 4:  # one isolated bad step, then a run of them
            nan = torch.tensor(float("nan"))
            return res._replace(loss=res.loss * nan, per_target=res.per_target * nan)
        return res

    monkeypatch.setattr(train_stage2, "contrastive_loss", poisoned)
    with pytest.raises(SystemExit, match="3 consecutive non-finite"):
        train_stage2.main(["--data", str(tiny_world), "--out", str(tmp_path), "--no-cia",
                           *TINY_TRAIN, "--save-every", "1", "--max-nonfinite", "3",
                           "--val", "none"])
    run_dir = tmp_path / "stage2"
    log = [json.loads(line) for line in open(run_dir / "log.jsonl")]
    events = [r for r in log if "event" in r]
    assert len(events) == 4 and [r["consecutive"] for r in events] == [1, 1, 2, 3]
    assert [r["step"] for r in events] == [2, 4, 5, 6]
    # one step counter: a poisoned step takes its batch and its place in the schedule, but updates
    # nothing, logs only its event and saves nothing
    assert [r["step"] for r in log if "loss" in r] == [1, 3]
    ckpt = torch.load(run_dir / "latest.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert all(torch.isfinite(v.float()).all() for v in ckpt["model"].values())


# ---- 7. security ---------------------------------------------------------------------------------

def test_every_torch_load_of_a_checkpoint_is_weights_only():
    sources = glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "tools", "*.py"))
    calls = [(p, m.group(0)) for p in sources
             for m in re.finditer(r"torch\.load\([^)]*\)", open(p).read())]
    assert calls, "expected at least one checkpoint load"
    assert all("weights_only=True" in c for _, c in calls), [c for c in calls
                                                             if "weights_only=True" not in c[1]]
    readme = open(os.path.join(REPO, "README.md")).read()
    assert "pickle" in readme and "trusted" in readme


# ---- 8. train_stage2.main under torchrun equals one process --------------------------------------

@pytest.fixture(scope="module")
def ddp_runs(tiny_world, tmp_path_factory):
    """tests/stage2_float64.py (train_stage2.main in float64, dropout off) on the same global
    batches of 16, with a CIA and broken shapes (masked stand-ins) in the world: one process and 2
    gloo processes (--sync-bn all) for 3 steps; one process and 2 processes with --sync-bn encoder
    for 1 step (after it the two runs' weights part, and with them the statistics)."""
    from adapters import ClipImageAdapter
    tmp = tmp_path_factory.mktemp("ddp_runs")
    world = shutil.copytree(tiny_world, tmp / "world")
    for path in sorted(glob.glob(os.path.join(world, "*", "*", "*.npy")))[::8]:
        break_shape(path, "nan")
    torch.manual_seed(0)
    cia = tmp / "cia.pt"
    torch.save({"cia": ClipImageAdapter().state_dict(), "cia_ratio": 0.2}, cia)
    args = ["tests/stage2_float64.py", "--data", str(world), "--cia", str(cia), *TINY_TRAIN,
            "--val", "none"]
    runs = {"one": python(*args, "--max-steps", "3", "--out", str(tmp / "one")),
            "all": torchrun(*args, "--max-steps", "3", "--sync-bn", "all", "--out",
                            str(tmp / "all")),
            "one_step": python(*args, "--max-steps", "1", "--out", str(tmp / "one_step")),
            "encoder": torchrun(*args, "--max-steps", "1", "--sync-bn", "encoder", "--out",
                                str(tmp / "encoder"))}
    for name, proc in runs.items():
        assert proc.returncode == 0, (name, proc.stderr[-4000:])
    out = {}
    for name in runs:
        run_dir = tmp / name / "stage2"
        log = [json.loads(line) for line in open(run_dir / "log.jsonl")]
        out[name] = {"losses": [r["loss"] for r in log if "loss" in r],
                     "skipped": [r["skipped_shapes"] for r in log if "loss" in r],
                     "model": torch.load(run_dir / "latest.pt", weights_only=True)["model"]}
    return out


def test_train_stage2_under_torchrun_equals_one_process(ddp_runs):
    """--sync-bn all (the default): the same losses, weights and BatchNorm statistics after 3 AdamW
    steps as one process on the concatenated batches, the broken shape masked in both."""
    one, two = ddp_runs["one"], ddp_runs["all"]
    assert len(one["losses"]) == 3
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-10, abs=1e-10)
    assert one["skipped"] == two["skipped"] and one["skipped"][-1] >= 1  # the stand-in, masked
    # A bias right before a BatchNorm has a gradient of exactly zero in exact arithmetic; AdamW
    # divides its float64 rounding noise by eps and moves it by up to ~1e-8, and the running mean of
    # that BatchNorm with it. Every other weight agrees to 1e-9.
    before_bn = re.compile(r"(encoder\.patch_embed\.(convs|norms)\.\d|adapters\.\w+\.[0145])\.")
    for k, v in one["model"].items():
        tolerance = 1e-7 if before_bn.match(k) and k.endswith(("bias", "running_mean")) else 1e-9
        assert torch.allclose(v.double(), two["model"][k].double(), rtol=0, atol=tolerance), k


def test_sync_bn_encoder_under_torchrun_keeps_the_heads_batchnorm_per_process(ddp_runs):
    """--sync-bn encoder (the release): the encoder's BatchNorm sees the global batch, as one
    process; each head's sees its process's half, so its statistics (and the loss) differ."""
    one, two = ddp_runs["one_step"], ddp_runs["encoder"]
    stats = [k for k in one["model"] if k.endswith(("running_mean", "running_var"))]
    encoder = [k for k in stats if k.startswith("encoder.")]
    heads = [k for k in stats if k.startswith("adapters.")]
    assert len(encoder) == 6 and len(heads) == 8
    for k in encoder:
        assert torch.allclose(one["model"][k], two["model"][k], rtol=1e-6, atol=1e-8), k
    for k in heads:
        assert not torch.allclose(one["model"][k], two["model"][k], rtol=1e-6, atol=1e-8), k


# ---- 9. stage 1 resumes exactly ------------------------------------------------------------------

def test_stage1_interrupted_then_resumed_gives_bitwise_identical_weights(tiny_world, tmp_path,
                                                                          monkeypatch):
    """Stage 1 stopped by an exception after step 7 (its last checkpoint at step 6), then run
    again: it resumes at step 6 and ends where an uninterrupted run ends, bit for bit."""
    args = ["--data", str(tiny_world), "--preset", "demo", "--epochs", "4", "--batch-size", "16",
            "--holdout", "16", "--save-every", "3"]
    whole = train_stage1.main([*args, "--out", str(tmp_path / "whole")])
    real, calls = train_stage1.contrastive_loss, []

    def crash_at_step_8(*a, **kw):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(train_stage1, "contrastive_loss", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train_stage1.main([*args, "--out", str(tmp_path / "killed")])
    monkeypatch.setattr(train_stage1, "contrastive_loss", real)
    assert torch.load(tmp_path / "killed" / "stage1" / "latest.pt", weights_only=True)["step"] == 6
    resumed = train_stage1.main([*args, "--out", str(tmp_path / "killed")])
    a = torch.load(tmp_path / "whole" / "stage1" / "latest.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "stage1" / "latest.pt", weights_only=True)
    assert a["step"] == b["step"] == 20
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["after"] == whole["after"]
