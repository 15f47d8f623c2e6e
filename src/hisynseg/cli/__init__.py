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


# Commands whose re-run continues an interrupted run instead of starting it again (synthesis
# writes only missing images, training resumes from last.ckpt, pseudo-labelling and predict
# write only what is missing, pipeline and demo skip completed stages). The others start over.
RESUMABLE: frozenset[str] = frozenset(
    {"synthesize", "train", "pseudo-label", "predict", "pipeline", "demo"}
)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a ``kill``, a scheduler's time limit) during a command.

    A ``KeyboardInterrupt``, so the work in progress stops the way it does on Ctrl-C:
    reader processes are stopped, temporary outputs removed, and a re-run of a resumable
    command (:data:`RESUMABLE`) resumes.
    """


@contextlib.contextmanager
def _record_stop_signals() -> Iterator[list[int]]:
    """Within: SIGTERM raises :class:`Terminated` and SIGINT ``KeyboardInterrupt`` in the
    main thread, and both are recorded.

    SIGTERM's default would end the process on the spot, leaving reader processes and
    temporary files. SIGINT already raises ``KeyboardInterrupt``; it is recorded because
    Lightning catches that exception and ends a fit with ``sys.exit(1)``, which would
    otherwise read as a crash instead of an interruption. A SIGINT handler other than
    Python's default (e.g. ``SIG_IGN`` in a background job) is left alone.

    Yields:
        The signals received so far (a list that grows).
    """
    received: list[int] = []

    def terminate(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise Terminated()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise KeyboardInterrupt()

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    handlers = {signal.SIGTERM: terminate, signal.SIGINT: interrupt}
    previous = {signum: signal.getsignal(signum) for signum in handlers}
    installed = [
        signum
        for signum in handlers
        # None: a handler not set from Python, which could not be put back afterwards.
        if previous[signum] is not None
        and (signum == signal.SIGTERM or previous[signum] is signal.default_int_handler)
    ]
    for signum in installed:
        signal.signal(signum, handlers[signum])
    try:
        yield received
    finally:
        for signum in installed:
            signal.signal(signum, previous[signum])


def _stopped(command: str, terminated: bool) -> int:
    """Report a command stopped by a signal; the exit status a shell gives that signal."""
    if command in RESUMABLE:
        advice = "re-run the same command to resume"
    elif command == "toy-data":
        advice = "re-run it with --overwrite to start again"
    else:
        # This command keeps no partial progress: promising a resume would mislead.
        advice = "a re-run starts from the beginning"
    print(
        f"hisynseg {command}: {'terminated' if terminated else 'interrupted'}; {advice}",
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


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``command`` (for errors that name the subcommand)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    return parser


def _looks_like_override(word: str) -> bool:
    return "=" in word and not word.startswith("-")


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Parse the command line, letting ``key=value`` overrides sit between options.

    The overrides are one ``nargs="*"`` positional, which argparse fills from a single
    run of words, so ``train a=1 --data X b=2`` would leave ``b=2`` unrecognised.
    (``parse_intermixed_args`` would fix that, but it does not support subparsers.) Any
    leftover word that looks like an override (holds ``=``, does not start with ``-``)
    is appended to ``overrides``, keeping the command-line order; every other leftover
    is still a usage error (exit status 2) that names the subcommand.
    """
    args, extras = parser.parse_known_args(argv)
    if extras:
        if hasattr(args, "overrides"):
            overrides = [w for w in extras if _looks_like_override(w)]
            args.overrides = [*(args.overrides or []), *overrides]
            extras = [w for w in extras if not _looks_like_override(w)]
        if extras:
            _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hisynseg`` console script."""
    parser = build_parser()
    args = parse_args(parser, argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    received: list[int] = []
    try:
        with _record_stop_signals() as received:
            return int(args.func(args) or 0)
    except HisynsegError as exc:
        print(f"hisynseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return _stopped(args.command, isinstance(exc, Terminated))
    except SystemExit:
        # Lightning catches the KeyboardInterrupt a signal raised and ends the fit with
        # sys.exit(1) after its own clean-up: the recorded signal says what really happened.
        if received:
            return _stopped(args.command, received[0] == signal.SIGTERM)
        raise
