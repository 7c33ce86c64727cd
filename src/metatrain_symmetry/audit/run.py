"""The audit of a model on a dataset: unrotated predictions against the dataset's
targets, and the rotational analysis of outputs and features, spread over
processes and resumable."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from functools import partial

import torch

from ..data import check_close_atoms, read_structures
from ..diagnostics import (
    DEFAULT_MAX_LAMBDA,
    AnalysisPart,
    AnalysisPlan,
    run_context,
)
from ..distributed import run_resumable
from ..grid import O3Grid
from ..identity import dataset_identity, model_identity
from ..infinitesimal import infinitesimal
from ..models import LoadedModel, ModelLike, load_model
from ..quantities import DERIVED_OUTPUTS, FEATURE_PREFIX, expected_irreps
from .result import SCREEN_MEASURES, AuditResult
from .summary import describe_outputs
from .targets import check_target, predict, read_target, resolve_targets


def audit(
    model: ModelLike,
    frames: Sequence | str | os.PathLike,
    outputs: Sequence[str] | None = None,
    features: Sequence[str] | str = (),
    targets: dict[str, str] | None = None,
    max_lambda: int = DEFAULT_MAX_LAMBDA,
    grid: O3Grid | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    distributed: bool = False,
    work_dir: str | os.PathLike | None = None,
    allow_close_atoms: bool = False,
    infinitesimal: bool = False,
) -> AuditResult | None:
    """Audit the rotational symmetry of a model on a dataset.

    :param model: anything :py:func:`load_model` accepts (exported model, metatrain
        checkpoint, module); a model read from a file is identified in the summary
        by the file's path and SHA-256
    :param frames: ``ase.Atoms`` structures, or a file ASE can read (identified
        in the summary the same way)
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
    :param dtype: run the model in this dtype (default: its own)
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
    :param allow_close_atoms: warn, instead of raising, on structures with atoms
        closer than :py:data:`~metatrain_symmetry.data.CLOSE_ATOMS_DISTANCE`
    :param infinitesimal: also screen the structures with the infinitesimal
        metrics of :py:func:`~metatrain_symmetry.infinitesimal.infinitesimal`,
        ranked against the grid's errors
    :return: the audit, with its JSON-ready ``summary``; ``None`` on ranks other
        than 0 when ``distributed``
    """
    context = run_context(distributed)
    loaded = load_model(model, dtype=dtype, device=device)
    frames, data_path = _read_frames(frames, allow_close_atoms)
    outputs, targets = resolve_targets(loaded, frames, outputs, targets)
    features = _ordered_features(loaded, features)
    _check_outputs(loaded, outputs, max_lambda)
    plan = AnalysisPlan(loaded, outputs + features, max_lambda, grid, batch_size)
    request = _AuditRequest(
        plan, outputs, features, targets, frames, data_path, infinitesimal
    )
    manifest = None
    if work_dir is not None:
        manifest = request.plan.manifest(
            "audit", request.systems, audited_outputs=outputs, screen=infinitesimal
        )
    parts = run_resumable(
        request.plan.costs(request.systems),
        partial(request.run, progress=progress and context.is_main),
        context,
        work_dir,
        manifest,
        result_types=AnalysisPlan.PART_TYPES,
    )
    return None if parts is None else request.result(parts)


class _AuditRequest:
    """A checked audit: the analysis plan, what is compared with which targets,
    and the structures with their targets read."""

    def __init__(
        self, plan: AnalysisPlan, outputs, features, targets, frames, path, screen
    ):
        self.plan = plan
        self.screen = screen
        self.outputs = outputs
        self.features = features
        self.targets = targets
        self.frames = frames
        self.data_path = path
        self.references = {
            name: [read_target(atoms, key, index) for index, atoms in enumerate(frames)]
            for name, key in targets.items()
        }
        self.systems = plan.prepare(frames)

    def run(
        self, mine: dict[int, list[int]], progress: bool
    ) -> Iterator[tuple[int, tuple[AnalysisPart, dict, dict]]]:
        """Unrotated predictions of this rank's shards (checked against the
        targets), then their analysis.

        :param mine: ``{shard: structure indices}``
        :return: ``(shard, (analysis part, per output the shard's predictions,
            per output its screen))`` as each shard completes
        """
        outputs = self.outputs
        indices = [index for shard in mine.values() for index in shard]
        frames = [self.frames[index] for index in indices]
        values = predict(self.plan.model, frames, outputs)
        by_structure = {
            index: {name: values[name][position] for name in outputs}
            for position, index in enumerate(indices)
        }
        for name, key in self.targets.items():
            for index in indices:
                reference = self.references[name][index]
                check_target(key, name, index, by_structure[index][name], reference)
        for shard, part in self.plan.run(self.systems, mine, progress):
            predictions = {
                name: [by_structure[index][name] for index in mine[shard]]
                for name in outputs
            }
            yield shard, (part, predictions, self._screen(mine[shard]))

    def _screen(self, indices: list[int]) -> dict[str, dict[str, torch.Tensor]]:
        """Per output, the infinitesimal screen of the structures ``indices``
        (empty when not asked for)."""
        if not self.screen:
            return {}
        # the prepared systems: their neighbour lists are already computed
        result = infinitesimal(
            self.plan.model, [self.systems[index] for index in indices], self.outputs
        )
        return {
            name: {
                measure: getattr(result, measure)[name] for measure in SCREEN_MEASURES
            }
            for name in self.outputs
        }

    def result(self, parts: list) -> AuditResult:
        """The audit, from the results of every shard in order."""
        predictions = {
            name: [value for _, shard, _ in parts for value in shard[name]]
            for name in self.outputs
        }
        screen = {
            name: {
                measure: torch.cat([shard[name][measure] for _, _, shard in parts])
                for measure in SCREEN_MEASURES
            }
            for name in self.outputs
            if self.screen
        }
        references = {
            name: [
                value.reshape(prediction.shape)
                for value, prediction in zip(values, predictions[name], strict=True)
            ]
            for name, values in self.references.items()
        }
        model = self.plan.model
        return AuditResult(
            analysis=self.plan.assemble([part for part, _, _ in parts]),
            outputs=self.outputs,
            descriptions=describe_outputs(model, self.outputs),
            features=self.features,
            targets=self.targets,
            predictions=predictions,
            references=references,
            model=model_identity(model, model.source),
            dataset=dataset_identity(self.frames, self.data_path),
            frames=self.frames,
            screen=screen,
        )


def _read_frames(
    frames, allow_close_atoms: bool
) -> tuple[list, str | os.PathLike | None]:
    """The structures to audit, and the file they were read from (or ``None``)."""
    if isinstance(frames, (str, os.PathLike)):
        return read_structures(frames, allow_close_atoms=allow_close_atoms), frames
    frames = list(frames)
    if len(frames) == 0:
        raise ValueError("no structures given: pass at least one structure")
    check_close_atoms(frames, allow_close_atoms)
    return frames, None


def _ordered_features(model: LoadedModel, features) -> list[str]:
    """The requested features in the order the model computes them; ``"all"``
    for every feature."""
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


def _check_outputs(model: LoadedModel, outputs: list[str], max_lambda) -> None:
    """Refuse repeated outputs, features given as outputs, derivatives of a
    missing energy, and a ``max_lambda`` below an output's own irrep."""
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
    model.check_names(outputs)
    for name in outputs:
        needed = max((lam for lam, _ in expected_irreps(name) or []), default=0)
        if isinstance(max_lambda, int) and max_lambda < needed:
            raise ValueError(
                f"max_lambda={max_lambda} is below the lambda={needed} that "
                f"'{name}' should carry, so its leakage cannot be measured: pass "
                f"max_lambda={needed} (--max-lambda {needed}) or more"
            )
