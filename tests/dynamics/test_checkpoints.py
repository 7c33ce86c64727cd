"""Checkpoints of a training run, in this process: loading them with the weights
asked for, their epochs, and the outputs and features followed by default."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import metatrain_symmetry as msym
from metatrain_symmetry.dynamics.checkpoints import (
    architecture_name,
    checkpoint_epochs,
    default_outputs,
    layer_features,
    load_checkpoint,
    requested_features,
)
from metatrain_symmetry.testing import tiny_pet


def paths(*names):
    return [Path("run") / name for name in names]


def test_epochs_stored_in_the_checkpoints_come_first():
    # the numbers of the file names are ignored when every checkpoint has one
    named = paths("model_9.ckpt", "model_8.ckpt", "model_7.ckpt")
    assert checkpoint_epochs(named, [2, 0, 1]) == ([2, 0, 1], "checkpoint")
    assert checkpoint_epochs(paths("a.ckpt", "b.ckpt"), [5, 3]) == (
        [5, 3],
        "checkpoint",
    )


def test_epochs_from_the_numbers_ending_the_file_names():
    names = paths("model_12.ckpt", "epoch-3.ckpt", "run.5.ckpt", "7.pt", "x_10_0.ckpt")
    expected = [12, 3, 5, 7, 0]
    assert checkpoint_epochs(names, [None] * 5) == (expected, "file name")
    # one checkpoint without a stored epoch is enough to read the names
    assert checkpoint_epochs(paths("model_4.ckpt", "model_6.ckpt"), [1, None]) == (
        [4, 6],
        "file name",
    )


@pytest.mark.parametrize(
    "names", [("model_1.ckpt", "final.ckpt"), ("model1.ckpt", "model_2.ckpt")]
)
def test_epochs_in_the_order_given_without_numbers(names):
    """A name without a number after ``_``, ``-`` or ``.`` numbers all the
    checkpoints in the order given, whatever the others and the stored epochs
    say."""
    epochs, source = checkpoint_epochs(paths(*names, "model_1.ckpt"), [3, None, 3])
    assert (epochs, source) == ([0, 1, 2], "order")


def test_one_epoch_twice_is_refused():
    with pytest.raises(ValueError) as error:
        checkpoint_epochs(paths("a.ckpt", "b.ckpt", "c.ckpt"), [1, 2, 1])
    assert str(error.value) == (
        f"checkpoints '{Path('run/a.ckpt')}' and '{Path('run/c.ckpt')}' are both "
        "from epoch 1 (read from the checkpoint); pass one checkpoint per epoch"
    )
    with pytest.raises(ValueError) as error:
        checkpoint_epochs(paths("model_2.ckpt", "best_2.ckpt"), [None, None])
    assert str(error.value) == (
        f"checkpoints '{Path('run/model_2.ckpt')}' and '{Path('run/best_2.ckpt')}' "
        "are both from epoch 2 (read from the file name); pass one checkpoint per "
        "epoch"
    )


def assert_weights_of(model, pet):
    """``model`` (loaded) has the parameters of ``pet``."""
    loaded = dict(model.module.named_parameters())
    expected = dict(pet.named_parameters())
    assert sorted(loaded) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name


def test_load_checkpoint_with_the_weights_asked_for(tmp_path):
    """The weights saved at the checkpoint's epoch (``model_state_dict``) or the
    best ones so far (``best_model_state_dict``), and the stored epoch as an
    int."""
    last, best = tiny_pet(seed=1), tiny_pet(seed=2)
    assert not torch.equal(*(next(pet.parameters()) for pet in (last, best)))
    checkpoint = last.get_checkpoint()
    checkpoint["best_model_state_dict"] = best.get_checkpoint()["model_state_dict"]
    checkpoint["epoch"] = np.int64(4)
    path = tmp_path / "model_4.ckpt"
    torch.save(checkpoint, path)

    model, epoch = load_checkpoint(path)
    assert epoch == 4 and type(epoch) is int
    assert model.source == str(path)
    assert architecture_name(model) == type(last).__name__ == "PET"
    assert_weights_of(model, last)
    assert next(model.module.parameters()).dtype == torch.float64

    model, epoch = load_checkpoint(path, weights="best", dtype=torch.float32)
    assert epoch == 4
    assert model.source == str(path)
    assert next(model.module.parameters()).dtype == torch.float32
    assert_weights_of(model, best.to(torch.float32))

    # metatrain's checkpoints of a model that was never trained store no epoch
    torch.save(tiny_pet().get_checkpoint(), tmp_path / "untrained.ckpt")
    model, epoch = load_checkpoint(tmp_path / "untrained.ckpt")
    assert epoch is None
    assert_weights_of(model, tiny_pet())


def test_load_exported_model(tmp_path):
    """An exported model has no epoch; its scripted module keeps the name of
    its architecture."""
    path = tmp_path / "model.pt"
    tiny_pet().export().save(str(path))
    model, epoch = load_checkpoint(path, weights="best")
    assert epoch is None
    assert type(model.module).__name__ != "PET"
    assert architecture_name(model) == "PET"
    assert default_outputs(model) == ["energy", "non_conservative_force"]
    model, _ = load_checkpoint(str(path), dtype=torch.float32)
    assert model.dtype == torch.float32


def bad_checkpoints(directory: Path) -> list[tuple[Path, type, str]]:
    """Files in ``directory`` that are not metatrain checkpoints, with the
    error and message of :py:func:`load_checkpoint` on each."""
    from metatrain.utils.io import model_from_checkpoint

    text = directory / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(Exception) as unreadable:
        torch.load(text, weights_only=False)
    listing = directory / "list.ckpt"
    torch.save([1, 2], listing)
    unnamed = directory / "unnamed.ckpt"
    torch.save({"model_state_dict": {}}, unnamed)
    broken = directory / "broken.ckpt"
    torch.save({"architecture_name": "pet", "epoch": 1}, broken)
    with pytest.raises(Exception) as unbuildable:
        model_from_checkpoint({"architecture_name": "pet", "epoch": 1}, "restart")
    (directory / "folder.ckpt").mkdir()
    no_architecture = (
        "is not a metatrain model checkpoint (no architecture_name); pass the "
        "model_<epoch>.ckpt files written by 'mtt train'"
    )

    def reason(error):
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"

    return [
        (
            directory / "missing.ckpt",
            FileNotFoundError,
            f"checkpoint '{directory / 'missing.ckpt'}' does not exist",
        ),
        (
            directory / "folder.ckpt",
            ValueError,
            f"'{directory / 'folder.ckpt'}' is a directory, not a checkpoint",
        ),
        (
            text,
            ValueError,
            f"could not read '{text}' as a metatrain checkpoint or an exported "
            f"model ({reason(unreadable.value)})",
        ),
        (listing, ValueError, f"'{listing}' {no_architecture}"),
        (unnamed, ValueError, f"'{unnamed}' {no_architecture}"),
        (
            broken,
            ValueError,
            f"could not build a model from checkpoint '{broken}' "
            f"({reason(unbuildable.value)})",
        ),
    ]


def test_load_checkpoint_refuses_other_files(tmp_path):
    for path, kind, message in bad_checkpoints(tmp_path):
        with pytest.raises(kind) as error:
            load_checkpoint(path)
        assert str(error.value) == message
        assert error.value.__cause__ is None


def test_errors_without_details(tmp_path, monkeypatch):
    """Errors without a message, from reading the file or building the model,
    are reported with their type."""
    import metatrain.utils.io

    def fail(*args, **kwargs):
        raise RuntimeError()

    path = tmp_path / "model.ckpt"
    torch.save(tiny_pet().get_checkpoint(), path)
    monkeypatch.setattr(metatrain.utils.io, "model_from_checkpoint", fail)
    with pytest.raises(ValueError) as error:
        load_checkpoint(path)
    assert str(error.value) == (
        f"could not build a model from checkpoint '{path}' (RuntimeError: no details)"
    )
    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(ValueError) as error:
        load_checkpoint(path)
    assert str(error.value) == (
        f"could not read '{path}' as a metatrain checkpoint or an exported model "
        "(RuntimeError: no details)"
    )


def test_default_outputs_are_the_training_targets_among_the_outputs():
    model = SimpleNamespace(
        targets={"energy": 1, "mtt::dipole": 2, "forces": 3},
        outputs={"forces": 0, "mtt::aux::x": 0, "energy": 0},
    )
    assert default_outputs(model) == ["energy", "forces"]
    assert default_outputs(msym.load_model(tiny_pet())) == [
        "energy",
        "non_conservative_force",
    ]


FEATURES = [
    "mtt::feature::gnn_layers.0.trans_node",
    "mtt::feature::gnn_layers.0_node",
    "mtt::feature::gnn_layers.0_edge",
    "mtt::feature::other.gnn_layers.1_node",
    "gnn_layers.1_node",
    "mtt::feature::gnn_layers_post_mp_node.1",
    "mtt::feature::gnn_layers.1_node",
    "mtt::feature::gnn_layers.1_nodes",
]
LAYERS = ["mtt::feature::gnn_layers.0_node", "mtt::feature::gnn_layers.1_node"]


def test_layer_features_are_the_node_features_of_each_layer():
    assert layer_features(SimpleNamespace(features=FEATURES)) == LAYERS
    assert layer_features(msym.load_model(tiny_pet())) == LAYERS
    assert layer_features(SimpleNamespace(features=["mtt::feature::x"])) == []


def test_requested_features():
    model = SimpleNamespace(features=FEATURES)
    assert requested_features(model, None) == LAYERS
    assert requested_features(model, "all") == FEATURES
    assert requested_features(model, ["all"]) == FEATURES
    assert requested_features(model, "mtt::feature::x") == ["mtt::feature::x"]
    chosen = requested_features(model, ("mtt::feature::b", "mtt::feature::a"))
    assert chosen == ["mtt::feature::b", "mtt::feature::a"]
    assert requested_features(model, []) == []
    # "all" among other names is a name like the others
    assert requested_features(model, ["all", "mtt::feature::a"]) == [
        "all",
        "mtt::feature::a",
    ]
