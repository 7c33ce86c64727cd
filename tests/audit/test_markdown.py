"""``audit.md``: the summary of an audit as Markdown, from hand-made summaries."""

import copy

from metatrain_symmetry.audit import SCHEMA_VERSION, audit_markdown


# no structure left out of the spectra
COUNTS = {"zero_structures": 0, "unresolved_structures": 0}


def exact_summary() -> dict:
    """A summary of an audit on an exact grid, with one output compared with a
    target and one without."""
    equivariance = {"mean": 0.001, "median": 0.002, "max": 0.003}
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {"path": "/models/pet.ckpt", "sha256": "0123456789abcdef" * 4},
        "dataset": {"path": "water.xyz", "n_structures": 2, "n_atoms": 6},
        "grid": {
            "kind": "lebedev",
            "degree": 4,
            "n_elements": 96,
            "inversion": True,
            "estimated": False,
        },
        "max_lambda": 1,
        "irreps": [[0, 1], [0, -1], [1, 1], [1, -1]],
        "outputs": {
            "energy": {
                "unit": "eV",
                "target": {
                    "key": "free_energy",
                    "mae": 0.5,
                    "rmse": 0.25,
                    "symmetrized_mae": 0.125,
                    "symmetrized_rmse": 0.0625,
                },
                "equivariance_rmse": {
                    **equivariance,
                    "mean_standard_error": None,
                    "fraction_of_mae": 0.002,
                    "fraction_of_rmse": 0.004,
                },
                "leakage": {
                    "irreps": [[0, 1]],
                    "mean": 0.01,
                    "median": 0.01,
                    "max": 0.02,
                    "mean_standard_error": None,
                },
                **COUNTS,
                "mean_spectrum": [0.99, 0.0, 0.01, 0.0],
                "mean_spectrum_standard_error": None,
            },
            "mtt::distance": {
                "unit": "",
                "target": None,
                "equivariance_rmse": {
                    "mean": None,
                    "median": None,
                    "max": None,
                    "mean_standard_error": None,
                },
                "leakage": None,
                **COUNTS,
                "mean_spectrum": [1.0, 0.0, 0.0, 0.0],
                "mean_spectrum_standard_error": None,
            },
        },
        "features": {
            "mtt::feature::gnn_layers.0_node": {
                "equivariance_rmse": {**equivariance, "mean_standard_error": None},
                **COUNTS,
                "mean_spectrum": [0.5, 0.25, 0.125, 0.125],
                "mean_spectrum_standard_error": None,
            }
        },
    }


def random_summary() -> dict:
    """:py:func:`exact_summary` on a random grid of 16 elements, the energy's
    estimates with standard errors."""
    summary = exact_summary()
    summary["grid"] = {
        "kind": "random",
        "degree": None,
        "n_elements": 16,
        "inversion": True,
        "estimated": True,
    }
    energy = summary["outputs"]["energy"]
    energy["equivariance_rmse"]["mean_standard_error"] = 0.0001
    energy["leakage"]["mean_standard_error"] = 0.005
    energy["mean_spectrum_standard_error"] = [0.01, 0.0, 0.01, 0.0]
    return summary


def test_exact_grid_report():
    """Every output has its row, numbers to four significant digits, ``n/a`` for
    what is missing, and no ``±``: nothing is an estimate."""
    lines = audit_markdown(exact_summary()).splitlines()
    assert lines[0] == "# Symmetry audit"
    assert "- model: `/models/pet.ckpt` (sha256 `0123456789abcdef...`)" in lines
    assert "- dataset: 2 structures, 6 atoms from `water.xyz`" in lines
    assert (
        "- O(3) grid: lebedev, degree 4, 96 elements; spectra up to lambda = 1"
    ) in lines
    assert f"- schema version {SCHEMA_VERSION}" in lines
    assert (
        "| `energy` [eV] | `free_energy` | 0.5 (0.125) | 0.25 (0.0625) | 0.001 "
        "| 0.002 | 0.003 | 0.002 | 0.004 | 0.01 | 0.02 |"
    ) in lines
    assert (
        "| `mtt::distance` [-] | none | n/a | n/a | n/a | n/a | n/a | n/a | n/a "
        "| n/a | n/a |"
    ) in lines
    assert "| name | (0,+) | (0,-) | (1,+) | (1,-) |" in lines
    assert "| `energy` | 0.99 | 0 | 0.01 | 0 |" in lines
    assert "| `mtt::distance` | 1 | 0 | 0 | 0 |" in lines
    assert "| `mtt::feature::gnn_layers.0_node` | 0.5 | 0.25 | 0.125 | 0.125 |" in lines
    # one row per output in the table of outputs, in the summary's order
    rows = [line for line in lines if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [
        "energy",
        "mtt::distance",
        "energy",
        "mtt::distance",
        "mtt::feature::gnn_layers.0_node",
    ]
    assert "±" not in "\n".join(lines)
    assert "Monte-Carlo" not in "\n".join(lines)


def test_in_memory_model_and_dataset():
    summary = exact_summary()
    summary["model"] = {"path": None, "sha256": None, "name": ""}
    summary["dataset"]["path"] = None
    lines = audit_markdown(summary).splitlines()
    assert "- model: `in-memory model`" in lines
    assert "- dataset: 2 structures, 6 atoms" in lines
    summary["model"]["name"] = "my PET"
    assert "- model: `my PET`" in audit_markdown(summary).splitlines()


def test_random_grid_report():
    """On a random grid the estimates (equivariance RMSE means, leakage means,
    spectra) carry ``± standard error``; medians, maxima and errors against
    targets do not."""
    summary = random_summary()
    lines = audit_markdown(summary).splitlines()
    assert "- O(3) grid: 16 Haar-random elements (an estimate); spectra up to " in (
        "\n".join(lines)
    )
    assert any("Monte-Carlo estimates from 8 random rotations" in x for x in lines)
    assert (
        "| `energy` [eV] | `free_energy` | 0.5 (0.125) | 0.25 (0.0625) "
        "| 0.001 ± 0.0001 | 0.002 | 0.003 | 0.002 | 0.004 | 0.01 ± 0.005 | 0.02 |"
    ) in lines
    assert "| `energy` | 0.99 ± 0.01 | 0 ± 0 | 0.01 ± 0.01 | 0 ± 0 |" in lines
    # outputs without standard errors are shown as before
    assert "| `mtt::distance` | 1 | 0 | 0 | 0 |" in lines
    table = [line for line in lines if line.startswith("| `")]
    assert sum(line.count("±") for line in table) == 2 + 4


def test_round_off_prints_as_zero_on_exact_grids_only():
    """An exact grid's spectral weight within round-off of zero prints as 0; the
    same number from a random grid is an estimate and keeps its digits."""
    summary = copy.deepcopy(exact_summary())
    summary["outputs"]["energy"]["mean_spectrum"] = [1.0, -3.775e-15, 2e-16, 0.0]
    summary["outputs"]["energy"]["leakage"]["mean"] = -3.775e-15
    lines = audit_markdown(summary).splitlines()
    assert "| `energy` | 1 | 0 | 0 | 0 |" in lines
    assert not any("e-15" in line or "e-16" in line for line in lines)
    summary["outputs"]["energy"]["mean_spectrum_standard_error"] = [0.1] * 4
    lines = audit_markdown(summary).splitlines()
    assert "| `energy` | 1 ± 0.1 | -3.775e-15 ± 0.1 | 2e-16 ± 0.1 | 0 ± 0.1 |" in lines


def test_output_zero_on_every_structure_has_no_leakage():
    """Forces that vanish on every structure (single atoms) show n/a (zero), not a
    leakage of 1, and the report says which structures were left out."""
    summary = copy.deepcopy(exact_summary())
    energy = summary["outputs"]["energy"]
    energy["leakage"].update(mean=None, median=None, max=None)
    energy["mean_spectrum"] = [None] * 4
    energy["zero_structures"] = 2
    summary["features"]["mtt::feature::gnn_layers.0_node"]["unresolved_structures"] = 1
    lines = audit_markdown(summary).splitlines()
    (row,) = [line for line in lines if line.startswith("| `energy` [eV]")]
    assert row.endswith("| n/a (zero) | n/a (zero) |")
    assert "| `energy` | n/a (zero) | n/a (zero) | n/a (zero) | n/a (zero) |" in lines
    assert (
        "- `energy` is zero on 2 structure(s), left out of its leakage and mean "
        "spectrum."
    ) in lines
    assert (
        "- `mtt::feature::gnn_layers.0_node` is too noisy to normalize on 1 "
        "structure(s), left out of its leakage and mean spectrum."
    ) in lines


# the whole audit.md of test_the_whole_report, as users read it
WHOLE_REPORT = """\
# Symmetry audit

- model: `/models/pet.ckpt` (sha256 `0123456789abcdef...`)
- dataset: 2 structures, 6 atoms from `water.xyz`
- O(3) grid: 16 Haar-random elements (an estimate); spectra up to lambda = 1
- schema version {version}

Equivariance RMSEs, spectra and leakages are Monte-Carlo estimates from 8 random \
rotations and their inversions, given as value ± one standard error. They are \
unbiased, so they can be negative where the true value is close to zero; use an \
exact grid (`--grid-degree`) for precise spectra.

## Outputs

Errors of the prediction on the unrotated structures (of the O(3) average in \
parentheses); equivariance RMSE per structure; leakage = 1 - spectral weight at \
the expected irreps, over the structures where the output is not zero (n/a (zero) \
when it is zero on every one).

| output | target | MAE | RMSE | equivariance RMSE mean | median | max \
| mean / MAE | mean / RMSE | leakage mean | leakage max |
|---|---|---|---|---|---|---|---|---|---|---|
| `energy` [eV] | `free_energy` | 0.5 (0.125) | 0.25 (0.0625) | 0.001 ± 0.0001 \
| 0.002 | 0.003 | 0.002 | 0.004 | 0.01 ± 0.005 | 0.02 |
| `mtt::distance` [-] | none | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |

- `mtt::feature::gnn_layers.0_node` is zero on 1 and too noisy to normalize on 2 \
structure(s), left out of its leakage and mean spectrum.

## Mean spectra

| name | (0,+) | (0,-) | (1,+) | (1,-) |
|---|---|---|---|---|
| `energy` | 0.99 ± 0.01 | 0 ± 0 | 0.01 ± 0.01 | 0 ± 0 |
| `mtt::distance` | 1 | 0 | 0 | 0 |
| `mtt::feature::gnn_layers.0_node` | 0.5 | 0.25 | 0.125 | 0.125 |
"""


def test_the_whole_report():
    """The whole text of a report, line by line: headings, explanations, tables
    and the sentence on structures left out."""
    summary = random_summary()
    feature = summary["features"]["mtt::feature::gnn_layers.0_node"]
    feature.update(zero_structures=1, unresolved_structures=2)
    expected = WHOLE_REPORT.format(version=SCHEMA_VERSION)
    assert audit_markdown(summary).splitlines() == expected.splitlines()
