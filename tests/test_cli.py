"""Every entry point's command line against the bad values a new user tries: each is ONE line on
stderr that starts with "error:" and names the flag (or the file), exit code 2, no traceback, and
nothing done before it.

"Nothing done" is checked two ways: the first real step of each entry point (distributed setup for
the trainers and evaluate.py, building a world, loading CLIP, downloading, benchmarking) is
replaced by a stand-in that fails the test if it is reached, and the working folder holds nothing
afterwards but the inputs the case wrote.

    .venv/bin/python -m pytest -q tests/test_cli.py
"""
import os
import shutil

import numpy as np
import pytest
import torch

import cli
import evaluate
import train_stage1
import train_stage2
from model import CONFIGS, TAMM
from tools import bench, clip_features, download, synthetic

MAINS = {"stage1": train_stage1.main, "stage2": train_stage2.main, "evaluate": evaluate.main,
         "download": download.main, "clip_features": clip_features.main,
         "synthetic": synthetic.main, "bench": bench.main}

# Values a new user might try that a flag of each kind must refuse.
BAD = {
    "positive int": ["0", "-1", "nan", "inf", "1.5", "ten"],
    "count": ["-1", "nan", "inf", "1.5", "ten"],
    "positive": ["0", "-1", "nan", "inf", "-inf", "fast"],
    "nonnegative": ["-1", "nan", "inf", "-inf", "x"],
    "fraction": ["-0.1", "1.5", "nan", "inf", "x"],
}
NUMBER_FLAGS = {  # entry point -> {flag: kind}
    "stage1": {"--epochs": "positive int", "--batch-size": "positive int", "--lr": "positive",
               "--warmup-epochs": "count", "--weight-decay": "nonnegative", "--ratio": "fraction",
               "--holdout": "count", "--workers": "count", "--save-every": "positive int",
               "--seed": "count", "--max-steps": "positive int", "--log-every": "positive int"},
    "stage2": {"--epochs": "positive int", "--batch-size": "positive int", "--lr": "positive",
               "--warmup-epochs": "count", "--weight-decay": "nonnegative",
               "--num-points": "positive int", "--workers": "count",
               "--save-every": "positive int", "--eval-every": "positive int",
               "--seed": "count", "--max-steps": "positive int",
               "--max-nonfinite": "positive int", "--log-every": "positive int"},
    "evaluate": {"--alpha": "nonnegative", "--num-points": "positive int",
                 "--batch-size": "positive int", "--workers": "count",
                 "--n-query": "positive int", "--trials": "positive int",
                 "--openshape-shots": "positive int", "--probe-steps": "positive int",
                 "--probe-l2": "nonnegative", "--seed": "count"},
    "synthetic": {"--num-shapes": "positive int", "--num-points": "positive int",
                  "--num-test-per-class": "positive int", "--seed": "count"},
    "bench": {"--repeats": "positive int", "--mem-repeats": "positive int", "--workers": "count",
              "--threads": "positive int"},
}
# A valid rest of the command line, so that the flag under test is the only thing wrong.
BASE = {"stage1": [], "stage2": ["--no-cia"], "evaluate": ["--ckpt", "{ckpt}"],
        "synthetic": ["--out", "{tmp}/w"], "bench": ["--quick"]}

NO_GPU = not torch.cuda.is_available()
LAUNCH = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched(world_size):
    """The variables torchrun sets, as rank 0 of `world_size` sees them."""
    return {"WORLD_SIZE": str(world_size), "RANK": "0", "LOCAL_RANK": "0",
            "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}
TINY = ["--scaling", "tiny"]

# (entry point, argv, what the line must name, environment); {name} are inputs written by the case
# (see `inputs`), in the argv and in what the line must name (a file).
CASES = [(entry, [*BASE[entry], flag, value], flag, {})
         for entry, flags in NUMBER_FLAGS.items() for flag, kind in flags.items()
         for value in BAD[kind]]
for entry in ("stage1", "stage2"):
    CASES += [
        (entry, [*BASE[entry], "--preset", "huge"], "--preset", {}),
        (entry, [*BASE[entry], "--device", "tpu"], "--device", {}),
        (entry, [*BASE[entry], "--device", "cuda:x"], "--device", {}),
        *([(entry, [*BASE[entry], "--device", "cuda"], "--device", {})] if NO_GPU else []),
        (entry, [*BASE[entry], "--batch-size", "16"], "--batch-size", launched(3)),
        (entry, [*BASE[entry]], "WORLD_SIZE", {"WORLD_SIZE": "2"}),  # left over from another launch
        (entry, [*BASE[entry]], "RANK", {"RANK": "1"}),
        (entry, [*BASE[entry]], "WORLD_SIZE", {**launched(2), "WORLD_SIZE": "two"}),
        (entry, [*BASE[entry]], "MASTER_PORT", {**launched(2), "MASTER_PORT": "http"}),
        (entry, [*BASE[entry]], "RANK", {**launched(2), "RANK": "2"}),
        (entry, [*BASE[entry], "--data", "{file}"], "--data", {}),
        (entry, [*BASE[entry], "--data", "{missing}"], "--data", {}),
        (entry, [*BASE[entry], "--data", "{world}", "--split", "nope"], "--split", {}),
        # no --data: the synthetic world's splits
        (entry, [*BASE[entry], "--split", "nope"], "--split", {}),
        (entry, [*BASE[entry], "--out", "{file}"], "--out", {}),
        (entry, [*BASE[entry], "--resume", "{missing}"], "--resume", {}),
        (entry, [*BASE[entry], "--resume", "{dir}"], "--resume", {}),
    ]
CASES += [
    ("stage1", ["--text-sources", "text", "captions"], "--text-sources", {}),
    # the tiny encoder has 64 patches
    ("stage2", ["--no-cia", *TINY, "--num-points", "10"], "--num-points", {}),
    ("stage2", ["--no-cia", "--scaling", "4", "--num-points", "100"], "--num-points", {}),
    # the demo preset's size is tiny
    ("stage2", ["--no-cia", "--num-points", "10"], "--num-points", {}),
    ("stage2", ["--no-cia", "--scaling", "7"], "--scaling", {}),
    ("stage2", ["--no-cia", "--scaling", "huge"], "--scaling", {}),
    ("stage2", ["--no-cia", "--scaling", "0"], "--scaling", {}),
    ("stage2", ["--no-cia", "--precision", "fp8"], "--precision", {}),
    ("stage2", ["--no-cia", "--heads", "triple"], "--heads", {}),
    ("stage2", ["--no-cia", "--sync-bn", "heads"], "--sync-bn", {}),
    ("stage2", ["--no-cia", "--val", "test"], "--val", {}),
    # BatchNorm needs 2 a rank
    ("stage2", ["--no-cia", "--batch-size", "3"], "--batch-size", launched(3)),
    ("stage2", ["--no-cia", "--batch-size", "1"], "--batch-size", {}),
    ("stage2", ["--cia", "{missing}"], "--cia", {}),
    ("stage2", ["--cia", "{dir}"], "--cia", {}),
    ("stage2", ["--cia", "{file}", "--no-cia"], "--no-cia", {}),
    ("stage2", ["--data", "{world}"], "--cia", {}),  # no stage-1 adapter at OUT/stage1/cia.pt
    ("stage2", ["--no-cia", "--knn", "--batch-size", "18"], "--knn", {}),  # knn groups of 4
    ("stage2", ["--no-cia", "--knn", "--data", "{bare}"], "--knn", {}),    # no point_feat_knn.npy
    # evaluate.py
    ("evaluate", [], "--ckpt", {}),
    ("evaluate", ["--ckpt", "{missing}"], "--ckpt", {}),
    ("evaluate", ["--ckpt", "{dir}"], "--ckpt", {}),
    ("evaluate", ["--ckpt", "tamm-huge"], "--ckpt", {}),
    ("evaluate", ["--compare", "{ckpt}", "{missing}"], "--compare", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--compare", "{ckpt}"], "--compare", {}),
    ("evaluate", ["--ckpt", "{ckpt}", *TINY, "--num-points", "10"], "--num-points", {}),
    # --scaling 4: 384 patches
    ("evaluate", ["--ckpt", "tamm-ensemble", "--num-points", "100"], "--num-points", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--scaling", "9"], "--scaling", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--device", "tpu"], "--device", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--device", "cuda:x"], "--device", {}),
    *([("evaluate", ["--ckpt", "{ckpt}", "--device", "cuda"], "--device", {})] if NO_GPU else []),
    ("evaluate", ["--ckpt", "{ckpt}"], "WORLD_SIZE", {"WORLD_SIZE": "2"}),
    ("evaluate", ["--ckpt", "{ckpt}", "--benchmarks", "modelnet10"], "--benchmarks", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--tasks", "zero_shot"], "--tasks", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--point-order", "random"], "--point-order", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--precision", "fp16"], "--precision", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--probe-on", "shapenet"], "--probe-on", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--probe-feature", "fused"], "--probe-feature", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--data", "{file}"], "--data", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--data", "{missing}"], "--data", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--data", "{bare}"], "--data", {}),  # no benchmark in it
    ("evaluate", ["--ckpt", "{ckpt}", "--out", "{file}"], "--out", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--fewshot-folds", "{file}"], "--fewshot-folds", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--fewshot-folds", "{missing}"], "--fewshot-folds", {}),
    # no NwayKshot/ in it
    ("evaluate", ["--ckpt", "{ckpt}", "--fewshot-folds", "{dir}"], "--fewshot-folds", {}),
    *[("evaluate", ["--ckpt", "{ckpt}", "--episodes", "5x10", bad], "--episodes", {})
      for bad in ("5", "5x", "0x10", "5x0", "ax3", "1x10", "5x10x2")],
    ("evaluate", ["--ckpt", "{ckpt}", "--pc", "{missing}", "--labels", "a,b"], "{missing}", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--pc", "{cloud}"], "--pc", {}),
    ("evaluate", ["--compare", "{ckpt}", "{ckpt}", "--pc", "{cloud}", "--labels", "a"], "--pc", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--pc", "{cloud}", "--labels", " , "], "--labels", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--pc", "{cloud}", "--labels", "a,b",
                  "--clip-model", "ViT-Q-99"],
     "--clip-model", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--pc", "{cloud}", "--labels", "a,b",
                  "--clip-pretrained", "{missing}"],
     "--clip-pretrained", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--pc", "{cloud}", "--up", "x", "--labels", "a"], "--up", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--pc", "{cloud}", "--dump-features", "{dir}"],
     "--dump-features", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--pc", "{cloud}", "--dump-features", "{file}/f.npz"],
     "--dump-features", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--pc", "{cloud}", "--dump-features", "{tmp}/new/f.npz",
                  "--labels", " , "],
     "--labels", {}),  # the check after it fails: no new/ folder left
    # labels for which clouds?
    ("evaluate", ["--ckpt", "{ckpt}", "--labels", "a,b"], "--labels", {}),
    ("evaluate", ["--ckpt", "{ckpt}", "--dump-features", "{tmp}/f.npz"], "--dump-features", {}),
    # tools/download.py
    ("download", [], "--out", {}),
    ("download", ["--out", "{file}"], "--out", {}),
    ("download", ["--out", "{tmp}/d", "--only", "modelnet"], "--only", {}),
    # tools/clip_features.py
    ("clip_features", [], "command", {}),
    ("clip_features", ["meshes"], "command", {}),
    ("clip_features", ["--device", "tpu", "classes", "--names", "a", "--out", "{tmp}/c.npy"],
     "--device", {}),
    ("clip_features", ["--device", "cuda:x", "classes", "--names", "a", "--out", "{tmp}/c.npy"],
     "--device", {}),
    *([("clip_features", ["--device", "cuda", "classes", "--names", "a", "--out", "{tmp}/c.npy"],
        "--device", {})]
      if NO_GPU else []),
    ("clip_features", ["--model", "ViT-Q-99", "classes", "--names", "a", "--out", "{tmp}/c.npy"],
     "--model", {}),
    ("clip_features", ["--pretrained", "{missing}", "classes", "--names", "a",
                       "--out", "{tmp}/c.npy"],
     "--pretrained", {}),
    ("clip_features", ["classes", "--names", "a"], "--out", {}),
    ("clip_features", ["classes", "--out", "{tmp}/c.npy"], "--names", {}),
    ("clip_features", ["classes", "--names", "a", "--names-file", "{file}", "--out", "{tmp}/c.npy"],
     "--names", {}),
    ("clip_features", ["classes", "--names", " , ", "--out", "{tmp}/c.npy"], "--names", {}),
    ("clip_features", ["classes", "--names", "a, b, a", "--out", "{tmp}/c.npy"], "--names", {}),
    ("clip_features", ["classes", "--names-file", "{missing}", "--out", "{tmp}/c.npy"],
     "--names-file", {}),
    ("clip_features", ["classes", "--names-file", "{dir}", "--out", "{tmp}/c.npy"],
     "--names-file", {}),
    ("clip_features", ["classes", "--names", "a", "--out", "{dir}"], "--out", {}),
    ("clip_features", ["classes", "--names", "a", "--out", "{file}/c.npy"], "--out", {}),
    ("clip_features", ["classes", "--names", " , ", "--out", "{tmp}/new/c.npy"],
     "--names", {}),  # no new/ left
    ("clip_features", ["classes", "--names", "a", "--out", "{tmp}/c.npy", "--layout", "shapenet"],
     "--layout", {}),
    ("clip_features", ["shapes", "--images", "{file}", "--out", "{tmp}/s"], "--images", {}),
    ("clip_features", ["shapes", "--images", "{missing}", "--out", "{tmp}/s"], "--images", {}),
    # no shape sub-folders
    ("clip_features", ["shapes", "--images", "{dir}", "--out", "{tmp}/s"], "{dir}", {}),
    ("clip_features", ["shapes", "--images", "{renders}", "--captions", "{missing}",
                       "--out", "{tmp}/s"],
     "--captions", {}),
    ("clip_features", ["shapes", "--images", "{renders}", "--captions", "{dir}",
                       "--out", "{tmp}/s"],
     "--captions", {}),
    ("clip_features", ["shapes", "--images", "{renders}", "--captions", "{file}",
                       "--out", "{tmp}/s"],
     "{file}", {}),
    ("clip_features", ["shapes", "--images", "{renders}", "--out", "{file}"], "--out", {}),
    # tools/synthetic.py
    ("synthetic", ["--out", "{file}"], "--out", {}),
    # tools/bench.py
    ("bench", ["--quick", "--device", "tpu"], "--device", {}),
    ("bench", ["--quick", "--device", "cuda:x"], "--device", {}),
    *([("bench", ["--quick", "--device", "cuda"], "--device", {})] if NO_GPU else []),
    ("bench", ["--quick", "--out", "{dir}"], "--out", {}),
    ("bench", ["--quick", "--out", "{file}/b.json"], "--out", {}),
    ("bench", ["--quick", "--only", "speed"], "--only", {}),
    ("bench", ["--quick", "--world", "{file}"], "--world", {}),
    ("bench", ["--quick", "--world", "{missing}"], "--world", {}),
]


class WorkStarted(Exception):
    """Raised by the stand-ins for the first real step of each entry point: a bad value got past the
    checks."""


def refuse(what):
    def stand_in(*args, **kwargs):
        raise WorkStarted(f"{what} was reached: the bad value was not caught where the arguments "
                          "are parsed")
    return stand_in


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = TAMM(CONFIGS["tiny"])
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"model": m.state_dict(), "config": m.config()}, path)
    return path


def listing(root):
    return sorted(os.path.relpath(os.path.join(d, n), root)
                  for d, dirs, files in os.walk(root) for n in dirs + files)


def inputs(argv, tmp_path, tiny_world, tiny_ckpt):
    """Write the inputs the command line names ({file}, {dir}, ...) into tmp_path
    -> {placeholder: path}."""
    text = "\0".join(argv)
    paths = {"tmp": str(tmp_path), "world": str(tiny_world), "missing": str(tmp_path / "missing"),
             "file": str(tmp_path / "file.txt"), "dir": str(tmp_path / "dir"),
             "ckpt": str(tmp_path / "tiny.pt"), "cloud": str(tmp_path / "cloud.npy"),
             "bare": str(tmp_path / "bare"), "renders": str(tmp_path / "renders")}
    if "{file}" in text:
        (tmp_path / "file.txt").write_text("not what was asked for\n")
    if "{dir}" in text:
        (tmp_path / "dir").mkdir()
    if "{ckpt}" in text:
        shutil.copy(tiny_ckpt, tmp_path / "tiny.pt")
    if "{cloud}" in text:
        np.save(tmp_path / "cloud.npy",
                np.random.default_rng(0).random((300, 3)).astype(np.float32))
    if "{bare}" in text:  # a data root with a (empty) training split and nothing else
        (tmp_path / "bare" / "meta_data" / "split").mkdir(parents=True)
        (tmp_path / "bare" / "meta_data" / "split" / "train_all.json").write_text("[]")
    if "{renders}" in text:  # one shape folder as tools/clip_features.py shapes reads it
        (tmp_path / "renders" / "s0").mkdir(parents=True)
        (tmp_path / "renders" / "s0" / "view0.png").write_bytes(b"")
        np.save(tmp_path / "renders" / "s0" / "points.npy", np.zeros((10, 3), np.float32))
    return paths


@pytest.mark.parametrize(
    "entry,argv,names,env", CASES,
    ids=[f"{e}:{' '.join(a)}"
         + (f" [{' '.join(f'{k}={v}' for k, v in env.items())}]" if env else "")
         for e, a, _, env in CASES])
def test_bad_value_is_one_error_line_before_any_work(entry, argv, names, env, tiny_world, tiny_ckpt,
                                                     tmp_path, monkeypatch, capsys):
    for name in LAUNCH:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for module in (train_stage1, train_stage2, evaluate):
        monkeypatch.setattr(module, "setup_distributed", refuse("distributed setup"))
    monkeypatch.setattr(synthetic, "ensure_world", refuse("building the synthetic world"))
    monkeypatch.setattr(synthetic, "build_world", refuse("building the synthetic world"))
    monkeypatch.setattr(download, "download", refuse("the download"))
    monkeypatch.setattr(clip_features, "load_clip", refuse("loading CLIP"))
    if entry == "bench":  # only here: the rest of the sweep does not depend on bench.py's internals
        monkeypatch.setattr(bench, "machine_info", refuse("the benchmark"))
    monkeypatch.chdir(tmp_path)
    paths = inputs(argv, tmp_path, tiny_world, tiny_ckpt)
    argv, names = [a.format(**paths) for a in argv], names.format(**paths)
    before, world_before = listing(tmp_path), listing(tiny_world)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(MAINS[entry], argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert exit_info.value.code == 2, err
    assert (len(lines) == 1 and lines[0].startswith("error: ")
            and lines[0][len("error: "):].strip()), err
    assert names in lines[0], f"the line does not name {names!r}: {lines[0]}"
    assert "Traceback" not in err
    assert listing(tmp_path) == before, "the failed command left files behind"
    assert listing(tiny_world) == world_before
