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
             '"sweep"', "run_sequence(")
# fixtures that launch ranks: a test using one is ``mpi`` too
_LAUNCHING_FIXTURES = {"resume_scenario", "two_rounds", "runs", "small_runs"}


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


# --- the small 2-rank runs of several test files, in one launch -----------------------------
@pytest.fixture(scope="session")
def small_runs(tmp_path_factory):
    """Tiny 2-client runs on 2 ranks in ONE launch (``tests/mpi/sequence.py``): each would
    otherwise be a launch of its own, whose cost is mostly importing torch on every rank.
    Returns, per name, the run's result (``returncode``, ``stderr``) and its run folder.

    - ``bad_partition``: a 2-client partition for a 3-client config (test_mpi_runtime.py);
    - ``fedavg``, ``fedavg_mixed`` (one conv client: refused), ``conditional``
      (test_mpi_runtime.py); ``moon`` (test_moon.py);
    - ``dp_fedprox``, ``dp_moon``, ``dp_align-fl`` (DP, the DP prior and lambda_lip 0.5)
      (test_dp_baselines.py);
    - ``dp_private``: DP with checkpoints and ``client.private_dir`` (test_private_dir.py);
    - ``progress``: 100 local epochs, ``--verbose``, progress every 0.2 s (test_progress.py).
    """
    import subprocess

    from mpi_helpers import find_mpiexec, run_sequence
    from test_failures import fast_config
    from test_mpi_runtime import tiny_partition, write_config

    if find_mpiexec() is None:
        pytest.skip("no mpiexec available")
    root = tmp_path_factory.mktemp("small-runs")
    part = tiny_partition(root / "p.h5", n_clients=2)
    steps, folders = [], {}

    def step(name, cfg, out, *sets, flags=()):
        folders[name] = out
        steps.append({"name": name, "argv": ["run", "--config", str(cfg), *flags,
                                             *[a for s in sets for a in ("--set", s)]]})

    def add(name, *sets, n_clients=2, after=""):
        cfg = write_config(root / f"{name}.toml", part, root / name, n_clients=n_clients,
                           rounds=2)
        if after:
            cfg.write_text(cfg.read_text() + after)
        step(name, cfg, root / name, *sets)

    add("bad_partition", n_clients=3)
    add("fedavg", 'strategy="fedavg"')
    add("fedavg_mixed", 'strategy="fedavg"',
        after='\n[[clients]]\nmodel = {arch = "conv"}\n[[clients]]\n')
    add("conditional", "client.model.conditional=true", "server.classifier_epochs=1")
    add("moon", 'strategy="moon"')
    dp = ['client.privacy.mode="full"', "client.privacy.epsilon=3.0"]
    add("dp_fedprox", 'strategy="fedprox"', *dp, 'client.privacy.prior="standard"')
    add("dp_moon", 'strategy="moon"', *dp, 'client.privacy.prior="standard"')
    add("dp_align-fl", 'strategy="align-fl"', *dp, 'client.privacy.prior="dp"',
        "client.lipschitz.weight=0.5")
    (root / "dp_private").mkdir()
    cfg, out = fast_config(root / "dp_private", n_clients=2, rounds=2, output="png = false")
    cfg.write_text(cfg.read_text().replace("checkpoint = false", ""))
    step("dp_private", cfg, out, 'client.privacy.mode="full"', "client.privacy.epsilon=5",
         f'client.private_dir="{root / "dp_private" / "private"}"')
    (root / "progress").mkdir()
    cfg, out = fast_config(root / "progress", n_clients=2, rounds=2)
    cfg.write_text(cfg.read_text().replace("local_epochs = 1", "local_epochs = 100")
                   .replace("png = false", "png = false\nprogress_interval_s = 0.2"))
    step("progress", cfg, out, flags=["--verbose"])
    try:
        procs, _ = run_sequence(2, steps, root / "steps", timeout=400)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"small runs: mpiexec hung\n{exc.output}\n{exc.stderr}")
    return {name: (procs[name], folders[name]) for name in folders}


# --- one resume scenario under mpiexec, asserted on by two tests ----------------------------
@pytest.fixture(scope="session")
def resume_scenario(tmp_path_factory):
    """One run folder taken through a run, a fresh start, two resumes and three refusals.

    Seven runs of ``alignfl-mpi run`` (2 clients on one client rank, the MPI tests' tiny
    config, ``client.private_dir`` set) in ONE launch of 2 ranks (``tests/mpi/sequence.py``,
    with a timeout), serving two tests:
    ``test_mpi_runtime.py::test_resume_equals_uninterrupted`` and
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
       must end with client 1's error and record nothing (it aborts the launch: last).
    """
    import json
    import shutil
    import subprocess

    from mpi_helpers import find_mpiexec, run_sequence
    from test_mpi_runtime import tiny_partition, write_config

    from alignfl_mpi.private import client_private_dir

    if find_mpiexec() is None:
        pytest.skip("no mpiexec available")
    tmp = tmp_path_factory.mktemp("resume")
    out, private = tmp / "run", tmp / "private"
    part = tiny_partition(tmp / "p.h5", n_clients=2)
    cfg = write_config(tmp / "c.toml", part, out, n_clients=2, rounds=3)
    results = str(out / "results.h5")
    client0, client1 = (str(client_private_dir(str(private), str(out), c)) for c in (0, 1))

    def step(name, *extra, before=()):
        return {"name": name, "before": list(before),
                "argv": ["run", "--config", str(cfg), "--set",
                         f'client.private_dir="{private}"', *extra]}

    def keep(name):  # a copy of the results file as it is now (none when there is none)
        return ["copy", results, str(tmp / f"{name}.h5")]

    steps = [
        step("full"),
        # the run folder is gone; the private ones are not
        step("fresh", "--rounds", "1", before=[keep("full"), ["rmtree", str(out)]]),
        step("resume2", "--resume", "--rounds", "2",
             before=[["list", client0, "*.ckpt", str(tmp / "ckpts_after_fresh.json")]]),
        step("resume3", "--resume", "--rounds", "3", before=[keep("after_resume2")]),
        step("changed", "--resume", "--set", "server.epochs=3", before=[keep("resumed")]),
        step("exists", before=[keep("after_changed")]),
        step("no_ckpt", "--resume", "--rounds", "4",
             before=[keep("after_exists"), ["unlink", client1, "*.ckpt"]]),
    ]
    try:
        procs, _ = run_sequence(2, steps, tmp / "steps", timeout=400)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"resume scenario: mpiexec hung\n{exc.output}\n{exc.stderr}")

    def kept(name):
        path = tmp / f"{name}.h5"
        return path if path.exists() else None

    def same(a, b):
        return kept(a) is not None and kept(b) is not None \
            and kept(a).read_bytes() == kept(b).read_bytes()

    shutil.copy(results, tmp / "after_no_ckpt.h5")
    return {"out": out, "private": private, "procs": procs, "full": kept("full"),
            "ckpts_after_fresh": json.loads((tmp / "ckpts_after_fresh.json").read_text()),
            "after_resume2": kept("after_resume2"), "resumed": kept("resumed"),
            "unchanged_by_changed": same("resumed", "after_changed"),
            "unchanged_by_exists": same("after_changed", "after_exists"),
            "after_no_ckpt": kept("after_no_ckpt")}
