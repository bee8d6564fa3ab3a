"""HDF5 layout: every group and dataset name, the schema version, and partition I/O.

Two kinds of file are written, told apart by the root attribute ``kind``:

* ``partition`` — one experiment's client split (see README, "HDF5 partition file").
* ``results`` — one run's results (names below; written by :mod:`alignfl_mpi.results`).

Every file carries ``schema_version``; readers refuse other versions with a clear error.
Partition files are at :data:`SCHEMA_VERSION`; results files at
:data:`RESULTS_SCHEMA_VERSION` (version 2 numbers rounds from 1; version 1 files, whose
rounds count from 0, are still read and renumbered by :func:`alignfl_mpi.results.load`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import SchemaError
from .fileio import atomic_path

SCHEMA_VERSION = 1                  # partition files
#: Results files: 2 numbers rounds from 1 (``/rounds/0001`` is the first round); 1 from 0.
RESULTS_SCHEMA_VERSION = 2
#: Results versions :func:`_open` accepts (older ones are renumbered on load).
RESULTS_READABLE_VERSIONS = (1, 2)
OUTLIER_LABEL = 10

# --- partition file -------------------------------------------------------------------
PARTITION_KIND = "partition"
CLIENTS = "clients"                 # /clients/<k>/{images,labels,outlier,source_index}
IMAGES = "images"
LABELS = "labels"
OUTLIER = "outlier"
SOURCE_INDEX = "source_index"
TEST = "test"                       # /test/{images,labels}: in-domain real test set
OUTLIER_TEST = "outlier_test"       # /outlier_test/{images,labels}: held-out outlier domain

PARTITION_ATTRS = ("schema_version", "kind", "dataset", "outlier_dataset", "scheme",
                   "scheme_params", "seed", "n_clients", "n_outliers", "outlier_client",
                   "source_sha256", "created", "package_version", "client_sizes")

# --- results file ---------------------------------------------------------------------
RESULTS_KIND = "results"
CONFIG_ATTR = "config"              # root attribute: the resolved config as JSON
ROUNDS = "rounds"                   # /rounds/<r>/...
ROUND_CLIENTS = "clients"           # /rounds/<r>/clients/<k> attrs: metrics
ROUND_SERVER = "server"             # /rounds/<r>/server attrs: server losses
ROUND_EVAL = "eval"                 # /rounds/<r>/eval attrs: evaluation metrics
ROUND_TIMINGS = "timings"           # /rounds/<r>/timings attrs: seconds per phase
ROUND_SYNTHETIC = "synthetic"       # /rounds/<r>/synthetic/{images,client}
FINAL = "final"                     # /final/global/<param>, /final/decoders/<k>/<param>
CHECKPOINT_NAME = "server.ckpt"


def _json_attr(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


@dataclass(frozen=True)
class ClientData:
    """One client's partition group."""

    client_id: int
    images: np.ndarray        # uint8 (n, H, W)
    labels: np.ndarray        # int64 (n,), OUTLIER_LABEL for outliers
    outlier: np.ndarray       # bool (n,)
    source_index: np.ndarray  # int64 (n,), index into the source dataset's training set


@dataclass(frozen=True)
class PartitionInfo:
    """The root attributes of a partition file."""

    path: Path
    attrs: dict[str, Any]

    @property
    def n_clients(self) -> int:
        return int(self.attrs["n_clients"])

    @property
    def dataset(self) -> str:
        return str(self.attrs["dataset"])


def write_partition(path: str | os.PathLike, *, clients: list[ClientData],
                    test_images: np.ndarray, test_labels: np.ndarray,
                    outlier_test_images: np.ndarray, outlier_test_labels: np.ndarray,
                    attrs: dict[str, Any]) -> Path:
    """Write a partition file atomically (temporary file, then rename).

    ``attrs`` holds the experiment attributes; dict and list values are stored as JSON.
    """
    final = Path(path)
    with atomic_path(final) as tmp, h5py.File(tmp, "w") as f:
        root = dict(attrs, schema_version=SCHEMA_VERSION, kind=PARTITION_KIND,
                    n_clients=len(clients),
                    client_sizes=[int(len(c.labels)) for c in clients])
        for key, value in root.items():
            f.attrs[key] = _json_attr(value) if isinstance(value, (dict, list)) else value
        group = f.create_group(CLIENTS)
        for c in clients:
            g = group.create_group(str(c.client_id))
            g.create_dataset(IMAGES, data=c.images, compression="gzip", compression_opts=4,
                             chunks=(min(len(c.images), 1024) or 1, *c.images.shape[1:]))
            g.create_dataset(LABELS, data=c.labels.astype(np.int64))
            g.create_dataset(OUTLIER, data=c.outlier.astype(bool))
            g.create_dataset(SOURCE_INDEX, data=c.source_index.astype(np.int64))
            g.attrs["n_samples"] = len(c.labels)
            g.attrs["n_outliers"] = int(c.outlier.sum())
            g.attrs["n_in_domain"] = int((~c.outlier).sum())
            g.attrs["classes"] = _json_attr(sorted(int(x) for x in
                                                   np.unique(c.labels[~c.outlier])))
        for name, imgs, lbls in ((TEST, test_images, test_labels),
                                 (OUTLIER_TEST, outlier_test_images, outlier_test_labels)):
            g = f.create_group(name)
            g.create_dataset(IMAGES, data=imgs, compression="gzip", compression_opts=4)
            g.create_dataset(LABELS, data=lbls.astype(np.int64))
    return final


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def _open(path: str | os.PathLike, kind: str) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise SchemaError(f"{path}: not a readable HDF5 file ({exc})") from None
    version = f.attrs.get("schema_version")
    found = _decode_attr(f.attrs.get("kind"))
    if found != kind:
        f.close()
        raise SchemaError(f"{path}: not a {kind} file (kind={found!r})")
    readable = RESULTS_READABLE_VERSIONS if kind == RESULTS_KIND else (SCHEMA_VERSION,)
    if _decode_attr(version) not in readable:
        f.close()
        versions = " or ".join(str(v) for v in readable)
        raise SchemaError(f"{path}: schema_version {version} is not supported (this "
                          f"alignfl_mpi reads version {versions}); re-create the file")
    return f


def read_partition_info(path: str | os.PathLike, *,
                        expected_clients: int | None = None) -> PartitionInfo:
    """Read and validate a partition file's attributes and group structure.

    Raises:
        SchemaError: Wrong kind or version, missing groups, or a client count other
            than ``expected_clients``.
    """
    with _open(path, PARTITION_KIND) as f:
        attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
        for key in PARTITION_ATTRS:
            if key not in attrs:
                raise SchemaError(f"{path}: missing root attribute {key!r}")
        n = int(attrs["n_clients"])
        groups = sorted(f[CLIENTS].keys(), key=int) if CLIENTS in f else []
        if groups != [str(i) for i in range(n)]:
            raise SchemaError(f"{path}: expected client groups 0..{n - 1}, found {groups}")
        for name in (TEST, OUTLIER_TEST):
            if name not in f:
                raise SchemaError(f"{path}: missing group /{name}")
    if expected_clients is not None and n != expected_clients:
        raise SchemaError(f"{path}: partition has {n} clients but the run is configured for "
                          f"{expected_clients}; re-partition with --clients {expected_clients} "
                          "or change the config")
    return PartitionInfo(path=Path(path), attrs=attrs)


def _check_dataset(path: Any, group: h5py.Group, name: str, dtype: Any, ndim: int,
                   length: int | None) -> np.ndarray:
    if name not in group:
        raise SchemaError(f"{path}: missing dataset {group.name}/{name}")
    ds = group[name]
    if ds.dtype != np.dtype(dtype) or ds.ndim != ndim:
        raise SchemaError(f"{path}: {ds.name} has dtype {ds.dtype} and {ds.ndim} dims, "
                          f"expected {np.dtype(dtype)} with {ndim}")
    if length is not None and ds.shape[0] != length:
        raise SchemaError(f"{path}: {ds.name} has {ds.shape[0]} rows, expected {length}")
    return ds[()]


def read_client(path: str | os.PathLike, client_id: int) -> ClientData:
    """Read one client's group, validating dtypes and shapes."""
    with _open(path, PARTITION_KIND) as f:
        key = f"{CLIENTS}/{client_id}"
        if key not in f:
            raise SchemaError(f"{path}: no client group /{key}")
        g = f[key]
        images = _check_dataset(path, g, IMAGES, np.uint8, 3, None)
        n = len(images)
        return ClientData(client_id=client_id, images=images,
                          labels=_check_dataset(path, g, LABELS, np.int64, 1, n),
                          outlier=_check_dataset(path, g, OUTLIER, bool, 1, n),
                          source_index=_check_dataset(path, g, SOURCE_INDEX, np.int64, 1, n))


def client_sizes(path: str | os.PathLike) -> list[int]:
    """Training samples per client, read from the dataset shapes (no image is loaded).

    Raises:
        SchemaError: A client group lacks its labels.
    """
    with _open(path, PARTITION_KIND) as f:
        sizes = []
        for key in sorted(f[CLIENTS].keys(), key=int) if CLIENTS in f else []:
            if LABELS not in f[CLIENTS][key]:
                raise SchemaError(f"{path}: missing dataset /{CLIENTS}/{key}/{LABELS}")
            sizes.append(int(f[CLIENTS][key][LABELS].shape[0]))
        return sizes


def read_split(path: str | os.PathLike, name: str = TEST) -> tuple[np.ndarray, np.ndarray]:
    """Read ``/test`` or ``/outlier_test`` as ``(images uint8, labels int64)``."""
    with _open(path, PARTITION_KIND) as f:
        if name not in f:
            raise SchemaError(f"{path}: missing group /{name}")
        images = _check_dataset(path, f[name], IMAGES, np.uint8, 3, None)
        labels = _check_dataset(path, f[name], LABELS, np.int64, 1, len(images))
        return images, labels
