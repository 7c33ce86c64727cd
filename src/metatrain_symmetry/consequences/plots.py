"""Plots of the consequences: angular momentum and torque against time, the
orientation maps, radial distribution functions with error bands, and relaxed
energies; every plot shows the three variants side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .result import VARIANT_ORDER, ConsequencesResult


__all__ = ["save_plots"]

COLOURS = {"plain": "tab:red", "average": "tab:blue", "random_rotation": "tab:green"}
MAX_STRUCTURES = 4
"""structures shown per plot"""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plots(result: ConsequencesResult, directory: Path) -> list[str]:
    """Write the plots of every experiment that ran into ``directory``.

    :return: the file names written
    """
    experiments = result.summary["experiments"]
    plots = {
        "molecule_nve": ("angular_momentum.png", _angular_momentum),
        "orientations": ("orientations.png", _orientations),
        "observables": ("rdf.png", _rdf),
        "relax": ("relax.png", _relax),
    }
    written = []
    for key, (name, plot) in plots.items():
        if key in experiments:
            figure = plot(experiments[key])
            figure.savefig(directory / name, dpi=110)
            _pyplot().close(figure)
            written.append(name)
    return written


def _angular_momentum(entry: dict):
    """|L(t)| and |torque(t)| of each molecule, one row per molecule."""
    plt = _pyplot()
    structures = entry["variants"]["plain"]["structures"][:MAX_STRUCTURES]
    figure, axes = plt.subplots(
        len(structures),
        2,
        figsize=(9, 2.6 * len(structures)),
        squeeze=False,
        layout="constrained",
    )
    for row in range(len(structures)):
        for variant in VARIANT_ORDER:
            record = entry["variants"][variant]["structures"][row]
            time = np.array(record["time_ps"])
            momentum = np.linalg.norm(record["angular_momentum_hbar"], axis=1)
            torque = np.linalg.norm(record["torque_eV"], axis=1)
            colour = COLOURS[variant]
            axes[row, 0].plot(time, momentum, color=colour, label=variant)
            axes[row, 1].plot(time, torque, color=colour, label=variant)
        index = structures[row]["structure"]
        axes[row, 0].set_ylabel(f"structure {index}\n|L| (ħ)")
        axes[row, 1].set_ylabel("|Σ r × F| (eV)")
    for axis in axes[-1]:
        axis.set_xlabel("time (ps)")
    axes[0, 0].legend(fontsize="small")
    axes[0, 0].set_title("total angular momentum (NVE)")
    axes[0, 1].set_title("net torque")
    return figure


def _orientations(entry: dict):
    """The orientational free energy of the first molecule, one map per variant."""
    plt = _pyplot()
    figure, axes = plt.subplots(
        1, 3, figsize=(11, 3.4), sharey=True, layout="constrained"
    )
    extent = [entry["phi_edges"][0], entry["phi_edges"][-1], 0.0, 1.0]
    maps = {
        variant: np.array(
            entry["variants"][variant]["structures"][0]["free_energy_eV"], dtype=float
        )
        for variant in VARIANT_ORDER
    }
    finite = np.concatenate([m[np.isfinite(m)] for m in maps.values()])
    limit = float(np.abs(finite).max()) if len(finite) else 1.0
    colours = plt.get_cmap("RdBu_r").copy()
    colours.set_bad("0.75")  # bins never visited
    image = None
    for axis, variant in zip(axes, VARIANT_ORDER, strict=True):
        record = entry["variants"][variant]["structures"][0]
        image = axis.imshow(
            maps[variant],
            origin="lower",
            aspect="auto",
            extent=extent,
            cmap=colours,
            vmin=-limit,
            vmax=limit,
            interpolation="nearest",
        )
        axis.set_title(f"{variant}\np(uniform) = {record['uniformity_p_value']:.2g}")
        axis.set_xlabel("φ of the largest-moment axis")
    axes[0].set_ylabel("cos θ (grey: never visited)")
    figure.colorbar(image, ax=axes, label="−kT ln(P / P_uniform) (eV)")
    return figure


def _rdf(entry: dict):
    """g(r) per element pair with its block-averaged error band."""
    plt = _pyplot()
    pairs = list(entry["variants"]["plain"]["rdf"])
    figure, axes = plt.subplots(
        1,
        len(pairs),
        figsize=(4 * len(pairs), 3.2),
        squeeze=False,
        layout="constrained",
    )
    for axis, pair in zip(axes[0], pairs, strict=True):
        for variant in VARIANT_ORDER:
            rdf = entry["variants"][variant]["rdf"][pair]
            r, g, error = (np.array(rdf[key]) for key in ("r", "g", "error"))
            axis.plot(r, g, color=COLOURS[variant], label=variant, lw=1)
            axis.fill_between(
                r,
                g - 2 * error,
                g + 2 * error,
                color=COLOURS[variant],
                alpha=0.25,
                lw=0,
            )
        axis.set_title(pair)
        axis.set_xlabel("r (Å)")
    axes[0, 0].set_ylabel("g(r) (bands: 2 standard errors)")
    axes[0, 0].legend(fontsize="small")
    return figure


def _relax(entry: dict):
    """Relaxed energies per atom relative to each variant's lowest structure."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.4), layout="constrained")
    for offset, variant in zip((-0.2, 0.0, 0.2), VARIANT_ORDER, strict=True):
        structures = entry["variants"][variant]["structures"]
        x = np.arange(len(structures)) + offset
        energies = [1000 * s["relative_energy_eV_per_atom"] for s in structures]
        axis.bar(x, energies, width=0.2, color=COLOURS[variant], label=variant)
    labels = [str(s["structure"]) for s in entry["variants"]["plain"]["structures"]]
    axis.set_xticks(np.arange(len(labels)), labels)
    axis.set_xlabel("structure")
    axis.set_ylabel("relative energy (meV/atom)")
    axis.legend(fontsize="small")
    return figure
