"""The ``hisynseg`` command: parses arguments and dispatches to one function per subcommand.

Each subcommand lives in its own module of this package with two functions:
``add_parser(subparsers)`` and ``run(args) -> int``. Modules are imported only when the
command line names them, so ``hisynseg --help`` stays fast and torch-free.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from hisynseg import __version__
from hisynseg.errors import HisynsegError

# subcommand name -> module in hisynseg.cli
COMMANDS: dict[str, str] = {
    "toy-data": "toy_data",
    "validate-data": "validate_data",
    "synthesize": "synthesize",
    "train-filter": "train_filter",
    "train": "train",
    "evaluate": "evaluate",
    "pseudo-label": "pseudo_label",
    "predict": "predict",
    "export": "export",
    "pipeline": "pipeline",
    "demo": "demo",
}


class CommandError(HisynsegError):
    """An error to report as one line on stderr with exit status 2 (no traceback)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hisynseg",
        description="Weakly-supervised tissue segmentation of histopathology images (HisynSeg).",
    )
    parser.add_argument("--version", action="version", version=f"hisynseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMANDS.values():
        importlib.import_module(f"hisynseg.cli.{module_name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hisynseg`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except HisynsegError as exc:
        print(f"hisynseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"hisynseg {args.command}: interrupted; re-run the same command to resume",
            file=sys.stderr,
        )
        return 130
