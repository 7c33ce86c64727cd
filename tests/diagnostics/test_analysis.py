import warnings

import ase
import metatensor.torch as mts
import numpy as np
import pytest
import torch

import metatrain_symmetry as msym
from metatrain_symmetry.irreps import spectrum_column
from tests.helpers import (
    OFFSET,
    AnalyticModel,
    PairPotential,
    capabilities,
    pair_capabilities,
)


ANALYTIC = ["mtt::x_z", "mtt::x_z_squared", "mtt::triple", "mtt::distance"]


def spectrum_of(result, name):
    block = result.spectrum[name].block()
    assert block.samples.names == ["system"]
    assert block.properties.names == ["chi_lambda", "chi_sigma"]
    values = block.values
    entries = {
        (int(lam), int(s)): values[:, i]
        for i, (lam, s) in enumerate(block.properties.values.tolist())
    }
    return entries


@pytest.fixture
def analytic_model():
    return msym.load_model(AnalyticModel(), capabilities=capabilities())


def test_analytic_spectra(analytic_model, molecules):
    expected = {
        "mtt::x_z": {(1, 1): 1.0},
        "mtt::x_z_squared": {(0, 1): 5 / 9, (2, 1): 4 / 9},
        "mtt::triple": {(0, -1): 1.0},
        "mtt::distance": {(0, 1): 1.0},
        "mtt::legendre_2": {(2, 1): 1.0},
        "mtt::legendre_1_3": {(1, 1): 0.84, (3, 1): 0.16},
        "mtt::harmonics_2": {(2, 1): 1.0},
        "mtt::harmonics_1_3": {(1, 1): 0.84, (3, 1): 0.16},
    }
    result = msym.analyze(analytic_model, molecules, list(expected), max_lambda=4)
    assert not result.estimated and result.spectrum_error == {}
    for name, pure in expected.items():
        spectrum = spectrum_of(result, name)
        for irrep, values in spectrum.items():
            target = pure.get(irrep, 0.0)
            assert torch.allclose(
                values, torch.full_like(values, target), atol=1e-12
            ), (name, irrep, values)
        total = sum(spectrum.values())
        assert torch.allclose(total, torch.ones_like(total), atol=1e-12)


def test_analytic_variance_and_average(analytic_model, molecules):
    result = msym.analyze(analytic_model, molecules, ANALYTIC, max_lambda=2)
    # invariant outputs are compared with their mean: (R x)_z has variance 1/3,
    # (R x)_z^2 has E[z^4] - E[z^2]^2 = 1/5 - 1/9, the pseudoscalar t^2
    variance = result.variance
    assert torch.allclose(
        variance["mtt::x_z"].block().values, torch.tensor(1 / 3, dtype=torch.float64)
    )
    assert torch.allclose(
        variance["mtt::x_z_squared"].block().values,
        torch.tensor(1 / 5 - 1 / 9, dtype=torch.float64),
    )
    triple = variance["mtt::triple"].block().values
    reference = []
    for frame in molecules:
        vectors = frame.positions[1:4] - frame.positions[0]
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        reference.append(np.dot(vectors[0], np.cross(vectors[1], vectors[2])) ** 2)
    assert np.allclose(triple.numpy().ravel(), reference, rtol=1e-12)
    assert variance["mtt::distance"].block().values.abs().max() < 1e-20
    # the averages of (R x)_z and of the pseudoscalar vanish, (R x)_z^2 -> 1/3
    assert result.average["mtt::x_z"].block().values.abs().max() < 1e-14
    assert result.average["mtt::triple"].block().values.abs().max() < 1e-14
    assert torch.allclose(
        result.average["mtt::x_z_squared"].block().values,
        torch.tensor(1 / 3, dtype=torch.float64),
    )


def test_equivariant_vector_has_zero_variance(analytic_model, periodic_frames):
    result = msym.analyze(
        analytic_model, periodic_frames, ["non_conservative_force"], max_lambda=3
    )
    variance = result.variance["non_conservative_force"]
    assert variance.keys.names == ["o3_lambda", "o3_sigma"]
    assert variance.keys.values.tolist() == [[1, 1]]
    norm = min(
        float(((frame.positions - frame.positions.mean(0)) ** 2).sum(1).min())
        for frame in periodic_frames
    )
    assert float(variance.block().values.max()) < 1e-20 * norm
    # the average of an exactly equivariant output is the output itself
    average = result.average["non_conservative_force"].block().values.squeeze(-1)
    expected = np.concatenate(
        [frame.positions - frame.positions.mean(0) for frame in periodic_frames]
    )
    assert np.allclose(average.numpy(), expected, atol=1e-12)
    spectrum = spectrum_of(result, "non_conservative_force")
    assert torch.allclose(spectrum[(1, 1)], torch.ones(2, dtype=torch.float64))
    rmse = result.equivariance_rmse("non_conservative_force")
    assert rmse.shape == (2,) and float(rmse.max()) < 1e-10


def test_spherical_outputs(analytic_model, molecules):
    names = ["mtt::spherical_x", "mtt::axial", "mtt::axial_as_polar"]
    result = msym.analyze(analytic_model, molecules, names, max_lambda=2)
    cross = []
    for frame in molecules:
        vectors = frame.positions[1:3] - frame.positions[0]
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        cross.append(np.linalg.norm(np.cross(vectors[0], vectors[1])) ** 2)
    cross = torch.tensor(cross, dtype=torch.float64)
    for name, irrep in [
        ("mtt::spherical_x", (1, 1)),
        ("mtt::axial", (1, -1)),
        ("mtt::axial_as_polar", (1, -1)),
    ]:
        spectrum = spectrum_of(result, name)
        torch.testing.assert_close(spectrum[irrep], torch.ones(3, dtype=torch.float64))
        variance = result.variance[name]
        sigma = 1 if name == "mtt::axial_as_polar" else irrep[1]
        assert variance.keys.values.tolist() == [[1, sigma]]
        values = variance.block().values.reshape(-1)
        if name == "mtt::axial_as_polar":
            # the declared parity is wrong: z(-g) = -z(g), so the average vanishes
            torch.testing.assert_close(values, cross / 3, rtol=1e-12, atol=0)
            average = result.average[name].block().values
            assert float(average.abs().max()) < 1e-14
        else:
            assert float(values.max()) < 1e-20


def test_equivariance_rmse_reduces_per_structure(analytic_model, molecules):
    result = msym.analyze(analytic_model, molecules, ["mtt::x_z"], max_lambda=1)
    rmse = msym.equivariance_rmse(result.variance["mtt::x_z"])
    assert torch.allclose(rmse, torch.full((3,), (1 / 3) ** 0.5, dtype=torch.float64))


# exact spectra of analytic outputs whose mean square is the same in every
# orientation, so that the normalization of their random-grid spectra is exact
PURE_SPECTRA = {
    "mtt::triple": {(0, -1): 1.0},
    "mtt::harmonics_2": {(2, 1): 1.0},
    "mtt::harmonics_1_3": {(1, 1): 0.84, (3, 1): 0.16},
    "mtt::offset_harmonics_2": {
        (0, 1): OFFSET**2 / (OFFSET**2 + 1),
        (2, 1): 1 / (OFFSET**2 + 1),
    },
}
IRREPS = [(lam, sigma) for lam in range(5) for sigma in (1, -1)]
N_SEEDS = 40


@pytest.fixture(scope="module")
def random_spectra():
    """Spectra of :py:data:`PURE_SPECTRA` estimated with ``O3Grid.random(16)`` on
    ``N_SEEDS`` seeds, for three structures: per output, the per-structure
    estimates and errors ``(seeds, structures, irreps)`` and the dataset means and
    their errors ``(seeds, irreps)``."""
    rng = np.random.default_rng(3)
    frames = [ase.Atoms("CHHH", positions=rng.normal(size=(4, 3))) for _ in range(3)]
    model = msym.load_model(AnalyticModel(), capabilities=capabilities())
    collected = {name: ([], [], [], []) for name in PURE_SPECTRA}
    for seed in range(N_SEEDS):
        result = msym.analyze(
            model,
            frames,
            list(PURE_SPECTRA),
            max_lambda=4,
            grid=msym.O3Grid.random(16, seed=seed),
        )
        assert result.estimated
        for name, lists in collected.items():
            mean, mean_error = result.mean_spectrum(name)
            for target, value in zip(
                lists,
                (
                    result.spectrum[name].block().values,
                    result.spectrum_error[name].block().values,
                    mean,
                    mean_error,
                ),
                strict=True,
            ):
                target.append(value)
    return {
        name: [torch.stack(values) for values in lists]
        for name, lists in collected.items()
    }


def test_random_spectra_are_unbiased(random_spectra):
    # the plug-in estimate of the squared mean puts about (2 lambda + 1)^2 / N in
    # every channel of the right parity (6 in (3, +1) for the triple product)
    for name, pure in PURE_SPECTRA.items():
        _, _, means, mean_errors = random_spectra[name]
        average = means.mean(dim=0)
        # the seeds are independent: the error of the average of their estimates
        error = mean_errors.square().mean(dim=0).sqrt() / N_SEEDS**0.5
        for column, irrep in enumerate(IRREPS):
            expected = pure.get(irrep, 0.0)
            deviation = abs(float(average[column]) - expected)
            assert deviation <= 4 * float(error[column]) + 1e-10, (
                name,
                irrep,
                float(average[column]),
                float(error[column]),
            )


def test_random_spectra_resolve_small_parts_next_to_a_large_constant(random_spectra):
    """The noise of the non-trivial channels is that of the orientation-dependent
    part, not of the constant. A pair U-statistic over ``M`` pairs of a response of
    mean square ``s`` scatters by about ``(2 lambda + 1) sqrt(2 / (M (M - 1))) s``
    per channel; estimated on the differences to a reference pair (the centred
    channels) it costs up to 3 times that (theory page). Estimated on the pairs
    themselves, the constant would put that noise with ``s`` the whole mean square
    into the channels of its parity: about 1e4 times the varying part's weight."""
    values, errors, _, _ = random_spectra["mtt::offset_harmonics_2"]
    # the whole weight of the varying part, all in (2, +1)
    small = 1 / (OFFSET**2 + 1)
    n_pairs = 8
    for column, irrep in enumerate(IRREPS):
        if irrep == (0, 1):
            continue
        scale = (2 * irrep[0] + 1) * (2 / (n_pairs * (n_pairs - 1))) ** 0.5 * small
        deviation = values[..., column] - (small if irrep == (2, 1) else 0.0)
        assert float(deviation.square().mean().sqrt()) < 3 * scale, irrep
        assert float(errors[..., column].square().mean().sqrt()) < 3 * scale, irrep


def test_random_spectra_keep_the_digits_of_a_small_part():
    """A varying part 1e8 times smaller than the constant (the equivariance
    error of a box's energy is about 1e-7 of it) keeps its spectrum: squares
    of the constant must not enter the estimate."""
    offset = 1e8
    model = msym.load_model(AnalyticModel(offset=offset), capabilities=capabilities())
    frames = [ase.Atoms("CHHH", positions=np.random.default_rng(5).normal(size=(4, 3)))]
    result = msym.analyze(
        model,
        frames,
        ["mtt::offset_harmonics_2"],
        max_lambda=3,
        grid=msym.O3Grid.random(64, seed=0),
    )
    values = result.spectrum["mtt::offset_harmonics_2"].block().values[0]
    errors = result.spectrum_error["mtt::offset_harmonics_2"].block().values[0]
    for column, irrep in enumerate([(lam, s) for lam in range(4) for s in (1, -1)]):
        expected = PURE_SPECTRA["mtt::harmonics_2"].get(irrep, 0.0) / offset**2
        if irrep != (0, 1):
            assert abs(float(values[column]) - expected) <= 5 * float(errors[column])
            assert float(errors[column]) < 1 / offset**2, irrep


def test_random_spectrum_errors_match_spread(random_spectra):
    """The reported standard errors match the spread of the estimates over seeds.

    With 40 seeds the sample standard deviation of these heavy-tailed estimates
    has a relative error of about 15 %, so single channels must agree within a
    factor 1.6 and the channels of one output pooled together within 25 %; an
    error that ignores the pairing of rotations with their inversions or the
    fourth-order correction is off by a factor about 1.4 in most channels.
    """
    for name in PURE_SPECTRA:
        values, errors, means, mean_errors = random_spectra[name]
        for estimates, reported in ((values, errors), (means, mean_errors)):
            spread = estimates.var(dim=0)
            predicted = reported.square().mean(dim=0)
            resolved = spread > 1e-20
            # channels that the parity separates exactly have no error
            assert float(predicted[~resolved].max()) < 1e-16
            ratio = (predicted[resolved] / spread[resolved]).sqrt()
            assert float(ratio.min()) > 1 / 1.6 and float(ratio.max()) < 1.6, (
                name,
                ratio,
            )
            pooled = (predicted[resolved].sum() / spread[resolved].sum()).sqrt()
            assert 0.8 < float(pooled) < 1.25, (name, float(pooled))


def test_random_equivariance_error_is_unbiased(analytic_model, molecules):
    """``(R x)_z^2`` declared invariant has ``A = 1/5 - 1/9``. Its values at a
    rotation and at its inversion are equal, so the plug-in variance over 10
    elements (5 independent pairs) is biased low by ``A / 5``."""
    n_seeds = 200
    values, errors = [], []
    for seed in range(n_seeds):
        with warnings.catch_warnings():
            # the spectrum's normalization is noisy here, and not tested
            warnings.simplefilter("ignore", UserWarning)
            result = msym.analyze(
                analytic_model,
                molecules[:2],
                ["mtt::x_z_squared"],
                max_lambda=0,
                grid=msym.O3Grid.random(10, seed=seed),
            )
        values.append(result.variance["mtt::x_z_squared"].block().values.reshape(-1))
        errors.append(
            result.variance_error["mtt::x_z_squared"].block().values.reshape(-1)
        )
    values, errors = torch.stack(values), torch.stack(errors)
    expected = 1 / 5 - 1 / 9
    error = errors.square().mean(dim=0).sqrt() / n_seeds**0.5
    assert bool(((values.mean(dim=0) - expected).abs() < 3 * error).all()), (
        values.mean(dim=0),
        error,
    )
    # the test resolves the bias of the plug-in estimate
    assert float(error.max()) < expected / 5 / 3.5
    ratio = (errors.square().mean(dim=0) / values.var(dim=0)).sqrt()
    assert bool(((ratio > 0.7) & (ratio < 1.4)).all()), ratio
    # equivariant outputs have no error
    result = msym.analyze(
        analytic_model,
        molecules,
        ["mtt::spherical_x"],
        max_lambda=1,
        grid=msym.O3Grid.random(16, seed=1),
    )
    assert float(result.variance["mtt::spherical_x"].block().values.max()) < 1e-20


def test_exact_grids_do_not_estimate(analytic_model, molecules, monkeypatch):
    """Exact grids compute their quadratures as before random-grid estimates
    existed: no estimator runs and no standard error is reported (their values
    are checked against metatomic's SymmetrizedModel and analytic spectra
    elsewhere)."""
    from metatrain_symmetry.diagnostics import accumulators, assembly

    def forbidden(*args, **kwargs):
        raise AssertionError("exact grids do not estimate")

    # every estimator each module imports (monkeypatch raises if a name is gone)
    estimators = {
        accumulators: ("factored_u_statistic", "paired_mean_square_deviation"),
        assembly: ("pair_u_covariance", "pair_u_statistic"),
    }
    for module, functions in estimators.items():
        for function in functions:
            monkeypatch.setattr(module, function, forbidden)
    names = [
        "mtt::x_z_squared",
        "mtt::triple",
        "mtt::axial_as_polar",
        "non_conservative_force",
    ]
    result = msym.analyze(
        analytic_model, molecules, names, max_lambda=2, grid=msym.O3Grid(5)
    )
    assert not result.estimated
    assert result.variance_error == {} and result.spectrum_covariance == {}


def test_random_grid_needs_five_pairs(analytic_model, molecules):
    with pytest.raises(ValueError, match="at least 10 elements"):
        msym.analyze(
            analytic_model,
            molecules,
            ["mtt::x_z"],
            max_lambda=1,
            grid=msym.O3Grid.random(8),
        )


def test_random_grid_estimates(analytic_model, molecules):
    grid = msym.O3Grid.random(2000, seed=0)
    result = msym.analyze(
        analytic_model, molecules[:1], ["mtt::x_z_squared"], max_lambda=2, grid=grid
    )
    spectrum = spectrum_of(result, "mtt::x_z_squared")
    assert abs(float(spectrum[(0, 1)][0]) - 5 / 9) < 0.05
    # the paired cosets separate sigma exactly
    assert float(spectrum[(0, -1)][0]) < 1e-20


def test_batch_size_does_not_change_results(analytic_model, molecules):
    names = ["mtt::x_z_squared", "non_conservative_force"]
    grid = msym.O3Grid(4)
    first = msym.analyze(analytic_model, molecules, names, max_lambda=2, grid=grid)
    second = msym.analyze(
        analytic_model, molecules, names, max_lambda=2, grid=grid, batch_size=7
    )
    for name in names:
        for kind in ("variance", "character_projection", "average", "spectrum"):
            assert mts.allclose(
                getattr(first, kind)[name],
                getattr(second, kind)[name],
                rtol=1e-12,
                atol=1e-14,
            )


def test_bad_input(analytic_model, molecules):
    with pytest.raises(ValueError, match="unknown output 'energy'"):
        msym.analyze(analytic_model, molecules, ["energy"])
    with pytest.raises(ValueError, match="needs an O3Grid of degree at least 10"):
        msym.analyze(analytic_model, molecules, ["mtt::x_z"], 5, grid=msym.O3Grid(8))
    with pytest.raises(ValueError, match="no structures given"):
        msym.analyze(analytic_model, [], ["mtt::x_z"])
    with pytest.raises(ValueError, match="no outputs requested"):
        msym.analyze(analytic_model, molecules, [])
    broken = molecules[0].copy()
    broken.positions[1, 0] = np.nan
    with pytest.raises(ValueError, match="structure 1 has non-finite"):
        msym.analyze(analytic_model, [molecules[1], broken], ["mtt::x_z"])
    copper = ase.Atoms("CuCuCuCu", positions=np.eye(4, 3) * 2.0)
    with pytest.raises(ValueError, match=r"structure 0 contains atomic types \[29\]"):
        msym.analyze(analytic_model, [copper], ["mtt::x_z"])
    with pytest.raises(ValueError, match="inversion=True"):
        msym.analyze(
            analytic_model, molecules, ["mtt::x_z"], 1, grid=msym.O3Grid(2, False)
        )


def test_float32_model_warns(molecules):
    model = msym.load_model(
        AnalyticModel(dtype=torch.float32), capabilities=capabilities("float32")
    )
    with pytest.warns(UserWarning, match="float32"):
        result = msym.analyze(model, molecules, ["mtt::distance"], max_lambda=1)
    # float32 round-off, not symmetry breaking
    assert float(result.variance["mtt::distance"].block().values.max()) < 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        msym.analyze(
            msym.load_model(model, dtype=torch.float64),
            molecules,
            ["mtt::distance"],
            max_lambda=1,
        )


@pytest.mark.filterwarnings("ignore:the mean square")
def test_random_rotations_equivariance_error_is_unbiased_with_its_error(molecules):
    """Over seeds, the per-structure equivariance RMSE of random grids scatters as
    much as its reported standard error says, around the exact grid's value."""
    model = msym.load_model(AnalyticModel(), capabilities=capabilities())
    name = "mtt::x_z_squared"
    exact = msym.analyze(model, molecules, [name], max_lambda=2, grid=msym.O3Grid(8))
    values, errors, means, mean_errors = [], [], [], []
    for seed in range(40):
        result = msym.analyze(
            model,
            molecules,
            [name],
            max_lambda=2,
            grid=msym.O3Grid.random(16, seed=seed),
        )
        values.append(result.equivariance_rmse(name))
        errors.append(result.equivariance_rmse_error[name])
        means.append(float(values[-1].mean()))
        mean_errors.append(result.mean_equivariance_rmse_error[name])
    values, errors = torch.stack(values), torch.stack(errors)
    spread = values.std(dim=0)
    reported = errors.mean(dim=0)
    assert bool(torch.all((reported / spread - 1).abs() < 0.35))
    assert abs(np.mean(mean_errors) / np.std(means) - 1) < 0.35
    # sqrt of an unbiased estimate: within a few standard errors of the mean
    truth = exact.equivariance_rmse(name)
    assert bool(torch.all((values.mean(dim=0) - truth).abs() < 4 * spread / 40**0.5))


@pytest.mark.parametrize("grid", [msym.O3Grid(4), msym.O3Grid.random(16, seed=0)])
def test_zero_output_has_no_spectrum(grid):
    """The conservative forces of an isolated atom vanish: they are zero, not
    broken. Their spectrum is NaN there, the structure is marked in
    ``zero_structures``, and the dataset mean runs over the other structures."""
    model = msym.load_model(PairPotential(), capabilities=pair_capabilities())
    frames = [
        ase.Atoms("Cu", positions=[[0, 0, 0]]),
        ase.Atoms("Cu3", positions=[[0, 0, 0], [2.5, 0, 0], [0.2, 2.4, 0.3]]),
        ase.Atoms("Cu2", positions=[[0, 0, 0], [2.2, 0.4, 0.1]]),
    ]
    result = msym.analyze(model, frames, ["forces"], max_lambda=2, grid=grid)
    assert result.zero_structures["forces"].tolist() == [True, False, False]
    spectra = result.spectrum["forces"].block().values
    assert bool(torch.isnan(spectra[0]).all())
    assert not bool(torch.isnan(spectra[1:]).any())
    mean, _ = result.mean_spectrum("forces")
    assert torch.allclose(mean, spectra[1:].mean(dim=0))
    vector = spectrum_column(1, 1)
    # exactly equivariant forces: all of their weight is in (1, +1)
    assert abs(float(mean[vector]) - 1.0) < (1e-10 if grid.degree else 0.3)
    # a zero output is exactly equivariant: its equivariance error is 0, not NaN
    assert float(result.equivariance_rmse("forces")[0]) == 0.0


def test_noisy_normalization_gives_no_spectrum():
    """With 16 random elements the mean square of a component of a unit vector is
    known to about 60 %: its normalized spectrum is not given, with a warning that
    says how many elements would resolve it; its equivariance error still is."""
    model = msym.load_model(AnalyticModel(), capabilities=capabilities())
    frames = [ase.Atoms("CHHH", positions=np.random.default_rng(1).normal(size=(4, 3)))]
    with pytest.warns(UserWarning, match=r"use at least (\d+) random elements"):
        result = msym.analyze(
            model,
            frames,
            ["mtt::legendre_1_3", "mtt::harmonics_1_3"],
            max_lambda=3,
            grid=msym.O3Grid.random(16, seed=0),
        )
    assert bool(torch.isnan(result.spectrum["mtt::legendre_1_3"].block().values).all())
    assert bool(torch.isnan(result.mean_spectrum("mtt::legendre_1_3")[0]).all())
    assert bool(torch.isfinite(result.equivariance_rmse("mtt::legendre_1_3")).all())
    # the same weights with a norm that does not depend on orientation
    values = result.spectrum["mtt::harmonics_1_3"].block().values
    assert bool(torch.isfinite(values).all())
    assert not bool(result.zero_structures["mtt::legendre_1_3"].any())
