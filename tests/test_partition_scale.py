"""Partitions for many clients: dirichlet and iid up to 1000 clients, no empty client."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_idx_folder

from alignfl_mpi.datasets import import_dataset, load_dataset
from alignfl_mpi.errors import ConfigError
from alignfl_mpi.partition import (
    PartitionRequest,
    default_partition_path,
    dirichlet,
    iid,
    make_partition,
    split_clients,
    top_up,
)
from alignfl_mpi.schema import OUTLIER_LABEL, client_sizes, read_client, read_partition_info


def _loop_dirichlet(labels: np.ndarray, *, n_clients: int, rng: np.random.Generator,
                    alpha: float) -> list[np.ndarray]:
    """The per-client loop the scheme had before it was vectorised (a copy)."""
    buckets: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(n_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            buckets[k].append(chunk)
    return [np.sort(np.concatenate(b)) for b in buckets]


def _labels(n: int = 60000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10, n).astype(np.int64)


@pytest.mark.parametrize("n_clients, alpha, seed", [(5, 0.5, 0), (100, 0.3, 1),
                                                    (1000, 0.05, 2), (1000, 1.0, 3)])
def test_vectorised_dirichlet_is_the_old_partition(n_clients, alpha, seed):
    labels = _labels()
    old = _loop_dirichlet(labels, n_clients=n_clients, rng=np.random.default_rng(seed),
                          alpha=alpha)
    new = dirichlet(labels, n_clients=n_clients, rng=np.random.default_rng(seed), alpha=alpha,
                    min_per_client=0)
    assert len(new) == n_clients
    for a, b in zip(old, new):
        np.testing.assert_array_equal(a, b)
    if min(len(p) for p in old) >= 1:  # no client to top up: the default changes nothing
        default = dirichlet(labels, n_clients=n_clients, rng=np.random.default_rng(seed),
                            alpha=alpha, min_per_client=1)
        for a, b in zip(old, default):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("minimum", [1, 20])
def test_dirichlet_with_1000_clients_tops_up_the_empty_ones(minimum):
    labels = _labels()
    rng = np.random.default_rng(5)
    raw = dirichlet(labels, n_clients=1000, rng=rng, alpha=0.05, min_per_client=0)
    raw_sizes = np.array([len(p) for p in raw])
    assert (raw_sizes == 0).sum() > 10  # the case being fixed: many empty clients
    parts = dirichlet(labels, n_clients=1000, rng=np.random.default_rng(5), alpha=0.05,
                      min_per_client=minimum)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= minimum
    # every sample exactly once, each part sorted
    everything = np.concatenate(parts)
    assert len(everything) == len(labels) and len(np.unique(everything)) == len(labels)
    assert all((np.diff(p) > 0).all() for p in parts)
    # clients that had the minimum only ever give; the others only receive what they lack
    short = raw_sizes < minimum
    np.testing.assert_array_equal(sizes[short], minimum)
    for k in np.flatnonzero(~short):
        assert set(parts[k].tolist()) <= set(raw[k].tolist())
    assert sizes.sum() == raw_sizes.sum()
    # a client that had nothing gets one class (the donor's most frequent one): still skewed
    if minimum == 1:
        for k in np.flatnonzero(raw_sizes == 0):
            assert len(np.unique(labels[parts[k]])) == 1


def test_top_up_takes_from_the_largest_client_and_its_largest_class():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    parts = [np.array([0, 1, 2, 3, 4]), np.array([], np.int64), np.array([5, 6, 7, 8, 9])]
    out = top_up(parts, labels, min_per_client=3)
    # clients 0 and 2 tie (5 each): the lower id gives what it can spare while keeping
    # the minimum (2 of its class 0, highest indices first), then client 2 gives one more
    assert [p.tolist() for p in out] == [[0, 3, 4], [1, 2, 9], [5, 6, 7, 8]]
    out = top_up([*out, np.array([], np.int64)], labels, min_per_client=2)
    assert [p.tolist() for p in out] == [[0, 3, 4], [1, 2, 9], [5, 6], [7, 8]]
    # nothing to do: the same partition back
    same = top_up(out, labels, min_per_client=2)
    assert all(np.array_equal(a, b) for a, b in zip(out, same))


def test_minimum_and_client_count_are_checked():
    labels = _labels(100)
    with pytest.raises(ConfigError, match="needs 1100 samples, but the dataset has 100"):
        dirichlet(labels, n_clients=1100, rng=np.random.default_rng(0), alpha=0.5,
                  min_per_client=1)
    with pytest.raises(ConfigError, match="min_per_client must be a whole number >= 0"):
        dirichlet(labels, n_clients=10, rng=np.random.default_rng(0), alpha=0.5,
                  min_per_client=-1)
    with pytest.raises(ConfigError, match="min_per_client must be a whole number >= 0"):
        dirichlet(labels, n_clients=10, rng=np.random.default_rng(0), alpha=0.5,
                  min_per_client=2.5)
    with pytest.raises(ConfigError, match="iid: 101 clients but only 100 samples"):
        iid(labels, n_clients=101, rng=np.random.default_rng(0))
    sizes = [len(p) for p in iid(labels, n_clients=100, rng=np.random.default_rng(0))]
    assert sizes == [1] * 100


def test_min_per_client_is_a_named_setting_in_the_default_file_name(tmp_path):
    req = PartitionRequest(scheme="dirichlet", n_clients=1000, params={"min_per_client": 5})
    assert req.resolved_params() == {"alpha": 0.5, "min_per_client": 5}
    assert default_partition_path(req, tmp_path).name == (
        "mnist_dirichlet-alpha0.5-min_per_client5_c1000_o600_oc0_s0.h5")
    default = PartitionRequest(scheme="dirichlet", n_clients=10)
    assert default.resolved_params()["min_per_client"] == 1


@pytest.fixture
def mid_root(tmp_path):
    """A data root with a 6000-image main dataset (the tiny pair's names, more images)."""
    src = tmp_path / "src"
    write_idx_folder(src / "tiny", n_train=6000, n_test=100, seed=1)
    write_idx_folder(src / "tiny-other", n_train=300, n_test=50, seed=2)
    root = tmp_path / "data"
    import_dataset(src / "tiny", root=root)
    import_dataset(src / "tiny-other", name="tiny-other", root=root)
    return root


def test_1000_clients_with_outliers_written_and_read_back(mid_root, tmp_path):
    req = PartitionRequest(dataset="tiny", scheme="dirichlet", n_clients=1000,
                           params={"alpha": 0.05}, n_outliers=40, outlier_client=999, seed=4)
    out = tmp_path / "p.h5"
    clients = make_partition(req, output=out, root=mid_root)
    info = read_partition_info(out, expected_clients=1000)
    sizes = client_sizes(out)
    assert sizes == [len(c.labels) for c in clients] == info.attrs["client_sizes"]
    assert info.attrs["scheme_params"] == {"alpha": 0.05, "min_per_client": 1}
    assert min(sizes) >= 1 and sum(sizes) == 6000 + 40  # every image once, plus outliers
    last = read_client(out, 999)
    assert int(last.outlier.sum()) == 40 and (last.labels[last.outlier] == OUTLIER_LABEL).all()
    assert all(int(c.outlier.sum()) == 0 for c in clients[:999])
    main = load_dataset("tiny", root=mid_root)
    mid = read_client(out, 500)
    np.testing.assert_array_equal(mid.images, main.train_images[mid.source_index])
    # the same seed gives the same partition
    again = split_clients(req, main, load_dataset("tiny-other", root=mid_root))
    assert all(np.array_equal(a.source_index, b.source_index) for a, b in zip(clients, again))


def test_1000_iid_clients_with_outliers(mid_root):
    req = PartitionRequest(dataset="tiny", scheme="iid", n_clients=1000, n_outliers=40,
                           outlier_client=0, seed=4)
    main, other = load_dataset("tiny", root=mid_root), load_dataset("tiny-other", root=mid_root)
    clients = split_clients(req, main, other)
    assert [len(c.labels) for c in clients] == [46] + [6] * 999
    assert int(clients[0].outlier.sum()) == 40
    index = np.concatenate([c.source_index[~c.outlier] for c in clients])
    assert sorted(index.tolist()) == list(range(6000))


def test_real_mnist_1000_dirichlet_clients_none_empty(real_root):
    main = load_dataset("mnist", root=real_root)
    other = load_dataset("fashion-mnist", root=real_root)
    req = PartitionRequest(scheme="dirichlet", n_clients=1000, params={"alpha": 0.1},
                           n_outliers=600, seed=0)
    old = _loop_dirichlet(main.train_labels, n_clients=1000, rng=np.random.default_rng(0),
                          alpha=0.1)
    assert sum(len(p) == 0 for p in old) > 0  # before: empty clients, refused by `run`
    clients = split_clients(req, main, other)
    assert min(len(c.labels) for c in clients) >= 1
    assert int(clients[0].outlier.sum()) == 600
    assert sum(int((~c.outlier).sum()) for c in clients) == 60000
