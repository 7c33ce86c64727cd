"""Accuracy of the standard errors of random-grid spectra and equivariance RMSEs.

Analyses the same structures with ``O3Grid.random(N)`` on many seeds and prints,
per output and ``(lambda, sigma)`` channel, the ratio of the reported standard
error (root mean square over seeds) to the spread of the estimates across seeds
(their standard deviation), for the per-structure spectra, the dataset-mean
spectrum and the equivariance RMSE. A ratio of 1 is an honest error bar. The
outputs are analytic functions of the unit vectors ``x_k`` from atom 0 to atoms 1,
2 and 3:

* ``mtt::legendre_1_3``: ``sqrt(3 * 0.84) P_1(z) + sqrt(7 * 0.16) P_3(z)`` with
  ``z = x_1 . e_z``: 0.84 in (1, +1) and 0.16 in (3, +1); its square changes with
  the orientation, so its normalized spectrum is a ratio of two noisy estimates
* ``mtt::triple``: ``x_1 . (x_2 x x_3)``, a pseudoscalar whose square does not
  change with the orientation
* ``mtt::xy``: ``(x_1 . e_x) (x_1 . e_y)``, pure (2, +1)

Spectra are given only where the grid estimates the output's mean square well
enough to normalize by (``SPECTRUM_NORM_TOLERANCE``); the ``given`` row is the
fraction of (seed, structure) estimates that have one.

Run: ``python benchmarks/standard_errors.py [--elements 16 64 256] [--seeds 200]``
"""

import argparse
import warnings
from typing import Optional

import ase
import numpy as np
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelCapabilities, ModelOutput, System

import metatrain_symmetry as msym
from metatrain_symmetry.irreps import spectrum_irreps


OUTPUTS = ["mtt::legendre_1_3", "mtt::triple", "mtt::xy"]
MAX_LAMBDA = 3


class RotationFunctions(torch.nn.Module):
    def forward(
        self,
        systems: list[System],
        outputs: dict[str, ModelOutput],
        selected_atoms: Optional[Labels] = None,
    ) -> dict[str, TensorMap]:
        values: dict[str, list[torch.Tensor]] = {name: [] for name in OUTPUTS}
        for system in systems:
            vectors = system.positions[1:4] - system.positions[0]
            unit = vectors / torch.linalg.norm(vectors, dim=1, keepdim=True)
            z = unit[0, 2]
            values["mtt::legendre_1_3"].append(
                (3 * 0.84) ** 0.5 * z + (7 * 0.16) ** 0.5 * (5 * z**3 - 3 * z) / 2
            )
            values["mtt::triple"].append(
                torch.dot(unit[0], torch.linalg.cross(unit[1], unit[2]))
            )
            values["mtt::xy"].append(unit[0, 0] * unit[0, 1])
        samples = Labels(
            ["system"], torch.arange(len(systems), dtype=torch.int32).reshape(-1, 1)
        )
        results: dict[str, TensorMap] = {}
        for name in outputs:
            block = TensorBlock(
                values=torch.stack(values[name]).reshape(-1, 1),
                samples=samples,
                components=[],
                properties=Labels(["value"], torch.tensor([[0]])),
            )
            results[name] = TensorMap(Labels.single(), [block])
        return results


def capabilities() -> ModelCapabilities:
    return ModelCapabilities(
        outputs={name: ModelOutput(sample_kind="system") for name in OUTPUTS},
        atomic_types=[1, 6],
        interaction_range=0.0,
        length_unit="angstrom",
        supported_devices=["cpu"],
        dtype="float64",
    )


def collect(model, frames, elements: int, seeds: int) -> dict:
    """Per output, the estimates and errors over seeds: spectra ``(seeds,
    structures, irreps)``, mean spectra ``(seeds, irreps)`` and RMSEs ``(seeds,
    structures)``."""
    fields = ("spectrum", "spectrum_error", "mean", "mean_error", "rmse", "rmse_error")
    collected = {name: {field: [] for field in fields} for name in OUTPUTS}
    for seed in range(seeds):
        with warnings.catch_warnings():
            # the noisy normalization is what is measured here
            warnings.simplefilter("ignore", UserWarning)
            result = msym.analyze(
                model,
                frames,
                OUTPUTS,
                max_lambda=MAX_LAMBDA,
                grid=msym.O3Grid.random(elements, seed=seed),
            )
        for name, lists in collected.items():
            mean, mean_error = result.mean_spectrum(name)
            lists["spectrum"].append(result.spectrum[name].block().values)
            lists["spectrum_error"].append(result.spectrum_error[name].block().values)
            lists["mean"].append(mean)
            lists["mean_error"].append(mean_error)
            lists["rmse"].append(result.equivariance_rmse(name))
            lists["rmse_error"].append(result.equivariance_rmse_error[name])
    return {
        name: {field: torch.stack(values) for field, values in lists.items()}
        for name, lists in collected.items()
    }


def ratios(estimates: torch.Tensor, errors: torch.Tensor) -> np.ndarray:
    """Reported error over spread, per entry, over the seeds that give an
    estimate (NaN where nothing scatters or fewer than 10 seeds give one)."""
    estimates, errors = estimates.numpy(), errors.numpy()
    given = ~np.isnan(estimates)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        spread = np.nanstd(estimates, axis=0, ddof=1)
        reported = np.sqrt(np.nanmean(np.square(errors), axis=0))
    ratio = reported / np.where(spread > 1e-12, spread, np.nan)
    return np.where(given.sum(axis=0) >= 10, ratio, np.nan)


def report(collected: dict, elements: int, seeds: int) -> None:
    irreps = spectrum_irreps(MAX_LAMBDA)
    print(f"\nO3Grid.random({elements}), {seeds} seeds: reported error / spread")
    header = " ".join(f"{f'({lam},{sigma:+d})':>8}" for lam, sigma in irreps)
    print(f"{'output':<20} {'quantity':<10} {header}")
    for name, values in collected.items():
        given = ~torch.isnan(values["spectrum"]).any(dim=2)
        print(f"{name:<20} {'given':<10} {float(given.double().mean()):8.0%}")
        per_structure = ratios(values["spectrum"], values["spectrum_error"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(per_structure, axis=0)
        rows = {
            "spectrum": median,
            "mean": ratios(values["mean"], values["mean_error"]),
        }
        for quantity, row in rows.items():
            cells = " ".join(
                f"{'-':>8}" if np.isnan(value) else f"{value:8.2f}" for value in row
            )
            print(f"{name:<20} {quantity:<10} {cells}")
        rmse = ratios(values["rmse"], values["rmse_error"])
        # an invariant output has no equivariance error to scatter
        cell = "-" if np.isnan(rmse).all() else f"{float(np.nanmean(rmse)):8.2f}"
        print(f"{name:<20} {'rmse':<10} {cell:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--structures", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(3)
    frames = [
        ase.Atoms("CHHH", positions=rng.normal(size=(4, 3)))
        for _ in range(args.structures)
    ]
    model = msym.load_model(RotationFunctions(), capabilities=capabilities())
    for elements in args.elements:
        report(collect(model, frames, elements, args.seeds), elements, args.seeds)


if __name__ == "__main__":
    main()
