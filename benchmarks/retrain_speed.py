"""Closed-form readout retraining for 5 gammas versus gradient retraining (L-BFGS)
of the same layers to the same objective value, measured in one run.

Each gamma's gradient retraining stops when it reaches the closed-form objective
within ``--tolerance`` (relative) or after ``--budget`` seconds; when a budget runs
out, the printed speed-up is a lower bound.

Usage: python benchmarks/retrain_speed.py [--structures 24] [--rotations 8]
    [--budget 60]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

import metatrain_symmetry as msym
from metatrain_symmetry.demo import make_dataset
from metatrain_symmetry.pet import PETReadout
from metatrain_symmetry.testing import tiny_pet


def tiny_checkpoint(path: Path) -> None:
    torch.save(tiny_pet(atomic_types=(29,)).get_checkpoint(), path)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--structures", type=int, default=24)
    parser.add_argument("--rotations", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument(
        "--budget", type=float, default=60.0, help="seconds of L-BFGS per gamma"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    gammas = [0.0, 0.1, 1.0, 10.0, 100.0]
    ridge = 1e-6
    frames = make_dataset(args.structures)
    grid = msym.O3Grid.random(args.rotations, seed=0)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = Path(directory) / "model.ckpt"
        tiny_checkpoint(checkpoint)

        start = time.perf_counter()
        result = msym.retrain_last_layer(
            checkpoint, frames, gammas=gammas, grid=grid, ridge=ridge
        )
        closed_form = time.perf_counter() - start
        print(f"closed form, 5 gammas: {closed_form:.2f} s", flush=True)

        total_gradient = 0.0
        converged = True
        for index, gamma in enumerate(gammas):
            target_value = float(result.objective[index])
            model = msym.load_model(checkpoint)
            for parameter in model.module.parameters():
                parameter.requires_grad_(False)
            parameters = []
            for name in result.targets:
                parameters += PETReadout(model.module, name).parameters()
            for parameter in parameters:
                parameter.requires_grad_(True)
            optimizer = torch.optim.LBFGS(
                parameters, max_iter=20, line_search_fn="strong_wolfe"
            )

            def closure(optimizer=optimizer, model=model, gamma=gamma):
                optimizer.zero_grad()
                value = msym.retraining_objective(
                    model, frames, gamma, grid, ridge=ridge
                )
                value.backward()
                return value

            start = time.perf_counter()
            reached = float("inf")
            goal = target_value * (1 + args.tolerance)
            while reached > goal and time.perf_counter() - start < args.budget:
                reached = float(optimizer.step(closure).detach())
            elapsed = time.perf_counter() - start
            total_gradient += elapsed
            converged = converged and reached <= goal
            print(
                f"gamma={gamma:<6g} closed-form L={target_value:.6e}  "
                f"L-BFGS L={reached:.6e} after {elapsed:.1f} s"
                + ("" if reached <= goal else " (budget spent, not reached)"),
                flush=True,
            )
    print(f"closed form, 5 gammas: {closed_form:.2f} s")
    print(
        f"gradient retraining to within {args.tolerance:g} (relative): "
        f"{total_gradient:.2f} s" + ("" if converged else " or more")
    )
    bound = "" if converged else ">= "
    print(f"speed-up: {bound}{total_gradient / closed_form:.1f}x")


if __name__ == "__main__":
    main()
