"""docs/walkthrough.md runs as written, and tools/figures.py draws its pictures.

The walkthrough's ```bash commands run in order in a scratch folder, made small the way
tests/test_readme.py makes the README's small: the data root is the tiny synthetic world, each
script gets flags for a tiny run appended (argparse lets the last value win), and the ablation
runs two seeds. Its ```python snippets then run in that folder in one interpreter, in order, as the
reader pastes them; the one substitution is the tiny world for
`synthetic.ensure_world(progress=False)`.
"""
import os
import re
import shlex
import struct
import subprocess
import sys

import pytest

from conftest import TINY_TRAIN
from test_readme import TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WALKTHROUGH = os.path.join(REPO, "docs", "walkthrough.md")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO,
       "MPLBACKEND": "Agg"}
STAGE2 = [*TINY_TRAIN, "--max-steps", "4", "--eval-every", "1"]
FIGURES = {"method.png", "data.png", "grouping.png", "stage1_gap.png", "stage2_curves.png",
           "confusion.png", "ablation.png"}
MAX_PNG_BYTES = 150 * 1024


def blocks(language):
    text = open(WALKTHROUGH).read()
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def walkthrough_commands():
    lines = [line.strip() for block in blocks("bash") for line in block.splitlines()]
    commands = [c.strip() for line in lines if line for c in line.split("&&")]
    return [c for c in commands if not c.startswith("pip install")]


def adapt(command, world):
    """A walkthrough command -> a tiny argv (see the module docstring)."""
    argv = shlex.split(command)
    argv[0] = sys.executable
    if argv[1:3] == ["-m", "tools.ablation"]:
        seeds = argv.index("--seeds")
        argv[seeds + 1:seeds + 4] = ["0", "1"]
        return argv + ["--data", str(world), "--stage1-flags", shlex.join(TINY["train_stage1.py"]),
                       "--stage2-flags", shlex.join([*TINY_TRAIN, "--max-steps", "2", "--val",
                                                     "none"]),
                       "--eval-flags", "--num-points 256 --workers 0"]
    if argv[1] == "-m":
        return argv
    script = argv[1]
    argv[1] = os.path.join(REPO, script)
    if script == "train_stage1.py":
        return argv + ["--data", str(world), *TINY[script]]
    if script == "train_stage2.py":
        return argv + ["--data", str(world), *STAGE2]
    return argv + ["--data", str(world), "--num-points", "256", "--workers", "0"]


def png_size(path):
    """(width, height) of a PNG file; fails on anything that is not one."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def followed(tiny_world, tmp_path_factory):
    """The scratch folder after the walkthrough's commands (the demo, the ablation, the figures)."""
    folder = tmp_path_factory.mktemp("walkthrough")
    commands = walkthrough_commands()
    assert [c.split()[1] for c in commands][:3] == ["train_stage1.py", "train_stage2.py",
                                                    "evaluate.py"]
    for command in commands:
        proc = subprocess.run(adapt(command, tiny_world), cwd=folder, env=ENV,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
    return folder


def test_every_snippet_runs_in_order(followed, tiny_world):
    snippets = blocks("python")
    assert len(snippets) >= 5
    source = "\n".join(snippets)
    assert source.count("synthetic.ensure_world(progress=False)") == 1
    source = source.replace("synthetic.ensure_world(progress=False)", repr(str(tiny_world)))
    proc = subprocess.run([sys.executable, "-c", source], cwd=followed, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"sample points +\(1024, 6\)", out), out
    assert re.search(r"views nearer .*: \d\.\d{3} raw, \d\.\d{3} after the CIA", out), out
    assert len(re.findall(r"alpha \d\.\d\d: validation top-1 \d\.\d{3}", out)) == 5, out


def test_figures_are_the_walkthroughs_and_small(followed):
    """Every picture the walkthrough shows is drawn, is a PNG under 150 KB, and is a real figure
    (hundreds of pixels each way)."""
    shown = set(re.findall(r"\(figures/(\w+\.png)\)", open(WALKTHROUGH).read()))
    assert shown == FIGURES - {"method.png"}  # method.png is the README's
    drawn = {name for name in os.listdir(followed / "docs" / "figures")}
    assert drawn == FIGURES
    for name in drawn:
        path = followed / "docs" / "figures" / name
        width, height = png_size(path)
        assert 300 <= width <= 1600 and 250 <= height <= 1200, (name, width, height)
        assert os.path.getsize(path) < MAX_PNG_BYTES, name


def test_committed_figures_are_small_pngs():
    """The PNGs in git are what the walkthrough and the README show, each under 150 KB."""
    folder = os.path.join(REPO, "docs", "figures")
    assert set(os.listdir(folder)) == FIGURES
    for name in FIGURES:
        png_size(os.path.join(folder, name))
        assert os.path.getsize(os.path.join(folder, name)) < MAX_PNG_BYTES, name


def test_ablation_summary_has_every_variant_over_both_seeds(followed):
    import json

    summary = json.load(open(followed / "runs" / "ablation" / "ablation.json"))
    assert summary["seeds"] == [0, 1]
    assert set(summary["variants"]) == {"openshape", "cia-one-head", "dual-no-cia", "tamm"}
    for variant in summary["variants"].values():
        for metric in summary["metrics"]:
            assert len(variant[metric]["values"]) == 2
    table = open(followed / "runs" / "ablation" / "ablation.md").read()
    assert "TAMM (CIA + Dual Adapters)" in table and "+-" in table


def test_figures_without_matplotlib_say_how_to_install_it(followed):
    code = ("import sys; sys.modules['matplotlib'] = None; from cli import run_cli; "
            "from tools import figures; run_cli(figures.main, ['runs/demo', '--out', 'x'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=followed, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: tools/figures.py needs matplotlib: pip install matplotlib"


def test_figures_name_a_missing_run_output(followed, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.figures", str(tmp_path)], cwd=followed,
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"error: {tmp_path}: no stage1/cia.pt"), proc.stderr
