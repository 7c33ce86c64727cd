"""The audit of a model on a dataset: errors against targets, equivariance and
leakage of exactly known models, and bad input."""

import ase.build
import jsonschema
import pytest
import torch

import metatrain_symmetry as msym
from metatrain_symmetry.testing import tiny_pet
from tests.helpers import AnalyticModel, capabilities


def exact_model():
    return msym.load_model(AnalyticModel(), capabilities=capabilities())


def test_exactly_equivariant_model_has_no_leakage_and_exact_errors(molecules):
    offset = 0.1
    for atoms in molecules:
        centered = atoms.positions - atoms.positions.mean(axis=0)
        atoms.arrays["reference_forces"] = centered + offset

    result = msym.audit(
        exact_model(),
        molecules,
        outputs=["non_conservative_force", "mtt::distance"],
        targets={"non_conservative_force": "reference_forces"},
        max_lambda=2,
    )
    force = result.summary["outputs"]["non_conservative_force"]
    assert force["target"]["mae"] == pytest.approx(offset, rel=1e-10)
    assert force["target"]["rmse"] == pytest.approx(offset, rel=1e-10)
    # the O(3) average of an equivariant output is the output itself
    assert force["target"]["symmetrized_mae"] == pytest.approx(offset, rel=1e-8)
    assert force["equivariance_rmse"]["max"] < 1e-12
    assert force["equivariance_rmse"]["fraction_of_mae"] < 1e-10
    assert force["leakage"]["irreps"] == [[1, 1]]
    assert abs(force["leakage"]["max"]) < 1e-10
    assert force["mean_spectrum"][2] == pytest.approx(1.0, abs=1e-10)
    # no expected irrep is known for a custom output, and no target was named
    distance = result.summary["outputs"]["mtt::distance"]
    assert distance["leakage"] is None and distance["target"] is None

    for deviation in result.deviations("non_conservative_force"):
        assert float(deviation.abs().max()) < 1e-12
    for errors, atoms in zip(
        result.atom_equivariance_errors("non_conservative_force"),
        molecules,
        strict=True,
    ):
        assert errors.shape == (len(atoms),)
        assert float(errors.max()) < 1e-12


def test_errors_against_metatomic_predictions(pet_audit):
    _, _, result = pet_audit
    assert result.targets == {"energy": "energy", "non_conservative_force": "forces"}
    energy = result.summary["outputs"]["energy"]
    assert energy["target"]["mae"] == pytest.approx(0.25, rel=1e-8)
    assert energy["target"]["rmse"] == pytest.approx(0.25, rel=1e-8)
    forces = result.summary["outputs"]["non_conservative_force"]
    assert forces["target"]["mae"] == pytest.approx(0.5, rel=1e-8)
    assert forces["sample_kind"] == "atom"


def test_bad_input(molecules):
    model = exact_model()
    with pytest.raises(ValueError, match="has no target 'nothing'"):
        msym.audit(
            model,
            molecules,
            outputs=["non_conservative_force"],
            targets={"non_conservative_force": "nothing"},
        )
    for atoms in molecules:
        atoms.info["wrong_size"] = 1.0
    with pytest.raises(ValueError, match="has 1 values"):
        msym.audit(
            model,
            molecules,
            outputs=["non_conservative_force"],
            targets={"non_conservative_force": "wrong_size"},
        )
    with pytest.raises(ValueError, match="not audited outputs"):
        msym.audit(
            model, molecules, outputs=["mtt::distance"], targets={"other": "energy"}
        )
    with pytest.raises(ValueError, match="no structures"):
        msym.audit(model, [], outputs=["mtt::distance"])
    with pytest.raises(ValueError, match="not periodic"):
        msym.audit(tiny_pet(), molecules, outputs=["stress"])


def test_infinitesimal_screen():
    # a PET on four molecules, screened: the same numbers as the infinitesimal
    # metrics computed on their own, in the summary with the rank correlation
    # that SciPy gives
    from scipy.stats import spearmanr

    from metatrain_symmetry.audit import audit_markdown, audit_schema

    pet = tiny_pet()
    frames = [ase.build.molecule(name) for name in ("CH3OH", "H2O", "CH4", "C2H6")]
    outputs = ["energy", "non_conservative_force"]
    result = msym.audit(pet, frames, outputs, max_lambda=2, infinitesimal=True)
    alone = msym.infinitesimal(pet, frames, outputs)
    for name in outputs:
        screen = result.screen[name]
        torch.testing.assert_close(
            screen["relative_lie_derivative"], alone.relative_lie_derivative[name]
        )
        torch.testing.assert_close(
            screen["inversion_error"], alone.inversion_error[name]
        )
        lie = screen["relative_lie_derivative"]
        assert bool((lie > 1e-6).all())
        grid = result.relative_equivariance_errors(name)
        entry = result.summary["outputs"][name]["screen"]
        rho, p_value = spearmanr(lie.numpy(), grid.numpy())
        assert entry["rank_correlation"] == pytest.approx(
            {"spearman": rho, "p_value": p_value, "n_structures": 4}
        )
        assert entry["relative_lie_derivative"]["max"] == pytest.approx(
            float(lie.max())
        )
        properties = result.chemiscope_input()["properties"]
        assert properties[f"{name}: relative Lie derivative"]["values"] == (
            pytest.approx(lie.tolist())
        )
    jsonschema.validate(result.summary, audit_schema())
    assert "## Infinitesimal screen" in audit_markdown(result.summary)

    plain = msym.audit(pet, frames, outputs, max_lambda=2)
    assert plain.screen == {}
    assert all(entry["screen"] is None for entry in plain.summary["outputs"].values())
    assert "Infinitesimal screen" not in audit_markdown(plain.summary)
