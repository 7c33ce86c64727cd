"""Everything that knows the internals of metatrain's PET: which of its
sub-modules can expose features, and how its readout (the last linear layers of
each target) is laid out."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from metatomic.torch import ModelOutput, System

from .quantities import FEATURE_PREFIX
from .systems import SystemRequirements, attach_neighbor_lists


__all__ = [
    "PETReadout",
    "capture_cleanup",
    "discover_features",
    "is_pet",
    "trainable_pet",
    "unknown_feature_message",
]


# raw PET featurizer inputs worth analysing: they are geometric quantities with a
# known symmetry (edge vectors are pure (1, +1), distances pure (0, +1))
_GEOMETRIC_INPUTS = ("edge_vectors", "edge_distances")


def is_pet(module: torch.nn.Module) -> bool:
    """Whether ``module`` is an (un-exported) metatrain PET."""
    return (
        not isinstance(module, torch.jit.ScriptModule)
        and type(module).__module__.startswith("metatrain.pet")
        and hasattr(module, "backend")
    )


def trainable_pet(
    module: torch.nn.Module, source: str | None = None
) -> torch.nn.Module:
    """``module`` if it is a metatrain PET whose weights can be changed, else a
    ``ValueError`` saying what to pass instead (``source``: the file it came
    from)."""
    name = f"'{source}'" if source is not None else "the model"
    if isinstance(module, torch.jit.ScriptModule):
        raise ValueError(
            f"{name} is an exported model, whose weights cannot be changed: retrain "
            "the metatrain checkpoint (.ckpt) it was exported from"
        )
    if not (is_pet(module) and hasattr(module.backend, "node_last_layers")):
        raise ValueError(
            "closed-form retraining needs a metatrain PET checkpoint (.ckpt); "
            f"{name} is a {type(module).__name__}"
        )
    return module


def _probe_system(atomic_types: list[int] | None, cutoff: float) -> System:
    """A small cluster in which every atom has at least two neighbours."""
    types = atomic_types or [1]
    spacing = 0.45 * cutoff
    positions = spacing * torch.tensor(
        [[0.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.1, 1.0, 0.05], [0.05, 0.1, 1.0]],
        dtype=torch.float64,
    )
    atom_types = torch.tensor([types[i % len(types)] for i in range(4)])
    return System(
        types=atom_types.to(torch.int32),
        positions=positions,
        cell=torch.zeros(3, 3, dtype=torch.float64),
        pbc=torch.zeros(3, dtype=torch.bool),
    )


def discover_features(
    module: torch.nn.Module,
    model: SystemRequirements,
    atomic_types: list[int] | None,
) -> list[str]:
    """List PET sub-modules whose output can be captured as per-atom or per-pair
    features, in execution order.

    A probe forward pass with temporary hooks records which modules run once and
    what they return. Modules returning ``(n_atoms, 1, d)`` tensors (PET's
    centre-token layers) are left out: PET's capture treats them as per-pair
    features and fails with an ``IndexError`` as soon as an atom has more than one
    neighbour.
    """
    if not is_pet(module):
        return []
    options = model.requested_neighbor_lists()
    cutoff = max((option.cutoff for option in options), default=5.0)
    system = _probe_system(atomic_types, cutoff)
    system = system.to(dtype=model.dtype, device=model.device)
    attach_neighbor_lists(model, [system])
    n_atoms = len(system)

    seen: dict[str, list] = {}
    order: list[str] = []
    handles = []
    backend = module.backend
    for path, submodule in backend.named_modules():
        if path == "":
            continue

        def hook(_module, _inputs, output, path=path):
            if path not in seen:
                seen[path] = []
                order.append(path)
            seen[path].append(output)

        handles.append(submodule.register_forward_hook(hook))
    try:
        with torch.no_grad():
            # every target: PET runs a target's last layers only when it is asked for
            module([system], _target_outputs(module, module.target_names), None)
    except Exception:
        pass
    finally:
        for handle in handles:
            handle.remove()

    features: list[str] = [FEATURE_PREFIX + name for name in _GEOMETRIC_INPUTS]
    for path in order:
        calls = seen[path]
        if len(calls) != 1:
            continue  # shared modules: a capture would only keep the last call
        output = calls[0]
        if isinstance(output, tuple) and len(output) == 2:
            if all(_capturable(t, n_atoms) for t in output):
                features.append(f"{FEATURE_PREFIX}{path}_node")
                features.append(f"{FEATURE_PREFIX}{path}_edge")
        elif isinstance(output, torch.Tensor) and _capturable(output, n_atoms):
            if output.ndim == 3 and output.shape[1] == 1:
                continue  # centre-token layer, see docstring
            features.append(FEATURE_PREFIX + path)
    return features


def _target_outputs(module: torch.nn.Module, targets: list[str]) -> dict:
    return {
        name: module.outputs.get(name, ModelOutput(sample_kind="system"))
        for name in targets
    }


def last_layer_targets(module: torch.nn.Module, names: list[str]) -> list[str]:
    """The targets whose last layers compute some of the features ``names``.

    PET runs the last layers of a target only when that target is requested, so
    a capture of ``node_last_layers.energy...`` needs ``energy`` among the
    outputs. Empty for other models.
    """
    if not is_pet(module):
        return []
    paths = [name[len(FEATURE_PREFIX) :] for name in names]
    return [
        target
        for target in module.target_names
        if any(
            path.startswith(
                (f"node_last_layers.{target}.", f"edge_last_layers.{target}.")
            )
            for path in paths
        )
    ]


def outputs_for_features(
    module: torch.nn.Module, outputs: dict[str, ModelOutput]
) -> dict[str, ModelOutput]:
    """``outputs`` with the targets whose last layers compute its requested
    features (see :py:func:`last_layer_targets`) added."""
    features = [name for name in outputs if name.startswith(FEATURE_PREFIX)]
    missing = [t for t in last_layer_targets(module, features) if t not in outputs]
    return {**outputs, **_target_outputs(module, missing)}


def _capturable(tensor, n_atoms: int) -> bool:
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.is_floating_point()
        and tensor.ndim in (2, 3)
        and tensor.shape[0] == n_atoms
    )


def unknown_feature_message(
    module: torch.nn.Module, features: list[str], name: str
) -> str:
    """The error message for a feature ``name`` that is not among ``features``."""
    if isinstance(module, torch.jit.ScriptModule):
        return (
            f"feature '{name}' is not available: exported models cannot expose "
            "internal features; load the metatrain checkpoint (.ckpt) instead"
        )
    if len(features) == 0:
        return (
            f"feature '{name}' is not available: this model exposes no internal "
            "features"
        )
    path = name[len(FEATURE_PREFIX) :]
    if any(path.endswith(token) for token in _CENTER_TOKEN_MODULES):
        return (
            f"feature '{name}' is not available: metatrain's PET cannot capture its "
            "centre-token layers; use the '_node' output of the enclosing "
            "transformer layer instead"
        )
    shown = ", ".join(features[:8])
    return (
        f"unknown feature '{name}': the model exposes {len(features)} features "
        f"(see model.features), for example {shown}"
    )


_CENTER_TOKEN_MODULES = (
    "center_contraction",
    "center_expansion",
    "norm_center_features",
    "center_mlp",
)


@contextlib.contextmanager
def capture_cleanup(module: torch.nn.Module) -> Iterator[None]:
    """Drop the forward hooks added inside the block when it fails: PET registers
    its feature-capture hooks before its forward pass and only removes them on
    success, and left behind they break every later call."""
    before = {id(m): set(m._forward_hooks) for m in module.modules()}
    try:
        yield
    except Exception:
        for submodule in module.modules():
            known = before.get(id(submodule), set())
            for hook_id in list(submodule._forward_hooks):
                if hook_id not in known:
                    del submodule._forward_hooks[hook_id]
        raise


class PETReadout:
    """The last linear layers of one single-block target of a metatrain PET.

    The effective readout is ``Theta``, a ``(n_outputs, n_features + 2)`` matrix
    acting on the augmented per-atom features ``[f, 1, C]``: the columns of layer
    ``l`` are ``[W_node_l, W_edge_l]`` (the order of PET's last-layer features),
    followed by the summed node biases and the summed edge biases (PET adds one
    bias per layer; only their sums reach the prediction, and they are written back
    split equally between layers, which is the minimum-norm choice).

    :param pet: a metatrain PET (see :py:func:`trainable_pet`)
    :param target: the name of one of its targets
    """

    def __init__(self, pet: torch.nn.Module, target: str):
        backend = pet.backend
        if target not in backend.node_last_layers:
            raise ValueError(f"the model has no readout for target '{target}'")
        self.target = target
        self.node_layers = list(backend.node_last_layers[target])
        self.edge_layers = list(backend.edge_last_layers[target])
        keys = list(self.node_layers[0].keys())
        if len(keys) != 1:
            raise ValueError(
                f"target '{target}' has {len(keys)} blocks; closed-form retraining "
                "supports single-block targets (energies, Cartesian forces and "
                "stresses)"
            )
        self.key = keys[0]
        first = self.node_layers[0][self.key]
        self.n_layers = len(self.node_layers)
        self.d_head = first.in_features
        self.n_outputs = first.out_features
        self.n_features = 2 * self.n_layers * self.d_head

    @staticmethod
    def features_name(target: str) -> str:
        """The output exposing the last-layer features of ``target``."""
        from metatrain.pet.model import get_last_layer_features_name

        return get_last_layer_features_name(target)

    def linears(self) -> list[tuple[str, torch.nn.Linear]]:
        """``(kind, module)`` for every readout layer, in feature order."""
        result = []
        for node, edge in zip(self.node_layers, self.edge_layers, strict=True):
            result.append(("node", node[self.key]))
            result.append(("edge", edge[self.key]))
        return result

    def parameters(self) -> list[torch.nn.Parameter]:
        """The weights and biases of every readout layer."""
        parameters = []
        for _, linear in self.linears():
            parameters += [linear.weight, linear.bias]
        return parameters

    def parameter_names(self, pet: torch.nn.Module) -> list[str]:
        """Names of :py:meth:`parameters` in ``pet.named_parameters()``."""
        ids = {id(p) for p in self.parameters()}
        return [name for name, p in pet.named_parameters() if id(p) in ids]

    def theta(self) -> torch.Tensor:
        """Current effective readout, ``(n_outputs, n_features + 2)`` float64
        (differentiable with respect to the model's parameters)."""
        columns = []
        node_bias = torch.zeros(self.n_outputs, dtype=torch.float64)
        edge_bias = torch.zeros(self.n_outputs, dtype=torch.float64)
        for kind, linear in self.linears():
            columns.append(linear.weight.to("cpu", torch.float64))
            if kind == "node":
                node_bias = node_bias + linear.bias.to("cpu", torch.float64)
            else:
                edge_bias = edge_bias + linear.bias.to("cpu", torch.float64)
        return torch.cat(columns + [node_bias[:, None], edge_bias[:, None]], dim=1)

    @torch.no_grad()
    def assign(self, theta: torch.Tensor) -> None:
        """Write an effective readout ``(n_outputs, n_features + 2)`` into the
        model's parameters."""
        d = self.d_head
        for index, (kind, linear) in enumerate(self.linears()):
            weight = theta[:, index * d : (index + 1) * d]
            bias = theta[:, self.n_features if kind == "node" else self.n_features + 1]
            linear.weight.copy_(weight.to(linear.weight))
            linear.bias.copy_((bias / self.n_layers).to(linear.bias))
