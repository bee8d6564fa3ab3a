"""Tests for alignfl_mpi.prior: EM fit, sampling, array validation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from alignfl_mpi.errors import MessageError
from alignfl_mpi.prior import (
    GaussianMixturePrior,
    fit_gmm,
    fit_gmm_sklearn,
    standard_normal_prior,
)

TRUE_MEANS = np.array([[-5.0, 0.0], [5.0, 5.0], [0.0, -6.0]])
TRUE_WEIGHTS = np.array([0.2, 0.3, 0.5])


def three_clusters(n: int = 3000, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = (TRUE_WEIGHTS * n).astype(int)
    return np.concatenate(
        [m + 0.5 * rng.standard_normal((c, 2)) for m, c in zip(TRUE_MEANS, counts)]
    )


def sorted_by_first_mean(prior: GaussianMixturePrior) -> tuple[np.ndarray, ...]:
    order = np.lexsort((prior.means[:, 1], prior.means[:, 0]))
    return prior.weights[order], prior.means[order], prior.log_vars[order]


def test_fit_recovers_separated_clusters() -> None:
    prior = fit_gmm(three_clusters(), n_components=3, seed=0)
    weights, means, log_vars = sorted_by_first_mean(prior)
    order = np.lexsort((TRUE_MEANS[:, 1], TRUE_MEANS[:, 0]))
    np.testing.assert_allclose(means, TRUE_MEANS[order], atol=0.1)
    np.testing.assert_allclose(weights, TRUE_WEIGHTS[order], atol=0.05)
    np.testing.assert_allclose(np.exp(log_vars), 0.25, atol=0.05)
    assert prior.weights.dtype == np.float32
    assert prior.weights.sum() == pytest.approx(1.0, abs=1e-6)


def test_fit_is_deterministic_per_seed() -> None:
    x = three_clusters()
    a = fit_gmm(x, n_components=6, seed=3)
    b = fit_gmm(x, n_components=6, seed=3)
    c = fit_gmm(x, n_components=6, seed=4)
    for key in ("weights", "means", "log_vars"):
        np.testing.assert_array_equal(a.to_arrays()[key], b.to_arrays()[key])
    assert not np.array_equal(a.means, c.means)


def test_fit_is_valid_on_client_sized_input() -> None:
    # no wall-clock bound here: timings belong in benchmarks/ (the machine is shared)
    x = np.random.default_rng(0).standard_normal((12000, 2)).astype(np.float32)
    prior = fit_gmm(x, n_components=10, n_iter=100, tol=0.0, seed=0)
    assert prior.n_components == 10 and prior.latent_dim == 2
    assert np.isfinite(prior.to_arrays()["log_vars"]).all()


def test_fewer_samples_than_components() -> None:
    x = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    prior = fit_gmm(x, n_components=10, min_var=1e-3)
    assert prior.n_components == 3
    assert sorted(prior.means[:, 0].round(4).tolist()) == [0.0, 2.0, 4.0]
    np.testing.assert_allclose(np.exp(prior.log_vars), 1e-3, rtol=1e-3)
    single = fit_gmm(x[:1], n_components=4)
    assert single.n_components == 1
    np.testing.assert_allclose(single.means, x[:1])


def test_duplicate_points_and_dead_components_stay_valid() -> None:
    x = np.concatenate([np.zeros((50, 2)), np.full((2, 2), 100.0)])
    prior = fit_gmm(x, n_components=5, seed=0)
    arrays = prior.to_arrays()
    assert all(np.isfinite(a).all() for a in arrays.values())
    assert arrays["weights"].min() > 0
    assert arrays["weights"].sum() == pytest.approx(1.0, abs=1e-6)
    assert np.exp(arrays["log_vars"]).min() >= 1e-4 * (1 - 1e-5)
    GaussianMixturePrior.from_arrays(arrays, latent_dim=2)


def test_sample_shape_determinism_and_moments() -> None:
    prior = GaussianMixturePrior(
        weights=np.array([0.25, 0.75]),
        means=np.array([[-2.0, 0.0, 1.0], [2.0, 1.0, -1.0]]),
        log_vars=np.log(np.array([[0.5, 1.0, 2.0], [1.0, 0.25, 0.1]])),
    )
    a = prior.sample(20000, generator=torch.Generator().manual_seed(7))
    b = prior.sample(20000, generator=torch.Generator().manual_seed(7))
    c = prior.sample(20000, generator=torch.Generator().manual_seed(8))
    assert a.shape == (20000, 3) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, b) and not torch.equal(a, c)
    w, m, v = prior.weights[:, None], prior.means, np.exp(prior.log_vars)
    mean = (w * m).sum(0)
    var = (w * (v + m**2)).sum(0) - mean**2
    np.testing.assert_allclose(a.mean(0).numpy(), mean, atol=0.05)
    np.testing.assert_allclose(a.var(0).numpy(), var, rtol=0.05)
    assert prior.sample(0).shape == (0, 3)


def test_standard_normal_prior() -> None:
    prior = standard_normal_prior(4)
    assert (prior.n_components, prior.latent_dim) == (1, 4)
    z = prior.sample(20000, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(z.mean(0).numpy(), 0.0, atol=0.05)
    np.testing.assert_allclose(z.var(0).numpy(), 1.0, atol=0.05)


def test_array_round_trip_and_renormalisation() -> None:
    prior = fit_gmm(three_clusters(), n_components=3, seed=0)
    arrays = prior.to_arrays()
    assert set(arrays) == {"weights", "means", "log_vars"}
    back = GaussianMixturePrior.from_arrays(arrays, latent_dim=2)
    for key, value in back.to_arrays().items():
        np.testing.assert_array_equal(value, arrays[key])
    arrays["weights"] = arrays["weights"] * (1 + 5e-5)
    renorm = GaussianMixturePrior.from_arrays(arrays)
    assert float(renorm.weights.sum(dtype=np.float64)) == pytest.approx(1.0, abs=1e-6)


def valid_arrays() -> dict[str, np.ndarray]:
    return {
        "weights": np.array([0.5, 0.5]),
        "means": np.zeros((2, 3)),
        "log_vars": np.zeros((2, 3)),
    }


def _with(**changes: object) -> dict[str, object]:
    arrays: dict[str, object] = valid_arrays()
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    return arrays


@pytest.mark.parametrize(
    ("arrays", "reason"),
    [
        (_with(means=np.array([[np.nan, 0, 0], [0, 0, 0]])), "NaN"),
        (_with(log_vars=np.full((2, 3), np.inf)), "NaN"),
        (_with(log_vars=np.full((2, 3), 500.0)), "overflow"),
        (_with(means=np.full((2, 3), 1e300)), "overflow"),
        (_with(weights=np.array([0.5, 0.25, 0.25])), "shapes"),
        (_with(log_vars=np.zeros((2, 2))), "shapes"),
        (_with(weights=np.array([[0.5, 0.5]])), "shapes"),
        (_with(means=np.zeros(3)), "2-D"),
        (_with(weights=np.zeros(0), means=np.zeros((0, 3)), log_vars=np.zeros((0, 3))), "shapes"),
        (_with(means=None), "missing"),
        (_with(extra=np.zeros(1)), "unexpected"),
        (_with(weights=np.array([1.5, -0.5])), "non-negative"),
        (_with(weights=np.array([0.5, 0.6])), "sum"),
        (_with(means=np.array([["a", "b", "c"], ["d", "e", "f"]])), "dtype"),
        ([np.zeros(2)], "mapping"),
    ],
)
def test_from_arrays_rejects_bad_messages(arrays: object, reason: str) -> None:
    with pytest.raises(MessageError, match=reason) as info:
        GaussianMixturePrior.from_arrays(arrays)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_from_arrays_checks_latent_dim() -> None:
    assert GaussianMixturePrior.from_arrays(valid_arrays(), latent_dim=3).latent_dim == 3
    with pytest.raises(MessageError, match="latent_dim 3 does not match the model's 2"):
        GaussianMixturePrior.from_arrays(valid_arrays(), latent_dim=2)


def test_arrays_are_read_only_copies() -> None:
    source = valid_arrays()
    prior = GaussianMixturePrior.from_arrays(source)
    source["means"][0, 0] = 9.0
    assert prior.means[0, 0] == 0.0
    with pytest.raises(ValueError):
        prior.means[0, 0] = 1.0
    prior.to_arrays()["means"][0, 0] = 9.0
    assert prior.means[0, 0] == 0.0


def test_dead_component_is_reseeded_at_worst_explained_sample() -> None:
    from alignfl_mpi.prior import _m_step

    x = np.array([[0.0, 0.0], [0.1, 0.0], [9.0, 9.0]])
    log_resp = np.array([[0.0, -np.inf]] * 3)  # component 1 owns nothing
    log_lik = np.array([-1.0, -1.5, -50.0])
    weights, means, variances, reseeded = _m_step(
        x, log_resp, log_lik, global_var=np.array([2.0, 3.0]), min_var=1e-4
    )
    assert reseeded
    np.testing.assert_allclose(means[1], [9.0, 9.0])
    np.testing.assert_allclose(variances[1], [2.0, 3.0])
    np.testing.assert_allclose(weights, [0.75, 0.25])
    assert np.isfinite(means).all() and (variances >= 1e-4).all()


# ------------------------------------------------------------- what the client fits on


def _client_round(fit_on: str, *, seed: int = 5):
    from strategy_helpers import local_round

    from alignfl_mpi.client import new_local_state
    from alignfl_mpi.config import load_config

    cfg = load_config(preset="paper", overrides=[
        f'client.prior_fit_on="{fit_on}"', "client.local_epochs=2",
        "client.model.hidden=[32, 16]", "client.batch_size=16"]).client
    state = new_local_state(0, cfg, seed=seed, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    data = torch.rand(64, 1, 28, 28, generator=gen)
    update = local_round(state, data, round_=0, seed=seed)
    return state, update, data


def test_prior_fit_on_z_uses_the_reparameterised_samples_of_every_step() -> None:
    from alignfl_mpi.client import fit_prior, reparameterised_samples
    from alignfl_mpi.models import latent_means

    state_z, update_z, data = _client_round("z")
    state_mu, update_mu, _ = _client_round("mu")
    # drawing z does not touch training: same decoder either way, different priors
    for name, value in update_z.state.items():
        np.testing.assert_array_equal(value, update_mu.state[name])
    assert not np.array_equal(update_z.prior["means"], update_mu.prior["means"])
    # the "mu" prior is the fit on the final encoder's means
    mu = latent_means(state_mu.vae, data, device=torch.device("cpu"))
    assert mu.shape == (64, 2)
    # the "z" prior: one draw per image and step of the 2 local epochs
    posterior = [(torch.zeros(64, 2), torch.zeros(64, 2))] * 2
    z = reparameterised_samples(posterior, seed=1)
    assert z.shape == (128, 2) and abs(float(z.std()) - 1.0) < 0.15
    direct = fit_prior(state_z, data, seed=1, posterior=posterior)  # paper: scikit-learn's fit
    np.testing.assert_array_equal(direct.means, fit_gmm_sklearn(z, n_components=10).means)
    em = dataclasses.replace(state_z, cfg=dataclasses.replace(state_z.cfg, prior_fitter="em"))
    own = fit_prior(em, data, seed=1, posterior=posterior)
    np.testing.assert_array_equal(own.means, fit_gmm(z, n_components=10, seed=1).means)
    assert not np.array_equal(own.means, direct.means)


def test_sklearn_fit_is_the_reference_codes_gaussian_mixture() -> None:
    from sklearn.mixture import GaussianMixture

    x = three_clusters(n=2000, seed=3)
    ref = GaussianMixture(n_components=10, covariance_type="diag", random_state=42).fit(x)
    prior = fit_gmm_sklearn(x, n_components=10)
    # the prior stores float32 arrays
    np.testing.assert_allclose(prior.weights, ref.weights_, rtol=1e-6)
    np.testing.assert_array_equal(prior.means, ref.means_.astype(np.float32))
    np.testing.assert_array_equal(prior.log_vars, np.log(ref.covariances_).astype(np.float32))
    # the same fit whatever the caller's RNG state (random_state 42, as the reference)
    np.random.seed(7)
    torch.manual_seed(7)
    np.testing.assert_array_equal(fit_gmm_sklearn(x, n_components=10).means, prior.means)
    # fewer samples than components: K is clipped, as fit_gmm does
    few = fit_gmm_sklearn(x[:4], n_components=10)
    assert few.n_components == 4 and np.isclose(few.weights.sum(), 1.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_gmm_sklearn(np.array([[0.0, np.nan]]))


def test_unknown_prior_fitter_is_refused_in_one_line() -> None:
    from alignfl_mpi.config import load_config
    from alignfl_mpi.errors import ConfigError

    with pytest.raises(ConfigError, match="prior_fitter") as err:
        load_config(overrides=['client.prior_fitter="kmeans"'])
    assert "\n" not in str(err.value)


def test_prior_fit_on_z_is_reproducible_for_a_resumed_round() -> None:
    _, first, _ = _client_round("z")
    _, again, _ = _client_round("z")
    for key in ("weights", "means", "log_vars"):
        np.testing.assert_array_equal(first.prior[key], again.prior[key])
