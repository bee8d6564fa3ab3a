"""Tests for alignfl_mpi.evaluation: split, classifier, metrics, VAE passes, grids."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from PIL import Image

from alignfl_mpi import evaluation
from alignfl_mpi.evaluation import (
    encode_latents,
    evaluate_vae,
    fit_logistic_regression,
    image_grid_array,
    latent_classification,
    reconstruction_error,
    save_image_grid,
    stratified_split,
    to_uint8_images,
    weighted_f1,
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


# ---------------------------------------------------------------- stratified_split


def test_stratified_split_proportions_disjoint_complete():
    labels = np.repeat(np.array([4, 0, 9, 2, 5]), [50, 23, 7, 2, 1])
    np.random.default_rng(1).shuffle(labels)
    train, test = stratified_split(labels, test_fraction=0.2, seed=42)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)  # sorted, no repeats
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    for cls in np.unique(labels):
        n_cls = np.sum(labels == cls)
        n_test = np.sum(labels[test] == cls)
        assert abs(n_test - 0.2 * n_cls) <= 1
        if n_cls >= 2:
            assert n_test >= 1 and np.sum(labels[train] == cls) >= 1
    assert np.sum(labels[test] == 5) == 0  # the singleton stays in train
    assert np.sum(labels[test] == 4) == 10


def test_stratified_split_is_deterministic_and_seeded():
    labels = np.repeat(np.arange(3), 40)
    first = stratified_split(labels, seed=42)
    again = stratified_split(labels, seed=42)
    other = stratified_split(labels, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_stratified_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(np.zeros(10), test_fraction=fraction)


# ------------------------------------------------------------ logistic regression


def test_logistic_regression_separates_blobs():
    x, y = _blobs(seed=0)
    x_new, y_new = _blobs(seed=1)
    model = fit_logistic_regression(x, y)
    assert np.mean(model.predict(x_new) == y_new) > 0.95
    probs = model.predict_proba(x_new)
    assert probs.shape == (len(x_new), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_logistic_regression_keeps_original_label_values():
    x, y = _blobs(labels=(3, 7, 9), seed=2)
    model = fit_logistic_regression(x, y)
    predicted = model.predict(x)
    assert set(np.unique(predicted)) == {3, 7, 9}
    assert np.mean(predicted == y) > 0.95
    assert model.classes.tolist() == [3, 7, 9]


@pytest.mark.parametrize("C", [1.0, 0.1])
def test_logistic_regression_matches_closed_form(C):
    # Points -1 (class 0) and +1 (class 1); by symmetry W = [-w, w], b0 = b1, and the
    # objective w^2 + 2C log(1 + exp(-2w)) is stationary at w = 2C sigmoid(-2w).
    lo, hi = 0.0, 2.0 * C
    for _ in range(200):  # bisection on the increasing g(w) = w - 2C sigmoid(-2w)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid - 2 * C / (1 + math.exp(2 * mid)) < 0 else (lo, mid)
    w = (lo + hi) / 2
    model = fit_logistic_regression(np.array([[-1.0], [1.0]]), np.array([0, 1]), C=C)
    np.testing.assert_allclose(model.mean, [0.0])
    np.testing.assert_allclose(model.scale, [1.0])
    np.testing.assert_allclose(model.coef, [[-w, w]], atol=1e-6)
    np.testing.assert_allclose(model.intercept[1] - model.intercept[0], 0.0, atol=1e-6)
    p_one = model.predict_proba(np.array([[1.0]]))[0, 1]
    assert p_one == pytest.approx(1 / (1 + math.exp(-2 * w)), abs=1e-6)


def test_logistic_regression_single_class_predicts_it():
    model = fit_logistic_regression(np.ones((4, 2)), np.array([5, 5, 5, 5]))
    assert model.predict(np.random.default_rng(0).normal(size=(3, 2))).tolist() == [5, 5, 5]


def test_logistic_regression_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="features"):
        fit_logistic_regression(np.zeros((4, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="C must be"):
        fit_logistic_regression(np.zeros((4, 2)), np.zeros(4), C=0.0)


# ------------------------------------------------------------------------- metrics


def test_weighted_f1_hand_computed():
    # class 0: TP1 FP1 FN1 -> 0.5; class 1: TP2 FP1 -> 0.8; class 2: 0. Supports 2, 2, 1.
    y_true = np.array([0, 0, 1, 1, 2])
    assert weighted_f1(y_true, np.array([0, 1, 1, 1, 0])) == pytest.approx(0.52)
    assert weighted_f1(y_true, y_true.copy()) == 1.0


def test_weighted_f1_ignores_classes_only_predicted():
    # class 0: 1.0, class 1: TP1 FN1 -> 2/3; class 5 has no support, so weight 0.
    value = weighted_f1(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 5]))
    assert value == pytest.approx((2 * 1.0 + 2 * 2 / 3) / 4)


def test_weighted_f1_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="equal length"):
        weighted_f1(np.array([0, 1]), np.array([0]))


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
    assert reconstruction_error(_StandInVAE(constant_decoder=True), all_black) == pytest.approx(196.0)


def test_evaluate_vae_combines_metrics():
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(3), 30)
    images = rng.integers(0, 40, size=(90, 28, 28)).astype(np.uint8)
    for cls in range(3):  # class k has a bright band of rows
        images[labels == cls, 9 * cls : 9 * cls + 9, :] += 200
    metrics = evaluate_vae(_StandInVAE(constant_decoder=True), images, labels)
    assert set(metrics) == {"latent_accuracy", "latent_f1", "recon_error"}
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
