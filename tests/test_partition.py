import h5py
import numpy as np
import pytest

from alignfl_mpi.datasets import load_dataset
from alignfl_mpi.errors import ConfigError, SchemaError
from alignfl_mpi.partition import PartitionRequest, make_partition, split_clients
from alignfl_mpi.schema import (
    OUTLIER_LABEL,
    SCHEMA_VERSION,
    read_client,
    read_partition_info,
    read_split,
)


def _split(root, **kw):
    req = PartitionRequest(dataset="tiny", **kw)
    main = load_dataset("tiny", root=root)
    other = load_dataset("tiny-other", root=root)
    return req, main, other, split_clients(req, main, other)


def test_class_pairs_classes_counts_and_outliers(tiny_root):
    req, main, other, clients = _split(tiny_root, scheme="class-pairs", n_clients=5,
                                       params={"per_class": 30}, n_outliers=25,
                                       outlier_client=2)
    for k, c in enumerate(clients):
        inside = c.labels[~c.outlier]
        assert sorted(set(inside.tolist())) == [2 * k, 2 * k + 1]
        for cls in (2 * k, 2 * k + 1):
            available = int((main.train_labels == cls).sum())
            assert int((inside == cls).sum()) == min(30, available)
            # the first N of the class, in dataset order
            expected = np.flatnonzero(main.train_labels == cls)[:30]
            np.testing.assert_array_equal(np.sort(c.source_index[~c.outlier][inside == cls]),
                                          expected)
        assert int(c.outlier.sum()) == (25 if k == 2 else 0)
    c = clients[2]
    assert (c.labels[c.outlier] == OUTLIER_LABEL).all()
    src = c.source_index
    np.testing.assert_array_equal(c.images[c.outlier], other.train_images[src[c.outlier]])
    np.testing.assert_array_equal(c.images[~c.outlier], main.train_images[src[~c.outlier]])


def test_class_pairs_caps_at_available(tiny_root):
    _, main, _, clients = _split(tiny_root, n_clients=2, params={"per_class": 10**6},
                                 n_outliers=0)
    assert len(clients[0].labels) == int(np.isin(main.train_labels, [0, 1]).sum())


def test_class_pairs_too_many_clients(tiny_root):
    with pytest.raises(ConfigError, match="class-pairs needs 2 classes per client"):
        _split(tiny_root, n_clients=6)


def test_dirichlet_covers_everything_and_skews(tiny_root):
    _, main, _, clients = _split(tiny_root, scheme="dirichlet", n_clients=4,
                                 params={"alpha": 0.1}, n_outliers=0, seed=3)
    idx = np.concatenate([c.source_index for c in clients])
    assert sorted(idx.tolist()) == list(range(len(main.train_labels)))
    # strong skew: some client misses at least one class
    assert any(len(set(c.labels.tolist())) < 10 for c in clients)


def test_iid_even_and_seeded(tiny_root):
    _, _, _, a = _split(tiny_root, scheme="iid", n_clients=3, n_outliers=0, seed=1)
    _, _, _, b = _split(tiny_root, scheme="iid", n_clients=3, n_outliers=0, seed=2)
    assert [len(c.labels) for c in a] == [134, 133, 133]
    assert not np.array_equal(a[0].source_index, b[0].source_index)


@pytest.mark.parametrize("scheme, params", [("class-pairs", {"per_class": 20}),
                                            ("dirichlet", {"alpha": 0.5}), ("iid", {})])
def test_determinism(tiny_root, scheme, params):
    runs = [_split(tiny_root, scheme=scheme, params=params, n_clients=3, n_outliers=15,
                   seed=7)[3] for _ in range(2)]
    for x, y in zip(*runs):
        np.testing.assert_array_equal(x.source_index, y.source_index)
        np.testing.assert_array_equal(x.images, y.images)
        np.testing.assert_array_equal(x.outlier, y.outlier)


def test_bad_parameters(tiny_root):
    with pytest.raises(ConfigError, match="unknown partition scheme 'nope'"):
        _split(tiny_root, scheme="nope")
    with pytest.raises(ConfigError, match="takes no parameter 'alpha'"):
        _split(tiny_root, scheme="class-pairs", params={"alpha": 1.0})
    with pytest.raises(ConfigError, match="--outlier-client 9 is out of range"):
        _split(tiny_root, n_clients=3, outlier_client=9)
    with pytest.raises(ConfigError, match="exceeds the 300 images"):
        _split(tiny_root, n_clients=3, n_outliers=301)


def test_hdf5_roundtrip_and_attrs(tiny_root, tmp_path):
    out = tmp_path / "p.h5"
    req = PartitionRequest(dataset="tiny", n_clients=3, params={"per_class": 20},
                           n_outliers=12, seed=5)
    clients = make_partition(req, output=out, root=tiny_root)
    info = read_partition_info(out, expected_clients=3)
    assert info.attrs["schema_version"] == SCHEMA_VERSION
    assert info.attrs["scheme"] == "class-pairs"
    assert info.attrs["scheme_params"] == {"per_class": 20}
    assert info.attrs["seed"] == 5 and info.attrs["n_outliers"] == 12
    assert info.attrs["outlier_dataset"] == "tiny-other"
    assert info.attrs["client_sizes"] == [len(c.labels) for c in clients]
    assert len(info.attrs["source_sha256"]) == 8
    for c in clients:
        back = read_client(out, c.client_id)
        for name in ("images", "labels", "outlier", "source_index"):
            np.testing.assert_array_equal(getattr(back, name), getattr(c, name))
    images, labels = read_split(out)
    assert images.shape == (100, 28, 28) and labels.dtype == np.int64
    out_imgs, _ = read_split(out, "outlier_test")
    assert out_imgs.shape == (100, 28, 28)  # the outlier domain's whole test split
    # refuses to overwrite, keeps the old file
    before = out.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        make_partition(req, output=out, root=tiny_root)
    assert out.read_bytes() == before


def test_schema_validation_errors(tiny_root, tmp_path):
    out = tmp_path / "p.h5"
    make_partition(PartitionRequest(dataset="tiny", n_clients=2, params={"per_class": 5},
                                    n_outliers=0), output=out, root=tiny_root)
    with pytest.raises(SchemaError,
                       match="partition has 2 clients but the run is configured for 5"):
        read_partition_info(out, expected_clients=5)
    with h5py.File(out, "a") as f:
        f["clients/1/labels"][...] = 0
        del f["clients/1/outlier"]
        f["clients/1/outlier"] = np.zeros(3, bool)
    with pytest.raises(SchemaError, match="outlier has 3 rows, expected"):
        read_client(out, 1)
    with h5py.File(out, "a") as f:
        del f["clients/1/labels"]
        f["clients/1/labels"] = np.zeros(len(f["clients/1/images"]), np.float32)
    with pytest.raises(SchemaError, match="labels has dtype float32"):
        read_client(out, 1)
    with h5py.File(out, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(SchemaError, match="schema_version 99 is not supported"):
        read_partition_info(out)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(SchemaError, match="not a readable HDF5 file"):
        read_partition_info(tmp_path / "junk.h5")
    with pytest.raises(SchemaError, match="no such file"):
        read_partition_info(tmp_path / "missing.h5")


def test_real_paper_partition(real_root, tmp_path):
    out = tmp_path / "paper.h5"
    make_partition(PartitionRequest(), output=out, root=real_root)
    info = read_partition_info(out, expected_clients=5)
    sizes = [11923, 11958, 11263, 11918, 11800]
    assert info.attrs["client_sizes"] == [sizes[0] + 600] + sizes[1:]
    c0 = read_client(out, 0)
    assert int(c0.outlier.sum()) == 600 and int((~c0.outlier).sum()) == 11923
    assert info.attrs["outlier_dataset"] == "fashion-mnist"
