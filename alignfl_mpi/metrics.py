"""Generative quality of synthetic images: FID-LeNet, precision/recall, density/coverage.

The experimenter's measurements of how good and how diverse the server's synthetic
pool is, run on rank 0 against a real reference set (typically the real test split):

* **Feature network** (:func:`train_feature_net`, :func:`load_or_train_feature_net`):
  a small LeNet-style CNN classifier trained here on the real training split (no
  downloaded weights). Its 128-unit penultimate layer (after ReLU) is the feature
  space of every distance below, and its predictions give the class histogram. The
  trained network is cached under ``DATA_ROOT/feature_nets/`` with its metadata; the
  weights file is byte-identical for identical weights, so its SHA-256 names the
  feature space. On the CPU, the same seed and thread count give the same weights.
* **FID-LeNet** (:func:`fid_lenet`): the Fréchet distance between Gaussians fitted to
  real and synthetic LeNet features. Same formula as FID, different network: the
  values are **not comparable to Inception FID** or to FID-LeNet of another feature
  network (compare only numbers with the same :attr:`FeatureNet.sha256`).
* **Precision / recall** (:func:`precision_recall`): the k-NN manifold estimates of
  Kynkäänniemi et al. (2019): the share of synthetic samples inside the real manifold,
  and of real samples inside the synthetic manifold.
* **Density / coverage** (:func:`density_coverage`): Naeem et al. (2020), the
  outlier-robust variants: how many real neighbourhoods contain each synthetic sample
  on average, and the share of real neighbourhoods that contain any synthetic sample.
* **Class coverage** (:func:`class_coverage`): how many classes the feature network
  recognises among the synthetic samples (mode collapse shows up here first).

:func:`quality_report` combines them into one flat ``dict[str, float]``.

Images are numpy or torch arrays ``(N, 28, 28)`` or ``(N, 1, 28, 28)``: uint8 in
0..255, or floats already in [0, 1] (floats above 1.5 are refused as probably 0..255
data). Features are float64 arrays ``(N, D)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .datasets import Dataset, data_root, load_dataset
from .evaluation import unit_images
from .fileio import atomic_path
from .training import train_minibatches

__all__ = [
    "FEATURE_NET_DIR",
    "FeatureNet",
    "LeNet",
    "class_coverage",
    "density_coverage",
    "feature_net_path",
    "fid_lenet",
    "frechet_distance",
    "gaussian_stats",
    "load_or_train_feature_net",
    "precision_recall",
    "quality_report",
    "sqrtm_psd",
    "train_feature_net",
]

log = logging.getLogger(__name__)

ImageArray = np.ndarray | torch.Tensor
FEATURE_NET_DIR = "feature_nets"  # folder under the data root holding cached networks
IMAGE_SIZE = 28


# ------------------------------------------------------------------------- inputs


def _unit_images(images: ImageArray, *, name: str = "images") -> torch.Tensor:
    """Images as a float32 CPU tensor ``(N, 1, 28, 28)`` in [0, 1] (see ``unit_images``).

    Raises:
        ValueError: On a wrong shape, or float values above 1.5 (probably 0..255 data).
    """
    data = unit_images(images, name=name)
    if tuple(data.shape[2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{name} must be (N, 28, 28) or (N, 1, 28, 28), got "
                         f"{tuple(data.shape)}")
    return data


def _as_features(features: np.ndarray | torch.Tensor, *, name: str) -> torch.Tensor:
    """Features as a float64 CPU tensor ``(N, D)``.

    Raises:
        ValueError: If not 2-D or not finite.
    """
    data = features.detach().cpu() if isinstance(features, torch.Tensor) else torch.as_tensor(
        np.asarray(features))
    data = data.double()
    if data.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(data.shape)}")
    if not bool(torch.isfinite(data).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return data


# ----------------------------------------------------------------- feature network


class LeNet(nn.Module):
    """A LeNet-style CNN for 28x28 grayscale images in [0, 1].

    ``conv 5x5 (1 -> w1) - ReLU - maxpool 2 - conv 5x5 (w1 -> w2) - ReLU - maxpool 2 -
    linear (16 w2 -> feature_dim) - ReLU`` is the feature extractor; a linear head maps
    the features to class logits.

    Args:
        n_classes: Output classes.
        widths: Channels of the two convolutions.
        feature_dim: Width of the feature layer.
    """

    def __init__(self, *, n_classes: int = 10, widths: Sequence[int] = (32, 64),
                 feature_dim: int = 128) -> None:
        super().__init__()
        w1, w2 = (int(w) for w in widths)
        side = ((IMAGE_SIZE - 4) // 2 - 4) // 2  # 28 -> 24 -> 12 -> 8 -> 4
        self.body = nn.Sequential(
            nn.Conv2d(1, w1, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w1, w2, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(w2 * side * side, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, n_classes)`` of images ``(N, 1, 28, 28)``."""
        return self.head(self.body(x))


class FeatureNet:
    """A trained :class:`LeNet` used as feature extractor and classifier.

    Attributes:
        model: The network, in eval mode.
        device: Where the network lives.
        meta: Training settings and measurements: ``n_classes``, ``widths``,
            ``feature_dim``, ``epochs``, ``seed``, ``batch_size``, ``lr``, ``n_train``,
            ``train_seconds``; from :func:`load_or_train_feature_net` also ``dataset``,
            ``source_sha256`` (file name -> hash of the dataset's IDX files),
            ``test_accuracy``, ``file`` and ``sha256`` (hex hash of the weights file).
    """

    def __init__(self, model: LeNet, *, device: str | torch.device = "cpu",
                 meta: dict[str, Any] | None = None) -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def sha256(self) -> str | None:
        """Hex SHA-256 of the cached weights file; ``None`` if never saved."""
        return self.meta.get("sha256")

    @property
    def test_accuracy(self) -> float:
        """Accuracy on the dataset's real test split; NaN if not measured."""
        return float(self.meta.get("test_accuracy", math.nan))

    @torch.no_grad()
    def outputs(self, images: ImageArray, *,
                batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Features and class probabilities in one pass.

        Args:
            images: ``(N, 28, 28)`` or ``(N, 1, 28, 28)``, uint8 or floats in [0, 1].
            batch_size: Images per forward pass.

        Returns:
            ``(features, probabilities)``: float64 arrays ``(N, feature_dim)`` and
            ``(N, n_classes)``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        data = _unit_images(images)
        feats, probs = [], []
        for start in range(0, len(data), batch_size):
            hidden = self.model.body(data[start:start + batch_size].to(self.device))
            feats.append(hidden.double().cpu())
            probs.append(torch.softmax(self.model.head(hidden).double(), dim=1).cpu())
        if not feats:
            return (np.zeros((0, self.model.head.in_features)),
                    np.zeros((0, self.model.head.out_features)))
        return torch.cat(feats).numpy(), torch.cat(probs).numpy()

    def features(self, images: ImageArray, *, batch_size: int = 1024) -> np.ndarray:
        """The feature-layer activations (after ReLU): float64 ``(N, feature_dim)``."""
        return self.outputs(images, batch_size=batch_size)[0]

    def predict_proba(self, images: ImageArray, *, batch_size: int = 1024) -> np.ndarray:
        """Class probabilities: float64 ``(N, n_classes)``."""
        return self.outputs(images, batch_size=batch_size)[1]

    def predict(self, images: ImageArray, *, batch_size: int = 1024) -> np.ndarray:
        """Most likely class per image: int64 ``(N,)``."""
        return np.argmax(self.predict_proba(images, batch_size=batch_size), axis=1).astype(
            np.int64)

    def accuracy(self, images: ImageArray, labels: np.ndarray) -> float:
        """Share of ``images`` whose predicted class equals ``labels``.

        Raises:
            ValueError: If there are no images or not one label per image.
        """
        labels = np.asarray(labels).ravel()
        predicted = self.predict(images)
        if len(labels) != len(predicted) or len(labels) == 0:
            raise ValueError(f"need one label per image, got {len(labels)} labels for "
                             f"{len(predicted)} images")
        return float(np.mean(predicted == labels))


def train_feature_net(
    images: ImageArray,
    labels: np.ndarray,
    *,
    n_classes: int = 10,
    epochs: int = 2,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    lr: float = 1e-3,
    max_images: int | None = None,
    widths: Sequence[int] = (32, 64),
) -> FeatureNet:
    """Train the LeNet feature network on real labelled images.

    Adam on cross-entropy, minibatches reshuffled every epoch. The initialisation and
    the shuffling are seeded (the global torch RNG is left alone), so on the CPU the
    same seed, data and thread count give the same weights.

    Args:
        images: Real training images, ``(N, 28, 28)`` uint8 (or floats in [0, 1]).
        labels: Their classes in ``0..n_classes-1``, shape ``(N,)``.
        n_classes: Classes of the classifier head.
        epochs: Passes over the training images.
        seed: Seed of the initialisation, the subset and the shuffling.
        device: Training device.
        batch_size: Minibatch size.
        lr: Adam learning rate.
        max_images: Train on a seeded random subset of at most this many images
            (``None``: all).
        widths: Channels of the two convolutions.

    Returns:
        The trained network, in eval mode; ``meta`` holds the settings,
        ``n_train`` and ``train_seconds``.

    Raises:
        ValueError: On mismatched inputs, out-of-range labels or bad settings.
    """
    data = _unit_images(images)
    targets = torch.as_tensor(np.asarray(labels).ravel().astype(np.int64))
    if len(targets) != len(data) or len(data) == 0:
        raise ValueError(f"need one label per image and at least one image, got "
                         f"{len(targets)} labels for {len(data)} images")
    if int(targets.min()) < 0 or int(targets.max()) >= n_classes:
        raise ValueError(f"labels must be in 0..{n_classes - 1}, got "
                         f"{int(targets.min())}..{int(targets.max())}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if max_images is not None and max_images < len(data):
        keep = np.sort(np.random.default_rng(seed).choice(len(data), max_images,
                                                          replace=False))
        data, targets = data[torch.from_numpy(keep)], targets[torch.from_numpy(keep)]

    start_time = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # seeded init, global CPU RNG left alone
        torch.manual_seed(seed)
        model = LeNet(n_classes=n_classes, widths=widths).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def loss_fn(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = nn.functional.cross_entropy(model(data[idx].to(device)),
                                           targets[idx].to(device))
        return loss, {}

    model.train()
    train_minibatches(optimizer, len(data), loss_fn, epochs=epochs, batch_size=batch_size,
                      generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start_time
    meta = {"n_classes": n_classes, "widths": [int(w) for w in widths],
            "feature_dim": model.head.in_features, "epochs": epochs, "seed": seed,
            "batch_size": batch_size, "lr": lr, "n_train": len(data),
            "train_seconds": seconds}
    log.info("feature net: trained on %d images, %d epochs, %.1f s", len(data), epochs,
             seconds)
    return FeatureNet(model, device=device, meta=meta)


# ------------------------------------------------------------------------ cache


def feature_net_path(dataset: str, *, root: str | os.PathLike | None = None, seed: int = 0,
                     epochs: int = 2) -> Path:
    """Where :func:`load_or_train_feature_net` caches a network.

    >>> feature_net_path("mnist", root="data", seed=3, epochs=2).as_posix()
    'data/feature_nets/mnist-lenet-s3-e2.pt'
    """
    return data_root(root) / FEATURE_NET_DIR / f"{dataset}-lenet-s{seed}-e{epochs}.pt"


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weights_bytes(model: nn.Module) -> bytes:
    """The state dict as ``torch.save`` bytes, independent of any file name.

    ``torch.save`` to a path names the archive inside the file after the path, so the
    bytes (and the hash) would depend on the temporary file's random name; saved to a
    buffer, equal weights give equal bytes.
    """
    buffer = io.BytesIO()
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}},
               buffer)
    return buffer.getvalue()


def _load_cached(path: Path, dataset: Dataset, *,
                 device: str | torch.device) -> FeatureNet | None:
    """The cached network at ``path``, or ``None`` (with a warning) if unusable.

    Unusable: a file is missing or unreadable, the weights' hash differs from the one
    recorded in the metadata, or the dataset's source files changed since training.
    """
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("sha256") != _file_sha256(path):
            log.warning("feature net cache %s does not match its recorded sha256; retraining",
                        path)
            return None
        if meta.get("source_sha256") != dataset.sha256:
            log.warning("feature net cache %s was trained on other %s files; retraining",
                        path, dataset.info.name)
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = LeNet(n_classes=int(meta["n_classes"]), widths=meta["widths"],
                      feature_dim=int(meta["feature_dim"]))
        model.load_state_dict(state["state_dict"])
    except Exception as exc:  # corrupt JSON or weights, missing keys, wrong shapes
        log.warning("feature net cache %s is unreadable (%s); retraining", path,
                    type(exc).__name__)
        return None
    return FeatureNet(model, device=device, meta=meta)


def load_or_train_feature_net(
    dataset: str,
    *,
    root: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    epochs: int = 2,
    seed: int = 0,
) -> FeatureNet:
    """The feature network of a dataset: from the cache, else trained and cached.

    The cache is ``DATA_ROOT/feature_nets/<dataset>-lenet-s<seed>-e<epochs>.pt`` (the
    state dict, read with ``torch.load(weights_only=True)``) and a ``.json`` beside it
    with :attr:`FeatureNet.meta`. Both are written to a temporary file and renamed. A
    cache whose weights do not match the recorded ``sha256``, or that was trained on
    other source files of the dataset, is retrained and overwritten.

    Training uses the full real training split with :func:`train_feature_net`'s
    defaults; ``test_accuracy`` is measured on the real test split.

    Args:
        dataset: Name of a dataset imported into the data root (e.g. ``"mnist"``).
        root: The data root (``None``: ``$ALIGNFL_DATA_ROOT``, else ``./data``).
        device: Device of the network (training and inference).
        epochs: Training epochs (part of the cache name).
        seed: Training seed (part of the cache name).

    Returns:
        The network, with ``sha256``, ``test_accuracy`` and ``meta`` set.

    Raises:
        DataError: The dataset is not in the data root or its files are invalid.
    """
    data = load_dataset(dataset, root=root)
    path = feature_net_path(dataset, root=root, seed=seed, epochs=epochs)
    cached = _load_cached(path, data, device=device)
    if cached is not None:
        log.info("feature net: loaded %s (test accuracy %.4f)", path, cached.test_accuracy)
        return cached
    net = train_feature_net(data.train_images, data.train_labels,
                            n_classes=data.info.num_classes, epochs=epochs, seed=seed,
                            device=device)
    net.meta.update(dataset=dataset, source_sha256=dict(data.sha256), file=path.name,
                    test_accuracy=net.accuracy(data.test_images, data.test_labels))
    weights = _weights_bytes(net.model)
    with atomic_path(path) as tmp:
        tmp.write_bytes(weights)
    net.meta["sha256"] = hashlib.sha256(weights).hexdigest()
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(net.meta, indent=2, sort_keys=True))
    log.info("feature net: saved %s (test accuracy %.4f, %.1f s)", path, net.test_accuracy,
             net.meta["train_seconds"])
    return net


# -------------------------------------------------------------------------- FID


def gaussian_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``ddof=1``) of feature rows, in float64.

    Raises:
        ValueError: With fewer than two rows, or non-finite values.

    >>> mu, cov = gaussian_stats(np.array([[0.0, 1.0], [2.0, 1.0]]))
    >>> mu.tolist(), cov.tolist()
    ([1.0, 1.0], [[2.0, 0.0], [0.0, 0.0]])
    """
    x = _as_features(features, name="features").numpy()
    if len(x) < 2:
        raise ValueError(f"need at least 2 feature rows for a covariance, got {len(x)}")
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix.

    Eigendecomposition in float64 (after symmetrising); eigenvalues that round-off
    made slightly negative are clipped to 0.

    >>> np.round(sqrtm_psd(np.array([[4.0, 0.0], [0.0, 9.0]])), 12).tolist()
    [[2.0, 0.0], [0.0, 3.0]]
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"need a square matrix, got shape {m.shape}")
    values, vectors = np.linalg.eigh((m + m.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(stats_a: tuple[np.ndarray, np.ndarray],
                     stats_b: tuple[np.ndarray, np.ndarray]) -> float:
    """Fréchet (2-Wasserstein) distance squared between two Gaussians.

    ``||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``. The
    trace term uses the symmetric PSD product ``S_a^1/2 S_b S_a^1/2`` (same eigenvalues
    as ``S_a S_b``), so it is exact for singular covariances too, e.g. fewer samples
    than feature dimensions. A result that round-off made negative is returned as 0.

    Args:
        stats_a: ``(mean, covariance)``, e.g. from :func:`gaussian_stats`.
        stats_b: The same for the other set.

    Returns:
        The distance (>= 0).

    >>> a = (np.zeros(2), np.diag([1.0, 4.0]))
    >>> b = (np.array([1.0, 0.0]), np.diag([4.0, 1.0]))
    >>> round(frechet_distance(a, b), 10)  # 1 + (1 - 2)^2 + (2 - 1)^2
    3.0
    """
    mu_a, cov_a = (np.asarray(v, dtype=np.float64) for v in stats_a)
    mu_b, cov_b = (np.asarray(v, dtype=np.float64) for v in stats_b)
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (
            mu_a.size, mu_a.size):
        raise ValueError(f"mismatched Gaussian statistics: means {mu_a.shape}, "
                         f"{mu_b.shape}; covariances {cov_a.shape}, {cov_b.shape}")
    root_a = sqrtm_psd(cov_a)
    product = root_a @ cov_b @ root_a
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2.0)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu_a - mu_b
    distance = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    return max(distance, 0.0)


def fid_lenet(real_features: np.ndarray | torch.Tensor,
              fake_features: np.ndarray | torch.Tensor) -> float:
    """FID-LeNet: the Fréchet distance between Gaussians fitted to two feature sets.

    The features come from :class:`FeatureNet` (a LeNet trained here on the real
    training split), not from Inception-v3: values are **not comparable to Inception
    FID** in the literature, nor between feature networks of different training
    (compare :attr:`FeatureNet.sha256`). Lower is better; 0 for identical sets. Like
    FID it is biased upwards for small sets, so compare sets of equal size.

    Args:
        real_features: Features of real images ``(N, D)``.
        fake_features: Features of synthetic images ``(M, D)``.

    Returns:
        The distance (>= 0).

    >>> real = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    >>> round(fid_lenet(real, real + [3.0, 4.0]), 9)  # equal covariances: ||shift||^2
    25.0
    """
    return frechet_distance(gaussian_stats(real_features), gaussian_stats(fake_features))


# ------------------------------------------------------------ k-NN manifold metrics


def _subsample(x: torch.Tensor, max_points: int, rng: np.random.Generator) -> torch.Tensor:
    """At most ``max_points`` rows of ``x``, chosen without replacement (order kept)."""
    if len(x) <= max_points:
        return x
    return x[torch.from_numpy(np.sort(rng.choice(len(x), max_points, replace=False)))]


def _prepared_sets(real_features: np.ndarray | torch.Tensor,
                   fake_features: np.ndarray | torch.Tensor, *, k: int, max_points: int,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated, subsampled float64 real and fake feature sets."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if max_points <= k:
        raise ValueError(f"max_points must be > k, got {max_points} with k={k}")
    real = _as_features(real_features, name="real_features")
    fake = _as_features(fake_features, name="fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} and {fake.shape[1]}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"each set needs more than k={k} points, got {len(real)} real and "
                         f"{len(fake)} fake")
    rng = np.random.default_rng(seed)
    return _subsample(real, max_points, rng), _subsample(fake, max_points, rng)


def _knn_radii(x: torch.Tensor, *, k: int, batch_size: int) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row (the row itself excluded)."""
    return torch.cat([torch.cdist(x[i:i + batch_size], x).topk(k + 1, dim=1,
                                                                largest=False).values[:, k]
                      for i in range(0, len(x), batch_size)])


def _ball_counts(queries: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, *,
                 batch_size: int) -> torch.Tensor:
    """For every query, how many balls ``(center, radius)`` contain it (boundary included)."""
    return torch.cat([(torch.cdist(queries[i:i + batch_size], centers) <= radii).sum(dim=1)
                      for i in range(0, len(queries), batch_size)])


def _nearest_distances(a: torch.Tensor, b: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    """For every row of ``a``, the distance to its nearest row of ``b``."""
    return torch.cat([torch.cdist(a[i:i + batch_size], b).min(dim=1).values
                      for i in range(0, len(a), batch_size)])


def precision_recall(
    real_features: np.ndarray | torch.Tensor,
    fake_features: np.ndarray | torch.Tensor,
    *,
    k: int = 5,
    max_points: int = 5000,
    seed: int = 0,
    batch_size: int = 1024,
) -> dict[str, float]:
    """k-NN manifold precision and recall (Kynkäänniemi et al., 2019).

    A set's manifold is the union of balls around its points, each with the radius of
    the distance to that point's k-th nearest neighbour in the same set. Precision is
    the share of fake points inside the real manifold (are the samples realistic?);
    recall the share of real points inside the fake manifold (is the real variety
    reproduced?). Points on a ball's boundary count as inside. Euclidean distances in
    float64 with chunked ``torch.cdist``.

    Precision is not robust to outliers among the reals: an isolated real point has a
    large ball, and fakes that all fall into it count as realistic (pure-noise images
    can score precision 1 on MNIST LeNet features). Read it together with the density
    of :func:`density_coverage`, which is low in that case.

    Args:
        real_features: Features of real images ``(N, D)``.
        fake_features: Features of synthetic images ``(M, D)``.
        k: Neighbour that sets the radii (the paper uses 3; 5 as in Naeem et al.).
        max_points: Each set is subsampled (seeded, without replacement) to at most
            this many points; the cost grows with the product of the sizes.
        seed: Seed of the subsampling.
        batch_size: Rows per ``torch.cdist`` chunk.

    Returns:
        ``{"precision": ..., "recall": ...}``, each in [0, 1].

    Raises:
        ValueError: If a set has ``k`` or fewer points, or the dimensions differ.

    >>> real = np.array([[0.0], [1.0], [2.0], [3.0]])
    >>> precision_recall(real, np.array([[0.5], [10.0]]), k=1)
    {'precision': 0.5, 'recall': 1.0}
    """
    real, fake = _prepared_sets(real_features, fake_features, k=k, max_points=max_points,
                                seed=seed)
    real_radii = _knn_radii(real, k=k, batch_size=batch_size)
    fake_radii = _knn_radii(fake, k=k, batch_size=batch_size)
    in_real = _ball_counts(fake, real, real_radii, batch_size=batch_size) > 0
    in_fake = _ball_counts(real, fake, fake_radii, batch_size=batch_size) > 0
    return {"precision": float(in_real.double().mean()),
            "recall": float(in_fake.double().mean())}


def density_coverage(
    real_features: np.ndarray | torch.Tensor,
    fake_features: np.ndarray | torch.Tensor,
    *,
    k: int = 5,
    max_points: int = 5000,
    seed: int = 0,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Density and coverage (Naeem et al., 2020).

    With the real k-NN balls of :func:`precision_recall` (only real balls are used, so
    one outlying fake sample cannot inflate them):

    * density: ``1 / (k M) * sum_j (number of real balls containing fake point j)``;
      about 1 when fakes are distributed like the reals, above 1 when they crowd into
      dense real regions, unbounded;
    * coverage: the share of real points whose ball contains at least one fake point,
      in [0, 1].

    Args:
        real_features: Features of real images ``(N, D)``.
        fake_features: Features of synthetic images ``(M, D)``.
        k: Neighbour that sets the radii (the paper's default is 5).
        max_points: Each set is subsampled (seeded) to at most this many points.
        seed: Seed of the subsampling.
        batch_size: Rows per ``torch.cdist`` chunk.

    Returns:
        ``{"density": ..., "coverage": ...}``.

    Raises:
        ValueError: If a set has ``k`` or fewer points, or the dimensions differ.

    >>> real = np.array([[0.0], [1.0], [2.0], [3.0]])
    >>> density_coverage(real, np.array([[0.5], [10.0]]), k=1)
    {'density': 1.0, 'coverage': 0.5}
    """
    real, fake = _prepared_sets(real_features, fake_features, k=k, max_points=max_points,
                                seed=seed)
    real_radii = _knn_radii(real, k=k, batch_size=batch_size)
    hits = _ball_counts(fake, real, real_radii, batch_size=batch_size)
    covered = _nearest_distances(real, fake, batch_size=batch_size) <= real_radii
    return {"density": float(hits.double().sum()) / (k * len(fake)),
            "coverage": float(covered.double().mean())}


# --------------------------------------------------------------- class coverage


def class_coverage(predicted_labels: np.ndarray, *, n_classes: int = 10,
                   min_share: float = 0.01) -> dict[str, Any]:
    """How many classes a set of samples contains, by a classifier's predictions.

    Rule: a class is **covered** when at least ``min_share`` (default 1%) of the
    samples are predicted as that class. With 10 classes a balanced set gives each
    class 10%, so a class counts as present down to a tenth of its fair share, and a
    few stray predictions (below 1%) do not count.

    Args:
        predicted_labels: Predicted class per sample, in ``0..n_classes-1``.
        n_classes: Number of classes.
        min_share: Share of the samples a class needs to be covered, in (0, 1].

    Returns:
        ``{"coverage": share of the n_classes classes covered,
        "histogram": list of the n_classes per-class shares (summing to 1)}``.

    Raises:
        ValueError: On no labels, labels out of range, or ``min_share`` not in (0, 1].

    >>> class_coverage(np.zeros(50, dtype=int))["coverage"]
    0.1
    >>> class_coverage(np.array([0, 1, 1, 3]), n_classes=4)["histogram"]
    [0.25, 0.5, 0.0, 0.25]
    """
    labels = np.asarray(predicted_labels).ravel()
    if len(labels) == 0:
        raise ValueError("class_coverage needs at least one label")
    if not 0.0 < min_share <= 1.0:
        raise ValueError(f"min_share must be in (0, 1], got {min_share}")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must be in 0..{n_classes - 1}, got "
                         f"{labels.min()}..{labels.max()}")
    shares = np.bincount(labels.astype(np.int64), minlength=n_classes) / len(labels)
    return {"coverage": float(np.mean(shares >= min_share)),
            "histogram": [float(s) for s in shares]}


# ------------------------------------------------------------------------ report


def quality_report(
    feature_net: FeatureNet,
    real_images: ImageArray,
    real_labels: np.ndarray | None,
    fake_images: ImageArray,
    *,
    seed: int = 0,
    k: int = 5,
    max_points: int = 5000,
    min_share: float = 0.01,
    real_outputs: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, float]:
    """All generative-quality metrics of synthetic images against real ones, flat.

    Keys:

    * ``fid_lenet``: :func:`fid_lenet` on all real and fake features (not
      comparable to Inception FID);
    * ``precision``, ``recall``: :func:`precision_recall`;
    * ``density``, ``coverage``: :func:`density_coverage` (``coverage`` is the k-NN
      manifold coverage, not the class coverage);
    * ``class_coverage`` and ``class_share_0`` .. ``class_share_{C-1}``:
      :func:`class_coverage` of the feature network's predictions on the fakes;
    * ``fake_classifier_entropy``: mean entropy (nats) of the network's predicted
      class distribution per fake image; low means recognisable digits, ``log C``
      means the network cannot tell at all;
    * ``real_accuracy``: the network's accuracy on ``real_images`` (only with
      ``real_labels``), a check that the features are meaningful;
    * ``n_real``, ``n_fake``: set sizes.

    Args:
        feature_net: From :func:`load_or_train_feature_net`.
        real_images: Real reference images (e.g. the real test split).
        real_labels: Their labels, or ``None``.
        fake_images: Synthetic images.
        seed: Seed of the subsampling of :func:`precision_recall` and
            :func:`density_coverage`.
        k: Neighbour of the k-NN radii.
        max_points: Subsampling limit of the k-NN metrics.
        min_share: Class-coverage threshold of :func:`class_coverage`.
        real_outputs: ``feature_net.outputs(real_images)`` when the caller already has
            them (a fixed real set scored against many fake sets).

    Returns:
        ``dict[str, float]``.
    """
    real_feats, real_probs = (real_outputs if real_outputs is not None
                              else feature_net.outputs(real_images))
    fake_feats, fake_probs = feature_net.outputs(fake_images)
    n_classes = fake_probs.shape[1]
    report: dict[str, float] = {"fid_lenet": fid_lenet(real_feats, fake_feats)}
    knn = {"k": k, "max_points": max_points, "seed": seed}
    report.update(precision_recall(real_feats, fake_feats, **knn))
    report.update(density_coverage(real_feats, fake_feats, **knn))
    classes = class_coverage(np.argmax(fake_probs, axis=1), n_classes=n_classes,
                             min_share=min_share)
    report["class_coverage"] = classes["coverage"]
    report.update({f"class_share_{c}": s for c, s in enumerate(classes["histogram"])})
    entropy = -(fake_probs * np.log(np.clip(fake_probs, 1e-300, None))).sum(axis=1)
    report["fake_classifier_entropy"] = float(entropy.mean())
    if real_labels is not None:
        labels = np.asarray(real_labels).ravel()
        if len(labels) != len(real_feats):
            raise ValueError(f"need one real label per real image, got {len(labels)} "
                             f"labels for {len(real_feats)} images")
        report["real_accuracy"] = float(np.mean(np.argmax(real_probs, axis=1) == labels))
    report["n_real"], report["n_fake"] = float(len(real_feats)), float(len(fake_feats))
    return {key: float(value) for key, value in report.items()}
