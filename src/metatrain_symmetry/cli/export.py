"""``mtt-symmetry export``: a checkpoint exported as ``mtt export`` does, with its
symmetry audit in the model's metadata, optionally O(3)-averaged."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..audit import audit_markdown, export_audited
from ..data import read_structures
from . import options


NAME = "export"
HELP = "export a checkpoint with its symmetry audit in the model metadata"
DESCRIPTION = (
    "Export CHECKPOINT as 'mtt export' does, after auditing it on the "
    "structures of --audit DATA; the audit summary is stored as JSON in "
    "metadata().extra['symmetry-audit']. With --symmetrize the exported "
    "model predicts O(3)-averaged outputs and exposes o3::variance::<name>."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="metatrain checkpoint (.ckpt)")
    parser.add_argument("-o", "--output", required=True, help="exported model (.pt)")
    options.add_force(parser, "an existing output file")
    parser.add_argument(
        "--audit",
        required=True,
        metavar="DATA",
        help="structures for the audit, "
        + options.DATA_HELP.replace("structures ", ""),
    )
    parser.add_argument(
        "--symmetrize",
        action="store_true",
        help="export the O(3)-averaged model (metatomic's SymmetrizedModel)",
    )
    options.add_outputs(
        parser, "model outputs to audit (default: energy and the force output)"
    )
    options.add_allow_close_atoms(parser)
    options.add_targets(parser)
    options.add_grid(
        parser,
        degree_help="Lebedev degree of the averaging quadrature and of the audit "
        "grid (default: each chooses its own; with --rotations, of the averaging "
        "alone)",
    )
    options.add_device(parser)


def run(args: argparse.Namespace) -> None:
    output = options.check_output_file(args.output, args.force)
    if args.grid_degree is not None and not args.symmetrize:
        raise ValueError("--grid-degree applies to --symmetrize; add --symmetrize")
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint '{args.checkpoint}' does not exist")
    options.check_device(args.device)
    # fail early on unreadable data, or on close atoms not allowed (allowed, the
    # audit warns of them, once)
    read_structures(
        args.audit, allow_close_atoms=None if args.allow_close_atoms else False
    )
    result = export_audited(
        args.checkpoint,
        output,
        args.audit,
        symmetrize=args.symmetrize,
        grid_degree=args.grid_degree,
        audit_grid=options.random_grid_from_args(args),
        outputs=args.outputs,
        targets=options.parse_targets(args.targets),
        max_lambda=args.max_lambda,
        batch_size=args.batch_size,
        device=args.device,
        progress=True,
        allow_close_atoms=args.allow_close_atoms,
    )
    print(audit_markdown(result.summary))
    kind = "O(3)-averaged model" if args.symmetrize else "model"
    print(f"{kind} with its audit in metadata written to {output}")
