"""The ``mtt-symmetry`` command: thin sub-commands over the Python API."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ._cli_options import (
    add_device_option,
    add_dtype_option,
    add_force_option,
    add_grid_options,
    check_device,
    dtype_from_args,
    grid_from_args,
    parse_targets,
)
from ._utils import first_line
from .data import read_structures
from .demo import DEFAULT_EPOCHS, DEFAULT_GAMMA
from .distributed import (
    DistributedContext,
    RankFailure,
    agree,
    environment_world_size,
    init_from_environment,
)


# the commands that spread their work over the processes of torchrun or srun
_DISTRIBUTED_COMMANDS = ("audit", "analyze")


def _analyze(args) -> None:
    import metatrain_symmetry as msym

    from ._utils import atomic_directory, check_output_directory
    from .report import plot_spectra, save_result, summary_table

    output = check_output_directory(args.output, args.force)
    model = msym.load_model(args.model, dtype=dtype_from_args(args))
    frames = read_structures(args.data)
    names = list(args.outputs)
    if args.features == ["all"]:
        names += model.features
    else:
        names += args.features
    if len(names) == 0:
        raise ValueError("nothing to analyse: give --outputs and/or --features")
    model.check_names(names)
    grid = grid_from_args(args)
    work_dir = _work_directory(output)
    result = msym.analyze(
        model,
        frames,
        names,
        max_lambda=args.max_lambda,
        grid=grid,
        batch_size=args.batch_size,
        progress=True,
        per_atom=args.per_atom,
        distributed=args.context.is_distributed,
        work_dir=work_dir,
    )
    if result is None:
        return
    with atomic_directory(output) as staging:
        save_result(result, staging)
        (staging / "summary.md").write_text(summary_table(result))
        plot_spectra({Path(args.model).name: result}, staging / "spectra.png")
    shutil.rmtree(work_dir)
    print(summary_table(result))
    print(f"results written to {output}/")


def _work_directory(output: Path) -> Path:
    """Where the completed shards of an audit or analysis writing ``output`` are
    kept until ``output`` is complete, so that an interrupted run resumes."""
    return output.parent / f"{output.name}.partial"


def _dynamics(args) -> None:
    import metatrain_symmetry as msym

    from ._utils import atomic_directory, check_output_directory
    from .dynamics import dynamics_markdown, save_dynamics

    if len(args.paths) < 2:
        raise ValueError(
            "give at least one checkpoint and then the data file: "
            "mtt-symmetry dynamics CHECKPOINT [CHECKPOINT ...] DATA -o DIR"
        )
    checkpoints, data = args.paths[:-1], args.paths[-1]
    output = check_output_directory(args.output, args.force)
    for checkpoint in checkpoints:
        if not Path(checkpoint).exists():
            raise FileNotFoundError(f"checkpoint '{checkpoint}' does not exist")
    frames = read_structures(data)
    features = args.features
    if features is not None and features == ["all"]:
        features = "all"
    dynamics = msym.training_dynamics(
        checkpoints,
        frames,
        outputs=args.outputs,
        features=features,
        max_lambda=args.max_lambda,
        grid=grid_from_args(args),
        batch_size=args.batch_size,
        progress=True,
        weights=args.weights,
        dtype=dtype_from_args(args),
    )
    with atomic_directory(output) as staging:
        save_dynamics(dynamics, staging)
    print(dynamics_markdown(dynamics))
    print(f"results written to {output}/")


def _add_dynamics_command(commands) -> None:
    dynamics = commands.add_parser(
        "dynamics",
        help="spectra of outputs and features across training checkpoints",
        usage=(
            "mtt-symmetry dynamics CHECKPOINT [CHECKPOINT ...] DATA -o OUTPUT [options]"
        ),
        description=(
            "Analyse every CHECKPOINT of a training run (for example the "
            "model_<epoch>.ckpt files 'mtt train' writes every checkpoint_interval "
            "epochs) on the structures in DATA, and write the (lambda, sigma) "
            "spectra of outputs and internal features against epoch as TensorMaps, "
            "epoch x lambda heatmaps (dynamics.png), the last checkpoint's spectra "
            "layer by layer (layers.png) and a summary (dynamics.md, dynamics.csv)."
        ),
    )
    dynamics.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="checkpoints (.ckpt) of one training run, then structures in any "
        "format ASE can read",
    )
    dynamics.add_argument("-o", "--output", required=True, help="output directory")
    dynamics.add_argument(
        "--outputs",
        nargs="*",
        default=None,
        help="model outputs to follow (default: the model's training targets)",
    )
    dynamics.add_argument(
        "--features",
        nargs="*",
        default=None,
        help="internal features ('mtt::feature::<path>'), or 'all' (default: the "
        "node features after each message-passing layer)",
    )
    add_grid_options(dynamics, rotations=True)
    add_dtype_option(dynamics)
    dynamics.add_argument(
        "--weights",
        choices=["epoch", "best"],
        default="epoch",
        help="analyse the weights at each checkpoint's epoch (default) or the best "
        "weights so far, as 'mtt export' would",
    )
    add_force_option(dynamics)
    dynamics.set_defaults(run=_dynamics)


def _demo(args) -> None:
    from ._utils import check_output_directory
    from .demo import run_demo

    output = check_output_directory(args.output, args.force)
    run_demo(output, epochs=args.epochs, gamma=args.gamma)


def _retrain(args) -> None:
    import metatrain_symmetry as msym

    from ._utils import check_output_directory

    output = check_output_directory(args.output, args.force)
    check_device(args.device)
    if args.grid_degree is not None and args.n_rotations is not None:
        raise ValueError("give either --grid-degree or --n-rotations, not both")
    grid = None
    if args.grid_degree is not None:
        grid = msym.O3Grid(args.grid_degree)
    elif args.n_rotations is not None:
        grid = msym.O3Grid.random(args.n_rotations, seed=args.seed)
    result = msym.retrain_last_layer(
        args.checkpoint,
        read_structures(args.data),
        validation=None
        if args.validation is None
        else read_structures(args.validation),
        gammas=args.gamma,
        targets=args.targets,
        grid=grid,
        ridge=args.ridge,
        ignore_gradients=args.ignore_gradients,
        output=output,
        force=True,
        batch_size=args.batch_size,
        device=args.device,
        progress=True,
    )
    print((output / "pareto.md").read_text())
    print(
        f"{len(result.checkpoints)} checkpoints and the trade-off written to {output}/"
    )


def _add_retrain_command(commands) -> None:
    retrain = commands.add_parser(
        "retrain",
        help="closed-form last-layer retraining with an equivariance penalty",
        description=(
            "Retrain the readout (last-layer weights and biases) of a metatrain PET "
            "checkpoint exactly, minimizing L_mu + gamma * L_sigma on the structures "
            "of DATA for every gamma; writes gamma-<value>.ckpt, pareto.csv, "
            "pareto.md and pareto.png."
        ),
    )
    retrain.add_argument("checkpoint", help="metatrain PET checkpoint (.ckpt)")
    retrain.add_argument("data", help="training structures with labels (ASE format)")
    retrain.add_argument("--validation", default=None, help="validation structures")
    retrain.add_argument(
        "--gamma", type=float, nargs="+", default=[0.0, 0.1, 1.0, 10.0, 100.0]
    )
    retrain.add_argument(
        "--targets", nargs="+", default=None, help="targets to retrain"
    )
    retrain.add_argument("--ridge", type=float, default=0.0, help="ridge coefficient")
    retrain.add_argument(
        "--n-rotations", type=int, default=None, help="random rotations (default 16)"
    )
    retrain.add_argument("--grid-degree", type=int, default=None, help="O3Grid degree")
    retrain.add_argument("--seed", type=int, default=0, help="seed of random rotations")
    retrain.add_argument(
        "--ignore-gradients",
        action="store_true",
        help="retrain energies trained with forces on energies alone",
    )
    retrain.add_argument("--batch-size", type=int, default=None)
    add_device_option(retrain)
    retrain.add_argument("-o", "--output", required=True, help="output directory")
    add_force_option(retrain)
    retrain.set_defaults(run=_retrain)


def _audit(args) -> None:
    import metatrain_symmetry as msym

    from ._utils import atomic_directory, check_output_directory, sha256_of_file
    from .audit import audit
    from .audit_files import write_audit_report

    output = check_output_directory(args.output, args.force)
    check_device(args.device)
    model = msym.load_model(args.model, dtype=dtype_from_args(args), device=args.device)
    frames = read_structures(args.data)
    grid = grid_from_args(args)
    features = ["all"] if args.features == ["all"] else args.features
    work_dir = _work_directory(output)
    result = audit(
        model,
        frames,
        outputs=args.outputs,
        features=features,
        targets=parse_targets(args.targets),
        max_lambda=args.max_lambda,
        grid=grid,
        batch_size=args.batch_size,
        progress=True,
        distributed=args.context.is_distributed,
        work_dir=work_dir,
    )
    if result is None:
        return
    # identify the files, not the in-memory copies
    result.summary["model"].update(
        path=args.model, sha256=sha256_of_file(Path(args.model))
    )
    result.summary["dataset"].update(
        path=args.data, sha256=sha256_of_file(Path(args.data))
    )
    with atomic_directory(output) as staging:
        write_audit_report(result, frames, staging)
    shutil.rmtree(work_dir)
    print((output / "audit.md").read_text())
    print(f"audit written to {output}/ (open {output / 'audit.html'} in a browser)")


def _add_audit_command(commands) -> None:
    command = commands.add_parser(
        "audit",
        help="dataset-level symmetry audit with an interactive viewer",
        description=(
            "Evaluate MODEL (exported .pt or metatrain .ckpt) on DATA, unrotated and "
            "on rotated copies, and write audit.json (errors against the dataset's "
            "targets, equivariance RMSE, symmetry leakage, mean spectra), audit.md, "
            "spectra.mts, spectra.png, a chemiscope dataset and audit.html, an "
            "offline viewer."
        ),
    )
    command.add_argument("model", help="exported model (.pt) or checkpoint (.ckpt)")
    command.add_argument("data", help="structures in any format ASE can read")
    command.add_argument("-o", "--output", required=True, help="output directory")
    command.add_argument(
        "--outputs",
        nargs="+",
        default=None,
        help=(
            "model outputs to audit ('forces' and 'stress' are derivatives of the "
            "energy); default: energy and the force output"
        ),
    )
    command.add_argument(
        "--targets",
        nargs="+",
        default=None,
        metavar="OUTPUT=KEY",
        help=(
            "dataset key of each output's target (default: energy=energy and "
            "<force output>=forces, where present)"
        ),
    )
    command.add_argument(
        "--features",
        nargs="*",
        default=[],
        help="internal features ('mtt::feature::<path>'), or 'all'",
    )
    add_grid_options(command, rotations=True)
    add_dtype_option(command)
    add_device_option(command)
    add_force_option(command)
    command.set_defaults(run=_audit)


def _export(args) -> None:
    from .export import export_audited

    output = Path(args.output)
    if output.exists() and not args.force:
        raise ValueError(
            f"output '{output}' already exists; choose another name or pass --force "
            "to replace it"
        )
    if args.grid_degree is not None and not args.symmetrize:
        raise ValueError("--grid-degree applies to --symmetrize; add --symmetrize")
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint '{args.checkpoint}' does not exist")
    check_device(args.device)
    read_structures(args.audit)  # fail early on unreadable data
    result = export_audited(
        args.checkpoint,
        output,
        args.audit,
        symmetrize=args.symmetrize,
        grid_degree=args.grid_degree,
        audit_grid=grid_from_args(args) if args.rotations is not None else None,
        outputs=args.outputs,
        targets=parse_targets(args.targets),
        max_lambda=args.max_lambda,
        batch_size=args.batch_size,
        device=args.device,
        progress=True,
    )
    from .audit_files import audit_markdown

    print(audit_markdown(result.summary))
    kind = "O(3)-averaged model" if args.symmetrize else "model"
    print(f"{kind} with its audit in metadata written to {output}")


def _add_export_command(commands) -> None:
    command = commands.add_parser(
        "export",
        help="export a checkpoint with its symmetry audit in the model metadata",
        description=(
            "Export CHECKPOINT as 'mtt export' does, after auditing it on the "
            "structures of --audit DATA; the audit summary is stored as JSON in "
            "metadata().extra['symmetry-audit']. With --symmetrize the exported "
            "model predicts O(3)-averaged outputs and exposes o3::variance::<name>."
        ),
    )
    command.add_argument("checkpoint", help="metatrain checkpoint (.ckpt)")
    command.add_argument("-o", "--output", required=True, help="exported model (.pt)")
    command.add_argument(
        "--audit",
        required=True,
        metavar="DATA",
        help="structures for the audit, in any format ASE can read",
    )
    command.add_argument(
        "--symmetrize",
        action="store_true",
        help="export the O(3)-averaged model (metatomic's SymmetrizedModel)",
    )
    command.add_argument(
        "--grid-degree",
        type=int,
        default=None,
        help="Lebedev degree of the averaging quadrature and the audit grid",
    )
    command.add_argument("--outputs", nargs="+", default=None)
    command.add_argument("--targets", nargs="+", default=None, metavar="OUTPUT=KEY")
    add_grid_options(command, grid_degree=False, rotations=True)
    add_device_option(command)
    add_force_option(command, "an existing output file")
    command.set_defaults(run=_export)


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
    add_grid_options(analyze, rotations=True)
    add_dtype_option(analyze)
    analyze.add_argument(
        "--per-atom", action="store_true", help="per-atom energies and stresses"
    )
    add_force_option(analyze)
    analyze.set_defaults(run=_analyze)

    demo = commands.add_parser(
        "demo",
        help="train a small PET on generated data and analyse its symmetry",
        description=(
            "Generate a small dataset with ASE's EMT calculator, train a small PET "
            "with 'mtt train' with and without the equivariance penalty, retrain "
            "the plain model's last layer for several penalty weights, audit both "
            "models and compare them."
        ),
    )
    demo.add_argument("-o", "--output", required=True, help="output directory")
    demo.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help=f"training epochs (default {DEFAULT_EPOCHS})",
    )
    demo.add_argument(
        "--gamma",
        type=float,
        default=DEFAULT_GAMMA,
        help="weight of the equivariance penalty in the penalised training "
        f"(default {DEFAULT_GAMMA:g})",
    )
    add_force_option(demo)
    demo.set_defaults(run=_demo)
    _add_audit_command(commands)
    _add_export_command(commands)
    _add_dynamics_command(commands)
    _add_retrain_command(commands)
    _add_train_command(commands)
    return parser


def _join_processes(args) -> DistributedContext:
    """The processes of ``torchrun`` or ``srun`` for the commands that use them,
    else a single process."""
    if args.command not in _DISTRIBUTED_COMMANDS or environment_world_size() <= 1:
        return DistributedContext()
    backend = "gloo" if getattr(args, "device", None) != "cuda" else None
    return init_from_environment(backend=backend)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as error:
        return _report(args.command, error)
    except KeyboardInterrupt:
        print(f"mtt-symmetry {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if context.is_distributed:
            import torch.distributed

            torch.distributed.destroy_process_group()
    return 0


def _report(command: str, error: BaseException) -> int:
    """Print an error as one line and return the exit code; unexpected errors
    keep their traceback."""
    if not isinstance(error, (ValueError, TypeError, FileNotFoundError, RuntimeError)):
        raise error
    print(f"mtt-symmetry {command}: error: {first_line(error)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
