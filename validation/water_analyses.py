"""The water study's analyses of its trained models: audits of every
set, the infinitesimal screen against the audits, and the training dynamics.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from water_data import MODELS, number


def audit_entry(result, output):
    """The numbers of one audited output for the report."""
    entry = result.summary["outputs"][output]
    target = entry["target"] or {}
    equivariance = entry["equivariance_rmse"]
    return {
        "unit": entry["unit"],
        "mae": target.get("mae"),
        "rmse": target.get("rmse"),
        "symmetrized_rmse": target.get("symmetrized_rmse"),
        "equivariance_rmse": equivariance["mean"],
        "equivariance_rmse_standard_error": equivariance["mean_standard_error"],
        "equivariance_over_mae": equivariance.get("fraction_of_mae"),
        "equivariance_over_rmse": equivariance.get("fraction_of_rmse"),
        "leakage": (entry["leakage"] or {}).get("mean"),
        "leakage_standard_error": (entry["leakage"] or {}).get("mean_standard_error"),
    }


def spearman(result, output):
    """Rank correlation between per-structure equivariance RMSE and per-structure
    model error of ``output``."""
    from scipy.stats import spearmanr

    errors = result.structure_errors(output)
    equivariance = result.analysis.equivariance_rmse(output)
    if errors is None or len(errors) < 3:
        return None
    correlation = spearmanr(errors.numpy(), equivariance.numpy())
    return {
        "rho": number(correlation.statistic),
        "p_value": number(correlation.pvalue),
        "n_structures": len(errors),
    }


def stage_audits(output, config, sets):
    import metatrain_symmetry as msym
    from metatrain_symmetry.audit import write_audit_report

    grid = msym.O3Grid.random(config["rotations"], seed=1)
    audits, correlations, screened = {}, {}, {}
    for model_name, (_, force) in MODELS.items():
        model = msym.load_model(
            output / "models" / model_name / "model.ckpt", dtype=torch.float64
        )
        audits[model_name], screened[model_name] = {}, {}
        for set_name, frames in sets.items():
            started = time.perf_counter()
            result = msym.audit(
                model,
                frames,
                outputs=["energy", force],
                max_lambda=config["max_lambda"],
                grid=grid,
            )
            screened[model_name][set_name] = {
                "seconds": time.perf_counter() - started,
                "equivariance_rmse": {
                    name: result.analysis.equivariance_rmse(name)
                    for name in ("energy", force)
                },
            }
            directory = output / "audits" / model_name / set_name.replace(" ", "-")
            directory.mkdir(parents=True)
            write_audit_report(result, directory)
            audits[model_name][set_name] = {
                "n_structures": len(frames),
                "n_atoms": int(sum(len(atoms) for atoms in frames)),
                "directory": str(directory.relative_to(output)),
                "outputs": {
                    name: audit_entry(result, name) for name in ("energy", force)
                },
            }
            if set_name == "test":
                correlations[model_name] = {
                    name: spearman(result, name) for name in ("energy", force)
                }
    return audits, correlations, screened


# the sets on which the infinitesimal screen is compared with the grid audit
SCREENED_SETS = ("test", "molecules", "dimers")


def lie_rmse(result, name: str, n_structures: int) -> torch.Tensor:
    """``(n_structures,)`` the root mean square over the entries of ``name`` of
    ``sum_k (L_k f)^2``, per structure: the screen's analogue of the
    equivariance RMSE, in the output's unit per radian."""
    block = result.lie_derivative[name].block()
    system = block.samples.column("system").to(torch.long)
    squares = block.values.double().square().sum(dim=1).flatten(1).sum(dim=1)
    entries = block.values[0, 0].numel()
    total = torch.zeros(n_structures, dtype=torch.float64).index_add(0, system, squares)
    count = torch.bincount(system, minlength=n_structures).double() * entries
    return (total / count.clamp(min=1)).sqrt()


def stage_screen(output, sets, audited):
    """The infinitesimal screen against the grid audit: the rank correlation of
    their per-structure errors, and the cost per structure of each."""
    from scipy.stats import spearmanr

    import metatrain_symmetry as msym

    rows = {}
    for model_name, (_, force) in MODELS.items():
        model = msym.load_model(
            output / "models" / model_name / "model.ckpt", dtype=torch.float64
        )
        rows[model_name] = {}
        for set_name in SCREENED_SETS:
            frames = sets[set_name]
            started = time.perf_counter()
            result = msym.infinitesimal(model, frames, ["energy", force])
            seconds = time.perf_counter() - started
            audit = audited[model_name][set_name]
            entry = {
                "n_structures": len(frames),
                "screen_seconds_per_structure": seconds / len(frames),
                "audit_seconds_per_structure": audit["seconds"] / len(frames),
                "outputs": {},
            }
            for name in ("energy", force):
                screen = lie_rmse(result, name, len(frames)).numpy()
                grid = audit["equivariance_rmse"][name].numpy()
                keep = np.isfinite(screen) & np.isfinite(grid)
                correlation = (
                    spearmanr(screen[keep], grid[keep]) if keep.sum() >= 3 else None
                )
                entry["outputs"][name] = {
                    "rho": None
                    if correlation is None
                    else number(correlation.statistic),
                    "p_value": None
                    if correlation is None
                    else number(correlation.pvalue),
                    "mean_lie_rmse": number(float(np.mean(screen[keep]))),
                }
            rows[model_name][set_name] = entry
    return rows


def stage_dynamics(output, config, test, trained):
    import metatrain_symmetry as msym
    from metatrain_symmetry.dynamics import save_dynamics

    grid = msym.O3Grid.random(config["rotations"], seed=2)
    frames = test[: config["dynamics_boxes"]]
    report = {}
    for model_name in MODELS:
        checkpoints = [
            output / path for path in trained[model_name]["intermediate_checkpoints"]
        ]
        dynamics = msym.training_dynamics(
            checkpoints,
            frames,
            max_lambda=config["max_lambda"],
            grid=grid,
            dtype=torch.float64,
        )
        directory = output / "dynamics" / model_name
        directory.mkdir(parents=True)
        save_dynamics(dynamics, directory)
        names = list(dynamics.names)
        report[model_name] = {
            "directory": str(directory.relative_to(output)),
            "epochs": list(dynamics.epochs),
            "names": names,
            # the fraction of each spectrum outside the irreps the output
            # should carry, epoch by epoch (for features: outside (0, +1))
            "invariant_fraction": {
                name: [
                    number(spectrum[0, 0]) for spectrum in dynamics.spectrum_array(name)
                ]
                for name in names
            },
        }
    return report


def test_errors(model, test, config, force):
    import metatrain_symmetry as msym

    result = msym.audit(
        msym.load_model(model, dtype=torch.float64),
        test,
        outputs=["energy", force],
        max_lambda=1,
        grid=msym.O3Grid.random(config["rotations"], seed=3),
    )
    energy = audit_entry(result, "energy")
    forces = audit_entry(result, force)
    return {
        "energy_rmse": energy["rmse"],
        "energy_equivariance_rmse": energy["equivariance_rmse"],
        "force_rmse": forces["rmse"],
        "force_equivariance_rmse": forces["equivariance_rmse"],
    }
