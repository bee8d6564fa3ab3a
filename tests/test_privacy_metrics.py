"""Tests for alignfl_mpi.privacy_metrics: each measurement checked on data with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignfl_mpi.privacy_metrics import (
    DomainClassifier,
    auc,
    dcr_ratio,
    mc_attack_scores,
    membership_auc,
    outlier_survival,
    privacy_report,
    train_domain_classifier,
)


def clustered_images(n: int, rng: np.random.Generator, *, prototypes: np.ndarray,
                     noise: float = 0.15) -> np.ndarray:
    """Float images in [0, 1]: a random prototype plus Gaussian pixel noise."""
    idx = rng.integers(len(prototypes), size=n)
    return np.clip(prototypes[idx] + rng.normal(0.0, noise, (n, 28, 28)), 0.0, 1.0)


@pytest.fixture(scope="module")
def domain() -> dict[str, np.ndarray]:
    """Members, non-members and an independent generator's samples of one distribution."""
    rng = np.random.default_rng(0)
    prototypes = rng.uniform(0.0, 1.0, (8, 28, 28))
    return {name: clustered_images(n, rng, prototypes=prototypes)
            for name, n in (("members", 200), ("nonmembers", 200), ("independent", 1000),
                            ("heldout_large", 600))}


def near_copies(images: np.ndarray, *, copies: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    repeated = np.repeat(images, copies, axis=0)
    return np.clip(repeated + rng.normal(0.0, noise, repeated.shape), 0.0, 1.0)


def half_images(n: int, *, bright_top: bool, rng: np.random.Generator) -> np.ndarray:
    """uint8 images whose top (or bottom) half is bright, plus noise everywhere."""
    images = rng.integers(0, 60, (n, 28, 28))
    rows = slice(0, 14) if bright_top else slice(14, 28)
    images[:, rows] += rng.integers(120, 196, (n, 1, 1))
    return images.astype(np.uint8)


@pytest.fixture(scope="module")
def halves() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"train0": half_images(600, bright_top=True, rng=rng),
            "train1": half_images(600, bright_top=False, rng=rng),
            "test0": half_images(300, bright_top=True, rng=rng),
            "test1": half_images(300, bright_top=False, rng=rng)}


@pytest.fixture(scope="module")
def classifier(halves: dict[str, np.ndarray]) -> DomainClassifier:
    return train_domain_classifier(halves["train0"], halves["train1"], seed=0, epochs=2)


# --------------------------------------------------------------------------- AUC


def test_auc_hand_examples() -> None:
    assert auc(np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0])) == 1.0
    assert auc(np.array([0.0, 1.0]), np.array([3.0, 4.0, 5.0])) == 0.0
    assert auc(np.full(4, 2.0), np.full(3, 2.0)) == 0.5
    # 4 pairs: (2>1), (2>0), (1=1 -> 1/2), (1>0) -> 3.5 / 4
    assert auc(np.array([2.0, 1.0]), np.array([1.0, 0.0])) == 0.875


def test_auc_equals_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(2)
    pos, neg = rng.integers(0, 5, 37).astype(float), rng.integers(0, 4, 23).astype(float)
    diff = pos[:, None] - neg[None, :]
    expected = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size
    assert auc(pos, neg) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="at least one"):
        auc(np.array([]), neg)
    with pytest.raises(ValueError, match="NaN"):
        auc(np.array([np.nan]), neg)


# ------------------------------------------------------------ Monte-Carlo attack


# "count" needs eps above the copies' distances: 400 of the 160k pairs are copies (0.25%).
@pytest.mark.parametrize("kw", [{}, {"weighting": "count", "quantile": 0.002}])
def test_mc_attack_finds_members_of_an_overfit_generator(domain: dict[str, np.ndarray],
                                                         kw: dict[str, object]) -> None:
    overfit = near_copies(domain["members"], copies=2, noise=0.02, seed=3)
    assert membership_auc(overfit, domain["members"], domain["nonmembers"], **kw) > 0.9


@pytest.mark.parametrize("kw", [{}, {"weighting": "count"}, {"weighting": "count",
                                                              "quantile": 0.001}])
def test_mc_attack_is_at_chance_for_a_generator_that_never_saw_members(
        domain: dict[str, np.ndarray], kw: dict[str, object]) -> None:
    value = membership_auc(domain["independent"], domain["members"], domain["nonmembers"], **kw)
    assert abs(value - 0.5) < 0.1


def test_mc_attack_scores_match_the_definition() -> None:
    rng = np.random.default_rng(4)
    gen, cand = rng.uniform(size=(50, 4, 4)), rng.uniform(size=(7, 4, 4))
    dist = np.linalg.norm(cand.reshape(7, 1, 16) - gen.reshape(1, 50, 16), axis=2)
    eps = float(np.quantile(dist, 0.2))
    count = mc_attack_scores(gen, cand, quantile=0.2, weighting="count", batch_size=3)
    np.testing.assert_allclose(count, (dist <= eps).mean(axis=1), atol=1e-12)
    log = mc_attack_scores(gen, cand, eps=eps, batch_size=2)
    expected = np.where(dist <= eps, np.log(eps / dist), 0.0).sum(axis=1) / 50
    np.testing.assert_allclose(log, expected, rtol=1e-6)  # images pass through float32
    with pytest.raises(ValueError, match="weighting"):
        mc_attack_scores(gen, cand, weighting="kde")
    with pytest.raises(ValueError, match="eps"):
        mc_attack_scores(gen, cand, eps=0.0)


def test_images_scaled_to_255_as_floats_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mc_attack_scores(np.full((2, 4, 4), 200.0), np.zeros((2, 4, 4)))


# -------------------------------------------------------------------------- DCR


def test_dcr_ratio_detects_copies_and_not_independent_samples(
        domain: dict[str, np.ndarray]) -> None:
    outliers, heldout = domain["members"], domain["nonmembers"]
    copied = dcr_ratio(near_copies(outliers, copies=1, noise=0.02, seed=5), outliers, heldout)
    assert copied["dcr_ratio"] < 0.2 and copied["dcr_closer_share"] > 0.95
    fresh = dcr_ratio(domain["independent"], outliers, heldout, batch_size=128)
    assert abs(fresh["dcr_ratio"] - 1.0) < 0.1 and abs(fresh["dcr_closer_share"] - 0.5) < 0.1
    assert set(fresh) == {"dcr_outliers", "dcr_heldout", "dcr_ratio", "dcr_closer_share"}
    assert fresh["dcr_outliers"] == pytest.approx(fresh["dcr_ratio"] * fresh["dcr_heldout"])


def test_dcr_subsamples_the_larger_reference_set(domain: dict[str, np.ndarray]) -> None:
    # Without subsampling, 3x more held-out images would be closer on average.
    result = dcr_ratio(domain["independent"], domain["members"], domain["heldout_large"])
    assert abs(result["dcr_ratio"] - 1.0) < 0.1
    uint8 = (domain["members"] * 255).round().astype(np.uint8)
    same = dcr_ratio(uint8, uint8, uint8)
    assert same["dcr_outliers"] == 0.0 and same["dcr_heldout"] == 0.0
    assert np.isnan(same["dcr_ratio"])


# ------------------------------------------------------------ domain classifier


def test_domain_classifier_separates_two_clear_domains(
        classifier: DomainClassifier, halves: dict[str, np.ndarray]) -> None:
    test = np.concatenate([halves["test0"], halves["test1"]])
    labels = np.r_[np.zeros(300), np.ones(300)]
    assert classifier.heldout_accuracy > 0.95
    assert classifier.accuracy(test, labels) > 0.95
    assert outlier_survival(classifier, halves["test1"]) > 0.95
    assert outlier_survival(classifier, halves["test0"]) < 0.05
    as_float = halves["test1"][:, None].astype(np.float32) / 255.0  # (N, 1, H, W) floats
    np.testing.assert_allclose(classifier.predict_proba(torch.from_numpy(as_float)),
                               classifier.predict_proba(halves["test1"]), atol=1e-6)


# ----------------------------------------------------------------------- report


def test_privacy_report_omits_what_it_was_not_given(
        classifier: DomainClassifier, halves: dict[str, np.ndarray],
        domain: dict[str, np.ndarray]) -> None:
    assert privacy_report() == {}
    only_survival = privacy_report(classifier=classifier, synthetic_outlier_client=halves["test1"])
    assert set(only_survival) == {"classifier_accuracy", "survival_synthetic"}
    # An empty control (no client without outliers) is omitted, not scored as 0 or NaN.
    empty = privacy_report(classifier=classifier, synthetic_control=halves["test1"][:0])
    assert set(empty) == {"classifier_accuracy"}
    assert only_survival["survival_synthetic"] > 0.95
    no_classifier = privacy_report(synthetic_outlier_client=domain["independent"],
                                   outliers=domain["members"],
                                   heldout_outliers=domain["nonmembers"])
    assert set(no_classifier) == {"dcr_outliers", "dcr_heldout", "dcr_ratio",
                                  "dcr_closer_share", "mia_auc_outliers"}


def test_privacy_report_with_every_input(classifier: DomainClassifier,
                                         halves: dict[str, np.ndarray]) -> None:
    outliers, heldout = halves["train1"][:100], halves["test1"][:100]
    synthetic = np.concatenate([near_copies(outliers / 255.0, copies=1, noise=0.01, seed=6),
                                halves["test0"][:100] / 255.0])
    report = privacy_report(
        synthetic_outlier_client=synthetic, recon_outliers_client=outliers,
        recon_outliers_global=halves["test0"][:50], outliers=outliers,
        heldout_outliers=heldout, inlier_members=halves["train0"][:100],
        inlier_nonmembers=halves["test0"][100:200], synthetic_all=halves["test0"][:150],
        synthetic_control=halves["test0"][150:250], recon_inliers_global=halves["test1"][:80],
        classifier=classifier)
    assert set(report) == {
        "classifier_accuracy", "survival_synthetic", "survival_synthetic_all",
        "survival_recon_client", "survival_recon_global", "survival_synthetic_control",
        "survival_recon_control", "dcr_outliers", "dcr_heldout",
        "dcr_ratio", "dcr_closer_share", "mia_auc_outliers", "mia_auc_inliers"}
    assert all(type(v) is float for v in report.values())
    assert report["survival_synthetic"] == pytest.approx(0.5, abs=0.05)
    assert report["survival_recon_client"] > 0.95 and report["survival_recon_global"] < 0.05
    assert report["survival_synthetic_all"] < 0.05
    # Each control is scored on its own images: in-domain ones here, outlier-domain there.
    assert report["survival_synthetic_control"] < 0.05
    assert report["survival_recon_control"] > 0.95
    assert report["dcr_ratio"] < 0.5 and report["mia_auc_outliers"] > 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_domain_classifier_on_cuda(halves: dict[str, np.ndarray]) -> None:
    clf = train_domain_classifier(halves["train0"], halves["train1"], epochs=2, device="cuda")
    assert next(clf.model.parameters()).device.type == "cuda"
    assert outlier_survival(clf, halves["test1"]) > 0.95
    assert outlier_survival(clf, halves["test0"]) < 0.05
