"""Reports of runs: summary tables, per-round CSVs, figures and a Markdown page.

Works on finished, crashed and partial runs. Every part that a results file cannot
supply (no rounds, no ``/final`` group, no partition file, a missing metric) is
skipped with a note in ``report.md``, never an exception. Launch::

    alignfl-mpi report runs/alignfl/results.h5 --out report
    alignfl-mpi report runs/eps1 runs/eps8 runs/nodp --out report/eps   # side by side

In a notebook, :func:`alignfl_mpi.results.load` stays the entry point; the two table
helpers give rows that ``pandas.DataFrame`` takes as they are::

    runs = [load(p) for p in paths]
    pd.DataFrame(runs_table(runs))            # one row per run, final values
    pd.DataFrame(per_round_table(runs[0]))    # one row per round

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot), so this
works without a display and importing it never changes a notebook's plotting backend.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import AlignFLError, SchemaError
from .evaluation import encode_latents, save_image_grid
from .models import ModelSpec, build_decoder, build_vae
from .prior import GaussianMixturePrior
from .results import RESULTS_NAME, Results, load
from .schema import OUTLIER_TEST, TEST, read_partition_info, read_split

__all__ = ["per_round_table", "run_names", "run_report", "runs_table"]

log = logging.getLogger(__name__)

#: Eval metrics drawn first, in this order; other eval keys follow alphabetically, and
#: ``LAST_METRICS`` (constant per run, not about the models) come last.
PREFERRED_METRICS = ("latent_accuracy", "latent_f1", "recon_error", "fid_lenet",
                     "class_coverage", "synthetic_classifier_accuracy", "survival_synthetic",
                     "survival_recon_global", "mia_auc_outliers", "mia_auc_inliers", "dcr_ratio")
LAST_METRICS = ("classifier_accuracy",)
MAX_METRIC_PANELS = 9
#: Phases of a round stacked in ``timings.png`` (``collect`` and ``round`` are totals).
TIMING_PHASES = ("client_training", "communication", "sampling", "server_training",
                 "evaluation", "io")
#: Columns of :func:`runs_table` that describe the run rather than its results.
RUN_COLUMNS = ("run", "status", "rounds_completed", "rounds", "strategy", "privacy_mode",
               "epsilon", "lipschitz_weight", "local_epochs", "mean_round_s")
#: Client metrics whose last reported value goes into the summary, per client.
CLIENT_FINAL_METRICS = ("epsilon", "lip_empirical")
#: Free-text client attributes left out of the per-round table.
CLIENT_TEXT_KEYS = ("error", "traceback")
SAMPLES_PER_ROW = 10
GLOBAL_SAMPLE_ROWS = 2
SAMPLE_SEED = 0
OUTLIER_POINTS = 300
PRIVACY_PANELS = ("survival_synthetic", "mia_auc_outliers")


class _Skip(Exception):
    """A figure that this run (or set of runs) cannot supply; the message is the note."""


@dataclass(frozen=True)
class _Run:
    name: str
    results: Results


# ------------------------------------------------------------------------- tables


def run_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Short, unique, file-name-safe names of runs.

    A file named ``results.h5`` is named after its folder, any other file after its
    stem; repeated names get ``-2``, ``-3``, ... in order.

    >>> run_names(["runs/eps1/results.h5", "other/eps1/results.h5", "copies/nodp.h5"])
    ['eps1', 'eps1-2', 'nodp']
    """
    names: list[str] = []
    for p in map(Path, paths):
        base = p.parent.name if p.name == RESULTS_NAME else p.stem
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", base or p.stem).strip("_") or "run"
        name, i = base, 1
        while name in names:
            i += 1
            name = f"{base}-{i}"
        names.append(name)
    return names


def _config(config: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _epsilon(config: dict[str, Any]) -> float | None:
    """The run's ε: ``inf`` without DP (mode ``none`` or no privacy section)."""
    if _config(config, "client.privacy.mode", "none") == "none":
        return math.inf
    eps = _config(config, "client.privacy.epsilon")
    return None if eps is None else float(eps)


def _lip_weight(config: dict[str, Any]) -> float:
    return float(_config(config, "client.lipschitz.weight", 0.0))


def _value(x: Any) -> Any:
    """A table cell: Python scalars, None for missing (NaN or absent)."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, str) and x == "":
        return None
    return x


def _last(values: np.ndarray | None, *, finite: bool = False) -> Any:
    """The last entry, or (``finite``) the last non-missing entry; None when none."""
    if values is None or len(values) == 0:
        return None
    if not finite:
        return _value(values[-1])
    for v in values[::-1]:
        if _value(v) is not None:
            return _value(v)
    return None


def _mean(values: np.ndarray | None) -> float | None:
    values = _numeric(values)
    return None if values is None else float(np.nanmean(values))


def _metric_order(keys: set[str]) -> list[str]:
    """``PREFERRED_METRICS`` first, then the rest alphabetically, ``LAST_METRICS`` last.

    >>> _metric_order({"classifier_accuracy", "mia_auc_outliers", "zzz", "latent_f1", "dcr"})
    ['latent_f1', 'mia_auc_outliers', 'dcr', 'zzz', 'classifier_accuracy']
    """
    special = PREFERRED_METRICS + LAST_METRICS
    return ([k for k in PREFERRED_METRICS if k in keys]
            + sorted(k for k in keys if k not in special)
            + [k for k in LAST_METRICS if k in keys])


def _numeric(values: np.ndarray | None) -> np.ndarray | None:
    """A per-round column as floats, or None when absent, text or all missing."""
    if values is None or values.dtype == object or not np.isfinite(values).any():
        return None
    return values.astype(float)


def _eval_keys(results_list: Sequence[Results]) -> list[str]:
    keys = {k for r in results_list for k, v in r.eval.items() if _numeric(v) is not None}
    return _metric_order(keys)


def runs_table(results_list: Sequence[Results], *,
               names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per run: status, key config values and final values.

    Columns: ``run``, ``path``, ``status``, ``rounds_completed``, ``rounds``
    (configured), ``strategy`` (``align-fl`` unless the config names one),
    ``privacy_mode``, ``epsilon`` (``inf`` when ``privacy_mode`` is ``none``),
    ``lipschitz_weight``, ``local_epochs``, ``mean_round_s`` (wall time), every eval
    metric at the last round, and ``client_<k>.epsilon`` / ``client_<k>.lip_empirical``: each
    client's last reported value. Missing values are None.

    Args:
        results_list: Loaded runs (:func:`alignfl_mpi.results.load`).
        names: Run names; default :func:`run_names` of their paths.

    Returns:
        A list of dicts with the same keys, ready for ``pandas.DataFrame``.
    """
    names = list(names) if names is not None else run_names([r.path for r in results_list])
    metrics = _eval_keys(results_list)
    client_keys = sorted({(cid, m) for r in results_list for cid, cols in r.clients.items()
                          for m in CLIENT_FINAL_METRICS if m in cols})
    rows = []
    for name, res in zip(names, results_list):
        cfg = res.config
        row: dict[str, Any] = {
            "run": name, "path": str(res.path), "status": res.attrs.get("status"),
            "rounds_completed": int(res.attrs.get("rounds_completed", len(res.rounds))),
            "rounds": _config(cfg, "rounds"),
            "strategy": _config(cfg, "strategy", "align-fl"),
            "privacy_mode": _config(cfg, "client.privacy.mode", "none"),
            "epsilon": _epsilon(cfg),
            "lipschitz_weight": _lip_weight(cfg),
            "local_epochs": _config(cfg, "client.local_epochs"),
            "mean_round_s": _mean(res.timings.get("round")),
        }
        for m in metrics:
            row[m] = _last(res.eval.get(m))
        for cid, m in client_keys:
            row[f"client_{cid}.{m}"] = _last(res.clients.get(cid, {}).get(m), finite=True)
        rows.append(row)
    return rows


def per_round_table(results: Results) -> list[dict[str, Any]]:
    """One row per round: every server, eval, timing and client value of that round.

    Columns: ``round``, ``server.<key>``, ``eval.<key>``, ``timings.<key>``,
    ``client_<k>.status`` and ``client_<k>.<metric>`` (free-text ``error`` and
    ``traceback`` are left out; read them from ``results.clients``). Missing values
    are None.

    Args:
        results: A loaded run.

    Returns:
        A list of dicts with the same keys, ready for ``pandas.DataFrame``.
    """
    columns: dict[str, np.ndarray] = {}
    for prefix, table in (("server", results.server), ("eval", results.eval),
                          ("timings", results.timings)):
        for key, values in table.items():
            columns[f"{prefix}.{key}"] = values
    for cid in sorted(results.clients):
        cols = results.clients[cid]
        for key in (["status"] if "status" in cols else []) + sorted(cols):
            if key not in CLIENT_TEXT_KEYS and f"client_{cid}.{key}" not in columns:
                columns[f"client_{cid}.{key}"] = cols[key]
    return [{"round": r, **{k: _value(v[i]) for k, v in columns.items()}}
            for i, r in enumerate(results.rounds)]


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "inf" if v == math.inf else repr(v)
    return str(v)


def _write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(row.get(c)) for c in columns])
    return path


def _md_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "∞" if v == math.inf else f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _summary_markdown(rows: list[dict[str, Any]]) -> str:
    """:func:`runs_table` as three narrower tables, each one row per run."""
    columns = list(rows[0])
    clients = [c for c in columns if c.startswith("client_")]
    metrics = [c for c in columns if c not in RUN_COLUMNS and c not in clients and c != "path"]
    parts = []
    for title, cols in (("Runs", [c for c in RUN_COLUMNS if c != "run"]),
                        ("Final eval metrics (last round)", metrics),
                        ("Clients (last reported value)", clients)):
        if cols:
            parts += [f"### {title}", "", _md_table(rows, ["run", *cols]), ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------ figures


def _figure(n_panels: int, *, ncols: int, panel: tuple[float, float] = (4.0, 3.0)) -> Any:
    """A constrained-layout Figure (no pyplot) and its flat list of ``n_panels`` axes."""
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _integer_rounds(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def _curves(runs: Sequence[_Run], path: Path, notes: list[str]) -> Path:
    """``curves.png``: one panel per eval metric plus the server loss, a line per run."""
    metrics = _eval_keys([r.results for r in runs])
    if len(metrics) > MAX_METRIC_PANELS:
        notes.append(f"curves.png shows {MAX_METRIC_PANELS} of {len(metrics)} eval metrics; "
                     f"left out: {', '.join(metrics[MAX_METRIC_PANELS:])} (see rounds_*.csv)")
        metrics = metrics[:MAX_METRIC_PANELS]
    panels = [("eval", m) for m in metrics]
    if any(_numeric(r.results.server.get("loss")) is not None for r in runs):
        panels.append(("server", "loss"))
    if not panels:
        raise _Skip("curves.png skipped: no run has a completed round with metrics")
    fig, axes = _figure(len(panels), ncols=4 if len(panels) > 6 else 3)
    for ax, (table, key) in zip(axes, panels):
        for run in runs:
            values = _numeric(getattr(run.results, table).get(key))
            if values is not None:
                ax.plot(run.results.rounds, values, marker="o", ms=3, label=run.name)
        ax.set_title(key if table == "eval" else "server loss")
        ax.grid(alpha=0.3)
        _integer_rounds(ax)
    if len(runs) > 1:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(runs), 6))
    return _save(fig, path)


def _timings(runs: Sequence[_Run], path: Path) -> Path:
    """``timings.png``: stacked seconds per phase and round, one panel per run."""
    shown = [r for r in runs if any(_numeric(r.results.timings.get(p)) is not None
                                    for p in TIMING_PHASES)]
    if not shown:
        raise _Skip("timings.png skipped: no run has a completed round with timings")
    fig, axes = _figure(len(shown), ncols=3, panel=(5.0, 3.5))
    colors = dict(zip(TIMING_PHASES, [f"C{i}" for i in range(len(TIMING_PHASES))]))
    for ax, run in zip(axes, shown):
        rounds = np.asarray(run.results.rounds)
        bottom = np.zeros(len(rounds))
        for phase in TIMING_PHASES:
            secs = _numeric(run.results.timings.get(phase))
            if secs is None:
                continue
            secs = np.nan_to_num(secs)
            ax.bar(rounds, secs, bottom=bottom, color=colors[phase], label=phase)
            bottom += secs
        ax.set_title(run.name)
        ax.set_ylabel("seconds")
        _integer_rounds(ax)
    top = max(ax.get_ylim()[1] for ax in axes)
    for ax in axes:  # one scale, so that runs compare side by side
        ax.set_ylim(0, top)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="outside right upper")  # top phase first
    return _save(fig, path)


def _load_vae(spec: dict[str, Any], state: dict[str, np.ndarray]) -> torch.nn.Module:
    vae = build_vae(ModelSpec.from_dict(spec))
    vae.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()},
                        strict=True)
    return vae.eval()


@torch.no_grad()
def _samples(run: _Run, path: Path, notes: list[str]) -> Path:
    """``samples_<run>.png``: a row per client decoder (its prior), then the global VAE."""
    final = run.results.final_global()
    if final is None:
        raise _Skip(f"samples_{run.name}.png skipped: {run.name} has no /final group "
                    "(the run did not finish), so there are no final models")
    rows, labels = [], []
    for cid, d in sorted(run.results.final_decoders().items()):
        try:
            spec = ModelSpec.from_dict(d["spec"])
            decoder = build_decoder(spec)
            decoder.load_state_dict({k: torch.from_numpy(np.asarray(v))
                                     for k, v in d["state"].items()}, strict=True)
            prior = GaussianMixturePrior.from_arrays(d["prior"], latent_dim=spec.latent_dim)
        except (AlignFLError, RuntimeError, KeyError) as exc:
            notes.append(f"samples_{run.name}.png: client {cid}'s decoder left out ({exc})")
            continue
        gen = torch.Generator().manual_seed(SAMPLE_SEED + 1 + cid)
        rows.append(decoder.eval()(prior.sample(SAMPLES_PER_ROW, generator=gen)))
        labels.append(f"client {cid}")
    spec, state = final
    try:
        vae = _load_vae(spec, state)
    except (AlignFLError, RuntimeError) as exc:
        notes.append(f"samples_{run.name}.png: the global VAE left out ({exc})")
    else:
        gen = torch.Generator().manual_seed(SAMPLE_SEED)
        n = SAMPLES_PER_ROW * GLOBAL_SAMPLE_ROWS
        rows.append(vae.decode(torch.randn(n, vae.spec.latent_dim, generator=gen)))
        labels += ["global"] * GLOBAL_SAMPLE_ROWS
    if not rows:
        raise _Skip(f"samples_{run.name}.png skipped: no model of {run.name} could be rebuilt")
    images = torch.cat([r.reshape(len(r), 1, *r.shape[-2:]) for r in rows])
    return save_image_grid(images, path, nrow=SAMPLES_PER_ROW, labels=labels)


def _synthetic(run: _Run, path: Path) -> Path:
    """``synthetic_<run>.png``: the last round's stored pool, a row per client."""
    stored = run.results.synthetic(run.results.rounds[-1]) if run.results.rounds else None
    if stored is None:
        raise _Skip(f"synthetic_{run.name}.png skipped: no synthetic images stored in the "
                    "last round (output.save_synthetic was off)")
    images, clients = stored
    rows, labels = [], []
    for cid in np.unique(clients):
        row = images[clients == cid][:SAMPLES_PER_ROW]
        blank = np.full((SAMPLES_PER_ROW - len(row), *images.shape[1:]), 255, np.uint8)
        rows.append(np.concatenate([row, blank]))
        labels.append(f"client {int(cid)}")
    return save_image_grid(np.concatenate(rows), path, nrow=SAMPLES_PER_ROW, labels=labels)


def _pca_2d(z: np.ndarray, *others: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Project ``z`` and ``others`` on the first two principal axes of ``z``.

    Returns the projections and the explained-variance share of the two axes.

    >>> z = np.array([[0.0, 0, 0], [2, 0, 0], [0, 1, 0], [2, 1, 0]])
    >>> (pz,), share = _pca_2d(z)
    >>> np.round(np.abs(pz[:, 0]), 3).tolist(), np.round(share, 2).tolist()
    ([1.0, 1.0, 1.0, 1.0], [0.8, 0.2])
    """
    centre = z.mean(axis=0)
    _, s, vt = np.linalg.svd(z - centre, full_matrices=False)
    share = s**2 / max(float((s**2).sum()), 1e-12)
    return [(a - centre) @ vt[:2].T for a in (z, *others)], share[:2]


@torch.no_grad()
def _latent(run: _Run, partition: Path | None, path: Path) -> Path:
    """``latent_<run>.png``: the test set's latent means by class, outliers as crosses."""
    final = run.results.final_global()
    if final is None:
        raise _Skip(f"latent_{run.name}.png skipped: {run.name} has no /final group, so "
                    "there is no final global VAE")
    if partition is None:
        stored = run.results.attrs.get("partition")
        raise _Skip(f"latent_{run.name}.png skipped: the partition file "
                    f"{stored or '(none stored)'} is not available; pass --partition FILE")
    try:
        images, labels = read_split(partition, TEST)
        outliers = read_split(partition, OUTLIER_TEST)[0][:OUTLIER_POINTS]
        outlier_name = read_partition_info(partition).attrs.get("outlier_dataset") or "outlier"
    except SchemaError as exc:
        raise _Skip(f"latent_{run.name}.png skipped: {exc}") from None
    if len(images) == 0:
        raise _Skip(f"latent_{run.name}.png skipped: {partition} has an empty /test set")
    try:
        vae = _load_vae(*final)
    except (AlignFLError, RuntimeError) as exc:
        raise _Skip(f"latent_{run.name}.png skipped: the global VAE cannot be rebuilt "
                    f"({exc})") from None
    z = encode_latents(vae, images)
    zo = encode_latents(vae, outliers) if len(outliers) else np.zeros((0, z.shape[1]), z.dtype)
    dim = z.shape[1]
    title = f"{run.name}: test-set latent means"
    xlabel, ylabel = "z1", "z2"
    if dim > 2:
        (z, zo), share = _pca_2d(z, zo)
        title += f" (PCA of {dim}-D latents)"
        xlabel, ylabel = (f"PC{i + 1} ({100 * s:.0f}% var.)" for i, s in enumerate(share))
    elif dim == 1:
        jitter = np.random.default_rng(0).uniform(-0.3, 0.3, len(z) + len(zo))
        z = np.column_stack([z[:, 0], labels + jitter[:len(z)]])
        zo = np.column_stack([zo[:, 0], np.full(len(zo), 10.0) + jitter[len(z):]])
        ylabel = "class (10: outliers)"
    fig, (ax,) = _figure(1, ncols=1, panel=(7.0, 6.0))
    for cls in np.unique(labels):
        pts = z[labels == cls]
        ax.scatter(pts[:, 0], pts[:, 1], s=3, alpha=0.5, color=f"C{int(cls) % 10}",
                   label=str(int(cls)), rasterized=True)
    if len(zo):
        ax.scatter(zo[:, 0], zo[:, 1], s=18, marker="x", color="black", linewidths=0.8,
                   label=f"{outlier_name} (held out)")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), markerscale=3, title="class")
    return _save(fig, path)


def _privacy_utility(runs: Sequence[_Run], path: Path) -> Path:
    """``privacy_utility.png``: final metrics against ε and/or λ_lip, lines by the other."""
    eps = [_epsilon(r.results.config) for r in runs]
    lam = [_lip_weight(r.results.config) for r in runs]
    axes_params = [p for p, v in (("epsilon", eps), ("lipschitz_weight", lam))
                   if len(set(v)) > 1]
    if not axes_params:
        raise _Skip("privacy_utility.png skipped: the runs do not differ in ε "
                    "(client.privacy.epsilon) or λ_lip (client.lipschitz.weight)")
    final = {m: [_last(r.results.eval.get(m)) for r in runs]
             for m in ("latent_accuracy", *PRIVACY_PANELS)}
    metrics = [m for m, v in final.items() if any(x is not None for x in v)]
    if not metrics:
        raise _Skip("privacy_utility.png skipped: no run has a final latent_accuracy, "
                    "survival_synthetic or mia_auc_outliers")
    fig, axes = _figure(len(axes_params) * len(metrics), ncols=len(metrics))
    for row, param in enumerate(axes_params):
        xs, groups = (eps, lam) if param == "epsilon" else (lam, eps)
        group_label = "λ_lip" if param == "epsilon" else "ε"
        for col, metric in enumerate(metrics):
            ax = axes[row * len(metrics) + col]
            _privacy_panel(ax, xs, groups, final[metric], group_label=group_label,
                           epsilon_axis=param == "epsilon")
            ax.set_xlabel("ε (∞: no DP)" if param == "epsilon" else "λ_lip")
            ax.set_ylabel(f"final {metric}")
            ax.grid(alpha=0.3)
    return _save(fig, path)


def _privacy_panel(ax: Any, xs: list[float | None], groups: list[float | None],
                   ys: list[float | None], *, group_label: str, epsilon_axis: bool) -> None:
    """Points and mean lines of ``ys`` against ``xs``, one line per group value.

    On the ε axis (log scale) ∞ sits a decade right of the largest finite ε; a λ_lip
    axis whose positive values span two decades or more is symlog.
    """
    from matplotlib.ticker import NullLocator

    finite = [x for x in xs if x is not None and math.isfinite(x) and x > 0]
    inf_at = max(finite) * 10 if finite else 1.0
    pos = {x: (inf_at if x == math.inf else x) for x in xs if x is not None}
    for i, g in enumerate(sorted({g for g in groups if g is not None})):
        pts = [(pos[x], y) for x, gg, y in zip(xs, groups, ys)
               if gg == g and x is not None and y is not None]
        if not pts:
            continue
        px = sorted({p for p, _ in pts})
        means = [np.mean([y for p, y in pts if p == x]) for x in px]
        label = f"{group_label} = {'∞' if g == math.inf else f'{g:g}'}"
        ax.plot(px, means, marker="o", color=f"C{i}", label=label)
        ax.scatter(*zip(*pts), s=12, color=f"C{i}", alpha=0.5)
    ticks = sorted(set(pos.values()))
    if epsilon_axis:
        ax.set_xscale("log")
    elif finite and max(finite) / min(finite) >= 100:
        ax.set_xscale("symlog", linthresh=min(finite))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(ticks, ["∞" if t == inf_at and math.inf in pos else f"{t:g}"
                          for t in ticks])
    ax.legend(fontsize="small")


# ------------------------------------------------------------------------- report


def _resolve(path: Path) -> Path:
    """A run folder stands for its ``results.h5``."""
    return path / RESULTS_NAME if path.is_dir() and (path / RESULTS_NAME).is_file() else path


def _partition_for(res: Results, partition: Path | None) -> Path | None:
    if partition is not None:
        return partition
    stored = res.attrs.get("partition")
    return Path(stored) if stored and Path(stored).is_file() else None


def run_report(paths: Sequence[Path], *, out: Path,
               partition: Path | None = None) -> list[Path]:
    """Write tables, figures and ``report.md`` for one or more runs into ``out``.

    Writes ``summary.md``, ``summary.csv``, ``rounds_<run>.csv`` per run,
    ``curves.png``, ``timings.png``, per run ``samples_<run>.png``,
    ``synthetic_<run>.png`` and ``latent_<run>.png``, ``privacy_utility.png`` for
    several runs that differ in ε or λ_lip, and ``report.md`` embedding them. A part
    the inputs cannot supply is skipped with a note in ``report.md``.

    Args:
        paths: Results files, or run folders holding ``results.h5``.
        out: Output folder, created if missing; existing report files are replaced.
        partition: Partition file for the latent plots; default: the one stored in
            each results file, when that file exists.

    Returns:
        The files written, ``report.md`` last.

    Raises:
        SchemaError: A path is missing or not a results file, or ``partition`` is
            given and is not a partition file.
    """
    if not paths:
        raise ValueError("run_report needs at least one results file")
    paths = [_resolve(Path(p)) for p in paths]
    loaded = [load(p) for p in paths]
    if partition is not None:
        read_partition_info(partition)
    runs = [_Run(n, r) for n, r in zip(run_names(paths), loaded)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    notes: list[str] = []
    figures: list[tuple[str, Path]] = []

    def figure(caption: str, make: Callable[..., Path], *args: Any) -> None:
        try:
            figures.append((caption, make(*args)))
            written.append(figures[-1][1])
        except _Skip as skip:
            notes.append(str(skip))

    rows = runs_table(loaded, names=[r.name for r in runs])
    columns = list(rows[0])
    written.append(_write_csv(rows, out / "summary.csv", columns))
    summary = _summary_markdown(rows)
    (out / "summary.md").write_text("# Summary\n\n" + summary, encoding="utf-8")
    written.append(out / "summary.md")
    for run in runs:
        table = per_round_table(run.results)
        cols = list(dict.fromkeys(k for row in table for k in row)) or ["round"]
        written.append(_write_csv(table, out / f"rounds_{run.name}.csv", cols))
        if not run.results.rounds:
            notes.append(f"{run.name} has no completed round")

    figure("Metrics per round", _curves, runs, out / "curves.png", notes)
    figure("Seconds per round and phase", _timings, runs, out / "timings.png")
    for run in runs:
        part = _partition_for(run.results, partition)
        figure(f"{run.name}: samples of the final client decoders (from their priors) and "
               "of the global VAE (from N(0, I))", _samples, run,
               out / f"samples_{run.name}.png", notes)
        figure(f"{run.name}: stored synthetic images of the last round", _synthetic, run,
               out / f"synthetic_{run.name}.png")
        figure(f"{run.name}: latent means of the real test set under the final global VAE",
               _latent, run, part, out / f"latent_{run.name}.png")
    if len(runs) > 1:
        figure("Final utility and privacy against ε and λ_lip", _privacy_utility, runs,
               out / "privacy_utility.png")
    for note in notes:
        log.info("report: %s", note)
    written.append(_write_markdown(out / "report.md", runs=runs, summary=summary,
                                   figures=figures, notes=notes))
    return written


def _write_markdown(path: Path, *, runs: Sequence[_Run], summary: str,
                    figures: list[tuple[str, Path]], notes: list[str]) -> Path:
    lines = ["# ALIGN-FL report", ""]
    for r in runs:
        n = len(r.results.rounds)
        state = "finished" if r.results.finished else "not finished (running or crashed)"
        lines.append(f"- **{r.name}**: `{r.results.path}`, {state}, "
                     f"{n} round{'' if n == 1 else 's'}")
    if notes:
        lines += ["", "## Notes (skipped parts)", "", *[f"- {n}" for n in notes]]
    lines += ["", "## Summary", "", "The same values are in [summary.csv](summary.csv); "
              "every round of a run is in `rounds_<run>.csv`.", "", summary, "## Figures", ""]
    for caption, fig in figures:
        lines += [f"### {caption}", "", f"![{caption}]({fig.name})", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
