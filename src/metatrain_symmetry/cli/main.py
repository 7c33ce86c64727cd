"""The ``mtt-symmetry`` command: the parser of every sub-command, processes of
distributed runs, and one-line errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from .._utils import first_line
from ..distributed import (
    DistributedContext,
    RankFailure,
    agree,
    environment_world_size,
    init_from_environment,
)
from . import analyze, audit, consequences, demo, dynamics, export, retrain, train


# in the order --help lists them
COMMANDS = (analyze, audit, export, dynamics, retrain, consequences, train, demo)

# errors of bad input: one line and exit code 2; any other error is a bug and
# keeps its traceback
INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, RuntimeError)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``mtt-symmetry`` and its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="mtt-symmetry",
        description="Measure, train and audit the rotational symmetry of "
        "metatomic models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        subparser = commands.add_parser(
            command.NAME,
            help=command.HELP,
            description=command.DESCRIPTION,
            usage=getattr(command, "USAGE", None),
        )
        command.add_arguments(subparser)
        subparser.set_defaults(
            run=command.run, distributed=getattr(command, "DISTRIBUTED", False)
        )
    return parser


def _join_processes(args: argparse.Namespace) -> DistributedContext:
    """The processes of ``torchrun`` or ``srun`` for the commands that use them,
    else a single process."""
    if not getattr(args, "distributed", False) or environment_world_size() <= 1:
        return DistributedContext()
    backend = "gloo" if getattr(args, "device", None) != "cuda" else None
    return init_from_environment(backend=backend)


def main(argv: list[str] | None = None) -> int:
    """Run ``mtt-symmetry`` with ``argv`` (default: the command line).

    :return: the exit code: 0, 2 for bad input, 130 when interrupted
    """
    args = build_parser().parse_args(argv)
    context = DistributedContext()
    try:
        try:
            args.context = context = _join_processes(args)
            args.run(args)
        except Exception as error:
            if context.is_distributed and not isinstance(error, RankFailure):
                # tell the other ranks, which otherwise wait for this one
                agree(context, error)
            raise
        # rank 0 writes the files: the others wait to learn whether it did
        agree(context, None)
    except RankFailure as error:
        # this rank's own error carries its type; another rank's is a RankFailure
        return _report(args.command, error.__cause__ or error)
    except INPUT_ERRORS as error:
        return _report(args.command, error)
    except KeyboardInterrupt:
        print(f"mtt-symmetry {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if context.is_distributed:
            torch.distributed.destroy_process_group()
    return 0


def _report(command: str, error: BaseException) -> int:
    """Print an error as one line and return the exit code; unexpected errors
    keep their traceback."""
    if not isinstance(error, INPUT_ERRORS):
        raise error
    print(f"mtt-symmetry {command}: error: {first_line(error)}", file=sys.stderr)
    return 2


def entry_point() -> None:
    """The ``mtt-symmetry`` program: :py:func:`main`, then exit with its code.

    A process started by ``torchrun`` or ``srun`` ends with ``os._exit`` once its
    files are written and its output flushed, skipping the interpreter's shutdown.
    In torch 2.13, forward-mode differentiation under ``no_grad`` (the
    infinitesimal screen) keeps gloo's worker threads alive after
    ``destroy_process_group``; when such a thread frees a finished collective
    while the interpreter shuts down, the process aborts ("terminate called
    without an active exception") after having done its work.
    """
    code = main()
    if environment_world_size() > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
