"""Work on several processes with ``torch.distributed``, and resumable runs.

The structures of a dataset are cut into **shards**: consecutive structures whose
cost (atoms times rotated copies) adds up to a fixed target. The cut depends only
on the dataset and the grid, never on the number of processes, so that a run can
be resumed with another number of processes. Shards are assigned to ranks by
cost (:py:func:`shard_by_cost`); every rank evaluates its shards, and the results
are gathered to rank 0, which alone assembles them in shard order, so that they
equal those of a single process up to round-off.

With a work directory (:py:class:`ShardStore`), every completed shard is saved
there as soon as it is done, next to a manifest identifying the run; a rerun with
the same manifest evaluates only the shards that are missing, and a different
manifest is refused.

Failures are agreed on: after each phase every rank reports its status to every
other (:py:func:`agree`), and when one failed all of them raise, so that no rank
waits forever for a peer that is gone.

Workflows that spread over processes run through :py:func:`run_resumable`, with
the work directory :py:func:`work_directory` names next to their output.

The modules of this package: ``processes`` (the process group and collectives)
and ``runner`` (shards, their storage and :py:func:`run_resumable`, the one
runner of the workflows that spread over processes: ``analyze``, ``audit``
and every command to come).
"""

from .processes import (
    DEFAULT_TIMEOUT,
    TIMEOUT_VARIABLE,
    DistributedContext,
    RankFailure,
    agree,
    environment_world_size,
    gather_to_main,
    init_from_environment,
)
from .runner import (
    FAIL_RANK_VARIABLE,
    KILL_AFTER_SHARDS_VARIABLE,
    MANIFEST,
    MAX_SHARD_COST,
    MIN_SHARDS,
    ResumeMismatchError,
    ShardStore,
    cut_into_shards,
    run_resumable,
    run_shards,
    shard_by_cost,
    work_directory,
)


__all__ = [
    "DEFAULT_TIMEOUT",
    "FAIL_RANK_VARIABLE",
    "KILL_AFTER_SHARDS_VARIABLE",
    "MANIFEST",
    "MAX_SHARD_COST",
    "MIN_SHARDS",
    "TIMEOUT_VARIABLE",
    "DistributedContext",
    "RankFailure",
    "ResumeMismatchError",
    "ShardStore",
    "agree",
    "cut_into_shards",
    "environment_world_size",
    "gather_to_main",
    "init_from_environment",
    "run_resumable",
    "run_shards",
    "shard_by_cost",
    "work_directory",
]
