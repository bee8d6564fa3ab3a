"""Tests for alignfl_mpi.evaluation: the paper's latent protocol, VAE passes, grids."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from PIL import Image

from alignfl_mpi import evaluation
from alignfl_mpi.evaluation import (
    encode_latents,
    evaluate_vae,
    image_grid_array,
    latent_classification,
    latent_variances,
    reconstruction_error,
    save_image_grid,
    to_uint8_images,
)


def _blobs(n_per_class: int = 100, *, labels=(0, 1, 2), dim: int = 4, seed: int = 0):
    """Well-separated Gaussian blobs: (features, labels)."""
    rng = np.random.default_rng(seed)
    centres = 6.0 * np.eye(len(labels), dim)
    x = np.concatenate([rng.normal(c, 1.0, size=(n_per_class, dim)) for c in centres])
    y = np.repeat(np.asarray(labels), n_per_class)
    return x, y


class _StandInVAE(torch.nn.Module):
    """Encoder mu = flattened image; decoder = reshape, or a constant 0.5 image."""

    def __init__(self, *, constant_decoder: bool = False) -> None:
        super().__init__()
        self.constant_decoder = constant_decoder
        self.scale = torch.nn.Parameter(torch.ones(()))  # gives the module a parameter
        self.seen_training: list[bool] = []
        self.seen_grad: list[bool] = []

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen_training.append(self.training)
        self.seen_grad.append(torch.is_grad_enabled())
        mu = self.scale * x.flatten(1)
        return mu, torch.zeros_like(mu)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.constant_decoder:
            return torch.full((len(z), 28 * 28), 0.5)  # flat on purpose: must be reshaped
        return z.view(-1, 1, 28, 28)

    def forward(self, x: torch.Tensor):
        mu, logvar = self.encode(x)
        return self.decode(mu), mu, logvar


# ------------------------------------------------------- the paper's latent protocol


def _reference_protocol(features: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The reference code's evaluate_vae_encoder_split, minus its encoder pass and the
    ``multi_class="multinomial"`` argument this scikit-learn no longer accepts."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.2, random_state=42, stratify=labels)
    clf = LogisticRegression(max_iter=1000)
    clf.fit(x_train, y_train)
    y_pred = clf.predict(x_test)
    _, _, f1, _ = precision_recall_fscore_support(y_test, y_pred, average="weighted")
    return {"latent_accuracy": accuracy_score(y_test, y_pred), "latent_f1": f1}


def _overlapping_latents(seed: int, *, n: int = 1000, dim: int = 2, classes: int = 10):
    """Latent-like features whose classes overlap, so the score is far from 0 and 1."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    centres = rng.normal(scale=1.5 * np.sqrt(2 / dim), size=(classes, dim))
    return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y


@pytest.mark.parametrize(("seed", "dim"), [(0, 2), (1, 8), (2, 2)])
def test_latent_classification_gives_sklearns_number(seed, dim):
    x, y = _overlapping_latents(seed, dim=dim)
    ours = latent_classification(x, y)
    reference = _reference_protocol(x, y)
    assert 0.2 < reference["latent_accuracy"] < 0.95  # a number that can differ
    assert ours == pytest.approx(reference, abs=0.0)


def test_multi_class_multinomial_is_the_default_model():
    """Why the reference's multi_class="multinomial" can be left out: lbfgs with more than
    two classes fits the softmax model; one-vs-rest differs on the same data."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    x, y = _overlapping_latents(3)
    default = LogisticRegression(max_iter=1000).fit(x, y)
    assert default.predict_proba(x[:5]).sum(axis=1) == pytest.approx(np.ones(5))
    softmax = np.exp(default.decision_function(x[:50]))
    softmax /= softmax.sum(axis=1, keepdims=True)
    assert default.predict_proba(x[:50]) == pytest.approx(softmax, abs=1e-6)
    ovr = OneVsRestClassifier(LogisticRegression(max_iter=1000)).fit(x, y)
    assert not np.allclose(ovr.predict_proba(x[:50]), softmax)


def test_latent_classification_on_blobs():
    x, y = _blobs(seed=3)
    metrics = latent_classification(x, y)
    assert set(metrics) == {"latent_accuracy", "latent_f1"}
    assert metrics["latent_accuracy"] > 0.95
    assert metrics["latent_f1"] > 0.95


def test_latent_classification_on_random_labels_is_near_chance():
    rng = np.random.default_rng(4)
    metrics = latent_classification(rng.normal(size=(600, 5)), rng.integers(0, 3, size=600))
    assert 0.2 < metrics["latent_accuracy"] < 0.5


def test_latent_classification_refuses_a_singleton_class():
    x = np.arange(12, dtype=np.float64).reshape(6, 2)
    with pytest.raises(ValueError):
        latent_classification(x, np.array([0, 0, 0, 1, 1, 2]))


def test_latent_variances_find_a_collapsed_dimension():
    rng = np.random.default_rng(8)
    z = np.column_stack([rng.normal(scale=2.0, size=5000), rng.normal(scale=0.1, size=5000)])
    var = latent_variances(z)
    assert set(var) == {"latent_var_0", "latent_var_1", "latent_var_min_ratio"}
    assert var["latent_var_0"] == pytest.approx(4.0, rel=0.1)
    assert var["latent_var_1"] == pytest.approx(0.01, rel=0.1)
    assert var["latent_var_min_ratio"] == pytest.approx(0.0025, rel=0.2)
    assert latent_variances(np.zeros((4, 3)))["latent_var_min_ratio"] == 0.0


# ---------------------------------------------------------------------- VAE passes


def test_encode_latents_scales_uint8_and_batches():
    images = np.random.default_rng(5).integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    vae = _StandInVAE()
    mu = encode_latents(vae, images, batch_size=3)
    assert mu.shape == (10, 784) and mu.dtype == np.float32
    np.testing.assert_allclose(mu, images.reshape(10, -1) / 255.0, rtol=1e-6)
    assert len(vae.seen_training) == 4  # ceil(10 / 3) batches
    with_channel = encode_latents(vae, images[:, None], batch_size=4)
    from_float = encode_latents(vae, torch.from_numpy(images[:, None] / 255.0).float())
    np.testing.assert_allclose(with_channel, mu)
    np.testing.assert_allclose(from_float, mu, rtol=1e-6)


@pytest.mark.parametrize("start_training", [True, False])
def test_vae_passes_use_eval_no_grad_and_restore_mode(start_training):
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    vae = _StandInVAE()
    vae.train(start_training)
    encode_latents(vae, images)
    reconstruction_error(vae, images)
    assert vae.training is start_training
    assert vae.seen_training == [False, False]
    assert vae.seen_grad == [False, False]


def test_mode_restored_when_the_model_raises():
    vae = _StandInVAE()
    vae.train()
    with pytest.raises(RuntimeError):  # decode's view to 28x28 fails on 27x27 images
        reconstruction_error(vae, np.zeros((2, 27, 27), dtype=np.uint8))
    assert vae.seen_training == [False]
    assert vae.training is True


def test_reconstruction_error_perfect_and_constant_decoder():
    images = np.random.default_rng(6).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    assert reconstruction_error(_StandInVAE(), images, batch_size=2) == pytest.approx(0.0, abs=1e-9)
    expected = np.mean(np.sum((images / 255.0 - 0.5) ** 2, axis=(1, 2)))
    got = reconstruction_error(_StandInVAE(constant_decoder=True), images, batch_size=2)
    assert got == pytest.approx(expected, rel=1e-5)
    all_black = np.zeros((3, 28, 28), dtype=np.uint8)
    constant = _StandInVAE(constant_decoder=True)
    assert reconstruction_error(constant, all_black) == pytest.approx(196.0)


def test_evaluate_vae_combines_metrics():
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(3), 30)
    images = rng.integers(0, 40, size=(90, 28, 28)).astype(np.uint8)
    for cls in range(3):  # class k has a bright band of rows
        images[labels == cls, 9 * cls : 9 * cls + 9, :] += 200
    metrics = evaluate_vae(_StandInVAE(constant_decoder=True), images, labels)
    assert set(metrics) == {"latent_accuracy", "latent_f1", "recon_error",
                            "latent_var_min_ratio"} | {f"latent_var_{d}" for d in range(784)}
    assert metrics["latent_var_5"] == pytest.approx(float((images.reshape(90, -1)[:, 5]
                                                           / 255.0).var()), rel=1e-4)
    assert metrics["latent_accuracy"] > 0.95 and metrics["latent_f1"] > 0.95
    expected = np.mean(np.sum((images / 255.0 - 0.5) ** 2, axis=(1, 2)))
    assert metrics["recon_error"] == pytest.approx(expected, rel=1e-5)


# -------------------------------------------------------------------------- images


def test_to_uint8_images_clips_rounds_and_drops_channel():
    x = torch.tensor([[[[-1.0, 0.0, 0.2, 0.5, 1.0, 3.0]]]])
    assert to_uint8_images(x).tolist() == [[[0, 0, 51, 128, 255, 255]]]
    raw = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
    assert to_uint8_images(raw) is raw


def test_image_grid_array_shape_and_placement():
    n, nrow, pad, up, size = 13, 5, 2, 3, 4
    images = np.stack([np.full((size, size), 10 * i, dtype=np.uint8) for i in range(n)])
    grid = image_grid_array(images, nrow=nrow, pad=pad, upscale=up)
    cell = size * up
    assert grid.shape == (3 * (cell + pad) + pad, 5 * (cell + pad) + pad) == (44, 72)
    assert grid.dtype == np.uint8
    for i in range(n):
        top, left = pad + (i // nrow) * (cell + pad), pad + (i % nrow) * (cell + pad)
        assert np.all(grid[top : top + cell, left : left + cell] == 10 * i)
        assert np.all(grid[top - pad : top, left : left + cell] == 255)  # padding above
    assert np.all(grid[-pad - cell - 1 :, -2 * (cell + pad) :] == 255)  # two empty cells


def test_image_grid_array_upscales_pixels_from_floats():
    image = np.zeros((1, 1, 2, 3))
    image[0, 0, 0, 1] = 1.0
    grid = image_grid_array(image, nrow=4, pad=1, upscale=2)
    assert grid.shape == (2 * 2 + 2, 3 * 2 + 2)
    inner = grid[1:-1, 1:-1]
    expected = np.zeros((4, 6), dtype=np.uint8)
    expected[0:2, 2:4] = 255
    np.testing.assert_array_equal(inner, expected)


def test_image_grid_array_rejects_empty():
    with pytest.raises(ValueError, match="zero images"):
        image_grid_array(np.zeros((0, 28, 28)))


def test_save_image_grid_writes_png(tmp_path):
    images = np.random.default_rng(8).random((13, 28, 28))
    path = save_image_grid(images, tmp_path / "a" / "b" / "grid.png", nrow=5, pad=2, upscale=2)
    assert path == tmp_path / "a" / "b" / "grid.png"
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.mode == "L"
        assert picture.size == (5 * 58 + 2, 3 * 58 + 2)
        pixels = np.asarray(picture)
    np.testing.assert_array_equal(pixels, image_grid_array(images, nrow=5, pad=2, upscale=2))


def test_save_image_grid_labels_add_left_margin(tmp_path):
    images = torch.rand(12, 1, 28, 28)
    plain = save_image_grid(images, tmp_path / "plain.png", nrow=4)
    labelled = save_image_grid(images, tmp_path / "labels.png", nrow=4, labels=["c0", "c1", "c2"])
    with Image.open(plain) as a, Image.open(labelled) as b:
        plain_px, labelled_px = np.asarray(a), np.asarray(b)
    assert labelled_px.shape[0] == plain_px.shape[0]
    margin = labelled_px.shape[1] - plain_px.shape[1]
    assert margin > 0
    np.testing.assert_array_equal(labelled_px[:, margin:], plain_px)
    assert labelled_px[:, :margin].min() < 128  # text was drawn in the margin
    with pytest.raises(ValueError, match="one entry per grid row"):
        save_image_grid(images, tmp_path / "bad.png", nrow=4, labels=["only one"])


def test_save_image_grid_rejects_empty(tmp_path):
    with pytest.raises(ValueError, match="zero images"):
        save_image_grid(np.zeros((0, 28, 28)), tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_docstring_examples():
    result = doctest.testmod(evaluation)
    assert result.attempted > 0 and result.failed == 0
