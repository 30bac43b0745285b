"""What every command shares: logging that does not tear progress bars, the device flag, `key=value`
overrides, argument types, and turning user errors into one line on stderr instead of a traceback."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence

from boxrefiner.errors import UserError
from boxrefiner.utils.allocator import keep_freed_memory


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse names the type in "invalid integer value"
    return parse


positive_int = _int_at_least(1)  # argparse types
non_negative_int = _int_at_least(0)


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


non_negative_float.__name__ = "number"


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """The one `--device` flag every command takes."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: CUDA when present)")


OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)+=")  # dotted.key=value


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """`key=value` overrides (listed in the help; split_overrides takes them out before parsing) and
    --print-config."""
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides applied after the flags, e.g. training.epochs=5 data.sample_ratio=0.2 "
                             "(values are YAML)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, the dotted `key=value` overrides), so that an option with an optional
    value (`--resume`) never swallows an override that follows it."""
    rest: list[str] = []
    pairs: list[str] = []
    for arg in argv:
        (pairs if OVERRIDE.match(arg) else rest).append(arg)
    return rest, pairs


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    rest, pairs = split_overrides(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    args.overrides = [*pairs, *args.overrides]  # anything left there is not dotted.key=value: with_overrides says what
    return args


def run_command(job: Callable[[], int], fatal: tuple[type[Exception], ...] = ()) -> int:
    """Run a command; user errors exit 2 and `fatal` errors (a run that cannot go on) exit 1, each with
    one line on stderr instead of a traceback."""
    keep_freed_memory()
    try:
        return job()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except fatal as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # read-only folder, full disk, ...: what and where, without a traceback
        print(f"error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # every file is written atomically, so nothing is torn
        print("interrupted at once; files already written are complete", file=sys.stderr)
        return 130
