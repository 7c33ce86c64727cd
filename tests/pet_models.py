"""Tiny, untrained metatrain PET models built in memory for tests."""

import torch
from metatrain.pet import PET
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo
from metatrain.utils.data.target_info import (
    get_energy_target_info,
    get_generic_target_info,
)


def tiny_pet(
    atomic_types=(1, 6, 8),
    dtype=torch.float64,
    d_node: int = 16,
    stress: bool = False,
    seed: int = 0,
) -> PET:
    """A small PET with energy and non-conservative force (and stress) heads.

    ``d_node`` differs from ``d_pet`` so that the centre-token layers are active.
    """
    torch.manual_seed(seed)
    hypers = get_default_hypers("pet")["model"]
    hypers.update(
        d_pet=8,
        d_head=8,
        d_node=d_node,
        d_feedforward=16,
        num_heads=2,
        num_attention_layers=1,
        num_gnn_layers=2,
        cutoff=3.5,
    )
    targets = {
        "energy": get_energy_target_info(
            "energy", {"quantity": "energy", "unit": "eV"}
        ),
        "non_conservative_force": get_generic_target_info(
            "non_conservative_force",
            {
                "quantity": "force",
                "unit": "eV/Angstrom",
                "type": {"cartesian": {"rank": 1}},
                "num_subtargets": 1,
                "sample_kind": "atom",
            },
        ),
    }
    if stress:
        targets["non_conservative_stress"] = get_generic_target_info(
            "non_conservative_stress",
            {
                "quantity": "stress",
                "unit": "eV/Angstrom^3",
                "type": {"cartesian": {"rank": 2}},
                "num_subtargets": 1,
                "sample_kind": "system",
            },
        )
    info = DatasetInfo(
        length_unit="Angstrom", atomic_types=list(atomic_types), targets=targets
    )
    model = PET(hypers, info).to(dtype)
    # untrained last layers start near zero: give every parameter a generic value
    # so that symmetry breaking is large and easy to resolve
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model.eval()
