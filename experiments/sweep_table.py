"""Print the Markdown table of an ``alignfl-mpi sweep`` output folder (final round of each
setting; unfinished settings are marked with the rounds they have).

    python experiments/sweep_table.py runs/sweep-mnist
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_table import fmt  # noqa: E402  (experiments/, beside this file)

from alignfl_mpi.results import last_reported, load  # noqa: E402

COLUMNS = [("latent_accuracy", "latent acc", 3), ("global_fid_lenet", "FID-LeNet", 0),
           ("global_class_coverage", "class cov.", 1),
           ("survival_synthetic", "survival", 3),
           ("survival_synthetic_control", "survival control", 3),
           ("survival_recon_global", "survival global recon", 3),
           ("mia_auc_outliers", "MIA AUC outliers", 3), ("dcr_ratio", "DCR ratio", 3)]


def _target_epsilon(res) -> float:
    """The configured ε of a run (no DP: infinity), for ordering rows ε by ε, then λ_lip."""
    if res.config_value("client.privacy.mode", "none") == "none":
        return math.inf
    return float(res.config_value("client.privacy.epsilon"))


def main(folder: Path) -> int:
    head = ["setting", "rounds", "ε spent", "λ_lip", *(c[1] for c in COLUMNS),
            "mean round s"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    runs = [(path, load(path)) for path in folder.glob("*/results.h5")]
    runs.sort(key=lambda pr: (_target_epsilon(pr[1]),
                              float(pr[1].config_value("client.lipschitz.weight", 0.0))))
    for path, res in runs:
        row = res.headline()
        spent = res.epsilon_spent()
        cells = [path.parent.name,
                 f"{len(res.rounds)}/{res.config_value('rounds')}"
                 + ("" if res.finished else " (unfinished)"),
                 spent.label, f"{res.config_value('client.lipschitz.weight', 0.0):g}"]
        cells += [fmt(last_reported(res.eval.get(key)), d) for key, _, d in COLUMNS]
        cells.append(fmt(row.get("mean_round_s"), 0))
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
