"""The water study's report: its tables, figures and ``report.md``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
from water_consequences import report_lines as consequences_lines
from water_data import PUBLISHED, fmt, fmt_estimate
from water_tradeoff import TRADEOFF_MODEL
from water_training import learning_curves


def audit_table(audits):
    lines = [
        "| model | set | output | MAE | RMSE | equivariance RMSE | "
        "equivariance / MAE | leakage |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, sets in audits.items():
        for name, entries in sets.items():
            for output, entry in entries["outputs"].items():
                scale = 1000.0  # meV, meV/A
                unit = "meV" if output == "energy" else "meV/Å"
                rmse = entry["equivariance_rmse"]
                rmse_error = entry["equivariance_rmse_standard_error"]
                leakage_error = entry.get("leakage_standard_error")
                lines.append(
                    f"| {model} | {name} | `{output}` ({unit}) "
                    f"| {fmt(entry['mae'], scale)} | {fmt(entry['rmse'], scale)} "
                    f"| {fmt_estimate(rmse, rmse_error, scale)} "
                    f"| {fmt(entry['equivariance_over_mae'])} "
                    f"| {fmt_estimate(entry['leakage'], leakage_error)} |"
                )
    return "\n".join(lines) + "\n"


def training_table(report):
    lines = [
        "| model | epochs | minutes | final validation energy MAE (meV/atom) "
        "| final validation force MAE (meV/Å) |",
        "|---|---|---|---|---|",
    ]
    for name, entry in report["training"].items():
        curve = report["learning"][name]
        lines.append(
            f"| {name} | {entry['epochs']} | {entry['seconds'] / 60:.0f} "
            f"| {fmt(curve['energy_mae_per_atom_meV'][-1])} "
            f"| {fmt(curve['force_mae_meV_per_A'][-1])} |"
        )
    lines.append(
        "\nA model predicting zero forces has a force MAE of "
        f"{fmt(report['zero_force_mae'], 1000)} meV/Å on the training boxes."
    )
    return "\n".join(lines) + "\n"


def tradeoff_table(rows):
    lines = [
        "| method | gamma | epochs | time (s) | energy RMSE (meV) | energy "
        "equivariance RMSE (meV) | force RMSE (meV/Å) | force equivariance RMSE "
        "(meV/Å) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {fmt(row['gamma'])} | {fmt(row.get('epochs'))} "
            f"| {fmt(row['seconds'])} "
            f"| {fmt(row['energy_rmse'], 1000)} "
            f"| {fmt(row['energy_equivariance_rmse'], 1000)} "
            f"| {fmt(row['force_rmse'], 1000)} "
            f"| {fmt(row['force_equivariance_rmse'], 1000)} |"
        )
    return "\n".join(lines) + "\n"


def plot_tradeoff(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, (quantity, label) in zip(
        axes,
        [("energy", "energy (meV)"), ("force", "forces (meV/Å)")],
        strict=True,
    ):
        for method, marker in (
            ("trained", "*"),
            ("fine-tuned", "o"),
            ("fine-tuned, equal time", "o"),
            ("fine-tuned, generators", "^"),
            ("fine-tuned, generators, equal time", "^"),
            ("fine-tuned, generators, sampled", "v"),
            ("fine-tuned, generators, sampled, equal time", "v"),
            ("retrained", "s"),
        ):
            points = [row for row in rows if row["method"] == method]
            if not points:
                continue
            x = [1000 * row[f"{quantity}_equivariance_rmse"] for row in points]
            y = [1000 * row[f"{quantity}_rmse"] for row in points]
            axis.plot(
                x, y, marker=marker, linestyle="-" if len(x) > 1 else "", label=method
            )
            for row, xi, yi in zip(points, x, y, strict=True):
                if method != "trained":
                    axis.annotate(f"γ={row['gamma']:g}", (xi, yi), fontsize=7)
        axis.set_xscale("log")
        axis.set_xlabel(f"equivariance RMSE, {label}")
        axis.set_ylabel(f"test RMSE, {label}")
        axis.legend()
    figure.suptitle(f"accuracy against equivariance, {TRADEOFF_MODEL} PET, test boxes")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_learning(curves, zero_force_mae, path):
    """Validation MAE against epoch, forces next to the MAE of predicting
    zero forces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, curve in curves.items():
        axes[0].plot(curve["epoch"], curve["energy_mae_per_atom_meV"], label=name)
        axes[1].plot(curve["epoch"], curve["force_mae_meV_per_A"], label=name)
    axes[1].axhline(
        1000 * zero_force_mae, color="grey", linestyle=":", label="zero forces"
    )
    axes[0].set_ylabel("validation energy MAE (meV/atom)")
    axes[1].set_ylabel("validation force MAE (meV/Å)")
    for axis in axes:
        axis.set_xlabel("epoch")
        axis.set_yscale("log")
        axis.legend(fontsize=8)
    figure.suptitle("training of the two PET models (validation boxes)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_ratios(audits, path):
    """Equivariance RMSE over MAE of both models on the labelled test boxes,
    next to the published values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = [], []
    for model, sets in audits.items():
        for output, entry in sets["test"]["outputs"].items():
            labels.append(f"{model}\n{output}")
            values.append(entry["equivariance_over_mae"] or 0.0)
    labels += ["Langer et al.\nenergy", "Langer et al.\nforces"]
    values += [
        PUBLISHED["bulk_energy_equivariance_over_mae"],
        PUBLISHED["bulk_forces_equivariance_over_mae"],
    ]
    figure, axis = plt.subplots(figsize=(8, 3.5))
    colors = ["C0"] * (len(values) - 2) + ["C3", "C3"]
    axis.bar(range(len(values)), values, color=colors)
    axis.set_xticks(range(len(values)), labels, fontsize=7)
    axis.set_ylabel("equivariance RMSE / MAE")
    axis.set_yscale("log")
    axis.set_title("rotational error relative to the test error, bulk water")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def finish_report(output, report, docs: Path | None = None):
    """Add the learning curves to ``report``, draw the figures and write
    ``report.json`` and ``report.md`` into ``output``, and the docs' copy of the
    report into ``docs`` when given (:py:func:`write_docs`)."""
    import ase.io

    train = ase.io.read(output / "data" / "train.xyz", ":")
    forces = np.concatenate([atoms.get_forces() for atoms in train])
    # the force MAE of a model that predicts zero
    report["zero_force_mae"] = float(np.abs(forces).mean())
    report["learning"] = learning_curves(output)
    plot_learning(report["learning"], report["zero_force_mae"], output / "learning.png")
    plot_ratios(report["audits"], output / "ratios.png")
    plot_tradeoff(report["tradeoff"], output / "tradeoff.png")
    write_report(output, report)
    if docs is not None:
        write_docs(output, docs)


def correlation_rows(correlation: dict) -> list[str]:
    """Rows of the table of rank correlations between equivariance and model
    errors."""
    rows = []
    for model, outputs in correlation.items():
        for name, value in outputs.items():
            value = value or {}
            rows.append(
                f"| {model} | `{name}` | {fmt(value.get('rho'))} "
                f"| {fmt(value.get('p_value'))} | {value.get('n_structures', 'n/a')} |"
            )
    return rows


def symmetrized_export_lines(symmetrized: dict) -> list[str]:
    """The table and the sentence on the symmetrized export."""
    lines = [
        "| model | energy equivariance RMSE (meV) | force equivariance RMSE (meV/Å) "
        "| seconds per evaluation (energy and forces) |",
        "|---|---|---|---|",
    ]
    for kind in ("plain", "symmetrized"):
        entry = symmetrized[kind]
        lines.append(
            f"| {kind} | {fmt(entry['energy']['equivariance_rmse'], 1000)} "
            f"| {fmt(entry['forces']['equivariance_rmse'], 1000)} "
            f"| {fmt(entry['seconds_per_evaluation'])} |"
        )
    return lines + [
        "",
        f"Averaging on a Lebedev quadrature of degree {symmetrized['grid_degree']}; "
        f"cost ratio {fmt(symmetrized['cost_ratio'])}, timed with metatomic's ASE "
        f"calculator on one structure of {symmetrized['timing_structure']['n_atoms']} "
        f"atoms ({symmetrized['timing_structure']['set']}): the fastest of "
        "repeated calls on the same positions, after three warm-up calls.",
    ]


def write_report(output, report):
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = overview_lines(report)
    lines += [
        "## Does the equivariance error track the model error? (test boxes)",
        "",
        "| model | output | Spearman rho | p | structures |",
        "|---|---|---|---|---|",
    ]
    lines += correlation_rows(report["correlation"])
    lines += screen_lines(report.get("screen", {}))
    lines += dynamics_lines(report["dynamics"])
    lines += [
        f"## Accuracy against equivariance ({TRADEOFF_MODEL} model, test boxes)",
        "",
        tradeoff_table(report["tradeoff"]),
        "The retraining time is that of the whole sweep (all gammas in one pass).",
        "",
        "![trade-off](tradeoff.png)",
        "",
        "## Symmetrized export (conservative model)",
        "",
    ]
    lines += symmetrized_export_lines(report["symmetrized_export"])
    if "consequences" in report:
        lines += [""] + consequences_lines(report["consequences"])
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [
        f"| {name} | {seconds:.0f} |" for name, seconds in report["timings"].items()
    ]
    (output / "report.md").write_text("\n".join(lines) + "\n")


def overview_lines(report: dict) -> list[str]:
    """The title, the configuration, training, and errors and equivariance."""
    return [
        "# Symmetry of PET on revPBE0-D3 water",
        "",
        f"Configuration: `{report['mode']}`; {report['split']['train']} training, "
        f"{report['split']['validation']} validation and {report['split']['test']} "
        "test boxes of 64 molecules. Audits on "
        f"{report['config']['rotations']} random O(3) elements (mean over "
        "structures of the per-structure equivariance RMSE).",
        "",
        "## Training",
        "",
        training_table(report),
        "![learning curves](learning.png)",
        "",
        "## Errors and equivariance",
        "",
        audit_table(report["audits"]),
        f"Published ({PUBLISHED['source']}): equivariance/MAE "
        f"{PUBLISHED['bulk_energy_equivariance_over_mae']} (energy) and "
        f"{PUBLISHED['bulk_forces_equivariance_over_mae']} (forces) on the bulk "
        f"liquid; {PUBLISHED['molecule_forces_equivariance_rmse_meV_per_A']} meV/Å "
        "force equivariance error on an isolated molecule.",
        "",
        "![ratios](ratios.png)",
        "",
    ]


def screen_lines(screen: dict) -> list[str]:
    """The section comparing the infinitesimal screen with the grid audit."""
    return [
        "",
        "## The infinitesimal screen against the grid audit",
        "",
        "Spearman rank correlation between the per-structure RMS Lie derivative "
        "(`msym.infinitesimal`) and the per-structure equivariance RMSE of the "
        "audit, and the cost per structure of each (the audit's includes its "
        "report's statistics).",
        "",
        "| model | set | output | Spearman rho | p | structures "
        "| screen s/structure | audit s/structure | audit / screen |",
        "|---|---|---|---|---|---|---|---|---|",
        *screen_rows(screen),
    ]


def screen_rows(screen: dict) -> list[str]:
    """Rows of the table comparing the infinitesimal screen with the audit."""
    rows = []
    for model, sets in screen.items():
        for set_name, entry in sets.items():
            cost = (
                entry["audit_seconds_per_structure"]
                / entry["screen_seconds_per_structure"]
            )
            for name, value in entry["outputs"].items():
                rows.append(
                    f"| {model} | {set_name} | `{name}` | {fmt(value['rho'])} "
                    f"| {fmt(value['p_value'])} | {entry['n_structures']} "
                    f"| {fmt(entry['screen_seconds_per_structure'])} "
                    f"| {fmt(entry['audit_seconds_per_structure'])} | {fmt(cost)} |"
                )
    return rows


def dynamics_lines(dynamics: dict) -> list[str]:
    """The section of spectra across epochs and layers, with its figures."""
    lines = ["", "## Spectra across epochs and layers", ""]
    for model, entry in dynamics.items():
        epochs = ", ".join(str(epoch) for epoch in entry["epochs"])
        lines += [
            f"{model} model, at epochs {epochs}: across epochs, then layer by layer "
            "at the last checkpoint.",
            "",
            f"![{model}: spectra across epochs]({entry['directory']}/dynamics.png)",
            "",
            f"![{model}: spectra layer by layer]({entry['directory']}/layers.png)",
            "",
        ]
    return lines


IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<path>[^)]+)\)")


def write_docs(output: Path, docs: Path) -> None:
    """The report of the run in ``output`` as ``docs/report.inc``, the
    reStructuredText that the validation page includes, with its figures next to
    it (``dynamics/conservative/layers.png`` as
    ``dynamics-conservative-layers.png``). ``docs`` is a folder directly inside
    the Sphinx source directory: the images are referred to from there
    (``/validation/...``), whichever page includes the report."""
    markdown = (output / "report.md").read_text()
    docs.mkdir(parents=True, exist_ok=True)
    figures = {}
    for match in IMAGE.finditer(markdown):
        name = match["path"].replace("/", "-")
        shutil.copyfile(output / match["path"], docs / name)
        figures[match["path"]] = f"/{docs.name}/{name}"
    (docs / "report.inc").write_text(markdown_to_rst(markdown, figures))


def markdown_to_rst(markdown: str, figures: dict[str, str]) -> str:
    """``report.md`` in reStructuredText: its title left out (the page has its
    own), sections as ``^`` headings, tables as list-tables, inline code as
    literals, and each figure at ``figures[path]``."""
    lines = markdown.splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("|"):
            end = index
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            blocks.append(_list_table(lines[index:end]))
            index = end
            continue
        if line.startswith("## "):
            title = _inline(line[3:])
            blocks.append(f"{title}\n{'^' * len(title)}")
        elif image := IMAGE.fullmatch(line):
            blocks.append(
                f".. image:: {figures[image['path']]}\n   :alt: {image['alt']}"
            )
        elif line.strip() and not line.startswith("# "):
            blocks.append(_inline(line))
        index += 1
    return "\n\n".join(blocks) + "\n"


def _list_table(rows: list[str]) -> str:
    """A Markdown table (header, separator, rows) as a list-table."""
    cells = [
        [_inline(cell.strip()) for cell in row.strip().strip("|").split("|")]
        for row in rows
        if not set(row) <= set("|-: ")
    ]
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in cells:
        lines.append(f"   * - {row[0]}")
        lines += [f"     - {cell}" for cell in row[1:]]
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Markdown inline code as reStructuredText literals; stars escaped."""
    text = text.replace("*", "\\*")
    return re.sub(r"`([^`]+)`", r"``\1``", text)
