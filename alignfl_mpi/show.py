"""``alignfl-mpi show``: a terminal summary of one results file, for a quick look.

Reads finished, crashed and running runs (the writer replaces the file atomically, so a
run that is still writing is read as of its last completed round). Needs no MPI, no GPU
and no plotting; torch is not imported. Launch::

    alignfl-mpi show runs/alignfl/results.h5
    alignfl-mpi show runs/alignfl --last 5      # a run folder stands for its results.h5

Rounds are numbered from 1, as in the log, the report and the file.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .results import DEFAULT_STRATEGY, RESULTS_NAME, Results, last_reported, load

#: Per-round columns: (title, table, key). ``metric`` reads :meth:`Results.metric`.
ROUND_COLUMNS = (("server loss", "server", "loss"), ("latent acc", "metric", "latent_accuracy"),
                 ("FID-LeNet", "metric", "fid_lenet"), ("class cov.", "metric", "class_coverage"),
                 ("survival", "metric", "outlier_survival"), ("MIA AUC", "metric", "mia_auc"),
                 ("round s", "timings", "round"))
DEFAULT_LAST = 20


def fmt(value: Any) -> str:
    """A number for a terminal table: 4 significant digits, ``—`` when missing.

    >>> fmt(0.54213), fmt(497.3), fmt(12345.6), fmt(None), fmt(float("inf")), fmt(3)
    ('0.5421', '497.3', '12346', '—', '∞', '3')
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Right-aligned columns (the first left-aligned), two spaces apart."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(header), *(line(r) for r in rows)]


def _age(path: Path) -> str:
    seconds = max(0.0, time.time() - path.stat().st_mtime)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _status_line(res: Results) -> str:
    done = int(res.attrs.get("rounds_completed", len(res.rounds)))
    planned = res.config_value("rounds")
    of = f"{done} of {planned} rounds" if planned is not None else f"{done} rounds"
    if res.finished:
        text = f"finished, {of}"
    else:
        text = (f"running or stopped, {of} written (file last written {_age(res.path)}; a "
                "crashed run also reads 'running')")
    if res.attrs.get("resumed_at_round"):
        text += f"; resumed at round {res.attrs['resumed_at_round']}"
    return text


def _data_line(res: Results) -> str:
    part = res.attrs.get("partition_attrs") or {}
    dataset = part.get("dataset") or res.config_value("data.dataset", "?")
    scheme = part.get("scheme") or res.config_value("data.scheme", "?")
    text = f"{dataset} {scheme}"
    n_out = part.get("n_outliers", res.config_value("data.outliers"))
    if n_out:
        domain = part.get("outlier_dataset") or res.config_value("data.outlier_dataset") or "?"
        client = part.get("outlier_client", res.config_value("data.outlier_client", 0))
        text += f", {n_out} {domain} outliers on client {client}"
    sizes = part.get("client_sizes")
    if sizes:
        if len(sizes) <= 10:
            text += f"; clients of {', '.join(str(s) for s in sizes)} images"
        else:  # many clients: their spread, not every size
            text += (f"; clients of {min(sizes)} to {max(sizes)} images "
                     f"(median {int(np.median(sizes))})")
    return text


def _privacy_line(res: Results) -> str:
    mode = res.config_value("client.privacy.mode", "none")
    spent = res.epsilon_spent()
    if not spent.dp:
        return "none (ε = ∞, no DP)"
    target = res.config_value("client.privacy.epsilon")
    clip = res.config_value("client.privacy.clipping", "?")
    text = f"{mode}, {clip} clipping; ε spent (recorded, max over clients): {spent.label}"
    if spent.accounted and target is not None:
        text += f" (target {fmt(float(target))}, δ {res.config_value('client.privacy.delta')})"
    if not spent.accounted:
        text += " — a client recorded dp_accounted = 0 (median clipping or decoder mode)"
    return text


def _run_line(res: Results) -> str:
    strategy = res.config_value("strategy", DEFAULT_STRATEGY)
    n = res.attrs.get("n_clients", res.config_value("n_clients"))
    text = (f"{strategy}, {n} clients, seed {res.config_value('seed', '?')}, "
            f"{res.config_value('client.local_epochs', '?')} local epochs per round")
    lip = float(res.config_value("client.lipschitz.weight", 0.0) or 0.0)
    if lip > 0:
        text += f", Lipschitz penalty λ = {lip:g}"
    return text


def _round_rows(res: Results, last: int) -> tuple[list[str], list[list[str]], int]:
    shown = list(range(len(res.rounds)))
    if last > 0:
        shown = shown[-last:]
    header = ["round", "clients ok"] + [title for title, _, _ in ROUND_COLUMNS]
    columns = []
    for _, table, key in ROUND_COLUMNS:
        values = res.metric(key) if table == "metric" else getattr(res, table).get(key)
        columns.append(None if values is None or values.dtype == object else values)
    rows = []
    for i in shown:
        statuses = [c["status"][i] for c in res.clients.values() if "status" in c]
        ok = f"{sum(s == 'ok' for s in statuses)}/{len(statuses)}" if statuses else "—"
        rows.append([str(res.rounds[i]), ok]
                    + [fmt(None if v is None else float(v[i])) for v in columns])
    return header, rows, len(res.rounds) - len(shown)


def _client_rows(res: Results) -> tuple[list[str], list[list[str]]]:
    info = res.attrs.get("clients_info") or {}
    header = ["client", "status", "rounds ok", "samples", "loss", "ε", "Lipschitz", "host",
              "device"]
    rows = []
    for cid, cols in sorted(res.clients.items()):
        status = cols.get("status")
        last = str(status[-1]) if status is not None and len(status) and status[-1] else "—"
        ok = f"{int(sum(s == 'ok' for s in status))}/{len(status)}" if status is not None else "—"
        meta: dict[str, Any] = {}
        if isinstance(info, dict):  # JSON keys are strings; older files may hold ints
            meta = info.get(str(cid)) or info.get(cid) or {}
        samples = last_reported(cols.get("n_samples")) or meta.get("n_samples")
        eps = last_reported(cols.get("epsilon"))
        if eps is not None:
            eps = fmt(eps) + (" (not accounted)"
                              if last_reported(cols.get("dp_accounted")) == 0 else "")
        else:
            eps = "—" if res.epsilon_spent().dp else "∞"
        rows.append([str(cid), last, ok, fmt(None if samples is None else int(samples)),
                     fmt(last_reported(cols.get("loss"))), eps,
                     fmt(last_reported(cols.get("lip_empirical"))),
                     str(meta.get("host", "—")), str(meta.get("device", "—"))])
    return header, rows


def _errors(res: Results) -> list[str]:
    lines = []
    for cid, cols in sorted(res.clients.items()):
        errors = cols.get("error")
        if errors is None:
            continue
        for r, err in zip(res.rounds, errors):
            if err:
                lines.append(f"  round {r}, client {cid}: {str(err).splitlines()[0][:160]}")
    return lines


def summary(path: str | os.PathLike, *, last: int = DEFAULT_LAST) -> str:
    """The terminal summary of a results file (or a run folder holding ``results.h5``).

    Args:
        path: The results file or run folder.
        last: Rounds shown in the per-round table (the last ones); 0 shows all.

    Raises:
        SchemaError: Missing, unreadable or not a results file.
    """
    path = Path(path)
    if path.is_dir() and (path / RESULTS_NAME).is_file():
        path = path / RESULTS_NAME
    res = load(path)
    created = res.attrs.get("created", "?")
    lines = [str(path),
             f"  status    {_status_line(res)}",
             f"  run       {_run_line(res)}",
             f"  data      {_data_line(res)}",
             f"  privacy   {_privacy_line(res)}",
             f"  server    {res.attrs.get('server_host', '?')}, "
             f"{res.attrs.get('server_device', '?')}; created {created}, alignfl_mpi "
             f"{res.attrs.get('package_version', '?')}, schema {res.attrs.get('schema_version')}",
             ""]
    if not res.rounds:
        lines.append("no completed round yet")
        return "\n".join(lines)
    header, rows, hidden = _round_rows(res, last)
    lines += [f"rounds (from 1; survival = outlier survival in synthetic samples, "
              f"MIA AUC on the outliers; {_dt.timedelta(seconds=round(_total(res)))} in all)",
              *("  " + x for x in _table(header, rows))]
    if hidden:
        lines.append(f"  ({hidden} earlier round{'s' if hidden > 1 else ''} not shown; "
                     "--last 0 shows all)")
    header, rows = _client_rows(res)
    lines += ["", f"clients (last round {res.rounds[-1]}; values are the last reported)",
              *("  " + x for x in _table(header, rows))]
    errors = _errors(res)
    if errors:
        lines += ["", "errors", *errors[-10:]]
    return "\n".join(lines)


def _total(res: Results) -> float:
    wall = res.timings.get("round")
    if wall is None or wall.dtype == object:
        return 0.0
    return float(np.nansum(wall))
