"""The outlier MIA's null: its AUC when the "generated" images cannot hold any member.

``mia_auc_outliers`` is the Monte-Carlo attack's AUC of the injected outliers (members)
against held-out outlier-domain images (non-members), scored by their distance to the
outlier client's synthetic samples. If members and non-members differ in distribution
(MNIST's training and test digits come from different writers), the AUC moves away from
0.5 without any memorisation. This script scores the same members and non-members, drawn
as the runtime draws them (``assess``), against images that no model produced: real
in-domain test images and uniform noise. An AUC near a run's is then no membership signal.
Run by hand:

    python experiments/mia_null.py data/partitions/*_c5_o600_oc0_s0.h5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignfl_mpi.assess import MEMBER_SAMPLE, reference_split  # noqa: E402
from alignfl_mpi.privacy_metrics import membership_auc  # noqa: E402
from alignfl_mpi.schema import read_client  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("partitions", nargs="+", help="partition files with outliers")
    parser.add_argument("--client", type=int, default=0, help="the outlier client (0)")
    parser.add_argument("--generated", type=int, default=5000,
                        help="images standing in for the synthetic samples (5000)")
    args = parser.parse_args(argv)
    print("| partition | stand-in for the synthetic samples | AUC |")
    print("| --- | --- | ---: |")
    for path in args.partitions:
        ref = reference_split(path)
        if ref is None:
            print(f"{path}: no outlier domain, skipped", file=sys.stderr)
            continue
        part = read_client(path, args.client)
        outliers = part.images[part.outlier]
        rng = np.random.default_rng(0)  # the draw of assess._setup_privacy
        rng.choice(len(part.images[~part.outlier]),  # its member sample comes first
                   min(MEMBER_SAMPLE, int((~part.outlier).sum())), replace=False)
        heldout = ref.held_out[np.sort(rng.choice(len(ref.held_out),
                                                  min(len(outliers), len(ref.held_out)),
                                                  replace=False))]
        noise = np.random.default_rng(1).random((args.generated, *outliers.shape[1:]))
        for name, generated in (("in-domain test images", ref.held_in[:args.generated]),
                                ("uniform noise", noise.astype(np.float32))):
            value = membership_auc(generated, outliers, heldout)
            print(f"| {Path(path).name} | {name} | {value:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
