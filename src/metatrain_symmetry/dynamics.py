"""How the symmetry of outputs and internal features evolves during training.

:py:func:`training_dynamics` analyses a series of checkpoints of one training run
(for example the ``model_<epoch>.ckpt`` files that ``mtt train`` writes every
``checkpoint_interval`` epochs) on the same structures and the same O(3) grid, and
collects the normalized ``(lambda, sigma)`` spectrum of every requested output and
feature against the epoch. :py:func:`plot_dynamics` draws them as epoch x lambda
heatmaps, :py:func:`plot_layers` the spectra of the features of the last
checkpoint layer by layer.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ase
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from ._utils import first_line
from .diagnostics import AnalysisResult, analyze
from .grid import O3Grid
from .irreps import irrep_name, spectrum_irreps
from .models import LoadedModel, load_model
from .quantities import FEATURE_PREFIX
from .systems import SystemLike, is_system


EPOCH_SOURCES = ("checkpoint", "file name", "order")
WEIGHTS = ("epoch", "best")

# metatrain's intermediate checkpoints are called ``model_<epoch>.ckpt``
_EPOCH_IN_NAME = re.compile(r"(?:^|[_\-.])(\d+)$")


@dataclass
class TrainingDynamics:
    """Spectra of outputs and internal features across the checkpoints of a
    training run, one entry per output or feature name.

    Checkpoints are sorted by epoch when their epochs are known.
    """

    checkpoints: list[str]
    """paths of the checkpoints, in epoch order"""
    epochs: list[int]
    """epoch of each checkpoint (metatrain counts epochs from 0)"""
    epoch_source: str
    """where the epochs come from: ``"checkpoint"`` (the ``epoch`` that metatrain
    stores in the checkpoint), ``"file name"`` (``model_<epoch>.ckpt``) or
    ``"order"`` (position in the list of checkpoints given)"""
    names: list[str]
    """analysed outputs, then internal features in the order the model computes
    them"""
    spectrum: dict[str, TensorMap]
    """dataset-mean normalized spectrum: one block, samples ``["epoch"]``,
    properties ``["chi_lambda", "chi_sigma"]``"""
    structure_spectrum: dict[str, TensorMap]
    """per-structure normalized spectrum: one block, samples
    ``["epoch", "system"]``, properties ``["chi_lambda", "chi_sigma"]``"""
    equivariance_rmse: dict[str, torch.Tensor]
    """per-structure equivariance RMSE, ``(n_checkpoints, n_structures)``, in the
    units of the output"""
    final: AnalysisResult
    """complete analysis of the last checkpoint, with the internal features first
    (in the order the model computes them) and the outputs after them: the
    layer-by-layer view"""
    grid: O3Grid
    """integration grid used for every checkpoint"""
    max_lambda: int
    """largest ``lambda`` of the spectra"""
    weights: str = "epoch"
    """which weights of each checkpoint were analysed: ``"epoch"`` (the weights at
    the end of that epoch) or ``"best"`` (the best weights so far)"""
    spectrum_error: dict[str, torch.Tensor] = field(default_factory=dict)
    """on a random grid, the standard error of each value of ``spectrum``,
    ``(n_checkpoints, n_irreps)`` ordered as its properties; empty on exact
    grids"""

    def spectrum_array(self, name: str) -> torch.Tensor:
        """Dataset-mean spectrum of ``name`` as a ``(n_checkpoints, max_lambda + 1,
        2)`` tensor; the last axis is ``sigma = +1, -1``."""
        values = self.spectrum[name].block().values
        return values.reshape(len(self.epochs), self.max_lambda + 1, 2)


def training_dynamics(
    checkpoints: Sequence[str | os.PathLike],
    frames: Sequence[SystemLike],
    outputs: Sequence[str] | None = None,
    features: Sequence[str] | str | None = None,
    max_lambda: int = 4,
    grid: O3Grid | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    weights: str = "epoch",
    dtype: torch.dtype | None = None,
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
    :return: the spectra against epoch, see :py:class:`TrainingDynamics`
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {list(WEIGHTS)}, got '{weights}'")
    if isinstance(checkpoints, (str, os.PathLike)):
        checkpoints = [checkpoints]
    paths = [Path(path) for path in checkpoints]
    if len(paths) == 0:
        raise ValueError("no checkpoints given: pass at least one checkpoint")
    if len(set(path.resolve() for path in paths)) != len(paths):
        raise ValueError("a checkpoint is given more than once: pass each one once")
    if is_system(frames) or isinstance(frames, ase.Atoms):
        frames = [frames]
    frames = list(frames)
    if len(frames) == 0:
        raise ValueError("no structures given: pass at least one structure")

    # first pass: epochs and names, so that bad input fails before any analysis
    stored_epochs = []
    names: list[str] | None = None
    architecture = None
    for path in paths:
        model, epoch = load_checkpoint(path, weights)
        stored_epochs.append(epoch)
        kind = _architecture(model)
        if architecture is None:
            architecture = (kind, path)
        elif kind != architecture[0]:
            raise ValueError(
                f"checkpoint '{path}' holds a {kind} model but '{architecture[1]}' a "
                f"{architecture[0]}: pass the checkpoints of one training run "
                "(model_<epoch>.ckpt)"
            )
        if names is None:
            names = _default_outputs(model) if outputs is None else list(outputs)
            names += _features(model, features)
            if len(names) == 0:
                raise ValueError(
                    "nothing to analyse: name outputs and/or features to follow"
                )
            if len(set(names)) != len(names):
                raise ValueError(f"names are requested more than once: {names}")
        try:
            model.check_names(names)
        except ValueError as error:
            raise ValueError(f"checkpoint '{path}': {error}") from None
        del model

    epochs, source = _epochs(paths, stored_epochs)
    order = sorted(range(len(paths)), key=lambda index: epochs[index])
    if source == "order":
        order = list(range(len(paths)))
    paths = [paths[index] for index in order]
    epochs = [epochs[index] for index in order]

    iterator = paths
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(paths, unit="checkpoint", desc="checkpoints")
    results: list[AnalysisResult] = []
    for path in iterator:
        model, _ = load_checkpoint(path, weights, dtype)
        result = analyze(
            model,
            frames,
            names,
            max_lambda=max_lambda,
            grid=grid,
            batch_size=batch_size,
        )
        grid = result.grid
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
    last = results[-1]
    model_order = {name: index for index, name in enumerate(model.features)}
    layer_order = sorted(
        (name for name in names if name.startswith(FEATURE_PREFIX)),
        key=lambda name: model_order.get(name, len(model_order)),
    )
    layer_order += [name for name in names if not name.startswith(FEATURE_PREFIX)]
    final = dataclasses.replace(last, outputs=layer_order)
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


def load_checkpoint(
    path: str | os.PathLike, weights: str = "epoch", dtype: torch.dtype | None = None
) -> tuple[LoadedModel, int | None]:
    """Load one checkpoint of a training run for analysis.

    :param path: metatrain checkpoint (``.ckpt``) or exported model (``.pt``)
    :param weights: ``"epoch"`` for the weights the checkpoint was saved with,
        ``"best"`` for the best weights so far (see :py:func:`training_dynamics`)
    :param dtype: convert the model to this precision
    :return: the model and the epoch metatrain stored in the checkpoint (``None``
        for exported models and checkpoints that store none)
    """
    from metatrain.utils.io import is_exported_file, model_from_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if path.is_dir():
        raise ValueError(f"'{path}' is a directory, not a checkpoint")
    try:
        exported = is_exported_file(str(path))
    except Exception:
        exported = False
    if exported:
        return load_model(path, dtype=dtype), None
    try:
        checkpoint = torch.load(str(path), weights_only=False, map_location="cpu")
    except Exception as error:
        raise ValueError(
            f"could not read '{path}' as a metatrain checkpoint or an exported model "
            f"({type(error).__name__}: {first_line(error, 'no details')})"
        ) from None
    if not isinstance(checkpoint, dict) or "architecture_name" not in checkpoint:
        raise ValueError(
            f"'{path}' is not a metatrain model checkpoint (no architecture_name); "
            "pass the model_<epoch>.ckpt files written by 'mtt train'"
        )
    epoch = checkpoint.get("epoch")
    context = "restart" if weights == "epoch" else "export"
    try:
        module = model_from_checkpoint(checkpoint, context=context)
    except Exception as error:
        raise ValueError(
            f"could not build a model from checkpoint '{path}' "
            f"({type(error).__name__}: {first_line(error, 'no details')})"
        ) from None
    model = load_model(module, dtype=dtype)
    model.source = str(path)
    return model, None if epoch is None else int(epoch)


def _architecture(model: LoadedModel) -> str:
    module = model.module
    return getattr(module, "original_name", None) or type(module).__name__


def _default_outputs(model: LoadedModel) -> list[str]:
    return [name for name in model.targets if name in model.outputs]


def _features(model: LoadedModel, features: Sequence[str] | str | None) -> list[str]:
    if features is None:
        return layer_features(model)
    if isinstance(features, str):
        if features == "all":
            return model.features
        features = [features]
    features = list(features)
    if features == ["all"]:
        return model.features
    return features


def layer_features(model: LoadedModel) -> list[str]:
    """The node features after each message-passing layer, in model order
    (``mtt::feature::gnn_layers.<i>_node`` for metatrain's PET); empty for models
    that expose no internal features."""
    return [
        name
        for name in model.features
        if name.startswith(FEATURE_PREFIX + "gnn_layers.")
        and name.endswith("_node")
        and name.count(".") == 1
    ]


def _epochs(paths: list[Path], stored: list[int | None]) -> tuple[list[int], str]:
    if all(epoch is not None for epoch in stored):
        epochs, source = list(stored), "checkpoint"
    else:
        matches = [_EPOCH_IN_NAME.search(path.stem) for path in paths]
        if all(match is not None for match in matches):
            epochs, source = [int(match.group(1)) for match in matches], "file name"
        else:
            return list(range(len(paths))), "order"
    seen: dict[int, Path] = {}
    for path, epoch in zip(paths, epochs, strict=True):
        if epoch in seen:
            raise ValueError(
                f"checkpoints '{seen[epoch]}' and '{path}' are both from epoch "
                f"{epoch} (read from the {source}); pass one checkpoint per epoch"
            )
        seen[epoch] = path
    return epochs, source


def _stack_spectra(
    spectra: list[TensorMap], epochs: list[int]
) -> tuple[TensorMap, TensorMap]:
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


# ----------------------------------------------------------------------- output
def short_name(name: str) -> str:
    """A name without the ``mtt::feature::`` prefix, for plots and tables."""
    return name[len(FEATURE_PREFIX) :] if name.startswith(FEATURE_PREFIX) else name


def plot_dynamics(dynamics: TrainingDynamics, path: str | os.PathLike) -> None:
    """Heatmaps of the dataset-mean spectra against epoch: one row per output or
    feature, one column per ``sigma``; x is the epoch (checkpoint by checkpoint),
    y is ``lambda``, the colour the spectral weight on a log scale. On a random
    grid, cells within two standard errors of zero are hatched."""
    import matplotlib

    from .report import hatch_unresolved

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    n_rows = len(dynamics.names)
    n_epochs = len(dynamics.epochs)
    fig, axes = plt.subplots(
        n_rows,
        2,
        figsize=(2 * max(3.0, 0.25 * n_epochs + 1.5) + 1.2, 1.9 * n_rows + 0.6),
        squeeze=False,
        sharex=True,
        sharey=True,
        layout="constrained",
    )
    norm = LogNorm(vmin=1e-8, vmax=1.0)
    ticks = list(range(0, n_epochs, max(1, n_epochs // 8)))
    image = None
    for row, name in enumerate(dynamics.names):
        spectrum = dynamics.spectrum_array(name).numpy()
        errors = None
        if name in dynamics.spectrum_error:
            errors = dynamics.spectrum_error[name].reshape(spectrum.shape).numpy()
        for column, sigma in enumerate((1, -1)):
            axis = axes[row, column]
            image = axis.imshow(
                spectrum[:, :, column].T.clip(min=1e-8),
                origin="lower",
                aspect="auto",
                cmap="viridis",
                norm=norm,
                interpolation="nearest",
            )
            if errors is not None:
                hatch_unresolved(axis, spectrum[:, :, column].T, errors[:, :, column].T)
            axis.set_title(
                f"{short_name(name)}, sigma = {'+1' if sigma == 1 else '-1'}",
                fontsize=9,
            )
            axis.set_yticks(range(dynamics.max_lambda + 1))
            axis.set_xticks(ticks, [str(dynamics.epochs[i]) for i in ticks])
            if column == 0:
                axis.set_ylabel("lambda")
            if row == n_rows - 1:
                axis.set_xlabel(
                    "epoch" if dynamics.epoch_source != "order" else "checkpoint"
                )
    if dynamics.spectrum_error:
        fig.suptitle(
            f"estimated from {len(dynamics.grid)} random elements; hatched: within "
            "2 standard errors of zero",
            fontsize=9,
        )
    fig.colorbar(image, ax=axes, label="mean normalized spectrum", shrink=0.9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layers(dynamics: TrainingDynamics, path: str | os.PathLike) -> None:
    """Heatmap of the last checkpoint's spectra, features layer by layer in model
    order and then the outputs (one row each), against ``(lambda, sigma)``."""
    from .report import plot_spectra

    label = f"epoch {dynamics.epochs[-1]}"
    if dynamics.epoch_source == "order":
        label = Path(dynamics.checkpoints[-1]).name
    plot_spectra({label: dynamics.final}, Path(path))


def _irrep_labels(max_lambda: int) -> list[str]:
    return [irrep_name(lam, sigma) for lam, sigma in spectrum_irreps(max_lambda)]


def dynamics_csv(dynamics: TrainingDynamics) -> str:
    """One line per output or feature and checkpoint: epoch, checkpoint, mean
    equivariance RMSE and the dataset-mean spectrum."""
    header = ["name", "epoch", "checkpoint", "equivariance_rmse_mean"]
    header += [
        f"b_{lam}_{'p' if sigma == 1 else 'm'}"
        for lam, sigma in spectrum_irreps(dynamics.max_lambda)
    ]
    lines = [",".join(header)]
    for name in dynamics.names:
        values = dynamics.spectrum[name].block().values
        rmse = dynamics.equivariance_rmse[name].mean(dim=1)
        for index, epoch in enumerate(dynamics.epochs):
            checkpoint = dynamics.checkpoints[index].replace('"', '""')
            row = [name, str(epoch), f'"{checkpoint}"', f"{float(rmse[index]):.6e}"]
            row += [f"{float(value):.6e}" for value in values[index]]
            lines.append(",".join(row))
    return "\n".join(lines) + "\n"


def dynamics_markdown(dynamics: TrainingDynamics) -> str:
    """Markdown summary: one table per output or feature, one row per epoch."""
    source = {
        "checkpoint": "stored in the checkpoints",
        "file name": "read from the file names",
        "order": "unknown: checkpoints are numbered in the order given",
    }[dynamics.epoch_source]
    if dynamics.grid.degree is None:
        grid = f"{len(dynamics.grid)} Haar-random O(3) elements (estimates)"
    else:
        grid = (
            f"O3Grid of degree {dynamics.grid.degree} ({len(dynamics.grid)} elements)"
        )
    lines = [
        "# Symmetry across training",
        "",
        f"{len(dynamics.checkpoints)} checkpoints ({dynamics.weights} weights), "
        f"epochs {source}; {grid}. Spectra are dataset means; the "
        "equivariance RMSE is in the output's units.",
        "",
    ]
    labels = _irrep_labels(dynamics.max_lambda)
    for name in dynamics.names:
        values = dynamics.spectrum[name].block().values
        rmse = dynamics.equivariance_rmse[name].mean(dim=1)
        lines += [
            f"## `{name}`",
            "",
            "| epoch | equivariance RMSE | " + " | ".join(labels) + " |",
            "|---|---|" + "---|" * len(labels),
        ]
        for index, epoch in enumerate(dynamics.epochs):
            lines.append(
                f"| {epoch} | {float(rmse[index]):.3e} | "
                + " | ".join(f"{float(v):.4f}" for v in values[index])
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def save_dynamics(dynamics: TrainingDynamics, directory: str | os.PathLike) -> None:
    """Write ``<name>.dynamics.mts`` (dataset-mean spectra against epoch),
    ``<name>.dynamics_per_structure.mts``, ``dynamics.csv``, ``dynamics.md``,
    ``dynamics.png`` and ``layers.png`` into an existing ``directory``."""
    import metatensor.torch as mts

    from .report import file_stem

    directory = Path(directory)
    for name in dynamics.names:
        stem = file_stem(name)
        mts.save(str(directory / f"{stem}.dynamics.mts"), dynamics.spectrum[name])
        mts.save(
            str(directory / f"{stem}.dynamics_per_structure.mts"),
            dynamics.structure_spectrum[name],
        )
    (directory / "dynamics.csv").write_text(dynamics_csv(dynamics))
    (directory / "dynamics.md").write_text(dynamics_markdown(dynamics))
    plot_dynamics(dynamics, directory / "dynamics.png")
    plot_layers(dynamics, directory / "layers.png")
