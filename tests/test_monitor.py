"""The validation monitor: ``L_lie`` of the structures it saw, against closed
forms on the linear model of the loss tests."""

import pytest
import torch

from metatrain_symmetry.generators import so3_generators
from metatrain_symmetry.losses import EquivarianceLoss, check_options
from metatrain_symmetry.monitor import MONITOR_STRUCTURES, ValidationMonitor

from .test_losses import ANISOTROPIC, LinearModel, make_systems, target_infos


def test_monitor_logs_the_squared_lie_derivative_of_what_it_saw():
    model = LinearModel(ANISOTROPIC).eval()
    systems = make_systems()
    name = "non_conservative_force"
    monitor = ValidationMonitor([name], n_structures=1)
    monitor.observe(model, systems, target_infos())
    monitor.observe(model, make_systems(seed=1), target_infos())  # already full
    values = monitor.pop()
    # L_k (D x) = [D, G_k] x on the atoms of the first structure only
    matrix = torch.tensor(ANISOTROPIC, dtype=torch.float64)
    x = systems[0].positions
    expected = (
        sum(
            (x @ (matrix @ g - g @ matrix).T).square().sum(dim=1)
            for g in so3_generators(torch.float64)
        ).mean()
        / 3
    )
    assert set(values) == {f"L_lie({name})"}
    assert abs(values[f"L_lie({name})"] / float(expected) - 1) < 1e-12
    # the model's mode is restored, no gradient is kept, and the structures are
    # forgotten once logged
    assert not model.training
    assert model.matrix.grad is None
    assert monitor.pop() == {}


@pytest.mark.parametrize(
    "monitor, message", [(-1, "must be true, false or"), ("yes", "must be true")]
)
def test_bad_monitor_options_name_the_option(monitor, message):
    with pytest.raises(ValueError, match=message):
        check_options({"monitor": monitor}, "training.loss.energy")
    with pytest.raises(ValueError, match="not its gradients"):
        EquivarianceLoss("energy", "positions", 1.0, "mean", monitor=True)


def test_monitor_option_values():
    assert check_options({"monitor": True}, "x")["monitor"] == MONITOR_STRUCTURES
    assert check_options({"monitor": 4}, "x")["monitor"] == 4
    assert EquivarianceLoss("energy", None, 1.0, "mean").monitor == 0
