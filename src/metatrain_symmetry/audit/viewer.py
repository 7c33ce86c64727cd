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

The views are methods of the audit result (:py:class:`ChemiscopeViews` is the
part of :py:class:`~metatrain_symmetry.AuditResult` that draws it), so that an
audit shows itself in Jupyter.
"""

from __future__ import annotations

import gzip
import html
import io
import json
import os
from pathlib import Path

import numpy as np

from ..irreps import sigma_index, spectrum_irreps


# spectra as chemiscope parameterised properties: one axis carries both lambda and
# sigma, with sigma = -1 half a step to the right of sigma = +1
SPECTRUM_PARAMETER = "irrep"

# the largest deviation arrow is drawn this long (in Angstrom)
ARROW_LENGTH = 1.0

_ESTIMATE = (
    "; a Monte-Carlo estimate from a random grid (unbiased, so it can be "
    "negative), see the matching standard error"
)


class ChemiscopeViews:
    """The chemiscope views of an audit: the part of
    :py:class:`~metatrain_symmetry.AuditResult` that builds its chemiscope
    dataset and shows it as a widget.

    It reads the audit through the result's attributes (``summary``, ``analysis``,
    ``outputs``, ``targets``, ``frames``, ``screen``) and per-structure measures
    (``leakage``, ``structure_errors``, ``atom_equivariance_errors``,
    ``deviations``).
    """

    def chemiscope_input(self, frames: list | None = None, cutoff: float = 3.5) -> dict:
        """The chemiscope input of the audit.

        :param frames: the audited structures (``ase.Atoms``) in audit order; by
            default those the audit holds
        :param cutoff: radius (Angstrom) of the atomic environments drawn when an
            atom is selected
        :return: a dictionary in chemiscope's input format, as returned by
            :py:func:`chemiscope.create_input` (which validates it)
        """
        import chemiscope

        frames = self.frames if frames is None else frames
        if len(frames) != self.n_structures:
            raise ValueError(
                f"the audit covers {self.n_structures} structures but "
                f"{len(frames)} were given"
            )
        frames = [_plain_atoms(atoms) for atoms in frames]
        properties = {
            "structure index": _structure_property(
                np.arange(len(frames)),
                "position of the structure in the audited dataset",
            ),
            **self._output_properties(),
            **self._spectrum_properties(),
        }
        force_outputs = [name for name in self.outputs if self.is_force(name)]
        shapes = {}
        for name in force_outputs:
            properties[f"{name}: atom equivariance error"] = self._atom_property(name)
            shapes[f"{name}: deviation"] = self._deviation_arrows(name)
        environments = None
        if force_outputs:
            environments = chemiscope.all_atomic_environments(frames, cutoff=cutoff)
        data = chemiscope.create_input(
            frames,
            metadata={"name": audit_title(self.summary), "description": self._about()},
            properties=properties,
            environments=environments,
            shapes=shapes or None,
            settings=self._default_settings(force_outputs, properties),
            parameters={SPECTRUM_PARAMETER: _spectrum_axis(self.analysis.max_lambda)},
        )
        return data

    def show(self, mode: str = "default"):
        """The audit as an interactive chemiscope widget, as
        :py:func:`chemiscope.show` makes (in Jupyter, an audit result displays
        itself this way).

        :param mode: ``"default"``, ``"structure"`` or ``"map"``
        """
        import chemiscope

        if len(self.frames) == 0:
            raise ValueError(
                "this audit does not hold its structures; build the widget with "
                "chemiscope.show_input(chemiscope_dataset(frames, result))"
            )
        dataset = self.chemiscope_input()
        return chemiscope.show_input(io.StringIO(json.dumps(dataset)), mode=mode)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.show())

    def _output_properties(self) -> dict[str, dict]:
        """Per output, one value per structure: equivariance RMSE, leakage and
        error against the target (with standard errors on random grids)."""
        analysis = self.analysis
        estimated = analysis.estimated
        estimate = _ESTIMATE if estimated else ""
        properties: dict[str, dict] = {}
        for name in self.outputs:
            unit = self.summary["outputs"][name]["unit"]
            properties[f"{name}: equivariance RMSE"] = _structure_property(
                analysis.equivariance_rmse(name).numpy(),
                f"RMS deviation of '{name}' (back-transformed) from its O(3) average"
                + estimate,
                unit,
            )
            if estimated:
                properties[f"{name}: equivariance RMSE standard error"] = (
                    _structure_property(
                        analysis.equivariance_rmse_error[name].numpy(),
                        "standard error of the Monte-Carlo estimate of the "
                        f"equivariance RMSE of '{name}'",
                        unit,
                    )
                )
            leakage = self.leakage(name)
            if leakage is not None:
                properties[f"{name}: leakage"] = _structure_property(
                    leakage.numpy(),
                    f"1 - spectral weight of '{name}' at the irrep(s) it should "
                    "carry" + estimate,
                )
                error = self.leakage_error(name)
                if error is not None:
                    properties[f"{name}: leakage standard error"] = _structure_property(
                        error.numpy(),
                        "standard error of the Monte-Carlo estimate of the "
                        f"leakage of '{name}'",
                    )
            screen = self.screen.get(name)
            if screen is not None:
                properties[f"{name}: relative Lie derivative"] = _structure_property(
                    screen["relative_lie_derivative"].numpy(),
                    f"sqrt(sum_k |L_k f|^2 / |f|^2) of '{name}' along the three "
                    "generators of rotations (infinitesimal screen, per radian)",
                )
            errors = self.structure_errors(name)
            if errors is not None:
                properties[f"{name}: error"] = _structure_property(
                    errors.numpy(),
                    f"RMSE of the prediction of '{name}' against the dataset target "
                    f"'{self.targets[name]}'",
                    unit,
                )
        return properties

    def _spectrum_properties(self) -> dict[str, dict]:
        """Per output and feature, its normalized spectrum (and on random grids
        its standard error) as properties parameterised by ``(lambda, sigma)``."""
        analysis = self.analysis
        shape = (self.n_structures, 2 * (analysis.max_lambda + 1))
        estimate = _ESTIMATE if analysis.estimated else ""
        properties = {}
        for name in analysis.outputs:
            properties[f"{name}: spectrum"] = _spectrum_property(
                analysis.spectrum[name],
                shape,
                f"normalized (lambda, sigma) spectrum of '{name}'; sigma = -1 is "
                "drawn at lambda + 0.5" + estimate,
            )
            if analysis.estimated:
                properties[f"{name}: spectrum standard error"] = _spectrum_property(
                    analysis.spectrum_error[name],
                    shape,
                    "standard error of the Monte-Carlo estimate of the spectrum "
                    f"of '{name}'",
                )
        return properties

    def _atom_property(self, name: str) -> dict:
        """The per-atom equivariance error of a force output."""
        per_atom = self.atom_equivariance_errors(name)
        return {
            "target": "atom",
            "values": np.concatenate([e.numpy() for e in per_atom]),
            "units": self.summary["outputs"][name]["unit"],
            "description": f"per-atom RMS deviation of '{name}' from its O(3) average",
        }

    def _deviation_arrows(self, name: str) -> dict:
        """Arrows from each atom along the deviation of a force output from its
        O(3) average, the longest ``ARROW_LENGTH`` long."""
        deviations = [d.numpy() for d in self.deviations(name)]
        largest = max(
            (float(np.linalg.norm(d, axis=1).max()) for d in deviations if len(d)),
            default=0.0,
        )
        scale = ARROW_LENGTH / largest if largest > 0 else 1.0
        return {
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

    def _default_settings(self, force_outputs: list[str], properties: dict) -> dict:
        """What the viewer shows first: equivariance RMSEs on the map coloured by
        leakage, and the first force output's errors on the structure (from
        ``properties``, the dataset's)."""
        outputs = self.outputs
        x = f"{outputs[0]}: equivariance RMSE"
        y = (
            f"{outputs[1]}: equivariance RMSE"
            if len(outputs) > 1
            else "structure index"
        )
        map_settings = {
            "x": {"property": x, "scale": "linear"},
            "y": {"property": y, "scale": "linear"},
        }
        for name in outputs:
            if self.leakage(name) is not None:
                map_settings["color"] = {"property": f"{name}: leakage"}
                break
        structure = {"keepOrientation": False}
        if force_outputs:
            colour = f"{force_outputs[0]}: atom equivariance error"
            # a fixed range: chemiscope's own, from the atoms shown, is empty on a
            # structure whose atoms all have the same error (a single atom)
            largest = float(np.max(properties[colour]["values"], initial=0.0))
            structure["color"] = {
                "property": colour,
                "min": 0.0,
                "max": largest if largest > 0 else 1.0,
            }
            structure["shape"] = [f"{force_outputs[0]}: deviation"]
            structure["environments"] = {"activated": False}
        return {"map": map_settings, "structure": [structure], "target": "structure"}

    def _about(self) -> str:
        """The description of the dataset shown in the viewer."""
        grid = self.summary["grid"]
        kind = (
            f"{grid['n_elements']} random elements: spectra and leakages are "
            "Monte-Carlo estimates with standard errors"
            if self.analysis.estimated
            else f"{grid['n_elements']} elements (degree {grid['degree']})"
        )
        lines = [
            f"{self.n_structures} structures, O(3) grid of {kind}, max lambda "
            f"{self.analysis.max_lambda}.",
            "Map: per-structure equivariance RMSE, leakage and error of each output. "
            "Spectra: normalized (lambda, sigma) content of outputs and features. "
            "Arrows: deviation of each force from its rotational average (the "
            f"longest drawn {ARROW_LENGTH} Angstrom long).",
        ]
        return "\n".join(lines)


def chemiscope_dataset(
    frames: list, result: ChemiscopeViews, cutoff: float = 3.5
) -> dict:
    """Build the chemiscope input of an audit.

    :param frames: the audited structures (``ase.Atoms``), in audit order
    :param result: the audit of these structures, see :py:func:`audit`
    :param cutoff: radius (Angstrom) of the atomic environments drawn when an atom
        is selected
    :return: a dictionary in chemiscope's input format, as returned by
        :py:func:`chemiscope.create_input` (which validates it)
    """
    return result.chemiscope_input(frames, cutoff)


def _structure_property(values, description: str, unit: str | None = None) -> dict:
    """A chemiscope property with one value per structure."""
    entry = {"target": "structure", "values": values, "description": description}
    if unit is not None:
        entry["units"] = unit
    return entry


def _spectrum_property(spectrum, shape: tuple[int, int], description: str) -> dict:
    """A per-structure spectrum (a TensorMap of one block) as a property
    parameterised by ``(lambda, sigma)``, ``(n_structures, n_irreps)``."""
    return {
        "target": "structure",
        "values": spectrum.block().values.numpy().reshape(shape),
        "parameters": [SPECTRUM_PARAMETER],
        "description": description,
    }


def _spectrum_axis(max_lambda: int) -> dict:
    """The ``(lambda, sigma)`` axis of the spectrum properties."""
    return {
        "values": np.array(
            [
                o3_lambda + 0.5 * sigma_index(sigma)
                for o3_lambda, sigma in spectrum_irreps(max_lambda)
            ]
        ),
        "name": "lambda (sigma = -1 at lambda + 0.5)",
    }


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


def write_chemiscope(dataset: dict, path: str | os.PathLike) -> None:
    """Write a chemiscope dataset as (gzip-compressed when ``path`` ends with
    ``.gz``) JSON, with ``NaN`` for the values a structure does not have (as
    chemiscope writes and reads them: such points are hidden from the map)."""
    text = json.dumps(dataset).encode("utf8")
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
<script>window.chemiscopeDataset = {dataset};</script>
<script>{library}</script>
<script>
(async () => {{
  const config = {{
    map: "chemiscope-map", info: "chemiscope-info",
    meta: "chemiscope-meta", structure: "chemiscope-structure",
  }};
  try {{
    window.visualizer = await Chemiscope.DefaultVisualizer.load(
      config, window.chemiscopeDataset);
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
    # a JavaScript literal, which reads the NaN of missing values; "<" escaped
    # (it only occurs in strings) so that it cannot end its <script> element early
    text = json.dumps(dataset).replace("<", "\\u003c")
    page = _PAGE.format(
        title=html.escape(title),
        dataset=text,
        library=_inline_script(chemiscope_library()),
    )
    Path(path).write_text(page, encoding="utf8")
