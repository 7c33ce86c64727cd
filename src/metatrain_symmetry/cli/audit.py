"""``mtt-symmetry audit``: the dataset-level symmetry audit of a model, with an
interactive viewer."""

from __future__ import annotations

import argparse
from functools import partial

from ..audit import audit, write_audit_report
from ..distributed import work_directory
from . import options


DISTRIBUTED = True
"""spread over the processes of torchrun or srun"""
NAME = "audit"
HELP = "dataset-level symmetry audit with an interactive viewer"
DESCRIPTION = (
    "Evaluate MODEL (exported .pt or metatrain .ckpt) on DATA, unrotated and "
    "on rotated copies, and write audit.json (errors against the dataset's "
    "targets, equivariance RMSE, symmetry leakage, mean spectra), audit.md, "
    "spectra.mts, spectra.png, a chemiscope dataset and audit.html, an "
    "offline viewer."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_and_data(parser)
    options.add_output_directory(parser)
    options.add_outputs(
        parser,
        "model outputs to audit ('forces' and 'stress' are derivatives of the "
        "energy; default: energy and the force output)",
    )
    options.add_targets(parser)
    options.add_features(parser)
    options.add_grid(parser)
    options.add_device(parser)
    options.add_dtype(parser)
    parser.add_argument(
        "--infinitesimal",
        action="store_true",
        help="also screen every structure with the infinitesimal metrics (Lie "
        "derivatives along the generators of rotations and the inversion error, "
        "about four model calls per structure) and report how well they rank "
        "the structures as the grid does",
    )


def run(args: argparse.Namespace) -> None:
    output = options.output_directory(args)
    work_dir = work_directory(output)
    result = audit(
        args.model,
        args.data,
        outputs=args.outputs,
        **options.shared_settings(args),
        progress=True,
        distributed=args.context.is_distributed,
        work_dir=work_dir,
        allow_close_atoms=args.allow_close_atoms,
        infinitesimal=args.infinitesimal,
    )
    if result is None:
        return
    options.write_output(output, partial(write_audit_report, result), work_dir)
    print((output / "audit.md").read_text())
    print(f"audit written to {output}/ (open {output / 'audit.html'} in a browser)")
