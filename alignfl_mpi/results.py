"""Results HDF5: the writer (rank 0 only) and the post-processing API :func:`load`.

Every update goes to a copy of the file that is renamed over the original, so a crash
at any moment leaves the last complete round readable and never a corrupt file, and a
reader can load the file while a run is still writing it.

Rounds are numbered from 1 wherever people or files see them: the first round is
``/rounds/0001`` with attribute ``round = 1``. The runtime passes its 0-based loop index
``r`` to :meth:`ResultsWriter.write_round` and :meth:`ResultsWriter.update_timings`, and
the writer stores round ``r + 1``. Files of schema version 1 numbered rounds from 0;
:func:`load` renumbers them.

>>> # res = load("runs/alignfl/results.h5")
>>> # res.eval["latent_accuracy"]      -> one value per round
>>> # res.clients[0]["loss"]           -> client 0's local loss per round
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from . import __version__
from .errors import ConfigError
from .fileio import atomic_path
from .schema import (
    CONFIG_ATTR,
    FINAL,
    RESULTS_KIND,
    RESULTS_SCHEMA_VERSION,
    ROUND_CLIENTS,
    ROUND_EVAL,
    ROUND_SERVER,
    ROUND_SYNTHETIC,
    ROUND_TIMINGS,
    ROUNDS,
    _decode_attr,
    _open,
)

DEFAULT_STRATEGY = "align-fl"
"""The strategy of a run whose stored config names none (``RunConfig``'s default)."""

RESULTS_NAME = "results.h5"
#: Client attributes that hold a round number (renumbered when reading version 1).
CLIENT_ROUND_KEYS = ("update_round", "busy_round")


def round_key(round_: int) -> str:
    """Group name of a round (numbered from 1): zero-padded so that names sort by round.

    >>> round_key(7)
    '0007'
    """
    return f"{round_:04d}"


def _upgrade_v1(f: h5py.File) -> None:
    """Renumber a version-1 file's rounds (0-based) to version 2's (1-based), in place."""
    rounds = f[ROUNDS]
    for key in sorted(rounds.keys(), key=int, reverse=True):
        new = round_key(int(key) + 1)
        rounds.move(key, new)
        rounds[new].attrs["round"] = int(key) + 1
        for cg in rounds[new][ROUND_CLIENTS].values() if ROUND_CLIENTS in rounds[new] else ():
            for name in CLIENT_ROUND_KEYS:
                if name in cg.attrs:
                    cg.attrs[name] = int(cg.attrs[name]) + 1
    if "resumed_at_round" in f.attrs:
        f.attrs["resumed_at_round"] = int(f.attrs["resumed_at_round"]) + 1
    if FINAL in f and "decoders" in f[FINAL]:
        for c in f[FINAL]["decoders"].values():
            c.attrs["round"] = int(c.attrs["round"]) + 1
    f.attrs["schema_version"] = RESULTS_SCHEMA_VERSION


def _set_attrs(group: h5py.Group, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (dict, list, tuple)):
            value = json.dumps(value, sort_keys=True)
        group.attrs[key] = value


class ResultsWriter:
    """Writes one run's results; used by rank 0 only.

    Every method that takes a round takes the runtime's 0-based loop index ``r`` and
    stores it as round ``r + 1`` (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike, *, config_json: str,
                 attrs: dict[str, Any], resume_from_round: int | None = None) -> None:
        """Create the file, or (``resume_from_round``) reopen it and drop later rounds.

        ``resume_from_round`` is the 0-based index of the first round to run again, which
        is the number of rounds to keep: rounds ``1..resume_from_round`` stay, later ones
        are dropped, and ``resumed_at_round`` records ``resume_from_round + 1``. A version-1
        file is renumbered to version 2 first.

        Raises:
            ConfigError: The file exists and this is not a resume.
        """
        self.path = Path(path)
        if resume_from_round is None or not self.path.exists():
            if self.path.exists():
                raise ConfigError(f"{self.path} already exists; pass --resume to continue that "
                                  "run or choose another --output directory")
            with atomic_path(self.path) as tmp, h5py.File(tmp, "w") as f:
                _set_attrs(f, dict(attrs, schema_version=RESULTS_SCHEMA_VERSION,
                                   kind=RESULTS_KIND,
                                   package_version=__version__, status="running",
                                   rounds_completed=0,
                                   created=_dt.datetime.now(_dt.timezone.utc)
                                   .isoformat(timespec="seconds")))
                f.attrs[CONFIG_ATTR] = config_json
                f.create_group(ROUNDS)
        else:
            _open(self.path, RESULTS_KIND).close()

            def drop(f: h5py.File) -> None:
                if _decode_attr(f.attrs.get("schema_version")) == 1:
                    _upgrade_v1(f)
                for key in list(f[ROUNDS].keys()):
                    if int(key) > resume_from_round:
                        del f[ROUNDS][key]
                if FINAL in f:
                    del f[FINAL]
                f.attrs["status"] = "running"
                f.attrs["rounds_completed"] = resume_from_round
                f.attrs[CONFIG_ATTR] = config_json
                f.attrs["resumed_at_round"] = resume_from_round + 1
            self._update(drop)

    def _update(self, fn: Callable[[h5py.File], None]) -> None:
        with atomic_path(self.path) as tmp:
            shutil.copyfile(self.path, tmp)
            with h5py.File(tmp, "a") as f:
                fn(f)

    def write_round(self, round_: int, *, clients: dict[int, dict[str, Any]],
                    server: dict[str, Any], evaluation: dict[str, Any],
                    timings: dict[str, float],
                    synthetic: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Append round ``round_ + 1`` (replacing it if present); ``round_`` is 0-based."""
        def write(f: h5py.File) -> None:
            rounds = f[ROUNDS]
            key = round_key(round_ + 1)
            if key in rounds:
                del rounds[key]
            g = rounds.create_group(key)
            g.attrs["round"] = round_ + 1
            cg = g.create_group(ROUND_CLIENTS)
            for cid, values in sorted(clients.items()):
                _set_attrs(cg.create_group(str(cid)), values)
            _set_attrs(g.create_group(ROUND_SERVER), server)
            _set_attrs(g.create_group(ROUND_EVAL), evaluation)
            _set_attrs(g.create_group(ROUND_TIMINGS), timings)
            if synthetic is not None:
                images, labels = synthetic
                sg = g.create_group(ROUND_SYNTHETIC)
                sg.create_dataset("images", data=images, compression="gzip", compression_opts=4,
                                  chunks=(min(len(images), 1024) or 1, *images.shape[1:]))
                sg.create_dataset("client", data=labels.astype(np.int64))
            f.attrs["rounds_completed"] = round_ + 1
        self._update(write)

    def set_attrs(self, values: dict[str, Any]) -> None:
        """Set root attributes (dicts and lists as JSON)."""
        self._update(lambda f: _set_attrs(f, values))

    def update_timings(self, round_: int, timings: dict[str, float]) -> None:
        """Rewrite round ``round_ + 1``'s timings (its own I/O is only known after writing)."""
        def write(f: h5py.File) -> None:
            _set_attrs(f[ROUNDS][round_key(round_ + 1)][ROUND_TIMINGS], timings)
        self._update(write)

    def write_final(self, *, global_state: dict[str, np.ndarray], global_spec: dict[str, Any],
                    decoders: dict[int, dict[str, Any]]) -> None:
        """Store the final global model and every client's last decoder and prior.

        ``decoders[k]`` holds ``spec`` (dict), ``state`` and ``prior`` (name -> array),
        and ``round`` (the 0-based loop index of that update; stored as ``round + 1``).
        """
        def write(f: h5py.File) -> None:
            if FINAL in f:
                del f[FINAL]
            g = f.create_group(FINAL)
            gg = g.create_group("global")
            gg.attrs["spec"] = json.dumps(global_spec, sort_keys=True)
            for name, arr in global_state.items():
                gg.create_dataset(name, data=arr)
            dg = g.create_group("decoders")
            for cid, d in sorted(decoders.items()):
                c = dg.create_group(str(cid))
                c.attrs["spec"] = json.dumps(d["spec"], sort_keys=True)
                c.attrs["round"] = int(d["round"]) + 1
                for sub in ("state", "prior"):
                    sg = c.create_group(sub)
                    for name, arr in d[sub].items():
                        sg.create_dataset(name, data=arr)
            f.attrs["status"] = "finished"
        self._update(write)


# --- post-processing ------------------------------------------------------------------
def _attrs(group: h5py.Group) -> dict[str, Any]:
    return {k: _decode_attr(v) for k, v in group.attrs.items()}


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    keys = sorted({k for r in rows for k in r})
    out = {}
    for k in keys:
        values = [r.get(k) for r in rows]
        if all(isinstance(v, (int, float, np.number, type(None))) and not isinstance(v, bool)
               for v in values):
            out[k] = np.array([np.nan if v is None else float(v) for v in values])
        else:
            out[k] = np.array(["" if v is None else str(v) for v in values], dtype=object)
    return out


def _cell(x: Any) -> Any:
    """A table cell: a Python scalar, None for missing (NaN or empty text)."""
    if isinstance(x, np.generic):
        x = x.item()
    if (isinstance(x, float) and math.isnan(x)) or (isinstance(x, str) and x == ""):
        return None
    return x


def last_reported(values: np.ndarray | None) -> Any:
    """The last non-missing entry of a per-round column, or None.

    >>> last_reported(np.array([1.0, 2.0, np.nan]))
    2.0
    """
    if values is None:
        return None
    for v in values[::-1]:
        if _cell(v) is not None:
            return _cell(v)
    return None


#: The headline metrics and the eval keys they are read from (the first one present):
#: the global VAE's numbers where there are global and pool variants.
HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "latent_accuracy": ("latent_accuracy",),
    "fid_lenet": ("global_fid_lenet", "fid_lenet"),
    "class_coverage": ("global_class_coverage", "class_coverage"),
    "outlier_survival": ("survival_synthetic",),
    "mia_auc": ("mia_auc_outliers",),
}

#: Free-text client attributes left out of :meth:`Results.per_round_rows`.
CLIENT_TEXT_KEYS = ("error", "traceback")


@dataclass(frozen=True)
class EpsilonSpent:
    """The ε a run recorded: the largest of the clients' last reported ``epsilon``.

    Attributes:
        value: ε spent; ``inf`` without DP; None when DP is on and nothing was recorded.
        accounted: False when a client recorded ``dp_accounted = 0`` (median clipping,
            ``decoder`` mode): the value is then not a guarantee.
        dp: Whether the run used DP (``client.privacy.mode`` other than ``none``, or a
            recorded ε).
    """

    value: float | None
    accounted: bool
    dp: bool

    @property
    def label(self) -> str:
        """Text for tables: ``∞ (no DP)``, ``not accounted``, ``—`` or the value.

        >>> EpsilonSpent(9.97812, True, True).label, EpsilonSpent(3.0, False, True).label
        ('9.978', 'not accounted')
        """
        if not self.dp:
            return "∞ (no DP)"
        if not self.accounted:
            return "not accounted"
        return "—" if self.value is None else f"{self.value:.4g}"


@dataclass
class Results:
    """A results file loaded for analysis; per-round tables are dicts of arrays.

    Attributes:
        path: The file.
        attrs: Root attributes (status, rounds_completed, partition, ...).
        config: The resolved run config.
        rounds: Round numbers present, from 1 (a crashed run has fewer than configured).
        server: Server training metrics per round.
        eval: Evaluation metrics per round (NaN where a round lacks one).
        timings: Seconds per phase per round.
        clients: client id -> metric -> per-round array (status as strings).
    """

    path: Path
    attrs: dict[str, Any]
    config: dict[str, Any]
    rounds: list[int]
    server: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    timings: dict[str, np.ndarray]
    clients: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    _offset: int = field(default=0, repr=False)  # 1 for version-1 files (0-based groups)

    @property
    def finished(self) -> bool:
        return self.attrs.get("status") == "finished"

    def epsilon_spent(self) -> EpsilonSpent:
        """The recorded ε (never the configured target); see :class:`EpsilonSpent`."""
        mode = (self.config.get("client") or {}).get("privacy", {}).get("mode", "none")
        values = [last_reported(c.get("epsilon")) for c in self.clients.values()]
        values = [float(v) for v in values if isinstance(v, (int, float))]
        flags = [last_reported(c.get("dp_accounted")) for c in self.clients.values()]
        accounted = not any(f is not None and float(f) == 0.0 for f in flags)
        if mode == "none" and not values:  # per-client overrides may still record ε
            return EpsilonSpent(math.inf, True, False)
        return EpsilonSpent(max(values) if values else None, accounted, True)

    def config_value(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key, e.g. ``"client.privacy.mode"``; ``default`` if absent."""
        node: Any = self.config
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return node

    def metric(self, name: str) -> np.ndarray | None:
        """A headline metric per round (see :data:`HEADLINE_METRICS`), or None if absent."""
        for key in HEADLINE_METRICS.get(name, (name,)):
            values = self.eval.get(key)
            if values is not None and values.dtype != object and np.isfinite(values).any():
                return values
        return None

    def headline(self) -> dict[str, Any]:
        """The numbers a reader looks for first, as one row (missing values are None).

        Keys: ``status``, ``rounds_completed``, ``rounds`` (configured), ``strategy``,
        ``privacy_mode``, ``epsilon_spent`` (an :class:`EpsilonSpent`), ``mean_round_s``
        and the last round's value of every :data:`HEADLINE_METRICS` key.
        """
        row: dict[str, Any] = {
            "status": self.attrs.get("status"),
            "rounds_completed": int(self.attrs.get("rounds_completed", len(self.rounds))),
            "rounds": self.config_value("rounds"),
            "strategy": self.config_value("strategy", DEFAULT_STRATEGY),
            "privacy_mode": self.config_value("client.privacy.mode", "none"),
            "epsilon_spent": self.epsilon_spent(),
        }
        for name in HEADLINE_METRICS:
            values = self.metric(name)
            row[name] = None if values is None else _cell(values[-1])
        wall = self.timings.get("round")
        row["mean_round_s"] = (float(np.nanmean(wall)) if wall is not None and wall.dtype != object
                               and np.isfinite(wall).any() else None)
        return row

    def per_round_rows(self) -> list[dict[str, Any]]:
        """One dict per round: ``round`` and every server, eval, timing and client value.

        Keys: ``round``, ``server.<key>``, ``eval.<key>``, ``timings.<key>``,
        ``client_<k>.status`` and ``client_<k>.<metric>`` (free-text ``error`` and
        ``traceback`` are left out; read them from :attr:`clients`). Missing values are
        None.
        """
        columns: dict[str, np.ndarray] = {}
        for prefix, table in (("server", self.server), ("eval", self.eval),
                              ("timings", self.timings)):
            for key, values in table.items():
                columns[f"{prefix}.{key}"] = values
        for cid in sorted(self.clients):
            cols = self.clients[cid]
            for key in (["status"] if "status" in cols else []) + sorted(cols):
                if key not in CLIENT_TEXT_KEYS and f"client_{cid}.{key}" not in columns:
                    columns[f"client_{cid}.{key}"] = cols[key]
        return [{"round": r, **{k: _cell(v[i]) for k, v in columns.items()}}
                for i, r in enumerate(self.rounds)]

    def to_pandas(self) -> Any:
        """The per-round table as a ``pandas.DataFrame`` indexed by round (from 1).

        Columns as :meth:`per_round_rows`. pandas is optional: it is not a dependency of
        alignfl_mpi.

        Raises:
            ImportError: pandas is not installed (the message says how to install it).
        """
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Results.to_pandas() needs pandas, which alignfl_mpi does not "
                              "install; run `pip install pandas`") from None
        rows = self.per_round_rows()
        columns = list(dict.fromkeys(k for row in rows for k in row)) or ["round"]
        return pd.DataFrame(rows, columns=columns).set_index("round")

    def _group(self, round_: int) -> str:
        return f"{ROUNDS}/{round_key(round_ - self._offset)}"

    def synthetic(self, round_: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Round ``round_``'s (from 1) synthetic images (uint8) and client labels, if stored."""
        with h5py.File(self.path, "r") as f:
            key = f"{self._group(round_)}/{ROUND_SYNTHETIC}"
            if key not in f:
                return None
            return f[key]["images"][()], f[key]["client"][()]

    def final_global(self) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """``(spec, state)`` of the final global VAE, or None for an unfinished run."""
        with h5py.File(self.path, "r") as f:
            if f"{FINAL}/global" not in f:
                return None
            g = f[f"{FINAL}/global"]
            return json.loads(g.attrs["spec"]), {k: g[k][()] for k in g}

    def final_decoders(self) -> dict[int, dict[str, Any]]:
        """client id -> {spec, round, state, prior} of every client's last decoder."""
        out: dict[int, dict[str, Any]] = {}
        with h5py.File(self.path, "r") as f:
            if f"{FINAL}/decoders" not in f:
                return out
            for cid, c in f[f"{FINAL}/decoders"].items():
                out[int(cid)] = {"spec": json.loads(c.attrs["spec"]),
                                 "round": int(c.attrs["round"]) + self._offset,
                                 "state": {k: c["state"][k][()] for k in c["state"]},
                                 "prior": {k: c["prior"][k][()] for k in c["prior"]}}
        return out


def load(path: str | os.PathLike) -> Results:
    """Load a results file (finished, crashed, partial or still being written).

    Rounds are numbered from 1; a version-1 file (rounds from 0) is renumbered.

    Raises:
        SchemaError: Missing, unreadable, or not a results file of a readable version.
    """
    with _open(path, RESULTS_KIND) as f:
        attrs = _attrs(f)
        offset = 1 if attrs.get("schema_version") == 1 else 0
        config = json.loads(f.attrs[CONFIG_ATTR])
        keys = sorted(f[ROUNDS].keys(), key=int) if ROUNDS in f else []
        rounds = [int(k) + offset for k in keys]
        rows: dict[str, list[dict[str, Any]]] = {ROUND_SERVER: [], ROUND_EVAL: [],
                                                 ROUND_TIMINGS: []}
        client_rows: dict[int, list[dict[str, Any]]] = {}
        client_ids = sorted({int(c) for k in keys for c in f[ROUNDS][k][ROUND_CLIENTS]})
        for k in keys:
            g = f[ROUNDS][k]
            for name in rows:
                rows[name].append(_attrs(g[name]) if name in g else {})
            for cid in client_ids:
                cg = g[ROUND_CLIENTS].get(str(cid))
                row = _attrs(cg) if cg is not None else {}
                for name in CLIENT_ROUND_KEYS if offset else ():
                    if isinstance(row.get(name), (int, float)):
                        row[name] += offset
                client_rows.setdefault(cid, []).append(row)
    if offset and isinstance(attrs.get("resumed_at_round"), (int, float)):
        attrs["resumed_at_round"] += offset
    return Results(path=Path(path), attrs=attrs, config=config, rounds=rounds,
                   server=_columns(rows[ROUND_SERVER]), eval=_columns(rows[ROUND_EVAL]),
                   timings=_columns(rows[ROUND_TIMINGS]),
                   clients={cid: _columns(r) for cid, r in client_rows.items()},
                   _offset=offset)
