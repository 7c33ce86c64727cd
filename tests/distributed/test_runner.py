"""The resumable, sharded runner: shards balanced by cost, cut independently of
the number of processes, and resumed from a work directory."""

import math

import numpy as np
import pytest
import torch

from metatrain_symmetry.distributed import (
    MANIFEST,
    ResumeMismatchError,
    cut_into_shards,
    run_resumable,
    shard_by_cost,
    work_directory,
)


def test_shards_balance_cost_not_count():
    rng = np.random.default_rng(0)
    # a few large structures among many small ones
    costs = [int(c) for c in rng.integers(1, 20, size=200)] + [500, 400, 300]
    for world_size in (1, 2, 3, 7):
        assigned = shard_by_cost(costs, world_size)
        assert sorted(i for rank in assigned for i in rank) == list(range(len(costs)))
        totals = [sum(costs[i] for i in rank) for rank in assigned]
        # the greedy bound: no rank exceeds the mean by more than the largest item
        assert max(totals) <= sum(costs) / world_size + max(costs)
        assert shard_by_cost(costs, world_size) == assigned
    totals = [sum(costs[i] for i in rank) for rank in shard_by_cost(costs, 2)]
    assert abs(totals[0] - totals[1]) <= max(c for c in costs if c < 300)

    # equal counts would be unbalanced here: cost, not count, is balanced
    assert shard_by_cost([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [
        [0],
        list(range(1, 11)),
    ]


def test_shards_are_consecutive_and_independent_of_processes():
    costs = [3, 50, 2, 2, 7, 1, 100, 4] * 30
    shards = cut_into_shards(costs)
    assert [i for shard in shards for i in shard] == list(range(len(costs)))
    target = math.ceil(sum(costs) / 64)
    # every shard but the last reaches the target, and none overshoots it by more
    # than its last structure
    for shard in shards[:-1]:
        cost = sum(costs[i] for i in shard)
        assert target <= cost < target + costs[shard[-1]]
    assert cut_into_shards([1 << 30, 1, 1]) == [[0], [1, 2]]


# ------------------------------------------------------------------ resuming
# 200 items of equal cost: 50 shards of 4 consecutive items
COSTS = [1] * 200
MANIFEST_OF_RUN = {"model": "a.ckpt", "grid": {"degree": 4}}


def squares(calls: list, stop_after: int | None = None):
    """A compute that records the shards it is asked for and yields, per shard,
    the squares of its items; with ``stop_after``, it fails after that many
    shards."""

    def compute(mine):
        calls.append(sorted(mine))
        for count, (shard, items) in enumerate(mine.items()):
            if count == stop_after:
                raise RuntimeError("interrupted")
            yield shard, [item**2 for item in items]

    return compute


def flat(results):
    return [value for shard in results for value in shard]


def test_run_resumable_returns_every_shard_in_order():
    calls = []
    results = run_resumable(COSTS, squares(calls))
    assert len(results) == len(cut_into_shards(COSTS)) == 50
    assert flat(results) == [item**2 for item in range(200)]
    # one process computes every shard in one call
    assert calls == [list(range(50))]


def test_a_rerun_with_the_same_manifest_computes_nothing(tmp_path):
    work = work_directory(tmp_path / "audit")
    assert work == tmp_path / "audit.partial"
    first_calls = []
    first = run_resumable(COSTS, squares(first_calls), None, work, MANIFEST_OF_RUN)
    assert first_calls == [list(range(50))]
    saved = sorted(path.name for path in work.iterdir())
    assert saved == [MANIFEST] + [f"shard-{i:06d}.pt" for i in range(50)]

    calls = []
    again = run_resumable(COSTS, squares(calls), None, work, dict(MANIFEST_OF_RUN))
    assert calls == []
    assert again == first
    assert flat(again) == [item**2 for item in range(200)]


def test_an_interrupted_run_computes_only_the_missing_shards(tmp_path, capsys):
    work = tmp_path / "work"
    with pytest.raises(RuntimeError, match="interrupted"):
        run_resumable(COSTS, squares([], stop_after=3), None, work, MANIFEST_OF_RUN)
    saved = sorted(path.name for path in work.iterdir())
    assert saved == [MANIFEST] + [f"shard-{i:06d}.pt" for i in range(3)]

    calls = []
    results = run_resumable(COSTS, squares(calls), None, work, MANIFEST_OF_RUN)
    assert calls == [list(range(3, 50))]
    assert flat(results) == [item**2 for item in range(200)]
    assert "resuming: 3 of 50 shards already done" in capsys.readouterr().err


def test_another_run_is_refused(tmp_path):
    work = tmp_path / "work"
    run_resumable(COSTS, squares([]), None, work, MANIFEST_OF_RUN)
    before = {path.name: path.stat().st_mtime_ns for path in work.iterdir()}
    calls = []
    other = {**MANIFEST_OF_RUN, "model": "b.ckpt"}
    with pytest.raises(ResumeMismatchError, match="holds a run with another model"):
        run_resumable(COSTS, squares(calls), None, work, other)
    assert calls == []
    assert {path.name: path.stat().st_mtime_ns for path in work.iterdir()} == before


def test_a_work_directory_needs_a_manifest(tmp_path):
    with pytest.raises(ValueError, match="needs a manifest"):
        run_resumable(COSTS, squares([]), None, tmp_path / "work")
    assert list(tmp_path.iterdir()) == []


class Payload:
    """A class a shard may hold once it is declared in ``result_types``."""

    def __init__(self, value):
        self.value = value


class RunsCode:
    """An object that runs code when it is unpickled."""

    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_shards_are_read_without_running_code(tmp_path, capsys):
    work = tmp_path / "work"

    def payloads(mine):
        for shard, items in mine.items():
            squares = np.square(items)
            yield (
                shard,
                [Payload(np.array(items)), {"squares": squares, "first": squares[0]}],
            )

    first = run_resumable(COSTS, payloads, None, work, MANIFEST_OF_RUN, [Payload])
    again = run_resumable(COSTS, squares([]), None, work, MANIFEST_OF_RUN, [Payload])
    for shard, before in zip(again, first, strict=True):
        assert isinstance(shard[0], Payload)
        np.testing.assert_array_equal(shard[0].value, before[0].value)
        np.testing.assert_array_equal(shard[1]["squares"], before[1]["squares"])
        assert shard[1]["first"] == before[1]["first"]

    # an undeclared class, and code that would run: refused, never run
    with pytest.raises(ResumeMismatchError, match="remove the work directory"):
        run_resumable(COSTS, squares([]), None, work, MANIFEST_OF_RUN)
    torch.save(RunsCode(), work / "shard-000000.pt")
    with pytest.raises(ResumeMismatchError, match="cannot hold"):
        run_resumable(COSTS, squares([]), None, work, MANIFEST_OF_RUN, [Payload])
    assert "unpickling ran code" not in capsys.readouterr().out
