"""Partition schemes and cross-domain outlier injection.

A scheme maps the training labels to one index array per client. Schemes live in a
registry: adding one is a function decorated with :func:`register_scheme`.

* ``class-pairs`` (the paper's): client k gets classes (2k, 2k+1), the first
  ``per_class`` training samples of each class, in dataset order.
* ``dirichlet``: label skew; each class is split across clients with Dir(alpha) shares,
  then every client is topped up to ``min_per_client`` samples (default 1).
* ``iid``: a random, even split.

Outliers are ``n_outliers`` images drawn at random from the *other* dataset (for example
Fashion-MNIST into an MNIST client), given label :data:`~alignfl_mpi.schema.OUTLIER_LABEL`
and flagged, appended to client ``outlier_client``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .datasets import Dataset, load_dataset
from .errors import ConfigError
from .schema import OUTLIER_LABEL, ClientData, write_partition

log = logging.getLogger(__name__)

#: Default outlier domain for each dataset.
OUTLIER_SOURCES = {"mnist": "fashion-mnist", "fashion-mnist": "mnist"}

SchemeFn = Callable[..., list[np.ndarray]]
SCHEMES: dict[str, tuple[SchemeFn, dict[str, Any]]] = {}


def register_scheme(name: str, **defaults: Any) -> Callable[[SchemeFn], SchemeFn]:
    """Register a partition scheme with its default parameters."""
    def wrap(fn: SchemeFn) -> SchemeFn:
        SCHEMES[name] = (fn, defaults)
        return fn
    return wrap


@register_scheme("class-pairs", per_class=6000)
def class_pairs(labels: np.ndarray, *, n_clients: int, rng: np.random.Generator,
                per_class: int) -> list[np.ndarray]:
    """Client k gets classes (2k, 2k+1): the first ``per_class`` samples of each.

    >>> labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0])
    >>> [p.tolist() for p in class_pairs(labels, n_clients=2, rng=None, per_class=2)]
    [[0, 1, 4, 5], [2, 3, 6, 7]]
    """
    n_classes = int(labels.max()) + 1
    if 2 * n_clients > n_classes:
        raise ConfigError(f"class-pairs needs 2 classes per client: {n_clients} clients but "
                          f"only {n_classes} classes; use --clients {n_classes // 2} or less")
    if per_class < 1:
        raise ConfigError(f"--per-class must be positive, got {per_class}")
    parts = []
    for k in range(n_clients):
        idx = [np.flatnonzero(labels == c)[:per_class] for c in (2 * k, 2 * k + 1)]
        parts.append(np.sort(np.concatenate(idx)))
    return parts


@register_scheme("dirichlet", alpha=0.5, min_per_client=1)
def dirichlet(labels: np.ndarray, *, n_clients: int, rng: np.random.Generator,
              alpha: float, min_per_client: int) -> list[np.ndarray]:
    """Label skew: each class is split over clients with Dir(alpha) proportions.

    Each class's samples are shuffled and cut at the cumulative Dir(alpha) shares. With
    many clients or a small alpha some clients get few or no samples: every client with
    fewer than ``min_per_client`` is then topped up by :func:`top_up` (which moves
    samples of one class from the largest clients, so the skew is kept). Partitions
    that need no top-up are the same as without it.

    >>> parts = dirichlet(np.repeat(np.arange(3), 10), n_clients=2,
    ...                   rng=np.random.default_rng(0), alpha=1.0, min_per_client=1)
    >>> sum(len(p) for p in parts)
    30
    """
    if alpha <= 0:
        raise ConfigError(f"--alpha must be positive, got {alpha}")
    _check_min_per_client(min_per_client, n_clients=n_clients, n_samples=len(labels))
    owner = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(n_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int).clip(0, len(idx))
        sizes = np.diff(cuts, prepend=0, append=len(idx))
        owner[idx] = np.repeat(np.arange(n_clients), sizes)
    return top_up(group_by_owner(owner, n_clients), labels, min_per_client=min_per_client)


def group_by_owner(owner: np.ndarray, n_clients: int) -> list[np.ndarray]:
    """Sample indices per client, ascending, from each sample's client.

    >>> [p.tolist() for p in group_by_owner(np.array([1, 0, 1, 1]), 3)]
    [[1], [0, 2, 3], []]
    """
    order = np.argsort(owner, kind="stable")
    return np.split(order, np.cumsum(np.bincount(owner, minlength=n_clients))[:-1])


def _check_min_per_client(min_per_client: int, *, n_clients: int, n_samples: int) -> None:
    if isinstance(min_per_client, bool) or not isinstance(min_per_client, int) \
            or min_per_client < 0:
        raise ConfigError(f"min_per_client must be a whole number >= 0, got {min_per_client!r}")
    if min_per_client * n_clients > n_samples:
        raise ConfigError(f"min_per_client = {min_per_client} for {n_clients} clients needs "
                          f"{min_per_client * n_clients} samples, but the dataset has "
                          f"{n_samples}; lower min_per_client or use fewer clients")


def top_up(parts: list[np.ndarray], labels: np.ndarray, *,
           min_per_client: int) -> list[np.ndarray]:
    """Give every client at least ``min_per_client`` samples, taken from the largest ones.

    Clients below the minimum are served in id order. Each takes what it lacks from the
    currently largest client (ties: the lower id), from that client's most frequent class
    (ties: the lower class), its highest dataset indices first; a donor never drops below
    the minimum. Deterministic, and a no-op when every client has the minimum already.

    >>> labels = np.array([0, 0, 0, 1, 1, 2])
    >>> parts = [np.array([0, 1, 2, 3, 4]), np.array([], np.int64), np.array([5])]
    >>> [p.tolist() for p in top_up(parts, labels, min_per_client=2)]
    [[0, 3], [1, 2], [4, 5]]

    Raises:
        ConfigError: Fewer samples than ``min_per_client`` times the number of clients.
    """
    _check_min_per_client(min_per_client, n_clients=len(parts), n_samples=len(labels))
    parts = list(parts)
    sizes = np.array([len(p) for p in parts], np.int64)
    for k in np.flatnonzero(sizes < min_per_client):
        while sizes[k] < min_per_client:
            donor = int(np.argmax(sizes))  # > min_per_client: the total covers everyone
            have = labels[parts[donor]]
            classes, counts = np.unique(have, return_counts=True)
            cls = classes[np.argmax(counts)]
            give = int(min(min_per_client - sizes[k], sizes[donor] - min_per_client,
                           counts.max()))
            moved = parts[donor][have == cls][-give:]
            parts[donor] = parts[donor][~np.isin(parts[donor], moved)]
            parts[k] = np.concatenate([parts[k], moved]).astype(np.int64)
            sizes[donor] -= give
            sizes[k] += give
    return [np.sort(p) for p in parts]


@register_scheme("iid")
def iid(labels: np.ndarray, *, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random split into ``n_clients`` parts of equal size (within one).

    >>> [len(p) for p in iid(np.zeros(10, int), n_clients=3, rng=np.random.default_rng(0))]
    [4, 3, 3]
    """
    if n_clients > len(labels):
        raise ConfigError(f"iid: {n_clients} clients but only {len(labels)} samples; "
                          "some clients would be empty, use fewer clients")
    return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), n_clients)]


@dataclass(frozen=True, kw_only=True)
class PartitionRequest:
    """Everything that determines a partition file's content."""

    dataset: str = "mnist"
    scheme: str = "class-pairs"
    n_clients: int = 5
    params: dict[str, Any] = field(default_factory=dict)
    n_outliers: int = 600
    outlier_dataset: str | None = None     # None: the default other domain
    outlier_client: int = 0
    seed: int = 0

    def resolved_params(self) -> dict[str, Any]:
        """The scheme's parameters: defaults overridden by ``params``, strictly checked."""
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown partition scheme {self.scheme!r}; choose one of: "
                              f"{', '.join(sorted(SCHEMES))}")
        defaults = SCHEMES[self.scheme][1]
        unknown = set(self.params) - set(defaults)
        if unknown:
            raise ConfigError(f"scheme {self.scheme!r} takes no parameter "
                              f"{sorted(unknown)[0]!r}; it takes: "
                              f"{', '.join(sorted(defaults)) or 'none'}")
        return {**defaults, **self.params}

    def outlier_source(self) -> str:
        if self.outlier_dataset:
            return self.outlier_dataset
        if self.dataset not in OUTLIER_SOURCES:
            raise ConfigError(f"no default outlier dataset for {self.dataset!r}; "
                              "pass --outlier-dataset")
        return OUTLIER_SOURCES[self.dataset]


def split_clients(request: PartitionRequest, main: Dataset,
                  other: Dataset | None) -> list[ClientData]:
    """Apply the scheme and inject outliers. Pure: same inputs, same output."""
    if request.n_clients < 1:
        raise ConfigError(f"--clients must be at least 1, got {request.n_clients}")
    if not 0 <= request.outlier_client < request.n_clients:
        raise ConfigError(f"--outlier-client {request.outlier_client} is out of range "
                          f"0..{request.n_clients - 1}")
    if request.n_outliers < 0:
        raise ConfigError(f"--outliers must be >= 0, got {request.n_outliers}")
    params = request.resolved_params()
    rng = np.random.default_rng(request.seed)
    parts = SCHEMES[request.scheme][0](main.train_labels, n_clients=request.n_clients,
                                       rng=rng, **params)
    clients = []
    for k, idx in enumerate(parts):
        images, labels = main.train_images[idx], main.train_labels[idx]
        flags, source = np.zeros(len(idx), bool), idx.astype(np.int64)
        if k == request.outlier_client and request.n_outliers and other is not None:
            pool = len(other.train_labels)
            if request.n_outliers > pool:
                raise ConfigError(f"--outliers {request.n_outliers} exceeds the "
                                  f"{pool} images of {other.info.name}")
            pick = np.sort(np.random.default_rng([request.seed, 1]).choice(
                pool, size=request.n_outliers, replace=False))
            images = np.concatenate([images, other.train_images[pick]])
            labels = np.concatenate([labels, np.full(len(pick), OUTLIER_LABEL, np.int64)])
            flags = np.concatenate([flags, np.ones(len(pick), bool)])
            source = np.concatenate([source, pick.astype(np.int64)])
        clients.append(ClientData(client_id=k, images=images, labels=labels,
                                  outlier=flags, source_index=source))
    return clients


def default_partition_path(request: PartitionRequest, root: str | os.PathLike) -> Path:
    """``ROOT/partitions/<dataset>_<scheme>[-<param><value>...]_c<N>_o<M>[-<outlier-dataset>]_oc<k>_s<seed>.h5``.

    Every setting that changes the content is in the name, so two requests share a
    default file only when they would write the same partition.
    """
    params = "".join(f"-{k}{v}" for k, v in sorted(request.resolved_params().items()))
    other = f"-{request.outlier_dataset}" if request.outlier_dataset else ""
    name = (f"{request.dataset}_{request.scheme}{params}_c{request.n_clients}_"
            f"o{request.n_outliers}{other}_oc{request.outlier_client}_s{request.seed}.h5")
    return Path(root) / "partitions" / name


def make_partition(request: PartitionRequest, *, output: str | os.PathLike,
                   root: str | os.PathLike | None = None, force: bool = False) -> list[ClientData]:
    """Load the datasets, split them and write the partition file.

    Raises:
        ConfigError: Bad parameters, or ``output`` exists and ``force`` is False.
        DataError: A needed dataset is missing or invalid.
    """
    output = Path(output)
    if output.exists() and not force:
        raise ConfigError(f"{output} already exists; pass --force to overwrite it or "
                          "choose another --output")
    params = request.resolved_params()
    main = load_dataset(request.dataset, root=root)
    other = load_dataset(request.outlier_source(), root=root) if request.n_outliers else None
    clients = split_clients(request, main, other)
    if other is not None:  # the outlier domain's whole test split: held out from every client
        out_imgs, out_lbls = other.test_images, other.test_labels
    else:
        out_imgs = np.zeros((0, *main.info.image_shape), np.uint8)
        out_lbls = np.zeros(0, np.int64)
    sha = {f"{main.info.name}/{k}": v for k, v in main.sha256.items()}
    if other is not None:
        sha.update({f"{other.info.name}/{k}": v for k, v in other.sha256.items()})
    attrs = {
        "dataset": request.dataset,
        "outlier_dataset": other.info.name if other is not None else "",
        "scheme": request.scheme,
        "scheme_params": params,
        "seed": request.seed,
        "n_outliers": request.n_outliers if other is not None else 0,
        "outlier_client": request.outlier_client,
        "source_sha256": sha,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "package_version": __version__,
    }
    write_partition(output, clients=clients, test_images=main.test_images,
                    test_labels=main.test_labels, outlier_test_images=out_imgs,
                    outlier_test_labels=out_lbls, attrs=attrs)
    return clients


def describe(clients: list[ClientData]) -> str:
    """A per-client table of sizes, classes and outliers."""
    lines = ["client  in-domain  outliers    total  per-class counts"]
    for c in clients:
        classes, counts = np.unique(c.labels[~c.outlier], return_counts=True)
        per_class = ", ".join(f"{int(k)}:{int(n)}" for k, n in zip(classes, counts))
        inside = int((~c.outlier).sum())
        lines.append(f"{c.client_id:>6}  {inside:>9}  {int(c.outlier.sum()):>8}  "
                     f"{len(c.labels):>7}  {per_class}")
    return "\n".join(lines)
