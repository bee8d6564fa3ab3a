"""Results HDF5: the writer (rank 0 only) and the post-processing API :func:`load`.

Every update goes to a copy of the file that is renamed over the original, so a crash
at any moment leaves the last complete round readable and never a corrupt file.

>>> # res = load("runs/alignfl/results.h5")
>>> # res.eval["latent_accuracy"]      -> one value per round
>>> # res.clients[0]["loss"]           -> client 0's local loss per round
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from . import __version__
from .errors import ConfigError, SchemaError
from .schema import (CONFIG_ATTR, FINAL, RESULTS_KIND, ROUND_CLIENTS, ROUND_EVAL, ROUND_SERVER,
                     ROUND_SYNTHETIC, ROUND_TIMINGS, ROUNDS, SCHEMA_VERSION, _decode_attr,
                     _open, atomic_h5_path)

RESULTS_NAME = "results.h5"


def round_key(round_: int) -> str:
    """Group name of a round: zero-padded so that names sort by round.

    >>> round_key(7)
    '0007'
    """
    return f"{round_:04d}"


def _set_attrs(group: h5py.Group, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (dict, list, tuple)):
            value = json.dumps(value, sort_keys=True)
        group.attrs[key] = value


class ResultsWriter:
    """Writes one run's results; used by rank 0 only."""

    def __init__(self, path: str | os.PathLike, *, config_json: str,
                 attrs: dict[str, Any], resume_from_round: int | None = None) -> None:
        """Create the file, or (``resume_from_round``) reopen it and drop later rounds.

        Raises:
            ConfigError: The file exists and this is not a resume.
        """
        self.path = Path(path)
        if resume_from_round is None or not self.path.exists():
            if self.path.exists():
                raise ConfigError(f"{self.path} already exists; pass --resume to continue that "
                                  "run or choose another --output directory")
            final, tmp = atomic_h5_path(self.path)
            try:
                with h5py.File(tmp, "w") as f:
                    _set_attrs(f, dict(attrs, schema_version=SCHEMA_VERSION, kind=RESULTS_KIND,
                                       package_version=__version__, status="running",
                                       rounds_completed=0,
                                       created=_dt.datetime.now(_dt.timezone.utc)
                                       .isoformat(timespec="seconds")))
                    f.attrs[CONFIG_ATTR] = config_json
                    f.create_group(ROUNDS)
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    tmp.unlink()
        else:
            _open(self.path, RESULTS_KIND).close()

            def drop(f: h5py.File) -> None:
                for key in list(f[ROUNDS].keys()):
                    if int(key) >= resume_from_round:
                        del f[ROUNDS][key]
                if FINAL in f:
                    del f[FINAL]
                f.attrs["status"] = "running"
                f.attrs["rounds_completed"] = resume_from_round
                f.attrs[CONFIG_ATTR] = config_json
                f.attrs["resumed_at_round"] = resume_from_round
            self._update(drop)

    def _update(self, fn: Callable[[h5py.File], None]) -> None:
        final, tmp = atomic_h5_path(self.path)
        try:
            shutil.copyfile(final, tmp)
            with h5py.File(tmp, "a") as f:
                fn(f)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()

    def write_round(self, round_: int, *, clients: dict[int, dict[str, Any]],
                    server: dict[str, Any], evaluation: dict[str, Any],
                    timings: dict[str, float],
                    synthetic: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Append one round (replacing it if present)."""
        def write(f: h5py.File) -> None:
            rounds = f[ROUNDS]
            key = round_key(round_)
            if key in rounds:
                del rounds[key]
            g = rounds.create_group(key)
            g.attrs["round"] = round_
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
        """Rewrite a round's timings (the round's own I/O is only known after writing)."""
        def write(f: h5py.File) -> None:
            _set_attrs(f[ROUNDS][round_key(round_)][ROUND_TIMINGS], timings)
        self._update(write)

    def write_final(self, *, global_state: dict[str, np.ndarray], global_spec: dict[str, Any],
                    decoders: dict[int, dict[str, Any]]) -> None:
        """Store the final global model and every client's last decoder and prior.

        ``decoders[k]`` holds ``spec`` (dict), ``state`` and ``prior`` (name -> array),
        and ``round`` (the round of that update).
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
                c.attrs["round"] = d["round"]
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


@dataclass
class Results:
    """A results file loaded for analysis; per-round tables are dicts of arrays.

    Attributes:
        path: The file.
        attrs: Root attributes (status, rounds_completed, partition, ...).
        config: The resolved run config.
        rounds: Round numbers present (a crashed run has fewer than configured).
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

    @property
    def finished(self) -> bool:
        return self.attrs.get("status") == "finished"

    def synthetic(self, round_: int) -> tuple[np.ndarray, np.ndarray] | None:
        """That round's synthetic images (uint8) and client labels, if stored."""
        with h5py.File(self.path, "r") as f:
            key = f"{ROUNDS}/{round_key(round_)}/{ROUND_SYNTHETIC}"
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
                                 "round": int(c.attrs["round"]),
                                 "state": {k: c["state"][k][()] for k in c["state"]},
                                 "prior": {k: c["prior"][k][()] for k in c["prior"]}}
        return out


def load(path: str | os.PathLike) -> Results:
    """Load a results file (finished, crashed or partial) into per-round tables.

    Raises:
        SchemaError: Not a results file of this schema version.
    """
    with _open(path, RESULTS_KIND) as f:
        attrs = _attrs(f)
        config = json.loads(f.attrs[CONFIG_ATTR])
        keys = sorted(f[ROUNDS].keys(), key=int) if ROUNDS in f else []
        rounds = [int(k) for k in keys]
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
                client_rows.setdefault(cid, []).append(_attrs(cg) if cg is not None else {})
    return Results(path=Path(path), attrs=attrs, config=config, rounds=rounds,
                   server=_columns(rows[ROUND_SERVER]), eval=_columns(rows[ROUND_EVAL]),
                   timings=_columns(rows[ROUND_TIMINGS]),
                   clients={cid: _columns(r) for cid, r in client_rows.items()})
