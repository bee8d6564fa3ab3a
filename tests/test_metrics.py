"""Tests for alignfl_mpi.metrics: every metric checked on data with a known answer."""

from __future__ import annotations

import doctest
import hashlib
import json
import logging

import numpy as np
import pytest
import torch
from conftest import write_idx_folder

from alignfl_mpi import metrics
from alignfl_mpi.datasets import load_dataset
from alignfl_mpi.metrics import (
    FeatureNet,
    class_coverage,
    density_coverage,
    feature_net_path,
    fid_lenet,
    frechet_distance,
    gaussian_stats,
    load_or_train_feature_net,
    precision_recall,
    quality_report,
    sqrtm_psd,
    train_feature_net,
)


def gaussian(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).multivariate_normal(mean, cov, size=n)


def random_cov(dim: int, seed: int) -> np.ndarray:
    """A full-rank covariance with strongly non-diagonal structure."""
    a = np.random.default_rng(seed).normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


# ------------------------------------------------------------------------------ FID


def test_sqrtm_psd_hand_example():
    root = sqrtm_psd(np.array([[2.0, 1.0], [1.0, 2.0]]))  # eigenvalues 3 and 1
    s3 = np.sqrt(3.0)
    np.testing.assert_allclose(root, 0.5 * np.array([[s3 + 1, s3 - 1], [s3 - 1, s3 + 1]]),
                               atol=1e-14)


def test_sqrtm_psd_of_singular_matrix():
    b = np.random.default_rng(0).normal(size=(6, 3))
    cov = b @ b.T  # rank 3: round-off gives tiny negative eigenvalues
    root = sqrtm_psd(cov)
    np.testing.assert_allclose(root, root.T, atol=0)
    np.testing.assert_allclose(root @ root, cov, atol=1e-10)
    assert np.linalg.eigvalsh(root).min() > -1e-7
    with pytest.raises(ValueError, match="square"):
        sqrtm_psd(np.zeros((2, 3)))


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 5.0, 6), rng.uniform(0.1, 5.0, 6)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu_a - mu_b) ** 2)
    got = frechet_distance((mu_a, np.diag(a)), (mu_b, np.diag(b)))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_non_commuting_covariances():
    """Against tr sqrt(S1 S2) from the (real, non-negative) eigenvalues of S1 S2."""
    s1, s2 = random_cov(5, seed=2), random_cov(5, seed=3)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu = np.arange(5.0)
    trace_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = np.trace(s1) + np.trace(s2) - 2 * trace_sqrt + mu @ mu
    assert frechet_distance((mu, s1), (np.zeros(5), s2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance((mu, s1), (np.zeros(5), s2)) == pytest.approx(
        frechet_distance((np.zeros(5), s2), (mu, s1)), rel=1e-10)


def test_fid_identical_sets_is_zero():
    x = gaussian(500, np.zeros(16), random_cov(16, seed=4), seed=5)
    scale = np.trace(np.cov(x, rowvar=False))
    assert 0.0 <= fid_lenet(x, x) < 1e-6 * scale


def test_fid_singular_covariances_fewer_samples_than_dims():
    x = np.random.default_rng(6).normal(size=(20, 64))
    assert 0.0 <= fid_lenet(x, x) < 1e-6 * np.trace(np.cov(x, rowvar=False))
    assert fid_lenet(x, x + 1.0) == pytest.approx(64.0, rel=1e-6)


def test_fid_shifted_gaussians_match_closed_form():
    cov = random_cov(8, seed=7)
    shift = np.linspace(-1.0, 2.0, 8)
    x = gaussian(3000, np.zeros(8), cov, seed=8)
    # The same sample shifted: equal covariances, so FID = ||shift||^2 exactly.
    assert fid_lenet(x, x + shift) == pytest.approx(shift @ shift, rel=1e-9)
    # An independent sample: sampling noise only.
    y = gaussian(3000, shift, cov, seed=9)
    assert fid_lenet(x, y) == pytest.approx(shift @ shift, rel=0.1)


def test_fid_well_separated_sets_is_large():
    x = np.random.default_rng(10).normal(size=(400, 10))
    near = np.random.default_rng(11).normal(size=(400, 10))
    far = np.random.default_rng(12).normal(loc=5.0, scale=3.0, size=(400, 10))
    assert fid_lenet(x, near) < 1.0
    assert fid_lenet(x, far) > 250.0


def test_fid_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        fid_lenet(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        fid_lenet(np.full((4, 3), np.nan), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="mismatched"):
        fid_lenet(np.zeros((4, 3)), np.zeros((5, 2)))
    mu, cov = gaussian_stats(np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]]))
    np.testing.assert_allclose(mu, [3.0, 6.0])
    np.testing.assert_allclose(cov, [[4.0, 8.0], [8.0, 16.0]])


# ------------------------------------------------------------- k-NN manifold metrics


@pytest.fixture(scope="module")
def cloud() -> np.ndarray:
    return np.random.default_rng(20).normal(size=(600, 8))


def test_identical_sets_precision_recall_one(cloud):
    assert precision_recall(cloud, cloud) == {"precision": 1.0, "recall": 1.0}


def test_identical_sets_density_coverage(cloud):
    result = density_coverage(cloud, cloud, k=5)
    assert result["coverage"] == 1.0
    # Each real ball holds its own centre and exactly k neighbours: density (k+1)/k.
    assert result["density"] == pytest.approx(6 / 5, abs=0.01)


def test_fake_collapsed_to_one_real_point(cloud):
    fake = np.repeat(cloud[:1], 200, axis=0)
    pr = precision_recall(cloud, fake)
    assert pr["precision"] == 1.0
    assert pr["recall"] <= 0.01
    dc = density_coverage(cloud, fake)
    assert dc["coverage"] < 0.05


def test_disjoint_sets_score_zero(cloud):
    far = cloud + 100.0
    assert precision_recall(cloud, far) == {"precision": 0.0, "recall": 0.0}
    assert density_coverage(cloud, far) == {"density": 0.0, "coverage": 0.0}


def test_narrow_fake_distribution_has_precision_without_recall(cloud):
    narrow = 0.2 * np.random.default_rng(21).normal(size=(600, 8))
    pr = precision_recall(cloud, narrow)
    assert pr["precision"] > 0.9 and pr["recall"] < 0.3
    dc = density_coverage(cloud, narrow)
    assert dc["density"] > 1.5 and dc["coverage"] < 0.5


def test_subsampling_is_seeded_and_bounded(cloud):
    fake = np.random.default_rng(22).normal(size=(600, 8))
    a = precision_recall(cloud, fake, max_points=100, seed=3)
    assert a == precision_recall(cloud, fake, max_points=100, seed=3)
    assert a != precision_recall(cloud, fake, max_points=100, seed=4)
    full = precision_recall(cloud, fake)
    assert full == precision_recall(cloud, fake, max_points=600, batch_size=37)


def test_knn_metrics_reject_bad_input(cloud):
    with pytest.raises(ValueError, match="more than k=5"):
        precision_recall(cloud, cloud[:5])
    with pytest.raises(ValueError, match="k must be"):
        density_coverage(cloud, cloud, k=0)
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(cloud, cloud[:, :4])


# ------------------------------------------------------------------ class coverage


def test_class_coverage_one_class_and_uniform():
    one = class_coverage(np.full(1000, 7))
    assert one["coverage"] == pytest.approx(0.1)
    assert one["histogram"] == [0.0] * 7 + [1.0, 0.0, 0.0]
    assert class_coverage(np.arange(1000) % 10)["coverage"] == 1.0


def test_class_coverage_threshold_rule():
    labels = np.array([0] * 990 + [1] * 10)  # class 1 has exactly 1%
    assert class_coverage(labels)["coverage"] == pytest.approx(0.2)
    labels = np.array([0] * 995 + [1] * 5)  # 0.5%: below the default threshold
    assert class_coverage(labels)["coverage"] == pytest.approx(0.1)
    assert class_coverage(labels, min_share=0.005)["coverage"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="0..9"):
        class_coverage(np.array([0, 10]))
    with pytest.raises(ValueError, match="at least one"):
        class_coverage(np.array([], dtype=int))


# ------------------------------------------------------------------ feature network


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict[str, np.ndarray]:
    return write_idx_folder(tmp_path_factory.mktemp("tiny-src") / "tiny", n_train=400,
                            n_test=100, seed=1)


@pytest.fixture(scope="module")
def tiny_net(tiny_data) -> FeatureNet:
    # 400 images: small batches, so that the ten brightness levels get enough steps.
    return train_feature_net(tiny_data["train_images"], tiny_data["train_labels"], epochs=15,
                             batch_size=16, seed=0)


def test_feature_net_learns_the_tiny_dataset(tiny_net, tiny_data):
    assert tiny_net.accuracy(tiny_data["test_images"], tiny_data["test_labels"]) > 0.9
    assert tiny_net.meta["n_train"] == 400 and tiny_net.meta["train_seconds"] > 0


def test_feature_net_accepts_every_image_layout(tiny_net, tiny_data):
    images = tiny_data["test_images"][:20]
    feats = tiny_net.features(images)
    assert feats.shape == (20, 128) and feats.dtype == np.float64
    assert (feats >= 0).all()  # after ReLU
    as_float = images.astype(np.float32) / 255.0
    close = {"rtol": 1e-5, "atol": 1e-5}  # float32 convolutions vary with batch layout
    np.testing.assert_allclose(tiny_net.features(as_float[:, None]), feats, **close)
    np.testing.assert_allclose(tiny_net.features(torch.from_numpy(as_float)), feats, **close)
    np.testing.assert_allclose(tiny_net.features(images, batch_size=3), feats, **close)
    probs = tiny_net.predict_proba(images)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_array_equal(tiny_net.predict(images), probs.argmax(axis=1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny_net.features(images.astype(np.float32))
    with pytest.raises(ValueError, match="28, 28"):
        tiny_net.features(np.zeros((2, 32, 32), dtype=np.uint8))


def test_training_is_deterministic_for_a_seed(tiny_data):
    kwargs = {"epochs": 1, "max_images": 64, "widths": (4, 8), "batch_size": 16}
    images, labels = tiny_data["train_images"], tiny_data["train_labels"]
    rng_before = torch.get_rng_state()
    a = train_feature_net(images, labels, seed=5, **kwargs).model.state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    b = train_feature_net(images, labels, seed=5, **kwargs).model.state_dict()
    c = train_feature_net(images, labels, seed=6, **kwargs).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_train_feature_net_rejects_bad_labels(tiny_data):
    with pytest.raises(ValueError, match="0..9"):
        train_feature_net(tiny_data["train_images"][:4], np.array([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="one label per image"):
        train_feature_net(tiny_data["train_images"][:4], np.array([0, 1]))


# ------------------------------------------------------------------------- cache


def test_cache_round_trip(tiny_root, monkeypatch):
    net = load_or_train_feature_net("tiny", root=tiny_root, epochs=1, seed=0)
    path = tiny_root / "feature_nets" / "tiny-lenet-s0-e1.pt"
    assert feature_net_path("tiny", root=tiny_root, seed=0, epochs=1) == path
    assert path.is_file()
    assert net.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["sha256"] == net.sha256 and meta["dataset"] == "tiny"
    data = load_dataset("tiny", root=tiny_root)
    assert meta["source_sha256"] == data.sha256
    assert net.test_accuracy == net.accuracy(data.test_images, data.test_labels)
    assert meta["train_seconds"] > 0 and meta["epochs"] == 1 and meta["seed"] == 0
    assert not list(path.parent.glob("*.tmp"))

    def no_training(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(metrics, "train_feature_net", no_training)
    again = load_or_train_feature_net("tiny", root=tiny_root, epochs=1, seed=0)
    assert again.sha256 == net.sha256 and again.meta == net.meta
    np.testing.assert_array_equal(again.features(data.test_images),
                                  net.features(data.test_images))
    with pytest.raises(AssertionError, match="cache"):  # another seed: another file
        load_or_train_feature_net("tiny", root=tiny_root, epochs=1, seed=1)


def test_corrupt_or_stale_cache_is_retrained(tiny_root, caplog):
    net = load_or_train_feature_net("tiny", root=tiny_root, epochs=1, seed=2)
    path = feature_net_path("tiny", root=tiny_root, seed=2, epochs=1)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="alignfl_mpi.metrics"):
        fixed = load_or_train_feature_net("tiny", root=tiny_root, epochs=1, seed=2)
    assert "does not match its recorded sha256" in caplog.text
    assert fixed.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == net.sha256

    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["source_sha256"] = {"train-images-idx3-ubyte.gz": "0" * 64}
    meta_path.write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignfl_mpi.metrics"):
        load_or_train_feature_net("tiny", root=tiny_root, epochs=1, seed=2)
    assert "trained on other tiny files" in caplog.text
    assert json.loads(meta_path.read_text())["source_sha256"] != meta["source_sha256"]


# ------------------------------------------------------------------------ report


def test_quality_report_real_against_real_and_collapsed(tiny_net, tiny_data):
    real, labels = tiny_data["test_images"], tiny_data["test_labels"]
    same = quality_report(tiny_net, real, labels, real.copy())
    keys = {"fid_lenet", "precision", "recall", "density", "coverage", "class_coverage",
            "fake_classifier_entropy", "real_accuracy", "n_real", "n_fake",
            *(f"class_share_{c}" for c in range(10))}
    assert set(same) == keys
    assert all(isinstance(v, float) for v in same.values())
    assert same["fid_lenet"] < 1e-6
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["class_coverage"] == 1.0
    assert same["real_accuracy"] > 0.9
    assert sum(same[f"class_share_{c}"] for c in range(10)) == pytest.approx(1.0)

    collapsed = np.repeat(real[:1], 50, axis=0)
    predicted = int(tiny_net.predict(real[:1])[0])
    report = quality_report(tiny_net, real, None, collapsed)
    assert "real_accuracy" not in report
    assert report["class_coverage"] == pytest.approx(0.1)
    assert report[f"class_share_{predicted}"] == 1.0
    assert report["precision"] == 1.0 and report["recall"] <= 0.02
    assert report["coverage"] < 0.2
    assert report["fid_lenet"] > 100 * max(same["fid_lenet"], 1e-3)
    assert 0.0 <= report["fake_classifier_entropy"] <= np.log(10)


def test_docstring_examples():
    result = doctest.testmod(metrics)
    assert result.attempted > 0 and result.failed == 0
