"""The files of an analysis: one TensorMap per output and quantity, and the
summary table."""

import metatensor.torch as mts
import pytest

import metatrain_symmetry as msym
from metatrain_symmetry.diagnostics import file_stem, save_result, summary_table
from tests.helpers import AnalyticModel, capabilities


NAMES = ["mtt::x_z", "non_conservative_force"]
STEMS = ["mtt-x_z", "non_conservative_force"]
QUANTITIES = ["variance", "character_projection", "average", "spectrum"]
ERRORS = ["variance_error", "character_projection_error", "spectrum_error"]


@pytest.fixture(scope="module")
def model():
    return msym.load_model(AnalyticModel(), capabilities=capabilities())


def test_file_stem():
    assert file_stem("energy") == "energy"
    assert (
        file_stem("mtt::feature::gnn_layers.0_node") == "mtt-feature-gnn_layers.0_node"
    )
    assert file_stem("mtt::aux::energy/forces:x") == "mtt-aux-energy-forces-x"


def test_save_result_writes_one_file_per_quantity(model, molecules, tmp_path):
    result = msym.analyze(model, molecules, NAMES, max_lambda=1)
    save_result(result, tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        f"{stem}.{quantity}.mts" for stem in STEMS for quantity in QUANTITIES
    )
    for name, stem in zip(NAMES, STEMS, strict=True):
        for quantity in QUANTITIES:
            saved = mts.load(str(tmp_path / f"{stem}.{quantity}.mts"))
            assert mts.equal(saved, getattr(result, quantity)[name]), (name, quantity)


def test_save_result_writes_the_errors_of_estimates(model, molecules, tmp_path):
    # outputs whose mean square is the same in every orientation: well estimated
    names = ["mtt::harmonics_1_3", "non_conservative_force"]
    stems = ["mtt-harmonics_1_3", "non_conservative_force"]
    grid = msym.O3Grid.random(10, seed=0)
    result = msym.analyze(model, molecules, names, max_lambda=1, grid=grid)
    save_result(result, tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        f"{stem}.{quantity}.mts" for stem in stems for quantity in QUANTITIES + ERRORS
    )
    for name, stem in zip(names, stems, strict=True):
        for quantity in ERRORS:
            saved = mts.load(str(tmp_path / f"{stem}.{quantity}.mts"))
            assert mts.equal(saved, getattr(result, quantity)[name]), (name, quantity)


def test_summary_table(model, molecules):
    """``(R x)_z`` is pure (1, +1) with equivariance RMSE sqrt(1/3) in every
    structure; the positions relative to the centroid are exactly
    equivariant."""
    result = msym.analyze(model, molecules, NAMES, max_lambda=1)
    lines = summary_table(result).splitlines()
    assert lines[0] == (
        "| output | equivariance RMSE (mean) | (max) | (0,+) | (0,-) | (1,+) | (1,-) |"
    )
    assert lines[1] == "|---|---|---|---|---|---|---|"
    assert lines[2] == (
        "| `mtt::x_z` | 5.774e-01 | 5.774e-01 | 0.0000 | 0.0000 | 1.0000 | 0.0000 |"
    )
    assert lines[3].startswith("| `non_conservative_force` | ")
    assert lines[3].endswith(" | 0.0000 | 0.0000 | 1.0000 | 0.0000 |")
    assert len(lines) == 4 and "±" not in summary_table(result)

    grid = msym.O3Grid.random(10, seed=0)
    names = ["mtt::harmonics_1_3"]
    estimated = msym.analyze(model, molecules, names, max_lambda=1, grid=grid)
    table = summary_table(estimated)
    assert table.splitlines()[2].count("±") == 4
    assert "Monte-Carlo estimates from 5 random rotations" in table
