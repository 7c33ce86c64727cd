"""Options shared by the sub-commands of ``mtt-symmetry``, and their reading."""

from __future__ import annotations


def add_grid_options(parser, grid_degree: bool = True, rotations: bool = False) -> None:
    """The options shared by every command that evaluates rotated copies."""
    parser.add_argument(
        "--max-lambda", type=int, default=4, help="largest lambda of the spectra"
    )
    if grid_degree:
        parser.add_argument(
            "--grid-degree",
            type=int,
            default=None,
            help="degree of the O(3) integration grid (default: 2 * max-lambda)",
        )
    if rotations:
        parser.add_argument(
            "--rotations",
            type=int,
            default=None,
            metavar="N",
            help="use N Haar-random O(3) elements (N/2 rotations and their "
            "inversions) instead of the exact grid: equivariance errors of large "
            "structures in a fraction of the time, with standard errors; spectra "
            "become estimates",
        )
        parser.add_argument(
            "--seed", type=int, default=0, help="seed of the --rotations elements"
        )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="rotated copies per model call (default: about 4096 atoms)",
    )


def grid_from_args(args):
    """The O(3) grid that ``--grid-degree`` or ``--rotations`` ask for, or ``None``
    for the default exact grid."""
    import metatrain_symmetry as msym

    degree = getattr(args, "grid_degree", None)
    rotations = getattr(args, "rotations", None)
    if rotations is not None:
        if degree is not None and not getattr(args, "symmetrize", False):
            raise ValueError("give either --grid-degree or --rotations, not both")
        return msym.O3Grid.random(rotations, seed=args.seed)
    return None if degree is None else msym.O3Grid(degree)


def add_force_option(parser, replaced: str = "a non-empty output directory") -> None:
    parser.add_argument("--force", action="store_true", help=f"replace {replaced}")


def add_device_option(parser) -> None:
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="device the model runs on (default: cpu)",
    )


def add_dtype_option(parser) -> None:
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default=None,
        help="precision the model runs in (default: its own); float64 resolves the "
        "equivariance errors of a model trained in float32 below its round-off",
    )


def dtype_from_args(args):
    """The torch dtype that ``--dtype`` asks for, or ``None``."""
    import torch

    return None if args.dtype is None else getattr(torch, args.dtype)


def check_device(device: str | None) -> None:
    """Refuse ``--device cuda`` before any work where CUDA is not available."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was requested but CUDA is not available")


def parse_targets(pairs: list[str] | None) -> dict[str, str] | None:
    if pairs is None:
        return None
    targets = {}
    for pair in pairs:
        output, separator, key = pair.partition("=")
        if separator == "" or output == "" or key == "":
            raise ValueError(
                f"--targets expects OUTPUT=KEY pairs (e.g. energy=energy), got '{pair}'"
            )
        targets[output] = key
    return targets
