"""Evaluation of a VAE: latent classification, reconstruction error, image grids.

The paper's protocol, exactly as the reference code's ``evaluate_vae_encoder_split``
(``src/ALIGN_FL/utils/gen_utils.py``): encode the test images to their latent means,
``train_test_split(test_size=0.2, random_state=42, stratify=labels)``, fit
``LogisticRegression(max_iter=1000)`` on the raw latents of the train part and report
``accuracy_score`` and the weighted F1 of ``precision_recall_fscore_support`` on the other
part. The reference also passes ``multi_class="multinomial"``; scikit-learn deprecated
that argument in 1.5 and removed it later (1.9 refuses it), and its default solver
``lbfgs`` fits the multinomial model for more than two classes anyway, so leaving it out
gives the same model. The reference scores the latents of its small test loader (20 test
images per class); alignfl_mpi scores the whole in-domain test set of the partition
(10000 images for MNIST), a less noisy estimate of the same quantity.

Besides, :func:`latent_variances` reports the variance of the test latent means per
latent dimension: a dimension the encoder does not use (a collapsed one) has a
variance near 0.

Everything else here is plain NumPy/PyTorch/PIL. The VAE is any ``nn.Module`` with
``encode(x) -> (mu, logvar)`` and ``decode(z) -> images`` for images in [0, 1]
(:class:`Autoencoder`); it must already live on ``device``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .arrays import to_uint8_images

__all__ = [
    "encode_latents",
    "Autoencoder",
    "evaluate_vae",
    "image_grid_array",
    "latent_classification",
    "latent_variances",
    "reconstruction_error",
    "save_image_grid",
    "to_uint8_images",
]

_GRID_BACKGROUND = 255  # white padding between cells and behind row labels
_LABEL_INK = 0  # black row-label text

ImageBatch = np.ndarray | torch.Tensor


class Autoencoder(Protocol):
    """What the evaluation needs of a VAE (every model of :mod:`alignfl_mpi.models` is one)."""

    training: bool

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` of a batch of images."""
        ...

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] of a batch of latents."""
        ...

    def eval(self) -> object:
        """Switch to eval mode."""
        ...

    def train(self, mode: bool = True) -> object:
        """Switch to train mode (``mode``)."""
        ...


# ------------------------------------------------------------------------ metrics


def latent_classification(
    latents: np.ndarray, labels: np.ndarray, *, test_fraction: float = 0.2, seed: int = 42
) -> dict[str, float]:
    """Score how linearly separable the classes are in latent space: the paper's protocol.

    ``train_test_split(latents, labels, test_size=test_fraction, random_state=seed,
    stratify=labels)``, ``LogisticRegression(max_iter=1000)`` (lbfgs, multinomial) on the
    train part, accuracy and support-weighted F1 on the held-out part; see the module
    docstring for the one argument of the reference code that is left out and why.

    Args:
        latents: Latent means, shape ``(N, D)``.
        labels: Class labels, shape ``(N,)``; every class needs at least 2 samples.
        test_fraction: Held-out share (stratified).
        seed: ``random_state`` of the split.

    Returns:
        ``{"latent_accuracy": ..., "latent_f1": ...}`` on the held-out part.

    >>> x = np.array([[-2.0], [-1.5], [-1.0], [-0.5], [0.5], [1.0], [1.5], [2.0]] * 5)
    >>> latent_classification(x, np.array([0, 0, 0, 0, 1, 1, 1, 1] * 5))
    {'latent_accuracy': 1.0, 'latent_f1': 1.0}
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support
    from sklearn.model_selection import train_test_split

    latents = np.asarray(latents, dtype=np.float64)
    labels = np.asarray(labels)
    if latents.ndim != 2 or labels.ndim != 1 or len(latents) != len(labels):
        raise ValueError(f"need latents (N, D) and labels (N,), got {latents.shape} and "
                         f"{labels.shape}")
    x_train, x_test, y_train, y_test = train_test_split(
        latents, labels, test_size=test_fraction, random_state=seed, stratify=labels)
    if len(np.unique(y_train)) < 2:
        predicted = np.full(len(y_test), y_train[0])
    else:
        predicted = LogisticRegression(max_iter=1000).fit(x_train, y_train).predict(x_test)
    _, _, f1, _ = precision_recall_fscore_support(y_test, predicted, average="weighted",
                                                  zero_division=0)
    return {"latent_accuracy": float(accuracy_score(y_test, predicted)),
            "latent_f1": float(f1)}


def latent_variances(latents: np.ndarray) -> dict[str, float]:
    """Per-dimension variance of latent means, and the smallest as a share of the largest.

    A collapsed dimension (the encoder ignores it; its posterior is the prior) has a
    variance of its means near 0. Keys: ``latent_var_<d>`` for every dimension ``d`` and
    ``latent_var_min_ratio`` = min / max (1 for one dimension, 0 if all are 0).

    >>> latent_variances(np.array([[0.0, 1.0], [0.0, -1.0], [2.0, 1.0], [2.0, -1.0]]))
    {'latent_var_0': 1.0, 'latent_var_1': 1.0, 'latent_var_min_ratio': 1.0}
    """
    var = np.asarray(latents, dtype=np.float64).var(axis=0)
    out = {f"latent_var_{d}": float(v) for d, v in enumerate(var)}
    top = float(var.max()) if len(var) else 0.0
    out["latent_var_min_ratio"] = float(var.min() / top) if top > 0 else 0.0
    return out


# -------------------------------------------------------------------- VAE passes


def encode_latents(
    vae: Autoencoder,
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
    vae: Autoencoder,
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
    vae: Autoencoder,
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
        ``{"latent_accuracy", "latent_f1", "recon_error"}`` and the per-dimension
        variances of the test latent means (:func:`latent_variances`), as floats.
    """
    batches = list(_encoded_batches(vae, images, batch_size=batch_size, device=device, decode=True))
    latents = _concat_rows([mu for mu, _ in batches])
    metrics = latent_classification(latents, labels, seed=seed)
    metrics.update(latent_variances(latents))
    metrics["recon_error"] = float(np.mean(np.concatenate([err for _, err in batches])))
    return metrics


def _encoded_batches(
    vae: Autoencoder,
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
    margin = math.ceil(max(box[2] - box[0] for box in boxes)) + 2 * max(pad, 2)
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
