"""The command line of every entry point: argparse types that check each value where it is parsed,
named presets, and `run_cli`, which turns a user mistake into one line on stderr and exit code 2.

A bad value is caught here, before a model is built or a shape is read: argparse calls the type of
each flag (`number`, `existing_file`, `output_dir`, ...), and each script's `parse_args` checks what
depends on several flags. Every flag's --help shows its default and its choices.
"""
import argparse
import math
import os
import sys

import torch

from files import BadInput, check_writable
from model import CONFIGS


def one_line(error):
    """The user's message of a BadInput. Raised inside a DataLoader worker, it reaches the main
    process wrapped in the worker's traceback ("Caught BadInput in DataLoader worker ... Original
    Traceback"), whose last line is "files.BadInput: <message>"."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def run_cli(main, argv=None):
    """Call `main(argv)`; turn BadInput into one line on stderr and exit code 2."""
    try:
        return main(argv)
    except BadInput as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends "(default: X)" to every flag that has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        has_default = action.default not in (None, False, argparse.SUPPRESS, [])
        if has_default and "%(default)" not in text and action.option_strings:
            default = action.default
            if isinstance(default, (list, tuple)):
                default = " ".join(map(str, default))
            text += f" (default: {default})"
        return text


class Parser(argparse.ArgumentParser):
    """argparse whose errors are BadInput: one line and exit code 2 through run_cli (argparse would
    add its usage text and exit on its own)."""

    def __init__(self, description=None, **kw):
        super().__init__(description=description, formatter_class=HelpFormatter, **kw)

    def error(self, message):
        raise BadInput(message)


# ---- argument types: each returns the parsed value or raises argparse.ArgumentTypeError ----------


def number(kind=float, low=None, high=None, above=False):
    """An argparse type: an int or a finite float in [low, high] (low excluded when `above`)."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        too_low = low is not None and (value <= low if above else value < low)
        too_high = high is not None and value > high
        if not math.isfinite(value) or too_low or too_high:
            bounds = []
            if low is not None:
                bounds.append(f"{'>' if above else '>='} {low}")
            if high is not None:
                bounds.append(f"<= {high}")
            raise argparse.ArgumentTypeError(
                f"must be {' and '.join(bounds) or 'finite'}, got {text}"
            )
        return value

    parse.__name__ = kind.__name__
    return parse


COUNT = number(int, 0)
POSITIVE_INT = number(int, 1)
POSITIVE = number(float, 0, above=True)
NONNEGATIVE = number(float, 0)
FRACTION = number(float, 0, 1)


def device(text):
    """--device: cpu, cuda or cuda:N, and CUDA only where there is a GPU (N one of them)."""
    if text != "cpu" and not (text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text} was requested but no CUDA device is available")
    count = torch.cuda.device_count()
    if text.startswith("cuda:") and int(text[5:]) >= count:
        raise argparse.ArgumentTypeError(f"{text}: there are {count} CUDA devices, 0 to "
                                         f"{count - 1}")
    return text


def existing_file(text):
    """A file that exists (not a folder)."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a folder, expected a file")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


def existing_dir(text):
    """A folder that exists (not a file)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a file, expected a folder")
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    return text


def _check_nearest_folder(text, path):
    """The nearest existing folder above `path` is a writable folder (probed; nothing is created,
    since a later check may still fail: whoever writes makes the missing folders)."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text}: {folder} is a file, not a folder")
    try:
        check_writable(folder, text)  # it exists: only probed
    except BadInput as e:  # as a type error, argparse names the flag
        raise argparse.ArgumentTypeError(str(e)) from None


def output_file(text):
    """A file to write: not a folder, in a folder we can write (made when the file is written)."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a folder, expected a file name")
    _check_nearest_folder(text, os.path.dirname(os.path.abspath(text)))
    return text


def output_dir(text):
    """A folder to write into: not a file, and writable (it is made when it is first written)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a file, expected a folder")
    _check_nearest_folder(text, text)
    return text


def scaling(text):
    """--scaling: a PointBERT size of model.CONFIGS, '1'..'6' or 'tiny'."""
    key = int(text) if text.isdigit() else text
    if key not in CONFIGS:
        sizes = ", ".join(map(str, CONFIGS))
        raise argparse.ArgumentTypeError(f"unknown size {text!r}, choose one of {sizes}")
    return key


def looks_like_path(text):
    """A value meant as a file name rather than a list: a folder separator, or a file extension, and
    no comma (so "table, chair" is a list and "labels.txt" or "my/labels" a file)."""
    return "," not in text and (os.sep in text or os.path.splitext(text)[1] != "")


def parse_names(value, flag):
    """A comma-separated list, or a file with one name per line -> the non-empty names."""
    if os.path.isfile(value):
        with open(value) as f:
            names = [line.strip() for line in f]
    elif looks_like_path(value):
        raise BadInput(f"{flag} {value}: no such file (give a file with one name per line, "
                       f"or a comma-separated list)")
    else:
        names = [s.strip() for s in value.split(",")]
    names = [s for s in names if s]
    if not names:
        raise BadInput(f"{flag} {value!r}: no labels given (a comma-separated list, "
                       f"or a file with one per line)")
    return names


def check_points(num_points, size=None, flag="--num-points"):
    """FPS picks S patch centres among the points: fewer points than patches cannot be grouped.
    Without a `size` (a checkpoint's size is known once it is loaded) the bound is the smallest
    size's patches."""
    patches = min(CONFIGS[s].num_patches for s in ([size] if size is not None else CONFIGS))
    if num_points is not None and num_points < patches:
        which = f"--scaling {size}" if size is not None else "the smallest encoder size"
        raise BadInput(f"{flag} {num_points}: fewer than the {patches} patches of {which}")


# ---- presets: every value of a preset is a flag; --help shows each preset's value and its source -


def preset_parser(description, presets, flags):
    """A Parser with one flag per preset key, whose default None `apply_preset` fills in.

    flags[name] = (type or list of choices, where the paper's value comes from)."""
    p = Parser(description)
    p.add_argument("--preset", choices=sorted(presets),
                   help="named defaults (default: demo without --data, paper with it)")
    for name, (kind, source) in flags.items():
        shown = ", ".join(f"{preset}={values[name]}" for preset, values in presets.items())
        check = {"choices": kind} if isinstance(kind, (list, tuple)) else {"type": kind}
        p.add_argument("--" + name.replace("_", "-"), default=None, **check,
                       help=f"[{shown}; source: {source}]")
    return p


def apply_preset(args, presets):
    """Fill every flag left at None from the chosen preset."""
    args.preset = args.preset or ("paper" if args.data else "demo")
    for name, value in presets[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def check_batch(batch_size, world_size, min_rows=1):
    """The global batch splits evenly over the processes torchrun starts, >= min_rows each."""
    if batch_size % world_size or batch_size // world_size < min_rows:
        why = " (BatchNorm needs 2)" if min_rows > 1 else ""
        raise BadInput(f"--batch-size {batch_size} (global) must split into {world_size} equal "
                       f"parts of >= {min_rows} shapes{why}")


def check_output(path, flag="--out"):
    """output_dir's checks on a folder that did not come through argparse (a default such as
    runs/demo)."""
    try:
        output_dir(path)
    except argparse.ArgumentTypeError as e:
        raise BadInput(f"{flag} {e}") from None
