"""Shared fixtures: tiny IDX datasets built on the fly, and the real datasets when present."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from alignfl_mpi.datasets import DATASETS, FILE_ROLES, DatasetInfo, encode_idx, register_dataset

REPO = Path(__file__).resolve().parents[1]


def real_datasets_dir() -> Path | None:
    """``$ALIGNFL_DATASETS`` or ``../shared/datasets`` when they hold MNIST."""
    for cand in (os.environ.get("ALIGNFL_DATASETS"), REPO.parent / "shared" / "datasets"):
        if cand and (Path(cand) / "mnist").is_dir():
            return Path(cand)
    return None


def write_idx_folder(folder: Path, *, n_train: int, n_test: int, seed: int,
                     n_classes: int = 10, gz: bool = True) -> dict[str, np.ndarray]:
    """Write a tiny dataset in IDX format: images carry their label as brightness."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % n_classes).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 50, size=(n, 28, 28)).astype(np.uint8)
        images[:, 10:18, 10:18] += (labels[:, None, None] * 20).astype(np.uint8)
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    for role, stem in FILE_ROLES.items():
        data = encode_idx(out[role])
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return out


@pytest.fixture(scope="session", autouse=True)
def tiny_registry():
    """Register two tiny datasets (any counts) and their outlier pairing."""
    from alignfl_mpi.partition import OUTLIER_SOURCES

    register_dataset(DatasetInfo(name="tiny", aliases=("tiny-main",)))
    register_dataset(DatasetInfo(name="tiny-other"))
    OUTLIER_SOURCES["tiny"] = "tiny-other"
    yield
    DATASETS.pop("tiny", None)
    DATASETS.pop("tiny-other", None)
    OUTLIER_SOURCES.pop("tiny", None)


@pytest.fixture
def tiny_root(tmp_path) -> Path:
    """A data root holding the tiny datasets (400 train / 100 test images each)."""
    from alignfl_mpi.datasets import import_dataset

    src = tmp_path / "src"
    write_idx_folder(src / "tiny", n_train=400, n_test=100, seed=1)
    write_idx_folder(src / "tiny-other", n_train=300, n_test=100, seed=2, gz=False)
    root = tmp_path / "data"
    import_dataset(src / "tiny", root=root)
    import_dataset(src / "tiny-other", name="tiny-other", root=root)
    return root


@pytest.fixture(scope="session")
def real_root(tmp_path_factory) -> Path:
    """A data root with real MNIST and Fashion-MNIST imported, or skip."""
    from alignfl_mpi.datasets import import_dataset

    src = real_datasets_dir()
    if src is None:
        pytest.skip("real datasets not available (set ALIGNFL_DATASETS)")
    root = tmp_path_factory.mktemp("real-data")
    import_dataset(src / "mnist", name="mnist", root=root)
    import_dataset(src / "fashion-mnist", name="fashion-mnist", root=root)
    return root


# --- markers: `pytest -m "not mpi and not slow"` is the fast inner loop -------------------
collect_ignore_glob = ["mpi/*.py", "slurm/*"]  # launched by the tests, never imported

_LAUNCHES = ("run_cli(", "run_mpi(", "launch(", "rogue_cmd(", "_run_group(", "sbatch")


def pytest_collection_modifyitems(config, items):
    """Mark tests that launch ranks (``mpi``) or need the real datasets (``real_data``).

    A test is ``mpi`` when its body calls one of the launch helpers; explicit marks (``slow``,
    ``slurm``) stay in the test files.
    """
    import inspect

    for item in items:
        if "real_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_data)
        function = getattr(item, "function", None)
        if function is None:
            continue
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):
            continue
        if any(call in source for call in _LAUNCHES):
            item.add_marker(pytest.mark.mpi)
