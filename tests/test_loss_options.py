"""The options of the ``equivariance`` loss: defaults, and one-line errors that
name the option."""

import math
import re

import pytest

from metatrain_symmetry.loss_options import check_loss_options, check_options
from metatrain_symmetry.losses import EquivarianceLoss


@pytest.mark.parametrize(
    "options, message",
    [
        ({"gamma": -1.0}, "training.loss.energy.gamma"),
        ({"gamma": math.nan}, "training.loss.energy.gamma"),
        ({"n_rotations": 1}, "training.loss.energy.n_rotations"),
        ({"n_rotations": 2.5}, "training.loss.energy.n_rotations"),
        ({"base": "masked_mse"}, "training.loss.energy.base"),
        ({"sigma": 1.0}, "training.loss.energy.sigma"),
        ({"delta": 0.5}, "training.loss.energy.delta"),
        ({"base": "huber", "delta": -1.0}, "training.loss.energy.delta"),
        ({"method": "grids"}, "training.loss.energy.method"),
        (
            {"method": "generators", "n_rotations": 2},
            "training.loss.energy.n_rotations applies to method: rotations",
        ),
        (
            {"method": "generators", "directions": "some"},
            "training.loss.energy.directions must be one of all, random",
        ),
        (
            {"directions": "random"},
            "training.loss.energy.directions applies to method: generators",
        ),
        (
            {"method": "generators", "fraction": 0},
            "training.loss.energy.fraction must be a number in (0, 1]",
        ),
        (
            {"method": "generators", "fraction": 1.5},
            "training.loss.energy.fraction must be a number in (0, 1]",
        ),
        (
            {"method": "generators", "fraction": True},
            "training.loss.energy.fraction must be a number in (0, 1]",
        ),
        (
            {"fraction": 0.5},
            "training.loss.energy.fraction applies to method: generators",
        ),
    ],
)
def test_invalid_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_options({"type": "equivariance", **options}, "training.loss.energy")
    # the class checks the same (unknown keywords are Python's TypeError)
    with pytest.raises(
        (ValueError, TypeError),
        match="gamma|n_rotations|base|delta|sigma|method|directions|fraction",
    ):
        EquivarianceLoss("energy", None, 1.0, "mean", **options)


def test_defaults_and_nested_entries():
    assert check_options({"type": "equivariance"}, "x") == {
        "base": "mse",
        "gamma": 1.0,
        "n_rotations": 2,
        "method": "rotations",
        "directions": "all",
        "fraction": 1.0,
    }
    assert check_options({"base": "huber"}, "x")["delta"] == 1.0
    check_loss_options({"energy": "mse", "force": {"type": "mae"}})
    with pytest.raises(ValueError, match=r"training\.loss\.energy\.forces\.gamma"):
        check_loss_options(
            {"energy": {"forces": {"type": "equivariance", "gamma": -1}}}
        )
    with pytest.raises(
        ValueError, match=r"training\.loss\.energy\.gradients\.strain\.n_rotations"
    ):
        check_loss_options(
            {
                "energy": {
                    "gradients": {"strain": {"type": "equivariance", "n_rotations": 0}}
                }
            }
        )


def test_gradient_entries_accept_generators():
    checked = check_options(
        {"type": "equivariance", "method": "generators"}, "where", gradient=True
    )
    assert checked["method"] == "generators"
    check_loss_options(
        {"energy": {"forces": {"type": "equivariance", "method": "generators"}}}
    )
    with pytest.raises(ValueError, match=r"training\.loss\.energy\.forces\.n_rot"):
        check_loss_options(
            {
                "energy": {
                    "forces": {
                        "type": "equivariance",
                        "method": "generators",
                        "n_rotations": 3,
                    }
                }
            }
        )
