"""The `boxrefiner` command: one entry point, one subcommand per job.

    boxrefiner train --config C.yaml [flags] [key=value ...]
    boxrefiner extract | refine | evaluate | synth | bench epoch | bench suite ...
    torchrun --nproc_per_node N -m boxrefiner train ...   (several processes; see utils/distributed.py)

A subcommand's module is imported only when it runs, so `boxrefiner --help` and argument errors come
back at once.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from boxrefiner.version import __version__

COMMANDS = {  # name -> (module with main(argv, prog), one line of help)
    "train": ("boxrefiner.cli.train", "train the refiner on a dataset (cache, AMP, resume, key=value overrides)"),
    "extract": ("boxrefiner.cli.train:extract_main", "fill the feature cache for both splits and exit (torchrun: sharded)"),
    "refine": ("boxrefiner.cli.refine", "refine detector boxes with a trained refiner (optionally HQ-SAM masks)"),
    "evaluate": ("boxrefiner.cli.evaluate", "measure a trained refiner on a labelled split (IoU, AP, masks)"),
    "synth": ("boxrefiner.cli.synth", "write a synthetic dataset (FungiTastic, or COCO + YOLO with detections)"),
    "bench": ("boxrefiner.cli.bench", "measure the speed-ups: 'bench epoch' (one config), 'bench suite' (all)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: boxrefiner <command> [options]   (boxrefiner <command> --help for its options)", "",
             "Train and apply a box-refinement head on frozen HQ-SAM image embeddings.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(f"boxrefiner {__version__}")
        return 0
    if args[0] not in COMMANDS:
        print(f"error: unknown command '{args[0]}'; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, _, function = COMMANDS[args[0]][0].partition(":")
    entry = getattr(importlib.import_module(module), function or "main")
    return int(entry(args[1:], prog=f"boxrefiner {args[0]}"))
