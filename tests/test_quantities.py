"""The table of output names."""

from metatrain_symmetry.quantities import (
    DERIVED_OUTPUTS,
    default_label_key,
    expected_irreps,
    quantity,
    standard_lambda,
)


def test_lookups_by_base_name_and_energy_prefix():
    assert DERIVED_OUTPUTS == ("forces", "stress")
    assert quantity("energy_ensemble").sample_kind == "system"
    assert quantity("non_conservative_force/variant").sample_kind == "atom"
    assert quantity("mtt::feature::gnn_layers.0_node") is None
    assert expected_irreps("stress") == [(0, 1), (2, 1)]
    assert expected_irreps("forces") == [(1, 1)]
    assert expected_irreps("charge") is None
    assert standard_lambda("non_conservative_stress") == 2
    assert standard_lambda("unknown") == 0


def test_default_label_keys():
    assert default_label_key("energy") == "energy"
    assert default_label_key("non_conservative_force") == "forces"
    assert default_label_key("non_conservative_stress") == "stress"
    assert default_label_key("dipole") == "dipole"
