"""A researcher's first hour: numbers that mean the same every time, outputs that keep their
provenance, and help and messages that say everything.

One small run of both stages on the tiny synthetic world is shared by the tests (a module fixture):
its stage-1 adapter, its stage-2 checkpoint, and the folder they are in.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
import train_stage1
import train_stage2
from cli import run_cli
from conftest import TINY_TRAIN
from tools import pointclouds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE1 = ["--preset", "demo", "--epochs", "3", "--batch-size", "16", "--holdout", "16",
          "--log-every", "5"]


@pytest.fixture(scope="module")
def run(tiny_world, tmp_path_factory):
    """Both stages on the tiny synthetic world, as the demo runs them (stage 2 uses the CIA)."""
    out = tmp_path_factory.mktemp("run")
    first = train_stage1.main(["--data", str(tiny_world), "--out", str(out), *STAGE1])
    run_dir = train_stage2.main(["--data", str(tiny_world), "--out", str(out), *TINY_TRAIN,
                                 "--max-steps", "6", "--val", "none"])
    return {"world": str(tiny_world), "out": str(out), "stage1": first,
            "ckpt": os.path.join(run_dir, "latest.pt"),
            "cia": os.path.join(out, "stage1", "cia.pt"),
            "stage1_latest": os.path.join(out, "stage1", "latest.pt")}


def one_error_line(main, argv, capsys):
    """main through run_cli as the command line runs it -> its one line on stderr (exit code 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def listing(folder):
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
            for d, _, files in os.walk(folder) for f in files}


# ---- numbers that mean the same every time -------------------------------------------------------

def test_stage1_heldout_figure_is_the_same_for_the_same_weights(run, capsys):
    """The held-out pairs are drawn once: re-running a finished stage 1 trains nothing and reports
    the same before/after figure, over the pairs its header counts."""
    before = listing(os.path.join(run["out"], "stage1"))
    capsys.readouterr()
    again = train_stage1.main(["--data", run["world"], "--out", run["out"], *STAGE1])
    printed = capsys.readouterr().out
    assert again["trained"] is False and "already finished at step" in printed
    assert (again["before"], again["after"]) == (run["stage1"]["before"], run["stage1"]["after"])
    pairs = int(printed.split(" held-out pairs")[0].rsplit(" ", 1)[1])
    assert pairs == 16  # every held-out shape of the tiny world has a text
    assert listing(os.path.join(run["out"], "stage1")) == before  # nothing written


def test_the_log_names_its_rate_as_the_last_intervals(run):
    log = [json.loads(line) for line in open(os.path.join(os.path.dirname(run["ckpt"]),
                                                        "log.jsonl"))]
    rates = [r["interval_samples_s"] for r in log if "loss" in r]
    assert len(rates) == 6 and all(r > 0 for r in rates)
    assert not any("samples_s" in r for r in log)


# ---- outputs that keep their provenance ----------------------------------------------------------

def test_a_finished_run_says_so_and_changes_nothing(run, capsys):
    run_dir = os.path.dirname(run["ckpt"])
    before = listing(run_dir)
    capsys.readouterr()
    train_stage2.main(["--data", run["world"], "--out", run["out"], *TINY_TRAIN, "--epochs", "50",
                       "--max-steps", "1", "--val", "none"])
    assert "already finished at step 6 of 1" in capsys.readouterr().out
    assert listing(run_dir) == before


def test_a_resumed_run_appends_to_its_record(tiny_world, tmp_path):
    common = ["--data", str(tiny_world), "--out", str(tmp_path), "--no-cia", *TINY_TRAIN,
              "--val", "none", "--epochs", "1"]
    train_stage2.main([*common, "--max-steps", "2"])
    first = json.load(open(tmp_path / "stage2" / "config.json"))
    train_stage2.main(common)  # resumes at step 2 and runs the epoch to its end
    record = json.load(open(tmp_path / "stage2" / "config.json"))
    assert record["args"] == first["args"] and record["time"] == first["time"]  # the first start
    assert first["resumed"] == [] and len(record["resumed"]) == 1
    resumed = record["resumed"][0]
    assert resumed["step"] == 2 and resumed["changed_flags"] == {"max_steps": None}
    assert record["code"] is None or len(record["code"].split("+")[0]) == 40  # a git commit


def test_checks_that_fail_after_parsing_write_nothing(tiny_world, tmp_path, capsys):
    world = shutil.copytree(tiny_world, tmp_path / "world")
    split = world / "meta_data" / "split" / "train_all.json"
    split.write_text(json.dumps([{"id": "a"}]))  # an entry without data_path
    out = tmp_path / "out"
    line = one_error_line(train_stage2.main, ["--data", str(world), "--out", str(out), "--no-cia",
                                              *TINY_TRAIN], capsys)
    assert "train_all.json" in line and not out.exists()


def test_evaluation_reports_keep_their_provenance_and_the_confusion_matrix(run, tmp_path):
    r = evaluate.main(["--ckpt", run["ckpt"], "--data", run["world"], "--tasks", "zero-shot",
                       "--workers", "0", "--out", str(tmp_path)])
    saved = json.load(open(tmp_path / "eval_latest.json"))
    assert saved["checkpoint_step"] == 6 and len(saved["checkpoint_sha256"]) == 64
    assert saved["provenance"]["time"] and "argv" in saved["provenance"]
    assert saved["checkpoint_sha256"] == evaluate.sha256(run["ckpt"])
    for name, z in r["zero_shot"].items():
        for branch, m in z["branches"].items():
            cells = np.array(m["confusion"])
            assert cells[:, 2].sum() == z["num_samples"]  # every shape in one cell
            correct = cells[cells[:, 0] == cells[:, 1], 2].sum()
            assert correct / z["num_samples"] == pytest.approx(m["top1"])
            present = [a for a in m["per_class_top1"] if a is not None]
            assert len(m["per_class_top1"]) == len(z["classes"]) == z["num_classes"]
            assert np.mean(present) == pytest.approx(m["mean_class_acc"])


def test_compare_reports_do_not_overwrite_each_other(run, tmp_path, capsys):
    other = tmp_path / "other" / "stage2"
    other.mkdir(parents=True)
    shutil.copy(run["ckpt"], other / "latest.pt")
    out = tmp_path / "out"
    evaluate.main(["--compare", run["ckpt"], str(other / "latest.pt"), "--data", run["world"],
                   "--tasks", "zero-shot", "--workers", "0", "--out", str(out)])
    reports = sorted(p.name for p in out.glob("eval_*.json"))
    assert len(reports) == 3 and "eval_compare.json" in reports  # two checkpoints, one comparison
    assert evaluate.report_stems(["runs/a/tamm/stage2/latest.pt", "runs/a/openshape/stage2/"
                                  "latest.pt"]) == ["tamm-stage2-latest", "openshape-stage2-latest"]


def test_compare_checks_every_checkpoint_before_any_work(run, tmp_path, capsys):
    out = tmp_path / "out"
    line = one_error_line(evaluate.main, ["--compare", run["ckpt"], run["stage1_latest"], "--data",
                                          run["world"], "--out", str(out)], capsys)
    assert "stage-1 checkpoint" in line and not list(out.glob("eval_*"))


# ---- your own point clouds -----------------------------------------------------------------------

@pytest.fixture
def cloud(tmp_path):
    path = tmp_path / "chair.npy"
    np.save(path, np.random.default_rng(0).random((300, 3)).astype(np.float32))
    return str(path)


def test_labels_of_a_synthetic_checkpoint_use_its_simulated_teacher_offline(run, cloud, capsys):
    capsys.readouterr()
    r = evaluate.main(["--ckpt", run["ckpt"], "--pc", cloud, "--labels", "chair,lamp,spaceship"])
    out, err = capsys.readouterr()
    assert "synthetic world's simulated CLIP teacher" in out
    assert [name for name, _ in r["predictions"][cloud]] != []
    assert "spaceship" in err and "mean nothing" in err  # no word the teacher knows


@pytest.mark.parametrize("flags,needle", [
    (["--clip-pretrained", "laion2b_s39b_b160k"], "synthetic world's simulated teacher"),
    (["--clip-model", "ViT-B-32"], "synthetic world's simulated teacher"),
])
def test_real_clip_is_refused_for_a_synthetic_checkpoint(run, cloud, capsys, flags, needle):
    line = one_error_line(evaluate.main, ["--ckpt", run["ckpt"], "--pc", cloud, "--labels", "a,b",
                                          *flags], capsys)
    assert needle in line


def test_random_clip_weights_are_refused(tmp_path, cloud, capsys):
    from model import CONFIGS, TAMM
    tamm = TAMM(CONFIGS["tiny"])
    real = tmp_path / "real.pt"  # a checkpoint trained against real CLIP features
    torch.save({"model": tamm.state_dict(), "config": tamm.config(), "teacher": {"name": "clip"}},
               real)
    line = one_error_line(evaluate.main, ["--ckpt", str(real), "--pc", cloud, "--labels", "a,b",
                                          "--clip-pretrained", "none"], capsys)
    assert "--clip-pretrained none" in line and "mean nothing" in line


def test_a_missing_labels_file_is_an_error_not_a_class(run, cloud, capsys):
    line = one_error_line(evaluate.main, ["--ckpt", run["ckpt"], "--pc", cloud, "--labels",
                                          "no/such/labels.txt"], capsys)
    assert "--labels no/such/labels.txt: no such file" in line


def test_text_clouds_with_commas_or_a_header_and_folders_are_read(tmp_path):
    xyz = np.random.default_rng(1).random((200, 3)).astype(np.float32)
    rgb = np.random.default_rng(2).integers(0, 256, (200, 3))
    csv = tmp_path / "clouds" / "a.csv"
    csv.parent.mkdir()
    csv.write_text("x,y,z,red,green,blue\n" + "\n".join(
        ",".join(map(str, [*p, *c])) for p, c in zip(xyz, rgb)))
    txt = tmp_path / "clouds" / "b.txt"
    txt.write_text("# exported\nz y x\n" + "\n".join(" ".join(map(str, p[::-1])) for p in xyz))
    read_xyz, read_rgb = pointclouds.read_point_cloud(str(csv))
    assert np.allclose(read_xyz, xyz, atol=1e-6) and np.allclose(read_rgb, rgb / 255, atol=1e-6)
    read_xyz, read_rgb = pointclouds.read_point_cloud(str(txt))  # columns found by name
    assert np.allclose(read_xyz, xyz, atol=1e-6) and np.allclose(read_rgb, 0.4)
    assert pointclouds.expand_paths([str(csv.parent)]) == [str(csv), str(txt)]


def test_a_cloud_with_fewer_points_than_patches_is_refused(run, tmp_path, capsys):
    tiny = tmp_path / "five.npy"
    np.save(tiny, np.random.default_rng(0).random((5, 3)).astype(np.float32))
    line = one_error_line(evaluate.main, ["--ckpt", run["ckpt"], "--pc", str(tiny),
                                          "--dump-features", str(tmp_path / "f.npz")], capsys)
    assert "five.npy: 5 points, fewer than the 64 patch centres" in line


# ---- help and messages ---------------------------------------------------------------------------

def parsers():
    return {"train_stage1": train_stage1.build_parser(),
            "train_stage2": train_stage2.build_parser(),
            "evaluate": evaluate.build_parser()}


def test_help_shows_every_default_and_every_choice():
    for name, parser in parsers().items():
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if action.default not in (None, False, [], argparse.SUPPRESS):
                assert "(default:" in parser._get_formatter()._get_help_string(action), \
                    (name, action.option_strings)
            if action.choices:
                assert "{" + ",".join(map(str, action.choices)) + "}" in text, \
                    (name, action.option_strings)
    assert "{auto,bf16,fp16,fp32}" in parsers()["train_stage2"].format_help()


@pytest.mark.parametrize("module", ["tools.pointclouds", "tools.reference"])
def test_a_module_that_is_not_a_command_says_so(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "not a command" in proc.stderr


@pytest.mark.parametrize("which,flag,needle", [
    ("cia", "--ckpt", "stage-1 CLIP Image Adapter (train_stage1.py's cia.pt), not a stage-2"),
    ("stage1_latest", "--ckpt", "stage-1 checkpoint (train_stage1.py's latest.pt), not a stage-2"),
    ("readme", "--ckpt", "not a PyTorch checkpoint: it is a text file"),
    ("json", "--ckpt", "not a PyTorch checkpoint: it is a JSON file"),
    ("ckpt", "--cia", "stage-2 checkpoint (train_stage2.py's latest.pt), not a stage-1 CLIP Image"),
    ("cia", "--resume", "stage-1 CLIP Image Adapter (train_stage1.py's cia.pt), not a stage-2"),
])
def test_every_file_given_in_the_wrong_place_gets_a_clear_message(run, tmp_path, capsys, which,
                                                                   flag, needle):
    files = {**run, "readme": os.path.join(REPO, "README.md"),
             "json": os.path.join(run["out"], "stage1", "config.json")}
    if flag == "--ckpt":
        main, argv = evaluate.main, ["--ckpt", files[which], "--data", run["world"]]
    else:
        no_cia = ["--no-cia"] if flag == "--resume" else []
        main, argv = train_stage2.main, ["--data", run["world"], "--out", str(tmp_path), *no_cia,
                                         flag, files[which], *TINY_TRAIN]
    assert needle in one_error_line(main, argv, capsys)
