"""The ``mtt-symmetry`` command: thin sub-commands over the Python API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _read_structures(path: str):
    import ase.io

    if not Path(path).is_file():
        raise FileNotFoundError(f"data file '{path}' does not exist")
    try:
        frames = ase.io.read(path, index=":")
    except Exception as error:
        raise ValueError(
            f"could not read structures from '{path}' with ASE ({error})"
        ) from error
    if len(frames) == 0:
        raise ValueError(f"'{path}' contains no structures")
    return frames


def _analyze(args) -> None:
    import metatrain_symmetry as msym

    from .report import (
        atomic_directory,
        check_output_directory,
        plot_spectra,
        save_result,
        summary_table,
    )

    output = check_output_directory(args.output, args.force)
    model = msym.load_model(args.model)
    frames = _read_structures(args.data)
    names = list(args.outputs)
    if args.features == ["all"]:
        names += model.features
    else:
        names += args.features
    if len(names) == 0:
        raise ValueError("nothing to analyse: give --outputs and/or --features")
    model.check_names(names)
    grid = None if args.grid_degree is None else msym.O3Grid(args.grid_degree)
    result = msym.analyze(
        model,
        frames,
        names,
        max_lambda=args.max_lambda,
        grid=grid,
        batch_size=args.batch_size,
        progress=True,
        per_atom=args.per_atom,
    )
    with atomic_directory(output) as staging:
        save_result(result, staging)
        (staging / "summary.md").write_text(summary_table(result))
        plot_spectra({Path(args.model).name: result}, staging / "spectra.png")
    print(summary_table(result))
    print(f"results written to {output}/")


def _demo(args) -> None:
    from .demo import run_demo
    from .report import check_output_directory

    output = check_output_directory(args.output, args.force)
    run_demo(output, epochs=args.epochs)


def _train(args) -> None:
    from .hooks import register

    register()
    from metatrain.__main__ import main as metatrain_main

    saved = sys.argv
    sys.argv = ["mtt", "train", *args.mtt_arguments]
    try:
        metatrain_main()
    finally:
        sys.argv = saved


def _add_train_command(commands) -> None:
    train = commands.add_parser(
        "train",
        help="'mtt train' with the equivariance loss registered explicitly",
        description=(
            "Register the 'equivariance' loss type in metatrain, then run "
            "'mtt train' with the remaining arguments (OPTIONS.yaml, -o, "
            "--restart, ...). Needed only where automatic registration is off "
            "(METATRAIN_SYMMETRY_AUTOLOAD=0)."
        ),
    )
    train.add_argument(
        "mtt_arguments",
        nargs=argparse.REMAINDER,
        metavar="OPTIONS [mtt train arguments]",
        help="arguments passed on to 'mtt train'",
    )
    train.set_defaults(run=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtt-symmetry",
        description="Measure the rotational symmetry of metatomic models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    analyze = commands.add_parser(
        "analyze",
        help="equivariance errors and (lambda, sigma) spectra of a model",
        description=(
            "Evaluate MODEL (exported .pt or metatrain .ckpt) on rotated copies of "
            "every structure in DATA and write equivariance errors, character "
            "projections, symmetrized predictions and spectra as TensorMaps."
        ),
    )
    analyze.add_argument("model", help="exported model (.pt) or checkpoint (.ckpt)")
    analyze.add_argument("data", help="structures in any format ASE can read")
    analyze.add_argument("-o", "--output", required=True, help="output directory")
    analyze.add_argument(
        "--outputs", nargs="*", default=["energy"], help="model outputs to analyse"
    )
    analyze.add_argument(
        "--features",
        nargs="*",
        default=[],
        help="internal features ('mtt::feature::<path>'), or 'all'",
    )
    analyze.add_argument("--max-lambda", type=int, default=4)
    analyze.add_argument("--grid-degree", type=int, default=None)
    analyze.add_argument("--batch-size", type=int, default=None)
    analyze.add_argument(
        "--per-atom", action="store_true", help="per-atom energies and stresses"
    )
    analyze.add_argument(
        "--force", action="store_true", help="replace a non-empty output directory"
    )
    analyze.set_defaults(run=_analyze)

    demo = commands.add_parser(
        "demo",
        help="train a small PET on generated data and analyse its symmetry",
        description=(
            "Generate a small dataset with ASE's EMT calculator, train a small PET "
            "with 'mtt train', and write its equivariance errors and spectra of "
            "outputs and internal features."
        ),
    )
    demo.add_argument("-o", "--output", required=True, help="output directory")
    demo.add_argument("--epochs", type=int, default=30, help="training epochs")
    demo.add_argument(
        "--force", action="store_true", help="replace a non-empty output directory"
    )
    demo.set_defaults(run=_demo)
    _add_train_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"mtt-symmetry {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mtt-symmetry {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
