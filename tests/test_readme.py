"""Every command in README.md runs, so the README cannot rot.

Commands are taken from the ```bash blocks in order and run in a scratch folder with three
substitutions that keep them small and offline: the data root becomes the tiny synthetic world,
torchrun uses 2 local CPU processes, and each script gets flags for a tiny run appended (argparse
lets the last value win). Commands that need the network (download, released weights, CLIP weights)
must fail the way a user without network sees it: exit code 2 and one line; the GPU check says in
one line that there is no GPU and exits 1. The quick start itself runs verbatim in .ci/run; the
ablation tool's command, which docs/walkthrough.md shares, runs in tests/test_walkthrough.py, and
the by-hand ablation commands are checked against what that tool runs.
"""
import os
import re
import shlex
import socket
import subprocess
import sys

import numpy as np

from conftest import TINY_TRAIN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "train_stage1.py": ["--preset", "demo", "--epochs", "1", "--batch-size", "16", "--holdout", "8",
                        "--workers", "0"],
    "train_stage2.py": [*TINY_TRAIN, "--max-steps", "2", "--val", "none"],
    "evaluate.py": ["--tasks", "zero-shot", "--num-points", "256", "--workers", "0"],
}
NEEDS_NETWORK = ("tools.download", "tamm-ensemble", "openshape-pointbert", "laion2b_s39b_b160k",
                 "tools.clip_features classes")


def readme_commands():
    text = open(os.path.join(REPO, "README.md")).read()
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.splitlines()]
    commands = [c.strip() for line in lines if line for c in line.split("&&")]
    return [c for c in commands if not c.startswith(("pip install", "python -m tools.ablation"))
            and c != "python -m pytest -q" and "runs/by-hand" not in c]


def test_the_ablation_by_hand_is_what_tools_ablation_runs():
    """The README's by-hand ablation commands are not run here: tools/ablation.py runs the same
    stage 1, the same four stage-2 variants and the same --compare for every seed, and
    tests/test_walkthrough.py runs it. This checks that the README says exactly that: one stage 1,
    then each variant's flags as tools/ablation.py has them, then all four in one --compare."""
    from tools.ablation import VARIANTS

    text = open(os.path.join(REPO, "README.md")).read()
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.splitlines() if "runs/by-hand" in line]
    assert lines[0] == "python train_stage1.py --out runs/by-hand"
    cia = "runs/by-hand/stage1/cia.pt"
    stage2 = [shlex.split(line) for line in lines[1:-1]]
    assert [argv[3] for argv in stage2] == [f"runs/by-hand/{name}" for name in VARIANTS]
    for argv, (flags, _) in zip(stage2, VARIANTS.values()):
        assert argv[:3] == ["python", "train_stage2.py", "--out"]
        assert argv[4:] == [f.format(cia=cia) for f in flags], argv
    compare = shlex.split(lines[-1])
    assert compare[:3] == ["python", "evaluate.py", "--compare"]
    assert compare[3:7] == [f"runs/by-hand/{name}/stage2/latest.pt" for name in VARIANTS]


def adapt(command, world, port):
    """README command -> argv for this test (see the module docstring)."""
    argv = shlex.split(command.replace("/data/openshape", str(world)))
    while "=" in argv[0]:  # VAR=value before the command: the test's environment sets them
        argv.pop(0)
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
        argv = [a.replace("--nproc_per_node=8", "--nproc_per_node=2")
                .replace("--nnodes=2", "--nnodes=1")
                for a in argv]
        argv = [re.sub(r"--rdzv-endpoint=\S+", f"--rdzv-endpoint=localhost:{port}", a)
                for a in argv]
        if not any(a.startswith("--rdzv") for a in argv):
            argv.insert(3, "--standalone")
    else:
        argv[0] = sys.executable
    # a tool: `python -m tools.x` finds it through PYTHONPATH (set by the test)
    if argv[1] == "-m" and argv[2].startswith("tools."):
        return argv
    script = next(a for a in argv if a.endswith(".py"))
    argv[argv.index(script)] = os.path.join(REPO, script)
    if "--data" not in argv and script in ("train_stage1.py", "train_stage2.py"):
        argv += ["--data", str(world)]
    if script == "evaluate.py" and "--pc" in argv:
        argv += ["--num-points", "256"]
    elif script == "evaluate.py" and "--data" not in argv:
        argv += ["--data", str(world), *TINY[script]]
    else:
        argv += TINY.get(script, [])
    return argv


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_readme_command_runs(tiny_world, tmp_path):
    commands = readme_commands()
    assert any("train_stage2.py" in c for c in commands) and any("--pc" in c for c in commands)
    xyz = np.random.default_rng(0).random((400, 3)).astype(np.float32)
    np.save(tmp_path / "lamp.npy", xyz)
    with open(tmp_path / "chair.ply", "w") as f:
        f.write("ply\nformat ascii 1.0\nelement vertex 400\n"
                "property float x\nproperty float y\nproperty float z\n"
                "end_header\n" + "\n".join(" ".join(map(str, p)) for p in xyz) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO,
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "CUDA_VISIBLE_DEVICES": ""}
    for command in commands:
        argv = adapt(command, tiny_world, free_port())
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        if "tools.gpu_check" in command:
            assert proc.returncode == 1 and "no GPU here" in proc.stderr, proc.stderr[-1500:]
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        elif any(k in command for k in NEEDS_NETWORK):
            err = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and err and err[-1].startswith("error:"), (
                command, proc.stderr[-1500:])
            assert "Traceback" not in proc.stderr, command
        else:
            assert proc.returncode == 0, (command, proc.stderr[-3000:])
    assert (tmp_path / "feats.npz").exists()
    assert (tmp_path / "runs" / "paper" / "stage2" / "latest.pt").exists()
