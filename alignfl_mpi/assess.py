"""Per-round evaluation on rank 0: utility, Lipschitz constants, privacy, and pictures.

Against the partition file's real data (the experimenter's view; nothing here feeds back
into training):

* latent logistic-regression accuracy and weighted F1 of the global VAE (stratified
  80/20 split of the test latents, seed 42, as the paper's code does), and its
  reconstruction error;
* every stored client decoder's empirical Lipschitz constant (largest Jacobian spectral
  norm over latents drawn from its prior) and the layer-product upper bound;
* privacy, overall and for the injected outliers: outlier survival (domain classifier),
  distance to closest record, and the Monte-Carlo membership-inference AUC;
* generative quality in the feature space of a locally trained LeNet: FID-LeNet,
  precision/recall, density/coverage and class coverage, of the global VAE's samples
  (``global_*``) and of the synthetic pool the server trained on (``pool_*``);
* PNG grids: samples of the global VAE and of every stored client decoder.

The public reference data is split once: the first half of ``/test`` and of
``/outlier_test`` trains the in-domain vs outlier-domain classifier; the second halves
are held out (non-members for the attacks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .arrays import images_to_tensor
from .config import RunConfig
from .datasets import DATASETS, data_root
from .evaluation import evaluate_vae, save_image_grid
from .lipschitz import lipschitz_report
from .metrics import feature_net_path, load_or_train_feature_net, quality_report
from .models import VAE
from .privacy_metrics import outlier_survival, privacy_report, train_domain_classifier
from .schema import OUTLIER_LABEL, OUTLIER_TEST, TEST, read_client, read_partition_info, read_split
from .seeds import Role, derive_seed

log = logging.getLogger(__name__)

GRID_PER_ROW = 10
LIPSCHITZ_POINTS = 256
QUALITY_POINTS = 2000      # per set, for the k-NN quality metrics and FID-LeNet
CLASSIFIER_IMAGES = 5000   # per domain, from the first halves of the reference splits
MEMBER_SAMPLE = 1000       # in-domain members / non-members for the inlier attack


@dataclass(frozen=True)
class Reference:
    """Public reference images, split into classifier-training and held-out halves."""

    train_in: np.ndarray
    train_out: np.ndarray
    held_in: np.ndarray
    held_in_labels: np.ndarray
    held_out: np.ndarray


def reference_split(partition: str | Path) -> Reference | None:
    """Halve ``/test`` and ``/outlier_test``; None when the partition has no outlier domain."""
    test, test_labels = read_split(partition, TEST)
    other, _ = read_split(partition, OUTLIER_TEST)
    if len(other) < 2:
        return None
    hi, ho = len(test) // 2, len(other) // 2
    return Reference(train_in=test[:hi], train_out=other[:ho], held_in=test[hi:],
                     held_in_labels=test_labels[hi:], held_out=other[ho:])


def reference_classifier(partition: str | Path, *, device: torch.device) -> Any:
    """The domain classifier (in-domain 0 vs outlier domain 1), trained on public data.

    Deterministic (seed 0), so the server and the outlier client train the same one.
    """

    ref = reference_split(partition)
    if ref is None:
        return None
    return train_domain_classifier(ref.train_in[:CLASSIFIER_IMAGES],
                                   ref.train_out[:CLASSIFIER_IMAGES], seed=0, device=device)


@torch.no_grad()
def reconstruct(vae: VAE, images: np.ndarray, *, device: torch.device,
                labels: np.ndarray | None = None) -> np.ndarray:
    """Deterministic reconstructions decode(mu(x)) as float32 (N, 28, 28) in [0, 1]
    (``labels`` for a conditional VAE)."""
    was_training = vae.training
    vae.eval()
    x = images_to_tensor(images).to(device)
    y = None if labels is None else torch.from_numpy(labels).to(device)
    out = []
    for i in range(0, len(x), 1024):
        yi = None if y is None else y[i:i + 1024]
        out.append(vae.decode(vae.encode(x[i:i + 1024], yi)[0], yi)
                   .reshape(-1, *images.shape[1:]).cpu())
    vae.train(was_training)
    return torch.cat(out).numpy()


def client_outlier_survival(vae: VAE, outliers: np.ndarray, classifier: Any, *,
                            device: torch.device) -> float:
    """Share of a client's outliers whose reconstruction through its own VAE is still
    classified as outlier domain (computed on the client; only the number leaves)."""

    labels = (np.full(len(outliers), OUTLIER_LABEL, np.int64)
              if getattr(vae, "spec", None) is not None and vae.spec.n_classes else None)
    return float(outlier_survival(classifier, reconstruct(vae, outliers, device=device,
                                                          labels=labels)))


@dataclass
class RoundEvaluator:
    """Evaluates the server state after each round."""

    cfg: RunConfig
    partition: Path
    test_images: np.ndarray
    test_labels: np.ndarray
    device: torch.device
    png_dir: Path | None = None
    privacy: dict[str, Any] = field(default_factory=dict)
    feature_net: Any = None
    # client id -> (the stored decoder entry measured, its Lipschitz values)
    _lipschitz_cache: dict[int, tuple[Any, dict[str, float]]] = field(
        default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        attrs = read_partition_info(self.partition).attrs
        if self.cfg.server.quality_metrics:
            self.feature_net = self._feature_net(str(attrs["dataset"]))
            pick = np.random.default_rng(1).choice(len(self.test_images),
                                                   min(QUALITY_POINTS, len(self.test_images)),
                                                   replace=False)
            self.quality_real = (self.test_images[np.sort(pick)], self.test_labels[np.sort(pick)])
            if self.feature_net is not None:  # the real set is fixed: its features once
                self.quality_real_outputs = self.feature_net.outputs(self.quality_real[0])
        self._setup_privacy(attrs)

    def _feature_net(self, dataset: str) -> Any:

        root = data_root(self.cfg.data.data_root or None)
        if dataset not in DATASETS or not (root / dataset).is_dir():
            log.warning("quality metrics skipped: dataset %r is not in the data root %s",
                        dataset, root)
            return None
        if not feature_net_path(dataset, root=root, seed=0, epochs=2).exists():
            log.info("training the FID-LeNet feature network on %s (once; cached under %s)",
                     dataset, root / "feature_nets")
        net = load_or_train_feature_net(dataset, root=root, device=self.device)
        log.info("FID-LeNet feature network: test accuracy %.4f, sha256 %s",
                 net.test_accuracy, (net.sha256 or "?")[:12])
        return net

    def attrs(self) -> dict[str, Any]:
        """Root attributes describing the evaluation (feature network hash and accuracy)."""
        if self.feature_net is None:
            return {}
        return {"feature_net_sha256": self.feature_net.sha256,
                "feature_net_test_accuracy": float(self.feature_net.test_accuracy)}

    def _setup_privacy(self, attrs: dict[str, Any]) -> None:
        ref = reference_split(self.partition) if int(attrs["n_outliers"]) > 0 else None
        if ref is None:
            return
        k = int(attrs["outlier_client"])
        part = read_client(self.partition, k)
        outliers = part.images[part.outlier]
        rng = np.random.default_rng(0)
        inliers = part.images[~part.outlier]
        members = inliers[np.sort(rng.choice(len(inliers), min(MEMBER_SAMPLE, len(inliers)),
                                             replace=False))]
        classes = np.unique(part.labels[~part.outlier])
        same = ref.held_in[np.isin(ref.held_in_labels, classes)]
        heldout = ref.held_out[np.sort(rng.choice(len(ref.held_out),
                                                  min(len(outliers), len(ref.held_out)),
                                                  replace=False))]
        # The controls' in-domain images: every class, none seen by the classifier.
        control = ref.held_in[np.sort(rng.choice(len(ref.held_in),
                                                 min(MEMBER_SAMPLE, len(ref.held_in)),
                                                 replace=False))]
        classifier = reference_classifier(self.partition, device=self.device)
        self.privacy = {"client": k, "outliers": outliers, "heldout": heldout,
                        "members": members, "nonmembers": same[:MEMBER_SAMPLE],
                        "control": control, "classifier": classifier}
        log.info("privacy measurements on client %d: %d outliers, domain classifier held-out "
                 "accuracy %.3f", k, len(outliers), classifier.heldout_accuracy)

    def evaluate(self, state: Any, *, round_: int,
                 pool: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
        """``(round metrics, per-client metrics)`` as flat dicts of floats; writes PNGs."""
        metrics = {k: float(v) for k, v in evaluate_vae(
            state.vae, self.test_images, self.test_labels, device=self.device,
            seed=42).items()}
        per_client = self.lipschitz(state, round_=round_)
        if self.privacy and pool is not None:
            metrics.update(self.privacy_metrics(state, pool))
        if self.feature_net is not None:
            metrics.update(self.quality(state, round_=round_, pool=pool))
        if self.png_dir is not None:
            self.write_grids(state, round_=round_)
        return metrics, per_client

    @torch.no_grad()
    def task_accuracy(self, classifier: torch.nn.Module) -> float:
        """Accuracy of a digit classifier on the real test set."""
        was_training = classifier.training
        classifier.eval()
        x = images_to_tensor(self.test_images)
        pred = torch.cat([classifier(x[i:i + 2048].to(self.device)).argmax(1).cpu()
                          for i in range(0, len(x), 2048)])
        classifier.train(was_training)
        return float((pred.numpy() == self.test_labels).mean())

    def lipschitz(self, state: Any, *, round_: int) -> dict[int, dict[str, float]]:
        """Empirical and upper-bound Lipschitz constants of every stored decoder.

        Each decoder is measured once, in the round it arrives (at latent points seeded
        by that round and client); while it stays stored, later rounds repeat its values,
        so the cost per round grows with the updates received, not with the number of
        stored decoders.
        """
        out = {}
        for cid in sorted(state.registry):
            entry = state.registry[cid]
            cached = self._lipschitz_cache.get(cid)
            if cached is not None and cached[0] is entry:
                out[cid] = dict(cached[1])
                continue
            gen = torch.Generator().manual_seed(
                derive_seed(self.cfg.seed, Role.EVAL_LIPSCHITZ, round_, cid))
            z = entry.prior.sample(LIPSCHITZ_POINTS, generator=gen).to(self.device)
            if entry.class_weights is not None:  # conditional: over the whole input (z, label)
                y = torch.multinomial(torch.from_numpy(entry.class_weights), LIPSCHITZ_POINTS,
                                      replacement=True, generator=gen)
                onehot = torch.nn.functional.one_hot(y, entry.spec.n_classes).float()
                z = torch.cat([z, onehot.to(self.device)], dim=1)
            out[cid] = lipschitz_report(entry.decoder, z)
            self._lipschitz_cache[cid] = (entry, dict(out[cid]))
        return out

    def privacy_metrics(self, state: Any, pool: tuple[torch.Tensor, torch.Tensor]
                        ) -> dict[str, float]:
        """Outlier survival, distance to closest record and MIA AUCs (see module doc)."""

        p = self.privacy
        images, labels = pool
        if p["client"] not in state.registry or not len(images):
            return {}
        synthetic = images[labels == p["client"]].squeeze(1).cpu().numpy()
        control = images[labels != p["client"]].squeeze(1).cpu().numpy()
        report = privacy_report(
            synthetic_outlier_client=synthetic,
            recon_outliers_global=reconstruct(state.vae, p["outliers"], device=self.device),
            outliers=p["outliers"], heldout_outliers=p["heldout"],
            inlier_members=p["members"], inlier_nonmembers=p["nonmembers"],
            synthetic_all=images.squeeze(1).cpu().numpy(), synthetic_control=control,
            recon_inliers_global=reconstruct(state.vae, p["control"], device=self.device),
            classifier=p["classifier"])
        return {k: float(v) for k, v in report.items()}

    @torch.no_grad()
    def quality(self, state: Any, *, round_: int,
                pool: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, float]:
        """FID-LeNet and friends of the global VAE's samples and of the synthetic pool."""

        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, Role.EVAL_QUALITY, round_))
        was_training = state.vae.training
        state.vae.eval()
        z = torch.randn(QUALITY_POINTS, state.spec.latent_dim, generator=gen).to(self.device)
        samples = state.vae.decode(z).reshape(-1, *state.spec.image_shape[1:]).cpu().numpy()
        state.vae.train(was_training)
        out = {}
        sets = [("global", samples)]
        if pool is not None and len(pool[0]):
            sets.append(("pool", pool[0].squeeze(1).cpu().numpy()))
        for name, fake in sets:
            report = quality_report(self.feature_net, *self.quality_real, fake,
                                    seed=round_, max_points=QUALITY_POINTS,
                                    real_outputs=self.quality_real_outputs)
            out.update({f"{name}_{k}": float(v) for k, v in report.items()
                        if k not in ("n_real", "real_accuracy")})
        return out

    @torch.no_grad()
    def write_grids(self, state: Any, *, round_: int) -> list[Path]:
        """``global_rNNNN.png`` (global VAE from N(0, I)) and ``clients_rNNNN.png``
        (one row per stored client decoder, sampled from its prior)."""
        assert self.png_dir is not None
        seed = derive_seed(self.cfg.seed, Role.EVAL_GRIDS, round_)
        gen = torch.Generator().manual_seed(seed)
        was_training = state.vae.training
        state.vae.eval()
        z = torch.randn(GRID_PER_ROW * 5, state.spec.latent_dim, generator=gen).to(self.device)
        global_imgs = state.vae.decode(z).reshape(-1, *state.spec.image_shape).cpu()
        state.vae.train(was_training)
        paths = [save_image_grid(global_imgs, self.png_dir / f"global_r{round_ + 1:04d}.png",
                                 nrow=GRID_PER_ROW)]
        if state.registry:
            rows, labels = [], []
            for cid in sorted(state.registry):
                rows.append(state.sample_client(cid, GRID_PER_ROW, seed=seed + cid).cpu())
                labels.append(f"client {cid}")
            paths.append(save_image_grid(torch.cat(rows),
                                         self.png_dir / f"clients_r{round_ + 1:04d}.png",
                                         nrow=GRID_PER_ROW, labels=labels))
        return paths
