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

_LAUNCHES = ("run_cli(", "run_mpi(", "launch(", "rogue_cmd(", "_run_group(", "sbatch",
             '"sweep"')
# fixtures that launch ranks: a test using one is ``mpi`` too
_LAUNCHING_FIXTURES = {"resume_scenario", "two_rounds", "runs"}


def pytest_collection_modifyitems(config, items):
    """Mark tests that launch ranks (``mpi``) or need the real datasets (``real_data``).

    A test is ``mpi`` when its body calls one of the launch helpers; explicit marks (``slow``,
    ``slurm``) stay in the test files.
    """
    import inspect

    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "real_root" in fixtures:
            item.add_marker(pytest.mark.real_data)
        if fixtures & _LAUNCHING_FIXTURES:
            item.add_marker(pytest.mark.mpi)
        function = getattr(item, "function", None)
        if function is None:
            continue
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):
            continue
        if any(call in source for call in _LAUNCHES):
            item.add_marker(pytest.mark.mpi)


# --- one resume scenario under mpiexec, asserted on by two tests ----------------------------
@pytest.fixture(scope="session")
def resume_scenario(tmp_path_factory):
    """One run folder taken through a run, a fresh start, two resumes and three refusals.

    Seven launches of ``mpiexec -n 3 alignfl-mpi run`` (2 clients, the MPI tests' tiny config,
    ``client.private_dir`` set), each with a timeout, serve two tests that used to launch
    nine: ``test_mpi_runtime.py::test_resume_equals_uninterrupted`` and
    ``test_private_dir.py::test_fresh_run_drops_stale_private_checkpoints_and_resume_needs_them``.

    1. ``full``: 3 rounds uninterrupted; its results file is kept aside as the reference; then
       the run folder is deleted (the clients' private folders stay, with 3 rounds of
       checkpoints).
    2. ``fresh``: a new run into the same folder with ``--rounds 1``: the stale private
       checkpoints must be dropped.
    3. ``resume2``: ``--resume --rounds 2``.
    4. ``resume3``: ``--resume --rounds 3``: must equal ``full`` bit for bit.
    5. ``changed``: ``--resume`` with another ``server.epochs``: refused, nothing lost.
    6. ``exists``: a new run (no ``--resume``) into the folder: refused, nothing lost.
    7. ``no_ckpt``: client 1's private checkpoints deleted, ``--resume --rounds 4``: the job
       must end with client 1's error and record nothing.
    """
    import shutil
    import subprocess

    from mpi_helpers import find_mpiexec, run_cli
    from test_mpi_runtime import tiny_partition, write_config

    from alignfl_mpi.private import client_private_dir

    if find_mpiexec() is None:
        pytest.skip("no mpiexec available")
    tmp = tmp_path_factory.mktemp("resume")
    out, private = tmp / "run", tmp / "private"
    part = tiny_partition(tmp / "p.h5", n_clients=2)
    cfg = write_config(tmp / "c.toml", part, out, n_clients=2, rounds=3)
    results = out / "results.h5"
    s = {"out": out, "private": private, "procs": {}}

    def launch(name, *extra):
        try:
            proc = run_cli(2, "run", "--config", str(cfg), "--set",
                           f'client.private_dir="{private}"', *extra, timeout=240)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"resume scenario, step {name}: mpiexec hung\n{exc.output}\n{exc.stderr}")
        s["procs"][name] = proc
        return proc

    def ckpts(client):
        return sorted(p.name for p in client_private_dir(str(private), str(out), client)
                      .glob("*.ckpt"))

    def keep(name):  # a copy of the results file as it is now (None when there is none)
        if not results.exists():
            return None
        return shutil.copy(results, tmp / f"{name}.h5")

    launch("full")
    s["full"] = keep("full")
    shutil.rmtree(out, ignore_errors=True)  # the run folder is gone; the private ones are not
    launch("fresh", "--rounds", "1")
    s["ckpts_after_fresh"] = ckpts(0)
    launch("resume2", "--resume", "--rounds", "2")
    s["after_resume2"] = keep("after_resume2")
    launch("resume3", "--resume", "--rounds", "3")
    s["resumed"] = keep("resumed")
    for name, extra in (("changed", ["--resume", "--set", "server.epochs=3"]), ("exists", [])):
        before = results.read_bytes() if results.exists() else b""
        launch(name, *extra)
        s[f"unchanged_by_{name}"] = results.exists() and results.read_bytes() == before
    for ckpt in client_private_dir(str(private), str(out), 1).glob("*.ckpt"):
        ckpt.unlink()
    launch("no_ckpt", "--resume", "--rounds", "4")
    s["after_no_ckpt"] = keep("after_no_ckpt")
    return s
