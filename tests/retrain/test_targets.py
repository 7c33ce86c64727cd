"""The terms of the retraining objective: targets and their gradients."""

import pytest

import metatrain_symmetry as msym


def test_conservative_stress_is_refused():
    from metatrain.pet import PET
    from metatrain.utils.architectures import get_default_hypers
    from metatrain.utils.data import DatasetInfo
    from metatrain.utils.data.target_info import get_energy_target_info

    from metatrain_symmetry.retrain.targets import check_gradients

    energy = get_energy_target_info(
        "energy",
        {"quantity": "energy", "unit": "eV"},
        add_position_gradients=True,
        add_strain_gradients=True,
    )
    info = DatasetInfo(
        length_unit="Angstrom", atomic_types=[29], targets={"energy": energy}
    )
    pet = PET(get_default_hypers("pet")["model"], info)
    model = msym.load_model(pet)
    with pytest.raises(ValueError, match=r"\['strain'\] \(conservative stress\)"):
        check_gradients(model, ["energy"], ignore_gradients=False)
    assert check_gradients(model, ["energy"], ignore_gradients=True) == []
