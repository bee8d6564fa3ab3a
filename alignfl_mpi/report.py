"""Reports of runs: a headline table, grouped detail tables, figures, Markdown and HTML.

Works on finished, crashed, partial and running runs. Every part that a results file
cannot supply (no rounds, no ``/final`` group, no partition file, a missing metric) is
skipped with a note in the report, never an exception. Rounds are numbered from 1, as in
the log and the results file. Launch::

    alignfl-mpi report runs/alignfl/results.h5 --out report
    alignfl-mpi report runs/eps1 runs/eps8 runs/nodp --out report/eps   # side by side
    alignfl-mpi report runs/a-s0 runs/a-s1 runs/b-s0 runs/b-s1 --baseline runs/a-s0

With ``--baseline``, runs whose configs differ only in ``seed`` form one group, and every
group is compared with the baseline's group (means, differences, and ± over seeds).

In a notebook, :func:`alignfl_mpi.results.load` stays the entry point; the table helpers
give rows that ``pandas.DataFrame`` takes as they are::

    runs = [load(p) for p in paths]
    pd.DataFrame(headline_table(runs))        # one row per run, the numbers that matter
    pd.DataFrame(runs_table(runs))            # one row per run, every final value
    runs[0].to_pandas()                       # one row per round

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot), so this
works without a display and importing it never changes a notebook's plotting backend.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .arrays import arrays_to_state
from .errors import AlignFLError, ConfigError, SchemaError
from .evaluation import encode_latents, save_image_grid
from .models import MODEL_REGISTRY, VAE, ModelSpec, build_vae, decoder_from_state
from .prior import GaussianMixturePrior
from .results import RESULTS_NAME, EpsilonSpent, Results, last_reported, load
from .schema import OUTLIER_TEST, TEST, read_partition_info, read_split
from .strategies import DEFAULT_STRATEGY, STRATEGIES

__all__ = ["comparison_table", "headline_table", "per_round_table", "run_names", "run_report",
           "runs_table", "seed_groups"]

log = logging.getLogger(__name__)

#: Eval metrics drawn first, in this order; other eval keys follow alphabetically, and
#: ``LAST_METRICS`` (constant per run, not about the models) come last.
PREFERRED_METRICS = ("latent_accuracy", "latent_f1", "recon_error", "task_accuracy",
                     "global_fid_lenet", "fid_lenet", "global_class_coverage", "class_coverage",
                     "survival_synthetic", "survival_recon_global", "mia_auc_outliers",
                     "mia_auc_inliers", "dcr_ratio")
LAST_METRICS = ("classifier_accuracy",)
#: Eval keys left out of the figures and the Markdown tables (they stay in the CSVs).
DETAIL_ONLY = re.compile(r"(^|_)(class_share_\d+|n_fake)$")
MAX_METRIC_PANELS = 9
#: Phases of a round stacked in ``timings.png`` (``collect`` and ``round`` are totals).
TIMING_PHASES = ("client_training", "communication", "sampling", "server_training",
                 "evaluation", "io")
#: Columns of :func:`runs_table` that describe the run rather than its results.
RUN_COLUMNS = ("run", "status", "rounds_completed", "rounds", "strategy", "privacy_mode",
               "epsilon_spent", "dp_accounted", "lipschitz_weight", "local_epochs", "seed",
               "mean_round_s")
#: Client metrics whose last reported value goes into the summary, per client.
CLIENT_FINAL_METRICS = ("epsilon", "lip_empirical")
#: Headline columns: (key of :func:`headline_table`, title).
HEADLINE_COLUMNS = (("run", "run"), ("strategy", "strategy"), ("privacy_mode", "privacy"),
                    ("epsilon_spent", "ε spent"), ("rounds", "rounds"),
                    ("latent_accuracy", "latent acc"), ("fid_lenet", "FID-LeNet"),
                    ("class_coverage", "class coverage"),
                    ("outlier_survival", "outlier survival"), ("mia_auc", "MIA AUC"),
                    ("mean_round_s", "round s"))
#: Metrics of the comparison view: (headline key, title, higher is better).
COMPARED = (("latent_accuracy", "latent acc", True), ("fid_lenet", "FID-LeNet", False),
            ("class_coverage", "class coverage", True),
            ("outlier_survival", "outlier survival", False), ("mia_auc", "MIA AUC", False),
            ("epsilon_spent", "ε spent", False), ("mean_round_s", "round s", False))
#: Detail tables of final (last-round) values: (title, [(table, key, column title)]).
UTILITY = (("eval", "latent_accuracy", "latent acc"), ("eval", "latent_f1", "latent F1"),
           ("eval", "recon_error", "recon error"), ("eval", "task_accuracy", "task acc"),
           ("server", "loss", "server loss"))
QUALITY = (("fid_lenet", "FID-LeNet"), ("precision", "precision"), ("recall", "recall"),
           ("density", "density"), ("coverage", "coverage"),
           ("class_coverage", "class coverage"), ("fake_classifier_entropy", "entropy"))
PRIVACY = (("eval", "survival_synthetic", "survival synthetic"),
           ("eval", "survival_synthetic_control", "survival control"),
           ("eval", "survival_recon_global", "survival global recon"),
           ("eval", "survival_recon_control", "global recon control"),
           ("clients", "survival_recon_client", "survival client recon"),
           ("eval", "dcr_ratio", "DCR ratio"), ("eval", "mia_auc_outliers", "MIA AUC outliers"),
           ("eval", "mia_auc_inliers", "MIA AUC inliers"),
           ("eval", "classifier_accuracy", "domain classifier acc"))
TIMINGS = (*TIMING_PHASES, "round")
SAMPLES_PER_ROW = 10
GLOBAL_SAMPLE_ROWS = 2
SAMPLE_SEED = 0
OUTLIER_POINTS = 300
PRIVACY_PANELS = ("survival_synthetic", "mia_auc_outliers")
#: Panels of ``privacy_utility.png`` drawn with their control (dashed): the same share for
#: the clients without outliers, the domain classifier's false-positive rate.
PANEL_CONTROLS = {"survival_synthetic": "survival_synthetic_control"}
#: Config keys that do not make two runs different settings (besides ``seed``).
NOT_A_SETTING = ("seed", "output", "data.data_root")


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


def _lip_weight(res: Results) -> float:
    return float(res.config_value("client.lipschitz.weight", 0.0) or 0.0)


def _value(x: Any) -> Any:
    """A table cell: Python scalars, None for missing (NaN or absent)."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, str) and x == "":
        return None
    return x


def _last(values: np.ndarray | None) -> Any:
    """The last round's entry (None when missing)."""
    return None if values is None or len(values) == 0 else _value(values[-1])


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


def _epsilon_value(spent: EpsilonSpent) -> float | None:
    """ε spent as a number: ∞ without DP, None when not accounted or not recorded."""
    return spent.value if spent.accounted else None


def headline_table(results_list: Sequence[Results], *,
                   names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per run with the numbers a reader looks for first.

    Columns: ``run``, ``status``, ``strategy``, ``privacy_mode``, ``epsilon_spent`` (the
    recorded ε: the largest of the clients' last reported ``epsilon``; ``inf`` without DP;
    None when not recorded or not accounted), ``dp_accounted``, ``rounds_completed``,
    ``rounds`` (configured), ``latent_accuracy``, ``fid_lenet`` and ``class_coverage``
    (of the global VAE's samples), ``outlier_survival`` (``survival_synthetic``),
    ``mia_auc`` (``mia_auc_outliers``), ``mean_round_s``. Metrics are last-round values.

    >>> headline_table([])
    []
    """
    names = list(names) if names is not None else run_names([r.path for r in results_list])
    rows = []
    for name, res in zip(names, results_list):
        head = res.headline()
        spent: EpsilonSpent = head.pop("epsilon_spent")
        rows.append({"run": name, "status": head.pop("status"), "strategy": head.pop("strategy"),
                     "privacy_mode": head.pop("privacy_mode"),
                     "epsilon_spent": _epsilon_value(spent),
                     "dp_accounted": spent.accounted if spent.dp else None, **head})
    return rows


def runs_table(results_list: Sequence[Results], *,
               names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per run: status, key config values and every final value.

    Columns: ``run``, ``path``, ``status``, ``rounds_completed``, ``rounds``
    (configured), ``strategy`` (``align-fl`` unless the config names one),
    ``privacy_mode``, ``epsilon_spent`` (recorded, as in :func:`headline_table`),
    ``dp_accounted``, ``lipschitz_weight``, ``local_epochs``, ``seed``, ``mean_round_s``
    (wall time), every eval metric at the last round, and ``client_<k>.epsilon`` /
    ``client_<k>.lip_empirical``: each client's last reported value. Missing values are
    None.

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
    for name, res, head in zip(names, results_list, headline_table(results_list, names=names)):
        row: dict[str, Any] = {
            "run": name, "path": str(res.path), "status": head["status"],
            "rounds_completed": head["rounds_completed"], "rounds": head["rounds"],
            "strategy": head["strategy"], "privacy_mode": head["privacy_mode"],
            "epsilon_spent": head["epsilon_spent"], "dp_accounted": head["dp_accounted"],
            "lipschitz_weight": _lip_weight(res),
            "local_epochs": res.config_value("client.local_epochs"),
            "seed": res.config_value("seed"), "mean_round_s": head["mean_round_s"],
        }
        for m in metrics:
            row[m] = _last(res.eval.get(m))
        for cid, m in client_keys:
            row[f"client_{cid}.{m}"] = last_reported(res.clients.get(cid, {}).get(m))
        rows.append(row)
    return rows


def per_round_table(results: Results) -> list[dict[str, Any]]:
    """One row per round (numbered from 1): :meth:`Results.per_round_rows`.

    Columns: ``round``, ``server.<key>``, ``eval.<key>``, ``timings.<key>``,
    ``client_<k>.status`` and ``client_<k>.<metric>`` (free-text ``error`` and
    ``traceback`` are left out; read them from ``results.clients``). Missing values
    are None.
    """
    return results.per_round_rows()


def _setting(res: Results) -> str:
    """The run's config without the keys that do not make a different setting."""
    config = json.loads(json.dumps(res.config))
    for dotted in NOT_A_SETTING:
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return json.dumps(config, sort_keys=True)


def seed_groups(results_list: Sequence[Results]) -> list[list[int]]:
    """Indices of runs grouped by setting: runs whose configs differ only in ``seed``
    (and the output folder and data root) share a group; groups in order of first run."""
    groups: dict[str, list[int]] = {}
    for i, res in enumerate(results_list):
        groups.setdefault(_setting(res), []).append(i)
    return list(groups.values())


def _mean_sd(values: list[float]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (None for one value) and count of the finite values.

    >>> _mean_sd([1.0, 3.0, None])
    (2.0, 1.4142135623730951, 2)
    """
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        inf = [v for v in values if v is not None and math.isinf(v)]
        return (inf[0], None, len(inf)) if inf else (None, None, 0)
    sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return float(np.mean(vals)), sd, len(vals)


def comparison_table(results_list: Sequence[Results], *, baseline: int,
                     names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Each seed group against the baseline run's group.

    One row per group (:func:`seed_groups`), the baseline's first: ``group`` (its run
    names), ``seeds``, ``n``, and for every compared metric ``<m>`` (the
    :data:`COMPARED` keys): ``<m>.mean``, ``<m>.sd`` (over seeds; None for one run),
    ``<m>.delta`` (mean minus the baseline group's mean) and ``<m>.delta_se`` (standard
    error of that difference, sqrt(sd²/n + sd_b²/n_b); None unless a group has several
    seeds).

    Args:
        results_list: Loaded runs.
        baseline: Index of the baseline run in ``results_list``.
        names: Run names; default :func:`run_names` of their paths.
    """
    heads = headline_table(results_list, names=names)
    groups = seed_groups(results_list)
    groups.sort(key=lambda g: baseline not in g)  # the baseline's group first
    rows = []
    stats: list[dict[str, tuple[float | None, float | None, int]]] = []
    for g in groups:
        stats.append({m: _mean_sd([heads[i][m] for i in g]) for m, _, _ in COMPARED})
        rows.append({"group": ", ".join(heads[i]["run"] for i in g),
                     "seeds": ", ".join(str(results_list[i].config_value("seed", "?"))
                                        for i in g), "n": len(g)})
    for row, st in zip(rows, stats):
        for m, _, _ in COMPARED:
            mean, sd, n = st[m]
            bmean, bsd, bn = stats[0][m]
            delta = se = None
            if mean is not None and bmean is not None and math.isfinite(mean) \
                    and math.isfinite(bmean):
                delta = mean - bmean
                if sd is not None or bsd is not None:
                    se = math.sqrt((sd or 0.0) ** 2 / max(n, 1) + (bsd or 0.0) ** 2 / max(bn, 1))
            row.update({f"{m}.mean": mean, f"{m}.sd": sd, f"{m}.delta": delta,
                        f"{m}.delta_se": se})
    return rows


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    return str(v)


def _write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(row.get(c)) for c in columns])
    return path


def _num(v: Any, digits: int = 4) -> str:
    """A number for the report's tables (``digits`` significant digits; — when missing).

    >>> _num(0.54213), _num(497.26), _num(None), _num(math.inf), _num(12), _num(45678.9)
    ('0.5421', '497.3', '—', '∞', '12', '45679')
    >>> _num(0.0056568, 2)
    '0.0057'
    """
    v = _value(v)
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        return f"{v:.0f}" if abs(v) >= 10 ** digits else f"{v:.{digits}g}"
    return str(v)


def _signed(v: float | None) -> str:
    """A difference with its sign: ``+0.033``; ``0`` without one."""
    if v is None:
        return "—"
    return "0" if v == 0 else ("+" if v > 0 else "−") + _num(abs(v))


# ------------------------------------------------------------------ report blocks


@dataclass
class _Doc:
    """The report as blocks, rendered to Markdown and to self-contained HTML.

    Text may use ``**bold**``, ```code``` and ``[text](link)``.
    """

    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.blocks.append(("table", (list(columns), [list(r) for r in rows])))

    def figure(self, caption: str, path: Path) -> None:
        self.blocks.append(("figure", (caption, path)))

    def markdown(self) -> str:
        out: list[str] = []
        for kind, data in self.blocks:
            if kind == "h":
                out += ["#" * data[0] + " " + data[1], ""]
            elif kind == "p":
                out += [data, ""]
            elif kind == "ul":
                out += [f"- {item}" for item in data] + [""]
            elif kind == "table":
                columns, rows = data
                out += ["| " + " | ".join(_md_escape(c) for c in columns) + " |",
                        "|" + " --- |" * len(columns)]
                out += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
                out.append("")
            else:
                caption, path = data
                out += [f"![{caption}]({path.name})", ""]
        return "\n".join(out)

    def html(self, title: str) -> str:
        out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
               f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style></head><body>"]
        for kind, data in self.blocks:
            if kind == "h":
                out.append(f"<h{data[0]}>{_inline(data[1])}</h{data[0]}>")
            elif kind == "p":
                out.append(f"<p>{_inline(data)}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in data) + "</ul>")
            elif kind == "table":
                columns, rows = data
                out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>"
                                                          for c in columns)
                           + "</tr></thead><tbody>"
                           + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r)
                                     + "</tr>" for r in rows) + "</tbody></table>")
            else:
                caption, path = data
                data64 = base64.b64encode(path.read_bytes()).decode("ascii")
                out.append(f'<figure><img alt="{html.escape(caption)}" '
                           f'src="data:image/png;base64,{data64}">'
                           f"<figcaption>{_inline(caption)}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"


_CSS = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
        "color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:90%}"
        "th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
        "th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}"
        "img{max-width:100%}figure{margin:1em 0 2em}figcaption{color:#555}"
        "code{background:#f3f3f3;padding:0 .2em}")


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _inline(text: str) -> str:
    """Markdown-style inline markup to HTML.

    >>> _inline("**a** `b<c>` [d](e.csv)")
    '<b>a</b> <code>b&lt;c&gt;</code> <a href="e.csv">d</a>'
    """
    out = html.escape(str(text), quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    out = re.sub(r"`(.+?)`", r"<code>\1</code>", out)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', out)


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
    metrics = [k for k in _eval_keys([r.results for r in runs]) if not DETAIL_ONLY.search(k)]
    if len(metrics) > MAX_METRIC_PANELS:
        notes.append(f"curves.png shows the first {MAX_METRIC_PANELS} of {len(metrics)} eval "
                     "metrics; every metric of every round is in rounds_<run>.csv")
        metrics = metrics[:MAX_METRIC_PANELS]
    panels = [("eval", m) for m in metrics]
    if any(_numeric(r.results.server.get("loss")) is not None for r in runs):
        panels.append(("server", "loss"))
    if not panels:
        raise _Skip("curves.png skipped: no run has a completed round with metrics")
    fig, axes = _figure(len(panels), ncols=4 if len(panels) > 6 else 3)
    styles = _run_styles(runs)
    legend: dict[str, Any] = {}
    for ax, (table, key) in zip(axes, panels):
        for run in runs:
            values = _numeric(getattr(run.results, table).get(key))
            if values is not None:
                (line,) = ax.plot(run.results.rounds, values, marker="o", ms=3, label=run.name,
                                  **styles[run.name])
                legend.setdefault(run.name, line)
        ax.set_title(key if table == "eval" else "server loss")
        ax.grid(alpha=0.3)
        _integer_rounds(ax)
    if len(runs) > 1:  # every run that has a line in any panel, in the runs' order
        names = [r.name for r in runs if r.name in legend]
        fig.legend([legend[n] for n in names], names, loc="outside lower center",
                   ncols=min(len(names), 6))
    return _save(fig, path)


def _run_styles(runs: Sequence[_Run]) -> dict[str, dict[str, str]]:
    """One colour (and, past ten runs, line style) per run, the same in every panel.

    >>> runs = [_Run(f"r{i}", None) for i in range(12)]  # type: ignore[arg-type]
    >>> s = _run_styles(runs); s["r0"], s["r10"]
    ({'color': 'C0', 'linestyle': '-'}, {'color': 'C0', 'linestyle': '--'})
    """
    return {run.name: {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[i // 10 % 4]}
            for i, run in enumerate(runs)}


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


def _is_classifier_run(run: _Run) -> bool:
    """Whether the run's final model is a classifier (``alignfl-mpi reference``'s LeNets),
    not a VAE: it has no decoders, samples or latents to draw."""
    final = run.results.final_global()
    return final is not None and final[0].get("arch") not in MODEL_REGISTRY


def _load_vae(spec: dict[str, Any], state: dict[str, np.ndarray]) -> VAE:
    vae = build_vae(ModelSpec.from_dict(spec))
    vae.load_state_dict(arrays_to_state(state), strict=True)
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
            decoder = decoder_from_state(spec, arrays_to_state(d["state"]))
            prior = GaussianMixturePrior.from_arrays(d["prior"], latent_dim=spec.latent_dim)
        except (AlignFLError, RuntimeError, KeyError) as exc:
            notes.append(f"samples_{run.name}.png: client {cid}'s decoder left out ({exc})")
            continue
        gen = torch.Generator().manual_seed(SAMPLE_SEED + 1 + cid)
        rows.append(decoder.eval()(prior.sample(SAMPLES_PER_ROW, generator=gen)))
        labels.append(f"client {cid}")
    global_spec, global_state = final
    try:
        vae = _load_vae(global_spec, global_state)
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


def _recorded_epsilons(runs: Sequence[_Run], notes: list[str]) -> list[float | None]:
    """Per run the recorded ε of its seed group (mean, 3 significant digits; ∞ without DP);
    None, with a note, for a run whose ε is not accounted or not recorded."""
    spent = [r.results.epsilon_spent() for r in runs]
    out: list[float | None] = [None] * len(runs)
    for group in seed_groups([r.results for r in runs]):
        values = [v for i in group if (v := _epsilon_value(spent[i])) is not None]
        if len(values) < len(group):
            for i in group:
                why = "not accounted" if not spent[i].accounted else "not recorded"
                notes.append(f"privacy_utility.png: {runs[i].name} left out of the ε axis "
                             f"(its ε is {why})")
            continue
        mean = float(np.mean(values)) if all(math.isfinite(v) for v in values) else math.inf
        for i in group:
            out[i] = float(f"{mean:.3g}") if math.isfinite(mean) else mean
    return out


def _privacy_utility(runs: Sequence[_Run], path: Path, notes: list[str]) -> Path:
    """``privacy_utility.png``: final metrics against the recorded ε and/or λ_lip, lines
    by the other."""
    eps = _recorded_epsilons(runs, notes)
    lam = [_lip_weight(r.results) for r in runs]
    axes_params = [p for p, v in (("epsilon", eps), ("lipschitz_weight", lam))
                   if len({x for x in v if x is not None}) > 1]
    if not axes_params:
        raise _Skip("privacy_utility.png skipped: the runs do not differ in recorded ε "
                    "or in λ_lip (client.lipschitz.weight)")
    final = {m: [_last(r.results.eval.get(m)) for r in runs]
             for m in ("latent_accuracy", "global_fid_lenet", *PRIVACY_PANELS)}
    metrics = [m for m, v in final.items() if any(x is not None for x in v)]
    controls = {m: [_last(r.results.eval.get(c)) for r in runs]
                for m, c in PANEL_CONTROLS.items()}
    if not metrics:
        raise _Skip("privacy_utility.png skipped: no run has a final latent_accuracy, "
                    "survival_synthetic or mia_auc_outliers")
    done = [r.results.finished for r in runs]
    for r, d in zip(runs, done):
        if not d:
            notes.append(f"privacy_utility.png: {r.name} is not finished "
                         f"({len(r.results.rounds)} rounds recorded): a hollow point at "
                         "its last round and its ε so far, left out of the lines")
    fig, axes = _figure(len(axes_params) * len(metrics), ncols=len(metrics))
    for row, param in enumerate(axes_params):
        xs, groups = (eps, lam) if param == "epsilon" else (lam, eps)
        group_label = "λ_lip" if param == "epsilon" else "ε"
        for col, metric in enumerate(metrics):
            ax = axes[row * len(metrics) + col]
            _privacy_panel(ax, xs, groups, final[metric], group_label=group_label,
                           epsilon_axis=param == "epsilon", controls=controls.get(metric),
                           done=done)
            ax.set_xlabel("ε spent (recorded; ∞: no DP)" if param == "epsilon" else "λ_lip")
            ax.set_ylabel(f"final {metric}")
            ax.grid(alpha=0.3)
    return _save(fig, path)


def _privacy_panel(ax: Any, xs: Sequence[float | None], groups: Sequence[float | None],
                   ys: Sequence[float | None], *, group_label: str,
                   epsilon_axis: bool, controls: Sequence[float | None] | None = None,
                   done: Sequence[bool] | None = None) -> None:
    """Points and mean lines of ``ys`` against ``xs``, one line per group value; the
    ``controls`` of the same runs, if any, as dashed lines of the same colours. Runs that
    are not ``done`` (unfinished) are hollow points outside the lines.

    On the ε axis (log scale) ∞ sits a decade right of the largest finite ε; a λ_lip
    axis whose positive values span two decades or more is symlog.
    """
    from matplotlib.ticker import NullLocator

    finite = [x for x in xs if x is not None and math.isfinite(x) and x > 0]
    inf_at = max(finite) * 10 if finite else 1.0
    pos = {x: (inf_at if x == math.inf else x) for x in xs if x is not None}
    done = list(done) if done is not None else [True] * len(xs)
    hollow_in_legend = False
    for i, g in enumerate(sorted({g for g in groups if g is not None})):
        mine = [(pos[x], y, d) for x, gg, y, d in zip(xs, groups, ys, done)
                if gg == g and x is not None and y is not None]
        pts = [(p, y) for p, y, d in mine if d]
        open_pts = [(p, y) for p, y, d in mine if not d]
        label = f"{group_label} = {'∞' if g == math.inf else f'{g:g}'}"
        if open_pts:
            ax.scatter(*zip(*open_pts), s=36, facecolors="none", edgecolors=f"C{i}",
                       label=None if pts else label)
            if not hollow_in_legend:
                ax.scatter([], [], s=36, facecolors="none", edgecolors="grey",
                           label="not finished")
                hollow_in_legend = True
        if not pts:
            continue
        px = sorted({p for p, _ in pts})
        means = [np.mean([y for p, y in pts if p == x]) for x in px]
        ax.plot(px, means, marker="o", color=f"C{i}", label=label)
        ax.scatter(*zip(*pts), s=12, color=f"C{i}", alpha=0.5)
        ctl = [(pos[x], c) for x, gg, c, d in zip(xs, groups, controls or [], done)
               if gg == g and x is not None and c is not None and d]
        if ctl:
            cx = sorted({p for p, _ in ctl})
            ax.plot(cx, [np.mean([c for p, c in ctl if p == x]) for x in cx], ls="--",
                    lw=1, color=f"C{i}", label=f"{label}, control")
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


def _find_baseline(baseline: str | os.PathLike, paths: Sequence[Path],
                   names: Sequence[str]) -> int:
    """Index of the baseline among the runs: by path (a run folder stands for its file)
    or by run name.

    Raises:
        ConfigError: It is none of the runs.
    """
    text = str(baseline)
    target = _resolve(Path(baseline)).resolve()
    for i, (p, n) in enumerate(zip(paths, names)):
        if p.resolve() == target or text == n:
            return i
    raise ConfigError(f"--baseline {text} is not one of the reported runs "
                      f"({', '.join(names)}); pass one of the RESULTS paths or run names")


def run_report(paths: Sequence[Path], *, out: Path, partition: Path | None = None,
               baseline: str | os.PathLike | None = None) -> list[Path]:
    """Write tables, figures, ``report.md`` and ``report.html`` for runs into ``out``.

    Writes ``headline.csv`` (:func:`headline_table`), ``summary.csv``
    (:func:`runs_table`), ``rounds_<run>.csv`` per run (rounds from 1),
    ``comparison.csv`` with a ``baseline`` (:func:`comparison_table`), ``curves.png``,
    ``timings.png``, per run ``samples_<run>.png``, ``synthetic_<run>.png`` and
    ``latent_<run>.png``, ``privacy_utility.png`` for runs that differ in recorded ε or
    λ_lip, ``summary.md`` (the tables), and ``report.md`` and ``report.html`` (the same
    page; the HTML embeds the figures). A part the inputs cannot supply is skipped with a
    note in the report.

    Args:
        paths: Results files, or run folders holding ``results.h5``.
        out: Output folder, created if missing; existing report files are replaced.
        partition: Partition file for the latent plots; default: the one stored in
            each results file, when that file exists.
        baseline: One of ``paths`` (or a run name) to compare every run with.

    Returns:
        The files written, ``report.md`` last.

    Raises:
        SchemaError: A path is missing or not a results file, or ``partition`` is
            given and is not a partition file.
        ConfigError: ``baseline`` is not one of the runs.
    """
    if not paths:
        raise ValueError("run_report needs at least one results file")
    paths = [_resolve(Path(p)) for p in paths]
    loaded = [load(p) for p in paths]
    if partition is not None:
        read_partition_info(partition)
    names = run_names(paths)
    base = _find_baseline(baseline, paths, names) if baseline is not None else None
    runs = [_Run(n, r) for n, r in zip(names, loaded)]
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

    head = headline_table(loaded, names=names)
    written.append(_write_csv(head, out / "headline.csv", list(head[0])))
    rows = runs_table(loaded, names=names)
    written.append(_write_csv(rows, out / "summary.csv", list(rows[0])))
    comparison = None
    if base is not None:
        comparison = comparison_table(loaded, baseline=base, names=names)
        written.append(_write_csv(comparison, out / "comparison.csv", list(comparison[0])))
    for run in runs:
        table = per_round_table(run.results)
        cols = list(dict.fromkeys(k for row in table for k in row)) or ["round"]
        written.append(_write_csv(table, out / f"rounds_{run.name}.csv", cols))
        if not run.results.rounds:
            notes.append(f"{run.name} has no completed round")

    figure("Metrics per round", _curves, runs, out / "curves.png", notes)
    figure("Seconds per round and phase", _timings, runs, out / "timings.png")
    for run in runs:
        if _is_classifier_run(run):
            notes.append(f"{run.name}: a classifier reference (no VAE): no samples, synthetic "
                         "or latent figures")
            continue
        part = _partition_for(run.results, partition)
        figure(f"{run.name}: samples of the final client decoders (from their priors) and "
               "of the global VAE (from N(0, I))", _samples, run,
               out / f"samples_{run.name}.png", notes)
        figure(f"{run.name}: stored synthetic images of the last round", _synthetic, run,
               out / f"synthetic_{run.name}.png")
        figure(f"{run.name}: latent means of the real test set under the final global VAE",
               _latent, run, part, out / f"latent_{run.name}.png")
    if len(runs) > 1:
        figure("Final utility and privacy against the recorded ε and λ_lip",
               _privacy_utility, runs, out / "privacy_utility.png", notes)
    for note in notes:
        log.info("report: %s", note)

    tables = _Doc()
    _headline_section(tables, head)
    if comparison is not None and base is not None:
        _comparison_section(tables, comparison, baseline=names[base])
    _detail_sections(tables, runs)
    summary = _Doc([("h", (1, "Summary")), *tables.blocks])
    (out / "summary.md").write_text(summary.markdown(), encoding="utf-8")
    written.append(out / "summary.md")

    doc = _Doc()
    doc.h(1, "ALIGN-FL report")
    _what_was_run(doc, runs)
    if len(runs) == 1:
        _three_numbers(doc, runs[0])
    doc.blocks += tables.blocks
    if notes:
        doc.h(2, "Notes (skipped parts)")
        doc.ul(notes)
    doc.h(2, "Files")
    doc.ul(["[headline.csv](headline.csv): the headline table; [summary.csv](summary.csv): "
            "every final value of every run, one row per run",
            *(["[comparison.csv](comparison.csv): the comparison, with full precision"]
              if comparison is not None else []),
            "`rounds_<run>.csv`: every value of every round of a run (rounds from 1): "
            + ", ".join(f"[rounds_{r.name}.csv](rounds_{r.name}.csv)" for r in runs)])
    doc.h(2, "Figures")
    for caption, fig in figures:
        doc.h(3, caption)
        doc.figure(caption, fig)
    (out / "report.html").write_text(doc.html("ALIGN-FL report"), encoding="utf-8")
    written.append(out / "report.html")
    (out / "report.md").write_text(doc.markdown(), encoding="utf-8")
    written.append(out / "report.md")
    return written


# ----------------------------------------------------------------- report sections


def _describe(res: Results) -> str:
    """One sentence on what a run was: strategy, clients, data, rounds, privacy."""
    part = res.attrs.get("partition_attrs") or {}
    name = str(res.config_value("strategy", DEFAULT_STRATEGY))
    strategy = STRATEGIES[name].title if name in STRATEGIES else name
    n = res.attrs.get("n_clients", res.config_value("n_clients", "?"))
    data = f"{part.get('dataset') or res.config_value('data.dataset', '?')}"
    scheme = part.get("scheme") or res.config_value("data.scheme")
    n_out = part.get("n_outliers", res.config_value("data.outliers"))
    detail = [scheme] if scheme else []
    if n_out:
        client = part.get("outlier_client", res.config_value("data.outlier_client", 0))
        domain = part.get("outlier_dataset") or "outlier-domain"
        detail.append(f"{n_out} {domain} outliers on client {client}")
    if detail:
        data += f" ({'; '.join(detail)})"
    mode = res.config_value("client.privacy.mode", "none")
    privacy = "no DP" if mode == "none" else f"DP-SGD ({mode})"
    lip = _lip_weight(res)
    if lip > 0:
        privacy += f", Lipschitz penalty λ = {lip:g}"
    done = len(res.rounds)
    planned = res.config_value("rounds", "?")
    state = "finished" if res.finished else "not finished (running or crashed)"
    total = _numeric(res.timings.get("round"))
    wall = f", {np.nansum(total):.0f} s of rounds" if total is not None else ""
    return (f"{strategy}, {n} clients on {data}, {planned} rounds of "
            f"{res.config_value('client.local_epochs', '?')} local epochs, {privacy}, seed "
            f"{res.config_value('seed', '?')}; {state}, {done} of {planned} rounds{wall}")


def _what_was_run(doc: _Doc, runs: Sequence[_Run]) -> None:
    doc.h(2, "What was run")
    doc.ul([f"**{r.name}**: {_describe(r.results)} (`{r.results.path}`)" for r in runs])
    doc.p("Rounds are numbered from 1, as in the log and the results file.")


def _outlier_share(res: Results) -> float | None:
    part = res.attrs.get("partition_attrs") or {}
    try:
        size = part["client_sizes"][int(part.get("outlier_client", 0))]
        return float(part["n_outliers"]) / float(size) if part["n_outliers"] else None
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError):
        return None


def _three_numbers(doc: _Doc, run: _Run) -> None:
    """The three numbers to look at first, each with what it means."""
    res = run.results

    def first_last(name: str) -> tuple[Any, str]:
        values = res.metric(name)
        if values is None:
            return None, ""
        last = _value(values[-1])
        since = (f" (round {res.rounds[0]}: {_num(values[0])})"
                 if len(values) > 1 and _value(values[0]) is not None else "")
        return last, since

    items = []
    acc, since = first_last("latent_accuracy")
    if acc is not None:
        items.append(f"**latent accuracy {_num(acc)}**{since}: how well the global VAE, "
                     "trained only on synthetic data, separates the real test digits in its "
                     "latent space (logistic regression); higher is better, 0.1 is chance.")
    fid, since = first_last("fid_lenet")
    if fid is not None:
        items.append(f"**FID-LeNet {_num(fid)}**{since}: distance between the global VAE's "
                     "samples and the real test set in a small LeNet's feature space; lower "
                     "is better (not comparable to Inception FID).")
    surv, since = first_last("outlier_survival")
    if surv is not None:
        share = _outlier_share(res)
        ref = (f" (its outlier share is {_num(share)}: a value near it means the outliers "
               "survive at their own rate)" if share is not None else "")
        items.append(f"**outlier survival {_num(surv)}**{since}: share of the outlier "
                     f"client's synthetic samples classified as the outlier domain{ref}; "
                     "lower means the shared decoder maps the outliers away.")
    if items:
        doc.h(2, "The numbers to look at")
        doc.ul(items)
        spent = res.epsilon_spent()
        doc.p(f"ε spent: {spent.label}" + (" (the largest ε the clients recorded)."
                                            if spent.dp and spent.accounted else "."))


def _headline_cells(row: dict[str, Any], spent: str) -> list[str]:
    cells = []
    for key, _ in HEADLINE_COLUMNS:
        if key == "epsilon_spent":
            cells.append(spent)
        elif key == "rounds":
            text = f"{row['rounds_completed']}/{_num(row['rounds'])}"
            cells.append(text if row["status"] == "finished" else f"{text} (not finished)")
        else:
            cells.append(_num(row[key]))
    return cells


def _spent_label(row: dict[str, Any]) -> str:
    if row["dp_accounted"] is None:
        return "∞ (no DP)"
    if not row["dp_accounted"]:
        return "not accounted"
    return _num(row["epsilon_spent"])


def _headline_section(doc: _Doc, head: list[dict[str, Any]]) -> None:
    doc.h(2, "Headline")
    doc.p("Last round's values. ε spent: the largest ε the clients recorded; FID-LeNet and "
          "class coverage: the global VAE's samples; outlier survival: share of the outlier "
          "client's synthetic samples classified as outliers; MIA AUC: membership inference "
          "on the outliers (0.5 = no leakage); round s: mean wall time of a round.")
    doc.table([t for _, t in HEADLINE_COLUMNS],
              [_headline_cells(r, _spent_label(r)) for r in head])


def _comparison_section(doc: _Doc, rows: list[dict[str, Any]], *, baseline: str) -> None:
    doc.h(2, f"Comparison with {baseline}")
    several = any(r["n"] > 1 for r in rows)
    doc.p("One row per setting: runs whose configs differ only in `seed` are one group. "
          "Each cell: the group's mean" + (" ± standard deviation over seeds" if several
                                           else "")
          + ", and in brackets the difference to the baseline group"
          + (" ± its standard error" if several else "") + ". "
          "Higher is better for latent acc and class coverage, lower for the others.")
    columns = ["group", "seeds"] + [t for _, t, _ in COMPARED]
    table = []
    for i, row in enumerate(rows):
        cells = [row["group"] + (" (baseline)" if i == 0 else ""), row["seeds"]]
        for m, _, _ in COMPARED:
            mean, sd = row[f"{m}.mean"], row[f"{m}.sd"]
            text = _num(mean) + (f" ± {_num(sd, 2)}" if sd is not None else "")
            if i > 0 and row[f"{m}.delta"] is not None:
                se = row[f"{m}.delta_se"]
                text += f" ({_signed(row[f'{m}.delta'])}" + (f" ± {_num(se, 2)}"
                                                               if se is not None else "") + ")"
            cells.append(text)
        table.append(cells)
    doc.table(columns, table)


def _present(results_list: Sequence[Results], table: str, key: str) -> bool:
    for res in results_list:
        if table == "clients":
            if any(_numeric(c.get(key)) is not None for c in res.clients.values()):
                return True
        elif _numeric(getattr(res, table).get(key)) is not None:
            return True
    return False


def _final(res: Results, table: str, key: str) -> Any:
    if table == "clients":  # the client that reports it (e.g. the outlier client)
        values = [last_reported(c.get(key)) for c in res.clients.values()]
        values = [v for v in values if v is not None]
        return max(values) if values else None
    return _last(getattr(res, table).get(key))


def _cross_check(res: Results) -> Any:
    values = [last_reported(c.get(k)) for c in res.clients.values()
              for k in ("epsilon_prv", "epsilon_rdp")]
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return max(values) if values else None


def _detail_sections(doc: _Doc, runs: Sequence[_Run]) -> None:
    results = [r.results for r in runs]
    doc.h(2, "Details (last round)")
    used: set[str] = set()

    cols = [c for c in UTILITY if _present(results, c[0], c[1])]
    if cols:
        doc.h(3, "Utility")
        doc.table(["run", *(t for _, _, t in cols)],
                  [[r.name, *(_num(_final(r.results, tb, k)) for tb, k, _ in cols)]
                   for r in runs])
        used |= {k for tb, k, _ in cols if tb == "eval"}

    models = [m for m in ("global", "pool")
              if any(_present(results, "eval", f"{m}_{k}") for k, _ in QUALITY)]
    legacy = not models and any(_present(results, "eval", k) for k, _ in QUALITY)
    if models or legacy:
        prefixes = [f"{m}_" for m in models] or [""]
        qcols = [(k, t) for k, t in QUALITY
                 if any(_present(results, "eval", p + k) for p in prefixes)]
        doc.h(3, "Generative quality")
        doc.p("In a LeNet's feature space, against the real test set: samples of the global "
              "VAE (`global`) and the synthetic pool of the client decoders (`pool`); "
              "per-class shares are in `rounds_<run>.csv`.")
        doc.table(["run", "samples", *(t for _, t in qcols)],
                  [[r.name, p.rstrip("_") or "global",
                    *(_num(_last(r.results.eval.get(p + k))) for k, _ in qcols)]
                   for r in runs for p in prefixes])
        used |= {p + k for p in prefixes for k, _ in QUALITY}

    pcols = [c for c in PRIVACY if _present(results, c[0], c[1])]
    doc.h(3, "Privacy")
    doc.p("ε spent: the largest ε the clients recorded (never the configured target); "
          "*not accounted* when a client recorded `dp_accounted = 0`. The cross-check is "
          "the other accountant's ε.")
    doc.table(["run", "ε spent", "ε cross-check", *(t for _, _, t in pcols)],
              [[r.name, r.results.epsilon_spent().label, _num(_cross_check(r.results)),
                *(_num(_final(r.results, tb, k)) for tb, k, _ in pcols)] for r in runs])
    used |= {k for tb, k, _ in pcols if tb == "eval"}

    tcols = [k for k in TIMINGS if _present(results, "timings", k)]
    if tcols:
        doc.h(3, "Timings")
        doc.p("Mean seconds per round and phase; `total` is the sum of the rounds' wall "
              "times.")
        doc.table(["run", *tcols, "total"],
                  [[r.name, *(_num(_mean_of(r.results.timings.get(k))) for k in tcols),
                    _num(_sum_of(r.results.timings.get("round")))] for r in runs])

    doc.h(3, "Clients")
    doc.p("Status in the last round and the rounds a client answered `ok`; the other values "
          "are the client's last reported ones. Lipschitz: the empirical Lipschitz constant "
          "of its stored decoder.")
    table = []
    for r in runs:
        info = r.results.attrs.get("clients_info") or {}
        for cid, c in sorted(r.results.clients.items()):
            status = c.get("status")
            ok = (f"{int(sum(s == 'ok' for s in status))}/{len(status)}"
                  if status is not None else "—")
            meta = info.get(str(cid), {}) if isinstance(info, dict) else {}
            samples = last_reported(c.get("n_samples")) or meta.get("n_samples")
            eps = last_reported(c.get("epsilon"))
            eps_text = (_num(eps) + (" (not accounted)"
                                     if last_reported(c.get("dp_accounted")) == 0 else "")
                        if eps is not None else
                        ("—" if r.results.epsilon_spent().dp else "∞"))
            table.append([r.name, str(cid), _value(status[-1]) or "—" if status is not None
                          else "—", ok, _num(None if samples is None else int(samples)),
                          _num(last_reported(c.get("loss"))), eps_text,
                          _num(last_reported(c.get("lip_empirical")))])
    if table:
        doc.table(["run", "client", "status", "rounds ok", "samples", "loss", "ε",
                   "Lipschitz"], table)
    else:
        doc.p("No client record yet.")

    other = [k for k in _eval_keys(results) if k not in used and not DETAIL_ONLY.search(k)
             and k not in {"global_" + q for q, _ in QUALITY} | {"pool_" + q for q, _ in QUALITY}]
    if other:
        doc.h(3, "Other measurements")
        doc.table(["run", *other], [[r.name, *(_num(_last(r.results.eval.get(k)))
                                               for k in other)] for r in runs])


def _mean_of(values: np.ndarray | None) -> float | None:
    values = _numeric(values)
    return None if values is None else float(np.nanmean(values))


def _sum_of(values: np.ndarray | None) -> float | None:
    values = _numeric(values)
    return None if values is None else float(np.nansum(values))
