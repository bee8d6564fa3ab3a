"""Tests for alignfl_mpi.privacy: accounting, per-sample clipping, clip rules, DP prior, rounds."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from strategy_helpers import local_round
from torch.nn.utils import parametrize

from alignfl_mpi.checkpoint import load_checkpoint, save_raw_checkpoint
from alignfl_mpi.client import new_local_state
from alignfl_mpi.config import ClientConfig, LipschitzConfig, ModelConfig, PrivacyConfig
from alignfl_mpi.errors import ConfigError
from alignfl_mpi.models import ModelSpec, build_vae, latent_means, vae_loss
from alignfl_mpi.prior import GaussianMixturePrior, fit_gmm, standard_normal_prior
from alignfl_mpi.privacy import (
    CALIBRATION_RTOL,
    RDP_ALPHAS_FULL_BATCH,
    PerSampleClipper,
    PrivacyLedger,
    PrivacyPlan,
    PrivateTrainer,
    calibrate_noise,
    clip_factors,
    dp_fit_gmm,
    epsilon_spent,
    joint_epsilon,
    make_clip_rule,
    noisy_prior_statistics,
    per_sample_vae_loss,
    plan_privacy,
    prior_radius,
    prior_statistics,
    validate_privacy,
)
from alignfl_mpi.seeds import Role, derive_seed

CPU = torch.device("cpu")
REQUIRED = ("loss", "recon", "kl", "epsilon", "epsilon_prv", "noise_multiplier", "clip_bound",
            "delta", "dp_accounted")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def client_cfg(*, arch: str = "mlp", spectral_norm: bool = False, lipschitz: float = 0.0,
               **privacy) -> ClientConfig:
    privacy = {"mode": "full", **privacy}
    return ClientConfig(model=ModelConfig(arch=arch, spectral_norm=spectral_norm), device="cpu",
                        local_epochs=1, batch_size=64, prior_components=4,
                        privacy=PrivacyConfig(**privacy),
                        lipschitz=LipschitzConfig(weight=lipschitz))


def make_state(cfg: ClientConfig, *, total_rounds: int | None = 1):
    state = new_local_state(0, cfg, seed=0, device=CPU)
    if total_rounds is not None:
        state.extra["total_rounds"] = total_rounds
    return state


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("key, value", [
    ("mode", "encoder"), ("clipping", "l1"), ("accountant", "gdp"), ("prior", "flat"),
    ("epsilon", 0.0), ("epsilon", -1.0), ("delta", 0.0), ("delta", 1.0),
    ("prior_epsilon_fraction", 1.0), ("prior_epsilon_fraction", -0.1),
])
def test_validate_privacy_names_the_bad_key(key, value) -> None:
    with pytest.raises(ConfigError, match=f"privacy.{key}"):
        validate_privacy(PrivacyConfig(**{key: value}))


def test_dp_prior_needs_a_budget_share() -> None:
    validate_privacy(PrivacyConfig(mode="none", prior_epsilon_fraction=0.0))
    with pytest.raises(ConfigError, match="prior_epsilon_fraction"):
        validate_privacy(PrivacyConfig(mode="full", prior="dp", prior_epsilon_fraction=0.0))


def test_spectral_norm_with_dp_outside_mlp_is_one_line() -> None:
    from alignfl_mpi.privacy import validate_private_client

    validate_private_client(client_cfg(lipschitz=1.0, spectral_norm=True))  # accepted
    with pytest.raises(ConfigError, match="mlp architecture only") as info:
        validate_private_client(client_cfg(arch="conv", spectral_norm=True))
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- accounting


def independent_rdp_epsilon(history, delta: float) -> float:
    """RDP composition by hand: per-order sums of Opacus's per-mechanism RDP, one conversion."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from alignfl_mpi.privacy import RDP_ALPHAS_FULL_BATCH

    rdp = sum(np.asarray(compute_rdp(q=q, noise_multiplier=s, steps=n,
                                     orders=RDP_ALPHAS_FULL_BATCH)) for s, q, n in history)
    return float(get_privacy_spent(orders=RDP_ALPHAS_FULL_BATCH, rdp=rdp, delta=delta)[0])


def planned_ledger(plan: PrivacyPlan) -> PrivacyLedger:
    ledger = PrivacyLedger()
    for _ in range(plan.total_rounds):
        ledger.record_sgd(plan.noise_multiplier, plan.sample_rate,
                          plan.local_epochs * plan.steps_per_epoch)
        ledger.record_prior(plan.prior_noise_multiplier, plan.prior_releases // plan.total_rounds)
    return ledger


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_joint_calibration_reaches_target_and_matches_an_independent_accountant(accountant):
    from opacus.accountants import create_accountant

    target = 4.0
    cfg = PrivacyConfig(mode="full", epsilon=target, delta=1e-5, prior_epsilon_fraction=0.2,
                        accountant=accountant)
    plan = plan_privacy(cfg, n_samples=1000, batch_size=50, local_epochs=2, total_rounds=3)
    assert plan.total_steps == 3 * 2 * 20 and plan.sample_rate == 0.05
    assert plan.prior_releases == 9
    ledger = planned_ledger(plan)
    assert ledger.sgd_history == [[plan.noise_multiplier, 0.05, 120]]  # merged, plain lists
    planner = ledger.spent(plan, accountant)
    assert target * (1 - CALIBRATION_RTOL) <= planner <= target
    # an independent accountant, stepped once per step and per release, agrees within 1 %
    acc = create_accountant(accountant)
    for _ in range(plan.total_steps):
        acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    for _ in range(plan.prior_releases):
        acc.step(noise_multiplier=plan.prior_noise_multiplier, sample_rate=1.0)
    kwargs = {"alphas": RDP_ALPHAS_FULL_BATCH} if accountant == "rdp" else {}
    independent = acc.get_epsilon(delta=1e-5, **kwargs)
    assert abs(planner - independent) / independent < 0.01
    if accountant == "rdp":
        history = ledger.sgd_history + ledger.prior_history
        assert planner == pytest.approx(independent_rdp_epsilon(history, 1e-5), rel=1e-9)
    # joint calibration buys less noise than the additive split of the same target ...
    assert plan.noise_scale < 1.0
    additive = plan_additive(cfg, plan)
    assert plan.noise_multiplier < additive[0] and plan.prior_noise_multiplier < additive[1]
    # ... whose composition spends less than its target, while adding the parts spends it all
    sgd_part = epsilon_spent([[additive[0], 0.05, 120]], delta=0.8e-5, accountant=accountant)
    prior_part = epsilon_spent([[additive[1], 1.0, 9]], delta=0.2e-5, accountant=accountant)
    assert abs(sgd_part + prior_part - target) / target < 0.01
    joint_of_additive = joint_epsilon(
        noise_multiplier=additive[0], sample_rate=0.05, steps=120,
        prior_noise_multiplier=additive[1], prior_releases=9, delta=1e-5, accountant=accountant)
    assert joint_of_additive < 0.97 * target


def plan_additive(cfg: PrivacyConfig, plan: PrivacyPlan) -> tuple[float, float]:
    """The noise multipliers of the old additive split (each share calibrated alone)."""
    sgd = calibrate_noise(epsilon=plan.sgd_epsilon, delta=plan.sgd_delta,
                          sample_rate=plan.sample_rate, steps=plan.total_steps,
                          accountant=cfg.accountant)
    prior = calibrate_noise(epsilon=plan.prior_epsilon, delta=plan.prior_delta, sample_rate=1.0,
                            steps=plan.prior_releases, accountant=cfg.accountant)
    return sgd, prior


def test_prv_cross_check_is_reported_and_not_above_rdp(images) -> None:
    state = make_state(client_cfg(prior="dp", epsilon=3.0))
    metrics, _ = run_state_round(state, images)
    assert 0 < metrics["epsilon_prv"] <= metrics["epsilon"] * 1.01
    assert metrics["epsilon"] <= metrics["epsilon_sgd"] + metrics["epsilon_prior"]


@pytest.mark.parametrize("history", [
    [[1.1, 0.5, 40]], [[0.8, 0.01, 3000]], [[2.0, 1.0, 5]],
    [[1.3, 0.05, 200], [20.0, 1.0, 15]], [[0.9, 0.1, 10], [0.9, 0.1, 30], [5.0, 1.0, 2]]])
def test_cached_rdp_epsilon_equals_opacus_accountant_exactly(history) -> None:
    """The RDP epsilon on cached per-step vectors is Opacus's RDPAccountant's, to the bit,
    also when the cache already holds the vectors (a second call, more steps)."""
    from opacus.accountants import RDPAccountant

    from alignfl_mpi.privacy import RDP_ALPHAS, RDP_ALPHAS_FULL_BATCH

    for scale in (1, 3):  # the second pass reuses the cached vectors
        steps = [(float(s), float(q), int(n) * scale) for s, q, n in history]
        acc = RDPAccountant()
        acc.history = list(steps)
        alphas = RDP_ALPHAS_FULL_BATCH if max(q for _, q, _ in steps) >= 1 else RDP_ALPHAS
        with np.errstate(divide="ignore", invalid="ignore"):
            expected = acc.get_epsilon(delta=1e-5, alphas=alphas)
        assert epsilon_spent([list(h) for h in steps], delta=1e-5, accountant="rdp") \
            == expected


def test_prv_calibration_reaches_target() -> None:
    sigma = calibrate_noise(epsilon=2.0, delta=1e-6, sample_rate=1.0, steps=10,
                            accountant="prv")
    eps = epsilon_spent([[sigma, 1.0, 10]], delta=1e-6, accountant="prv")
    assert 2.0 * (1 - CALIBRATION_RTOL) <= eps <= 2.0


def test_adaptive_noise_and_epsilon_match_independent_computations(images) -> None:
    from opacus.accountants import RDPAccountant
    from opacus.optimizers import AdaClipDPOptimizer

    count_sigma, bound = 2.0, 3.0
    cfg = client_cfg(clipping="adaptive", count_noise_multiplier=count_sigma, prior="standard")
    state = make_state(cfg)
    metrics, _ = run_state_round(state, images)
    sigma = metrics["noise_multiplier"]
    expected_grad_sigma = (sigma ** -2 - (2 * count_sigma) ** -2) ** -0.5  # Theorem 1
    assert metrics["grad_noise_multiplier"] == pytest.approx(expected_grad_sigma, rel=1e-12)
    # epsilon of the steps taken == an independent Opacus RDPAccountant with sigma
    steps = int(metrics["dp_steps"])
    assert steps == 4
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=64 / 256)
    assert metrics["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    # the noise actually added has standard deviation grad_sigma * C
    plan = PrivacyPlan(**PrivacyLedger.from_extra(state.extra).plan)
    trainer = PrivateTrainer(state.vae, state.optimizer, mode="full", plan=plan,
                             rule=make_clip_rule(cfg.privacy, bound=bound), kl_weight=1.0,
                             device=CPU, seed=1)
    noise = trainer.privatize(trainer.clipper.zero_sums(), bound)
    flat = torch.cat([t.flatten() for unit in noise for t in unit]) * plan.expected_batch_size
    assert flat.mean().abs() < 0.01 * bound
    assert flat.std().item() == pytest.approx(expected_grad_sigma * bound, rel=0.01)
    # ... which is what Opacus's AdaClipDPOptimizer adds for the same (sigma, sigma_b)
    p = torch.nn.Parameter(torch.zeros(400_000))
    opacus = AdaClipDPOptimizer(
        torch.optim.SGD([p], lr=0.0), noise_multiplier=sigma, target_unclipped_quantile=0.5,
        clipbound_learning_rate=0.2, max_clipbound=10.0, min_clipbound=0.1,
        unclipped_num_std=count_sigma, max_grad_norm=bound, expected_batch_size=64)
    p.summed_grad = torch.zeros_like(p)
    opacus.unclipped_num = torch.tensor(0)
    opacus.add_noise()
    assert p.grad.std().item() == pytest.approx(expected_grad_sigma * bound, rel=0.01)


def run_state_round(state, images, round_: int = 0, seed: int = 0):
    update = local_round(state, images, round_=round_, seed=seed)
    return update.metrics, update.prior


def test_epsilon_grows_and_survives_resume(images, tmp_path) -> None:
    cfg = client_cfg(clipping="adaptive", prior="dp", epsilon=5.0)
    state = make_state(cfg, total_rounds=3)
    first, _ = run_state_round(state, images, 0)
    assert "loss" not in first  # exact losses stay on the client in DP modes
    save_raw_checkpoint(tmp_path / "c.ckpt", state.checkpoint_state())  # as the runtime does
    rounds = [run_state_round(state, images, r) for r in (1, 2)]
    uninterrupted = [first] + [m for m, _ in rounds]
    resumed_state = make_state(cfg, total_rounds=None)
    resumed_state.load_state_dict(load_checkpoint(tmp_path / "c.ckpt"))
    rounds_resumed = [run_state_round(resumed_state, images, r) for r in (1, 2)]
    resumed = [first] + [m for m, _ in rounds_resumed]
    eps = [m["epsilon"] for m in uninterrupted]
    assert eps[0] < eps[1] < eps[2]
    assert [m["epsilon"] for m in resumed] == eps
    for key in ("clip_bound", "epsilon_prv", "noise_multiplier"):
        assert [m[key] for m in resumed] == [m[key] for m in uninterrupted], key
    for (_, a), (_, b) in zip(rounds, rounds_resumed):  # the released priors are identical
        for name in ("weights", "means", "log_vars"):
            np.testing.assert_array_equal(a[name], b[name])
    # after exactly the planned rounds the whole budget (SGD + prior) is spent, not more
    assert abs(eps[2] - 5.0) / 5.0 < 0.01 and eps[2] <= 5.0
    # one accountant composes both parts: tighter than adding their epsilons
    assert eps[2] < uninterrupted[2]["epsilon_sgd"] + uninterrupted[2]["epsilon_prior"]


def test_missing_total_rounds_warns_and_plans_one_round(images, caplog) -> None:
    state = make_state(client_cfg(prior="standard"), total_rounds=None)
    with caplog.at_level(logging.WARNING, logger="alignfl_mpi.privacy"):
        metrics, _ = run_state_round(state, images)
    assert "total_rounds" in caplog.text
    assert abs(metrics["epsilon"] - 10.0) / 10.0 < 0.01


# --------------------------------------------------------------------------- per-sample route


def effective_tensors(clipper: PerSampleClipper) -> list[torch.Tensor]:
    out = []
    for unit in clipper.units:
        names = getattr(unit, "tensor_names", None)
        out += ([getattr(unit.module, n) for n in names] if names
                else list(unit.params.values()))
    return out


def brute_force_grads(vae, clipper, x) -> torch.Tensor:
    """(B, P) per-sample gradients, one backward per sample (eval mode: z = mu)."""
    rows = []
    with parametrize.cached():
        tensors = effective_tensors(clipper)
        for i in range(len(x)):
            recon, mu, logvar = vae(x[i:i + 1])
            loss = per_sample_vae_loss(recon, x[i:i + 1], mu, logvar, kl_weight=0.5)[0].sum()
            grads = torch.autograd.grad(loss, tensors, retain_graph=True)
            rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


def route_sums(vae, clipper, x, factors=None):
    with clipper.capture():
        recon, mu, logvar = vae(x)
    losses = per_sample_vae_loss(recon, x, mu, logvar, kl_weight=0.5)[0]
    clipper.backward(losses)
    norms = clipper.norms()
    factors = torch.ones(len(x)) if factors is None else factors
    sums = torch.cat([t.flatten() for unit in clipper.clipped_sums(factors) for t in unit])
    return norms, sums


@pytest.mark.parametrize("arch, spectral_norm, part", [
    ("mlp", False, "vae"), ("mlp", True, "decoder"), ("conv", False, "vae")])
def test_per_sample_norms_and_sums_match_brute_force(arch, spectral_norm, part) -> None:
    torch.manual_seed(0)
    vae = build_vae(ModelSpec(arch=arch, hidden=(16, 8) if arch == "mlp" else (4, 8),
                              spectral_norm=spectral_norm)).eval()
    clipper = PerSampleClipper(vae if part == "vae" else vae.decoder)
    x = torch.rand(6, 1, 28, 28)
    expected = brute_force_grads(vae, clipper, x)
    factors = torch.rand(6)
    norms, sums = route_sums(vae, clipper, x, factors)
    torch.testing.assert_close(norms, expected.double().norm(dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sums, factors @ expected, rtol=1e-4, atol=1e-4)


def test_per_sample_losses_average_to_vae_loss() -> None:
    recon, x = torch.rand(5, 1, 4, 4), torch.rand(5, 1, 4, 4)
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    per = per_sample_vae_loss(recon, x, mu, logvar, kl_weight=0.3)
    for mine, ref in zip(per, vae_loss(recon, x, mu, logvar, kl_weight=0.3)):
        torch.testing.assert_close(mine.mean(), ref)


def test_clipping_bounds_each_samples_contribution() -> None:
    torch.manual_seed(0)
    vae = build_vae(ModelSpec(arch="mlp", hidden=(32, 16))).eval()
    clipper = PerSampleClipper(vae)
    x = torch.rand(8, 1, 28, 28)
    x[3] = 1000.0  # the outlier: a huge reconstruction error
    bound = 1.0
    norms, _ = route_sums(vae, clipper, x)
    assert norms[3] > 1000 * bound and norms[3] > 100 * norms[torch.arange(8) != 3].max()
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    _, with_outlier = route_sums(vae, clipper, x, factors)
    keep = torch.arange(8) != 3
    _, without = route_sums(vae, clipper, x[keep], factors[keep])
    outlier = with_outlier - without
    assert outlier.norm() <= bound * (1 + 1e-4)
    assert outlier.norm() >= 0.99 * bound
    assert with_outlier.norm() <= len(x) * bound


def test_trainer_step_without_noise_sums_clipped_gradients(images) -> None:
    torch.manual_seed(0)
    vae = build_vae(ModelSpec(arch="mlp")).eval()  # eval: z = mu, a deterministic step
    x = images[:40].clone()
    x[0] = 50.0
    norms, _ = route_sums(vae, PerSampleClipper(vae), x)
    bound = float(norms.median())  # half the samples are clipped, half are not
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    _, expected = route_sums(vae, PerSampleClipper(vae), x, factors)
    cfg = client_cfg(clipping="flat", max_grad_norm=bound, prior="standard")
    plan = plan_privacy(cfg.privacy, n_samples=256, batch_size=64, local_epochs=1,
                        total_rounds=1)
    trainer = PrivateTrainer(vae, torch.optim.SGD(vae.parameters(), lr=0.0), mode="full",
                             plan=plan, rule=make_clip_rule(cfg.privacy), kl_weight=0.5,
                             device=CPU, seed=0)
    trainer.noise_scale = 0.0
    trainer.step(x)
    total = torch.cat([p.grad.flatten() for p in vae.parameters()]) * plan.expected_batch_size
    torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-5)
    assert 0 < total.norm() <= len(x) * bound
    before = [p.detach().clone() for p in vae.decoder.parameters()]
    trainer.noise_scale = 1.0
    trainer.optimizer = torch.optim.SGD(vae.parameters(), lr=1.0)
    trainer.step(images[:0])  # an empty Poisson batch: a noise-only step
    assert all(not torch.equal(b, p) for b, p in zip(before, vae.decoder.parameters()))


def test_poisson_batches_have_rate_q(images) -> None:
    cfg = client_cfg(prior="standard")
    plan = plan_privacy(cfg.privacy, n_samples=10_000, batch_size=500, local_epochs=1,
                        total_rounds=1)
    vae = build_vae(ModelSpec(arch="mlp", hidden=(8,)))
    trainer = PrivateTrainer(vae, torch.optim.SGD(vae.parameters(), lr=0.0), mode="full",
                             plan=plan, rule=make_clip_rule(cfg.privacy), kl_weight=1.0,
                             device=CPU, seed=5)
    sizes = torch.tensor([float(len(trainer.sample_batch(10_000))) for _ in range(300)])
    assert sizes.mean().item() == pytest.approx(500, rel=0.02)
    assert sizes.var().item() == pytest.approx(10_000 * 0.05 * 0.95, rel=0.3)


def test_noise_is_not_derived_from_the_run_seed(images) -> None:
    cfg = client_cfg(prior="standard")
    a, b = make_state(cfg), make_state(cfg)
    ma, _ = run_state_round(a, images, seed=0)
    mb, _ = run_state_round(b, images, seed=0)
    assert ma["epsilon"] == mb["epsilon"]
    secrets = [PrivacyLedger.from_extra(s.extra).secret for s in (a, b)]
    assert secrets[0] != secrets[1]
    assert not torch.equal(a.vae.decoder[0].weight, b.vae.decoder[0].weight)


# --------------------------------------------------------------------------- clip rules


def test_adaptive_bound_moves_toward_the_quantile() -> None:
    cfg = PrivacyConfig(mode="full", target_quantile=0.5, clipbound_lr=0.2,
                        count_noise_multiplier=1.0)
    norms = torch.arange(1.0, 1001.0)  # median 500
    gen = torch.Generator().manual_seed(0)
    for start in (1.0, 1e5):
        rule = make_clip_rule(cfg, bound=start)
        rule.update(norms, expected_batch_size=1000.0, generator=gen)
        assert (rule.bound > start) if start < 500 else (rule.bound < start)
        for _ in range(300):
            rule.update(norms, expected_batch_size=1000.0, generator=gen)
        assert rule.bound == pytest.approx(500, rel=0.1)


def test_median_clipping_warns_and_is_not_accounted(images, caplog) -> None:
    state = make_state(client_cfg(clipping="median", prior="standard"))
    with caplog.at_level(logging.WARNING, logger="alignfl_mpi.privacy"):
        metrics, _ = run_state_round(state, images)
    assert metrics["dp_accounted"] == 0.0
    assert any("NOT covered" in r.message and r.levelno == logging.WARNING
               for r in caplog.records)
    assert metrics["clip_bound"] != 1.0 and metrics["clip_bound"] > 0


# --------------------------------------------------------------------------- rounds and prior


@pytest.mark.parametrize("mode, arch, spectral_norm", [
    ("full", "mlp", False), ("decoder", "mlp", False), ("full", "mlp", True)])
def test_dp_round_on_tiny_data_returns_finite_metrics(images, mode, arch, spectral_norm):
    state = make_state(client_cfg(mode=mode, arch=arch, spectral_norm=spectral_norm))
    before = {k: v.clone() for k, v in state.vae.decoder.state_dict().items()}
    update = local_round(state, images, round_=0, seed=3)
    from alignfl_mpi.privacy import LOCAL_ONLY_METRICS

    assert all(k in update.metrics for k in REQUIRED if k not in LOCAL_ONLY_METRICS)
    assert not set(LOCAL_ONLY_METRICS) & set(update.metrics)  # exact losses stay local
    assert all(math.isfinite(v) for v in update.metrics.values())
    assert update.metrics["dp_accounted"] == (1.0 if mode == "full" else 0.0)
    assert 0 < update.metrics["epsilon"] <= 10.0
    GaussianMixturePrior.from_arrays(update.prior, latent_dim=2)
    assert any(not torch.equal(before[k], v) for k, v in state.vae.decoder.state_dict().items())


def test_dp_prior_is_the_mechanism_output_and_is_accounted(images) -> None:
    cfg = client_cfg(prior="dp")
    state = make_state(cfg)
    update = local_round(state, images, round_=0, seed=7)
    metrics = update.metrics
    assert metrics["epsilon_prior"] > 0
    assert (max(metrics["epsilon_sgd"], metrics["epsilon_prior"]) < metrics["epsilon"]
            < metrics["epsilon_sgd"] + metrics["epsilon_prior"])
    ledger = PrivacyLedger.from_extra(state.extra)
    plan = PrivacyPlan(**ledger.plan)
    latents = latent_means(state.vae, images, device=CPU)
    rs = derive_seed(7, Role.CLIENT_ROUND, state.client_id, 0)
    replay = dp_fit_gmm(latents, n_components=4, noise_multiplier=plan.prior_noise_multiplier,
                        radius=prior_radius(2), rng=np.random.default_rng(ledger.seed_for(rs)))
    for key, value in replay.to_arrays().items():
        np.testing.assert_array_equal(update.prior[key], value)
    exact = fit_gmm(latents, n_components=4, seed=rs)
    assert not np.allclose(update.prior["means"], exact.means, atol=1e-3)
    assert ledger.prior_history == [[plan.prior_noise_multiplier, 1.0, 3]]


def test_standard_prior_spends_nothing(images) -> None:
    update = local_round(make_state(client_cfg(prior="standard")), images, round_=0, seed=1)
    for key, value in standard_normal_prior(2).to_arrays().items():
        np.testing.assert_array_equal(update.prior[key], value)
    assert update.metrics["epsilon_prior"] == 0.0
    assert update.metrics["epsilon"] == update.metrics["epsilon_sgd"]


def test_prior_statistics_sensitivity_is_at_most_sqrt3() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2))
    radius = prior_radius(2)
    weights, means, variances = np.full(3, 1 / 3), rng.normal(size=(3, 2)), np.ones((3, 2))
    base = prior_statistics(x, weights, means, variances, radius=radius)
    for extra in ([100.0, -100.0], [0.0, 0.0], [radius, 0.0], [-2.0, 2.5], [1e6, 1e6]):
        added = prior_statistics(np.vstack([x, extra]), weights, means, variances,
                                 radius=radius)
        assert np.linalg.norm(added - base) <= math.sqrt(3) + 1e-9


def test_prior_release_noise_is_sqrt3_sigma() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 8))
    mixture = (np.full(50, 0.02), rng.normal(size=(50, 8)), np.ones((50, 8)))
    exact = prior_statistics(x, *mixture, radius=3.0)
    noise = np.concatenate([
        noisy_prior_statistics(x, *mixture, radius=3.0, noise_multiplier=4.0, rng=rng) - exact
        for _ in range(20)])
    assert noise.size == 20 * (50 + 2 * 50 * 8)
    assert noise.std() == pytest.approx(math.sqrt(3) * 4.0, rel=0.02)


def test_dp_fit_gmm_without_noise_stays_at_clusters() -> None:
    rng = np.random.default_rng(1)
    true = np.array([[-1.5, 0.0], [1.5, 1.0]])
    x = np.concatenate([m + 0.2 * rng.standard_normal((300, 2)) for m in true])
    init = GaussianMixturePrior(weights=[0.5, 0.5], means=true + 0.3, log_vars=np.zeros((2, 2)))
    prior = dp_fit_gmm(x, n_components=2, noise_multiplier=0.0, radius=prior_radius(2),
                       rng=rng, iters=10, init=init)
    np.testing.assert_allclose(prior.means, true, atol=0.05)
    np.testing.assert_allclose(prior.weights, [0.5, 0.5], atol=0.01)


# --------------------------------------------------------------------------- clip bound in float32


def test_clipped_per_sample_norms_never_exceed_the_bound() -> None:
    """Each sample alone through the real route: its clipped gradient's norm is <= C."""
    torch.manual_seed(0)
    vae = build_vae(ModelSpec(arch="mlp", hidden=(64, 32))).eval()
    clipper = PerSampleClipper(vae)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(48, 1, 28, 28, generator=gen)
    x *= torch.logspace(-2, 3, 48).view(-1, 1, 1, 1)  # norms over many orders of magnitude
    norms, _ = route_sums(vae, clipper, x)
    assert norms.dtype == torch.float64
    worst = 0.0
    for bound in (1e-3, 0.37, 1.0, 3.0):
        for i in range(len(x)):
            single, _ = route_sums(vae, clipper, x[i:i + 1])
            factor = clip_factors(single, bound)
            _, clipped = route_sums(vae, clipper, x[i:i + 1], factor)
            ratio = float(clipped.double().norm()) / bound
            worst = max(worst, ratio)
            assert ratio <= 1.0, (i, bound, ratio)
    assert worst > 0.999  # the large samples are clipped to (just under) C


def test_norms_are_float64_for_the_conv_layers_too() -> None:
    torch.manual_seed(0)
    vae = build_vae(ModelSpec(arch="conv", hidden=(4, 8))).eval()
    clipper = PerSampleClipper(vae)
    x = torch.rand(3, 1, 28, 28) * 50
    norms, _ = route_sums(vae, clipper, x)
    assert norms.dtype == torch.float64
    for i in range(3):
        single, _ = route_sums(vae, clipper, x[i:i + 1])
        _, clipped = route_sums(vae, clipper, x[i:i + 1], clip_factors(single, 0.5))
        assert float(clipped.double().norm()) <= 0.5


# --------------------------------------------------------------------------- DP + Lipschitz


class RecordingAdam(torch.optim.Adam):
    """Adam that keeps a copy of every gradient it steps with."""

    def __init__(self, params, **kw) -> None:
        super().__init__(params, **kw)
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append([p.grad.detach().clone() for g in self.param_groups
                          for p in g["params"]])
        return super().step(closure)


def twin_trainers(*, spectral_norm: bool, mode: str = "full", weight: float = 1.0):
    """Two identical VAEs and trainers (same seeds), the second with the latent penalty."""
    from alignfl_mpi.lipschitz import make_latent_penalty

    cfg = client_cfg(mode=mode, spectral_norm=spectral_norm, prior="standard",
                     clipping="adaptive")
    plan = plan_privacy(cfg.privacy, n_samples=256, batch_size=64, local_epochs=1,
                        total_rounds=1)
    out = []
    for reg in (False, True):
        torch.manual_seed(0)
        vae = build_vae(ModelSpec(arch="mlp", hidden=(32, 16), spectral_norm=spectral_norm))
        penalty = make_latent_penalty(LipschitzConfig(weight=weight),
                                      prior=standard_normal_prior(2), n_points=64,
                                      generator=torch.Generator().manual_seed(9)) if reg else None
        trainer = PrivateTrainer(vae, RecordingAdam(vae.parameters(), lr=1e-3), mode=mode,
                                 plan=plan, rule=make_clip_rule(cfg.privacy), kl_weight=1.0,
                                 device=CPU, seed=1234, regulariser=penalty)
        out.append((vae, trainer))
    return out


@pytest.mark.parametrize("spectral_norm, mode", [(False, "full"), (True, "full"),
                                                 (False, "decoder")])
def test_penalty_is_added_after_the_noise_and_the_private_path_is_unchanged(
        images, spectral_norm, mode) -> None:
    from alignfl_mpi.lipschitz import make_latent_penalty

    (plain_vae, plain), (pen_vae, pen) = twin_trainers(spectral_norm=spectral_norm, mode=mode)
    x = images[:50]
    # the penalty's own gradient at the step's weights, from the same public points
    torch.manual_seed(5)
    plain.step(x)
    torch.manual_seed(5)
    reference = make_latent_penalty(LipschitzConfig(weight=1.0), prior=standard_normal_prior(2),
                                    n_points=64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        snapshot = {k: v.clone() for k, v in pen_vae.state_dict().items()}
    pen.step(x)
    noised, total = plain.optimizer.seen[0], pen.optimizer.seen[0]
    # same secret generators consumed identically, same clip bound: the private path is equal
    assert torch.equal(plain.noise.get_state(), pen.noise.get_state())
    assert torch.equal(plain.sampler.get_state(), pen.sampler.get_state())
    assert plain.rule.bound == pen.rule.bound
    # the penalty's gradient alone, at the same weights (spectral norm: same u, v)
    probe = build_vae(ModelSpec(arch="mlp", hidden=(32, 16), spectral_norm=spectral_norm))
    probe.load_state_dict(snapshot)
    if spectral_norm:  # the private step's power iteration, then the frozen penalty
        for name, buf in pen_vae.named_buffers():
            if name.endswith(("_u", "_v")):
                dict(probe.named_buffers())[name].copy_(buf)
        probe.eval()
    value, _ = reference(probe)
    params = list(probe.parameters())
    grads = torch.autograd.grad(value, params, allow_unused=True)
    expected = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    assert any(g.abs().sum() > 0 for g in expected)
    for a, b, g in zip(noised, total, expected):
        torch.testing.assert_close(b - a, g, rtol=1e-4, atol=1e-6)
    # the encoder is untouched by the penalty (it only reads the decoder)
    enc = [i for i, (n, _) in enumerate(pen_vae.named_parameters()) if n.startswith("encoder")]
    assert enc and all(torch.equal(noised[i], total[i]) for i in enc)


def test_epsilon_is_the_same_with_and_without_the_penalty(images) -> None:
    runs = []
    for weight in (0.0, 2.0):
        state = make_state(client_cfg(lipschitz=weight, prior="dp", epsilon=4.0),
                           total_rounds=2)
        state.extra["privacy"] = {"secret": 42}  # same secret: same noise, same batches
        metrics = [run_state_round(state, images, r)[0] for r in (0, 1)]
        runs.append((state, metrics))
    (_, plain), (_, penal) = runs
    for key in ("epsilon", "epsilon_prv", "epsilon_sgd", "epsilon_prior", "noise_multiplier",
                "grad_noise_multiplier", "prior_noise_multiplier", "dp_steps", "dp_accounted"):
        assert [m[key] for m in plain] == [m[key] for m in penal], key
    assert "penalty" not in penal[0] and "train_s" not in penal[0]  # local only
    assert not torch.equal(runs[0][0].vae.decoder[0].weight, runs[1][0].vae.decoder[0].weight)


def test_penalty_points_come_from_the_released_prior(images) -> None:
    from alignfl_mpi.privacy import public_penalty

    state = make_state(client_cfg(lipschitz=1.0, prior="dp"), total_rounds=2)
    run_state_round(state, images, 0)
    ledger = PrivacyLedger.from_extra(state.extra)
    plan = PrivacyPlan(**ledger.plan)
    drawn = []

    class Spy:
        def __init__(self, prior):
            self.prior = prior

        def sample(self, n, *, generator):
            drawn.append(self.prior)
            return self.prior.sample(n, generator=generator)

    import alignfl_mpi.privacy as privacy_mod

    original = privacy_mod.make_latent_penalty
    try:
        privacy_mod.make_latent_penalty = (
            lambda cfg, *, prior, **kw: original(cfg, prior=Spy(prior), **kw))
        penalty = public_penalty(state, ledger, plan, generator=torch.Generator().manual_seed(0))
    finally:
        privacy_mod.make_latent_penalty = original
    penalty(state.vae)
    np.testing.assert_array_equal(drawn[0].means, np.asarray(ledger.prior["means"], np.float32))
    assert plan.batch_size == 64  # the configured batch size, not a realised Poisson one
