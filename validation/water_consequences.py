"""The consequences stage of the water study: what the conservative PET's
symmetry breaking does to simulations, with ``metatrain_symmetry.consequences``.

Three groups of structures, each simulated with the model (``plain``), its O(3)
average and a random frame at every call (``random_rotation``):

- an isolated water molecule cut from a test box: NVE from a Maxwell-Boltzmann
  start (angular momentum, torque, energy drift) and Langevin NVT with the
  centre of mass fixed (orientations and their uniformity), as in Langer et al.;
- a test box of the liquid: Langevin NVT, radial distribution functions, mean
  squared displacement and OH-bond orientational correlations;
- proton-disordered ice Ih cells made by GenIce2, one seed each: relaxed
  energies, their ranking and the relaxed structures' differences.

``water_study.py`` runs it as its last stage. On its own, it runs the stage on
the trained model and the data of a study (finished or still running)::

    python validation/water_consequences.py STUDY -o OUTPUT [--quick]
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
from water_data import fmt


MOLECULE_TEMPERATURE_K = 600.0
BULK_TEMPERATURE_K = 300.0
# per study size and group: the consequences settings, the Lebedev degree of the
# average, and the number of ice cells
MOLECULE = {"temperature_K": MOLECULE_TEMPERATURE_K}
BULK = {"temperature_K": BULK_TEMPERATURE_K}
SIZES = {
    "quick": {
        "molecule": {**MOLECULE, "steps": 20, "frames": 10, "blocks": 2, "degree": 1},
        "bulk": {**BULK, "steps": 4, "frames": 2, "blocks": 2, "degree": 1},
        "ice": {"cells": 2, "steps": 3, "fmax": 0.05, "degree": 1},
    },
    "full": {
        # 1 ps of a molecule at 0.5 fs, hot enough to sample its orientations
        "molecule": {
            **MOLECULE,
            "steps": 2000,
            "frames": 400,
            "blocks": 5,
            "degree": 5,
        },
        "bulk": {**BULK, "steps": 200, "frames": 100, "blocks": 4, "degree": 1},
        "ice": {"cells": 8, "steps": 150, "fmax": 0.02, "degree": 2},
    },
}


def genice_cells(n_cells: int, seed: int = 0) -> list:
    """``n_cells`` proton-disordered ice Ih cells of 16 molecules from GenIce2,
    one random hydrogen-bond network each (zero net dipole, the Bernal-Fowler
    rules), with GenIce2's SPC/E-like molecular geometry."""
    import ase
    from genice2.genice import GenIce
    from genice2.plugin import Format, Lattice, Molecule

    logging.getLogger().setLevel(logging.ERROR)
    cells = []
    for index in range(n_cells):
        np.random.seed(seed + index)
        text = GenIce(Lattice("1h"), reshape=np.eye(3, dtype=int)).generate_ice(
            Format("exyz"), water=Molecule("spce"), depol="strict"
        )
        cells.append(_read_exyz(text, ase))
    return cells


def _read_exyz(text: str, ase):
    """The structure of GenIce2's ``exyz`` output: a count, atom lines (``Ow``,
    ``Hw``) and the cell vectors (Å)."""
    symbols, positions, cell = [], [], {}
    for line in io.StringIO(text):
        fields = line.split()
        if len(fields) == 4 and fields[0] in ("Ow", "Hw"):
            symbols.append(fields[0][0])
            positions.append([float(value) for value in fields[1:]])
        elif len(fields) == 4 and fields[0].startswith("Vector"):
            cell[fields[0]] = [float(value) for value in fields[1:]]
    atoms = ase.Atoms(
        symbols,
        positions=positions,
        cell=[cell["Vector1"], cell["Vector2"], cell["Vector3"]],
        pbc=True,
    )
    atoms.wrap()
    return atoms


def stage_consequences(output: Path, mode: str, model: Path, sets: dict) -> dict:
    """Run the three groups with ``model`` (an exported model) and return their
    summaries; the files of each group go to ``output / consequences / group``."""
    import ase.io

    from metatrain_symmetry import O3Grid
    from metatrain_symmetry.consequences import (
        Settings,
        consequences,
        save_consequences,
    )

    size = SIZES[mode]
    ice = genice_cells(size["ice"]["cells"])
    ase.io.write(output / "data" / "ice-genice.xyz", ice)
    groups = {
        "molecule": ([_plain(sets["molecules"][0])], ["molecule-nve", "orientations"]),
        "bulk": ([_plain(sets["test"][0])], ["observables"]),
        "ice": (ice, ["relax"]),
    }
    summaries = {}
    for name, (structures, experiments) in groups.items():
        options = dict(size[name])
        grid = O3Grid(options.pop("degree"))
        options.pop("cells", None)
        result = consequences(
            model,
            structures,
            experiments=experiments,
            settings=Settings(**options),
            grid=grid,
            progress=False,
        )
        directory = output / "consequences" / name
        directory.parent.mkdir(parents=True, exist_ok=True)
        save_consequences(result, directory)
        summaries[name] = json.loads(result.to_json())
    return summarize(summaries)


def _plain(atoms):
    """``atoms`` without its calculator results and arrays, as a simulation
    starts from it."""
    import ase

    return ase.Atoms(
        numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc
    )


def summarize(summaries: dict) -> dict:
    """The numbers the report shows, per group and variant."""
    nve = summaries["molecule"]["experiments"]["molecule_nve"]["variants"]
    orientations = summaries["molecule"]["experiments"]["orientations"]["variants"]
    observables = summaries["bulk"]["experiments"]["observables"]["variants"]
    relax = summaries["ice"]["experiments"]["relax"]
    report = {"molecule": {}, "bulk": {}, "ice": {}}
    for variant, entry in nve.items():
        (structure,) = entry["structures"]
        (oriented,) = orientations[variant]["structures"]
        report["molecule"][variant] = {
            "initial_torque_eV": float(np.linalg.norm(structure["initial_torque_eV"])),
            "max_angular_momentum_change_hbar": structure[
                "max_angular_momentum_change_hbar"
            ],
            "energy_drift_eV_per_ps": structure["energy_drift_eV_per_ps"],
            "time_to_kT_ps": structure["time_to_kT_ps"],
            "time_to_kT_extrapolated": structure["time_to_kT_extrapolated"],
            "uniformity_p_value": oriented["uniformity_p_value"],
            "n_samples": oriented["n_samples"],
            "cost_per_step_relative": entry["cost_per_step_relative"],
        }
    plain_rdf = observables["plain"]["rdf"]
    for variant, entry in observables.items():
        report["bulk"][variant] = {
            "rdf_max_difference_in_errors": _rdf_difference(plain_rdf, entry["rdf"]),
            "final_msd_A2": entry["msd_A2"][-1] if entry["msd_A2"] else None,
            "cost_per_step_relative": entry["cost_per_step_relative"],
        }
    for variant, entry in relax["variants"].items():
        report["ice"][variant] = {
            # three atoms a molecule
            "relative_energy_meV_per_molecule": [
                3000.0 * s["relative_energy_eV_per_atom"] for s in entry["structures"]
            ],
            "max_rmsd_A": max(s["rmsd_A"] for s in entry["structures"]),
            "converged": sum(bool(s["converged"]) for s in entry["structures"]),
            "ranking": entry["ranking"],
        }
    report["ice"]["ranking_changed"] = relax["ranking_changed"]
    return report


def _rdf_difference(reference: dict, rdf: dict) -> float | None:
    """The largest difference between two sets of RDFs, in units of their
    combined block-averaged standard error (over bins where it is positive)."""
    largest = None
    for pair, curve in rdf.items():
        g, error = np.array(curve["g"]), np.array(curve["error"])
        g0, error0 = np.array(reference[pair]["g"]), np.array(reference[pair]["error"])
        combined = np.sqrt(error**2 + error0**2)
        keep = combined > 0
        if keep.any():
            value = float(np.max(np.abs(g - g0)[keep] / combined[keep]))
            largest = value if largest is None else max(largest, value)
    return largest


def report_lines(report: dict) -> list[str]:
    """The Markdown section of the report."""
    lines = [
        "## Consequences for simulations (conservative model)",
        "",
        "An isolated water molecule (NVE from a Maxwell-Boltzmann start at "
        f"{MOLECULE_TEMPERATURE_K:.0f} K, and Langevin NVT for its orientations), "
        f"a test box at {BULK_TEMPERATURE_K:.0f} K (NVT), and proton-disordered ice "
        "Ih cells from GenIce2 (relaxed), each with the model, its O(3) average and "
        "a random frame at every call.",
        "",
        "| variant | initial torque (eV) | max ΔL (ħ) | drift (eV/ps) | time to kT "
        "(ps) | orientations p (samples) | cost / plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, entry in report["molecule"].items():
        lines.append(
            f"| {variant} | {fmt(entry['initial_torque_eV'])} "
            f"| {fmt(entry['max_angular_momentum_change_hbar'])} "
            f"| {fmt(entry['energy_drift_eV_per_ps'])} "
            f"| {_time_to_kT(entry)} "
            f"| {fmt(entry['uniformity_p_value'])} ({entry['n_samples']}) "
            f"| {fmt(entry['cost_per_step_relative'])} |"
        )
    lines += [
        "",
        "| variant | largest RDF difference from plain (standard errors) | final "
        "MSD (Å²) | cost / plain |",
        "|---|---|---|---|",
    ]
    for variant, entry in report["bulk"].items():
        lines.append(
            f"| {variant} | {fmt(entry['rdf_max_difference_in_errors'])} "
            f"| {fmt(entry['final_msd_A2'])} "
            f"| {fmt(entry['cost_per_step_relative'])} |"
        )
    lines += [
        "",
        "| variant | relative energies (meV/molecule) | lowest first | max RMSD (Å) "
        "| converged |",
        "|---|---|---|---|---|",
    ]
    for variant in ("plain", "average", "random_rotation"):
        entry = report["ice"][variant]
        energies = ", ".join(
            f"{value:.2f}" for value in entry["relative_energy_meV_per_molecule"]
        )
        ranking = ", ".join(str(cell) for cell in entry["ranking"])
        lines.append(
            f"| {variant} | {energies} | {ranking} | {fmt(entry['max_rmsd_A'])} "
            f"| {entry['converged']} of {len(entry['ranking'])} |"
        )
    changed = "changes" if report["ice"]["ranking_changed"] else "does not change"
    lines += ["", f"Averaging the model {changed} the energy ranking of the cells.", ""]
    return lines


def _time_to_kT(entry: dict) -> str:
    """When the rotational kinetic energy reaches kT, marked when extrapolated."""
    time = fmt(entry["time_to_kT_ps"])
    return f"{time} (extrapolated)" if entry["time_to_kT_extrapolated"] else time


def main(argv=None) -> None:
    import argparse

    import ase.io

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="directory of a water study")
    parser.add_argument("-o", "--output", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="the short settings")
    args = parser.parse_args(argv)
    sets = {
        name: ase.io.read(args.study / "data" / f"{name}.xyz", ":")
        for name in ("molecules", "test")
    }
    (args.output / "data").mkdir(parents=True, exist_ok=False)
    model = args.study / "models" / "conservative" / "model.pt"
    report = stage_consequences(
        args.output, "quick" if args.quick else "full", model, sets
    )
    (args.output / "consequences.json").write_text(json.dumps(report, indent=2))
    (args.output / "consequences.md").write_text("\n".join(report_lines(report)))
    print("\n".join(report_lines(report)))


if __name__ == "__main__":
    main()
