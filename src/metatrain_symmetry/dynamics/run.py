"""The compute of the dynamics: :py:func:`training_dynamics` analyses every
checkpoint of a training run and stacks the spectra against the epoch."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import ase
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from ..data import check_close_atoms, close_atoms_reported
from ..diagnostics import DEFAULT_MAX_LAMBDA, AnalysisResult, analyze
from ..grid import O3Grid
from ..models import LoadedModel
from ..quantities import FEATURE_PREFIX
from ..systems import SystemLike, is_system
from .checkpoints import (
    architecture_name,
    checkpoint_epochs,
    default_outputs,
    load_checkpoint,
    requested_features,
)
from .result import WEIGHTS, TrainingDynamics


def training_dynamics(
    checkpoints: Sequence[str | os.PathLike],
    frames: Sequence[SystemLike],
    outputs: Sequence[str] | None = None,
    features: Sequence[str] | str | None = None,
    max_lambda: int = DEFAULT_MAX_LAMBDA,
    grid: O3Grid | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    weights: str = "epoch",
    dtype: torch.dtype | None = None,
    allow_close_atoms: bool = False,
) -> TrainingDynamics:
    """Spectra of outputs and internal features across training checkpoints.

    Every checkpoint is analysed with :py:func:`metatrain_symmetry.analyze` on the
    same structures and the same grid. Checkpoints are sorted by epoch: the epochs
    stored in the checkpoints when all store one, else the numbers ending the file
    names (``model_<epoch>.ckpt``) when all end with one, else the order given.

    :param checkpoints: metatrain checkpoints (``.ckpt``) of one training run, or
        exported models (``.pt``, outputs only); at least one
    :param frames: ``ase.Atoms`` or metatomic ``System`` objects
    :param outputs: output names; by default the model's training targets (or,
        when it does not say, its declared outputs without auxiliary ones)
    :param features: internal features (``"mtt::feature::<module path>"``), or
        ``"all"`` for every feature the model exposes; by default the node
        features after each message-passing layer (``gnn_layers.<i>_node`` for
        PET), none for exported models
    :param max_lambda: largest ``lambda`` of the spectra
    :param grid: integration grid, the same for every checkpoint; by default as in
        :py:func:`metatrain_symmetry.analyze`
    :param batch_size: rotated copies per model call
    :param progress: show a progress bar over the checkpoints
    :param weights: ``"epoch"`` analyses the weights a checkpoint was saved with
        (``model_state_dict``); ``"best"`` the best weights up to that epoch by
        validation error, which is what :py:func:`metatrain_symmetry.load_model`
        and ``mtt export`` use
    :param dtype: run every checkpoint in this precision (e.g. ``torch.float64``
        for a model trained in float32); by default its own
    :param allow_close_atoms: warn, instead of raising, on structures with atoms
        closer than :py:data:`~metatrain_symmetry.data.CLOSE_ATOMS_DISTANCE`
    :return: the spectra against epoch, see :py:class:`TrainingDynamics`
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {list(WEIGHTS)}, got '{weights}'")
    paths = _checkpoint_paths(checkpoints)
    frames = _frame_list(frames)
    check_close_atoms(frames, allow_close_atoms)
    # first pass: epochs and names, so that bad input fails before any analysis
    stored_epochs, names = _survey(paths, outputs, features, weights)
    paths, epochs, source = _in_epoch_order(paths, stored_epochs)
    load = partial(load_checkpoint, weights=weights, dtype=dtype)
    settings = {"max_lambda": max_lambda, "grid": grid, "batch_size": batch_size}
    results, model_features = _analyse_checkpoints(
        paths, frames, names, load, settings, progress
    )
    spectrum, structure_spectrum, rmse, errors = _stack_results(results, names, epochs)
    last = results[-1]
    final = dataclasses.replace(last, outputs=_layer_order(names, model_features))
    return TrainingDynamics(
        checkpoints=[str(path) for path in paths],
        epochs=epochs,
        epoch_source=source,
        names=names,
        spectrum=spectrum,
        structure_spectrum=structure_spectrum,
        equivariance_rmse=rmse,
        final=final,
        grid=last.grid,
        max_lambda=max_lambda,
        weights=weights,
        spectrum_error=errors,
    )


def _checkpoint_paths(checkpoints: Sequence[str | os.PathLike]) -> list[Path]:
    """The checkpoints as paths, refusing none and duplicates."""
    if isinstance(checkpoints, (str, os.PathLike)):
        checkpoints = [checkpoints]
    paths = [Path(path) for path in checkpoints]
    if len(paths) == 0:
        raise ValueError("no checkpoints given: pass at least one checkpoint")
    if len(set(path.resolve() for path in paths)) != len(paths):
        raise ValueError("a checkpoint is given more than once: pass each one once")
    return paths


def _frame_list(frames: Sequence[SystemLike]) -> list[SystemLike]:
    """The structures as a list, refusing none."""
    if is_system(frames) or isinstance(frames, ase.Atoms):
        frames = [frames]
    frames = list(frames)
    if len(frames) == 0:
        raise ValueError("no structures given: pass at least one structure")
    return frames


def _survey(
    paths: list[Path],
    outputs: Sequence[str] | None,
    features: Sequence[str] | str | None,
    weights: str,
) -> tuple[list[int | None], list[str]]:
    """Load every checkpoint once, without analysis: the epoch each stores and the
    names to analyse (chosen on the first), checking that all checkpoints hold the
    same architecture and every name."""
    stored_epochs = []
    names: list[str] | None = None
    architecture = None
    for path in paths:
        model, epoch = load_checkpoint(path, weights)
        stored_epochs.append(epoch)
        kind = architecture_name(model)
        if architecture is None:
            architecture = (kind, path)
        elif kind != architecture[0]:
            raise ValueError(
                f"checkpoint '{path}' holds a {kind} model but '{architecture[1]}' a "
                f"{architecture[0]}: pass the checkpoints of one training run "
                "(model_<epoch>.ckpt)"
            )
        if names is None:
            names = _requested_names(model, outputs, features)
        try:
            model.check_names(names)
        except ValueError as error:
            raise ValueError(f"checkpoint '{path}': {error}") from None
        del model
    return stored_epochs, names


def _requested_names(
    model: LoadedModel,
    outputs: Sequence[str] | None,
    features: Sequence[str] | str | None,
) -> list[str]:
    """The outputs, then the features, to analyse in ``model``; at least one, each
    once."""
    names = default_outputs(model) if outputs is None else list(outputs)
    names += requested_features(model, features)
    if len(names) == 0:
        raise ValueError("nothing to analyse: name outputs and/or features to follow")
    if len(set(names)) != len(names):
        raise ValueError(f"names are requested more than once: {names}")
    return names


def _in_epoch_order(
    paths: list[Path], stored_epochs: list[int | None]
) -> tuple[list[Path], list[int], str]:
    """The checkpoints sorted by epoch, their epochs and where these come from."""
    epochs, source = checkpoint_epochs(paths, stored_epochs)
    order = sorted(range(len(paths)), key=lambda index: epochs[index])
    if source == "order":
        order = list(range(len(paths)))
    paths = [paths[index] for index in order]
    epochs = [epochs[index] for index in order]
    return paths, epochs, source


def _analyse_checkpoints(
    paths: list[Path],
    frames: list[SystemLike],
    names: list[str],
    load: Callable,
    settings: dict,
    progress: bool,
) -> tuple[list[AnalysisResult], list[str]]:
    """Analyse every checkpoint on the grid of the first; the results keep only
    what the dynamics needs, except for the last checkpoint. Also returns the
    features of the last checkpoint's model, in the order it computes them.

    :param load: loads a checkpoint, see :py:func:`load_checkpoint`
    :param settings: ``max_lambda``, ``grid`` and ``batch_size`` of
        :py:func:`~metatrain_symmetry.analyze`
    """
    iterator = paths
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(paths, unit="checkpoint", desc="checkpoints")
    results: list[AnalysisResult] = []
    for path in iterator:
        model, _ = load(path)
        # the structures were checked once, before the first checkpoint
        with close_atoms_reported():
            result = analyze(model, frames, names, **settings, allow_close_atoms=True)
        settings = {**settings, "grid": result.grid}
        if len(results) > 0:
            # keep only what the dynamics needs of all but the last checkpoint
            previous = results[-1]
            results[-1] = dataclasses.replace(
                previous,
                character_projection={},
                average={},
                character_projection_error={},
            )
        results.append(result)
    return results, model.features


def _stack_results(
    results: list[AnalysisResult], names: list[str], epochs: list[int]
) -> tuple[
    dict[str, TensorMap],
    dict[str, TensorMap],
    dict[str, torch.Tensor],
    dict[str, torch.Tensor],
]:
    """For every name, the results of all checkpoints stacked against epoch: the
    dataset-mean and per-structure spectra, the equivariance RMSE and, on random
    grids, the standard errors of the mean spectrum."""
    spectrum, structure_spectrum, rmse, errors = {}, {}, {}, {}
    for name in names:
        spectrum[name], structure_spectrum[name] = _stack_spectra(
            [result.spectrum[name] for result in results], epochs
        )
        rmse[name] = torch.stack([result.equivariance_rmse(name) for result in results])
        if results[-1].estimated:
            errors[name] = torch.stack(
                [result.mean_spectrum(name)[1] for result in results]
            )
    return spectrum, structure_spectrum, rmse, errors


def _layer_order(names: list[str], model_features: list[str]) -> list[str]:
    """The features among ``names`` in the order the model computes them, then the
    outputs."""
    model_order = {name: index for index, name in enumerate(model_features)}
    layer_order = sorted(
        (name for name in names if name.startswith(FEATURE_PREFIX)),
        key=lambda name: model_order.get(name, len(model_order)),
    )
    layer_order += [name for name in names if not name.startswith(FEATURE_PREFIX)]
    return layer_order


def _stack_spectra(
    spectra: list[TensorMap], epochs: list[int]
) -> tuple[TensorMap, TensorMap]:
    """Stack per-checkpoint spectra: the dataset means with samples ``["epoch"]``
    and the per-structure spectra with samples ``["epoch", "system"]``."""
    properties = spectra[0].block().properties
    means = torch.stack([tensor.block().values.mean(dim=0) for tensor in spectra])
    mean = TensorMap(
        Labels.single(),
        [
            TensorBlock(
                values=means,
                samples=Labels(
                    ["epoch"], torch.tensor(epochs, dtype=torch.int32).reshape(-1, 1)
                ),
                components=[],
                properties=properties,
            )
        ],
    )
    samples = []
    for epoch, tensor in zip(epochs, spectra, strict=True):
        systems = tensor.block().samples.column("system").to(torch.int32)
        samples.append(torch.stack([torch.full_like(systems, epoch), systems], dim=1))
    per_structure = TensorMap(
        Labels.single(),
        [
            TensorBlock(
                values=torch.cat([tensor.block().values for tensor in spectra]),
                samples=Labels(["epoch", "system"], torch.cat(samples)),
                components=[],
                properties=properties,
            )
        ],
    )
    return mean, per_structure
