"""The resumable, sharded runner: work cut into shards by cost, assigned to
ranks, saved shard by shard in a work directory, resumed and merged."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from .._utils import atomic_file
from .processes import DistributedContext, agree, gather_to_main


# test-only hooks: SIGKILL this process once it has saved this many shards (an
# interruption at an arbitrary moment), and fail on this rank before any shard
KILL_AFTER_SHARDS_VARIABLE = "MTT_SYMMETRY_TEST_KILL_AFTER_SHARDS"
FAIL_RANK_VARIABLE = "MTT_SYMMETRY_TEST_FAIL_RANK"

# shard cost targets in atom-copies: at most about a minute of CPU work, and at
# least this many shards per dataset so that small datasets still spread evenly
MAX_SHARD_COST = 1 << 20
"""largest cost of a shard, in atom-copies"""
MIN_SHARDS = 64
"""shards a dataset is cut into at least (fewer when it has fewer items)"""

MANIFEST = "manifest.json"
"""file of a work directory identifying its run"""


try:
    from numpy._core import multiarray
except ImportError:  # numpy < 2
    from numpy.core import multiarray

# what numpy arrays and scalars (but not arrays of Python objects) need to be read
# back by torch.load(weights_only=True)
_NUMPY_GLOBALS = [
    multiarray._reconstruct,
    multiarray.scalar,
    np.ndarray,
    np.dtype,
    *{type(np.dtype(kind)) for kind in "?bBhHiIlLqQefdgFDGUS"},
]


class ResumeMismatchError(ValueError):
    """A work directory holds shards of a different run."""


# --------------------------------------------------------------------- sharding
def shard_by_cost(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Assign items to ranks so that the ranks' total costs are balanced.

    Longest processing time first: items in decreasing cost (ties by index) go
    to the rank with the smallest total so far (ties to the lowest rank). The
    largest total exceeds the best possible one by at most a third. Deterministic,
    so every rank computes the same assignment.

    :param costs: ``(n_items,)`` non-negative costs, e.g. atoms times copies
    :param world_size: number of ranks
    :return: for each rank, its item indices in increasing order
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    totals = [0.0] * world_size
    assigned: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (totals[r], r))
        assigned[rank].append(index)
        totals[rank] += costs[index]
    return [sorted(indices) for indices in assigned]


def cut_into_shards(costs: Sequence[int]) -> list[list[int]]:
    """Cut items into consecutive shards of about equal cost.

    The target cost of a shard is the total over ``MIN_SHARDS`` (so that small
    datasets still spread over the ranks), at most ``MAX_SHARD_COST`` (so that a
    shard is a short piece of work to lose when a run is interrupted).

    :param costs: ``(n_items,)`` costs, e.g. atoms times copies of each structure
    :return: the item indices of each shard, in order
    """
    total = sum(costs)
    target = min(MAX_SHARD_COST, max(1, math.ceil(total / MIN_SHARDS)))
    shards: list[list[int]] = []
    current: list[int] = []
    accumulated = 0
    for index, cost in enumerate(costs):
        current.append(index)
        accumulated += cost
        if accumulated >= target:
            shards.append(current)
            current, accumulated = [], 0
    if current:
        shards.append(current)
    return shards


# ---------------------------------------------------------------- shard storage
class ShardStore:
    """A work directory holding the completed shards of one run.

    ``DIR/manifest.json`` identifies the run (model, structures, settings);
    ``DIR/shard-<index>.pt`` holds the result of one shard. Every file appears
    only once complete, so a run killed at any moment leaves a consistent
    directory.

    :param path: the work directory
    :param manifest: JSON-ready description of the run; a directory with another
        manifest is refused
    :param result_types: the classes a shard's result holds besides tensors,
        numpy arrays and Python's containers, numbers and strings: shards are read
        with ``torch.load(weights_only=True)``, which allows only these
    """

    def __init__(
        self,
        path: str | os.PathLike,
        manifest: dict,
        result_types: Sequence[type] = (),
    ):
        self.path = Path(path)
        # normalized through JSON, as it is compared with the saved one
        self.manifest = json.loads(json.dumps(manifest))
        self.result_types = list(result_types)

    def open(self, context: DistributedContext) -> None:
        """Check the manifest of an existing directory, or create it (rank 0).

        :raise ResumeMismatchError: the directory belongs to another run
        """
        manifest = self.path / MANIFEST
        if self.path.exists() and not self.path.is_dir():
            raise ResumeMismatchError(
                f"work directory '{self.path}' exists and is not a directory: "
                "remove it or choose another output"
            )
        if manifest.exists():
            saved = json.loads(manifest.read_text())
            keys = sorted(set(saved) | set(self.manifest))
            differing = [k for k in keys if saved.get(k) != self.manifest.get(k)]
            if differing:
                raise ResumeMismatchError(
                    f"work directory '{self.path}' holds a run with another "
                    f"{', '.join(differing)}: remove it to start over, or choose "
                    "another output directory"
                )
        elif context.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            with atomic_file(manifest) as temporary:
                temporary.write_text(json.dumps(self.manifest, indent=1))

    def _file(self, shard: int) -> Path:
        return self.path / f"shard-{shard:06d}.pt"

    def completed(self) -> list[int]:
        """Indices of the shards saved so far, in increasing order."""
        if not self.path.is_dir():
            return []
        return sorted(
            int(file.stem.split("-")[1])
            for file in self.path.glob("shard-*.pt")
            if file.stem.split("-")[1].isdigit()
        )

    def save(self, shard: int, value) -> None:
        """Save the (picklable) result of a shard."""
        with atomic_file(self._file(shard)) as temporary:
            torch.save(value, temporary)

    def load(self, shard: int):
        """The saved result of a shard.

        :raise ResumeMismatchError: the file holds something else than tensors,
            numpy arrays, containers and ``result_types``
        """
        # a work directory may be shared or come from elsewhere: never run code
        # from it, as an unrestricted unpickler would
        try:
            with torch.serialization.safe_globals(_NUMPY_GLOBALS + self.result_types):
                return torch.load(self._file(shard), weights_only=True)
        except pickle.UnpicklingError as error:
            raise ResumeMismatchError(
                f"'{self._file(shard)}' holds objects that a shard of this run "
                "cannot hold: remove the work directory to start over"
            ) from error

    def remove(self) -> None:
        """Delete the work directory."""
        shutil.rmtree(self.path, ignore_errors=True)


def run_shards(
    shards: Sequence[Sequence[int]],
    costs: Sequence[float],
    compute: Callable[[dict[int, list[int]]], Iterable[tuple[int, object]]],
    context: DistributedContext | None = None,
    store: ShardStore | None = None,
) -> list | None:
    """Evaluate shards on every rank and gather their results to rank 0.

    Every rank must call it with the same arguments (but ``compute``, which
    runs where it is called). Shards already in ``store`` are not evaluated
    again; new ones are saved there as they complete.

    :param shards: the item indices of each shard
    :param costs: ``(n_shards,)`` cost of each shard, for the assignment
    :param compute: given ``{shard: item indices}`` of this rank's shards, yields
        ``(shard, result)`` as each shard completes (results must be picklable)
    :param context: the distributed context (default: a single process)
    :param store: where completed shards are saved and found
    :return: on rank 0 the results of all shards, in shard order; ``None`` on
        the other ranks
    """
    if context is None:
        context = DistributedContext()
    error = None
    completed: list[int] = []
    try:
        if store is not None:
            store.open(context)
            if context.is_main:
                completed = store.completed()
    except Exception as caught:
        error = caught
    completed = agree(context, error, completed)[0]
    if completed and context.is_main:
        print(
            f"resuming: {len(completed)} of {len(shards)} shards already done in "
            f"{store.path}",
            file=sys.stderr,
            flush=True,
        )

    done = set(completed)
    assignment = shard_by_cost(
        [0.0 if shard in done else costs[shard] for shard in range(len(shards))],
        context.world_size,
    )[context.rank]
    mine = {shard: list(shards[shard]) for shard in assignment if shard not in done}
    results: dict[int, object] = {}
    kill_after = int(os.environ.get(KILL_AFTER_SHARDS_VARIABLE, "0"))
    try:
        if os.environ.get(FAIL_RANK_VARIABLE) == str(context.rank):
            raise RuntimeError(f"test failure requested on rank {context.rank}")
        if mine:
            for shard, result in compute(mine):
                if store is not None:
                    store.save(shard, result)
                results[shard] = result
                if kill_after and len(results) >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        if set(results) != set(mine):
            raise RuntimeError(
                f"internal error: shards {sorted(set(mine) - set(results))} "
                "were not computed"
            )
    except Exception as caught:
        error = caught
    agree(context, error)

    gathered = gather_to_main(context, results)
    if gathered is None:
        return None
    merged: dict[int, object] = {}
    for part in gathered:
        merged.update(part)
    for shard in completed:
        merged[shard] = store.load(shard)
    return [merged[shard] for shard in range(len(shards))]


def work_directory(output: str | os.PathLike) -> Path:
    """Where a resumable run writing ``output`` keeps its completed shards until
    ``output`` is complete: ``<output>.partial`` next to it."""
    output = Path(output)
    return output.parent / f"{output.name}.partial"


def run_resumable(
    costs: Sequence[int],
    compute: Callable[[dict[int, list[int]]], Iterable[tuple[int, object]]],
    context: DistributedContext | None = None,
    work_dir: str | os.PathLike | None = None,
    manifest: dict | None = None,
    result_types: Sequence[type] = (),
) -> list | None:
    """Run a piece of work item by item, spread over ranks and resumable.

    The items are cut into shards of about equal cost (:py:func:`cut_into_shards`,
    independent of the number of ranks), the shards assigned to ranks by cost and
    evaluated (:py:func:`run_shards`); with a work directory every completed
    shard is saved there at once, and a rerun with the same ``manifest`` only
    evaluates the missing shards. A failure on any rank raises
    :py:class:`RankFailure` on every rank.

    :param costs: ``(n_items,)`` cost of each item, e.g. atoms times copies
    :param compute: given ``{shard: item indices}`` of this rank's shards, yields
        ``(shard, result)`` as each shard completes (results must be picklable)
    :param context: the distributed context (default: a single process)
    :param work_dir: where completed shards are kept (see
        :py:func:`work_directory`); the caller removes it once the results are
        saved
    :param manifest: JSON-ready identity of the run (needed with ``work_dir``); a
        work directory of another run is refused with
        :py:class:`ResumeMismatchError`
    :param result_types: the classes the results of ``compute`` hold besides
        tensors, numpy arrays and Python's containers, numbers and strings (see
        :py:class:`ShardStore`)
    :return: on rank 0 the results of all shards, in shard order; ``None`` on the
        other ranks
    """
    store = None
    if work_dir is not None:
        if manifest is None:
            raise ValueError("a work directory needs a manifest identifying the run")
        store = ShardStore(work_dir, manifest, result_types)
    shards = cut_into_shards(costs)
    shard_costs = [sum(costs[index] for index in shard) for shard in shards]
    return run_shards(shards, shard_costs, compute, context, store)
