"""The ``hisynseg`` command: parses arguments and dispatches to one function per subcommand.

Each subcommand lives in its own module of this package with two functions:
``add_parser(subparsers)`` and ``run(args) -> int``. Modules are imported only when the
command line names them, so ``hisynseg --help`` stays fast and torch-free.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType

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


class Terminated(KeyboardInterrupt):
    """SIGTERM (a ``kill``, a scheduler's time limit) during a command.

    A ``KeyboardInterrupt``, so the work in progress stops the way it does on Ctrl-C:
    reader processes are stopped, temporary outputs removed, and a re-run resumes.
    """


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[list[int]]:
    """Within: SIGTERM raises :class:`Terminated` in the main thread (Python's default
    would end the process on the spot, leaving reader processes and temporary files).

    Yields:
        The signals received so far (a list that grows).
    """
    received: list[int] = []

    def terminate(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise Terminated()

    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield received
        return
    signal.signal(signal.SIGTERM, terminate)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped(command: str, terminated: bool) -> int:
    print(
        f"hisynseg {command}: {'terminated' if terminated else 'interrupted'}; "
        "re-run the same command to resume",
        file=sys.stderr,
    )
    return 143 if terminated else 130


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
    received: list[int] = []
    try:
        with _sigterm_as_interrupt() as received:
            return int(args.func(args) or 0)
    except HisynsegError as exc:
        print(f"hisynseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return _stopped(args.command, isinstance(exc, Terminated))
    except SystemExit:
        # Lightning ends an interrupted fit with sys.exit(1) after its own clean-up; a
        # scheduler's SIGTERM must still read as one.
        if received:
            return _stopped(args.command, True)
        raise
