"""Mutation check: each entry breaks the method in one realistic way, and the tests named with it
must then fail.

    .venv/bin/python tests/mutations.py                    # every mutation
    .venv/bin/python tests/mutations.py heads-swapped ...  # some of them, by name
    .venv/bin/python tests/mutations.py --list             # their names, files and tests

For each mutation: the old text must occur exactly once in its file; it is replaced, the named tests
run (`python -m pytest -q -x NODE ...` in a subprocess), and the file gets its bytes (and mtime)
back in a `finally`, also on Ctrl-C or SIGTERM (the restore itself runs with those signals
blocked).

Where: by default in a scratch copy of the working tree (sources and tests; not .git, .venv, data/,
runs/), removed afterwards, so that nobody else who runs tests or commits meanwhile ever sees a
mutated file. `--in-place` mutates the tree itself (or --root DIR), restoring each file as above.

A mutation is `caught` when pytest reports failed tests (exit code 1); anything else (the
tests pass, a collection error, a timeout) is `SURVIVED`. Before the mutations, the same tests run
once on the unmodified tree (--no-baseline skips that): a mutation whose tests fail anyway counts as
survived, not caught. One line per mutation, then pytest's first error line (why it was caught).
Exit code: 0 when every mutation was caught.

In place, other people may edit the tree while this runs: if a mutated file changed meanwhile, only
the mutation is reverted (its new text back to the old) and a warning names the file. They can
still read or commit a mutated file during a test run: hence the scratch copy by default.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 900  # per pytest run


@dataclass
class Mutation:
    name: str
    file: str     # relative to the repository root
    old: str      # exact text, present exactly once
    new: str
    tests: tuple  # pytest node ids that must fail
    what: str     # the bug, in words


M = "tests/test_method.py::"
MODEL = "tests/test_model.py::"
REL = "tests/test_reliability.py::"
MUTATIONS = [
    # ---- stage 2 pairs the heads with their targets, and training moves the heads
    Mutation("heads-swapped", "train_stage2.py",
             'anchors = torch.stack([out["image"]] * len(views) + [out["text"]])',
             'anchors = torch.stack([out["text"]] * len(views) + [out["image"]])',
             (M + "test_each_head_is_aligned_with_its_own_target",),
             "stage 2 aligns TAA with the image views and IAA with the text"),
    Mutation("loss-detached", "train_stage2.py",
             "res = contrastive_loss(anchors, targets, model.scale(), mask)",
             "res = contrastive_loss(anchors.detach(), targets, model.scale(), mask)",
             (M + "test_training_lifts_zero_shot_far_above_an_untrained_model",),
             "the loss never reaches the encoder and heads (only the temperature learns)"),
    Mutation("lr-zero", "train_stage2.py",
             '            group["lr"] = lr\n',
             '            group["lr"] = lr * 1e-6\n',
             (M + "test_training_lifts_zero_shot_far_above_an_untrained_model",),
             "stage 2's learning rate effectively 0"),
    # ---- augmentation ranges (data.py)
    Mutation("rot-sigma-10x", "data.py", "ROT_SIGMA = 0.06 ", "ROT_SIGMA = 0.6  ",
             (M + "test_small_rotation_angles_have_sigma_0_06_clipped_at_0_18",),
             "small rotation sigma 0.6 instead of 0.06"),
    Mutation("rot-clip-10x", "data.py", "ROT_CLIP = 0.18 ", "ROT_CLIP = 1.8  ",
             (M + "test_small_rotation_angles_have_sigma_0_06_clipped_at_0_18",),
             "small rotation clipped at 1.8 rad instead of 0.18"),
    Mutation("rot-order", "data.py",
             "(rotation_z(az) @ rotation_y(ay) @ rotation_x(ax))",
             "(rotation_x(ax) @ rotation_y(ay) @ rotation_z(az))",
             (M + "test_small_rotation_angles_have_sigma_0_06_clipped_at_0_18",),
             "small rotation composed Rx Ry Rz instead of OpenShape's Rz Ry Rx"),
    Mutation("scale-range", "data.py", "SCALE_RANGE = (0.8, 1.25)", "SCALE_RANGE = (0.5, 2)",
             (M + "test_scale_draws_lie_in_0_8_to_1_25_and_cover_it",),
             "scale drawn in [0.5, 2]"),
    Mutation("shift-range", "data.py", "SHIFT_RANGE = 0.1 ", "SHIFT_RANGE = 0.2 ",
             (M + "test_shift_draws_lie_within_0_1_per_axis_and_cover_it",),
             "shift up to 0.2 per axis"),
    Mutation("shift-one-draw", "data.py",
             "rng.uniform(-SHIFT_RANGE, SHIFT_RANGE, 3)",
             "rng.uniform(-SHIFT_RANGE, SHIFT_RANGE, 1)",
             (M + "test_shift_draws_lie_within_0_1_per_axis_and_cover_it",),
             "one shift drawn and added to all three axes"),
    Mutation("dropout-to-1", "data.py", "MAX_DROPOUT = 0.875", "MAX_DROPOUT = 1.0  ",
             (M + "test_dropout_collapses_up_to_seven_eighths_of_the_points_onto_point_0",),
             "dropout ratio drawn up to 1.0"),
    # ---- the paper's constants as the commands use them
    Mutation("alpha-flag-default", "evaluate.py",
             'p.add_argument("--alpha", type=cli.NONNEGATIVE, default=FUSION_ALPHA,',
             'p.add_argument("--alpha", type=cli.NONNEGATIVE, default=1.0,',
             (M + "test_evaluate_fuses_the_branches_with_alpha_one_half",),
             "evaluate.py's --alpha defaults to 1"),
    Mutation("alpha-constant", "adapters.py", "FUSION_ALPHA = 0.5 ", "FUSION_ALPHA = 0.0 ",
             (M + "test_evaluate_fuses_the_branches_with_alpha_one_half",),
             "fusion weight 0 (text branch only)"),
    Mutation("cia-ratio", "adapters.py", "CIA_RATIO = 0.2 ", "CIA_RATIO = 0.3 ",
             (M + "test_stage1_default_adapter_mixes_point_two_of_the_mlp",),
             "CIA residual ratio 0.3"),
    Mutation("cia-residual", "adapters.py",
             "return self.ratio * self.fc(x) + (1 - self.ratio) * x",
             "return self.ratio * self.fc(x) + x",
             (M + "test_stage1_default_adapter_mixes_point_two_of_the_mlp",),
             "CIA(x) = 0.2 A(x) + x (the 1 - r weight forgotten)"),
    Mutation("dropouts-swapped", "adapters.py",
             "self.image = alignment_head(in_dim, out_dim, image_dropout)  # IAA\n"
             "        self.text = alignment_head(in_dim, out_dim, text_dropout)    # TAA",
             "self.image = alignment_head(in_dim, out_dim, text_dropout)  # IAA\n"
             "        self.text = alignment_head(in_dim, out_dim, image_dropout)    # TAA",
             (M + "test_stage2_builds_the_papers_heads_and_temperature",),
             "IAA dropout 0.2 and TAA dropout 0.5"),
    Mutation("temperature-init", "loss.py", "LOGIT_SCALE_INIT = 14.28 ",
             "LOGIT_SCALE_INIT = 1 / 0.07",
             (M + "test_stage2_builds_the_papers_heads_and_temperature",),
             "CLIP's 1/0.07 = 14.2857 instead of TAMM's 14.28"),
    Mutation("temperature-cap", "loss.py", "LOGIT_SCALE_MAX = 100.0 ", "LOGIT_SCALE_MAX = 1000.0",
             (M + "test_stage2_builds_the_papers_heads_and_temperature",),
             "temperature capped at 1000"),
    # ---- few-shot probes
    Mutation("probe-fits-test", "fewshot.py",
             "    classes, y = torch.unique(torch.as_tensor(train_y), return_inverse=True)\n",
             "    train_x = torch.cat([train_x, test_x])\n"
             "    train_y = np.concatenate([np.asarray(train_y), np.asarray(test_y)])\n"
             "    classes, y = torch.unique(torch.as_tensor(train_y), return_inverse=True)\n",
             (M + "test_linear_probe_never_fits_the_test_shapes",),
             "linear_probe fits on train + test"),
    Mutation("folds-leak", "evaluate.py",
             "accuracy = fewshot.linear_probe(x[:n], y[:n], x[n:], y[n:], args.probe_steps,",
             "accuracy = fewshot.linear_probe(x, y, x[n:], y[n:], args.probe_steps,",
             ("tests/test_fewshot.py::"
              "test_fold_probe_fits_train_features_and_scores_test_features",),
             "few_shot_folds fits the probe on the fold's test shapes too"),
    Mutation("folds-markdown", "evaluate.py",
             "{pct(s['mean'])} +- {pct(s['std'])} | {s['trials']} |",
             "{pct(s['std'])} +- {pct(s['mean'])} | {s['trials']} |",
             ("tests/test_fewshot.py::test_evaluate_reports_every_setting_over_its_ten_folds",),
             "few-shot table prints std +- mean"),
    Mutation("per-class-topk", "evaluate.py",
             "per_class.append(hit[present, 0].float().mean().item() if present.any() else None)",
             "per_class.append(hit[present].any(1).float().mean().item() if present.any() "
             "else None)",
             ("tests/test_evaluate.py::test_release_checkpoint_end_to_end",),
             "per-class accuracy counts a top-5 hit"),
    # ---- grouping
    Mutation("autocast-guard-removed", "model.py",
             "with torch.autocast(xyz.device.type, enabled=False):", "if True:",
             (M + "test_grouping_neighbours_are_the_same_under_bf16_autocast",),
             "grouping runs under the caller's bf16 autocast"),
    Mutation("pad-with-0", "grouping.py",
             "out.copy_(torch.where(block < 0, block[..., :1], block))",
             "out.copy_(torch.where(block < 0, 0, block))",
             (MODEL + "test_ball_query_pads_with_the_first_hit_by_index",),
             "ball query pads the free slots with point 0"),
    Mutation("pad-with-last", "grouping.py",
             "out.copy_(torch.where(block < 0, block[..., :1], block))",
             "out.copy_(torch.where(block < 0, block.max(-1, keepdim=True).values, block))",
             (MODEL + "test_ball_query_pads_with_the_first_hit_by_index",),
             "ball query pads the free slots with the last hit"),
    Mutation("kernel-pad-with-0", "kernels.py",
             "pad = tl.where(first < N, first, -1).to(tl.int64)",
             "pad = tl.where(first < N, 0, -1).to(tl.int64)",
             ("tests/test_kernels.py::test_kernels_equal_reference_in_interpreter",),
             "Triton ball query pads with point 0"),
    Mutation("fps-starts-last", "grouping.py",
             "farthest = torch.zeros(B, dtype=torch.long, device=xyz.device)",
             "farthest = torch.full((B,), N - 1, dtype=torch.long, device=xyz.device)",
             (MODEL + "test_point_order_matters_only_through_point_0_and_overflowing_balls",),
             "FPS starts at the last point, not point 0"),
    # ---- train_stage2.main's own distributed wiring, and resume
    Mutation("sync-bn-skipped", "train_stage2.py",
             'sync_batchnorm(model if args.sync_bn == "all" else model.encoder, env.device)',
             "None  # each process normalises over its own shapes",
             (REL + "test_train_stage2_under_torchrun_equals_one_process",),
             "no SyncBatchNorm under torchrun"),
    Mutation("sync-bn-encoder-only", "train_stage2.py",
             'sync_batchnorm(model if args.sync_bn == "all" else model.encoder, env.device)',
             "sync_batchnorm(model.encoder, env.device)",
             (REL + "test_train_stage2_under_torchrun_equals_one_process",),
             "--sync-bn all converts only the encoder (the heads normalise per process)"),
    Mutation("sampler-rank-ignored", "data.py",
             "mine = order[: self.num_samples * self.world_size][self.rank :: self.world_size]",
             "mine = order[: self.num_samples * self.world_size][0 :: self.world_size]",
             (REL + "test_train_stage2_under_torchrun_equals_one_process",),
             "every rank takes rank 0's share of the epoch"),
    Mutation("resume-rng-lost", "checkpoint.py",
             "        set_rng_state(ckpt[\"rng\"][env.rank])\n",
             "        pass  # the RNG starts afresh\n",
             (REL + "test_sigkill_mid_epoch_then_resume_gives_bitwise_identical_weights",),
             "a resumed run does not restore its RNG (the heads' dropout draws other masks)"),
]

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals_blocked():
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done (then they are delivered)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def mutated(root, m):
    """The file of `m` with its mutation, restored on exit whatever happens."""
    path = root / m.file
    with signals_blocked():
        original = path.read_bytes()
        stat = path.stat()
        old, new = m.old.encode(), m.new.encode()
        count = original.count(old)
        if count != 1:
            raise LookupError(f"{m.file}: the old text occurs {count} times (expected once)")
        changed = original.replace(old, new)
        path.write_bytes(changed)
    try:
        yield
    finally:
        with signals_blocked():
            current = path.read_bytes()
            if current == changed:
                path.write_bytes(original)
                os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            elif current.count(new) == 1:  # someone else edited the file meanwhile: keep theirs
                path.write_bytes(current.replace(new, old))
                print(f"warning: {m.file} changed during the run; only the mutation was reverted",
                      file=sys.stderr, flush=True)
            elif current == original:
                pass
            else:
                print(f"ERROR: {m.file} changed during the run and the mutated text is gone; "
                      f"left as it is, check it by hand", file=sys.stderr, flush=True)


SKIP_TOP = {".git", ".venv", ".ci-venv", "data", "runs", "out"}  # not copied to the scratch tree
SKIP_ANY = {"__pycache__", ".pytest_cache", ".ruff_cache"}


def scratch_copy(root, dest):
    """Copy the working tree at `root` (without SKIP_TOP and SKIP_ANY) to the new folder `dest`."""
    def ignore(folder, names):
        top = Path(folder).resolve() == root
        return [n for n in names if n in SKIP_ANY or (top and n in SKIP_TOP)]

    shutil.copytree(root, dest, ignore=ignore, symlinks=True)


def run_pytest(root, tests, stop_first=True):
    """pytest's exit code on `tests` (-1: timed out), the seconds it took and its output. pytest
    runs in its own process group, which is killed whole on a timeout, Ctrl-C or SIGTERM (tests
    start subprocesses of their own)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # no .pyc of a mutated source
    flags = ["-q", "-x"] if stop_first else ["-q", "-rfE"]
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *flags, *tests], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except BaseException as e:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        if isinstance(e, subprocess.TimeoutExpired):
            return -1, time.time() - t0, "timed out"
        raise
    return proc.returncode, time.time() - t0, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="mutations to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the check that the tests pass on the unmodified tree")
    p.add_argument("--root", type=Path, default=ROOT,
                   help="repository to test (default: the one holding this file)")
    p.add_argument("--in-place", action="store_true",
                   help="mutate the files of --root itself instead of a scratch copy of it")
    p.add_argument("-v", "--verbose", action="store_true", help="print pytest's output")
    args = p.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    assert len(by_name) == len(MUTATIONS), "two mutations share a name"
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        p.error(f"unknown mutation(s) {', '.join(unknown)}; --list shows them")
    chosen = [by_name[n] for n in args.names] if args.names else MUTATIONS
    if args.list:
        for m in chosen:
            print(f"{m.name:24} {m.file:16} {m.what}\n{'':24} -> {' '.join(m.tests)}")
        return 0
    for sig in SIGNALS:  # also SIGINT: a shell starts background jobs with it ignored
        signal.signal(sig, terminate)
    root = args.root.resolve()
    if args.in_place:
        return run_all(root, chosen, args)
    scratch = Path(tempfile.mkdtemp(prefix="tamm-mutations-"))
    try:
        scratch_copy(root, scratch / "tree")
        print(f"mutating a scratch copy of {root}: {scratch / 'tree'}", flush=True)
        return run_all(scratch / "tree", chosen, args)
    except KeyboardInterrupt:  # while copying; run_all handles its own
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_all(root, chosen, args):
    """The baseline, then every mutation in `chosen` on the tree at `root` -> the exit code."""
    failing = set()  # tests that fail on the unmodified tree: they cannot catch anything
    if not args.no_baseline:
        tests = list(dict.fromkeys(t for m in chosen for t in m.tests))
        rc, seconds, out = run_pytest(root, tests, stop_first=False)
        failing = {t for t in tests if f"FAILED {t}" in out or f"ERROR {t}" in out}
        if rc != 0 and not failing:  # not a test failure (collection error, timeout): all suspect
            failing = set(tests)
        print(f"baseline: {len(tests)} tests on the unmodified tree: "
              f"{len(tests) - len(failing)} pass, {len(failing)} fail ({seconds:.0f} s)",
              flush=True)
        if failing:
            print(out[-4000:], flush=True)

    survived = []
    try:
        for m in chosen:
            if failing & set(m.tests):
                print(f"SURVIVED (its tests fail without the mutation) | {m.name}", flush=True)
                survived.append(m.name)
                continue
            try:
                with mutated(root, m):
                    rc, seconds, out = run_pytest(root, m.tests)
            except LookupError as e:
                rc, seconds, out = None, 0.0, str(e)
            caught = rc == 1
            why = {None: "not applied", -1: "timed out", 0: "tests passed"}.get(rc, f"rc {rc}")
            status = "caught  " if caught else f"SURVIVED ({why})"
            names = " ".join(t.split("::")[-1] for t in m.tests)
            print(f"{status} | {m.name:24} | {m.what} | {names} | {seconds:.0f} s", flush=True)
            if args.verbose or not caught:
                print(out[-3000:], flush=True)
            else:  # why: pytest's first error line
                first = next((line for line in out.splitlines() if line.startswith("E ")), "")
                print(f"           {first[:160]}", flush=True)
            if not caught:
                survived.append(m.name)
    except KeyboardInterrupt:
        print("interrupted: every file restored", file=sys.stderr)
        return 130
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutations caught"
          + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
