"""The table, the goals and the figure of an ``experiments/quality.sh`` output folder.

    python experiments/quality_table.py runs/quality --rounds 10 --seeds 0 1 2
    python experiments/quality_table.py runs/quality-full runs/quality-full-pool5x \\
        --labels paper-dim8 samples_per_client=5000 --figure docs/results/quality.png

Each folder holds ``align-fl-s<seed>``, ``fedavg-s<seed>`` and ``central-s<seed>/
centralized-vae`` for every seed, as ``quality.sh`` writes them. For each folder this prints
the per-round table (mean ± sd over the seeds) and the four goals, PASS or FAIL:

1. ALIGN-FL's latent accuracy closes >= 80% of the gap between FedAvg and the centralised
   VAE by round 10, and >= 70% by round 3 (the mean over seeds of
   ``(acc_alignfl(r) - acc_fedavg(r)) / (acc_central - acc_fedavg(r))``);
2. its reconstruction error in the last round is <= 1.6 x the centralised VAE's;
3. in every round and seed, the variance of the test latent means of every dimension is
   >= 5% of the largest (eval attribute ``latent_var_min_ratio``).

With fewer than 10 rounds the last round stands in for round 10 (and says so).

When the folder also holds ``align-fl-cond-s<seed>`` (conditional clients with the server's
synthetic-only classifier, ``CLASSIFIER=1 quality.sh``) and ``classifier-ref-s<seed>/
centralized`` (the centralised LeNet of ``alignfl-mpi reference --what classifiers``) for every
seed, a second table gives the classifier's real-test accuracy per round and the fifth goal:

5. by the last round, the synthetic-only classifier is within 0.04 of the centralised one.
``--figure`` draws latent accuracy, gap closed, reconstruction ratio and the smallest
latent-variance ratio per round, mean ± sd over the seeds, one colour per folder.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignfl_mpi.errors import AlignFLError  # noqa: E402
from alignfl_mpi.results import Results, last_reported, load  # noqa: E402

GOAL_R10, GOAL_R3, GOAL_RECON, GOAL_VAR, GOAL_CLASSIFIER = 0.8, 0.7, 1.6, 0.05, 0.04


class QualityError(Exception):
    """A folder that does not hold what the table needs; the message says what to do."""


@dataclass
class Quality:
    """Per-round arrays of shape (seeds, rounds); the centralised VAE's are (seeds,)."""

    folder: Path
    seeds: list[str]
    acc_alignfl: np.ndarray
    acc_fedavg: np.ndarray
    acc_central: np.ndarray
    f1_central: np.ndarray
    recon_alignfl: np.ndarray
    recon_fedavg: np.ndarray
    recon_central: np.ndarray
    var_alignfl: np.ndarray
    var_fedavg: np.ndarray
    var_central: np.ndarray
    bounds_from: tuple[Path, ...] = ()  # the FedAvg and centralised runs, resolved

    @property
    def rounds(self) -> int:
        return self.acc_alignfl.shape[1]

    @property
    def goal_round(self) -> int:
        """The round of the first goal: 10, or the last round of a scaled-down run."""
        return min(10, self.rounds)

    @property
    def closure(self) -> np.ndarray:
        """Gap closed per seed and round (see the module docstring)."""
        return ((self.acc_alignfl - self.acc_fedavg)
                / (self.acc_central[:, None] - self.acc_fedavg))

    @property
    def recon_ratio(self) -> np.ndarray:
        return self.recon_alignfl / self.recon_central[:, None]


def _load(path: Path) -> Results:
    if not path.is_file():
        raise QualityError(f"{path} is missing: run experiments/quality.sh with this OUT and "
                           "these SEEDS first")
    try:
        return load(path)
    except AlignFLError as e:  # not HDF5, or not a results file
        raise QualityError(f"{e}; rerun that run (delete its folder first)") from None


def _per_round(res: Results, key: str, rounds: int, path: Path) -> np.ndarray:
    values = res.eval.get(key)
    if values is None or len(values) < rounds:
        have = 0 if values is None else len(values)
        raise QualityError(f"{path} has {have} rounds of {key!r}, not {rounds}: let the run "
                           "finish (quality.sh resumes it) or pass --rounds")
    return np.asarray(values[:rounds], dtype=float)


def _last(res: Results, key: str, path: Path) -> float:
    """The last recorded ``key`` of a reference run (its last epoch)."""
    value = last_reported(res.eval.get(key))
    if value is None:
        raise QualityError(f"{path} has no {key!r}: rerun that reference (delete its folder "
                           "first)")
    return float(value)


def collect(folder: Path, seeds: list[str], rounds: int) -> Quality:
    """Read the runs of ``folder`` for ``seeds``; raise QualityError if any is missing."""
    if not seeds:
        raise QualityError("no seeds given: pass --seeds")
    keys = ("latent_accuracy", "recon_error", "latent_var_min_ratio")
    fed: dict[str, list[list[np.ndarray]]] = {"align-fl": [], "fedavg": []}
    central: list[list[float]] = []
    for s in seeds:
        for name, rows in fed.items():
            path = folder / f"{name}-s{s}" / "results.h5"
            res = _load(path)
            rows.append([_per_round(res, k, rounds, path) for k in keys])
        path = folder / f"central-s{s}" / "centralized-vae" / "results.h5"
        res = _load(path)
        central.append([_last(res, k, path) for k in (*keys, "latent_f1")])
    a = np.array(fed["align-fl"])  # (seeds, keys, rounds)
    f = np.array(fed["fedavg"])
    c = np.array(central)          # (seeds, keys + f1)
    bounds = tuple((folder / f"{name}-s{s}").resolve() for s in seeds
                   for name in ("fedavg", "central"))
    return Quality(folder=folder, seeds=list(seeds), bounds_from=bounds,
                   acc_alignfl=a[:, 0], acc_fedavg=f[:, 0], acc_central=c[:, 0],
                   f1_central=c[:, 3], recon_alignfl=a[:, 1], recon_fedavg=f[:, 1],
                   recon_central=c[:, 1], var_alignfl=a[:, 2], var_fedavg=f[:, 2],
                   var_central=c[:, 2])


@dataclass
class Classifier:
    """The synthetic-only classifier's real-test accuracy (seeds, rounds), the global VAE's
    latent accuracy in the same runs, and the centralised LeNet's last epoch (seeds,)."""

    seeds: list[str]
    synthetic: np.ndarray
    latent: np.ndarray
    central: np.ndarray

    @property
    def shortfall(self) -> np.ndarray:
        """Centralised minus synthetic-only accuracy, per seed and round."""
        return self.central[:, None] - self.synthetic


def collect_classifier(folder: Path, seeds: list[str], rounds: int) -> Classifier | None:
    """The classifier runs of ``folder``, or None when it has none for any seed; raise
    QualityError when only some seeds have them."""
    runs = [folder / f"align-fl-cond-s{s}" / "results.h5" for s in seeds]
    refs = [folder / f"classifier-ref-s{s}" / "centralized" / "results.h5" for s in seeds]
    if not any(p.exists() for p in runs + refs):
        return None
    synthetic, latent, central = [], [], []
    for run, ref in zip(runs, refs):
        res = _load(run)
        synthetic.append(_per_round(res, "task_accuracy", rounds, run))
        latent.append(_per_round(res, "latent_accuracy", rounds, run))
        central.append(_last(_load(ref), "task_accuracy", ref))
    return Classifier(seeds=list(seeds), synthetic=np.array(synthetic),
                      latent=np.array(latent), central=np.array(central))


def ms(values: np.ndarray | list[float]) -> str:
    """Mean ± sample sd, or the value alone for one seed.

    >>> ms([0.5, 0.7]), ms([0.25])
    ('0.6000 ± 0.1414', '0.2500')
    """
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v[0]:.4f}"


@dataclass
class Goal:
    text: str
    value: str
    met: bool

    def line(self) -> str:
        return f"- {self.text}: {self.value} -> {'PASS' if self.met else 'FAIL'}"


def goals(q: Quality) -> list[Goal]:
    """The goals, each with its measured value (means over seeds)."""
    last, r10 = q.rounds, q.goal_round
    scaled = "" if last >= 10 else f" (scaled down: round {last} stands in for round 10)"
    out = [Goal(f"gap closed by round {r10} >= {GOAL_R10:.0%}{scaled}",
                f"{q.closure[:, r10 - 1].mean():.1%}",
                bool(q.closure[:, r10 - 1].mean() >= GOAL_R10))]
    if last >= 3:
        out.append(Goal(f"gap closed by round 3 >= {GOAL_R3:.0%}",
                        f"{q.closure[:, 2].mean():.1%}", bool(q.closure[:, 2].mean() >= GOAL_R3)))
    ratio = float(q.recon_ratio[:, -1].mean())
    out.append(Goal(f"recon error <= {GOAL_RECON} x centralised", f"{ratio:.2f} x",
                    ratio <= GOAL_RECON))
    worst = float(q.var_alignfl.min())
    out.append(Goal(f"no latent dim below {GOAL_VAR:.0%} of the largest variance, any round "
                    "and seed", f"worst {worst:.3f}", worst >= GOAL_VAR))
    return out


def classifier_goal(c: Classifier) -> Goal:
    gap = float(c.shortfall[:, -1].mean())
    return Goal(f"synthetic-only classifier within {GOAL_CLASSIFIER} of the centralised one "
                f"by round {c.synthetic.shape[1]}",
                f"{gap:.3f} below ({ms(c.synthetic[:, -1])} against {ms(c.central)})",
                gap <= GOAL_CLASSIFIER)


def classifier_markdown(c: Classifier) -> str:
    """Per round: the classifier's accuracy, its shortfall and the global VAE's latent
    accuracy (mean ± sd over seeds); then the centralised LeNet and the goal."""
    lines = [f"synthetic-only classifier (conditional clients), seeds {', '.join(c.seeds)}; "
             "mean ± sd over seeds", "",
             "| round | classifier acc (real test) | below centralised | global VAE latent acc |",
             "| --- | --- | --- | --- |"]
    for r in range(c.synthetic.shape[1]):
        lines.append(f"| {r + 1} | {ms(c.synthetic[:, r])} | {ms(c.shortfall[:, r])} | "
                     f"{ms(c.latent[:, r])} |")
    lines += ["", f"centralised LeNet (last epoch): {ms(c.central)}", "",
              classifier_goal(c).line()]
    return "\n".join(lines)


def per_seed_markdown(q: Quality) -> str:
    """One row per seed: the goals' measures, and the round of the worst latent dimension."""
    r10 = q.goal_round
    lines = [f"| seed | gap closed by round 3 | by round {r10} | recon / centralised | "
             "worst min/max latent var (round) |", "| --- | --- | --- | --- | --- |"]
    for i, seed in enumerate(q.seeds):
        r3 = f"{q.closure[i, 2]:.1%}" if q.rounds >= 3 else "—"
        worst = int(np.argmin(q.var_alignfl[i]))
        lines.append(f"| {seed} | {r3} | {q.closure[i, r10 - 1]:.1%} | "
                     f"{q.recon_ratio[i, -1]:.2f} | {q.var_alignfl[i, worst]:.3f} "
                     f"({worst + 1}) |")
    return "\n".join(lines)


def markdown(q: Quality) -> str:
    """The table, the two bounds' lines and the goals, as quality.sh prints them."""
    lines = [f"seeds {', '.join(q.seeds)}; {q.rounds} rounds; mean ± sd over seeds", "",
             "| round | ALIGN-FL latent acc | FedAvg latent acc | centralised VAE | gap closed | "
             "ALIGN-FL recon | recon / centralised | min/max latent var (ALIGN-FL) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    closure, ratio = q.closure, q.recon_ratio
    for r in range(q.rounds):
        lines.append(f"| {r + 1} | {ms(q.acc_alignfl[:, r])} | {ms(q.acc_fedavg[:, r])} | "
                     f"{ms(q.acc_central)} | {ms(closure[:, r])} | {ms(q.recon_alignfl[:, r])} | "
                     f"{ms(ratio[:, r])} | {ms(q.var_alignfl[:, r])} |")
    lines += ["",
              f"centralised VAE (last epoch): latent acc {ms(q.acc_central)}, F1 "
              f"{ms(q.f1_central)}, recon {ms(q.recon_central)}, min/max latent var "
              f"{ms(q.var_central)}",
              f"FedAvg (last round): latent acc {ms(q.acc_fedavg[:, -1])}, recon "
              f"{ms(q.recon_fedavg[:, -1])}, min/max latent var {ms(q.var_fedavg[:, -1])}", ""]
    lines += [g.line() for g in goals(q)]
    if len(q.seeds) > 1:
        lines += ["", "per seed:", "", per_seed_markdown(q)]
    return "\n".join(lines)


def figure(qualities: list[Quality], labels: list[str], path: Path) -> Path:
    """Four panels per round, one colour per folder: latent accuracy (with FedAvg dashed and
    the centralised VAE dotted, drawn once when folders share those runs), gap closed, recon /
    centralised, and the smallest latent-variance ratio. Lines are the mean over seeds (the
    worst seed for the variance ratio, as its goal is), bands the range over seeds; goals are
    grey lines."""
    from alignfl_mpi.report import _figure, _integer_rounds, _save

    fig, axes = _figure(4, ncols=4, panel=(4.0, 3.2))
    acc, gap, rec, var = axes

    def band(ax, rounds, values, color, label, style="-", line=np.mean):
        ax.plot(rounds, line(values, axis=0), style, color=color, marker="o", ms=3, label=label)
        if len(values) > 1:
            ax.fill_between(rounds, values.min(axis=0), values.max(axis=0), color=color,
                            alpha=0.15, lw=0)

    drawn: set[tuple[Path, ...]] = set()
    for i, (q, label) in enumerate(zip(qualities, labels)):
        color = f"C{i % 10}"
        rounds = np.arange(1, q.rounds + 1)
        band(acc, rounds, q.acc_alignfl, color, f"ALIGN-FL, {label}")
        if q.bounds_from not in drawn:
            drawn.add(q.bounds_from)
            band(acc, rounds, q.acc_fedavg, color, f"FedAvg, {label}", "--")
            acc.axhline(q.acc_central.mean(), color=color, ls=":", lw=1,
                        label=f"centralised VAE, {label}")
        band(gap, rounds, q.closure, color, label)
        band(rec, rounds, q.recon_ratio, color, label)
        band(var, rounds, q.var_alignfl, color, label, line=np.min)
    gap.axhline(GOAL_R10, color="grey", lw=1, ls="--")
    gap.axhline(GOAL_R3, color="grey", lw=1, ls=":")
    gap.axvline(3, color="grey", lw=0.5)
    gap.axvline(10, color="grey", lw=0.5)
    rec.axhline(GOAL_RECON, color="grey", lw=1, ls="--")
    var.axhline(GOAL_VAR, color="grey", lw=1, ls="--")
    var.set_yscale("log")
    for ax, title in ((acc, "latent accuracy (test)"),
                      (gap, "gap closed (goals: 70% by r3, 80% by r10)"),
                      (rec, "recon error / centralised (goal <= 1.6)"),
                      (var, "smallest / largest latent var, worst seed (goal >= 0.05)")):
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        _integer_rounds(ax)
    acc.legend(fontsize=6)
    if len(qualities) > 1:
        gap.legend(fontsize=7)
    return _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="quality.sh output folders (OUT)")
    p.add_argument("--rounds", type=int, default=10, help="rounds of every run (default 10)")
    p.add_argument("--seeds", nargs="+", default=["0", "1", "2"], help="default 0 1 2")
    p.add_argument("--labels", nargs="+", help="one per folder, for the figure (default: "
                   "the folder names)")
    p.add_argument("--figure", type=Path, help="write the four-panel PNG here")
    args = p.parse_args(argv)
    labels = args.labels or [f.name for f in args.folders]
    if len(labels) != len(args.folders):
        print(f"quality_table: {len(labels)} labels for {len(args.folders)} folders; give one "
              "per folder", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print("quality_table: --rounds must be at least 1", file=sys.stderr)
        return 2
    try:
        qualities = [collect(f, args.seeds, args.rounds) for f in args.folders]
        classifiers = [collect_classifier(f, args.seeds, args.rounds) for f in args.folders]
    except QualityError as e:
        print(f"quality_table: {e}", file=sys.stderr)
        return 2
    for q, c, label in zip(qualities, classifiers, labels):
        if len(qualities) > 1:
            print(f"## {label} ({q.folder})\n")
        print(markdown(q) + "\n")
        if c is not None:
            print(classifier_markdown(c) + "\n")
    if args.figure:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        print(f"figure: {figure(qualities, labels, args.figure)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
