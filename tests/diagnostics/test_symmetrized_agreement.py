"""The engine reproduces metatomic's SymmetrizedModel on the same grid."""

import ase.build
import metatensor.torch as mts
import torch
from metatomic.torch import ModelOutput
from metatomic.torch.o3 import SymmetrizedModel

import metatrain_symmetry as msym
from metatrain_symmetry.systems import prepare_systems
from metatrain_symmetry.testing import tiny_pet


FEATURE = "mtt::feature::gnn_layers.1_node"


def test_agreement_with_symmetrized_model(periodic_frames):
    model = msym.load_model(tiny_pet(stress=True))
    frames = [ase.build.molecule("CH3OH"), *periodic_frames]
    names = ["energy", "non_conservative_force", "non_conservative_stress", FEATURE]
    grid = msym.O3Grid(6)
    result = msym.analyze(model, frames, names, max_lambda=3, grid=grid)

    reference = SymmetrizedModel(
        model.module,
        max_angular_momentum_target=2,
        max_angular_momentum_character=3,
        max_angular_momentum_grid=6,
    )
    requests = {}
    for name in names:
        kind = model.natural_sample_kind(name)
        for prefix in ("", "o3::variance::", "o3::character_projection::"):
            requests[prefix + name] = ModelOutput(sample_kind=kind)
    with torch.no_grad():
        expected = reference(prepare_systems(frames, model), requests, None)

    for name in names:
        for prefix, ours in (
            ("", result.average),
            ("o3::variance::", result.variance),
            ("o3::character_projection::", result.character_projection),
        ):
            theirs = expected[prefix + name]
            mts.equal_metadata_raise(ours[name], theirs)
            scale = max(float(block.values.abs().max()) for block in theirs)
            assert scale > 0
            for key, block in theirs.items():
                difference = (ours[name].block(key).values - block.values).abs().max()
                assert float(difference) < 1e-8 * scale, (prefix + name, key)
