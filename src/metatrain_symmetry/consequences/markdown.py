"""``consequences.md``: every number of ``consequences.json`` explained in a
sentence, the variants side by side."""

from __future__ import annotations

import numpy as np

from .result import VARIANT_ORDER, ConsequencesResult


__all__ = [
    "SIGNIFICANCE",
    "UNIFORMITY_LEVEL",
    "consequences_markdown",
    "significant_points",
]


UNIFORMITY_LEVEL = 0.01
"""p-value below which a sampled orientation distribution is called not uniform"""
MIN_ORIENTATION_SAMPLES = 5
"""independent samples below which no verdict on uniformity is given"""
SIGNIFICANCE = 2.0
"""standard errors a difference between variants must exceed to be reported"""


def consequences_markdown(result: ConsequencesResult) -> str:
    """The report, as markdown."""
    summary = result.summary
    settings = summary["settings"]
    lines = [
        "# Consequences of rotational symmetry breaking",
        "",
        f"Model: `{summary['model'].get('path') or 'in memory'}`; "
        f"{summary['structures']['n_structures']} structures; "
        f"{settings['steps']} steps of {settings['time_step_fs']} fs at "
        f"{settings['temperature_K']} K, seed {settings['seed']}.",
        "",
        "Three variants run on the same initial conditions and random seeds: "
        "`plain` is the model as it is, `average` its O(3) average on a "
        f"{summary['grid']['size']}-element quadrature, `random_rotation` the model "
        "in a new random O(3) frame at every call.",
        "",
    ]
    writers = {
        "molecule_nve": _molecule_nve,
        "orientations": _orientations,
        "observables": _observables,
        "relax": _relax,
    }
    for key, entry in summary["experiments"].items():
        lines += writers[key](entry, settings) + [""]
    lines += _costs(summary["experiments"])
    return "\n".join(lines) + "\n"


def _number(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _structure_rows(entry: dict, cells) -> list[str]:
    """Table rows, structure by structure and variant by variant: the structure,
    the variant, then ``cells(record)``."""
    rows = []
    for row, plain in enumerate(entry["variants"]["plain"]["structures"]):
        for variant in VARIANT_ORDER:
            record = entry["variants"][variant]["structures"][row]
            values = [str(plain["structure"]), variant, *cells(record)]
            rows.append("| " + " | ".join(values) + " |")
    return rows


def _nve_cells(record: dict) -> list[str]:
    time = _number(record["time_to_kT_ps"])
    if record["time_to_kT_extrapolated"]:
        time += "*"
    return [
        f"{np.linalg.norm(record['initial_torque_eV']):.3g}",
        f"{record['max_angular_momentum_change_hbar']:.3g}",
        f"{record['energy_drift_eV_per_ps']:.3g}",
        time,
    ]


def _orientation_cells(record: dict) -> list[str]:
    p = record["uniformity_p_value"]
    if record["n_samples"] < MIN_ORIENTATION_SAMPLES:
        verdict = "too few samples: run more steps"
    elif p >= UNIFORMITY_LEVEL:
        verdict = "uniform"
    else:
        verdict = "**not uniform**"
    return [f"{p:.3g}", str(record["n_samples"]), verdict]


def _relax_cells(record: dict) -> list[str]:
    return [
        f"{record['energy_eV']:.6g}",
        f"{1000 * record['relative_energy_eV_per_atom']:.3g}",
        f"{record['rmsd_A']:.3g}",
        "yes" if record["converged"] else "no",
    ]


def _molecule_nve(entry: dict, settings: dict) -> list[str]:
    lines = [
        "## Isolated molecules in NVE",
        "",
        "A rotation-invariant energy exerts no net torque, so a molecule started "
        "without angular momentum keeps none, to round-off. *Initial torque* is "
        "|Σ rᵢ × Fᵢ| at the first step, *ΔL* the largest change of the total angular "
        "momentum, *drift* the slope of the conserved energy, and *time to kT* when "
        "the rotational kinetic energy reaches kT (* when extrapolated from "
        "E_rot ∝ t², as for a constant torque).",
        "",
        "| structure | variant | initial torque (eV) | ΔL (ħ) | drift (eV/ps) "
        "| time to kT (ps) |",
        "|---|---|---|---|---|---|",
    ]
    lines += _structure_rows(entry, _nve_cells)
    lines.append("")
    for plain in entry["variants"]["plain"]["structures"]:
        difference = np.abs(plain.get("energy_plain_minus_average_eV", [np.nan]))
        lines.append(
            f"Structure {plain['structure']}: along the plain trajectory the model's "
            f"energy differs from its average by {np.mean(difference):.3g} eV on "
            f"average (at most {np.max(difference):.3g} eV)."
        )
    return lines


def _orientations(entry: dict, settings: dict) -> list[str]:
    lines = [
        "## Orientations of thermostatted molecules",
        "",
        "Under a Langevin thermostat with the centre of mass fixed, an invariant "
        "model samples every orientation equally. The p-value tests the uniformity "
        "of the principal axes in the lab frame (Kolmogorov-Smirnov on cos θ and φ "
        "of each axis with the effective number of independent samples, "
        f"Bonferroni-corrected; at most one sample per time a free molecule takes "
        f"to turn by a radian); below {UNIFORMITY_LEVEL} the distribution is called "
        f"not uniform, and with fewer than {MIN_ORIENTATION_SAMPLES} samples no "
        "verdict is given. `orientations.png` maps −kT ln P of the largest-moment "
        "axis.",
        "",
        "| structure | variant | p-value | independent samples | verdict |",
        "|---|---|---|---|---|",
    ]
    lines += _structure_rows(entry, _orientation_cells)
    return lines


def significant_points(values, errors, reference, reference_errors) -> np.ndarray:
    """Mask of the points where two curves differ by more than
    :py:data:`SIGNIFICANCE` combined standard errors."""
    difference = np.abs(np.asarray(values) - np.asarray(reference))
    noise = np.hypot(np.asarray(errors), np.asarray(reference_errors))
    return difference > SIGNIFICANCE * np.maximum(noise, 1e-300)


def _observables(entry: dict, settings: dict) -> list[str]:
    plain = entry["variants"]["plain"]
    lines = [
        f"## Bulk observables (structure {plain['structure']}, NVT)",
        "",
        f"Errors are standard errors over {settings['blocks']} blocks of the "
        f"trajectory; a variant is said to differ from `plain` only where the "
        f"difference exceeds {SIGNIFICANCE:g} combined standard errors.",
        "",
    ]
    for variant in VARIANT_ORDER[1:]:
        record = entry["variants"][variant]
        for pair, rdf in record["rdf"].items():
            reference = plain["rdf"][pair]
            mask = significant_points(
                rdf["g"], rdf["error"], reference["g"], reference["error"]
            )
            lines.append(_difference_sentence(f"g_{pair}(r)", variant, mask, rdf["r"]))
        mask = significant_points(
            record["msd_A2"],
            record["msd_error_A2"],
            plain["msd_A2"],
            plain["msd_error_A2"],
        )
        lines.append(_difference_sentence("the MSD", variant, mask, record["time_ps"]))
    lines.append("")
    for variant in VARIANT_ORDER:
        record = entry["variants"][variant]
        lines.append(
            f"- {variant}: MSD at {record['time_ps'][-1]:.3g} ps "
            f"{record['msd_A2'][-1]:.3g} ± {record['msd_error_A2'][-1]:.2g} Å²"
            + _bond_sentence(record["bond_correlation"])
        )
    return lines


def _difference_sentence(what: str, variant: str, mask, axis) -> str:
    if not np.any(mask):
        return f"- {variant}: {what} agrees with plain within the noise."
    where = np.asarray(axis)[mask]
    return (
        f"- {variant}: {what} differs from plain beyond the noise at "
        f"{int(mask.sum())} of {len(mask)} points ({where.min():.3g} to "
        f"{where.max():.3g})."
    )


def _bond_sentence(correlation: dict | None) -> str:
    if correlation is None:
        return "."
    return (
        f"; bond orientational correlation C2 at {correlation['time_ps'][-1]:.3g} ps "
        f"{correlation['c2'][-1]:.3g} ± {correlation['error'][-1]:.2g} "
        f"({correlation['n_bonds']} bonds)."
    )


def _relax(entry: dict, settings: dict) -> list[str]:
    lines = [
        "## Relaxations",
        "",
        f"FIRE to {settings['fmax']} eV/Å (at most {settings['steps']} steps), the "
        "cell fixed. Relative energies are per atom, from each variant's lowest "
        "structure; the RMSD compares each relaxed structure with the `average` "
        "variant's.",
        "",
        "| structure | variant | energy (eV) | relative (meV/atom) | RMSD (Å) "
        "| converged |",
        "|---|---|---|---|---|---|",
    ]
    lines += _structure_rows(entry, _relax_cells)
    rankings = {v: entry["variants"][v]["ranking"] for v in VARIANT_ORDER}
    lines += [
        "",
        "Energy ranking (lowest first): "
        + "; ".join(f"{v} {rankings[v]}" for v in VARIANT_ORDER)
        + ". "
        + (
            "**The plain model ranks the structures differently from its average.**"
            if entry["ranking_changed"]
            else "The plain model ranks the structures as its average does."
        ),
    ]
    return lines


def _costs(experiments: dict) -> list[str]:
    lines = [
        "## Cost",
        "",
        "Wall time per step relative to `plain` (the same structures and steps; "
        "the median over steps, so that a model's slower first calls do not count).",
        "",
        "| experiment | " + " | ".join(VARIANT_ORDER) + " |",
        "|---|" + "---|" * len(VARIANT_ORDER),
    ]
    for key, entry in experiments.items():
        costs = [entry["variants"][v]["cost_per_step_relative"] for v in VARIANT_ORDER]
        lines.append(f"| {key} | " + " | ".join(f"{c:.3g}" for c in costs) + " |")
    return lines
