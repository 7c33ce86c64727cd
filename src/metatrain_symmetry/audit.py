"""Dataset-level symmetry audit of a model.

:py:func:`audit` evaluates a model on every structure of a dataset, unrotated and
on an O(3) grid, and summarises per output: the error against the dataset's
targets, the per-structure equivariance RMSE (also relative to that error), the
symmetry leakage, and the dataset-mean ``(lambda, sigma)`` spectrum; per internal
feature: the mean spectrum. :py:func:`write_audit_report` writes the summary
(``audit.json``, following the JSON schema returned by :py:func:`audit_schema`),
a readable table, the spectra, a heatmap, a chemiscope dataset and an offline
HTML viewer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from metatomic.torch import (
    ModelOutput,
)

from .audit_summary import audit_summary
from .data import read_structures, reference_value
from .diagnostics import (
    AnalysisPart,
    AnalysisPlan,
    AnalysisResult,
    model_fingerprint,
    run_context,
)
from .distributed import ShardStore, cut_into_shards, run_shards
from .engine import RotatedEvaluator
from .grid import O3Grid
from .models import LoadedModel, ModelLike, load_model
from .quantities import (
    DERIVED_OUTPUTS,
    FEATURE_PREFIX,
    NON_CONSERVATIVE_FORCES,
    default_label_key,
    expected_irreps,
)
from .systems import prepare_systems, systems_fingerprint
from .visualize import chemiscope_widget


def force_output(model: LoadedModel) -> str | None:
    """The model output compared with a dataset's forces.

    ``"forces"`` (the conservative ``-dE/dr``) when the model's energy was trained
    with force gradients (metatrain models know), else the declared
    ``non_conservative_force``, else ``"forces"`` when the model has an energy.
    """
    outputs = model.outputs
    energy_target = model.targets.get("energy")
    if energy_target is not None and "positions" in energy_target.gradients:
        return "forces"
    for name in NON_CONSERVATIVE_FORCES:
        if name in outputs:
            return name
    if "energy" in outputs:
        return "forces"
    return None


def default_targets(model: LoadedModel) -> dict[str, str]:
    """Default mapping from output names to dataset keys: ``energy`` from the
    key ``energy``, forces (see :py:func:`force_output`) from the key ``forces``."""
    targets = {}
    if "energy" in model.outputs:
        targets["energy"] = default_label_key("energy")
    forces = force_output(model)
    if forces is not None:
        targets[forces] = default_label_key(forces)
    return targets


@dataclass
class AuditResult:
    """The audit of a model on a dataset.

    Per-structure quantities are indexed like the audited structures.
    """

    summary: dict
    """JSON-ready summary, as written to ``audit.json``"""
    analysis: AnalysisResult
    """rotational analysis of the audited outputs and features"""
    outputs: list[str]
    """audited model outputs, in the order requested"""
    features: list[str]
    """audited internal features, in the order the model computes them"""
    targets: dict[str, str]
    """dataset key compared with each output that has a target"""
    predictions: dict[str, list[torch.Tensor]] = field(repr=False)
    """per output, the prediction on each unrotated structure, ``(n_samples, n)``
    float64 (``n`` values per sample: components times properties)"""
    references: dict[str, list[torch.Tensor]] = field(repr=False)
    """per output with a target, the dataset values, shaped as the predictions"""
    frames: list = field(default_factory=list, repr=False)
    """the audited structures (``ase.Atoms``), in order"""

    def show(self, mode: str = "default"):
        """The audit as an interactive chemiscope widget, as
        :py:func:`chemiscope.show` makes (in Jupyter, an audit result displays
        itself this way).

        :param mode: ``"default"``, ``"structure"`` or ``"map"``
        """
        return chemiscope_widget(self, mode)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.show())

    @property
    def n_structures(self) -> int:
        return len(next(iter(self.predictions.values())))

    def is_force(self, name: str) -> bool:
        """Whether ``name`` is a per-atom Cartesian vector (a force)."""
        return expected_irreps(name) == [(1, 1)]

    def leakage(self, name: str) -> torch.Tensor | None:
        """Per-structure symmetry leakage ``1 - b`` at the expected irreps of
        ``name``, ``(n_structures,)``; ``None`` when no irrep is expected."""
        irreps = expected_irreps(name)
        if irreps is None:
            return None
        kept, _ = self.analysis.spectrum_sum(name, irreps)
        return 1.0 - kept

    def leakage_error(self, name: str) -> torch.Tensor | None:
        """Standard error of :py:meth:`leakage`, ``(n_structures,)``; ``None`` on
        exact grids or when no irrep is expected."""
        irreps = expected_irreps(name)
        if irreps is None:
            return None
        return self.analysis.spectrum_sum(name, irreps)[1]

    def structure_errors(self, name: str) -> torch.Tensor | None:
        """Per-structure RMSE of the unrotated prediction of ``name`` against its
        target, ``(n_structures,)``; ``None`` without a target."""
        if name not in self.references:
            return None
        return torch.stack(
            [
                (prediction - reference).square().mean().sqrt()
                for prediction, reference in zip(
                    self.predictions[name], self.references[name], strict=True
                )
            ]
        )

    def atom_equivariance_errors(self, name: str) -> list[torch.Tensor]:
        """Per-atom equivariance RMSE of a per-atom output: for each structure an
        ``(n_atoms,)`` tensor, the RMS deviation of the atom's components from
        their O(3) average."""
        variance = self.analysis.variance[name]
        sizes = [len(prediction) for prediction in self.predictions[name]]
        offsets = torch.tensor([0] + sizes[:-1]).cumsum(dim=0)
        total = torch.zeros(sum(sizes), dtype=torch.float64)
        count = torch.zeros(sum(sizes), dtype=torch.float64)
        for key, block in variance.items():
            dimension = 1
            if "o3_lambda" in variance.keys.names:
                dimension = 2 * int(key["o3_lambda"]) + 1
            system = block.samples.column("system").to(torch.long)
            row = offsets[system] + block.samples.column("atom").to(torch.long)
            values = block.values.to(torch.float64).reshape(len(system), -1)
            total.index_add_(0, row, dimension * values.sum(dim=1))
            count.index_add_(
                0, row, torch.full_like(total[row], dimension * values.shape[1])
            )
        return list((total / count.clamp(min=1)).sqrt().split(sizes))

    def deviations(self, name: str) -> list[torch.Tensor]:
        """Deviation of the unrotated prediction of a per-atom vector output from
        its O(3) average: for each structure an ``(n_atoms, 3)`` tensor."""
        average = self.analysis.average[name].block()
        system = average.samples.column("system")
        values = average.values.to(torch.float64).reshape(len(system), 3, -1)[..., 0]
        deviations = []
        for index, prediction in enumerate(self.predictions[name]):
            mean = values[system == index]
            deviations.append(prediction.reshape(len(mean), 3, -1)[..., 0] - mean)
        return deviations


def audit(
    model: ModelLike,
    frames: Sequence | str | os.PathLike,
    outputs: Sequence[str] | None = None,
    features: Sequence[str] | str = (),
    targets: dict[str, str] | None = None,
    max_lambda: int = 4,
    grid: O3Grid | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    distributed: bool = False,
    work_dir: str | os.PathLike | None = None,
) -> AuditResult | None:
    """Audit the rotational symmetry of a model on a dataset.

    :param model: anything :py:func:`load_model` accepts (exported model, metatrain
        checkpoint, module); a file path is identified by its SHA-256 in the summary
    :param frames: ``ase.Atoms`` structures, or a file ASE can read
    :param outputs: model outputs to audit (``"forces"`` and ``"stress"`` are the
        derivatives of the energy); by default those of :py:func:`default_targets`
    :param features: internal features (``"mtt::feature::<path>"``), or ``"all"``
    :param targets: dataset key compared with each output; by default
        :py:func:`default_targets`, keeping the keys the dataset has. Keys are read
        from ``atoms.info``, ``atoms.arrays`` or the attached calculator's results;
        an explicitly named key that a structure lacks is an error
    :param max_lambda: largest ``lambda`` of the spectra
    :param grid: O(3) grid, see :py:func:`analyze`
    :param batch_size: rotated copies per model call
    :param device: run the model on this device
    :param progress: show progress bars (on rank 0 only)
    :param distributed: spread the structures over the processes of torch's
        initialized default process group (see
        :py:func:`metatrain_symmetry.distributed.init_from_environment`); every
        rank must call this function with the same arguments
    :param work_dir: save each completed shard of structures in this directory,
        and reuse the shards a previous, interrupted audit of the same model file,
        structures and settings saved there (another audit's directory is
        refused); needs a model loaded from a file; the directory is kept:
        remove it once the result is saved
    :return: the audit, with its JSON-ready ``summary``; ``None`` on ranks other
        than 0 when ``distributed``
    """
    context = run_context(distributed)
    model_path = None
    if isinstance(model, (str, os.PathLike)):
        model_path = Path(model)
    loaded = load_model(model, device=device)
    if model_path is None and loaded.source is not None:
        # a model loaded from a file earlier keeps its name in the report
        model_path = Path(loaded.source)

    data_path = None
    if isinstance(frames, (str, os.PathLike)):
        data_path = Path(frames)
        frames = read_structures(data_path)
    frames = list(frames)
    if len(frames) == 0:
        raise ValueError("no structures given: pass at least one structure")

    explicit_targets = targets is not None
    if outputs is None:
        outputs = list(targets) if explicit_targets else list(default_targets(loaded))
        if len(outputs) == 0:
            raise ValueError(
                "the model has neither an energy nor a force output: name the "
                "outputs to audit"
            )
    outputs = list(outputs)
    if targets is None:
        targets = {
            name: key
            for name, key in default_targets(loaded).items()
            if name in outputs and all(_has_key(atoms, key) for atoms in frames)
        }
    else:
        targets = dict(targets)
        unknown = [name for name in targets if name not in outputs]
        if unknown:
            raise ValueError(
                f"targets are given for {unknown}, which are not audited outputs "
                f"{outputs}"
            )
    features = _ordered_features(loaded, features)
    names = outputs + features
    _check_outputs(loaded, outputs)
    loaded.check_names(names)
    for name in outputs:
        needed = max((lam for lam, _ in expected_irreps(name) or []), default=0)
        if isinstance(max_lambda, int) and max_lambda < needed:
            raise ValueError(
                f"max_lambda={max_lambda} is below the lambda={needed} that "
                f"'{name}' should carry, so its leakage cannot be measured: pass "
                f"max_lambda={needed} (--max-lambda {needed}) or more"
            )

    references = {
        name: [_read_target(atoms, key, index) for index, atoms in enumerate(frames)]
        for name, key in targets.items()
    }
    plan = AnalysisPlan(loaded, names, max_lambda, grid, batch_size)
    systems = plan.prepare(frames)
    store = None
    if work_dir is not None:
        manifest = {
            "kind": "audit",
            "model": model_fingerprint(loaded),
            "structures": systems_fingerprint(systems),
            "n_structures": len(systems),
            "audited_outputs": outputs,
            **plan.settings(),
        }
        store = ShardStore(work_dir, manifest)

    def compute(mine: dict[int, list[int]]):
        """Unrotated predictions (checked against the targets), then the
        analysis, of this rank's shards."""
        indices = [index for shard in mine.values() for index in shard]
        values = predict(loaded, [frames[index] for index in indices], outputs)
        by_structure = {
            index: {name: values[name][position] for name in outputs}
            for position, index in enumerate(indices)
        }
        for name in references:
            for index in indices:
                _check_target(
                    targets[name],
                    name,
                    index,
                    by_structure[index][name],
                    references[name][index],
                )
        for shard, part in plan.run(systems, mine, progress and context.is_main):
            shard_predictions = {
                name: [by_structure[index][name] for index in mine[shard]]
                for name in outputs
            }
            yield shard, (part, shard_predictions)

    costs = plan.costs(systems)
    shards = cut_into_shards(costs)
    parts = run_shards(
        shards,
        [sum(costs[i] for i in shard) for shard in shards],
        compute,
        context,
        store,
    )
    if parts is None:
        return None
    analysis_parts: list[AnalysisPart] = [part for part, _ in parts]
    predictions: dict[str, list[torch.Tensor]] = {name: [] for name in outputs}
    for _, shard_predictions in parts:
        for name in outputs:
            predictions[name].extend(shard_predictions[name])
    for name, values in references.items():
        for index, prediction in enumerate(predictions[name]):
            values[index] = values[index].reshape(prediction.shape)
    analysis = plan.assemble(analysis_parts)
    result = AuditResult(
        summary={},
        analysis=analysis,
        outputs=outputs,
        features=features,
        targets=targets,
        predictions=predictions,
        references=references,
        frames=frames,
    )
    result.summary = audit_summary(result, loaded, frames, model_path, data_path)
    return result


def _ordered_features(model: LoadedModel, features) -> list[str]:
    if isinstance(features, str):
        features = [features]
    features = list(features)
    if features == ["all"]:
        return model.features
    available = model.features
    for name in features:
        if name not in available:
            model.check_names([name])
    return sorted(features, key=available.index)


def _check_outputs(model: LoadedModel, outputs: list[str]) -> None:
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs are requested more than once: {outputs}")
    for name in outputs:
        if name.startswith(FEATURE_PREFIX):
            raise ValueError(f"'{name}' is a feature: pass it with features")
        if name in DERIVED_OUTPUTS and "energy" not in model.outputs:
            raise ValueError(
                f"'{name}' is the derivative of the energy, but the model has no "
                "energy output"
            )


# ------------------------------------------------------------------ predictions
def predict(
    model: LoadedModel, frames: Sequence, outputs: Sequence[str]
) -> dict[str, list[torch.Tensor]]:
    """Predictions of a model on unrotated structures.

    ``"forces"`` (``-dE/dr``) and ``"stress"`` (``1/V dE/d(strain)``) are computed
    from the energy by automatic differentiation.

    :return: per output, for each structure, an ``(n_samples, n)`` float64 tensor
        on the CPU (``n`` values per sample: components times properties)
    """
    systems = prepare_systems(frames, model)
    requests = {
        name: ModelOutput(sample_kind=model.natural_sample_kind(name))
        for name in outputs
    }
    predictions: dict[str, list[torch.Tensor]] = {name: [] for name in outputs}
    evaluator = RotatedEvaluator(model, O3Grid.identity())
    for chunk in evaluator.stream(systems, requests):
        for name, output in chunk.outputs.items():
            if len(output.blocks) != 1:
                raise ValueError(
                    f"output '{name}' has {len(output.blocks)} blocks; only "
                    "single-block outputs can be compared with dataset targets"
                )
            values = output.blocks[0].values[0]
            values = values.to(device="cpu", dtype=torch.float64)
            predictions[name].append(values.reshape(values.shape[0], -1))
    return predictions


# ---------------------------------------------------------------------- targets
def _check_target(
    key: str, name: str, index: int, prediction: torch.Tensor, reference: torch.Tensor
) -> None:
    if prediction.numel() != reference.numel():
        raise ValueError(
            f"the target '{key}' of structure {index} has {reference.numel()} "
            f"values but the output '{name}' has {prediction.numel()}"
        )


def _has_key(atoms, key: str) -> bool:
    return reference_value(atoms, key) is not None


def _read_target(atoms, key: str, index: int) -> torch.Tensor:
    try:
        array = reference_value(atoms, key)
    except ValueError as error:
        raise ValueError(f"structure {index}: {error}") from error
    if array is None:
        raise ValueError(
            f"structure {index} has no target '{key}' (looked in atoms.info, "
            "atoms.arrays and calculator results); name the right key with --targets"
        )
    if array.shape == (6,) and key.endswith("stress"):
        from ase.stress import voigt_6_to_full_3x3_stress

        array = voigt_6_to_full_3x3_stress(array)
    return torch.from_numpy(array.copy()).reshape(-1)
