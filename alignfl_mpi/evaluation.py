"""Evaluation of a VAE: latent classification, reconstruction error, image grids.

The paper's protocol: encode the test images to their latent means, split them
80/20 stratified by label (seed 42), fit a multinomial logistic regression on
the train part and report accuracy and weighted F1 on the other part. Here the
regression is a small float64 PyTorch model fitted with full-batch L-BFGS, so
no scikit-learn is needed; its objective is sklearn's default
(``0.5 * ||W||^2 + C * sum(cross-entropy)``, intercept not penalized) on
standardized features.

Everything here is plain NumPy/PyTorch/PIL. The VAE is any ``nn.Module`` with
``encode(x) -> (mu, logvar)`` and ``decode(z) -> images`` for images in [0, 1];
it must already live on ``device``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "LogisticModel",
    "encode_latents",
    "evaluate_vae",
    "fit_logistic_regression",
    "image_grid_array",
    "latent_classification",
    "reconstruction_error",
    "save_image_grid",
    "stratified_split",
    "to_uint8_images",
    "weighted_f1",
]

_GRID_BACKGROUND = 255  # white padding between cells and behind row labels
_LABEL_INK = 0  # black row-label text

ImageBatch = np.ndarray | torch.Tensor


# --------------------------------------------------------------------------- split


def stratified_split(
    labels: np.ndarray, *, test_fraction: float = 0.2, seed: int = 42
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices per class, keeping each class's share in both parts.

    Each class with ``n`` samples sends ``round(n * test_fraction)`` of them to
    the test part, clamped to ``[1, n - 1]`` so that a class with at least two
    samples appears in both parts (a singleton class stays in train). Which
    samples go where is a seeded permutation within each class.

    Args:
        labels: 1-D array of class labels (any hashable, sortable values).
        test_fraction: Share of every class that goes to the test part, in (0, 1).
        seed: Seed of the permutation; the same seed gives the same split.

    Returns:
        ``(train_idx, test_idx)``: sorted, disjoint int64 index arrays whose
        union is ``arange(len(labels))``.

    Raises:
        ValueError: If ``labels`` is not 1-D or ``test_fraction`` is not in (0, 1).

    >>> train, test = stratified_split(np.array([0] * 10 + [1] * 5), seed=0)
    >>> len(train), len(test)
    (12, 3)
    >>> sorted(np.concatenate([train, test]).tolist()) == list(range(15))
    True
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test_parts = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test_parts.append(members[: _class_test_count(len(members), test_fraction)])
    test_idx = np.sort(np.concatenate(test_parts)).astype(np.int64)
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test_idx] = True
    return np.flatnonzero(~is_test).astype(np.int64), test_idx


def _class_test_count(n: int, test_fraction: float) -> int:
    """Test samples for a class of ``n``: rounded share, both parts non-empty."""
    if n < 2:
        return 0
    return min(max(math.floor(n * test_fraction + 0.5), 1), n - 1)


# ------------------------------------------------------------ logistic regression


@dataclass(frozen=True, eq=False)
class LogisticModel:
    """A fitted multinomial logistic regression on standardized features.

    Attributes:
        classes: Sorted original label values, shape ``(K,)``.
        mean: Per-feature train mean used for standardization, shape ``(D,)``.
        scale: Per-feature train standard deviation (1 where it was 0), ``(D,)``.
        coef: Weights on standardized features, shape ``(D, K)``.
        intercept: Per-class bias, shape ``(K,)``.
    """

    classes: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        """Return the class logits, shape ``(N, K)``, float64."""
        x = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        return x @ self.coef + self.intercept

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Return class probabilities, shape ``(N, K)``, columns in ``classes`` order."""
        logits = self.decision_function(features)
        logits -= logits.max(axis=1, keepdims=True)
        unnormalized = np.exp(logits)
        return unnormalized / unnormalized.sum(axis=1, keepdims=True)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Return the most likely original label for each row, shape ``(N,)``."""
        return self.classes[np.argmax(self.decision_function(features), axis=1)]


def fit_logistic_regression(
    features: np.ndarray, labels: np.ndarray, *, C: float = 1.0, max_iter: int = 200
) -> LogisticModel:
    """Fit a multinomial logistic regression with full-batch L-BFGS in float64.

    Minimizes ``0.5 * ||W||^2 + C * sum_i CE(x_i, y_i)`` over weights ``W`` and an
    unpenalized intercept, on features standardized with the train mean and
    standard deviation: sklearn's ``LogisticRegression(C=C)`` objective on
    ``StandardScaler`` output. The start is all zeros, so the fit is
    deterministic and needs no seed.

    Args:
        features: Array ``(N, D)`` of features.
        labels: Array ``(N,)`` of integer (or any sortable) labels.
        C: Inverse L2 regularization strength, > 0.
        max_iter: Maximum L-BFGS iterations.

    Returns:
        The fitted :class:`LogisticModel`; with a single class it always
        predicts that class.

    Raises:
        ValueError: On mismatched or empty inputs or a non-positive ``C``.

    >>> x = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    >>> model = fit_logistic_regression(x, np.array([3, 3, 7, 7]))
    >>> model.predict(np.array([[-5.0], [5.0]])).tolist()
    [3, 7]
    """
    x, classes, y = _check_training_data(features, labels)
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    n_features, n_classes = x.shape[1], len(classes)
    coef = np.zeros((n_features, n_classes))
    intercept = np.zeros(n_classes)
    if n_classes > 1:
        coef, intercept = _lbfgs_fit((x - mean) / scale, y, n_classes, C=C, max_iter=max_iter)
    return LogisticModel(classes=classes, mean=mean, scale=scale, coef=coef, intercept=intercept)


def _check_training_data(
    features: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate shapes; return float64 features, sorted classes, label codes."""
    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or labels.ndim != 1 or len(x) != len(labels):
        raise ValueError(
            f"need features (N, D) and labels (N,), got {x.shape} and {labels.shape}"
        )
    if len(x) == 0:
        raise ValueError("cannot fit a classifier on zero samples")
    classes, codes = np.unique(labels, return_inverse=True)
    return x, classes, codes


def _lbfgs_fit(
    x: np.ndarray, y: np.ndarray, n_classes: int, *, C: float, max_iter: int
) -> tuple[np.ndarray, np.ndarray]:
    """Minimize the regularized cross-entropy; return ``(coef, intercept)``.

    The objective is divided by ``C * N`` (same minimizer) so that L-BFGS's
    tolerances do not depend on the dataset size.
    """
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y.astype(np.int64))
    weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    penalty = 0.5 / (C * len(x))
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ weight + bias, yt)
        loss = loss + penalty * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach().numpy().copy(), bias.detach().numpy().copy()


# ------------------------------------------------------------------------ metrics


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Per-class F1 averaged with weights equal to each class's true support.

    Matches sklearn's ``f1_score(y_true, y_pred, average="weighted")``: a class
    of ``y_true`` that is never predicted correctly has F1 0, and classes that
    occur only in ``y_pred`` carry weight 0.

    Args:
        y_true: True labels, shape ``(N,)``.
        y_pred: Predicted labels, shape ``(N,)``.

    Returns:
        The weighted F1 score in [0, 1].

    Raises:
        ValueError: If the arrays are empty or differ in length.

    >>> round(weighted_f1(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0])), 6)
    0.52
    """
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    if len(y_true) != len(y_pred) or len(y_true) == 0:
        raise ValueError(
            f"need two non-empty label arrays of equal length, got {len(y_true)} and {len(y_pred)}"
        )
    total = 0.0
    for cls in np.unique(y_true):
        is_true, is_pred = y_true == cls, y_pred == cls
        true_pos = np.sum(is_true & is_pred)
        support = np.sum(is_true)
        f1 = 2.0 * true_pos / (support + np.sum(is_pred))  # 2TP / (2TP + FP + FN)
        total += support * f1
    return float(total / len(y_true))


def latent_classification(
    latents: np.ndarray, labels: np.ndarray, *, test_fraction: float = 0.2, seed: int = 42
) -> dict[str, float]:
    """Score how linearly separable the classes are in latent space.

    Splits stratified by label, fits :func:`fit_logistic_regression` on the
    train part and scores the held-out part: the paper's protocol (sklearn
    ``LogisticRegression`` on VAE latent means, stratified split, seed 42).

    Args:
        latents: Latent means, shape ``(N, D)``.
        labels: Class labels, shape ``(N,)``.
        test_fraction: Held-out share of every class.
        seed: Seed of the stratified split.

    Returns:
        ``{"latent_accuracy": ..., "latent_f1": ...}`` on the held-out part.
    """
    labels = np.asarray(labels)
    train_idx, test_idx = stratified_split(labels, test_fraction=test_fraction, seed=seed)
    if len(test_idx) == 0:
        raise ValueError("the held-out split is empty: every class needs at least 2 samples")
    latents = np.asarray(latents)
    model = fit_logistic_regression(latents[train_idx], labels[train_idx])
    predicted = model.predict(latents[test_idx])
    return {
        "latent_accuracy": float(np.mean(predicted == labels[test_idx])),
        "latent_f1": weighted_f1(labels[test_idx], predicted),
    }


# -------------------------------------------------------------------- VAE passes


def encode_latents(
    vae: torch.nn.Module,
    images: ImageBatch,
    *,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Encode images to their latent means ``mu`` in eval mode, without gradients.

    Args:
        vae: Module with ``encode(x) -> (mu, logvar)``, already on ``device``.
        images: ``(N, H, W)`` or ``(N, 1, H, W)``; uint8 is divided by 255,
            floats are taken as already in [0, 1].
        batch_size: Images per forward pass.
        device: Device the batches are moved to.

    Returns:
        float32 array ``(N, D)`` of latent means. The module's train/eval mode
        is restored afterwards.
    """
    means = [mu for mu, _ in _encoded_batches(vae, images, batch_size=batch_size, device=device)]
    return _concat_rows(means)


def reconstruction_error(
    vae: torch.nn.Module,
    images: ImageBatch,
    *,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> float:
    """Mean over images of the per-image sum of squared error of ``decode(mu)``.

    Deterministic: each image is decoded from its latent mean, not a sample.

    Args:
        vae: Module with ``encode`` and ``decode``, already on ``device``.
        images: As for :func:`encode_latents`.
        batch_size: Images per forward pass.
        device: Device the batches are moved to.

    Returns:
        The mean per-image squared-error sum, in pixel units of [0, 1].
    """
    batches = _encoded_batches(vae, images, batch_size=batch_size, device=device, decode=True)
    return float(np.mean(np.concatenate([err for _, err in batches])))


def evaluate_vae(
    vae: torch.nn.Module,
    images: ImageBatch,
    labels: np.ndarray,
    *,
    device: str | torch.device = "cpu",
    seed: int = 42,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Latent classification and reconstruction error of a VAE, in one pass.

    Args:
        vae: Module with ``encode`` and ``decode``, already on ``device``.
        images: As for :func:`encode_latents`.
        labels: Class labels of ``images``, shape ``(N,)``.
        device: Device the batches are moved to.
        seed: Seed of the stratified split.
        batch_size: Images per forward pass.

    Returns:
        ``{"latent_accuracy", "latent_f1", "recon_error"}`` as floats.
    """
    batches = list(_encoded_batches(vae, images, batch_size=batch_size, device=device, decode=True))
    latents = _concat_rows([mu for mu, _ in batches])
    metrics = latent_classification(latents, labels, seed=seed)
    metrics["recon_error"] = float(np.mean(np.concatenate([err for _, err in batches])))
    return metrics


def _encoded_batches(
    vae: torch.nn.Module,
    images: ImageBatch,
    *,
    batch_size: int,
    device: str | torch.device,
    decode: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield ``(mu, per-image squared error or None)`` per batch, in eval mode."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data = _as_image_tensor(images)
    was_training = vae.training
    vae.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                x = data[start : start + batch_size].to(device=device, dtype=torch.float32)
                if data.dtype == torch.uint8:
                    x = x / 255.0
                mu, _ = vae.encode(x)
                error = None
                if decode:
                    recon = vae.decode(mu).reshape(x.shape)
                    error = (recon - x).square().flatten(1).sum(1).double().cpu().numpy()
                yield mu.float().cpu().numpy(), error
    finally:
        vae.train(was_training)


def _as_image_tensor(images: ImageBatch) -> torch.Tensor:
    """Return images as an ``(N, 1, H, W)`` tensor (uint8 kept, else float32)."""
    data = torch.as_tensor(images) if isinstance(images, np.ndarray) else images
    if data.ndim == 3:
        data = data.unsqueeze(1)
    if data.ndim != 4 or data.shape[1] != 1:
        raise ValueError(f"images must be (N, H, W) or (N, 1, H, W), got {tuple(data.shape)}")
    if len(data) == 0:
        raise ValueError("images is empty")
    return data if data.dtype == torch.uint8 else data.float()


def _concat_rows(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate per-batch ``(B, D)`` arrays into one float32 ``(N, D)`` array."""
    return np.concatenate([p.reshape(len(p), -1) for p in parts]).astype(np.float32, copy=False)


# ------------------------------------------------------------------------ images


def to_uint8_images(x: ImageBatch) -> np.ndarray:
    """Convert images to ``(N, H, W)`` uint8: floats in [0, 1] are clipped and rounded.

    Args:
        x: ``(N, H, W)`` or ``(N, 1, H, W)`` array or tensor, float in [0, 1]
            or already uint8 (returned unchanged apart from the channel axis).

    Returns:
        A uint8 array ``(N, H, W)``.

    >>> to_uint8_images(np.array([[[-0.1, 0.5, 1.2]]])).tolist()
    [[[0, 128, 255]]]
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"images must be (N, H, W) or (N, 1, H, W), got {x.shape}")
    if x.dtype == np.uint8:
        return x
    return np.floor(np.clip(x.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def image_grid_array(
    images: ImageBatch, *, nrow: int = 10, pad: int = 2, upscale: int = 2
) -> np.ndarray:
    """Tile images into one uint8 grid with ``nrow`` images per row.

    Cells are upscaled by pixel repetition and separated, and surrounded, by
    ``pad`` pixels of white. The last row is filled from the left.

    Args:
        images: ``(N, H, W)`` or ``(N, 1, H, W)``, float in [0, 1] or uint8.
        nrow: Images per grid row.
        pad: Padding in pixels between and around cells.
        upscale: Integer magnification of every image.

    Returns:
        uint8 array of shape ``(rows * (H*upscale + pad) + pad,
        cols * (W*upscale + pad) + pad)`` with ``cols = min(nrow, N)`` and
        ``rows = ceil(N / nrow)``.

    Raises:
        ValueError: If there are no images or ``nrow``/``upscale`` < 1 or ``pad`` < 0.

    >>> image_grid_array(np.zeros((3, 2, 2)), nrow=2, pad=1, upscale=1).shape
    (7, 7)
    """
    tiles = to_uint8_images(images)
    if len(tiles) == 0:
        raise ValueError("cannot draw a grid of zero images")
    if nrow < 1 or upscale < 1 or pad < 0:
        raise ValueError(f"need nrow >= 1, upscale >= 1, pad >= 0; got {nrow}, {upscale}, {pad}")
    tiles = tiles.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w = tiles.shape
    rows, cols = math.ceil(n / nrow), min(nrow, n)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), _GRID_BACKGROUND, np.uint8)
    for i, tile in enumerate(tiles):
        top = pad + (i // nrow) * (h + pad)
        left = pad + (i % nrow) * (w + pad)
        grid[top : top + h, left : left + w] = tile
    return grid


def save_image_grid(
    images: ImageBatch,
    path: str | Path,
    *,
    nrow: int = 10,
    pad: int = 2,
    upscale: int = 2,
    labels: Sequence[str] | None = None,
) -> Path:
    """Write images as a grayscale PNG grid, optionally with a label per row.

    Args:
        images: ``(N, H, W)`` or ``(N, 1, H, W)``, float in [0, 1] or uint8.
        path: Output PNG path; parent directories are created.
        nrow: Images per grid row.
        pad: Padding in pixels between and around cells.
        upscale: Integer magnification of every image.
        labels: One text per grid row, drawn in a left margin.

    Returns:
        The path written.

    Raises:
        ValueError: If there are no images or ``labels`` does not have one
            entry per grid row.
    """
    tiles = to_uint8_images(images)
    picture = Image.fromarray(image_grid_array(tiles, nrow=nrow, pad=pad, upscale=upscale))
    if labels is not None:
        n_rows = math.ceil(len(tiles) / nrow)
        picture = _with_row_labels(picture, list(labels), n_rows=n_rows, pad=pad)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path


def _with_row_labels(grid: Image.Image, labels: list[str], *, n_rows: int, pad: int) -> Image.Image:
    """Return ``grid`` with a left margin holding one label per row, centred."""
    if len(labels) != n_rows:
        raise ValueError(
            f"labels needs one entry per grid row: {n_rows} rows, {len(labels)} labels"
        )
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(grid)
    boxes = [measure.textbbox((0, 0), text, font=font) for text in labels]
    margin = max(box[2] - box[0] for box in boxes) + 2 * max(pad, 2)
    picture = Image.new("L", (grid.width + margin, grid.height), _GRID_BACKGROUND)
    picture.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(picture)
    row_height = (grid.height - pad) / n_rows
    for row, (text, box) in enumerate(zip(labels, boxes)):
        centre = row * row_height + (row_height + pad) / 2
        top = centre - (box[3] + box[1]) / 2
        draw.text((max(pad, 2) - box[0], top), text, fill=_LABEL_INK, font=font)
    return picture


MAX_UNIT_FLOAT = 1.5  # larger float pixels are refused: they look like 0..255 data


def unit_images(images: ImageBatch, *, name: str = "images") -> torch.Tensor:
    """Images as a float32 CPU tensor ``(N, 1, H, W)`` in [0, 1].

    Accepts uint8 (divided by 255) or float in [0, 1], numpy or torch, ``(N, H, W)`` or
    ``(N, 1, H, W)``.

    Raises:
        ValueError: On a wrong shape, or float values above 1.5 (probably 0..255 data).
    """
    data = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.as_tensor(
        np.asarray(images))
    if data.ndim == 3:
        data = data.unsqueeze(1)
    if data.ndim != 4 or data.shape[1] != 1:
        raise ValueError(f"{name} must be (N, H, W) or (N, 1, H, W), got {tuple(data.shape)}")
    if data.dtype == torch.uint8:
        return data.float().div_(255.0)
    data = data.float()
    if data.numel() and float(data.max()) > MAX_UNIT_FLOAT:
        raise ValueError(f"{name}: float images must be scaled to [0, 1] (max value "
                         f"{float(data.max()):.4g}); pass uint8 for 0..255 data")
    return data
