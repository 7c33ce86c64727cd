"""Infinitesimal results of consecutive shards of structures: saved as tensors
(what a work directory reads back without pickle) and merged in shard order."""

from __future__ import annotations

from collections.abc import Sequence

import metatensor.torch as mts
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from .result import InfinitesimalResult


__all__ = ["PER_STRUCTURE", "merge_records", "shard_record"]

PER_STRUCTURE = ("relative_lie_derivative", "inversion_error", "zero_structures")
"""the fields of :py:class:`InfinitesimalResult` holding ``(n_structures,)``
tensors per output"""

_ENERGY_MAPS = ("torque", "antisymmetric_virial")


def shard_record(result: InfinitesimalResult) -> dict:
    """The result of one shard as tensors, strings and containers only, its
    TensorMaps as metatensor buffers (on the CPU)."""
    first = result.outputs[0]
    return {
        "n_structures": len(result.relative_lie_derivative[first]),
        "outputs": list(result.outputs),
        "method": result.method,
        "lie_derivative": {
            name: _buffer(tensor) for name, tensor in result.lie_derivative.items()
        },
        **{
            field: {
                name: values.cpu() for name, values in getattr(result, field).items()
            }
            for field in PER_STRUCTURE
        },
        **{
            field: None
            if getattr(result, field) is None
            else _buffer(getattr(result, field))
            for field in _ENERGY_MAPS
        },
    }


def merge_records(records: Sequence[dict]) -> InfinitesimalResult:
    """The result of all structures from the records of consecutive shards, in
    order: the ``system`` samples of each shard shifted by the structures before
    it. Its tensors are on the CPU."""
    offsets = [0]
    for record in records[:-1]:
        offsets.append(offsets[-1] + record["n_structures"])
    outputs = records[0]["outputs"]
    methods = {record["method"] for record in records}
    result = InfinitesimalResult(
        outputs=outputs,
        # a fallback on any shard: some derivatives were taken by double backward
        method="double-backward" if "double-backward" in methods else methods.pop(),
    )
    for name in outputs:
        result.lie_derivative[name] = _joined(
            [mts.load_buffer(record["lie_derivative"][name]) for record in records],
            offsets,
        )
        for field in PER_STRUCTURE:
            getattr(result, field)[name] = torch.cat(
                [record[field][name] for record in records]
            )
    for field in _ENERGY_MAPS:
        if records[0][field] is not None:
            maps = [mts.load_buffer(record[field]) for record in records]
            setattr(result, field, _joined(maps, offsets))
    return result


def _buffer(tensor: TensorMap) -> torch.Tensor:
    return mts.save_buffer(tensor.to("cpu"))


def _joined(maps: Sequence[TensorMap], offsets: Sequence[int]) -> TensorMap:
    """One map from maps of consecutive structures: blocks of the same key
    concatenated along samples, whose first dimension ``system`` is shifted by
    each map's offset; keys in the order they first appear."""
    parts: dict[tuple[int, ...], list[tuple[TensorBlock, torch.Tensor]]] = {}
    for tensor, offset in zip(maps, offsets, strict=True):
        for key, block in tensor.items():
            samples = block.samples.values.clone()
            samples[:, 0] += offset
            parts.setdefault(tuple(int(v) for v in key.values), []).append(
                (block, samples)
            )
    blocks = []
    for pieces in parts.values():
        first = pieces[0][0]
        blocks.append(
            TensorBlock(
                values=torch.cat([block.values for block, _ in pieces]),
                samples=Labels(
                    first.samples.names, torch.cat([rows for _, rows in pieces])
                ),
                components=first.components,
                properties=first.properties,
            )
        )
    names = maps[0].keys.names
    values = torch.tensor(list(parts), dtype=torch.int32).reshape(-1, len(names))
    return TensorMap(Labels(names, values), blocks)
