"""The processes of a distributed run: joining those of ``torchrun`` or
``srun``, and agreeing on failures (after each phase every rank reports its
status to every other, and when one failed all of them raise, so that no rank
waits forever for a peer that is gone)."""

from __future__ import annotations

import datetime
import os

import torch

from .._utils import first_line


TIMEOUT_VARIABLE = "MTT_SYMMETRY_DISTRIBUTED_TIMEOUT"
"""environment variable: seconds a rank waits for its peers at each collective
(default 1800)"""

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)
"""how long a rank waits for its peers at each collective by default"""


class RankFailure(RuntimeError):
    """A rank of a distributed run failed; raised on every rank."""


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
