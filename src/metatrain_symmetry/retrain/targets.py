"""The terms of the retraining objective: for each retrained target, how its
readout parameters map to predictions, where its labels are, its loss weight and,
for an energy trained with forces, the conservative-force term."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._utils import name_list
from ..models import LoadedModel
from ..pet import PETReadout
from ..quantities import default_label_key


@dataclass
class Target:
    name: str
    readout: PETReadout
    per_structure: bool
    rank: int
    """0 (invariant), 1 (vector), 2 (rank-2 tensor)"""
    n_properties: int
    output_map: torch.Tensor
    """``(n_outputs, n_reduced)``: the full readout rows from the free ones
    (identity, or the symmetric parametrization of a stress)"""
    label_key: str
    weight: float = 1.0
    forces: ForceTerm | None = None
    """the conservative forces of an energy trained with position gradients"""

    @property
    def target_name(self) -> str:
        """The target whose readout parameters this term depends on."""
        return self.name

    @property
    def n_parameters(self) -> int:
        return self.output_map.shape[1] * (self.readout.n_features + 2)

    def loss_scale(self, info, shape) -> torch.Tensor:
        """metatrain's per-target scale of one structure, shaped ``shape``
        (``(n_samples, *components, n_properties)``)."""
        return info.loss_scales[self.name].reshape(shape)

    @property
    def n_components(self) -> int:
        return 3**self.rank

    def trained_parameters(self) -> torch.Tensor:
        """The free parameters of the model's current readout, ``(P,)``."""
        return self.reduce(self.readout.theta().detach())

    def reduce(self, theta: torch.Tensor) -> torch.Tensor:
        """Full ``(n_outputs, n_aug)`` readout to the free parameter vector."""
        pseudo_inverse = torch.linalg.pinv(self.output_map)
        return (pseudo_inverse @ theta).reshape(-1)

    def expand(self, parameters: torch.Tensor) -> torch.Tensor:
        reduced = parameters.reshape(self.output_map.shape[1], -1)
        return self.output_map @ reduced


@dataclass
class ForceTerm:
    """The conservative forces ``-dE/dr`` of an energy target: a second quadratic
    term in the energy's readout parameters, with its own labels and loss weight
    (metatrain's weight of the energy's ``positions`` gradient)."""

    target: Target
    label_key: str
    weight: float = 1.0
    rank: int = 1
    per_structure: bool = False

    @property
    def name(self) -> str:
        return f"{self.target.name}/forces"

    @property
    def target_name(self) -> str:
        """The target whose readout parameters this term depends on."""
        return self.target.name

    def trained_parameters(self) -> torch.Tensor:
        """The free parameters of the energy's current readout, ``(P,)``."""
        return self.target.trained_parameters()

    @property
    def n_properties(self) -> int:
        return self.target.n_properties

    @property
    def n_parameters(self) -> int:
        return self.target.n_parameters

    def loss_scale(self, info, shape) -> torch.Tensor:
        # metatrain divides gradients by the scale of the energy they derive from
        scale = info.loss_scales[self.target.name].reshape(-1)
        return scale.expand(shape)


def setup_targets(
    model: LoadedModel,
    targets,
    weights: dict[str, float] | None,
    label_keys: dict[str, str] | None,
    ignore_gradients: bool,
    default_weights: dict[str, float] | None = None,
    default_force_weights: dict[str, float] | None = None,
) -> list[Target]:
    """The targets to retrain, with their force terms, labels and weights.

    :param targets: target names, or ``None`` for every supported one
    :param weights: per-term loss weights keyed by target or ``"<target>/forces"``
    :param label_keys: per-term label names, keyed the same way
    :param ignore_gradients: leave out the forces of energies trained with them
    :param default_weights: per-target weights where ``weights`` has none (else 1)
    :param default_force_weights: per-target weights of the forces (else 1)
    """
    names = select_targets(model, targets)
    with_forces = check_gradients(model, names, ignore_gradients)
    weights = dict(weights or {})
    label_keys = dict(label_keys or {})
    default_weights = default_weights or {}
    default_force_weights = default_force_weights or {}
    known_terms = names + [f"{name}/forces" for name in with_forces]
    for name in list(weights) + list(label_keys):
        if name not in known_terms:
            raise ValueError(
                f"weights or label_keys name '{name}', which is not retrained "
                f"(terms: {known_terms})"
            )
    result = []
    for name in names:
        target = make_target(
            model,
            name,
            label_keys.get(name),
            weights.get(name, default_weights.get(name, 1.0)),
        )
        if name in with_forces:
            key = f"{name}/forces"
            add_forces(
                target,
                label_keys.get(key),
                weights.get(key, default_force_weights.get(name, 1.0)),
            )
        result.append(target)
    return result


def all_terms(targets: list[Target]) -> list[Target | ForceTerm]:
    """Every term of the objective: the targets, then their force terms."""
    return targets + [t.forces for t in targets if t.forces is not None]


def make_target(
    model: LoadedModel, name: str, label_key: str | None, weight: float
) -> Target:
    targets = model.targets
    if name not in targets:
        raise ValueError(
            f"unknown target '{name}': the checkpoint was trained on {sorted(targets)}"
        )
    info = targets[name]
    readout = PETReadout(model.module, name)
    axes = info.components
    n_properties = info.n_properties
    if axes == ():
        rank = 0
    elif axes == ("xyz",):
        rank = 1
    elif axes == ("xyz_1", "xyz_2"):
        rank = 2
    else:
        raise ValueError(
            f"target '{name}' has components {axes}; closed-form retraining "
            "supports scalars, Cartesian vectors and rank-2 Cartesian tensors"
        )
    per_structure = info.sample_kind == "system"
    if info.sample_kind not in ("system", "atom"):
        raise ValueError(f"target '{name}' has unsupported samples {info.sample_kind}")
    if not per_structure and rank != 1:
        raise ValueError(
            f"per-atom target '{name}' of rank {rank} is not supported; per-atom "
            "targets must be Cartesian vectors (non-conservative forces)"
        )
    n_outputs = 3**rank * n_properties
    if readout.n_outputs != n_outputs:
        raise ValueError(f"internal error: readout of '{name}' has a wrong size")
    if rank == 2:
        if name != "non_conservative_stress":
            raise ValueError(
                f"rank-2 target '{name}': only 'non_conservative_stress' is supported"
            )
        # PET symmetrizes rank-2 predictions: only symmetric readout rows matter
        pairs = [(a, b) for a in range(3) for b in range(a, 3)]
        output_map = torch.zeros(n_outputs, len(pairs) * n_properties)
        for column, (a, b) in enumerate(pairs):
            for p in range(n_properties):
                for i, j in ((a, b), (b, a)):
                    output_map[
                        (3 * i + j) * n_properties + p, column * n_properties + p
                    ] = 1.0
    else:
        output_map = torch.eye(n_outputs)
    if label_key is None:
        label_key = default_label_key(name)
    return Target(
        name=name,
        readout=readout,
        per_structure=per_structure,
        rank=rank,
        n_properties=n_properties,
        output_map=output_map.to(torch.float64),
        label_key=label_key,
        weight=float(weight),
    )


SUPPORTED_TARGETS = ("energy", "non_conservative_force", "non_conservative_stress")


def select_targets(model: LoadedModel, targets) -> list[str]:
    known = list(model.targets)
    if targets is None:
        names = [name for name in known if name in SUPPORTED_TARGETS]
        if len(names) == 0:
            raise ValueError(
                f"the model has no target closed-form retraining supports ({known}); "
                "name the targets explicitly"
            )
        return names
    names = name_list(
        targets, "no targets given: name at least one target", "targets are repeated"
    )
    for name in names:
        if name not in known:
            raise ValueError(
                f"unknown target '{name}': the checkpoint was trained on {known}"
            )
    return names


def check_gradients(model: LoadedModel, names, ignore_gradients: bool) -> list[str]:
    """The targets whose conservative forces enter the objective (those trained
    with position gradients, unless ``ignore_gradients``)."""
    with_forces = []
    for name in names:
        gradients = list(model.targets[name].gradients)
        if len(gradients) == 0 or ignore_gradients:
            continue
        unsupported = [g for g in gradients if g != "positions"]
        if len(unsupported) != 0:
            raise ValueError(
                f"target '{name}' was trained with its gradients {unsupported} "
                "(conservative stress), which closed-form retraining does not fit; "
                "pass ignore_gradients=True (--ignore-gradients) to retrain on its "
                "values alone"
            )
        with_forces.append(name)
    return with_forces


def add_forces(target: Target, label_key: str | None, weight: float) -> None:
    if target.rank != 0 or not target.per_structure or target.n_properties != 1:
        raise ValueError(
            f"target '{target.name}' has position gradients but is not a "
            "single-property per-structure energy; pass ignore_gradients=True "
            "(--ignore-gradients) to retrain on its values alone"
        )
    target.forces = ForceTerm(
        target=target,
        label_key=default_label_key("forces") if label_key is None else label_key,
        weight=float(weight),
    )


def term_names(target: Target) -> list[str]:
    return [target.name] + ([] if target.forces is None else [target.forces.name])


def loss_weights(original: dict) -> tuple[dict[str, float], dict[str, float]]:
    """Per-target loss weights of the checkpoint's training options, and the
    weights of their ``positions`` gradients."""
    loss = (original.get("train_hypers") or {}).get("loss")
    weights, force_weights = {}, {}
    if isinstance(loss, dict):
        for name, options in loss.items():
            if not isinstance(options, dict):
                continue
            if "weight" in options:
                weights[name] = float(options["weight"])
            positions = (options.get("gradients") or {}).get("positions")
            if isinstance(positions, dict) and "weight" in positions:
                force_weights[name] = float(positions["weight"])
    return weights, force_weights
