"""Per-structure and per-atom measures of an ``AuditResult``."""

import torch


def test_deviation_is_prediction_minus_average(pet_audit):
    _, frames, result = pet_audit
    average = result.analysis.average["non_conservative_force"].block()
    system = average.samples.column("system")
    for index, deviation in enumerate(result.deviations("non_conservative_force")):
        expected = (
            result.predictions["non_conservative_force"][index]
            - average.values[system == index][..., 0]
        )
        assert torch.allclose(deviation, expected, rtol=0, atol=1e-12)
        assert float(deviation.abs().max()) > 1e-3


def test_structure_errors_are_the_known_offsets(pet_audit):
    """The targets are the predictions plus 0.25 (energy) and minus 0.5 (every
    force component): each structure's RMSE is the offset."""
    _, frames, result = pet_audit
    assert result.n_structures == len(frames) == 3
    for name, offset in (("energy", 0.25), ("non_conservative_force", 0.5)):
        errors = result.structure_errors(name)
        assert errors.shape == (3,)
        torch.testing.assert_close(
            errors, torch.full((3,), offset, dtype=torch.float64), rtol=1e-8, atol=0
        )
    feature = "mtt::feature::gnn_layers.1_node"
    assert result.structure_errors(feature) is None
    assert result.is_force("non_conservative_force") and not result.is_force("energy")
    # no irrep is expected of a feature: no leakage
    assert result.leakage(feature) is None and result.leakage_error(feature) is None
    sizes = [len(atoms) for atoms in frames]
    errors = result.atom_equivariance_errors("non_conservative_force")
    assert [len(values) for values in errors] == sizes
    # the per-atom errors make up the structure's: the mean of their squares
    rmse = result.analysis.equivariance_rmse("non_conservative_force")
    for values, expected in zip(errors, rmse, strict=True):
        torch.testing.assert_close(values.square().mean().sqrt(), expected)
