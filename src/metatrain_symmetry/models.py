"""Load any metatomic model and describe what it can be asked for.

:py:func:`load_model` accepts exported models, metatrain checkpoints and in-memory
modules, and returns a :py:class:`LoadedModel`: the raw module to evaluate, its
declared outputs, the internal features it can expose, and the checks that keep
bad input (unknown atomic types, NaN positions, unknown names) from reaching it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import torch
from metatensor.torch import Labels, TensorMap
from metatomic.torch import (
    AtomisticModel,
    ModelCapabilities,
    ModelMetadata,
    ModelOutput,
    NeighborListOptions,
    System,
    load_atomistic_model,
)

from ._utils import first_line
from .pet import (
    capture_cleanup,
    discover_features,
    outputs_for_features,
    unknown_feature_message,
)
from .quantities import DERIVED_OUTPUTS, FEATURE_PREFIX, QUANTITIES, quantity
from .training_targets import ModelTarget, recorded_targets


ModelLike = Union[str, os.PathLike, AtomisticModel, torch.nn.Module]  # noqa: UP007


__all__ = ["LoadedModel", "ModelLike", "ModelTarget", "load_model"]


class LoadedModel:
    """A model ready for rotational analysis.

    Use :py:func:`load_model` to create one. Calling it evaluates the underlying
    module directly (without the unit conversions and consistency checks of
    :py:class:`metatomic.torch.AtomisticModel`), after the checks of
    :py:meth:`check_systems`.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        capabilities: ModelCapabilities | None,
        metadata: ModelMetadata | None = None,
        source: str | None = None,
        neighbor_lists: list[NeighborListOptions] | None = None,
        atomistic: AtomisticModel | None = None,
    ):
        self.module = module.eval()
        self._atomistic = atomistic
        self.capabilities = capabilities
        self.metadata = metadata
        self.source = source
        self._neighbor_lists = neighbor_lists
        self._features: list[str] | None = None
        self._targets: dict[str, ModelTarget] | None = None

    # ------------------------------------------------------------------ metadata
    @property
    def outputs(self) -> dict[str, ModelOutput]:
        """Outputs the model declares, by name (empty when unknown)."""
        if self.capabilities is not None:
            return dict(self.capabilities.outputs)
        if hasattr(self.module, "supported_outputs"):
            return dict(self.module.supported_outputs())
        return {}

    @property
    def features(self) -> list[str]:
        """Internal features the model can expose, in the order the forward pass
        computes them (``mtt::feature::<module path>`` for metatrain's PET).

        Only available for models loaded from a checkpoint or from an in-memory
        PET instance: exported (TorchScript) models cannot capture them.
        """
        if self._features is None:
            self._features = discover_features(self.module, self, self.atomic_types)
        return list(self._features)

    def natural_sample_kind(self, name: str) -> str:
        """Whether ``name`` is naturally a per-structure (``"system"``) or a per-atom
        (``"atom"``) quantity.

        Models usually declare every output per atom (they *can* give per-atom
        energies), so the declaration alone does not tell: metatrain models know
        from their training targets, other models from metatomic's quantity
        names.
        """
        if name.startswith(FEATURE_PREFIX):
            return "atom"
        if name in DERIVED_OUTPUTS:
            return QUANTITIES[name].sample_kind
        target = self.targets.get(name)
        if target is not None:
            return target.sample_kind
        return self._declared_sample_kind(name)

    def _declared_sample_kind(self, name: str) -> str:
        declared = self.outputs.get(name)
        if declared is not None and declared.sample_kind != "atom":
            return declared.sample_kind
        known = quantity(name)
        if known is not None:
            return known.sample_kind
        return "system" if declared is None else "atom"

    @property
    def targets(self) -> dict[str, ModelTarget]:
        """The quantities the model was trained to predict, by name.

        For metatrain models (checkpoints and exported models, read in any
        process) these are the training targets with their units, sample kinds
        and the gradients they were trained on. For other models, every declared
        output except auxiliary ones (``mtt::aux::*``) and features, with no
        gradients.
        """
        if self._targets is None:
            recorded = recorded_targets(self.module)
            if recorded is None:
                recorded = {
                    name: ModelTarget(
                        name=name,
                        quantity=output.quantity,
                        unit=output.unit,
                        sample_kind=self._declared_sample_kind(name),
                    )
                    for name, output in self.outputs.items()
                    if not name.startswith("mtt::aux::")
                    and name not in ("feature", "features")
                }
            self._targets = recorded
        return dict(self._targets)

    @property
    def dtype(self) -> torch.dtype:
        for tensor in self.module.parameters():
            return tensor.dtype
        for tensor in self.module.buffers():
            if tensor.is_floating_point():
                return tensor.dtype
        if self.capabilities is not None:
            return getattr(torch, self.capabilities.dtype)
        return torch.float64

    @property
    def device(self) -> torch.device:
        for tensor in self.module.parameters():
            return tensor.device
        for tensor in self.module.buffers():
            return tensor.device
        return torch.device("cpu")

    @property
    def evaluations_per_structure(self) -> int:
        """How many evaluations of an underlying model one call makes per
        structure: for a model averaged by metatomic's ``SymmetrizedModel`` (a
        symmetrized export), every element of its quadrature and its inversion;
        1 otherwise. The engine sizes its batches by it."""
        # the quadrature weights are the one trace SymmetrizedModel leaves in a
        # scripted module; it evaluates each rotation with and without inversion
        weights = getattr(self.module, "_rotation_weights", None)
        if isinstance(weights, torch.Tensor) and weights.dim() == 1:
            return 2 * int(weights.shape[0])
        return 1

    @property
    def atomic_types(self) -> list[int] | None:
        """Atomic types the model knows, or ``None`` when it does not say."""
        if self.capabilities is None:
            return None
        return [int(t) for t in self.capabilities.atomic_types]

    @property
    def length_unit(self) -> str:
        if self.capabilities is None:
            return "angstrom"
        return self.capabilities.length_unit or "angstrom"

    def requested_neighbor_lists(self) -> list[NeighborListOptions]:
        """Neighbour lists the model needs, gathered from all its sub-modules."""
        if self._neighbor_lists is not None:
            # what the AtomisticModel that wrapped the module found: the methods
            # of a scripted module that its forward does not call are gone
            return list(self._neighbor_lists)
        if isinstance(self.module, AtomisticModel):
            return self.module.requested_neighbor_lists()
        options: list[NeighborListOptions] = []
        for submodule in self.module.modules():
            if hasattr(submodule, "requested_neighbor_lists"):
                for option in submodule.requested_neighbor_lists():
                    if not any(option == known for known in options):
                        options.append(option)
        return options

    def atomistic_model(self) -> AtomisticModel:
        """The model as a metatomic :py:class:`~metatomic.torch.AtomisticModel`
        (with unit conversions and neighbour-list requests), for metatomic's ASE
        calculator and other engines: the one it was loaded from, or the module
        wrapped with its capabilities."""
        if self._atomistic is not None:
            return self._atomistic
        if self.capabilities is None:
            raise ValueError(
                "this model has no capabilities; pass capabilities= to load_model "
                "to run it in a simulation engine"
            )
        self._atomistic = AtomisticModel(
            self.module, self.metadata or ModelMetadata(), self.capabilities
        )
        return self._atomistic

    def to(
        self,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> LoadedModel:
        """Move the model to a ``dtype`` and/or ``device`` (in place)."""
        self.module.to(dtype=dtype, device=device)
        return self

    # --------------------------------------------------------------- validation
    def check_names(self, names: Sequence[str]) -> None:
        """Raise a clear error for names that are neither declared outputs nor
        available features."""
        declared = self.outputs
        for name in names:
            if name.startswith(FEATURE_PREFIX):
                if name not in self.features:
                    raise ValueError(
                        unknown_feature_message(self.module, self.features, name)
                    )
            elif name in ("forces", "stress"):
                if len(declared) != 0 and "energy" not in declared:
                    raise ValueError(
                        f"'{name}' is the derivative of the energy, but the model "
                        f"has no 'energy' output (it declares {sorted(declared)})"
                    )
            elif len(declared) != 0 and name not in declared:
                raise ValueError(
                    f"unknown output '{name}': the model declares "
                    f"{sorted(declared)}"
                    + (
                        f" and {len(self.features)} internal features (see "
                        "model.features)"
                        if self._features
                        else ""
                    )
                )

    def check_systems(self, systems: Sequence[System]) -> None:
        """Raise a clear error for systems the model cannot evaluate."""
        if len(systems) == 0:
            raise ValueError("no structures given: pass at least one structure")
        known = self.atomic_types
        for index, system in enumerate(systems):
            if not bool(torch.all(torch.isfinite(system.positions))):
                raise ValueError(
                    f"structure {index} has non-finite (NaN or infinite) positions; "
                    "remove or fix it"
                )
            if not bool(torch.all(torch.isfinite(system.cell))):
                raise ValueError(f"structure {index} has a non-finite cell")
            if known is not None:
                unknown = sorted(set(system.types.tolist()) - set(known))
                if unknown:
                    raise ValueError(
                        f"structure {index} contains atomic types {unknown}, which "
                        f"the model does not know (it was trained on {known})"
                    )

    def warn_if_single_precision(self) -> None:
        if self.dtype == torch.float32:
            warnings.warn(
                "the model runs in float32: equivariance errors below about 1e-6 of "
                "the output's magnitude are float32 round-off, not symmetry "
                "breaking; load it with load_model(..., dtype=torch.float64) to "
                "resolve smaller errors",
                stacklevel=3,
            )

    # --------------------------------------------------------------- evaluation
    def __call__(
        self,
        systems: list[System],
        outputs: dict[str, ModelOutput],
        selected_atoms: Labels | None = None,
    ) -> dict[str, TensorMap]:
        """Evaluate the module, never leaving forward hooks behind on failure."""
        wants_features = any(name.startswith(FEATURE_PREFIX) for name in outputs)
        if not wants_features or isinstance(self.module, torch.jit.ScriptModule):
            return self.module(systems, outputs, selected_atoms)
        evaluated = outputs_for_features(self.module, outputs)
        with capture_cleanup(self.module):
            results = self.module(systems, evaluated, selected_atoms)
        return {name: results[name] for name in outputs}

    def __repr__(self) -> str:
        name = type(self.module).__name__
        return (
            f"LoadedModel({name}, outputs={sorted(self.outputs)}, dtype={self.dtype})"
        )


def load_model(
    model: ModelLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    capabilities: ModelCapabilities | None = None,
) -> LoadedModel:
    """Load a model for analysis.

    :param model: path to an exported model (``.pt``) or a metatrain checkpoint
        (``.ckpt``); an :py:class:`~metatomic.torch.AtomisticModel`; a metatrain model
        instance; or any module following metatomic's ``ModelInterface``
    :param dtype: convert the model to this dtype (for example ``torch.float64`` to
        resolve tiny equivariance errors of a float32 model)
    :param device: move the model to this device
    :param capabilities: declared outputs and atomic types of a bare
        ``ModelInterface`` module (optional; ignored for other inputs)
    :return: the loaded model
    """
    source = None
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        if isinstance(model, (str, os.PathLike)):
            source = str(model)
            model = _load_file(Path(model))
        loaded = _wrap_module(model, capabilities)
        loaded.source = source
    if dtype is not None or device is not None:
        loaded.to(dtype=dtype, device=device)
    return loaded


def _load_file(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"model file '{path}' does not exist")
    if path.is_dir():
        raise ValueError(f"'{path}' is a directory, not a model file")
    if path.suffix in (".yaml", ".yml"):
        raise ValueError(f"'{path}' is an options file, not a model")
    from metatrain.utils.io import is_exported_file

    try:
        if is_exported_file(str(path)):
            return load_atomistic_model(str(path))
        from metatrain.utils.io import load_model as load_metatrain_model

        return load_metatrain_model(str(path))
    except Exception as error:
        raise ValueError(
            f"could not read '{path}' as an exported metatomic model or a metatrain "
            f"checkpoint ({type(error).__name__}: {first_line(error)})"
        ) from error


def _wrap_module(model, capabilities: ModelCapabilities | None) -> LoadedModel:
    if isinstance(model, AtomisticModel) or (
        isinstance(model, torch.jit.ScriptModule) and hasattr(model, "capabilities")
    ):
        return LoadedModel(
            model.module,
            model.capabilities(),
            model.metadata(),
            neighbor_lists=model.requested_neighbor_lists(),
            atomistic=model,
        )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            "model must be a file path, an AtomisticModel or a torch.nn.Module "
            f"following metatomic's ModelInterface, got {type(model).__name__}"
        )
    if hasattr(model, "export") and hasattr(model, "supported_outputs"):
        # a metatrain model: exporting puts every sub-model in a consistent dtype
        # and declares its capabilities; the module itself stays un-scripted, so
        # its internal features remain reachable
        exported = model.export()
        return LoadedModel(
            exported.module,
            exported.capabilities(),
            exported.metadata(),
            neighbor_lists=exported.requested_neighbor_lists(),
            atomistic=exported,
        )
    return LoadedModel(model, capabilities)
