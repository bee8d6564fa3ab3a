import gzip

import numpy as np
import pytest
from conftest import write_idx_folder

from alignfl_mpi.datasets import (
    DATASETS,
    encode_idx,
    guess_dataset,
    import_dataset,
    load_dataset,
    parse_idx,
    read_dataset_folder,
)
from alignfl_mpi.errors import DataError


def test_parse_idx_roundtrip_3d():
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = parse_idx(encode_idx(arr))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)


def test_parse_idx_big_endian_int32():
    data = bytes([0, 0, 0x0C, 1, 0, 0, 0, 2]) + (258).to_bytes(4, "big") + (7).to_bytes(4, "big")
    assert parse_idx(data).tolist() == [258, 7]


@pytest.mark.parametrize("data, fragment", [
    (b"\x00\x00", "too short"),
    (b"\x01\x02\x08\x01\x00\x00\x00\x01\x05", "bad IDX magic"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "bad IDX magic"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x01", "truncated IDX header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "truncated"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "trailing bytes"),
])
def test_parse_idx_errors(data, fragment):
    with pytest.raises(DataError, match=fragment):
        parse_idx(data, source="x.idx")


def test_import_and_load_tiny(tiny_root):
    ds = load_dataset("tiny", root=tiny_root)
    assert ds.train_images.shape == (400, 28, 28) and ds.train_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int64 and set(ds.train_labels) == set(range(10))
    assert len(ds.sha256) == 4 and all(len(h) == 64 for h in ds.sha256.values())
    # plain (not gzipped) files import too
    other = load_dataset("tiny-other", root=tiny_root)
    assert other.test_images.shape == (100, 28, 28)


def test_truncated_gzip_names_file(tmp_path):
    folder = tmp_path / "tiny"
    write_idx_folder(folder, n_train=20, n_test=10, seed=0)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: corrupt or truncated"):
        read_dataset_folder(folder, DATASETS["tiny"])


def test_truncated_plain_file(tmp_path):
    folder = tmp_path / "tiny"
    write_idx_folder(folder, n_train=20, n_test=10, seed=0, gz=False)
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: truncated"):
        read_dataset_folder(folder, DATASETS["tiny"])


def test_label_out_of_range(tmp_path):
    folder = tmp_path / "tiny"
    write_idx_folder(folder, n_train=20, n_test=10, seed=0)
    labels = np.full(20, 12, np.uint8)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(encode_idx(labels)))
    with pytest.raises(DataError, match="label 12 out of range"):
        read_dataset_folder(folder, DATASETS["tiny"])


def test_count_mismatch(tmp_path):
    folder = tmp_path / "tiny"
    write_idx_folder(folder, n_train=20, n_test=10, seed=0)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(encode_idx(np.zeros(19, np.uint8))))
    with pytest.raises(DataError, match="20 images but .* 19 labels"):
        read_dataset_folder(folder, DATASETS["tiny"])


def test_expected_count_enforced(tmp_path):
    folder = tmp_path / "mnist"
    write_idx_folder(folder, n_train=20, n_test=10, seed=0)
    with pytest.raises(DataError, match="20 images, expected 60000"):
        read_dataset_folder(folder, DATASETS["mnist"])


def test_wrong_image_shape(tmp_path):
    folder = tmp_path / "tiny"
    write_idx_folder(folder, n_train=20, n_test=10, seed=0)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(encode_idx(np.zeros((10, 32, 32), np.uint8))))
    with pytest.raises(DataError, match="expected uint8 images of shape"):
        read_dataset_folder(folder, DATASETS["tiny"])


def test_missing_file_and_dataset(tmp_path):
    folder = tmp_path / "tiny"
    write_idx_folder(folder, n_train=20, n_test=10, seed=0)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        import_dataset(folder, root=tmp_path / "root")
    assert not (tmp_path / "root" / "tiny").exists()  # nothing half-imported
    with pytest.raises(DataError, match="not found in data root"):
        load_dataset("tiny", root=tmp_path / "empty")
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        load_dataset("nope", root=tmp_path)


def test_guess_dataset_names(tmp_path):
    for name, expected in (("mnist", "mnist"), ("fashion-mnist", "fashion-mnist"),
                           ("FashionMNIST/raw", "fashion-mnist"), ("MNIST/raw", "mnist"),
                           ("stuff", None)):
        (tmp_path / name).mkdir(parents=True)
        assert guess_dataset(tmp_path / name) == expected


def test_torchvision_raw_layout(tmp_path):
    write_idx_folder(tmp_path / "tiny" / "raw", n_train=20, n_test=10, seed=3, gz=False)
    ds = import_dataset(tmp_path / "tiny", root=tmp_path / "root")
    assert len(ds.train_labels) == 20
    assert (tmp_path / "root" / "tiny" / "train-images-idx3-ubyte").is_file()


def test_real_mnist_counts(real_root):
    ds = load_dataset("mnist", root=real_root)
    counts = np.bincount(ds.train_labels, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert len(ds.test_labels) == 10000
