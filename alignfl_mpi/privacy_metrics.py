"""Privacy measured, not asserted: outlier survival, distance to closest record, MIA.

These are the experimenter's measurements, run on rank 0 with access to the partition
file (real data is allowed here; it is not part of the algorithm). They ask whether the
injected cross-domain outliers (e.g. Fashion-MNIST images among one client's MNIST
digits) leak through what the client shares (its decoder and prior):

* **Outlier survival** (:func:`train_domain_classifier`, :func:`outlier_survival`): the
  share of synthetic samples, or of reconstructions, that a classifier trained on real
  data (in-domain = 0, outlier domain = 1) labels as outlier domain.
* **Distance to closest record** (:func:`dcr_ratio`): do synthetic samples lie closer to
  the training outliers than to held-out images of the same domain?
* **Membership inference** (:func:`mc_attack_scores`, :func:`membership_auc`): the
  Monte-Carlo attack of Hilprecht et al. (2019), which only needs generated samples,
  scored by the rank AUC of members against non-members.

:func:`privacy_report` combines them into one flat ``dict[str, float]``.

Images are numpy or torch arrays ``(N, H, W)`` or ``(N, 1, H, W)``: uint8 in 0..255, or
floats already in [0, 1] (used as given; floats above 1.5 are refused as probably
0..255 data). Distances are Euclidean on flattened [0, 1] pixels.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from .evaluation import unit_images as _unit_images
from .training import train_minibatches

__all__ = [
    "DomainClassifier",
    "MC_WEIGHTINGS",
    "auc",
    "dcr_ratio",
    "mc_attack_scores",
    "membership_auc",
    "outlier_survival",
    "privacy_report",
    "train_domain_classifier",
]

log = logging.getLogger(__name__)

ImageArray = np.ndarray | torch.Tensor
MC_WEIGHTINGS = ("log", "count")


def _flat64(images: ImageArray, *, name: str) -> torch.Tensor:
    """Images flattened to ``(N, H*W)`` float64 in [0, 1]."""
    return _unit_images(images, name=name).flatten(1).double()


# ----------------------------------------------------------------- domain classifier


def _domain_network() -> nn.Module:
    """A small CNN for 28x28 images: two stride-2 convolutions and a linear logit."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv2d(8, 16, 5, stride=2, padding=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 1),
    )


def _random_blur(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Box-blur (3x3) a random half of the images of a batch."""
    chosen = (torch.rand(len(batch), generator=generator) < 0.5).to(batch.device)
    blurred = nn.functional.avg_pool2d(batch, 3, stride=1, padding=1,
                                       count_include_pad=False)
    return torch.where(chosen[:, None, None, None], blurred, batch)


class DomainClassifier:
    """A binary image classifier: probability that an image is from the outlier domain.

    Attributes:
        model: The network (outputs one logit per image).
        device: Where the network lives.
        heldout_accuracy: Accuracy on the held-out split of its training data.
        n_train: Images it was trained on.
    """

    def __init__(self, model: nn.Module, *, device: str | torch.device = "cpu",
                 heldout_accuracy: float = float("nan"), n_train: int = 0) -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.heldout_accuracy = float(heldout_accuracy)
        self.n_train = int(n_train)

    @torch.no_grad()
    def predict_proba(self, images: ImageArray, *, batch_size: int = 2048) -> np.ndarray:
        """Probability of the outlier domain (label 1) per image.

        Args:
            images: ``(N, H, W)`` or ``(N, 1, H, W)``, uint8 or floats in [0, 1].
            batch_size: Images per forward pass.

        Returns:
            float64 array ``(N,)``.
        """
        data = _unit_images(images)
        was_training = self.model.training
        self.model.eval()
        try:
            probs = [torch.sigmoid(self.model(data[i:i + batch_size].to(self.device))).cpu()
                     for i in range(0, len(data), batch_size)]
        finally:
            self.model.train(was_training)
        if not probs:
            return np.zeros(0)
        return torch.cat(probs).flatten().double().numpy()

    def accuracy(self, images: ImageArray, labels: np.ndarray) -> float:
        """Share of images whose thresholded prediction (p > 0.5) equals ``labels`` (0/1)."""
        labels = np.asarray(labels).ravel()
        predicted = self.predict_proba(images) > 0.5
        if len(labels) != len(predicted) or len(labels) == 0:
            raise ValueError(f"need one label per image, got {len(labels)} labels for "
                             f"{len(predicted)} images")
        return float(np.mean(predicted == labels.astype(bool)))


def train_domain_classifier(
    in_domain: ImageArray,
    outlier_domain: ImageArray,
    *,
    seed: int = 0,
    epochs: int = 3,
    device: str | torch.device = "cpu",
    heldout_fraction: float = 0.2,
    batch_size: int = 64,
    lr: float = 2e-3,
    blur_augment: bool = True,
) -> DomainClassifier:
    """Train the in-domain (0) vs outlier-domain (1) classifier on real images.

    A small CNN trained with Adam on binary cross-entropy; the classes are weighted
    equally whatever their sizes. A seeded, per-class ``heldout_fraction`` of each set
    is kept out of training and scored: :attr:`DomainClassifier.heldout_accuracy`
    (balanced: the mean of the two per-class accuracies). About 1-2 s for 2 x 5000
    images on one CPU thread; on MNIST vs Fashion-MNIST it reaches about 0.998.

    Args:
        in_domain: Images of the clients' domain (label 0), e.g. MNIST.
        outlier_domain: Images of the outlier domain (label 1), e.g. Fashion-MNIST.
        seed: Seed of the split, the initialisation and the shuffling.
        epochs: Passes over the training split.
        device: Training device.
        heldout_fraction: Share of each set held out, in [0, 1).
        batch_size: Minibatch size.
        lr: Adam learning rate.
        blur_augment: Blur a random half of every batch (3x3 box filter), so that the
            classifier judges the domain, not the sharpness: VAE samples and
            reconstructions are blurry, and a classifier trained on sharp images only
            mistakes more blurry in-domain images for the outlier domain.

    Returns:
        The trained classifier, in eval mode.

    Raises:
        ValueError: If a set is empty or ``heldout_fraction`` is out of range.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    sets = [_unit_images(in_domain, name="in_domain"),
            _unit_images(outlier_domain, name="outlier_domain")]
    if min(len(s) for s in sets) < 2:
        raise ValueError("each domain needs at least 2 images")
    rng = np.random.default_rng(seed)
    train_parts, held_parts = [], []
    for label, data in enumerate(sets):
        order = rng.permutation(len(data))
        n_held = int(round(len(data) * heldout_fraction))
        held_parts.append((data[order[:n_held]], label))
        train_parts.append((data[order[n_held:]], label))
    x = torch.cat([d for d, _ in train_parts])
    y = torch.cat([torch.full((len(d),), float(lab)) for d, lab in train_parts])
    # Equal class weights: each class contributes half of the loss.
    w = torch.cat([torch.full((len(d),), len(x) / (2.0 * len(d))) for d, _ in train_parts])

    with torch.random.fork_rng(devices=[]):  # seeded init, global CPU RNG left alone
        torch.manual_seed(seed)
        model = _domain_network().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)  # the shuffling, then the blur draws

    def loss_fn(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = x[idx].to(device)
        if blur_augment:
            batch = _random_blur(batch, generator)
        logits = model(batch).flatten()
        loss = nn.functional.binary_cross_entropy_with_logits(
            logits, y[idx].to(device), weight=w[idx].to(device))
        return loss, {}

    model.train()
    train_minibatches(optimizer, len(x), loss_fn, epochs=epochs, batch_size=batch_size,
                      generator=generator)
    classifier = DomainClassifier(model, device=device, n_train=len(x))
    per_class = [classifier.accuracy(d, np.full(len(d), lab)) for d, lab in held_parts if len(d)]
    classifier.heldout_accuracy = float(np.mean(per_class)) if per_class else float("nan")
    log.info("domain classifier: held-out balanced accuracy %.4f on %d images",
             classifier.heldout_accuracy, sum(len(d) for d, _ in held_parts))
    return classifier


def outlier_survival(classifier: DomainClassifier, images: ImageArray) -> float:
    """Share of ``images`` the classifier labels outlier domain (p > 0.5).

    Args:
        classifier: From :func:`train_domain_classifier`.
        images: Synthetic samples or reconstructions.

    Returns:
        A share in [0, 1].

    Raises:
        ValueError: If there are no images.
    """
    probs = classifier.predict_proba(images)
    if len(probs) == 0:
        raise ValueError("outlier_survival needs at least one image")
    return float(np.mean(probs > 0.5))


# --------------------------------------------------------------------- distances


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    """All Euclidean distances ``(len(a), len(b))`` in float64, ``a`` taken in chunks.

    ``torch.cdist``'s matrix-product form: exact copies come out at about 1e-7, not 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return torch.cat([torch.cdist(a[i:i + batch_size], b) for i in range(0, len(a), batch_size)])


def _min_distances(a: torch.Tensor, b: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    """For each row of ``a``, the distance to its nearest row of ``b`` (float64).

    The nearest row is found with ``torch.cdist`` (matrix-product form, fast but off by
    up to ~1e-7 near 0); its distance is then recomputed directly, so copies are at 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    nearest = torch.cat([torch.cdist(a[i:i + batch_size], b).argmin(dim=1)
                         for i in range(0, len(a), batch_size)])
    return (a - b[nearest]).norm(dim=1)


def dcr_ratio(
    synthetic: ImageArray,
    outliers: ImageArray,
    heldout: ImageArray,
    *,
    batch_size: int = 1024,
    seed: int = 0,
) -> dict[str, float]:
    """Distance to closest record: training outliers against held-out images.

    For each synthetic sample, the L2 distance (flattened [0, 1] pixels) to its closest
    injected outlier and to its closest held-out image of the outlier domain. The
    larger of the two reference sets is subsampled (seeded) to the size of the smaller,
    so that neither side is favoured by having more records to be close to.

    Args:
        synthetic: Synthetic samples (e.g. from the outlier client's decoder).
        outliers: The injected outliers the client trained on.
        heldout: Images of the outlier domain that no client saw.
        batch_size: Synthetic samples per ``torch.cdist`` chunk.
        seed: Seed of the subsampling.

    Returns:
        ``dcr_outliers``: median min-distance to the training outliers;
        ``dcr_heldout``: the same to the held-out images;
        ``dcr_ratio``: ``dcr_outliers / dcr_heldout`` (about 1: nothing memorised; well
        below 1: samples copy training outliers; NaN if ``dcr_heldout`` is 0);
        ``dcr_closer_share``: share of samples strictly closer to a training outlier
        than to any held-out image (about 0.5 when nothing is memorised).

    Raises:
        ValueError: If a set is empty.

    >>> out = np.zeros((2, 2, 2)); out[1] = 1.0
    >>> held = np.full((2, 2, 2), 0.5)
    >>> r = dcr_ratio(out + 0.05, out, held)
    >>> round(r["dcr_outliers"], 3), round(r["dcr_heldout"], 3), r["dcr_closer_share"]
    (0.1, 0.9, 1.0)
    """
    syn = _flat64(synthetic, name="synthetic")
    refs = [_flat64(outliers, name="outliers"), _flat64(heldout, name="heldout")]
    if min(len(syn), *(len(r) for r in refs)) == 0:
        raise ValueError("dcr_ratio needs non-empty synthetic, outlier and held-out sets")
    n = min(len(r) for r in refs)
    rng = np.random.default_rng(seed)
    refs = [r if len(r) == n else r[torch.from_numpy(np.sort(rng.choice(len(r), n,
                                                                          replace=False)))]
            for r in refs]
    d_out, d_held = (_min_distances(syn, r, batch_size=batch_size) for r in refs)
    med_out, med_held = float(d_out.median()), float(d_held.median())
    return {
        "dcr_outliers": med_out,
        "dcr_heldout": med_held,
        "dcr_ratio": med_out / med_held if med_held > 0 else float("nan"),
        "dcr_closer_share": float((d_out < d_held).double().mean()),
    }


# ----------------------------------------------------------- membership inference


def mc_attack_scores(
    generated: ImageArray,
    candidates: ImageArray,
    *,
    eps: float | None = None,
    quantile: float = 0.01,
    weighting: str = "log",
    batch_size: int = 1024,
) -> np.ndarray:
    """Monte-Carlo membership scores (Hilprecht et al., 2019) from generated samples only.

    With distances ``d_i = ||g_i - x||`` from candidate ``x`` to the ``n`` generated
    samples ``g_i``, only samples in the ``eps``-ball around ``x`` count:

    * ``"count"``: ``(1/n) sum_i 1[d_i <= eps]``, the paper's Monte-Carlo estimate of
      the probability mass the generator puts near ``x``;
    * ``"log"`` (default): ``(1/n) sum_i 1[d_i <= eps] * log(eps / d_i)``, the paper's
      distance-weighted variant (``-log d_i`` inside the ball), shifted by ``log eps`` so
      every term is >= 0 and the score does not depend on the distance unit (the plain
      ``-log d`` goes negative for ``d > 1`` and would then rank a candidate *lower* for
      having more close samples).

    The default is ``"log"`` because it does not need a well-tuned ``eps``: a
    near-copy of ``x`` dominates the sum even when ``eps`` falls in the bulk of the
    distances, as it does with the default quantile and a few thousand samples. The
    paper needs about ``n * quantile`` generated samples per candidate within ``eps``
    for ``"count"`` to rank well.

    ``eps`` defaults to the paper's percentile heuristic: the ``quantile`` of *all*
    generated-to-candidate distances, so that on average a share ``quantile`` of the
    generated samples falls in each ball. Members and non-members must be scored in
    one call so that they share ``eps`` (:func:`membership_auc` does this).

    Higher score = more likely a member. Holds all ``len(candidates) x len(generated)``
    distances in float64 (about 100 MB for 1200 x 10000).

    Args:
        generated: Samples of the generative model.
        candidates: Records to score.
        eps: Ball radius; ``None`` for the percentile heuristic.
        quantile: Percentile of the heuristic, in (0, 1].
        weighting: ``"log"`` or ``"count"``.
        batch_size: Candidates per ``torch.cdist`` chunk.

    Returns:
        float64 scores ``(len(candidates),)``.

    Raises:
        ValueError: On empty inputs, an unknown weighting, ``quantile`` outside (0, 1] or
            ``eps <= 0``.

    >>> gen = np.zeros((4, 1, 2)); gen[1:, 0, 0] = 1.0
    >>> cand = np.array([[[0.0, 0.0]], [[0.0, 1.0]]])
    >>> mc_attack_scores(gen, cand, eps=1.0, weighting="count").tolist()
    [1.0, 0.25]
    """
    if weighting not in MC_WEIGHTINGS:
        raise ValueError(f"weighting {weighting!r} is unknown; use one of {MC_WEIGHTINGS}")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if eps is not None and eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    gen = _flat64(generated, name="generated")
    cand = _flat64(candidates, name="candidates")
    if len(gen) == 0 or len(cand) == 0:
        raise ValueError("mc_attack_scores needs non-empty generated and candidate sets")
    dist = _pairwise_distances(cand, gen, batch_size=batch_size)  # (n_cand, n_gen)
    if eps is None:
        eps = float(np.quantile(dist.float().numpy(), quantile))
        if eps <= 0:  # more than `quantile` of the pairs are exact copies
            eps = float(dist[dist > 0].min()) if (dist > 0).any() else 1.0
    inside = dist <= eps
    if weighting == "count":
        scores = inside.double().mean(dim=1)
    else:
        # log(eps / d) with d = 0 (exact copies) capped at the smallest positive scale.
        tiny = eps * 1e-12
        terms = torch.log(eps / dist.clamp_min(tiny)) * inside
        scores = terms.sum(dim=1) / dist.shape[1]
    return scores.numpy()


def auc(scores_members: np.ndarray, scores_nonmembers: np.ndarray) -> float:
    """ROC AUC of members against non-members: the Mann-Whitney U statistic.

    The probability that a random member scores higher than a random non-member,
    ties counting 1/2 (average ranks).

    Args:
        scores_members: Scores of members (higher = more likely member).
        scores_nonmembers: Scores of non-members.

    Returns:
        The AUC in [0, 1]: 1 separates perfectly, 0.5 is chance.

    Raises:
        ValueError: If a set is empty or a score is NaN.

    >>> auc(np.array([3.0, 4.0]), np.array([1.0, 2.0]))
    1.0
    >>> auc(np.array([1.0, 2.0]), np.array([3.0, 4.0]))
    0.0
    >>> auc(np.array([1.0, 1.0]), np.array([1.0]))
    0.5
    >>> auc(np.array([2.0, 1.0]), np.array([1.0, 0.0]))
    0.875
    """
    pos = np.asarray(scores_members, dtype=np.float64).ravel()
    neg = np.asarray(scores_nonmembers, dtype=np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("auc needs at least one member and one non-member score")
    both = np.concatenate([pos, neg])
    if np.isnan(both).any():
        raise ValueError("auc: scores contain NaN")
    values, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # 1-based rank of each value's first copy
    avg_rank = first_rank + (counts - 1) / 2.0
    rank_sum = avg_rank[inverse[: len(pos)]].sum()
    u = rank_sum - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def membership_auc(
    generated: ImageArray,
    members: ImageArray,
    nonmembers: ImageArray,
    *,
    eps: float | None = None,
    quantile: float = 0.01,
    weighting: str = "log",
    batch_size: int = 1024,
) -> float:
    """AUC of the Monte-Carlo attack: members against non-members, one shared ``eps``.

    Args:
        generated: Samples of the generative model under attack.
        members: Records it was trained on.
        nonmembers: Records of the same distribution it never saw.
        eps, quantile, weighting, batch_size: As for :func:`mc_attack_scores`.

    Returns:
        The AUC: about 0.5 means the attack cannot tell members apart.
    """
    mem = _unit_images(members, name="members")
    non = _unit_images(nonmembers, name="nonmembers")
    if mem.shape[1:] != non.shape[1:]:
        raise ValueError(f"members {tuple(mem.shape[1:])} and non-members "
                         f"{tuple(non.shape[1:])} have different image shapes")
    scores = mc_attack_scores(generated, torch.cat([mem, non]), eps=eps, quantile=quantile,
                              weighting=weighting, batch_size=batch_size)
    return auc(scores[: len(mem)], scores[len(mem):])


# ------------------------------------------------------------------------ report


def privacy_report(
    *,
    synthetic_outlier_client: ImageArray | None = None,
    recon_outliers_client: ImageArray | None = None,
    recon_outliers_global: ImageArray | None = None,
    outliers: ImageArray | None = None,
    heldout_outliers: ImageArray | None = None,
    inlier_members: ImageArray | None = None,
    inlier_nonmembers: ImageArray | None = None,
    synthetic_all: ImageArray | None = None,
    synthetic_control: ImageArray | None = None,
    recon_inliers_global: ImageArray | None = None,
    classifier: DomainClassifier | None = None,
) -> dict[str, float]:
    """All privacy measurements that the given inputs allow, as one flat dict.

    A metric whose inputs are missing (``None``) is omitted, never faked. Keys:

    * ``classifier_accuracy``: the classifier's held-out (balanced) accuracy.
    * ``survival_synthetic``: share of the outlier client's synthetic samples
      classified outlier domain; ``survival_synthetic_all``: the same for the pooled
      synthetic data of all clients (what the server trains on).
    * ``survival_recon_client`` / ``survival_recon_global``: the same for the
      reconstructions of the injected outliers through that client's VAE and through
      the global VAE.
    * ``survival_synthetic_control``: the same share for the synthetic samples of the
      clients that hold no outliers, and ``survival_recon_control`` for in-domain test
      images reconstructed through the global VAE. They are the classifier's false-positive
      rate on generated in-domain images (blurry digits read as outlier domain): outlier
      survival means something only where it exceeds its control.
    * ``dcr_outliers``, ``dcr_heldout``, ``dcr_ratio``, ``dcr_closer_share``:
      :func:`dcr_ratio` of the outlier client's synthetic samples.
    * ``mia_auc_outliers``: :func:`membership_auc` with generated = the outlier
      client's synthetic samples, members = the injected outliers, non-members = the
      held-out outlier-domain images.
    * ``mia_auc_inliers``: the same attack with members = a sample of that client's
      in-domain training images, non-members = in-domain test images.

    Args:
        synthetic_outlier_client: Samples of the outlier client's decoder and prior.
        recon_outliers_client: The outliers reconstructed by that client's VAE.
        recon_outliers_global: The outliers reconstructed by the global VAE.
        outliers: The injected outliers.
        heldout_outliers: Outlier-domain images no client saw.
        inlier_members: In-domain training images of the outlier client.
        inlier_nonmembers: In-domain test images.
        synthetic_all: The pooled synthetic data of all clients.
        synthetic_control: Synthetic samples of the clients without outliers.
        recon_inliers_global: In-domain test images reconstructed by the global VAE.
        classifier: From :func:`train_domain_classifier`.

    Returns:
        ``dict[str, float]`` with the keys whose inputs were given.
    """
    report: dict[str, float] = {}
    if classifier is not None:
        report["classifier_accuracy"] = classifier.heldout_accuracy
        for key, images in (("survival_synthetic", synthetic_outlier_client),
                            ("survival_synthetic_all", synthetic_all),
                            ("survival_recon_client", recon_outliers_client),
                            ("survival_recon_global", recon_outliers_global),
                            ("survival_synthetic_control", synthetic_control),
                            ("survival_recon_control", recon_inliers_global)):
            if images is not None and len(images):
                report[key] = outlier_survival(classifier, images)
    if synthetic_outlier_client is not None:
        if outliers is not None and heldout_outliers is not None:
            report.update(dcr_ratio(synthetic_outlier_client, outliers, heldout_outliers))
            report["mia_auc_outliers"] = membership_auc(
                synthetic_outlier_client, outliers, heldout_outliers)
        if inlier_members is not None and inlier_nonmembers is not None:
            report["mia_auc_inliers"] = membership_auc(
                synthetic_outlier_client, inlier_members, inlier_nonmembers)
    return {k: float(v) for k, v in report.items()}
