"""Analyses and audits on several processes with ``torch.distributed``, and
resumable runs.

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
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from ._utils import atomic_file, first_line


# test-only hooks: SIGKILL this process once it has saved this many shards (an
# interruption at an arbitrary moment), and fail on this rank before any shard
KILL_AFTER_SHARDS_VARIABLE = "MTT_SYMMETRY_TEST_KILL_AFTER_SHARDS"
FAIL_RANK_VARIABLE = "MTT_SYMMETRY_TEST_FAIL_RANK"

TIMEOUT_VARIABLE = "MTT_SYMMETRY_DISTRIBUTED_TIMEOUT"
"""environment variable: seconds a rank waits for its peers at each collective
(default 1800)"""

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)

# shard cost targets in atom-copies: at most about a minute of CPU work, and at
# least this many shards per dataset so that small datasets still spread evenly
MAX_SHARD_COST = 1 << 20
MIN_SHARDS = 64

MANIFEST = "manifest.json"


class RankFailure(RuntimeError):
    """A rank of a distributed run failed; raised on every rank."""


class ResumeMismatchError(ValueError):
    """A work directory holds shards of a different run."""


# ---------------------------------------------------------------- process group
class DistributedContext:
    """Where this process stands in a distributed run.

    :param rank: index of this process, ``0 <= rank < world_size``
    :param world_size: number of processes
    :param local_rank: index of this process on its node (selects its GPU)
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of size {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank

    def __repr__(self) -> str:
        return (
            f"DistributedContext(rank={self.rank}, world_size={self.world_size}, "
            f"local_rank={self.local_rank})"
        )

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that gets results and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """Whether there are other processes to talk to."""
        return self.world_size > 1

    @classmethod
    def current(cls) -> DistributedContext:
        """The context of torch's initialized default process group.

        :raise RuntimeError: when no process group is initialized
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "distributed=True needs an initialized process group: call "
                "metatrain_symmetry.distributed.init_from_environment() (or "
                "torch.distributed.init_process_group) on every rank first"
            )
        local_rank = int(
            os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        )
        return cls(dist.get_rank(), dist.get_world_size(), local_rank)


def environment_world_size() -> int:
    """Number of processes the launcher started: ``WORLD_SIZE`` (``torchrun``),
    else ``SLURM_STEP_NUM_TASKS`` or ``SLURM_NTASKS`` inside a SLURM job step,
    else 1."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ:
        return int(
            os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))
        )
    return 1


def _launcher_environment() -> tuple[int, int, int, str, int]:
    """``(rank, world_size, local_rank, master address, master port)`` from the
    variables of ``torchrun`` or of ``srun``."""
    if "WORLD_SIZE" in os.environ:
        missing = [
            name
            for name in ("RANK", "MASTER_ADDR", "MASTER_PORT")
            if name not in os.environ
        ]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE is set but {missing} are not: launch with torchrun "
                "or set RANK, MASTER_ADDR and MASTER_PORT for every process"
            )
        return (
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", "0")),
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
        )
    import hostlist

    if "SLURM_JOB_NODELIST" not in os.environ:
        raise RuntimeError(
            "SLURM_JOB_NODELIST is not set: launch the processes with srun inside "
            "a SLURM allocation"
        )
    address = os.environ.get(
        "MASTER_ADDR", hostlist.expand_hostlist(os.environ["SLURM_JOB_NODELIST"])[0]
    )
    # a port that differs between jobs sharing a node
    default_port = 20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000
    return (
        int(os.environ["SLURM_PROCID"]),
        environment_world_size(),
        int(os.environ.get("SLURM_LOCALID", "0")),
        address,
        int(os.environ.get("MASTER_PORT", default_port)),
    )


def init_from_environment(
    backend: str | None = None, timeout: datetime.timedelta | None = None
) -> DistributedContext:
    """Join the processes started by ``torchrun`` or ``srun``.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` (``torchrun``), else ``SLURM_PROCID``, ``SLURM_NTASKS``,
    ``SLURM_LOCALID`` and the first node of ``SLURM_JOB_NODELIST`` (``srun``;
    ``MASTER_ADDR`` and ``MASTER_PORT`` override them when set), and initializes
    torch's default process group. With a single process nothing is initialized.
    Does nothing but report the context when a group is already initialized.

    :param backend: ``"gloo"`` or ``"nccl"``; by default ``"nccl"`` when CUDA is
        available (each rank then uses the GPU of its local rank) and ``"gloo"``
        otherwise
    :param timeout: how long a rank waits for its peers at each collective before
        failing; by default the ``MTT_SYMMETRY_DISTRIBUTED_TIMEOUT`` variable
        (seconds) or 30 minutes
    :return: this process's rank, the number of processes and its local rank
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistributedContext.current()
    if environment_world_size() <= 1:
        return DistributedContext()
    if not dist.is_available():
        raise RuntimeError("this build of torch has no torch.distributed support")
    rank, world_size, local_rank, address, port = _launcher_environment()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if timeout is None:
        seconds = os.environ.get(TIMEOUT_VARIABLE)
        timeout = (
            DEFAULT_TIMEOUT
            if seconds is None
            else datetime.timedelta(seconds=float(seconds))
        )
    dist.init_process_group(
        backend,
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )
    return DistributedContext(rank, world_size, local_rank)


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


# ------------------------------------------------------------------ collectives
def agree(
    context: DistributedContext, error: BaseException | None, payload=None
) -> list:
    """Exchange every rank's status (and a small picklable payload); raise on
    every rank if one failed.

    Every rank must call it the same number of times. The failing rank raises
    :py:class:`RankFailure` with its own message, the others with ``"rank R
    failed: <message>"``.

    :param error: this rank's error, ``None`` on success
    :param payload: sent to every rank
    :return: the payloads of all ranks, by rank
    """
    if not context.is_distributed:
        if error is not None:
            raise error
        return [payload]
    import torch.distributed as dist

    status = None if error is None else first_line(error)
    gathered: list = [None] * context.world_size
    dist.all_gather_object(gathered, (status, payload))
    failed = [(rank, message) for rank, (message, _) in enumerate(gathered) if message]
    if failed:
        if error is not None:
            raise RankFailure(first_line(error)) from error
        rank, message = failed[0]
        raise RankFailure(f"rank {rank} failed: {message}")
    return [item for _, item in gathered]


def gather_to_main(context: DistributedContext, value) -> list | None:
    """Every rank's picklable ``value`` on rank 0 (by rank), ``None`` elsewhere."""
    if not context.is_distributed:
        return [value]
    import torch.distributed as dist

    gathered = [None] * context.world_size if context.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


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
    """

    def __init__(self, path: str | os.PathLike, manifest: dict):
        self.path = Path(path)
        # normalized through JSON, as it is compared with the saved one
        self.manifest = json.loads(json.dumps(manifest))

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
        """The saved result of a shard."""
        # written by this package into a directory identified by the manifest
        return torch.load(self._file(shard), weights_only=False)

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
