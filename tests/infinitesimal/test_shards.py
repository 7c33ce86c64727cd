import io

import ase.build
import metatensor.torch as mts
import pytest
import torch

import metatrain_symmetry as msym
from metatrain_symmetry.infinitesimal.shards import (
    PER_STRUCTURE,
    merge_records,
    shard_record,
)
from metatrain_symmetry.testing import tiny_pet


NAMES = [
    "energy",
    "forces",
    "non_conservative_force",
    "mtt::feature::gnn_layers.0_node",
]


def _saved_and_read(record: dict) -> dict:
    """A record through a work directory's storage: read back without pickle."""
    buffer = io.BytesIO()
    torch.save(record, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.fixture
def structures(molecules, periodic_frames):
    # molecules and cells interleaved: torque and virial rows from every shard
    return [molecules[0], periodic_frames[0], molecules[1]] + [
        periodic_frames[1],
        molecules[2],
    ]


def test_merged_shards_equal_one_call(structures):
    model = msym.load_model(tiny_pet())
    expected = msym.infinitesimal(model, structures, NAMES)
    cuts = [(0, 2), (2, 3), (3, 5)]
    records = [
        _saved_and_read(
            shard_record(msym.infinitesimal(model, structures[start:stop], NAMES))
        )
        for start, stop in cuts
    ]
    merged = merge_records(records)

    assert merged.outputs == expected.outputs
    assert merged.method == expected.method == "forward"
    for name in NAMES:
        # the same blocks, samples ("system" shifted) and values
        mts.equal_metadata_raise(
            merged.lie_derivative[name], expected.lie_derivative[name]
        )
        assert mts.allclose(
            merged.lie_derivative[name], expected.lie_derivative[name], rtol=1e-12
        )
        for field in PER_STRUCTURE:
            torch.testing.assert_close(
                getattr(merged, field)[name],
                getattr(expected, field)[name],
                rtol=1e-12,
                atol=0,
                equal_nan=True,
            )
    for field in ("torque", "antisymmetric_virial"):
        mts.equal_metadata_raise(getattr(merged, field), getattr(expected, field))
        assert mts.allclose(getattr(merged, field), getattr(expected, field))
    assert merged.torque.block().samples.column("system").tolist() == [0, 2, 4]


def test_a_fallback_on_any_shard_is_reported():
    model = msym.load_model(tiny_pet())
    water = ase.build.molecule("H2O")
    result = msym.infinitesimal(model, [water], ["non_conservative_force"])
    records = [shard_record(result), shard_record(result)]
    records[1]["method"] = "double-backward"
    assert merge_records(records).method == "double-backward"
    assert merge_records(records[:1]).method == "forward"
