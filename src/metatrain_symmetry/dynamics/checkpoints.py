"""Checkpoints of a training run: loading them, their epochs, their architecture
and the outputs and features to follow by default."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from .._utils import first_line
from ..models import LoadedModel, load_model
from ..quantities import FEATURE_PREFIX


# metatrain's intermediate checkpoints are called ``model_<epoch>.ckpt``
_EPOCH_IN_NAME = re.compile(r"(?:^|[_\-.])(\d+)$")


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


def architecture_name(model: LoadedModel) -> str:
    """The architecture of a loaded model: the name of its module's class (the
    original one for a scripted module)."""
    module = model.module
    return getattr(module, "original_name", None) or type(module).__name__


def default_outputs(model: LoadedModel) -> list[str]:
    """The model's training targets among its outputs."""
    return [name for name in model.targets if name in model.outputs]


def requested_features(
    model: LoadedModel, features: Sequence[str] | str | None
) -> list[str]:
    """The internal features ``features`` names for ``model``: the layer features
    for ``None``, every feature for ``"all"``, else the names given."""
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


def checkpoint_epochs(
    paths: list[Path], stored: list[int | None]
) -> tuple[list[int], str]:
    """Epoch of each checkpoint and where it comes from (see
    :py:attr:`~metatrain_symmetry.TrainingDynamics.epoch_source`): the epochs
    ``stored`` in the checkpoints when none is ``None``, else the numbers ending the
    file names when all end with one, else the positions. Two checkpoints of one
    epoch are refused."""
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
