"""Datasets: IDX parsing and validation, the dataset registry, import and download.

A dataset lives in the data root as ``DATA_ROOT/<name>/`` holding the four standard IDX
files (gzipped or plain). ``alignfl-mpi data import DIR`` validates and copies them there
(the offline route); ``alignfl-mpi data download`` fetches them with torchvision first.

Adding a dataset is one :func:`register_dataset` call.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .fileio import atomic_dir

#: Environment variable that overrides the default data root (``./data``).
DATA_ROOT_ENV = "ALIGNFL_DATA_ROOT"

#: The four files of a dataset, by role, with their canonical IDX names.
FILE_ROLES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """A registered image-classification dataset in IDX format.

    Attributes:
        name: Registry key, also the folder name under the data root.
        num_classes: Labels must lie in ``[0, num_classes)``.
        image_shape: ``(H, W)`` of every image.
        train_count: Expected number of training images (None: any).
        test_count: Expected number of test images (None: any).
        torchvision_class: Name of the ``torchvision.datasets`` class used by download.
        aliases: Other folder names that identify this dataset on import.
    """

    name: str
    num_classes: int = 10
    image_shape: tuple[int, int] = (28, 28)
    train_count: int | None = None
    test_count: int | None = None
    torchvision_class: str | None = None
    aliases: tuple[str, ...] = ()


DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    """Add a dataset to the registry and return it."""
    DATASETS[info.name] = info
    return info


register_dataset(DatasetInfo(name="mnist", train_count=60000, test_count=10000,
                             torchvision_class="MNIST", aliases=("MNIST",)))
register_dataset(DatasetInfo(name="fashion-mnist", train_count=60000, test_count=10000,
                             torchvision_class="FashionMNIST",
                             aliases=("FashionMNIST", "fashion_mnist", "fashionmnist")))


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset: uint8 images (N, H, W), int64 labels, and source hashes."""

    info: DatasetInfo
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    sha256: dict[str, str]


def get_info(name: str) -> DatasetInfo:
    """Look up a dataset by name, with a one-line error for unknown names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; choose one of: "
                        f"{', '.join(sorted(DATASETS))}") from None


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """Resolve the data root: an explicit path, else ``$ALIGNFL_DATA_ROOT``, else ``./data``."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get(DATA_ROOT_ENV) or "data")


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    return raw


def parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Parse an uncompressed IDX buffer into an array, validating the header and size.

    Args:
        data: The raw IDX bytes.
        source: Name used in error messages.

    Returns:
        The array, in native byte order.

    Raises:
        DataError: The magic number, dimensions or size are wrong.

    >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9])).tolist()
    [7, 8, 9]
    """
    if len(data) < 4:
        raise DataError(f"{source}: too short to be an IDX file ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{source}: bad IDX magic number {data[:4].hex()} "
                        "(expected 0000 followed by a type code and dimension count)")
    ndim = data[3]
    if ndim == 0:
        raise DataError(f"{source}: IDX header declares zero dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{source}: truncated IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[data[2]]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    body = len(data) - header_len
    if body < expected:
        raise DataError(f"{source}: truncated: header declares shape {dims} "
                        f"({expected} bytes) but only {body} bytes follow")
    if body > expected:
        raise DataError(f"{source}: {body - expected} unexpected trailing bytes after "
                        f"the declared shape {dims}")
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def encode_idx(arr: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX bytes (the inverse of :func:`parse_idx`).

    >>> encode_idx(np.array([7, 8, 9], dtype=np.uint8))
    b'\\x00\\x00\\x08\\x01\\x00\\x00\\x00\\x03\\x07\\x08\\t'
    """
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def find_idx_file(folder: Path, role: str) -> Path | None:
    """Find the file for ``role`` in ``folder``: canonical name, gzipped or plain.

    Also accepts the ``train-images.idx3-ubyte`` spelling of the original distribution.
    """
    stem = FILE_ROLES[role]
    dotted = stem.replace("-idx", ".idx")
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def _dataset_files(folder: Path) -> dict[str, Path]:
    if (folder / "raw").is_dir() and find_idx_file(folder, "train_images") is None:
        folder = folder / "raw"  # torchvision's ROOT/MNIST/raw layout
    files = {}
    for role in FILE_ROLES:
        path = find_idx_file(folder, role)
        if path is None:
            raise DataError(f"{folder}: missing {FILE_ROLES[role]}[.gz]; a dataset folder "
                            f"needs the four IDX files {', '.join(FILE_ROLES.values())}")
        files[role] = path
    return files


def _validate(info: DatasetInfo, arrays: dict[str, np.ndarray], files: dict[str, Path]) -> None:
    for split, expected in (("train", info.train_count), ("test", info.test_count)):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        img_file, lbl_file = files[f"{split}_images"], files[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != info.image_shape:
            raise DataError(f"{img_file}: expected uint8 images of shape (N, "
                            f"{info.image_shape[0]}, {info.image_shape[1]}), got "
                            f"{images.dtype} {images.shape}")
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise DataError(f"{lbl_file}: expected a 1-D uint8 label vector, got "
                            f"{labels.dtype} {labels.shape}")
        if len(images) != len(labels):
            raise DataError(f"{img_file}: {len(images)} images but {lbl_file.name} has "
                            f"{len(labels)} labels")
        if expected is not None and len(images) != expected:
            raise DataError(f"{img_file}: {len(images)} images, expected {expected} for "
                            f"{info.name} ({split} split)")
        if labels.size and int(labels.max()) >= info.num_classes:
            raise DataError(f"{lbl_file}: label {int(labels.max())} out of range "
                            f"0..{info.num_classes - 1}")


def read_dataset_folder(folder: str | os.PathLike, info: DatasetInfo) -> Dataset:
    """Read and validate the four IDX files of ``info`` from ``folder``.

    Raises:
        DataError: A file is missing, truncated, corrupt or inconsistent.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such directory")
    files = _dataset_files(folder)
    arrays, hashes = {}, {}
    for role, path in files.items():
        raw = path.read_bytes()
        hashes[path.name] = hashlib.sha256(raw).hexdigest()
        arrays[role] = parse_idx(_read_bytes(path), source=str(path))
    _validate(info, arrays, files)
    return Dataset(info=info, sha256=hashes,
                   train_images=arrays["train_images"],
                   train_labels=arrays["train_labels"].astype(np.int64),
                   test_images=arrays["test_images"],
                   test_labels=arrays["test_labels"].astype(np.int64))


def load_dataset(name: str, *, root: str | os.PathLike | None = None) -> Dataset:
    """Load a dataset that was imported into the data root.

    Raises:
        DataError: The dataset is not in the data root, or its files are invalid.
    """
    info = get_info(name)
    folder = data_root(root) / info.name
    if not folder.is_dir():
        raise DataError(f"dataset {name!r} not found in data root {data_root(root)}; run "
                        f"'alignfl-mpi data import DIR --dataset {name}' (offline) or "
                        f"'alignfl-mpi data download --dataset {name}'")
    return read_dataset_folder(folder, info)


def guess_dataset(folder: Path) -> str | None:
    """Guess the dataset from a folder name such as ``mnist`` or ``FashionMNIST/raw``."""
    parts = [p for p in folder.resolve().parts[::-1] if p != "raw"][:2]
    for part in parts:
        for info in DATASETS.values():
            if part.lower() in {info.name.lower(), *(a.lower() for a in info.aliases)}:
                return info.name
    return None


def import_dataset(source: str | os.PathLike, *, name: str | None = None,
                   root: str | os.PathLike | None = None) -> Dataset:
    """Validate the IDX files in ``source`` and copy them into ``root/<name>/``.

    The copy goes to a temporary folder first and is renamed into place, so an
    interrupted import never leaves a half-written dataset.

    Raises:
        DataError: Unknown or unguessable dataset name, or invalid files.
    """
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{source}: no such directory")
    name = name or guess_dataset(source)
    if name is None:
        raise DataError(f"cannot tell which dataset {source} holds; pass --dataset "
                        f"({', '.join(sorted(DATASETS))})")
    info = get_info(name)
    dataset = read_dataset_folder(source, info)
    files = _dataset_files(source)
    with atomic_dir(data_root(root) / info.name) as tmp:
        for path in files.values():
            shutil.copyfile(path, tmp / path.name)
    return dataset


def download_dataset(name: str, *, root: str | os.PathLike | None = None) -> Dataset:
    """Download a dataset with torchvision (needs internet), then import it.

    Raises:
        DataError: The download failed (for example no internet).
    """
    info = get_info(name)
    if info.torchvision_class is None:
        raise DataError(f"dataset {name!r} has no download source; use 'alignfl-mpi data import'")
    import torchvision.datasets as tvd

    cls = getattr(tvd, info.torchvision_class)
    with tempfile.TemporaryDirectory(prefix="alignfl-download-") as tmp:
        try:
            cls(root=tmp, train=True, download=True)
            cls(root=tmp, train=False, download=True)
        except Exception as exc:  # torchvision raises many kinds (URLError, RuntimeError)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"download of {name} failed ({reason}); without internet, copy "
                            f"the IDX files here and run 'alignfl-mpi data import DIR "
                            f"--dataset {name}'") from None
        return import_dataset(Path(tmp) / info.torchvision_class / "raw", name=name, root=root)


def available(root: str | os.PathLike | None = None) -> dict[str, bool]:
    """Which registered datasets are present in the data root."""
    base = data_root(root)
    return {name: (base / name).is_dir() for name in sorted(DATASETS)}
