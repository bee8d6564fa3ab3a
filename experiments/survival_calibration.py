"""Is outlier survival real, or the domain classifier reading blurry digits as outliers?

``survival_synthetic`` is the share of the outlier client's synthetic samples that the
domain classifier (in-domain vs outlier domain, trained on real images) labels outlier
domain. A VAE's samples are blurrier than real images, so part of that share may be
blurry in-domain digits, not outliers. This script measures the classifier's
false-positive rate on images known to hold no outlier, next to the survival itself:

* real in-domain test images (the held-out half the classifier never saw), blurred with
  a Gaussian filter of increasing sigma;
  per digit class as well;
* the synthetic samples of every client's final decoder and prior in each results file:
  the clients without outliers are the control, the outlier client is the measurement;
* a run of the same configuration with ``data.outliers = 0`` (the counterfactual control:
  the outlier client's decoder trained on its digits alone) is scored by the classifier of
  ``--classifier-partition``, the partition with the outliers.

Outlier survival means something only where the outlier client's share exceeds the
controls'. The figure shows the samples labelled outlier domain: look at them. Run by hand
(it reads the partition named in each results file, or ``--classifier-partition``):

    python experiments/survival_calibration.py runs/sweep-mnist/*/results.h5 \\
        --samples 5000 --figure docs/figures/survival_calibration.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.functional import gaussian_blur

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignfl_mpi.arrays import arrays_to_state  # noqa: E402
from alignfl_mpi.assess import reference_classifier, reference_split  # noqa: E402
from alignfl_mpi.evaluation import save_image_grid  # noqa: E402
from alignfl_mpi.models import ModelSpec, build_decoder  # noqa: E402
from alignfl_mpi.prior import GaussianMixturePrior  # noqa: E402
from alignfl_mpi.results import load  # noqa: E402

SIGMAS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
FIGURE_PER_ROW = 16


def blurred_flags(classifier: object, images: np.ndarray,
                  sigmas: tuple[float, ...] = SIGMAS) -> dict[float, np.ndarray]:
    """Per sigma, which of ``images`` (uint8) blurred with it are labelled outlier domain."""
    x = torch.from_numpy(images).float().div(255.0).unsqueeze(1)
    out = {}
    for sigma in sigmas:
        blurred = x if sigma == 0 else gaussian_blur(x, kernel_size=2 * int(3 * sigma) + 1,
                                                    sigma=sigma)
        out[sigma] = classifier.predict_proba(blurred.squeeze(1)) > 0.5
    return out


def print_blur_table(classifier: object, images: np.ndarray, labels: np.ndarray) -> None:
    flags = blurred_flags(classifier, images)
    print("| sigma | " + " | ".join(f"{s:g}" for s in flags) + " |")
    print("| --- |" + " ---: |" * len(flags))
    print("| all classes | " + " | ".join(f"{f.mean():.3f}" for f in flags.values()) + " |")
    for c in np.unique(labels):
        print(f"| class {c} | " + " | ".join(f"{f[labels == c].mean():.3f}"
                                           for f in flags.values()) + " |")


@torch.no_grad()
def client_samples(path: Path, n: int, *, seed: int) -> dict[int, torch.Tensor]:
    """``n`` samples of every client's final decoder and prior, as (n, H, W) in [0, 1]."""
    out = {}
    for cid, d in sorted(load(path).final_decoders().items()):
        spec = ModelSpec.from_dict(d["spec"])
        if spec.n_classes:
            continue  # conditional decoders need labels; not part of this check
        decoder = build_decoder(spec)
        decoder.load_state_dict(arrays_to_state(d["state"]), strict=True)
        prior = GaussianMixturePrior.from_arrays(d["prior"], latent_dim=spec.latent_dim)
        gen = torch.Generator().manual_seed(seed + cid)
        images = decoder.eval()(prior.sample(n, generator=gen))
        out[cid] = images.reshape(n, *images.shape[-2:]).clamp(0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.h5 files")
    parser.add_argument("--samples", type=int, default=5000, help="samples per client")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier-partition", type=Path, default=None,
                        help="partition whose reference split trains the domain classifier "
                             "for every run (default: each run's own partition)")
    parser.add_argument("--figure", type=Path, default=None,
                        help="PNG: samples labelled outlier domain, a row per client "
                             "that has any")
    args = parser.parse_args(argv)
    cpu = torch.device("cpu")
    classifiers: dict[str, object] = {}
    rows, grids, labels = [], [], []
    for path in args.results:
        res = load(path)
        partition = str(args.classifier_partition or res.attrs.get("partition", ""))
        if not Path(partition).is_file():
            print(f"{path}: partition {partition!r} not found; skipped", file=sys.stderr)
            continue
        if partition not in classifiers:
            ref = reference_split(partition)
            if ref is None:
                print(f"{path}: partition {partition} has no outlier domain; pass "
                      "--classifier-partition", file=sys.stderr)
                continue
            classifiers[partition] = reference_classifier(partition, device=cpu)
            clf = classifiers[partition]
            print(f"## {Path(partition).name}: domain classifier held-out balanced accuracy "
                  f"{clf.heldout_accuracy:.4f}")
            print("\nReal in-domain test images (held-out half), Gaussian blur sigma → "
                  "share labelled outlier domain:\n")
            print_blur_table(clf, ref.held_in, ref.held_in_labels)
            print()
        clf = classifiers[partition]
        outlier_client = int(res.attrs.get("outlier_client",
                                           res.config_value("data.outlier_client", 0)))
        samples = client_samples(path, args.samples, seed=args.seed)
        shares = {cid: float(np.mean(clf.predict_proba(x) > 0.5)) for cid, x in samples.items()}
        controls = [v for cid, v in shares.items() if cid != outlier_client]
        rows.append((path.parent.name, shares.get(outlier_client, float("nan")),
                     float(np.mean(controls)) if controls else float("nan"),
                     float(np.max(controls)) if controls else float("nan"), shares))
        if args.figure is not None:
            for cid, x in samples.items():  # a row per client with flagged samples
                flagged = x[torch.from_numpy(clf.predict_proba(x) > 0.5)]
                if not len(flagged):
                    continue
                row = torch.ones(FIGURE_PER_ROW, *x.shape[1:])
                row[:min(len(flagged), FIGURE_PER_ROW)] = flagged[:FIGURE_PER_ROW]
                grids.append(row)
                labels.append(f"{path.parent.name} c{cid} ({len(flagged)}/{len(x)})")
    if rows:
        print(f"Final decoders, {args.samples} samples per client: share labelled outlier "
              "domain (outlier client; mean and max of the other clients):\n")
        print("| run | outlier client | controls (mean) | controls (max) | per client |")
        print("| --- | ---: | ---: | ---: | --- |")
        for name, own, mean, top, shares in rows:
            per = ", ".join(f"{c}: {v:.3f}" for c, v in shares.items())
            print(f"| {name} | {own:.3f} | {mean:.3f} | {top:.3f} | {per} |")
    if args.figure is not None and grids:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        save_image_grid(torch.cat(grids).unsqueeze(1), args.figure, nrow=FIGURE_PER_ROW,
                        labels=labels)
        print(f"\nfigure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
