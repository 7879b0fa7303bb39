"""What the three scripts share on their command lines: flag types that check a number's range as
argparse reads it and take real booleans (str2bool), the check that an output folder can be
written, and the one-line ending of an error the machine causes (a full disk), so that a mistake
stops with one `error:` line in a second, before data loading or torch work. docs/errors.md lists every case and its message.
"""

import argparse
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

EXIT_INTERRUPTED = 130      # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


class Number:
    """argparse type: a finite int or float within bounds, else a one-line usage error naming the
    range, as `error: argument -b/--batch_size: must be an integer >= 1, got 0`.

    low, high: inclusive bounds; above, below: exclusive ones; None: no bound on that side.
    """

    def __init__(self, kind=int, low=None, high=None, above=None, below=None):
        self.kind, self.low, self.high, self.above, self.below = kind, low, high, above, below

    def describe(self):
        """The allowed values in words: `an integer >= 1`, `a number in (0, 1]`."""
        noun = "an integer" if self.kind is int else "a number"
        lower = (f"[{self.low:g}" if self.low is not None else
                 f"({self.above:g}" if self.above is not None else "")
        upper = (f"{self.high:g}]" if self.high is not None else
                 f"{self.below:g})" if self.below is not None else "")
        if lower and upper:
            return f"{noun} in {lower}, {upper}"
        if lower:
            return f"{noun} {'>=' if lower[0] == '[' else '>'} {lower[1:]}"
        if upper:
            return f"{noun} {'<=' if upper[-1] == ']' else '<'} {upper[:-1]}"
        return "a finite number" if self.kind is float else noun

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        ok = value is not None and math.isfinite(value) and not (
            (self.low is not None and value < self.low) or
            (self.high is not None and value > self.high) or
            (self.above is not None and value <= self.above) or
            (self.below is not None and value >= self.below))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text}")
        return value


def str2bool(value):
    """argparse type for real booleans: `--en_wandb False` is off (the course's type=bool is not)."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if value.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


# The ranges most flags take.
POSITIVE_INT = Number(int, low=1)
COUNT = Number(int, low=0)               # where 0 usually means "off"
POSITIVE = Number(float, above=0)
NON_NEGATIVE = Number(float, low=0)      # minutes, norms, sigmas: 0 usually means "off"
FRACTION = Number(float, low=0, high=1)
PROBABILITY_BELOW_1 = Number(float, low=0, below=1)    # dropout, an EMA's decay


def unwritable(path):
    """Why the folder `path` (made with its parents if missing) cannot take files, or None.
    Leaves nothing behind: a folder that does not exist yet is tried by making and removing a
    temporary folder in its nearest existing parent. As root, where permissions do not stop a
    write, this still finds the folders no one can write (/proc, /sys, a read-only mount)."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        if existing == path:
            tempfile.TemporaryFile(dir=path).close()
        else:
            os.rmdir(tempfile.mkdtemp(dir=existing))
    except OSError as err:
        return f"cannot write into {existing} ({err.strerror})"
    return None


def check_output_dirs(parser, args, *flags):
    """parser.error for the first flag (a dest name) whose folder cannot be written."""
    for flag in flags:
        reason = unwritable(getattr(args, flag))
        if reason:
            parser.error(f"--{flag} {getattr(args, flag)}: {reason}; choose another folder")


def os_error_line(err):
    """An OSError in one line: `<file>: <reason>`, or its message."""
    if err.strerror and err.filename:
        return f"{err.filename}: {err.strerror}"
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


@contextmanager
def errors_in_one_line():
    """Around a script's main: an OSError that reaches it (a full disk, a folder removed or made
    read-only meanwhile) ends the script with one `error:` line naming the file, and Ctrl-C with
    one line and exit code 130, instead of a traceback."""
    try:
        yield
    except OSError as err:
        sys.exit(f"error: {os_error_line(err)}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
