"""The equivariance loss under metatrain's ``DistributedDataParallel``: two CPU
processes (gloo) training on halves of fixed batches end with the parameters of
one process training on the whole batches.

metatrain initialises distributed training for NCCL only, so ``mtt train`` cannot
run distributed here; each process instead repeats the step sequence of
``metatrain/pet/trainer.py`` (evaluate, divide by the number of atoms, per-property
scales, loss, backward, gradient clipping, optimizer step) on a small PET wrapped in
metatrain's ``DistributedDataParallel``, with the loss built by metatrain's
``LossAggregator`` from an options entry of ``type: equivariance``.

The rotated copies of the penalty are random, and a process draws rotations for its
own batch only, so the two runs would draw different rotations for the same
structure. The test replaces ``metatomic.torch.o3.random_transformations``, as
looked up by :py:func:`metatrain_symmetry.losses.evaluate_rotated_copies`, with a
table of rotations indexed by step, copy and structure: both runs then apply the
same rotation to the same copy of the same structure, and any difference left is
in how gradients are combined across processes.
"""

import os
import socket
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch


N_STEPS = 3
N_ROTATIONS = 2
WORLD_SIZE = 2
# four structures per step; each half (one process's share) has two structures
# and nine atoms, so that per-process means average to the mean over the batch
ATOMS = ("CHHO", "CHHHH", "OHHC", "HCHHH")
LOSS = {
    "energy": {"type": "equivariance", "n_rotations": N_ROTATIONS},
    "non_conservative_force": {"type": "equivariance", "n_rotations": N_ROTATIONS},
}
# the penalty of the squared Lie derivatives: deterministic, no rotation drawn
GENERATOR_LOSS = {
    name: {"type": "equivariance", "method": "generators"} for name in LOSS
}
# an energy and its conservative forces, differentiated in reverse mode
GENERATOR = {"type": "equivariance", "method": "generators"}
CONSERVATIVE_GENERATOR_LOSS = {
    "energy": {
        **GENERATOR,
        "gradients": {"positions": {**GENERATOR, "weight": 1.0, "reduction": "mean"}},
    }
}


def make_structures():
    import ase

    rng = np.random.default_rng(7)
    steps = []
    for _ in range(N_STEPS):
        steps.append(
            [
                ase.Atoms(symbols, positions=rng.normal(size=(len(symbols), 3)))
                for symbols in ATOMS
            ]
        )
    return steps


def rotation_table():
    """``(N_STEPS, N_ROTATIONS, len(ATOMS), 3, 3)`` O(3) elements, proper and
    improper, the same in every process."""
    from metatomic.torch.o3 import random_transformations

    generator = torch.Generator().manual_seed(11)
    matrices = random_transformations(
        N_STEPS * N_ROTATIONS * len(ATOMS),
        device=torch.device("cpu"),
        dtype=torch.float64,
        add_inversions=True,
        generator=generator,
    ).matrices
    return matrices.reshape(N_STEPS, N_ROTATIONS, len(ATOMS), 3, 3)


class FixedRotations:
    """Stands in for ``random_transformations``: the rotations of the table for the
    current step and the structures of the current batch, copy-major as
    ``evaluate_rotated_copies`` lays them out."""

    def __init__(self, table, structures):
        self.table = table
        self.structures = structures
        self.step = 0
        self.calls = 0

    def __call__(self, n, device, dtype, add_inversions=False, generator=None):
        matrices = self.table[self.step][:, self.structures].reshape(-1, 3, 3)
        assert matrices.shape[0] == n
        self.calls += 1
        return SimpleNamespace(matrices=matrices.to(device=device, dtype=dtype))


def train(rank, world_size, port, gamma, output, loss=None):
    """Train a tiny PET for ``N_STEPS`` steps on this process's share of the fixed
    batches (all of them when ``world_size`` is 1, without DDP) and save its final
    parameters, the number of forward calls of the DDP wrapper and the logged
    ``L_sigma`` to ``output``."""
    import metatensor.torch
    import metatomic.torch.o3 as o3
    import torch.distributed as dist
    from metatomic.torch import systems_to_torch
    from metatrain.pet import trainer
    from metatrain.utils.distributed.distributed_data_parallel import (
        DistributedDataParallel,
    )
    from metatrain.utils.loss import LossAggregator
    from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

    from metatrain_symmetry import hooks
    from metatrain_symmetry.testing import tiny_pet, training_step_loss

    torch.set_num_threads(1)
    hooks.register()
    distributed = world_size > 1
    if distributed:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
        )
    share = len(ATOMS) // world_size
    structures = list(range(rank * share, (rank + 1) * share))

    loss = LOSS if loss is None else loss
    conservative = any(entry.get("gradients") for entry in loss.values())
    module = tiny_pet(position_gradients=conservative).train()
    reference = tiny_pet(seed=1, position_gradients=conservative).eval()
    infos = {name: module.dataset_info.targets[name] for name in loss}
    options = {
        name: {"weight": 1.0, "reduction": "mean", "gradients": {}, **entry}
        for name, entry in loss.items()
    }
    for entry in options.values():
        entry["gamma"] = gamma
        for gradient in entry["gradients"].values():
            gradient["gamma"] = gamma
    loss_fn = LossAggregator(infos, options)
    batches = []
    for frames in make_structures():
        systems = [
            get_system_with_neighbor_lists(
                systems_to_torch(frames[index], dtype=torch.float64),
                module.requested_neighbor_lists(),
            )
            for index in structures
        ]
        # with gradients enabled: the reference's forces are targets too
        targets = {
            name: metatensor.torch.detach(tensor)
            for name, tensor in trainer.evaluate_model(
                reference, systems, infos, False
            ).items()
        }
        batches.append((systems, targets))

    model = DistributedDataParallel(module) if distributed else module
    forward_calls = []
    model.register_forward_pre_hook(lambda *args: forward_calls.append(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    rotations = FixedRotations(rotation_table(), structures)
    original = o3.random_transformations
    o3.random_transformations = rotations
    try:
        for step, (systems, targets) in enumerate(batches):
            rotations.step = step
            # the trainer's step, metatrain/pet/trainer.py
            optimizer.zero_grad()
            loss = training_step_loss(model, systems, targets, infos, loss_fn)
            if distributed:
                loss += 0.0 * sum(
                    p.sum() for p in model.parameters() if p.requires_grad
                )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    finally:
        o3.random_transformations = original
    log = loss_fn.equivariance_context.pop_log()
    if rank == 0:
        torch.save(
            {
                "parameters": {k: v.detach() for k, v in module.named_parameters()},
                "forward_calls": len(forward_calls),
                "rotation_calls": rotations.calls,
                "log": log,
            },
            output,
        )
    if distributed:
        dist.destroy_process_group()
        # gloo's threads outlive the group after forward-mode differentiation,
        # and may abort the interpreter's shutdown (docs/src/distributed.rst)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_train_as_one_on_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    start = time.perf_counter()
    gamma = 5.0
    distributed = tmp_path / "distributed.pt"
    mp.spawn(
        train,
        args=(WORLD_SIZE, free_port(), gamma, distributed),
        nprocs=WORLD_SIZE,
        join=True,
    )
    single = tmp_path / "single.pt"
    train(0, 1, None, gamma, single)
    without_penalty = tmp_path / "without-penalty.pt"
    train(0, 1, None, 0.0, without_penalty)
    print(f"three training runs: {time.perf_counter() - start:.1f} s")

    distributed = torch.load(distributed)
    single = torch.load(single)
    without_penalty = torch.load(without_penalty)

    # one forward of the DDP wrapper per step: the copies bypass it
    assert distributed["forward_calls"] == N_STEPS
    assert distributed["rotation_calls"] == N_STEPS
    assert single["rotation_calls"] == N_STEPS
    assert without_penalty["rotation_calls"] == 0
    assert all(value > 0 for value in distributed["log"].values())
    assert set(distributed["log"]) == {
        "L_sigma(energy)",
        "L_sigma(non_conservative_force)",
    }

    initial = tiny_pet_parameters()
    moved = 0.0
    penalty_effect = 0.0
    for name, value in single["parameters"].items():
        other = distributed["parameters"][name]
        torch.testing.assert_close(other, value, rtol=0, atol=1e-10, msg=name)
        moved = max(moved, float((value - initial[name]).abs().max()))
        difference = value - without_penalty["parameters"][name]
        penalty_effect = max(penalty_effect, float(difference.abs().max()))
    # training moved the parameters, and the penalty changed where they went
    assert moved > 1e-3
    assert penalty_effect > 1e-3


def tiny_pet_parameters():
    from metatrain_symmetry.testing import tiny_pet

    return {k: v.detach() for k, v in tiny_pet().named_parameters()}


@pytest.mark.parametrize(
    "loss, logged",
    [
        (GENERATOR_LOSS, {"L_sigma(energy)", "L_sigma(non_conservative_force)"}),
        (
            CONSERVATIVE_GENERATOR_LOSS,
            {"L_sigma(energy)", "L_sigma(energy::positions)"},
        ),
    ],
    ids=["forward-mode", "reverse-mode"],
)
def test_generator_penalty_trains_as_one_on_the_whole_batch(tmp_path, loss, logged):
    import torch.multiprocessing as mp

    gamma = 5.0
    distributed = tmp_path / "distributed.pt"
    mp.spawn(
        train,
        args=(WORLD_SIZE, free_port(), gamma, distributed, loss),
        nprocs=WORLD_SIZE,
        join=True,
    )
    single = tmp_path / "single.pt"
    train(0, 1, None, gamma, single, loss)
    without_penalty = tmp_path / "without-penalty.pt"
    train(0, 1, None, 0.0, without_penalty, loss)
    distributed, single, without_penalty = (
        torch.load(path) for path in (distributed, single, without_penalty)
    )
    assert distributed["forward_calls"] == N_STEPS
    assert distributed["rotation_calls"] == 0
    assert set(distributed["log"]) == logged
    assert all(value > 0 for value in distributed["log"].values())
    penalty_effect = 0.0
    for name, value in single["parameters"].items():
        other = distributed["parameters"][name]
        torch.testing.assert_close(other, value, rtol=0, atol=1e-10, msg=name)
        difference = value - without_penalty["parameters"][name]
        penalty_effect = max(penalty_effect, float(difference.abs().max()))
    assert penalty_effect > 1e-3
