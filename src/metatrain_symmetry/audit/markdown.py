"""The summary of an audit as Markdown: a header, a table of outputs and a table
of mean spectra."""

from __future__ import annotations

from ..irreps import irrep_name


def audit_markdown(summary: dict) -> str:
    """The audit summary (the content of ``audit.json``) as Markdown tables."""
    lines = _header(summary)
    lines += [
        "",
        "## Outputs",
        "",
        "Errors of the prediction on the unrotated structures (of the O(3) average "
        "in parentheses); equivariance RMSE per structure; leakage = 1 - spectral "
        "weight at the expected irreps, over the structures where the output is "
        "not zero (n/a (zero) when it is zero on every one).",
        "",
        "| output | target | MAE | RMSE | equivariance RMSE mean | median | max "
        "| mean / MAE | mean / RMSE | leakage mean | leakage max |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_output_row(name, entry) for name, entry in summary["outputs"].items()]
    lines += _left_out(summary)
    lines += _screen(summary)
    irrep_names = [irrep_name(lam, sigma) for lam, sigma in summary["irreps"]]
    lines += [
        "",
        "## Mean spectra",
        "",
        "| name | " + " | ".join(irrep_names) + " |",
        "|---|" + "---|" * len(irrep_names),
    ]
    for group in ("outputs", "features"):
        lines += [_spectrum_row(name, entry) for name, entry in summary[group].items()]
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _estimate(value, error) -> str:
    """A value, with ``± error`` when it is an estimate."""
    if error is None:
        return _number(value)
    return f"{_number(value)} ± {_number(error)}"


# a spectral weight (between 0 and 1) of an exact grid within this of zero is
# round-off
_ROUND_OFF = 1e-9


def _missing(entry: dict) -> str:
    """How a spectral weight or leakage the entry has no value for reads."""
    return "n/a (zero)" if entry["zero_structures"] else "n/a"


def _weight(value, error, missing: str = "n/a") -> str:
    """A spectral weight or leakage: ``missing`` when it has no value, 0 when an
    exact grid gives round-off, else as :py:func:`_estimate`."""
    if value is None:
        return missing
    if error is None and abs(value) < _ROUND_OFF:
        return "0"
    return _estimate(value, error)


def _grid_description(grid: dict) -> str:
    if grid["kind"] == "random":
        return f"{grid['n_elements']} Haar-random elements (an estimate)"
    return f"{grid['kind']}, degree {grid['degree']}, {grid['n_elements']} elements"


def _header(summary: dict) -> list[str]:
    """The title, what was audited on which grid, and how to read estimates."""
    model, dataset, grid = summary["model"], summary["dataset"], summary["grid"]
    lines = [
        "# Symmetry audit",
        "",
        f"- model: `{model['path'] or model['name'] or 'in-memory model'}`"
        + (f" (sha256 `{model['sha256'][:16]}...`)" if model["sha256"] else ""),
        f"- dataset: {dataset['n_structures']} structures, "
        f"{dataset['n_atoms']} atoms"
        + (f" from `{dataset['path']}`" if dataset["path"] else ""),
        f"- O(3) grid: {_grid_description(grid)}; spectra up to lambda = "
        f"{summary['max_lambda']}",
        f"- schema version {summary['schema_version']}",
    ]
    if grid.get("estimated", False):
        lines += [
            "",
            f"Equivariance RMSEs, spectra and leakages are Monte-Carlo estimates "
            f"from {grid['n_elements'] // 2} random rotations and their inversions, "
            "given as value ± one standard error. They are unbiased, so they can "
            "be negative where the true value is close to zero; use an exact grid "
            "(`--grid-degree`) for precise spectra.",
        ]
    return lines


def _left_out(summary: dict) -> list[str]:
    """Sentences on the structures left out of the leakages and spectra."""
    lines = []
    for group in ("outputs", "features"):
        for name, entry in summary[group].items():
            said = []
            if entry["zero_structures"]:
                said.append(f"zero on {entry['zero_structures']}")
            if entry["unresolved_structures"]:
                said.append(
                    f"too noisy to normalize on {entry['unresolved_structures']}"
                )
            if said:
                lines.append(
                    f"- `{name}` is {' and '.join(said)} structure(s), left out of "
                    "its leakage and mean spectrum."
                )
    return [""] + lines if lines else []


def _screen(summary: dict) -> list[str]:
    """The table of the infinitesimal screen, when the audit has one."""
    screened = {
        name: entry["screen"]
        for name, entry in summary["outputs"].items()
        if entry.get("screen") is not None
    }
    if not screened:
        return []
    lines = [
        "",
        "## Infinitesimal screen",
        "",
        "Relative Lie derivative sqrt(sum_k |L_k f|^2 / |f|^2) per structure (per "
        "radian, zero for an equivariant output), inversion error "
        "|rho(-1) f(-x) - f(x)| / |f(x)|, and Spearman's rank correlation of the "
        "relative Lie derivative with the grid's equivariance RMSE over the RMS of "
        "the output, per structure: near 1, the screen ranks the structures as the "
        "grid does.",
        "",
        "| output | Lie derivative mean | max | inversion error mean | max "
        "| Spearman rho | p-value | structures |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, screen in screened.items():
        lie, inversion = screen["relative_lie_derivative"], screen["inversion_error"]
        correlation = screen["rank_correlation"]
        cells = [
            f"`{name}`",
            _number(lie["mean"]),
            _number(lie["max"]),
            _number(inversion["mean"]),
            _number(inversion["max"]),
            _number(correlation["spearman"]),
            _number(correlation["p_value"]),
            str(correlation["n_structures"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _output_row(name: str, entry: dict) -> str:
    """One row of the table of outputs."""
    target = entry["target"] or {}
    equivariance = entry["equivariance_rmse"]
    leakage = entry["leakage"] or {}
    # "(zero)" only for a leakage the output has but no structure gives
    missing = _missing(entry) if leakage else "n/a"
    mae = _number(target.get("mae"))
    rmse = _number(target.get("rmse"))
    if target:
        mae += f" ({_number(target['symmetrized_mae'])})"
        rmse += f" ({_number(target['symmetrized_rmse'])})"
    cells = [
        f"`{name}` [{entry['unit'] or '-'}]",
        f"`{target['key']}`" if target else "none",
        mae,
        rmse,
        _estimate(equivariance["mean"], equivariance.get("mean_standard_error")),
        _number(equivariance["median"]),
        _number(equivariance["max"]),
        _number(equivariance.get("fraction_of_mae")),
        _number(equivariance.get("fraction_of_rmse")),
        _weight(leakage.get("mean"), leakage.get("mean_standard_error"), missing),
        _weight(leakage.get("max"), None, missing),
    ]
    return "| " + " | ".join(cells) + " |"


def _spectrum_row(name: str, entry: dict) -> str:
    """One row of the table of mean spectra."""
    errors = entry.get("mean_spectrum_standard_error")
    if errors is None:
        errors = [None] * len(entry["mean_spectrum"])
    cells = [
        _weight(value, error, _missing(entry))
        for value, error in zip(entry["mean_spectrum"], errors, strict=True)
    ]
    return f"| `{name}` | " + " | ".join(cells) + " |"
