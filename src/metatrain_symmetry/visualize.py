"""Interactive exploration of an audit: a chemiscope dataset with one point per
structure, and a self-contained HTML viewer of that dataset.

The dataset holds, per structure, the equivariance RMSE, symmetry leakage and
error of every audited output (map properties), the normalized spectra of outputs
and features as properties parameterised by ``(lambda, sigma)``, and for forces the
per-atom equivariance error (atom property) and the deviation of the prediction
from its rotational average (arrows).

The HTML viewer inlines the chemiscope JavaScript library that the ``chemiscope``
Python package installs, and the dataset itself: opening it needs no network and no
server.
"""

from __future__ import annotations

import gzip
import html
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .irreps import sigma_index, spectrum_irreps


if TYPE_CHECKING:
    # views take an audit; the audit shows itself with them
    from .audit import AuditResult


# spectra as chemiscope parameterised properties: one axis carries both lambda and
# sigma, with sigma = -1 half a step to the right of sigma = +1
SPECTRUM_PARAMETER = "irrep"

# the largest deviation arrow is drawn this long (in Angstrom)
ARROW_LENGTH = 1.0

_ESTIMATE = (
    "; a Monte-Carlo estimate from a random grid (unbiased, so it can be "
    "negative), see the matching standard error"
)


def chemiscope_dataset(
    frames: list,
    result: AuditResult,
    cutoff: float = 3.5,
) -> dict:
    """Build the chemiscope input of an audit.

    :param frames: the audited structures (``ase.Atoms``), in audit order
    :param result: the audit of these structures, see :py:func:`audit`
    :param cutoff: radius (Angstrom) of the atomic environments drawn when an atom
        is selected
    :return: a dictionary in chemiscope's input format, as returned by
        :py:func:`chemiscope.create_input` (which validates it)
    """
    import chemiscope

    if len(frames) != result.n_structures:
        raise ValueError(
            f"the audit covers {result.n_structures} structures but "
            f"{len(frames)} were given"
        )
    frames = [_plain_atoms(atoms) for atoms in frames]
    analysis = result.analysis
    properties: dict[str, dict] = {}
    properties["structure index"] = _structure_property(
        np.arange(len(frames)), "position of the structure in the audited dataset"
    )
    estimate = _ESTIMATE if analysis.estimated else ""
    for name in result.outputs:
        unit = result.summary["outputs"][name]["unit"]
        properties[f"{name}: equivariance RMSE"] = _structure_property(
            analysis.equivariance_rmse(name).numpy(),
            f"RMS deviation of '{name}' (back-transformed) from its O(3) average"
            + estimate,
            unit,
        )
        if analysis.estimated:
            properties[f"{name}: equivariance RMSE standard error"] = (
                _structure_property(
                    analysis.equivariance_rmse_error[name].numpy(),
                    "standard error of the Monte-Carlo estimate of the equivariance "
                    f"RMSE of '{name}'",
                    unit,
                )
            )
        leakage = result.leakage(name)
        if leakage is not None:
            properties[f"{name}: leakage"] = _structure_property(
                leakage.numpy(),
                f"1 - spectral weight of '{name}' at the irrep(s) it should carry"
                + estimate,
            )
            error = result.leakage_error(name)
            if error is not None:
                properties[f"{name}: leakage standard error"] = _structure_property(
                    error.numpy(),
                    "standard error of the Monte-Carlo estimate of the leakage of "
                    f"'{name}'",
                )
        errors = result.structure_errors(name)
        if errors is not None:
            properties[f"{name}: error"] = _structure_property(
                errors.numpy(),
                f"RMSE of the prediction of '{name}' against the dataset target "
                f"'{result.targets[name]}'",
                unit,
            )

    n_columns = 2 * (analysis.max_lambda + 1)
    for name in analysis.outputs:
        values = analysis.spectrum[name].block().values.numpy()
        properties[f"{name}: spectrum"] = {
            "target": "structure",
            "values": values.reshape(len(frames), n_columns),
            "parameters": [SPECTRUM_PARAMETER],
            "description": (
                f"normalized (lambda, sigma) spectrum of '{name}'; sigma = -1 is "
                "drawn at lambda + 0.5" + (_ESTIMATE if analysis.estimated else "")
            ),
        }
        if analysis.estimated:
            errors = analysis.spectrum_error[name].block().values.numpy()
            properties[f"{name}: spectrum standard error"] = {
                "target": "structure",
                "values": errors.reshape(len(frames), n_columns),
                "parameters": [SPECTRUM_PARAMETER],
                "description": (
                    f"standard error of the Monte-Carlo estimate of the spectrum of "
                    f"'{name}'"
                ),
            }

    shapes = {}
    environments = None
    force_outputs = [n for n in result.outputs if result.is_force(n)]
    if force_outputs:
        environments = chemiscope.all_atomic_environments(frames, cutoff=cutoff)
    for name in force_outputs:
        per_atom = result.atom_equivariance_errors(name)
        properties[f"{name}: atom equivariance error"] = {
            "target": "atom",
            "values": np.concatenate([e.numpy() for e in per_atom]),
            "units": result.summary["outputs"][name]["unit"],
            "description": (
                f"per-atom RMS deviation of '{name}' from its O(3) average"
            ),
        }
        deviations = [d.numpy() for d in result.deviations(name)]
        largest = max(
            (float(np.linalg.norm(d, axis=1).max()) for d in deviations if len(d)),
            default=0.0,
        )
        scale = ARROW_LENGTH / largest if largest > 0 else 1.0
        shapes[f"{name}: deviation"] = {
            "kind": "arrow",
            "parameters": {
                "global": {"baseRadius": 0.06, "headRadius": 0.12, "headLength": 0.2},
                "atom": [
                    {"vector": [float(x) * scale for x in vector]}
                    for deviation in deviations
                    for vector in deviation
                ],
            },
        }

    parameters = {
        SPECTRUM_PARAMETER: {
            "values": np.array(
                [
                    o3_lambda + 0.5 * sigma_index(sigma)
                    for o3_lambda, sigma in spectrum_irreps(analysis.max_lambda)
                ]
            ),
            "name": "lambda (sigma = -1 at lambda + 0.5)",
        }
    }
    settings = _default_settings(result, force_outputs, shapes)
    title = audit_title(result.summary)
    data = chemiscope.create_input(
        frames,
        metadata={
            "name": title,
            "description": _description(result),
        },
        properties=properties,
        environments=environments,
        shapes=shapes or None,
        settings=settings,
        parameters=parameters,
    )
    return _finite(data)


def _structure_property(values, description: str, unit: str | None = None) -> dict:
    """A chemiscope property with one value per structure."""
    entry = {"target": "structure", "values": values, "description": description}
    if unit is not None:
        entry["units"] = unit
    return entry


def _plain_atoms(atoms):
    """A copy without calculator, info and arrays, so chemiscope picks up only the
    properties of the audit."""
    import ase

    return ase.Atoms(
        numbers=atoms.numbers,
        positions=atoms.positions,
        cell=atoms.cell,
        pbc=atoms.pbc,
    )


def _default_settings(result: AuditResult, force_outputs, shapes) -> dict:
    outputs = result.outputs
    x = f"{outputs[0]}: equivariance RMSE"
    y = f"{outputs[1]}: equivariance RMSE" if len(outputs) > 1 else "structure index"
    color = None
    for name in outputs:
        if result.leakage(name) is not None:
            color = f"{name}: leakage"
            break
    map_settings = {
        "x": {"property": x, "scale": "linear"},
        "y": {"property": y, "scale": "linear"},
    }
    if color is not None:
        map_settings["color"] = {"property": color}
    structure = {"keepOrientation": False}
    if force_outputs:
        structure["color"] = {
            "property": f"{force_outputs[0]}: atom equivariance error"
        }
        structure["shape"] = [f"{force_outputs[0]}: deviation"]
        structure["environments"] = {"activated": False}
    return {"map": map_settings, "structure": [structure], "target": "structure"}


def _description(result: AuditResult) -> str:
    grid = result.summary["grid"]
    kind = (
        f"{grid['n_elements']} random elements: spectra and leakages are "
        "Monte-Carlo estimates with standard errors"
        if result.analysis.estimated
        else f"{grid['n_elements']} elements (degree {grid['degree']})"
    )
    lines = [
        f"{result.n_structures} structures, O(3) grid of {kind}, max lambda "
        f"{result.analysis.max_lambda}.",
        "Map: per-structure equivariance RMSE, leakage and error of each output. "
        "Spectra: normalized (lambda, sigma) content of outputs and features. "
        "Arrows: deviation of each force from its rotational average (the longest "
        f"drawn {ARROW_LENGTH} Angstrom long).",
    ]
    return "\n".join(lines)


def _finite(value):
    """Replace NaN and infinities (which are not JSON) by ``None``."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_chemiscope(dataset: dict, path: str | os.PathLike) -> None:
    """Write a chemiscope dataset as (gzip-compressed when ``path`` ends with
    ``.gz``) JSON."""
    text = json.dumps(dataset, allow_nan=False).encode("utf8")
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb", 9) as file:
            file.write(text)
    else:
        Path(path).write_bytes(text)


def chemiscope_library() -> str:
    """The chemiscope JavaScript library shipped with the ``chemiscope`` Python
    package (the browser build that defines the global ``Chemiscope``)."""
    import chemiscope

    root = Path(chemiscope.__file__).parent
    path = root / "sphinx" / "static" / "chemiscope.min.js"
    if not path.is_file():
        raise RuntimeError(
            f"the chemiscope package in {root} does not ship chemiscope.min.js; "
            "reinstall chemiscope from PyPI"
        )
    return path.read_text(encoding="utf8")


def _inline_script(code: str) -> str:
    """Make JavaScript safe inside ``<script>``: an HTML parser ends the element
    at ``</script`` and changes state at ``<!--``; ``\\x3C`` is ``<`` in every
    JavaScript string, template and regular expression literal."""
    for sequence in ("</script", "</SCRIPT", "<!--"):
        code = code.replace(sequence, "\\x3C" + sequence[1:])
    return code


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ margin: 0; font-family: sans-serif; background: white; }}
#status {{ color: #a94442; white-space: pre-wrap; padding: 0 1em; }}
#viewer {{ display: flex; flex-wrap: wrap; height: calc(100vh - 1.5em);
  min-height: 480px; }}
#viewer > div {{ flex: 1 1 420px; min-width: 320px; display: flex;
  flex-direction: column; height: 100%; padding: 0 6px; box-sizing: border-box; }}
#chemiscope-map, #chemiscope-structure {{ flex: 1; min-height: 0; position: relative; }}
</style>
</head>
<body data-chemiscope="loading">
<div id="status"></div>
<div id="viewer">
  <div><div id="chemiscope-meta"></div><div id="chemiscope-map"></div></div>
  <div><div id="chemiscope-structure"></div><div id="chemiscope-info"></div></div>
</div>
<script id="chemiscope-dataset" type="application/json">{dataset}</script>
<script>{library}</script>
<script>
(async () => {{
  const config = {{
    map: "chemiscope-map", info: "chemiscope-info",
    meta: "chemiscope-meta", structure: "chemiscope-structure",
  }};
  try {{
    const text = document.getElementById("chemiscope-dataset").textContent;
    window.visualizer = await Chemiscope.DefaultVisualizer.load(
      config, JSON.parse(text));
    document.body.dataset.chemiscope = "loaded";
  }} catch (error) {{
    document.body.dataset.chemiscope = "error";
    document.getElementById("status").textContent = String(error);
    console.error(error);
  }}
}})();
</script>
</body>
</html>
"""


def chemiscope_widget(result: AuditResult, mode: str = "default"):
    """An interactive chemiscope widget of an audit (for Jupyter), made from
    :py:func:`chemiscope_dataset` of its structures.

    :param result: an audit, with its structures in ``result.frames``
    :param mode: ``"default"``, ``"structure"`` or ``"map"``
    """
    import io

    import chemiscope

    if len(result.frames) == 0:
        raise ValueError(
            "this audit does not hold its structures; build the widget with "
            "chemiscope.show_input(chemiscope_dataset(frames, result))"
        )
    dataset = chemiscope_dataset(result.frames, result)
    return chemiscope.show_input(io.StringIO(json.dumps(dataset)), mode=mode)


def audit_title(summary: dict) -> str:
    """``Symmetry audit of <model file> on <dataset file>``, from an audit summary;
    the model's own name, and the number of structures, where there is no file."""
    model, dataset = summary["model"], summary["dataset"]
    if model.get("path"):
        model_name = Path(model["path"]).name
    else:
        model_name = model.get("name") or "an in-memory model"
    if dataset.get("path"):
        dataset_name = Path(dataset["path"]).name
    else:
        dataset_name = f"{dataset['n_structures']} structures"
    return f"Symmetry audit of {model_name} on {dataset_name}"


def write_html_viewer(
    dataset: dict, path: str | os.PathLike, title: str | None = None
) -> None:
    """Write a self-contained HTML page showing ``dataset`` in chemiscope's default
    viewer (map, structure and information panels).

    The page inlines the chemiscope library shipped with the ``chemiscope`` Python
    package and the dataset, so it opens from disk without network access. Once
    the viewer has loaded, ``<body>`` carries ``data-chemiscope="loaded"``
    (``"error"`` and a message on the page if loading failed).

    :param dataset: chemiscope input, see :py:func:`chemiscope_dataset`
    :param path: the HTML file to write
    :param title: page title, by default the dataset's name
    """
    if title is None:
        title = dataset.get("meta", {}).get("name", "chemiscope")
    # "<" escaped: the JSON cannot end its <script> element early
    text = json.dumps(dataset, allow_nan=False).replace("<", "\\u003c")
    page = _PAGE.format(
        title=html.escape(title),
        dataset=text,
        library=_inline_script(chemiscope_library()),
    )
    Path(path).write_text(page, encoding="utf8")
