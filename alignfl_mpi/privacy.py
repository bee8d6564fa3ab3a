"""Client-side differential privacy: DP-SGD with per-sample clipping, accounting, a DP prior.

Plain PyTorch/NumPy, no MPI. :func:`train_private_round` is what
:meth:`alignfl_mpi.strategies.base.Strategy.client_round` calls when
``privacy.mode != "none"``. One round:

1. **Plan** (:func:`plan_privacy`, once per run, kept in ``state.extra``): one noise
   multiplier for DP-SGD and one for the prior, calibrated jointly so that the composition
   of all steps and releases in ONE accountant reaches the target (epsilon, delta).
2. **Train** (:class:`PrivateTrainer`): Poisson-sampled batches; per-sample gradient norms
   and clipped sums from ONE backward pass (:class:`PerSampleClipper`: ghost norms plus
   book-keeping, see below); Gaussian noise; then the gradient of any data-independent
   regulariser (the Lipschitz penalty at public latent points, FedProx's proximal term) is
   added to the noisy gradient; the client's own Adam step.
3. **Prior** (:func:`dp_fit_gmm`): noisy sufficient statistics of a few EM iterations on
   latent means clipped to a ball, or the data-independent N(0, I).
4. **Account** (:class:`PrivacyLedger`): append this round's mechanisms to the history kept
   in ``state.extra["privacy"]`` (plain lists and floats, so ``--resume`` restores it) and
   rebuild the accountants from it to report the cumulative epsilon of the composition.

The per-sample route. For a ``Linear`` layer with input ``a_i`` and output gradient ``g_i``
the per-sample weight gradient is the outer product ``g_i a_i^T``, so its norm is
``|g_i| |a_i|`` (the "ghost norm" of Goodfellow 2015 / Li et al. 2022) and the clipped sum
is one matrix product ``(c * g)^T a`` ("book-keeping", Bu et al. 2023). Both only need the
activations and the gradients with respect to the layer outputs, which one
``torch.autograd.grad`` call provides, so a DP step costs about one plain step. Other layers
with parameters (the conv VAE's convolutions) get exact per-sample gradients from
``torch.func.vmap`` over that layer alone. Clipping and noise are ours (see
:class:`AdaptiveClip` for why not Opacus's ``AdaClipDPOptimizer``); the accounting is
Opacus's (``RDPAccountant`` / ``PRVAccountant``, ``get_noise_multiplier``).

Randomness that privacy depends on (Poisson sampling, gradient noise, count noise, prior
noise) comes from a per-client secret seed stored in ``state.extra`` (the client's local
checkpoint only), never from the run seed, which the server knows.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .config import ClientConfig, PrivacyConfig
from .errors import ConfigError
from .lipschitz import make_latent_penalty
from .models import latent_means
from .prior import GaussianMixturePrior, e_step, standard_normal_prior

if TYPE_CHECKING:
    from .client import LocalState

__all__ = [
    "ACCOUNTANTS",
    "CLIP_RULES",
    "LOCAL_ONLY_METRICS",
    "MODES",
    "PRIORS",
    "ClipRule",
    "PerSampleClipper",
    "PrivacyLedger",
    "PrivacyPlan",
    "PrivateTrainer",
    "calibrate_joint",
    "calibrate_noise",
    "clip_to_ball",
    "combined_noise_multiplier",
    "dp_fit_gmm",
    "epsilon_spent",
    "grad_noise_multiplier",
    "joint_epsilon",
    "make_clip_rule",
    "noisy_prior_statistics",
    "per_sample_vae_loss",
    "plan_privacy",
    "prior_radius",
    "prior_statistics",
    "register_clip_rule",
    "train_private_round",
    "validate_privacy",
    "validate_private_client",
]

log = logging.getLogger(__name__)

MODES = ("none", "decoder", "full")
ACCOUNTANTS = ("rdp", "prv")
PRIORS = ("dp", "standard")
EXTRA_KEY = "privacy"
TOTAL_ROUNDS_KEY = "total_rounds"
#: Metrics computed on private data without noise: diagnostics that should stay on the client.
#: ``train_s`` is the wall time of the round, which depends on the realised (secret) Poisson
#: batch sizes.
LOCAL_ONLY_METRICS = ("loss", "recon", "kl", "penalty", "train_s")
#: EM iterations of the DP prior per round (each one is a Gaussian release).
PRIOR_EM_ITERS = 3
#: get_noise_multiplier stops within this fraction of the target epsilon (from below).
CALIBRATION_RTOL = 0.005
#: Opacus's default RDP orders; without subsampling (the prior, q = 1) the RDP of each order
#: is closed-form, so large orders (large noise) are added there at no cost.
RDP_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
RDP_ALPHAS_FULL_BATCH = RDP_ALPHAS + [64, 80, 96, 128, 192, 256, 384, 512, 768, 1024]
_NORM_EPS = 1e-6  # as Opacus: factor = C / (norm + 1e-6)
#: Relative margin of the clip factor ``C / (norm (1 + rtol) + eps)``. The norms are computed
#: in float64; the margin absorbs the float32 rounding of the factor (2^-24) and of the
#: clipped sum, so a clipped per-sample gradient never exceeds C.
_NORM_RTOL = 1e-6


# --------------------------------------------------------------------------- validation


def _one_of(key: str, value: str, allowed: Any) -> None:
    if value not in allowed:
        raise ConfigError(f"config key 'privacy.{key}': unknown value {value!r}; "
                          f"use one of {', '.join(allowed)}")


def validate_privacy(cfg: PrivacyConfig) -> None:
    """Value checks of a privacy config.

    Raises:
        ConfigError: An unknown mode, clipping rule, accountant or prior, or an out-of-range
            number; the message names the key.

    >>> validate_privacy(PrivacyConfig(mode="full"))
    >>> validate_privacy(PrivacyConfig(delta=1.0))
    Traceback (most recent call last):
    ...
    alignfl_mpi.errors.ConfigError: config key 'privacy.delta' must be in (0, 1), got 1.0
    """
    _one_of("mode", cfg.mode, MODES)
    _one_of("clipping", cfg.clipping, CLIP_RULES)
    _one_of("accountant", cfg.accountant, ACCOUNTANTS)
    _one_of("prior", cfg.prior, PRIORS)
    checks = (
        ("epsilon", cfg.epsilon, math.isfinite(cfg.epsilon) and cfg.epsilon > 0, "> 0"),
        ("delta", cfg.delta, 0 < cfg.delta < 1, "in (0, 1)"),
        ("prior_epsilon_fraction", cfg.prior_epsilon_fraction,
         0 <= cfg.prior_epsilon_fraction < 1, "in [0, 1)"),
        ("max_grad_norm", cfg.max_grad_norm,
         math.isfinite(cfg.max_grad_norm) and cfg.max_grad_norm > 0, "> 0"),
        ("target_quantile", cfg.target_quantile, 0 < cfg.target_quantile < 1, "in (0, 1)"),
        ("clipbound_lr", cfg.clipbound_lr, cfg.clipbound_lr >= 0, ">= 0"),
        ("count_noise_multiplier", cfg.count_noise_multiplier,
         cfg.count_noise_multiplier > 0, "> 0"),
    )
    for key, value, ok, what in checks:
        if not ok:
            raise ConfigError(f"config key 'privacy.{key}' must be {what}, got {value}")
    if cfg.mode != "none" and cfg.prior == "dp" and cfg.prior_epsilon_fraction == 0:
        raise ConfigError("config key 'privacy.prior_epsilon_fraction' must be > 0 with "
                          "privacy.prior = 'dp' (or use privacy.prior = 'standard')")


def validate_private_client(cfg: ClientConfig) -> None:
    """:func:`validate_privacy` plus the combinations a private client refuses.

    The Lipschitz gradient penalty is allowed: under DP it is evaluated at latent points
    drawn from N(0, I) or from the already released prior, never at encodings of private
    images, so its gradient is a data-independent regulariser added after the noise.

    Raises:
        ConfigError: One line naming the refused combination and the fix.
    """
    validate_privacy(cfg.privacy)
    if cfg.privacy.mode == "none":
        return
    if cfg.model.spectral_norm and cfg.model.arch != "mlp":
        raise ConfigError(
            f"model.spectral_norm with privacy.mode = {cfg.privacy.mode!r} is supported for "
            f"the mlp architecture only (got arch {cfg.model.arch!r})")


# --------------------------------------------------------------------------- accounting


def _create_accountant(name: str) -> Any:
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=name)


def _rdp_kwargs(accountant: str, sample_rates: list[float]) -> dict[str, Any]:
    if accountant != "rdp":
        return {}
    return {"alphas": RDP_ALPHAS_FULL_BATCH if max(sample_rates) >= 1 else RDP_ALPHAS}


@contextlib.contextmanager
def _quiet_accounting() -> Iterator[None]:
    """Opacus's accountants at extreme orders: log(0) and the largest-alpha warning are
    expected there (the order is then not the optimum), not errors."""
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def _accountant_epsilon(accountant: Any, delta: float) -> float:
    kwargs = _rdp_kwargs(accountant.mechanism(), [q for _, q, _ in accountant.history])
    with _quiet_accounting():
        return float(accountant.get_epsilon(delta=delta, **kwargs))


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(sample_rate: float, noise_multiplier: float,
                  alphas: tuple[float, ...]) -> np.ndarray:
    """Renyi DP of ONE subsampled Gaussian step at every order (Opacus's ``compute_rdp``).

    Opacus computes ``steps`` steps as this vector times ``steps``, so caching it per
    ``(q, sigma)`` gives the same floats while a client's per-round reports (the same
    ``(q, sigma)``, more steps) no longer recompute the fractional orders, the costly part
    (about 0.1 s per ``(q, sigma)`` here).
    """
    from opacus.accountants.analysis.rdp import compute_rdp

    with _quiet_accounting():
        vector = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                             orders=list(alphas))
    vector.setflags(write=False)
    return vector


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus's ``RDPAccountant.get_epsilon`` for ``history``, on cached per-step vectors."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    alphas = _rdp_kwargs("rdp", [q for _, q, _ in history])["alphas"]
    rdp = sum([_rdp_per_step(q, sigma, tuple(alphas)) * steps for sigma, q, steps in history])
    with _quiet_accounting():
        eps, _ = get_privacy_spent(orders=alphas, rdp=rdp, delta=delta)
    return float(eps)


def epsilon_spent(history: list[list[float]] | list[tuple[float, float, int]], *,
                  delta: float, accountant: str) -> float:
    """Epsilon of a composed history of subsampled Gaussian mechanisms.

    Args:
        history: ``[noise_multiplier, sample_rate, steps]`` entries (Opacus's format).
        delta: The delta at which epsilon is computed.
        accountant: ``rdp`` or ``prv``.

    Returns:
        Epsilon (0 for an empty history).

    >>> round(epsilon_spent([[1.0, 0.01, 1000]], delta=1e-5, accountant="rdp"), 2)
    2.1
    """
    if not history:
        return 0.0
    steps = [(float(s), float(q), int(n)) for s, q, n in history]
    if accountant == "rdp":
        return _rdp_epsilon(steps, delta)
    acc = _create_accountant(accountant)
    acc.history = steps
    return _accountant_epsilon(acc, delta)


@functools.lru_cache(maxsize=64)
def calibrate_noise(*, epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str) -> float:
    """The smallest noise multiplier (to ``CALIBRATION_RTOL``) whose ``steps`` reach epsilon.

    Opacus's ``get_noise_multiplier`` (bisection on the accountant's epsilon) with a
    tolerance relative to epsilon. A pure function of its arguments, so it is cached: one
    evaluation of the RDP accountant at small sigma takes about 0.5 s.

    Returns:
        sigma with ``(1 - CALIBRATION_RTOL) * epsilon <= eps(sigma) <= epsilon``.

    Raises:
        ConfigError: The budget needs a noise multiplier above 1e6.

    >>> s = calibrate_noise(epsilon=1.0, delta=1e-5, sample_rate=1.0, steps=1,
    ...                     accountant="rdp")
    >>> 0.995 <= epsilon_spent([[s, 1.0, 1]], delta=1e-5, accountant="rdp") <= 1.0
    True
    """
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with _quiet_accounting():
            return float(get_noise_multiplier(
                target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                steps=steps, accountant=accountant,
                epsilon_tolerance=CALIBRATION_RTOL * epsilon,
                **_rdp_kwargs(accountant, [sample_rate])))
    except ValueError as exc:
        raise ConfigError(f"privacy budget epsilon={epsilon:.4g} over {steps} steps is too "
                          f"small to calibrate ({exc}); raise privacy.epsilon") from None


def _joint_history(*, noise_multiplier: float, sample_rate: float, steps: int,
                   prior_noise_multiplier: float, prior_releases: int) -> list[list[float]]:
    history = [[noise_multiplier, sample_rate, steps]]
    if prior_releases:
        history.append([prior_noise_multiplier, 1.0, prior_releases])
    return history


def joint_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int,
                  prior_noise_multiplier: float, prior_releases: int, delta: float,
                  accountant: str) -> float:
    """Epsilon of DP-SGD steps and prior releases composed in ONE accountant.

    RDP adds the two mechanisms' Renyi divergences order by order and converts once at
    ``delta``; PRV composes their privacy-loss distributions. Either is tighter than adding
    two epsilons computed at split deltas.

    >>> add = (epsilon_spent([[1.0, 0.01, 1000]], delta=0.9e-5, accountant="rdp")
    ...        + epsilon_spent([[20.0, 1.0, 15]], delta=0.1e-5, accountant="rdp"))
    >>> joint = joint_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=1000,
    ...                       prior_noise_multiplier=20.0, prior_releases=15, delta=1e-5,
    ...                       accountant="rdp")
    >>> joint < add
    True
    """
    history = _joint_history(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                             steps=steps, prior_noise_multiplier=prior_noise_multiplier,
                             prior_releases=prior_releases)
    return epsilon_spent(history, delta=delta, accountant=accountant)


@functools.lru_cache(maxsize=64)
def calibrate_joint(*, epsilon: float, delta: float, sample_rate: float, steps: int,
                    noise_multiplier: float, prior_noise_multiplier: float,
                    prior_releases: int, accountant: str) -> float:
    """The smallest scale s (to ``CALIBRATION_RTOL``) of both noise multipliers that fits.

    Bisection on s for ``joint_epsilon(s sigma, s sigma_p)``, which decreases in s. The
    ratio ``sigma_p / sigma`` (set by the additive split) is kept.

    Returns:
        s with ``(1 - CALIBRATION_RTOL) epsilon <= eps(s) <= epsilon``.

    Raises:
        ConfigError: No scale in (1e-6, 1e6) reaches the target.
    """

    def eps(scale: float) -> float:
        return joint_epsilon(noise_multiplier=scale * noise_multiplier,
                             sample_rate=sample_rate, steps=steps,
                             prior_noise_multiplier=scale * prior_noise_multiplier,
                             prior_releases=prior_releases, delta=delta, accountant=accountant)

    low_target = (1 - CALIBRATION_RTOL) * epsilon
    hi, e_hi = 1.0, eps(1.0)  # invariant: eps(hi) <= epsilon < eps(lo)
    while e_hi > epsilon:  # the additive split did not fit (not expected): more noise
        hi *= 2
        if hi > 1e6:
            raise ConfigError(f"privacy budget epsilon={epsilon:.4g} is too small to "
                              "calibrate jointly; raise privacy.epsilon")
        e_hi = eps(hi)
    lo = hi
    while e_hi < low_target:  # halve until the budget is exceeded
        lo /= 2
        if lo < 1e-6:
            return hi
        e_lo = eps(lo)
        if e_lo > epsilon:
            break
        hi, e_hi = lo, e_lo
    while e_hi < low_target:  # bisection
        mid = (lo + hi) / 2
        e_mid = eps(mid)
        if e_mid > epsilon:
            lo = mid
        else:
            hi, e_hi = mid, e_mid
    return hi


@dataclass(frozen=True, kw_only=True)
class PrivacyPlan:
    """The noise of a whole run, fixed before the first private step.

    Attributes:
        accountant: Primary accountant (``rdp`` or ``prv``).
        epsilon: Target epsilon of the run (DP-SGD and prior composed in one accountant).
        delta: Target delta of the run.
        sgd_epsilon: DP-SGD share of the additive split that sets the noise ratio,
            ``epsilon * (1 - f)`` (``f = 0`` for a standard prior).
        sgd_delta: ``delta * (1 - f)``, the same split.
        prior_epsilon: Prior share of that split, ``epsilon * f``.
        prior_delta: ``delta * f``.
        sample_rate: Poisson sampling rate ``q = batch_size / n_samples``.
        steps_per_epoch: ``ceil(n_samples / batch_size)``.
        total_steps: ``total_rounds * local_epochs * steps_per_epoch``.
        noise_multiplier: sigma of the (combined) DP-SGD mechanism, used for accounting.
        prior_noise_multiplier: sigma of each prior release (0 without a DP prior).
        noise_scale: Joint calibration factor s: both multipliers are s times those of the
            additive split (1.0 without a DP prior, where there is nothing to compose).
        prior_releases: Gaussian releases of the prior over the run.
        n_samples: Local dataset size the plan is for.
        batch_size: Expected batch size.
        local_epochs: Epochs per round.
        total_rounds: Rounds of the run.
    """

    accountant: str
    epsilon: float
    delta: float
    sgd_epsilon: float
    sgd_delta: float
    prior_epsilon: float
    prior_delta: float
    sample_rate: float
    steps_per_epoch: int
    total_steps: int
    noise_multiplier: float
    prior_noise_multiplier: float
    prior_releases: int
    n_samples: int
    batch_size: int
    local_epochs: int
    total_rounds: int
    noise_scale: float = 1.0

    @property
    def expected_batch_size(self) -> float:
        """``q * n_samples``: the normaliser of the noisy gradient sum."""
        return self.sample_rate * self.n_samples


def plan_privacy(cfg: PrivacyConfig, *, n_samples: int, batch_size: int, local_epochs: int,
                 total_rounds: int, prior_iters: int = PRIOR_EM_ITERS) -> PrivacyPlan:
    """Calibrate the noise of DP-SGD and of the prior for a whole run, jointly.

    First the additive split: ``(eps (1-f), delta (1-f))`` for DP-SGD and ``(eps f, delta f)``
    for the prior, ``f = prior_epsilon_fraction`` with ``prior = "dp"`` and 0 otherwise, each
    turned into a noise multiplier. That fixes the ratio of the two multipliers. Then both
    are scaled down together (:func:`calibrate_joint`) until the composition of all steps and
    releases in one accountant reaches (eps, delta). Without a DP prior there is nothing to
    compose and the plan is the plain DP-SGD calibration.

    Args:
        cfg: The privacy config (``mode != "none"``).
        n_samples: Client dataset size N.
        batch_size: Expected batch size B (``q = B / N``).
        local_epochs: Local epochs E per round.
        total_rounds: Rounds R of the run.
        prior_iters: Gaussian releases of the prior per round.

    Returns:
        The plan.

    >>> p = plan_privacy(PrivacyConfig(mode="full", epsilon=8.0, prior="standard"),
    ...                  n_samples=1000, batch_size=100, local_epochs=2, total_rounds=3)
    >>> p.total_steps, p.sample_rate, p.prior_releases, p.noise_scale
    (60, 0.1, 0, 1.0)
    >>> abs(epsilon_spent([[p.noise_multiplier, 0.1, 60]], delta=1e-5, accountant="rdp")
    ...     - 8.0) < 0.04
    True
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    fraction = cfg.prior_epsilon_fraction if cfg.prior == "dp" else 0.0
    sample_rate = min(1.0, batch_size / n_samples)
    steps_per_epoch = math.ceil(n_samples / batch_size)
    total_steps = total_rounds * local_epochs * steps_per_epoch
    sgd_eps, sgd_delta = cfg.epsilon * (1 - fraction), cfg.delta * (1 - fraction)
    sigma = calibrate_noise(epsilon=sgd_eps, delta=sgd_delta, sample_rate=sample_rate,
                            steps=total_steps, accountant=cfg.accountant)
    releases = total_rounds * prior_iters if fraction > 0 else 0
    prior_sigma, scale = 0.0, 1.0
    if releases:
        prior_sigma = calibrate_noise(epsilon=cfg.epsilon * fraction,
                                      delta=cfg.delta * fraction, sample_rate=1.0,
                                      steps=releases, accountant=cfg.accountant)
        scale = calibrate_joint(epsilon=cfg.epsilon, delta=cfg.delta, sample_rate=sample_rate,
                                steps=total_steps, noise_multiplier=sigma,
                                prior_noise_multiplier=prior_sigma, prior_releases=releases,
                                accountant=cfg.accountant)
    return PrivacyPlan(
        accountant=cfg.accountant, epsilon=cfg.epsilon, delta=cfg.delta,
        sgd_epsilon=sgd_eps, sgd_delta=sgd_delta, prior_epsilon=cfg.epsilon * fraction,
        prior_delta=cfg.delta * fraction, sample_rate=sample_rate,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        noise_multiplier=scale * sigma, prior_noise_multiplier=scale * prior_sigma,
        prior_releases=releases, n_samples=n_samples, batch_size=batch_size,
        local_epochs=local_epochs, total_rounds=total_rounds, noise_scale=scale)


#: Stored with each plan; a plan made by an older composition rule is recalibrated.
COMPOSITION = "joint"


def _plan_key(cfg: PrivacyConfig, **inputs: int) -> dict[str, Any]:
    keys = ("epsilon", "delta", "accountant", "prior", "prior_epsilon_fraction")
    return {**{k: getattr(cfg, k) for k in keys}, **inputs, "composition": COMPOSITION}


def _merge_step(history: list[list[float]], sigma: float, rate: float, steps: int) -> None:
    """Append ``[sigma, rate, steps]``, merging with an equal last entry (as Opacus does)."""
    if steps <= 0:
        return
    if history and history[-1][0] == sigma and history[-1][1] == rate:
        history[-1][2] = int(history[-1][2]) + steps
    else:
        history.append([float(sigma), float(rate), int(steps)])


@dataclass
class PrivacyLedger:
    """What a private client persists in ``state.extra["privacy"]``: plain Python values.

    Attributes:
        secret: Seed of all privacy-relevant randomness; known to this client only.
        plan: The :class:`PrivacyPlan` as a dict, and the inputs it was made for.
        sgd_history: ``[sigma, q, steps]`` of every DP-SGD step so far.
        prior_history: ``[sigma_p, 1.0, releases]`` of every prior release so far.
        clip_bound: Current clip bound (adaptive clipping carries it across rounds).
        prior: The last released DP prior (public), the next round's EM initialisation.
    """

    secret: int = field(default_factory=lambda: secrets.randbits(63))
    plan: dict[str, Any] = field(default_factory=dict)
    plan_key: dict[str, Any] = field(default_factory=dict)
    sgd_history: list[list[float]] = field(default_factory=list)
    prior_history: list[list[float]] = field(default_factory=list)
    clip_bound: float | None = None
    prior: dict[str, list[Any]] = field(default_factory=dict)

    def released_prior(self) -> GaussianMixturePrior | None:
        """The prior this client released last, or None before its first release."""
        if not self.prior:
            return None
        return GaussianMixturePrior(**{k: np.asarray(v) for k, v in self.prior.items()})

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> PrivacyLedger:
        """The ledger in ``extra`` (a fresh one, with a new secret, if there is none)."""
        stored = extra.get(EXTRA_KEY)
        if not stored:
            return cls()
        return cls(**{k: v for k, v in stored.items() if k in cls.__dataclass_fields__})

    def to_extra(self, extra: dict[str, Any]) -> None:
        """Store the ledger in ``extra`` (plain lists and floats: a pickle-free checkpoint)."""
        extra[EXTRA_KEY] = asdict(self)

    def plan_for(self, cfg: PrivacyConfig, *, n_samples: int, batch_size: int,
                 local_epochs: int, total_rounds: int) -> PrivacyPlan:
        """The stored plan if it was made for these inputs, else a new one (warned)."""
        key = _plan_key(cfg, n_samples=n_samples, batch_size=batch_size,
                        local_epochs=local_epochs, total_rounds=total_rounds)
        if self.plan and self.plan_key == key:
            return PrivacyPlan(**{k: v for k, v in self.plan.items()
                                  if k in PrivacyPlan.__dataclass_fields__})
        if self.plan:
            log.warning("privacy plan inputs changed mid-run (%s -> %s): recalibrating; the "
                        "accountant still composes every step actually taken",
                        self.plan_key, key)
        plan = plan_privacy(cfg, n_samples=n_samples, batch_size=batch_size,
                            local_epochs=local_epochs, total_rounds=total_rounds)
        self.plan, self.plan_key = asdict(plan), key
        return plan

    def seed_for(self, seed: int) -> int:
        """A secret 63-bit seed for one round: mixes the secret with the public round seed."""
        state = np.random.SeedSequence([self.secret, seed & (2**63 - 1)]).generate_state(2)
        return int(state[0]) << 31 ^ int(state[1])

    def record_sgd(self, sigma: float, sample_rate: float, steps: int) -> None:
        """Account ``steps`` DP-SGD steps."""
        _merge_step(self.sgd_history, sigma, sample_rate, steps)

    def record_prior(self, sigma: float, releases: int) -> None:
        """Account ``releases`` Gaussian releases of the prior (no subsampling)."""
        _merge_step(self.prior_history, sigma, 1.0, releases)

    def spent(self, plan: PrivacyPlan, accountant: str) -> float:
        """Epsilon so far at ``plan.delta``: every step and release in ONE ``accountant``."""
        return epsilon_spent(self.sgd_history + self.prior_history, delta=plan.delta,
                             accountant=accountant)

    def parts(self, plan: PrivacyPlan, accountant: str) -> tuple[float, float]:
        """``(epsilon of DP-SGD alone, epsilon of the prior alone)``, each at ``plan.delta``.

        For information: each part's own epsilon. Their sum is an upper bound of
        :meth:`spent`, which is the guarantee.
        """
        return (epsilon_spent(self.sgd_history, delta=plan.delta, accountant=accountant),
                epsilon_spent(self.prior_history, delta=plan.delta, accountant=accountant))


# --------------------------------------------------------------------------- clipping rules


def combined_noise_multiplier(grad_sigma: float, count_sigma: float) -> float:
    """sigma of gradient noise ``grad_sigma`` plus a centred-count release ``count_sigma``.

    Andrew et al. 2019, Theorem 1: the count ``sum(b_i - 1/2)`` has sensitivity 1/2, so the
    pair is one Gaussian mechanism with ``sigma^-2 = grad_sigma^-2 + (2 count_sigma)^-2``.

    >>> round(combined_noise_multiplier(grad_noise_multiplier(1.0, 10.0), 10.0), 12)
    1.0
    """
    return (grad_sigma ** -2 + (2 * count_sigma) ** -2) ** -0.5


def grad_noise_multiplier(sigma: float, count_sigma: float) -> float:
    """Gradient noise that makes gradient + count release a mechanism of multiplier ``sigma``.

    ``sigma_grad = (sigma^-2 - (2 count_sigma)^-2)^-1/2`` (Andrew et al. 2019, Theorem 1).

    Raises:
        ConfigError: ``sigma >= 2 count_sigma``: the count alone would exceed the budget.

    >>> round(grad_noise_multiplier(1.0, 10.0), 6)
    1.001252
    """
    if sigma >= 2 * count_sigma:
        raise ConfigError(
            f"calibrated noise multiplier {sigma:.3g} needs privacy.count_noise_multiplier > "
            f"{sigma / 2:.3g} for adaptive clipping (got {count_sigma}); raise it or epsilon")
    return (sigma ** -2 - (2 * count_sigma) ** -2) ** -0.5


CLIP_RULES: dict[str, type[ClipRule]] = {}


def register_clip_rule(name: str) -> Callable[[type[ClipRule]], type[ClipRule]]:
    """Class decorator adding a :class:`ClipRule` to :data:`CLIP_RULES`."""

    def decorator(cls: type[ClipRule]) -> type[ClipRule]:
        if name in CLIP_RULES:
            raise ValueError(f"clipping rule {name!r} is already registered")
        cls.name = name
        CLIP_RULES[name] = cls
        return cls

    return decorator


class ClipRule:
    """How the clip bound C of each step is chosen (``privacy.clipping``).

    Attributes:
        accounted: Whether the accountant covers the bound (and so the whole step).
        bound: The current bound.
    """

    name: ClassVar[str] = ""
    accounted: ClassVar[bool] = True

    def __init__(self, cfg: PrivacyConfig, *, bound: float) -> None:
        self.cfg = cfg
        self.bound = float(bound)

    def grad_noise_multiplier(self, sigma: float) -> float:
        """The multiplier of the gradient noise, for a mechanism of multiplier ``sigma``."""
        return sigma

    def batch_bound(self, norms: Tensor) -> float:
        """The clip bound of a batch with per-sample gradient norms ``norms``."""
        return self.bound

    def update(self, norms: Tensor, *, expected_batch_size: float,
               generator: torch.Generator) -> None:
        """Adapt the bound after a step (no-op for a fixed bound)."""


@register_clip_rule("flat")
class FlatClip(ClipRule):
    """A fixed bound ``max_grad_norm``."""


@register_clip_rule("adaptive")
class AdaptiveClip(ClipRule):
    """Quantile clipping with a noisy count (Andrew et al. 2019, geometric update).

    Each step releases ``sum_i (1[|g_i| <= C] - 1/2) + N(0, count_sigma^2)`` (sensitivity
    1/2 under adding or removing a sample); the unclipped fraction is estimated as that over
    the expected batch size plus 1/2, clamped to [0, 1], and
    ``C <- C exp(-lr (fraction - target_quantile))``. This is tf_privacy's
    ``QuantileEstimatorQuery``. Opacus's ``AdaClipDPOptimizer`` applies the same Theorem-1
    noise split but releases the uncentred count (sensitivity 1) and divides it by the
    realised batch size, which Poisson sampling makes private; hence our own rule.
    """

    def grad_noise_multiplier(self, sigma: float) -> float:
        return grad_noise_multiplier(sigma, self.cfg.count_noise_multiplier)

    def update(self, norms: Tensor, *, expected_batch_size: float,
               generator: torch.Generator) -> None:
        centred = float((norms <= self.bound).sum()) - 0.5 * len(norms)
        noise = float(torch.randn((), generator=generator, device=generator.device))
        fraction = (centred + self.cfg.count_noise_multiplier * noise) / expected_batch_size
        fraction = min(1.0, max(0.0, fraction + 0.5))  # post-processing, as tf_privacy does
        self.bound *= math.exp(-self.cfg.clipbound_lr * (fraction - self.cfg.target_quantile))


@register_clip_rule("median")
class MedianClip(ClipRule):
    """The reference code's rule: C = median per-sample norm of the batch. NOT accounted."""

    accounted = False

    def batch_bound(self, norms: Tensor) -> float:
        if len(norms):
            self.bound = float(norms.median())
        return self.bound


def make_clip_rule(cfg: PrivacyConfig, *, bound: float | None = None) -> ClipRule:
    """The registered rule ``cfg.clipping``, starting from ``bound`` (or max_grad_norm)."""
    return CLIP_RULES[cfg.clipping](cfg, bound=cfg.max_grad_norm if bound is None else bound)


# --------------------------------------------------------------------------- per-sample route


class _Unit:
    """A layer whose parameters are privatised: per-sample norms and clipped sums."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self.grad_out: Tensor | None = None

    def record(self, inputs: tuple[Any, ...], output: Tensor) -> None:
        self.inputs.append(inputs[0].detach())
        self.outputs.append(output)

    def grad(self) -> Tensor:
        """The gradient at the layer's output from the last :meth:`PerSampleClipper.backward`."""
        if self.grad_out is None:
            raise RuntimeError(f"layer {self.name!r}: no backward pass since the forward")
        return self.grad_out

    def output(self) -> Tensor:
        if len(self.outputs) != 1:
            raise RuntimeError(f"layer {self.name!r} ran {len(self.outputs)} times in one "
                               "forward; per-sample clipping needs exactly one call")
        return self.outputs[0]

    def clear(self) -> None:
        self.inputs, self.outputs, self.grad_out = [], [], None

    def sq_norms(self) -> Tensor:
        raise NotImplementedError

    def clipped_sums(self, factors: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def zero_sums(self) -> list[Tensor]:
        raise NotImplementedError

    def write(self, grads: list[Tensor], pending: list[tuple[Tensor, Tensor]]) -> None:
        raise NotImplementedError


class _LinearUnit(_Unit):
    """``nn.Linear`` (optionally parametrised, e.g. spectral norm): ghost norm + book-keeping.

    The privatised tensors are the *effective* weight and bias the layer multiplies with;
    a parametrisation's Jacobian is data-independent, so pulling the noisy gradient back to
    the original parameter is post-processing.
    """

    def __init__(self, name: str, module: nn.Linear) -> None:
        super().__init__(name, module)
        self.tensor_names = ["weight"] + (["bias"] if module.bias is not None else [])
        self.effective: dict[str, Tensor] = {}

    def record(self, inputs: tuple[Any, ...], output: Tensor) -> None:
        super().record(inputs, output)
        self.effective = {n: getattr(self.module, n) for n in self.tensor_names}

    def clear(self) -> None:
        super().clear()
        self.effective = {}

    def _flat(self) -> tuple[Tensor, Tensor]:
        a, g = self.inputs[0], self.grad()
        if a.dim() == 2:
            return a, g
        return a.flatten(1, -2), g.flatten(1, -2)  # (B, T, d): per-sample sums over T

    def sq_norms(self) -> Tensor:
        a, g = (t.double() for t in self._flat())
        if a.dim() == 2:
            sq = g.pow(2).sum(1) * a.pow(2).sum(1)
        else:
            sq = torch.einsum("bto,bti->boi", g, a).flatten(1).pow(2).sum(1)
        if "bias" in self.tensor_names:
            sq = sq + g.reshape(len(g), -1, g.shape[-1]).sum(1).pow(2).sum(1)
        return sq

    def clipped_sums(self, factors: Tensor) -> list[Tensor]:
        a, g = self._flat()
        cg = g * factors.to(g.dtype).view(-1, *([1] * (g.dim() - 1)))
        sums = [cg.reshape(-1, cg.shape[-1]).T @ a.reshape(-1, a.shape[-1])]
        if "bias" in self.tensor_names:
            sums.append(cg.reshape(-1, cg.shape[-1]).sum(0))
        return sums

    def zero_sums(self) -> list[Tensor]:
        return [torch.zeros_like(getattr(self.module, n)) for n in self.tensor_names]

    def write(self, grads: list[Tensor], pending: list[tuple[Tensor, Tensor]]) -> None:
        for name, grad in zip(self.tensor_names, grads):
            if parametrize.is_parametrized(self.module, name):
                tensor = self.effective.get(name)
                pending.append((getattr(self.module, name) if tensor is None else tensor, grad))
            else:
                getattr(self.module, name).grad = grad


class _VmapUnit(_Unit):
    """Any other leaf layer: exact per-sample gradients of this layer alone via torch.func."""

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__(name, module)
        self.params = {n: p for n, p in module.named_parameters(recurse=False)
                       if p.requires_grad}
        self._per_sample: dict[str, Tensor] = {}

    def clear(self) -> None:
        super().clear()
        self._per_sample = {}

    def _grads(self) -> dict[str, Tensor]:
        if not self._per_sample:
            module = self.module

            def inner(params: dict[str, Tensor], a: Tensor, g: Tensor) -> Tensor:
                out = torch.func.functional_call(module, params, (a.unsqueeze(0),))
                return (out.squeeze(0) * g).sum()

            detached = {n: p.detach() for n, p in self.params.items()}
            self._per_sample = torch.func.vmap(torch.func.grad(inner), in_dims=(None, 0, 0))(
                detached, self.inputs[0], self.grad())
        return self._per_sample

    def sq_norms(self) -> Tensor:
        return cast(Tensor, sum(g.flatten(1).double().pow(2).sum(1)
                                for g in self._grads().values()))

    def clipped_sums(self, factors: Tensor) -> list[Tensor]:
        return [torch.einsum("b,b...->...", factors.to(g.dtype), g)
                for g in self._grads().values()]

    def zero_sums(self) -> list[Tensor]:
        return [torch.zeros_like(p) for p in self.params.values()]

    def write(self, grads: list[Tensor], pending: list[tuple[Tensor, Tensor]]) -> None:
        for p, grad in zip(self.params.values(), grads):
            p.grad = grad


def _owned_parameters(module: nn.Module) -> list[nn.Parameter]:
    own = [p for p in module.parameters(recurse=False) if p.requires_grad]
    if parametrize.is_parametrized(module):
        plist = cast(nn.Module, module.parametrizations)
        own += [p for p in plist.parameters() if p.requires_grad]
    return own


def _build_units(root: nn.Module) -> list[_Unit]:
    units: list[_Unit] = []
    covered: set[int] = set()
    for name, module in root.named_modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue  # its ``original`` belongs to the parametrised layer
        own = _owned_parameters(module)
        if not own:
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(f"layer {name!r} ({type(module).__name__}) mixes samples; "
                              "per-sample clipping cannot privatise it")
        if isinstance(module, nn.Linear):
            units.append(_LinearUnit(name, module))
        elif parametrize.is_parametrized(module):
            raise ConfigError(f"layer {name!r}: parametrised {type(module).__name__} layers "
                              "are not supported with DP; only Linear layers may be")
        elif any(True for _ in module.children()):
            raise RuntimeError(f"layer {name!r} owns parameters and has children; "
                               "per-sample clipping supports leaf layers only")
        else:
            units.append(_VmapUnit(name, module))
        covered.update(id(p) for p in own)
    missing = [n for n, p in root.named_parameters() if p.requires_grad and id(p) not in covered]
    if missing:
        raise RuntimeError(f"parameters not covered by per-sample clipping: {missing}")
    return units


class PerSampleClipper:
    """Per-sample gradient norms and clipped sums of ``module``'s parameters, one backward.

    Usage per step::

        with clipper.capture():
            losses = per_sample_loss(model(x))          # (B,), sample i's loss only
        other_grads = clipper.backward(losses, others)  # sum-loss grads of ``others``
        norms = clipper.norms()                         # (B,)
        sums = clipper.clipped_sums(factors)            # sum_i factors_i grad_i, per tensor
        clipper.write_grads(noisy_sums)                 # into .grad (or through parametrisations)
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.units = _build_units(module)
        self._norms: Tensor | None = None

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Record each layer's input and output during the forward pass inside."""
        for unit in self.units:
            unit.clear()
        self._norms = None
        handles = [u.module.register_forward_hook(
            lambda m, i, o, u=u: u.record(i, o)) for u in self.units]
        try:
            with parametrize.cached():
                yield
        finally:
            for handle in handles:
                handle.remove()

    def backward(self, losses: Tensor, others: Sequence[Tensor] = ()) -> list[Tensor | None]:
        """Backpropagate ``losses.sum()`` to every layer output (and to ``others``).

        Returns:
            The gradients of ``losses.sum()`` with respect to ``others``.
        """
        outputs = [u.output() for u in self.units]
        grads = torch.autograd.grad(losses.sum(), outputs + list(others), allow_unused=True)
        for unit, out, grad in zip(self.units, outputs, grads):
            unit.grad_out = torch.zeros_like(out) if grad is None else grad.detach()
        return list(grads[len(outputs):])

    @torch.no_grad()
    def norms(self) -> Tensor:
        """Per-sample gradient norms (over all privatised tensors) of the last backward.

        Float64: in float32 the ghost norm ``|g| |a|`` was off by a few 1e-6 relative,
        more than ``_NORM_EPS``, so a clipped gradient could exceed C.
        """
        if self._norms is None:
            self._norms = cast(Tensor, sum(u.sq_norms() for u in self.units)).sqrt()
        return self._norms

    @torch.no_grad()
    def clipped_sums(self, factors: Tensor) -> list[list[Tensor]]:
        """``sum_i factors_i grad_i`` for every privatised tensor, grouped by layer."""
        return [u.clipped_sums(factors) for u in self.units]

    def zero_sums(self) -> list[list[Tensor]]:
        """Zero sums (an empty batch), shaped as :meth:`clipped_sums`."""
        return [u.zero_sums() for u in self.units]

    def write_grads(self, grads: list[list[Tensor]]) -> None:
        """Set the privatised parameters' ``.grad`` (through parametrisations if any)."""
        pending: list[tuple[Tensor, Tensor]] = []
        for unit, unit_grads in zip(self.units, grads):
            unit.write(unit_grads, pending)
        if pending:
            torch.autograd.backward([t for t, _ in pending], [g for _, g in pending])
        for unit in self.units:
            unit.clear()


# --------------------------------------------------------------------------- DP-SGD


def clip_factors(norms: Tensor, bound: float) -> Tensor:
    """Per-sample clip factors ``min(1, C / (norm (1 + 1e-6) + 1e-6))`` in float64.

    The relative margin keeps every clipped norm at or below C after the factor is rounded
    to float32 and multiplied in float32.

    >>> clip_factors(torch.tensor([0.5, 2.0], dtype=torch.float64), 1.0).tolist()[0]
    1.0
    >>> float(clip_factors(torch.tensor([2.0], dtype=torch.float64), 1.0)[0] * 2.0) < 1.0
    True
    """
    return (bound / (norms * (1 + _NORM_RTOL) + _NORM_EPS)).clamp(max=1.0)


def per_sample_vae_loss(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, *,
                        kl_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample ``(loss, recon, kl)``, each ``(B,)``; their means are ``models.vae_loss``.

    >>> x = torch.zeros(2, 2)
    >>> [t.tolist() for t in per_sample_vae_loss(x + 1, x, torch.ones(2, 1),
    ...                                          torch.zeros(2, 1), kl_weight=1.0)]
    [[2.5, 2.5], [2.0, 2.0], [0.5, 0.5]]
    """
    rec = (recon - x).pow(2).flatten(1).sum(1)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    return rec + kl_weight * kl, rec, kl


#: A data-reading loss term computed from the step's own forward pass:
#: ``sample_term(vae, x, mu, logvar) -> (B,)``, one value per sample of the batch, each a
#: function of that sample alone (MOON's contrastive term). It joins the per-sample losses
#: before clipping, so its gradient is clipped and noised with theirs.
SampleTerm = Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]

#: A data-independent loss term: ``regulariser(vae) -> (tensor, float(tensor))``.
Regulariser = Callable[[nn.Module], tuple[Tensor, Tensor | float]]


@contextlib.contextmanager
def _frozen_parametrizations(module: nn.Module) -> Iterator[None]:
    """Parametrisation modules (spectral norm's power iteration) in eval mode inside."""
    inner = [m for p in module.modules() if isinstance(p, parametrize.ParametrizationList)
             for m in p.modules()]
    modes = [m.training for m in inner]
    for m in inner:
        m.training = False
    try:
        yield
    finally:
        for m, mode in zip(inner, modes):
            m.training = mode


class PrivateTrainer:
    """DP-SGD on a client's VAE with Poisson sampling and the client's own optimizer.

    ``mode = "full"`` privatises every parameter. ``mode = "decoder"`` privatises the
    decoder; the encoder and latent heads get plain (unclipped, noiseless) mean gradients in
    the same backward and the same Adam step.

    ``regulariser(vae) -> (tensor, its detached value)`` is an optional loss term that does not read
    private data (the Lipschitz penalty at public latent points, FedProx's proximal term).
    Its gradient is added after the noise, so the private path (sampling, clipping, noise,
    generators) is the same with or without it, and so is the accounting: post-processing.

    ``sample_term`` (:data:`SampleTerm`) is a term that reads the private batch: it is added
    to each sample's loss before the per-sample clipping, from the same captured forward
    pass, so the clipped per-sample gradients (and so the accounting) cover it.

    Attributes:
        grad_noise_multiplier: Multiplier of the gradient noise actually added (sigma, or the
            Theorem-1 inflation of sigma for adaptive clipping).
        noise_scale: 1.0; tests set 0.0 to switch the noise off.
        steps_done: DP steps taken so far.
    """

    def __init__(self, vae: nn.Module, optimizer: torch.optim.Optimizer, *, mode: str,
                 plan: PrivacyPlan, rule: ClipRule, kl_weight: float, device: torch.device,
                 seed: int, regulariser: Regulariser | None = None,
                 sample_term: SampleTerm | None = None) -> None:
        self.vae, self.optimizer, self.plan, self.rule = vae, optimizer, plan, rule
        self.regulariser = regulariser
        if sample_term is not None and mode != "full":
            raise ValueError("a per-sample term reads the encoder's output: it needs mode 'full'")
        self.sample_term = sample_term
        self.regulariser_value: Tensor | float = 0.0
        self.kl_weight, self.device = kl_weight, device
        private = vae if mode == "full" else cast(nn.Module, vae.decoder)
        self.clipper = PerSampleClipper(private)
        private_ids = {id(p) for p in private.parameters()}
        self.public_params = [p for p in vae.parameters()
                              if p.requires_grad and id(p) not in private_ids]
        self.grad_noise_multiplier = rule.grad_noise_multiplier(plan.noise_multiplier)
        self.noise_scale = 1.0
        self.steps_done = 0
        self.sampler = torch.Generator().manual_seed(seed)
        self.noise = torch.Generator(device=device).manual_seed(seed ^ 0x5DEECE66D)

    @torch.no_grad()
    def privatize(self, sums: list[list[Tensor]], bound: float) -> list[list[Tensor]]:
        """Add ``N(0, (grad_noise_multiplier C)^2)`` to each sum, divide by ``q N`` (in place)."""
        std = self.noise_scale * self.grad_noise_multiplier * bound
        for tensor in (t for unit in sums for t in unit):
            if std > 0:
                tensor.add_(torch.randn(tensor.shape, generator=self.noise, device=tensor.device,
                                        dtype=tensor.dtype), alpha=std)
            tensor.div_(self.plan.expected_batch_size)
        return sums

    def add_regulariser(self) -> None:
        """Accumulate the regulariser's gradient into ``.grad`` (after the noise).

        Spectral-norm parametrisations are held in eval mode meanwhile, so the regulariser's
        forward pass uses the same normalised weights as the private step and does not
        advance their power iteration.
        """
        if self.regulariser is None:
            return
        with _frozen_parametrizations(self.vae):
            value, self.regulariser_value = self.regulariser(self.vae)
            if value.requires_grad:
                value.backward()

    def step(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One DP-SGD step on the (Poisson-sampled, possibly empty) batch ``x``.

        Returns:
            Per-sample ``(loss, recon, kl)`` of the batch, detached.
        """
        self.optimizer.zero_grad(set_to_none=True)
        norms = torch.zeros(0, device=self.device, dtype=torch.float64)
        public_grads: list[Tensor | None] = []
        if len(x):
            with self.clipper.capture():
                recon, mu, logvar = self.vae(x)
            losses, rec, kl = per_sample_vae_loss(recon, x, mu, logvar, kl_weight=self.kl_weight)
            if self.sample_term is not None:
                losses = losses + self.sample_term(self.vae, x, mu, logvar)
            public_grads = self.clipper.backward(losses, self.public_params)
            norms = self.clipper.norms()
        else:
            losses = rec = kl = torch.zeros(0, device=self.device)
        bound = self.rule.batch_bound(norms)
        if len(x):
            sums = self.clipper.clipped_sums(clip_factors(norms, bound))
        else:
            sums = self.clipper.zero_sums()
        self.clipper.write_grads(self.privatize(sums, bound))
        for p, grad in zip(self.public_params, public_grads):
            p.grad = None if grad is None else grad / len(x)
        self.add_regulariser()
        self.optimizer.step()
        self.rule.update(norms, expected_batch_size=self.plan.expected_batch_size,
                         generator=self.noise)
        self.steps_done += 1
        return losses.detach(), rec.detach(), kl.detach()

    def sample_batch(self, n: int) -> Tensor:
        """Indices of a Poisson batch: each of ``n`` samples independently with rate q."""
        mask = torch.rand(n, generator=self.sampler) < self.plan.sample_rate
        return mask.nonzero(as_tuple=True)[0]

    def train(self, data: Tensor, *, epochs: int) -> dict[str, float]:
        """``epochs`` x ``steps_per_epoch`` steps; the last epoch's mean loss terms.

        With a regulariser, ``penalty`` is its mean value per step of the last epoch.
        """
        self.vae.train()
        metrics: dict[str, float] = {}
        for _ in range(epochs):
            # sums stay on the device until the epoch ends: no host sync per step
            sums = torch.zeros(3, dtype=torch.float64, device=self.device)
            seen, penalty = 0, torch.zeros((), dtype=torch.float64, device=self.device)
            for _ in range(self.plan.steps_per_epoch):
                x = data[self.sample_batch(len(data))].to(self.device, non_blocking=True)
                terms = self.step(x)
                sums += torch.stack([t.sum().double() for t in terms])
                seen += len(x)
                penalty += self.regulariser_value
            sums /= max(seen, 1)
            metrics = dict(zip(("loss", "recon", "kl"), sums.tolist()))
            if self.regulariser is not None:
                metrics["penalty"] = float(penalty) / self.plan.steps_per_epoch
        return metrics


# --------------------------------------------------------------------------- DP prior


def prior_radius(latent_dim: int) -> float:
    """Default clipping radius R of latent means: ``2 + sqrt(D)``.

    The KL term pulls posterior means towards N(0, I), whose norm is about sqrt(D).

    >>> prior_radius(4)
    4.0
    """
    return 2.0 + math.sqrt(latent_dim)


def clip_to_ball(x: np.ndarray, radius: float) -> np.ndarray:
    """Scale each row of ``x`` into the L2 ball of ``radius``.

    >>> clip_to_ball(np.array([[3.0, 4.0], [0.3, 0.4]]), 1.0).round(2).tolist()
    [[0.6, 0.8], [0.3, 0.4]]
    """
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, radius / np.maximum(norms, 1e-12))


def _initial_mixture(k: int, d: int, radius: float, rng: np.random.Generator,
                     init: GaussianMixturePrior | None) -> tuple[np.ndarray, ...]:
    if init is not None and init.means.shape == (k, d):
        return (init.weights.astype(np.float64), init.means.astype(np.float64),
                np.exp(init.log_vars.astype(np.float64)))
    means = clip_to_ball(rng.standard_normal((k, d)), radius)
    return np.full(k, 1.0 / k), means, np.ones((k, d))


def prior_statistics(latents: np.ndarray, weights: np.ndarray, means: np.ndarray,
                     variances: np.ndarray, *, radius: float) -> np.ndarray:
    """One EM iteration's sufficient statistics in the units of the prior's noise.

    Latents are clipped to the ball of ``radius`` R; with responsibilities ``r_i`` under the
    given (public) mixture the vector is ``(sum r_ik, sum r_ik x_i / R, sum r_ik x_i^2 / R^2)``
    flattened. Adding or removing one sample changes each block by at most ``|r_i|_2 <= 1``
    times ``1``, ``|x_i| / R <= 1`` and ``|x_i^2|_2 / R^2 <= |x_i|^2 / R^2 <= 1``: the L2
    sensitivity of the vector is at most sqrt(3).

    Returns:
        Float64 ``(K + 2 K D,)``.
    """
    x = clip_to_ball(np.asarray(latents, dtype=np.float64), radius)
    resp = np.exp(e_step(x, weights, means, variances)[0])
    return np.concatenate([resp.sum(0), (resp.T @ x).ravel() / radius,
                           (resp.T @ x**2).ravel() / radius**2])


def noisy_prior_statistics(latents: np.ndarray, weights: np.ndarray, means: np.ndarray,
                           variances: np.ndarray, *, radius: float, noise_multiplier: float,
                           rng: np.random.Generator) -> np.ndarray:
    """:func:`prior_statistics` plus ``N(0, (sqrt(3) sigma)^2 I)``: one Gaussian release."""
    stats = prior_statistics(latents, weights, means, variances, radius=radius)
    return stats + math.sqrt(3.0) * noise_multiplier * rng.standard_normal(stats.shape)


def dp_fit_gmm(latents: np.ndarray, *, n_components: int, noise_multiplier: float,
               radius: float, rng: np.random.Generator, iters: int = PRIOR_EM_ITERS,
               init: GaussianMixturePrior | None = None,
               min_var: float = 1e-4) -> GaussianMixturePrior:
    """Fit a diagonal GMM by EM on noisy sufficient statistics (one Gaussian release/iter).

    Each iteration releases :func:`prior_statistics` (L2 sensitivity sqrt(3)) plus
    ``N(0, 3 sigma^2 I)``: a Gaussian mechanism of noise multiplier sigma, without
    subsampling. The M-step divides the noisy sums by the noisy counts; a component whose
    noisy count is below ``max(1, 3 sqrt(3) sigma)`` keeps its previous (public) values.
    The initial mixture is data-independent (seeded draws in the ball) or ``init``, a
    previously released prior.

    Args:
        latents: ``(N, D)`` latent means.
        n_components: K.
        noise_multiplier: sigma of each release (0: exact statistics, for tests).
        radius: R, the clipping radius of the latents.
        rng: Secret randomness of the noise.
        iters: Releases (EM iterations).
        init: Public starting mixture (e.g. the last released prior), same K and D.
        min_var: Variance floor (variances are also capped at R^2).

    Returns:
        The released prior.
    """
    k, d = n_components, latents.shape[1]
    weights, means, variances = _initial_mixture(k, d, radius, rng, init)
    floor = max(1.0, 3 * math.sqrt(3.0) * noise_multiplier)
    for _ in range(iters):
        stats = noisy_prior_statistics(latents, weights, means, variances, radius=radius,
                                       noise_multiplier=noise_multiplier, rng=rng)
        counts = stats[:k]
        sums = stats[k:k + k * d].reshape(k, d) * radius
        squares = stats[k + k * d:].reshape(k, d) * radius**2
        ok = counts > floor
        safe = np.where(ok, counts, 1.0)[:, None]
        means = np.where(ok[:, None], clip_to_ball(sums / safe, radius), means)
        variances = np.where(ok[:, None],
                             np.clip(squares / safe - means**2, min_var, radius**2), variances)
        mass = np.where(ok, counts, floor)
        weights = mass / mass.sum()
    return GaussianMixturePrior(weights=weights, means=means, log_vars=np.log(variances))


def _release_prior(state: LocalState, data: Tensor, *, plan: PrivacyPlan,
                   ledger: PrivacyLedger, seed: int) -> GaussianMixturePrior:
    latent_dim = state.cfg.model.latent_dim
    if state.cfg.privacy.prior == "standard":
        return standard_normal_prior(latent_dim)
    latents = latent_means(state.vae, data, device=state.device)
    init = ledger.released_prior()
    prior = dp_fit_gmm(latents, n_components=state.cfg.prior_components,
                       noise_multiplier=plan.prior_noise_multiplier,
                       radius=prior_radius(latent_dim), rng=np.random.default_rng(seed),
                       init=init)
    ledger.record_prior(plan.prior_noise_multiplier, PRIOR_EM_ITERS)
    ledger.prior = {k: v.tolist() for k, v in prior.to_arrays().items()}
    return prior


# --------------------------------------------------------------------------- one round


def _total_rounds(extra: dict[str, Any]) -> int:
    rounds = extra.get(TOTAL_ROUNDS_KEY)
    if rounds is None:
        log.warning("state.extra[%r] is not set: calibrating the privacy budget for ONE "
                    "round; later rounds will overspend epsilon", TOTAL_ROUNDS_KEY)
        return 1
    return int(rounds)


def _report(ledger: PrivacyLedger, plan: PrivacyPlan, *, rule: ClipRule,
            trainer: PrivateTrainer, accounted: bool) -> dict[str, float]:
    sgd, prior = ledger.parts(plan, plan.accountant)
    other = "prv" if plan.accountant == "rdp" else "rdp"
    try:
        cross = {f"epsilon_{other}": ledger.spent(plan, other)}
    except (ValueError, RuntimeError, ArithmeticError) as exc:  # a cross-check only
        log.warning("%s cross-check accountant failed: %s", other, exc)
        cross = {}  # not sent: an update's metrics must be finite
    return {
        "epsilon": ledger.spent(plan, plan.accountant), "epsilon_sgd": sgd,
        "epsilon_prior": prior, **{k: v for k, v in cross.items() if math.isfinite(v)},
        "epsilon_target": plan.epsilon, "delta": plan.delta,
        "noise_multiplier": plan.noise_multiplier,
        "grad_noise_multiplier": trainer.grad_noise_multiplier,
        "prior_noise_multiplier": plan.prior_noise_multiplier,
        "clip_bound": rule.bound, "sample_rate": plan.sample_rate,
        "dp_steps": float(sum(int(h[2]) for h in ledger.sgd_history)),
        "dp_accounted": 1.0 if accounted else 0.0,
    }


def public_penalty(state: LocalState, ledger: PrivacyLedger, plan: PrivacyPlan, *,
                   generator: torch.Generator) -> Regulariser | None:
    """The Lipschitz penalty of a private client, at latent points that are not data.

    The points are ``B`` (the configured batch size, not the realised Poisson one) draws
    per step from the prior this client released last round (already private), or from
    N(0, I) before the first release or with ``prior = "standard"``. So the penalty and its
    gradient are functions of the current weights and public randomness only.
    """
    cfg = state.cfg
    if cfg.lipschitz.weight <= 0:
        return None
    prior = ledger.released_prior() or standard_normal_prior(cfg.model.latent_dim)
    return make_latent_penalty(cfg.lipschitz, prior=prior, n_points=plan.batch_size,
                               generator=generator)


def _combine(*terms: Regulariser | None) -> Regulariser | None:
    active = [t for t in terms if t is not None]
    if len(active) <= 1:
        return active[0] if active else None

    def total(vae: nn.Module) -> tuple[Tensor, Tensor | float]:
        values = [t(vae) for t in active]
        return cast(Tensor, sum(v for v, _ in values)), sum(f for _, f in values)

    return total


def train_private_round(state: LocalState, data: Tensor, *, round_: int, seed: int,
                        generator: torch.Generator, regulariser: Regulariser | None = None,
                        sample_term: SampleTerm | None = None,
                        ) -> tuple[dict[str, float], GaussianMixturePrior]:
    """One private local round: DP-SGD for ``local_epochs``, then the prior, then accounting.

    Reads ``state.extra["total_rounds"]`` (set by the runtime before the first round) and
    keeps the accountant history, the adaptive clip bound and the client's secret seed in
    ``state.extra["privacy"]``. ALIGN-FL and the averaging strategies (DP-FedAvg, DP-FedProx,
    ...) all call it from their client round (:mod:`alignfl_mpi.strategies`).

    Args:
        state: The client (``state.cfg.privacy.mode`` is ``decoder`` or ``full``).
        data: float32 ``(N, 1, 28, 28)`` in [0, 1].
        round_: Round index (logging only; the history counts what actually ran).
        seed: The public round seed; mixed with the secret for the noise.
        generator: The runtime's public generator. Privacy-relevant randomness must not be
            reproducible from the run seed, so only the Lipschitz penalty's latent points
            (which are not data) are drawn from it.
        regulariser: An extra data-independent term (FedProx's proximal term), added after
            the noise like the Lipschitz penalty.
        sample_term: A per-sample term that reads the batch (MOON's contrastive term),
            clipped and noised with the VAE loss (``mode = "full"`` only).

    Returns:
        ``(metrics, prior)``: the loss terms of the last epoch, the privacy metrics
        (``epsilon`` cumulative and including the prior's share, the cross-check
        ``epsilon_prv``/``epsilon_rdp``, ``noise_multiplier``, ``clip_bound``, ``delta``,
        ``dp_accounted``, ...) and the prior to share.
    """
    cfg = state.cfg
    validate_private_client(cfg)
    ledger = PrivacyLedger.from_extra(state.extra)
    plan = ledger.plan_for(cfg.privacy, n_samples=len(data), batch_size=cfg.batch_size,
                           local_epochs=cfg.local_epochs,
                           total_rounds=_total_rounds(state.extra))
    rule = make_clip_rule(cfg.privacy, bound=ledger.clip_bound)
    round_seed = ledger.seed_for(seed)
    penalty = public_penalty(state, ledger, plan, generator=generator)
    trainer = PrivateTrainer(state.vae, state.optimizer, mode=cfg.privacy.mode, plan=plan,
                             rule=rule, kl_weight=cfg.kl_weight, device=state.device,
                             seed=round_seed, regulariser=_combine(penalty, regulariser),
                             sample_term=sample_term)
    metrics = trainer.train(data, epochs=cfg.local_epochs)
    ledger.record_sgd(plan.noise_multiplier, plan.sample_rate, trainer.steps_done)
    prior = _release_prior(state, data, plan=plan, ledger=ledger, seed=round_seed)
    ledger.clip_bound = rule.bound
    ledger.to_extra(state.extra)
    accounted = rule.accounted and cfg.privacy.mode == "full"
    if not rule.accounted:
        log.warning("client %d round %d: privacy.clipping = 'median' sets the clip bound from "
                    "the batch without noise; this round is NOT covered by epsilon",
                    state.client_id, round_)
    elif cfg.privacy.mode == "decoder":
        log.warning("client %d round %d: privacy.mode = 'decoder' trains the encoder without "
                    "DP; the decoder's and prior's epsilon hold only for a fixed encoder "
                    "(dp_accounted = 0)", state.client_id, round_)
    metrics.update(_report(ledger, plan, rule=rule, trainer=trainer, accounted=accounted))
    if metrics["epsilon"] > plan.epsilon * (1 + 1e-9):
        log.warning("client %d round %d: epsilon %.4g exceeds the target %.4g (more rounds "
                    "than planned?)", state.client_id, round_, metrics["epsilon"], plan.epsilon)
    return metrics, prior
