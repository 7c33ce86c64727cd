"""The equivariance loss as an ordinary metatrain loss, without any patching: exact
reduction to the base loss at gamma = 0, L_sigma against closed-form equivariance
errors of hand-written models, and option validation."""

import math

import pytest
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelOutput, System
from metatrain.utils.data.target_info import (
    get_energy_target_info,
    get_generic_target_info,
)
from metatrain.utils.loss import TensorMapHuberLoss, TensorMapMSELoss

from metatrain_symmetry.lie_predictions import random_directions
from metatrain_symmetry.losses import EquivarianceLoss, PenaltyContext, TrainingStep
from metatrain_symmetry.rotated_predictions import predictions_in_loss_units
from tests.helpers import NoForwardMode


class LinearModel(torch.nn.Module):
    """Outputs built from positions with a learnable 3x3 matrix ``D``:

    - ``energy``: ``sum_i x_i . D x_i / 2`` (conservative forces ``-D_sym x_i``)
    - ``mtt::shift``: ``(D sum_i x_i)_z``, per structure
    - ``non_conservative_force``: ``D x_i`` per atom, a Cartesian vector
    - ``mtt::spherical``: ``D x_i`` as a (1, +1) spherical block (order y, z, x)

    With ``D`` proportional to the identity every output is exactly equivariant
    (``mtt::shift`` excepted); otherwise the equivariance errors are known in
    closed form.
    """

    def __init__(self, matrix):
        super().__init__()
        self.matrix = torch.nn.Parameter(torch.as_tensor(matrix, dtype=torch.float64))

    def supported_outputs(self):
        return {
            "energy": ModelOutput(quantity="energy", unit="eV", sample_kind="system"),
            "mtt::shift": ModelOutput(sample_kind="system"),
            "non_conservative_force": ModelOutput(sample_kind="atom"),
            "mtt::spherical": ModelOutput(sample_kind="atom"),
        }

    def forward(self, systems, outputs, selected_atoms=None):
        results = {}
        positions = [system.positions for system in systems]
        n_atoms = [len(p) for p in positions]
        system_index = torch.repeat_interleave(
            torch.arange(len(systems)), torch.tensor(n_atoms)
        )
        atom_index = torch.cat([torch.arange(n) for n in n_atoms])
        atom_samples = Labels(
            ["system", "atom"], torch.stack([system_index, atom_index], dim=1).int()
        )
        system_samples = Labels(
            ["system"], torch.arange(len(systems)).reshape(-1, 1).int()
        )
        xyz = Labels(["xyz"], torch.arange(3).reshape(-1, 1).int())
        single = Labels(["_"], torch.tensor([[0]], dtype=torch.int32))
        vectors = torch.cat(positions) @ self.matrix.T
        if "energy" in outputs:
            values = torch.stack(
                [0.5 * (p * (p @ self.matrix.T)).sum() for p in positions]
            )
            block = TensorBlock(
                values.reshape(-1, 1),
                system_samples,
                [],
                Labels(["energy"], torch.tensor([[0]], dtype=torch.int32)),
            )
            results["energy"] = TensorMap(single, [block])
        if "mtt::shift" in outputs:
            values = torch.stack([(self.matrix @ p.sum(dim=0))[2] for p in positions])
            block = TensorBlock(
                values.reshape(-1, 1), system_samples, [], Labels.range("p", 1)
            )
            results["mtt::shift"] = TensorMap(single, [block])
        if "non_conservative_force" in outputs:
            block = TensorBlock(
                vectors.unsqueeze(-1), atom_samples, [xyz], Labels.range("p", 1)
            )
            results["non_conservative_force"] = TensorMap(single, [block])
        if "mtt::spherical" in outputs:
            block = TensorBlock(
                vectors[:, [1, 2, 0]].unsqueeze(-1),
                atom_samples,
                [Labels(["o3_mu"], torch.arange(-1, 2).reshape(-1, 1).int())],
                Labels.range("p", 1),
            )
            keys = Labels(
                ["o3_lambda", "o3_sigma"], torch.tensor([[1, 1]], dtype=torch.int32)
            )
            results["mtt::spherical"] = TensorMap(keys, [block])
        return results


ANISOTROPIC = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]]


def target_infos(energy_gradients=()):
    energy = get_energy_target_info(
        "energy",
        {"quantity": "energy", "unit": "eV"},
        add_position_gradients="positions" in energy_gradients,
        add_strain_gradients="strain" in energy_gradients,
    )
    force = get_generic_target_info(
        "non_conservative_force",
        {
            "quantity": "force",
            "unit": "eV/A",
            "type": {"cartesian": {"rank": 1}},
            "num_subtargets": 1,
            "sample_kind": "atom",
        },
    )
    shift = get_generic_target_info(
        "mtt::shift",
        {
            "quantity": "",
            "unit": "",
            "type": "scalar",
            "num_subtargets": 1,
            "sample_kind": "system",
        },
    )
    spherical = get_generic_target_info(
        "mtt::spherical",
        {
            "quantity": "",
            "unit": "",
            "type": {"spherical": {"irreps": [{"o3_lambda": 1, "o3_sigma": 1}]}},
            "num_subtargets": 1,
            "sample_kind": "atom",
        },
    )
    return {
        "energy": energy,
        "non_conservative_force": force,
        "mtt::shift": shift,
        "mtt::spherical": spherical,
    }


def make_systems(seed=0, sizes=(3, 5)):
    generator = torch.Generator().manual_seed(seed)
    systems = []
    for n_atoms in sizes:
        positions = torch.randn(n_atoms, 3, generator=generator, dtype=torch.float64)
        systems.append(
            System(
                types=torch.ones(n_atoms, dtype=torch.int32),
                positions=positions + 0.5,
                cell=torch.zeros(3, 3, dtype=torch.float64),
                pbc=torch.zeros(3, dtype=torch.bool),
            )
        )
    return systems


def penalty_for(
    name,
    matrix,
    n_rotations=None,
    gradient=None,
    per_structure=(),
    method="rotations",
    directions=None,
):
    model = LinearModel(matrix)
    systems = make_systems()
    infos = target_infos(() if gradient is None else (gradient,))
    context = PenaltyContext(seed=1)
    loss = EquivarianceLoss(
        name,
        gradient,
        1.0,
        "mean",
        n_rotations=n_rotations,
        method=method,
        context=context,
        directions=directions,
    )
    context.step = TrainingStep(
        model, systems, {name: infos[name]}, list(per_structure)
    )
    return loss.penalty(), model, systems


def assert_same_penalty(penalty, expected, model, matrix) -> None:
    """``penalty`` and its gradient with respect to the model's matrix are those
    of the closed form ``expected`` of ``matrix``, which is not zero."""
    assert float(expected.detach()) > 1e-3
    assert torch.allclose(penalty, expected, rtol=1e-12, atol=0)
    penalty.backward()
    expected.backward()
    assert torch.allclose(model.matrix.grad, matrix.grad, rtol=1e-12, atol=1e-14)


def random_tensor_map(seed, n=6):
    generator = torch.Generator().manual_seed(seed)
    block = TensorBlock(
        torch.randn(n, 3, 1, generator=generator, dtype=torch.float64),
        Labels(
            ["system", "atom"], torch.stack([torch.zeros(n), torch.arange(n)], 1).int()
        ),
        [Labels(["xyz"], torch.arange(3).reshape(-1, 1).int())],
        Labels.range("p", 1),
    )
    return TensorMap(Labels(["_"], torch.tensor([[0]], dtype=torch.int32)), [block])


@pytest.mark.parametrize(
    "base, reference",
    [
        ("mse", TensorMapMSELoss("force", None, 1.0, "mean")),
        ("huber", TensorMapHuberLoss("force", None, 1.0, "mean", delta=1.0)),
    ],
)
def test_gamma_zero_is_the_base_loss(base, reference):
    predictions = {"force": random_tensor_map(0)}
    targets = {"force": random_tensor_map(1)}
    context = PenaltyContext()

    class Exploding(torch.nn.Module):
        def forward(self, *args):
            raise AssertionError("gamma = 0 must not evaluate the model")

    context.step = TrainingStep(Exploding(), make_systems(), {})
    loss = EquivarianceLoss("force", None, 1.0, "mean", base=base, gamma=0.0)
    loss.context = context
    expected = reference.compute(predictions, targets)
    assert torch.equal(loss.compute(predictions, targets), expected)


def test_without_a_training_step_the_loss_is_the_base_loss():
    predictions = {"force": random_tensor_map(0)}
    targets = {"force": random_tensor_map(1)}
    loss = EquivarianceLoss("force", None, 1.0, "mean", gamma=5.0)
    reference = TensorMapMSELoss("force", None, 1.0, "mean")
    assert torch.equal(
        loss.compute(predictions, targets), reference.compute(predictions, targets)
    )


@pytest.mark.parametrize("method", ["rotations", "generators"])
@pytest.mark.parametrize("name", ["non_conservative_force", "mtt::spherical", "energy"])
def test_exactly_equivariant_outputs_have_no_penalty(name, method):
    n_rotations = 3 if method == "rotations" else None
    penalty, _, _ = penalty_for(name, 1.7 * torch.eye(3), n_rotations, method=method)
    assert abs(float(penalty.detach())) < 1e-24


def generators():
    from metatrain_symmetry.generators import so3_generators

    return so3_generators(torch.float64)


@pytest.mark.parametrize("name", ["non_conservative_force", "mtt::spherical"])
def test_generator_penalty_is_the_squared_lie_derivative_of_vectors(name):
    # L_k (D x) = D G_k x - G_k D x = [D, G_k] x for every atom; the spherical
    # block holds the same vector with its components permuted
    penalty, model, systems = penalty_for(name, ANISOTROPIC, method="generators")
    matrix = torch.tensor(ANISOTROPIC, dtype=torch.float64, requires_grad=True)
    expected = vector_generator_penalty(systems, matrix)
    assert_same_penalty(penalty, expected, model, matrix)


@pytest.mark.parametrize(
    "name, gradient",
    [
        ("non_conservative_force", None),  # forward mode
        ("mtt::spherical", None),
        ("energy", None),  # reverse mode
        ("energy", "positions"),
    ],
)
def test_random_direction_penalty_is_three_squared_lie_derivatives_along_it(
    name, gradient
):
    """``directions: random`` rotates one copy of each structure along ``n . G``
    with ``n`` drawn from the context's generator: the penalty is the closed
    form along ``sqrt(3) n . G``, and so is its gradient."""
    penalty, model, systems = penalty_for(
        name, ANISOTROPIC, gradient=gradient, method="generators", directions="random"
    )
    directions = random_directions(
        len(systems), torch.Generator().manual_seed(1), torch.float64, "cpu"
    )
    matrix = torch.tensor(ANISOTROPIC, dtype=torch.float64, requires_grad=True)
    if name != "energy":
        expected = vector_generator_penalty(systems, matrix, directions)
    elif gradient is None:
        expected = energy_generator_penalty(systems, matrix, directions)
    else:
        symmetric = (matrix + matrix.T) / 2
        expected = vector_generator_penalty(systems, symmetric, directions)
    assert_same_penalty(penalty, expected, model, matrix)


@pytest.mark.parametrize(
    "name, gradient",
    [("non_conservative_force", None), ("energy", None), ("energy", "positions")],
)
def test_a_fraction_of_the_steps_evaluates_the_penalty(name, gradient):
    """``fraction: 0.5``: a step drawn from the context's generator evaluates the
    penalty, weighted 2 (the closed form, and its gradient: forward mode,
    reverse mode, and forces); the other steps make no model call and give 0."""
    model = LinearModel(ANISOTROPIC)
    systems = make_systems()
    infos = {name: target_infos(() if gradient is None else (gradient,))[name]}
    context = PenaltyContext(seed=1)
    loss = EquivarianceLoss(
        name, gradient, 1.0, "mean", method="generators", fraction=0.5, context=context
    )
    draws = torch.Generator().manual_seed(1)
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    outcomes = set()
    for _ in range(6):
        context.step = TrainingStep(model, systems, infos)
        predictions = predictions_in_loss_units(context.step, systems, infos)
        before = len(calls)
        penalty = loss.penalty(predictions)
        drawn = bool(torch.rand((), generator=draws) < 0.5)
        outcomes.add(drawn)
        if not drawn:
            assert float(penalty) == 0.0 and len(calls) == before
            continue
        matrix = torch.tensor(ANISOTROPIC, dtype=torch.float64, requires_grad=True)
        if name != "energy":
            expected = vector_generator_penalty(systems, matrix)
        elif gradient is None:
            expected = energy_generator_penalty(systems, matrix)
        else:
            expected = vector_generator_penalty(systems, (matrix + matrix.T) / 2)
        model.matrix.grad = None
        assert_same_penalty(penalty, expected / 0.5, model, matrix)
    assert outcomes == {True, False}


@pytest.mark.parametrize("fraction", [None, 0.25])
def test_random_direction_penalty_is_unbiased(fraction):
    """Over many steps the mean of the random-direction penalty is the exact
    penalty along the three generators (``E[n n^T] = I / 3``), within the
    standard error of the mean; also when a quarter of the steps evaluate it."""
    model = LinearModel(ANISOTROPIC)
    systems = make_systems(sizes=(3, 5, 4, 6, 2, 7, 3, 8))
    name = "non_conservative_force"
    context = PenaltyContext(seed=3)
    loss = EquivarianceLoss(
        name,
        None,
        1.0,
        "mean",
        method="generators",
        directions="random",
        fraction=fraction,
        context=context,
    )
    values = []
    with torch.no_grad():
        for _ in range(400):
            context.step = TrainingStep(model, systems, {name: target_infos()[name]})
            predictions = predictions_in_loss_units(
                context.step, systems, {name: target_infos()[name]}
            )
            values.append(float(loss.penalty(predictions)))
    values = torch.tensor(values, dtype=torch.float64)
    exact = vector_generator_penalty(systems, model.matrix.detach())
    error = values.std() / len(values) ** 0.5
    assert float(values.std()) > 0.05 * float(exact)
    assert abs(float(values.mean() - exact)) < 3 * float(error)


class OpaqueModel(LinearModel):
    """:py:class:`LinearModel` whose positions go through ``NoForwardMode``."""

    def forward(self, systems, outputs, selected_atoms=None):
        opaque = [
            System(
                types=s.types,
                positions=NoForwardMode.apply(s.positions),
                cell=s.cell,
                pbc=s.pbc,
            )
            for s in systems
        ]
        return super().forward(opaque, outputs, selected_atoms)


@pytest.mark.parametrize("name", ["non_conservative_force", "mtt::spherical"])
def test_generator_penalty_without_forward_mode(name):
    # forward mode fails on the model: the Lie derivatives come by double
    # backward, the same closed form, said once
    model = OpaqueModel(ANISOTROPIC)
    systems = make_systems()
    context = PenaltyContext(seed=1)
    loss = EquivarianceLoss(
        name, None, 1.0, "mean", method="generators", context=context
    )
    context.step = TrainingStep(model, systems, {name: target_infos()[name]})
    with pytest.warns(UserWarning, match="without a forward-mode derivative") as said:
        penalty = loss.penalty()
        context.step = TrainingStep(model, systems, {name: target_infos()[name]})
        again = loss.penalty()
    assert len(said) == 1
    matrix = torch.tensor(ANISOTROPIC, dtype=torch.float64, requires_grad=True)
    expected = vector_generator_penalty(systems, matrix)
    assert torch.allclose(again, expected, rtol=1e-12, atol=0)
    assert_same_penalty(penalty, expected, model, matrix)


def vector_generator_penalty(systems, matrix, directions=None):
    """The closed form of ``L_sigma`` of the per-atom vectors ``D x_i`` with
    ``method: generators``: ``L_k (D x) = [D, G_k] x``, squared and summed over
    ``k``, averaged over atoms and components; along ``directions``, the one
    generator ``sqrt(3) n . G`` of each structure."""
    if directions is None:
        per_system = [list(generators())] * len(systems)
    else:
        per_system = [
            [math.sqrt(3) * torch.einsum("k,kij->ij", n, generators())]
            for n in directions
        ]
    squares = [
        sum((s.positions @ (matrix @ g - g @ matrix).T).square() for g in gs)
        for s, gs in zip(systems, per_system, strict=True)
    ]
    return torch.cat(squares).mean()


def energy_generator_penalty(systems, matrix, directions=None):
    """The closed form of ``L_sigma`` of the energy ``x.Dx/2`` with ``method:
    generators``: ``L_k E = sum_i (G_k x_i) . D_sym x_i``, divided by the number of
    atoms, squared and summed over ``k``, averaged over structures; along
    ``directions``, ``sqrt(3) L_n E``."""
    symmetric = (matrix + matrix.T).to(torch.float64) / 2
    lie = torch.stack(
        [
            torch.stack(
                [
                    ((s.positions @ g.T) * (s.positions @ symmetric.T)).sum()
                    for g in generators()
                ]
            )
            / len(s)
            for s in systems
        ]
    )
    if directions is not None:
        lie = math.sqrt(3) * (lie * directions).sum(dim=1, keepdim=True)
    return lie.square().sum(dim=1).mean()


def test_generator_penalty_of_an_energy():
    # d/dt E(exp(t G_k) x) = sum_i (G_k x_i) . D_sym x_i, divided by the number of
    # atoms as metatrain does before the loss
    penalty, model, systems = penalty_for("energy", ANISOTROPIC, method="generators")
    matrix = torch.tensor(ANISOTROPIC, dtype=torch.float64, requires_grad=True)
    expected = energy_generator_penalty(systems, matrix)
    assert_same_penalty(penalty, expected, model, matrix)


def test_generator_penalty_of_an_energy_from_its_forces():
    # with the step's forces at hand, L_k E = sum_i g_i . G_k x_i needs no model
    # call; the same closed form as above
    from metatrain_symmetry.rotated_predictions import predictions_in_loss_units

    model = LinearModel(ANISOTROPIC)
    systems = make_systems()
    infos = {"energy": target_infos(("positions",))["energy"]}
    context = PenaltyContext(seed=1)
    loss = EquivarianceLoss(
        "energy", None, 1.0, "mean", method="generators", context=context
    )
    context.step = TrainingStep(model, systems, infos)
    predictions = predictions_in_loss_units(context.step, systems, infos)
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    penalty = loss.penalty(predictions)
    assert calls == []
    expected = energy_generator_penalty(systems, torch.tensor(ANISOTROPIC))
    assert float(expected) > 1e-3
    assert torch.allclose(penalty.detach(), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["non_conservative_force", "mtt::spherical"])
def test_penalty_is_the_unbiased_variance_of_back_transformed_vectors(name):
    penalty, model, systems = penalty_for(name, ANISOTROPIC, n_rotations=4)
    # recompute from the rotations the context drew, independently of the loss
    context_generator = PenaltyContext(seed=1).generator
    from metatomic.torch.o3 import random_transformations

    rotations = random_transformations(
        4 * len(systems),
        device=torch.device("cpu"),
        dtype=torch.float64,
        add_inversions=True,
        generator=context_generator,
    ).matrices.reshape(4, len(systems), 3, 3)
    matrix = torch.tensor(ANISOTROPIC, dtype=torch.float64)
    deviations = []
    for index, system in enumerate(systems):
        x = system.positions
        # z_r = g^T D g x for each copy
        z = torch.stack(
            [x @ (g.T @ matrix @ g).T for g in rotations[:, index]]
        )  # (R, n_atoms, 3)
        deviations.append(((z - z.mean(0)) ** 2).sum(0).reshape(-1) / 3)
    expected = torch.cat(deviations).mean()
    assert torch.allclose(penalty, expected, rtol=1e-10, atol=0)


def test_penalty_estimates_the_equivariance_error_without_bias():
    # (D g S)_z / n = 3 (g S)_z / n with S = sum_i x_i, an invariant target whose
    # equivariance error is A = 9 |S|^2 / (3 n^2) per structure
    penalty, _, systems = penalty_for("mtt::shift", ANISOTROPIC, n_rotations=4000)
    exact = torch.stack(
        [3.0 * s.positions.sum(dim=0).square().sum() / len(s) ** 2 for s in systems]
    ).mean()
    assert abs(penalty.item() / float(exact) - 1.0) < 0.08

    # per-structure targets are not divided by the number of atoms
    penalty, _, systems = penalty_for(
        "mtt::shift", ANISOTROPIC, n_rotations=4000, per_structure=["mtt::shift"]
    )
    exact = torch.stack(
        [3.0 * s.positions.sum(dim=0).square().sum() for s in systems]
    ).mean()
    assert abs(penalty.item() / float(exact) - 1.0) < 0.08


def test_conservative_forces_penalty_and_gradients():
    # forces -D x_i of the energy x.Dx/2: A per component (2/9)|x|^2, as above
    penalty, model, systems = penalty_for(
        "energy", ANISOTROPIC, n_rotations=3000, gradient="positions"
    )
    mean_square = torch.cat([s.positions for s in systems]).square().sum(1).mean()
    expected = 2.0 / 9.0 * mean_square
    assert abs(penalty.item() / float(expected) - 1.0) < 0.08

    penalty.backward()
    gradient = model.matrix.grad
    assert gradient is not None and bool(torch.isfinite(gradient).all())
    # the penalty grows with anisotropy: moving D towards the identity lowers it
    step = (torch.tensor(ANISOTROPIC) - 2.0 * torch.eye(3)).to(torch.float64)
    assert float((gradient * step).sum()) > 0


def test_stress_penalty_is_the_unbiased_variance_of_back_transformed_tensors():
    # strain gradient of x.Dx/2 per atom: W = sum_i x_i (D x_i)^T / n (metatrain
    # divides per-structure quantities by the number of atoms); the copy g x
    # back-transforms to g^T W(g x) g = sum_i x_i (g^T D g x_i)^T / n
    penalty, _, systems = penalty_for(
        "energy", ANISOTROPIC, n_rotations=3, gradient="strain"
    )
    from metatomic.torch.o3 import random_transformations

    rotations = random_transformations(
        3 * len(systems),
        device=torch.device("cpu"),
        dtype=torch.float64,
        add_inversions=True,
        generator=PenaltyContext(seed=1).generator,
    ).matrices.reshape(3, len(systems), 3, 3)
    matrix = torch.tensor(ANISOTROPIC, dtype=torch.float64)
    deviations = []
    for index, system in enumerate(systems):
        x = system.positions
        z = torch.stack(
            [x.T @ (x @ (g.T @ matrix @ g).T) / len(x) for g in rotations[:, index]]
        )  # (R, 3, 3)
        deviations.append(((z - z.mean(0)) ** 2).sum(0).reshape(-1) / 2)
    expected = torch.cat(deviations).mean()
    assert torch.allclose(penalty, expected, rtol=1e-10, atol=0)

    # an isotropic D is exactly equivariant
    penalty, _, _ = penalty_for("energy", 0.7 * torch.eye(3), 3, gradient="strain")
    assert penalty.item() < 1e-26


def test_compute_adds_gamma_times_penalty():
    model = LinearModel(ANISOTROPIC)
    systems = make_systems()
    infos = target_infos()
    name = "non_conservative_force"
    predictions = model(systems, {name: None})
    targets = {name: random_tensor_map(3, n=8)}
    context = PenaltyContext(seed=4)
    loss = EquivarianceLoss(name, None, 1.0, "mean", gamma=2.5, context=context)
    context.step = TrainingStep(model, systems, {name: infos[name]})
    total = loss.compute(predictions, targets)
    base = TensorMapMSELoss(name, None, 1.0, "mean").compute(predictions, targets)
    assert torch.allclose(total, base + 2.5 * loss.last_penalty)
    assert float(loss.last_penalty) > 0
    assert list(context.pop_log()) == [f"L_sigma({name})"]
    assert context.pop_log() == {}
    # outside training steps (validation) only the base loss remains
    context.step = None
    assert torch.equal(loss.compute(predictions, targets), base)


def test_generator_penalty_of_conservative_forces():
    # the position gradient D x_i of x.Dx/2 has L_k = [D, G_k] x_i, as the
    # non-conservative D x_i above; positions gradients are not divided by the
    # number of atoms
    penalty, model, systems = penalty_for(
        "energy", ANISOTROPIC, gradient="positions", method="generators"
    )
    matrix = torch.tensor(ANISOTROPIC, dtype=torch.float64, requires_grad=True)
    # the energy, hence its gradient, sees the symmetric part of D only
    symmetric = (matrix + matrix.T) / 2
    expected = vector_generator_penalty(systems, symmetric)
    assert_same_penalty(penalty, expected, model, matrix)


def test_generator_penalty_of_the_stress():
    # strain gradient W = sum_i x_i (D x_i)^T / n: L_k W = sum_i x_i ([D, G_k]
    # x_i)^T / n, averaged over the nine components and the structures
    penalty, model, systems = penalty_for(
        "energy", ANISOTROPIC, gradient="strain", method="generators"
    )
    matrix = torch.tensor(ANISOTROPIC, dtype=torch.float64, requires_grad=True)
    symmetric = (matrix + matrix.T) / 2
    squares = []
    for system in systems:
        x = system.positions
        lie = [
            x.T @ (x @ (symmetric @ g - g @ symmetric).T) / len(x) for g in generators()
        ]
        squares.append(sum(value.square() for value in lie).reshape(-1))
    expected = torch.cat(squares).mean()
    assert_same_penalty(penalty, expected, model, matrix)

    penalty, _, _ = penalty_for(
        "energy", 0.7 * torch.eye(3), gradient="strain", method="generators"
    )
    assert penalty.item() < 1e-26


@pytest.mark.parametrize(
    "forces_penalty, strain, periodic, added",
    [
        (False, False, True, True),
        (True, False, True, False),
        (False, True, True, False),
        (False, False, False, False),
    ],
)
def test_steps_evaluate_the_strain_gradient_where_a_penalty_needs_it(
    periodic_frames, molecules, forces_penalty, strain, periodic, added
):
    # a generator penalty on the values of an energy trained with its forces
    # only takes their Lie derivatives from the strain gradient, which the step
    # then evaluates; not for a penalty on the forces too (another way), a
    # stress (already there) or molecules (the forces suffice)
    from metatomic.torch import systems_to_torch
    from metatrain.utils.data.target_info import get_energy_target_info

    info = get_energy_target_info(
        "energy",
        {"quantity": "energy", "unit": "eV"},
        add_position_gradients=True,
        add_strain_gradients=strain,
    )
    context = PenaltyContext()
    EquivarianceLoss("energy", None, 1.0, "mean", method="generators", context=context)
    if forces_penalty:
        EquivarianceLoss(
            "energy", "positions", 1.0, "mean", method="generators", context=context
        )
    frames = periodic_frames if periodic else molecules
    systems = systems_to_torch(frames, dtype=torch.float64)
    targets = {"energy": info}
    evaluated = context.evaluated_targets(systems, targets)
    assert targets == {"energy": info}
    expected = ["positions", "strain"] if added or strain else ["positions"]
    assert evaluated["energy"].gradients == expected
    assert (evaluated["energy"] is not info) == added
    if added:
        block = evaluated["energy"].layout.block()
        assert block.properties == info.layout.block().properties
        assert block.gradient("strain").components[1].names == ["xyz_2"]
