"""Diagonal Gaussian-mixture latent prior: fit (EM), sample, array round-trip.

A client fits :func:`fit_gmm` (or :func:`fit_gmm_sklearn`, the reference code's fit) to
latents of its private data and
shares the resulting :class:`GaussianMixturePrior` with its decoder; the server
validates it with :meth:`GaussianMixturePrior.from_arrays` and draws latents
from it with :meth:`GaussianMixturePrior.sample`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from alignfl_mpi.errors import MessageError

#: Extra prior array of a conditional decoder: its label distribution ``(n_classes,)``.
CLASS_WEIGHTS = "class_weights"

__all__ = ["GaussianMixturePrior", "fit_gmm", "fit_gmm_sklearn", "standard_normal_prior"]

#: ``random_state`` of the reference code's ``GaussianMixture`` (every client, every round).
SKLEARN_RANDOM_STATE = 42

ARRAY_KEYS = ("weights", "means", "log_vars")

MAX_ABS_LOG_VAR = 40.0
"""Received log-variances must lie within +-this (variances 4e-18 .. 2e17)."""
_WEIGHT_SUM_TOL = 1e-4


@dataclass(frozen=True, eq=False)
class GaussianMixturePrior:
    """A mixture of K diagonal Gaussians in a D-dimensional latent space.

    Arrays are stored as read-only float32 copies.

    Attributes:
        weights: Mixing weights ``(K,)``, non-negative, summing to 1.
        means: Component means ``(K, D)``.
        log_vars: Component log-variances ``(K, D)``.
    """

    weights: np.ndarray
    means: np.ndarray
    log_vars: np.ndarray

    def __post_init__(self) -> None:
        for key in ARRAY_KEYS:
            array = np.array(getattr(self, key), dtype=np.float32)
            array.setflags(write=False)
            object.__setattr__(self, key, array)
        k = self.weights.shape[0] if self.weights.ndim == 1 else -1
        if k < 1 or self.means.ndim != 2 or self.means.shape[0] != k:
            raise ValueError(
                f"inconsistent prior shapes: weights {self.weights.shape}, "
                f"means {self.means.shape}"
            )
        if self.log_vars.shape != self.means.shape:
            raise ValueError(
                f"log_vars shape {self.log_vars.shape} != means shape {self.means.shape}"
            )

    @property
    def n_components(self) -> int:
        """Number of mixture components K."""
        return int(self.weights.shape[0])

    @property
    def latent_dim(self) -> int:
        """Latent dimension D."""
        return int(self.means.shape[1])

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` latents: a component by weight, then its Gaussian.

        Args:
            n: Number of samples.
            generator: CPU generator; a seeded one makes the draw reproducible.

        Returns:
            Float32 CPU tensor ``(n, D)``.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return torch.empty(0, self.latent_dim)
        weights = torch.from_numpy(self.weights.astype(np.float64))
        idx = torch.multinomial(weights, n, replacement=True, generator=generator)
        means = torch.from_numpy(self.means.copy())[idx]
        stds = torch.from_numpy(np.exp(0.5 * self.log_vars))[idx]
        eps = torch.randn(n, self.latent_dim, generator=generator)
        return means + stds * eps

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return writable copies keyed ``"weights"``, ``"means"``, ``"log_vars"``."""
        return {key: getattr(self, key).copy() for key in ARRAY_KEYS}

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], *, latent_dim: int | None = None
    ) -> GaussianMixturePrior:
        """Validate untrusted arrays (e.g. from a client message) and build a prior.

        Weights summing to 1 within 1e-4 are renormalised.

        Args:
            arrays: Exactly the keys ``"weights"``, ``"means"``, ``"log_vars"``.
            latent_dim: If given, the required D.

        Returns:
            The prior.

        Raises:
            MessageError: With a one-line reason if the arrays are not a valid prior.
        """
        weights, means, log_vars = _checked_arrays(arrays)
        k, d = means.shape
        if weights.shape != (k,) or k < 1 or d < 1 or log_vars.shape != (k, d):
            raise MessageError(
                f"prior shapes inconsistent: weights {weights.shape}, means {means.shape}, "
                f"log_vars {log_vars.shape}; expected (K,), (K, D), (K, D) with K, D >= 1"
            )
        if latent_dim is not None and d != latent_dim:
            raise MessageError(f"prior latent_dim {d} does not match the model's {latent_dim}")
        with np.errstate(over="ignore"):
            stds = np.exp(0.5 * log_vars.astype(np.float32))
        if not all(np.isfinite(a).all() for a in (weights, means, log_vars, stds)):
            raise MessageError("prior arrays contain NaN, infinite or float32-overflowing values")
        if (weights < 0).any():
            raise MessageError("prior weights must be non-negative")
        if (np.abs(log_vars) > MAX_ABS_LOG_VAR).any():
            raise MessageError(f"prior log-variances must lie in [-{MAX_ABS_LOG_VAR:g}, "
                               f"{MAX_ABS_LOG_VAR:g}], got [{log_vars.min():.3g}, "
                               f"{log_vars.max():.3g}]")
        total = float(weights.sum(dtype=np.float64))
        if abs(total - 1.0) > _WEIGHT_SUM_TOL:
            raise MessageError(f"prior weights sum to {total:.6g}, expected 1")
        return cls(weights=weights / total, means=means, log_vars=log_vars)


def _checked_arrays(arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Return the three arrays as float32, after key and dtype checks."""
    if not isinstance(arrays, Mapping):
        raise MessageError(f"prior must be a mapping of arrays, got {type(arrays).__name__}")
    missing = [key for key in ARRAY_KEYS if key not in arrays]
    extra = sorted(str(key) for key in arrays if key not in ARRAY_KEYS)
    if missing:
        raise MessageError(f"prior is missing array(s) {missing}")
    if extra:
        raise MessageError(f"prior has unexpected array(s) {extra}")
    out = []
    for key in ARRAY_KEYS:
        array = np.asarray(arrays[key])
        if array.dtype.kind not in "fiu":
            raise MessageError(f"prior {key} has non-numeric dtype {array.dtype}")
        with np.errstate(over="ignore"):
            out.append(array.astype(np.float32))
    if out[1].ndim != 2:
        raise MessageError(f"prior means must be 2-D (K, D), got shape {out[1].shape}")
    return out


def standard_normal_prior(latent_dim: int) -> GaussianMixturePrior:
    """Return N(0, I) as a one-component mixture: the data-independent fallback.

    Args:
        latent_dim: Latent dimension D (>= 1).

    Returns:
        The prior.

    Example:
        >>> p = standard_normal_prior(3)
        >>> p.n_components, p.latent_dim, float(p.means.sum()), float(p.log_vars.sum())
        (1, 3, 0.0, 0.0)
    """
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
    zeros = np.zeros((1, latent_dim))
    return GaussianMixturePrior(weights=np.ones(1), means=zeros, log_vars=zeros)


def _checked_latents(latents: np.ndarray) -> np.ndarray:
    """``latents`` as float64 ``(N, D)`` with N, D >= 1 and finite values, or ValueError."""
    x = np.asarray(latents, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"latents must have shape (N, D) with N, D >= 1, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("latents contain NaN or infinite values")
    return x


def fit_gmm(
    latents: np.ndarray,
    *,
    n_components: int = 10,
    n_iter: int = 100,
    seed: int = 0,
    min_var: float = 1e-4,
    tol: float = 1e-5,
) -> GaussianMixturePrior:
    """Fit a diagonal-covariance Gaussian mixture by EM.

    Initialisation is k-means++ seeding from ``np.random.default_rng(seed)``;
    K is clipped to the number of samples; a component whose responsibility
    vanishes is re-seeded at the worst-explained sample.

    Args:
        latents: Samples ``(N, D)``, N >= 1.
        n_components: Requested number of components K.
        n_iter: Maximum EM iterations.
        seed: Seed of the initialisation; equal seeds give equal fits.
        min_var: Floor of every variance.
        tol: Stop when the mean log-likelihood improves by less than this.

    Returns:
        The fitted prior.

    Example:
        >>> x = np.concatenate([np.zeros((50, 2)), np.full((50, 2), 5.0)])
        >>> p = fit_gmm(x, n_components=2, seed=0)
        >>> sorted(np.round(p.means[:, 0], 3).tolist()), np.round(p.weights, 3).tolist()
        ([0.0, 5.0], [0.5, 0.5])
    """
    x = _checked_latents(latents)
    if n_components < 1 or min_var <= 0:
        raise ValueError(f"need n_components >= 1 and min_var > 0, got {n_components}, {min_var}")
    rng = np.random.default_rng(seed)
    global_var = np.maximum(x.var(axis=0), min_var)
    means = _kmeans_pp(x, min(n_components, x.shape[0]), rng)
    variances = np.tile(global_var, (means.shape[0], 1))
    weights = np.full(means.shape[0], 1.0 / means.shape[0])
    prev_ll = -math.inf
    for _ in range(n_iter):
        log_resp, log_lik = e_step(x, weights, means, variances)
        weights, means, variances, reseeded = _m_step(
            x, log_resp, log_lik, global_var=global_var, min_var=min_var
        )
        mean_ll = float(log_lik.mean())
        if not reseeded and abs(mean_ll - prev_ll) < tol:
            break
        prev_ll = mean_ll
    return GaussianMixturePrior(weights=weights, means=means, log_vars=np.log(variances))


def fit_gmm_sklearn(latents: np.ndarray, *, n_components: int = 10,
                    random_state: int = SKLEARN_RANDOM_STATE) -> GaussianMixturePrior:
    """Fit the prior as the reference code does: scikit-learn's
    ``GaussianMixture(n_components, covariance_type="diag", random_state=42)`` with its
    defaults (k-means initialisation, ``reg_covar`` 1e-6, ``tol`` 1e-3, 100 iterations).

    K is clipped to the number of samples (scikit-learn refuses fewer samples than K).

    Example:
        >>> x = np.concatenate([np.zeros((50, 2)), np.full((50, 2), 5.0)])
        >>> p = fit_gmm_sklearn(x, n_components=2)
        >>> sorted(np.round(p.means[:, 0], 3).tolist()), np.round(p.weights, 3).tolist()
        ([0.0, 5.0], [0.5, 0.5])
    """
    from sklearn.mixture import GaussianMixture

    x = _checked_latents(latents)
    if n_components < 1:
        raise ValueError(f"need n_components >= 1, got {n_components}")
    gm = GaussianMixture(n_components=min(n_components, x.shape[0]), covariance_type="diag",
                         random_state=random_state).fit(x)
    weights = np.asarray(gm.weights_, dtype=np.float64)
    return GaussianMixturePrior(weights=weights / weights.sum(), means=np.asarray(gm.means_),
                                log_vars=np.log(np.asarray(gm.covariances_)))


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``k`` initial means from ``x`` by k-means++ seeding."""
    centers = [x[rng.integers(x.shape[0])]]
    dist2 = ((x - centers[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = dist2.sum()
        if total > 0:
            idx = int(rng.choice(x.shape[0], p=dist2 / total))
        else:
            idx = int(rng.integers(x.shape[0]))
        centers.append(x[idx])
        dist2 = np.minimum(dist2, ((x - x[idx]) ** 2).sum(axis=1))
    return np.array(centers)


def _log_gauss(x: np.ndarray, means: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """Return ``log N(x_n | mean_k, diag(var_k))`` as an ``(N, K)`` array."""
    precision = 1.0 / variances
    sq = (
        (x**2) @ precision.T
        - 2.0 * x @ (means * precision).T
        + (means**2 * precision).sum(axis=1)
    )
    log_det = np.log(variances).sum(axis=1)
    return -0.5 * (np.maximum(sq, 0.0) + log_det + x.shape[1] * math.log(2 * math.pi))


def e_step(
    x: np.ndarray, weights: np.ndarray, means: np.ndarray, variances: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return log-responsibilities ``(N, K)`` and per-sample log-likelihoods ``(N,)``."""
    with np.errstate(divide="ignore"):
        joint = _log_gauss(x, means, variances) + np.log(weights)
    top = joint.max(axis=1, keepdims=True)
    log_lik = top[:, 0] + np.log(np.exp(joint - top).sum(axis=1))
    return joint - log_lik[:, None], log_lik


def _m_step(
    x: np.ndarray,
    log_resp: np.ndarray,
    log_lik: np.ndarray,
    *,
    global_var: np.ndarray,
    min_var: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Return new ``(weights, means, variances, reseeded)``."""
    n = x.shape[0]
    resp = np.exp(log_resp)
    nk = resp.sum(axis=0)
    dead = nk < 1e-8 * n
    safe_nk = np.where(dead, 1.0, nk)[:, None]
    means = resp.T @ x / safe_nk
    variances = np.maximum(resp.T @ (x**2) / safe_nk - means**2, min_var)
    if dead.any():
        worst = np.argsort(log_lik, kind="stable")[: int(dead.sum())]
        means[dead] = x[worst]
        variances[dead] = global_var
        nk = np.where(dead, 1.0, nk)
    return nk / nk.sum(), means, variances, bool(dead.any())
