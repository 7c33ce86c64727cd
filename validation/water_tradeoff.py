"""The water study's accuracy-equivariance trade-off (fine-tuning with
the penalty by rotated copies and by generators, readout retraining) and the
symmetrized export of its conservative model.
"""

from __future__ import annotations

import time

from water_analyses import test_errors
from water_data import MODELS
from water_training import mtt_train, pet_options


# the model of the accuracy-equivariance trade-off: its forces are the energy's
# position gradients, penalised through the energy's ``gradients`` entry
TRADEOFF_MODEL = "conservative"


# trade-off rows of fine-tunings, by the penalty's method
FINETUNED = {
    "rotations": "fine-tuned",
    "generators": "fine-tuned, generators",
    "sampled": "fine-tuned, generators, sampled",
}
# the cheapest generator penalty: one random direction, a quarter of the steps
SAMPLED = "method: generators, directions: random, fraction: 0.25"


def _finetune_loss(gamma: float, penalty: str) -> str:
    """The ``loss`` section of a fine-tuning: the equivariance penalty with
    ``gamma`` on the energy and on its forces, by rotated copies (``"rotations"``),
    by generators (``"generators"``), or by generators along random directions at
    a random quarter of the steps (``"sampled"``)."""
    if penalty in ("generators", "sampled"):
        method = "method: generators" if penalty == "generators" else SAMPLED
        energy = f"type: equivariance, base: mse, gamma: {gamma}, {method}"
        forces = energy
    else:
        energy = f"type: equivariance, base: mse, gamma: {gamma}, n_rotations: 2"
        forces = f"type: equivariance, base: mse, gamma: {gamma}"
    return f"loss:\n  energy: {{{energy}, gradients: {{positions: {{{forces}}}}}}}\n"


def _finetune(output, config, test, gamma, penalty, epochs):
    """Fine-tune the trade-off's model with ``mtt train``; its trade-off row."""
    targets, force = MODELS[TRADEOFF_MODEL]
    name = f"finetune-{penalty}-gamma-{gamma:g}-epochs-{epochs}"
    directory = output / "models" / name
    options = pet_options(
        config,
        targets,
        epochs,
        training=_finetune_loss(gamma, penalty),
        finetune=f"../{TRADEOFF_MODEL}/model.ckpt",
    )
    seconds = mtt_train(directory, options)
    return {
        "method": FINETUNED[penalty],
        "gamma": gamma,
        "seconds": seconds,
        "epochs": epochs,
    } | test_errors(directory / "model.ckpt", test, config, force)


def _penalty_methods(output, config, test, rows):
    """Fine-tunings with the generator penalty at ``generator_gammas`` (some of
    the gammas of the rotated copies), first for the same number of epochs, then
    the cheaper of the two methods again for as many epochs as fill the other's
    wall time; then the sampled generator penalty for the same epochs and, when
    it is cheaper, for the wall time of the rotated copies."""
    epochs = config["finetune_epochs"]
    for gamma in config["generator_gammas"]:
        (rotations,) = [
            row
            for row in rows
            if row["method"] == FINETUNED["rotations"] and row["gamma"] == gamma
        ]
        generators = _finetune(output, config, test, gamma, "generators", epochs)
        rows.append(generators)
        if generators["seconds"] < rotations["seconds"]:
            faster, slower, penalty = generators, rotations, "generators"
        else:
            faster, slower, penalty = rotations, generators, "rotations"
        longer = max(epochs + 1, round(epochs * slower["seconds"] / faster["seconds"]))
        row = _finetune(output, config, test, gamma, penalty, longer)
        rows.append(row | {"method": f"{row['method']}, equal time"})
        # the sampled penalty, for the epochs and then the time of rotated copies
        sampled = _finetune(output, config, test, gamma, "sampled", epochs)
        rows.append(sampled)
        longer = round(epochs * rotations["seconds"] / sampled["seconds"])
        if longer > epochs:
            row = _finetune(output, config, test, gamma, "sampled", longer)
            rows.append(row | {"method": f"{row['method']}, equal time"})


def stage_tradeoff(output, config, test):
    import metatrain_symmetry as msym

    targets, force = MODELS[TRADEOFF_MODEL]
    base = output / "models" / TRADEOFF_MODEL / "model.ckpt"
    rows = [
        {"method": "trained", "gamma": None, "seconds": None, "epochs": None}
        | test_errors(base, test, config, force)
    ]
    for gamma in config["finetune_gammas"]:
        epochs = config["finetune_epochs"]
        rows.append(_finetune(output, config, test, gamma, "rotations", epochs))
    _penalty_methods(output, config, test, rows)

    directory = output / "models" / "retrained"
    start = time.perf_counter()
    result = msym.retrain_last_layer(
        base,
        output / "data" / "train.xyz",
        validation=output / "data" / "test.xyz",
        gammas=config["retrain_gammas"],
        n_rotations=config["retrain_rotations"],
        output=directory,
    )
    seconds = time.perf_counter() - start
    for gamma, checkpoint in zip(result.gammas, result.checkpoints, strict=True):
        rows.append(
            # the sweep solves every gamma in one pass: its time is shared
            {"method": "retrained", "gamma": gamma, "seconds": seconds, "epochs": None}
            | test_errors(checkpoint, test, config, force)
        )
    retrain = {
        "seconds": seconds,
        "directory": str(directory.relative_to(output)),
        "table": result.table(),
    }
    return rows, retrain


def _seconds_per_evaluation(path, atoms, repeats):
    from metatomic_ase import MetatomicCalculator

    atoms = atoms.copy()
    atoms.calc = MetatomicCalculator(str(path))
    # TorchScript's profiling executor compiles and optimizes during the first
    # calls (seconds each); the same positions every time (the cached results
    # dropped) keep it on one specialization, so that both models are timed alike
    times = []
    for index in range(3 + repeats):
        atoms.calc.reset()
        start = time.perf_counter()
        atoms.get_forces()
        if index >= 3:
            times.append(time.perf_counter() - start)
    return min(times)


def stage_symmetrize(output, config, sets):
    import metatrain_symmetry as msym

    directory = output / "models" / "conservative"
    checkpoint = directory / "model.ckpt"
    grid = msym.O3Grid.random(config["rotations"], seed=4)
    # the audit stored in the exports (of the model before averaging)
    audit_frames = sets["test"][: max(config["symmetrized_audit_boxes"], 1)]
    if config["symmetrized_audit_boxes"] == 0:
        audit_frames = sets["dimers"]
    exports = {}
    for kind, symmetrize in (("plain", False), ("symmetrized", True)):
        path = directory / f"audited-{kind}.pt"
        msym.export_audited(
            checkpoint,
            path,
            audit_frames,
            symmetrize=symmetrize,
            grid_degree=config["symmetrize_degree"] if symmetrize else None,
            audit_grid=grid,
            outputs=["energy", "forces"],
        )
        exports[kind] = path

    # each evaluation of the averaged model is one per quadrature element: a few
    # molecules and dimers, and boxes only in the full run
    clusters = config["symmetrized_audit_clusters"]
    frames = sets["molecules"][:clusters] + sets["dimers"][:clusters]
    frames += sets["test"][: config["symmetrized_audit_boxes"]]
    report = {
        "grid_degree": config["symmetrize_degree"],
        "files": {
            kind: str(path.relative_to(output)) for kind, path in exports.items()
        },
        "n_structures": len(frames),
        "timing_structure": {
            "set": config["timing_set"],
            "n_atoms": len(sets[config["timing_set"]][0]),
        },
    }
    for kind, path in exports.items():
        result = msym.audit(
            path, frames, outputs=["energy", "forces"], max_lambda=1, grid=grid
        )
        report[kind] = {
            name: {
                "equivariance_rmse": result.summary["outputs"][name][
                    "equivariance_rmse"
                ]["mean"],
                "equivariance_rmse_max": result.summary["outputs"][name][
                    "equivariance_rmse"
                ]["max"],
            }
            for name in ("energy", "forces")
        }
        report[kind]["seconds_per_evaluation"] = _seconds_per_evaluation(
            path, sets[config["timing_set"]][0], config["timing_repeats"]
        )
    report["cost_ratio"] = (
        report["symmetrized"]["seconds_per_evaluation"]
        / report["plain"]["seconds_per_evaluation"]
    )
    return report
