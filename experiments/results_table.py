"""Print the Markdown comparison table of an ``experiments/compare.sh`` output folder.

    python experiments/results_table.py runs/compare/mnist
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignfl_mpi.results import load  # noqa: E402

RUNS = ["align-fl", "align-fl-cond", "align-fl-dp10", "align-fl-lip1", "fedavg", "fedprox",
        "fedadam", "moon", "reference/centralized-vae", "reference/centralized",
        "reference/fedavg-classifier"]
COLUMNS = [("latent_accuracy", "latent acc", 3), ("latent_f1", "latent F1", 3),
           ("recon_error", "recon", 1),
           ("global_fid_lenet", "FID-LeNet global", 0), ("pool_fid_lenet", "FID-LeNet pool", 0),
           ("global_class_coverage", "class cov. global", 1),
           ("pool_class_coverage", "class cov. pool", 1), ("pool_coverage", "coverage pool", 2),
           ("task_accuracy", "classifier acc", 3), ("survival_synthetic", "survival synth.", 3),
           ("survival_recon_global", "survival global recon", 3), ("dcr_ratio", "DCR ratio", 3),
           ("mia_auc_outliers", "MIA AUC outliers", 3), ("mia_auc_inliers", "MIA AUC inliers", 3)]


def fmt(value: float, digits: int) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def main(folder: Path) -> None:
    head = ["run", *(c[1] for c in COLUMNS), "ε (client 0)", "rounds s"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for name in RUNS:
        path = folder / name / "results.h5"
        if not path.exists():
            continue
        res = load(path)
        row = [name]
        for key, _, digits in COLUMNS:
            row.append(fmt(float(res.eval[key][-1]), digits) if key in res.eval else "—")
        eps = res.clients.get(0, {}).get("epsilon")
        row.append(fmt(float(eps[-1]), 2) if eps is not None else "∞")
        wall = res.timings.get("round")
        row.append(f"{float(wall.sum()):.0f}" if wall is not None and len(wall) else "—")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
