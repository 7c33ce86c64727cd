"""``mtt-symmetry train``: ``mtt train`` with the equivariance loss registered
explicitly (for where automatic registration is switched off)."""

from __future__ import annotations

import argparse
import sys

from ..hooks import register


NAME = "train"
HELP = "'mtt train' with the equivariance loss registered explicitly"
DESCRIPTION = (
    "Register the 'equivariance' loss type in metatrain, then run "
    "'mtt train' with the remaining arguments (OPTIONS.yaml, -o, "
    "--restart, ...). Needed only where automatic registration is off "
    "(METATRAIN_SYMMETRY_AUTOLOAD=0)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "mtt_arguments",
        nargs=argparse.REMAINDER,
        metavar="OPTIONS [mtt train arguments]",
        help="arguments passed on to 'mtt train'",
    )


def run(args: argparse.Namespace) -> None:
    register()
    from metatrain.__main__ import main as metatrain_main

    saved = sys.argv
    sys.argv = ["mtt", "train", *args.mtt_arguments]
    try:
        metatrain_main()
    finally:
        sys.argv = saved
