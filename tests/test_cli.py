"""The CLI as a user meets it: one-line errors, exit status 2, no traceback."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, real_datasets_dir, write_idx_folder


def cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "alignfl_mpi", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd or REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def assert_one_line_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("alignfl-mpi: error: ") and fragment in lines[0], lines[0]


def test_import_and_list(tmp_path):
    src = real_datasets_dir()
    if src is None:
        pytest.skip("real datasets not available (set ALIGNFL_DATASETS)")
    root = tmp_path / "data"
    proc = cli("data", "import", src / "mnist", "--data-root", root)  # name guessed
    assert proc.returncode == 0, proc.stderr
    assert "imported mnist: 60000 train + 10000 test" in proc.stdout
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(
        p.name for p in (src / "mnist").iterdir())
    proc = cli("data", "list", "--data-root", root)
    assert "mnist           present" in proc.stdout
    assert "fashion-mnist   missing" in proc.stdout


def test_partition_cli_prints_and_writes(real_root, tmp_path):
    out = tmp_path / "p.h5"
    proc = cli("partition", "--data-root", real_root, "--output", out)
    assert proc.returncode == 0, proc.stderr
    for size in ("11923", "11958", "11263", "11918", "11800"):
        assert size in proc.stdout
    assert out.is_file()
    assert_one_line_error(cli("partition", "--data-root", real_root, "--output", out),
                          "already exists")


def test_errors_are_one_line(tmp_path):
    assert_one_line_error(cli("partition", "--data-root", tmp_path), "not found in data root")
    assert_one_line_error(cli("data", "import", tmp_path / "nope", "--dataset", "mnist"),
                          "no such directory")
    bad = tmp_path / "mnist"
    write_idx_folder(bad, n_train=60, n_test=20, seed=0)
    p = bad / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:100])
    assert_one_line_error(cli("data", "import", bad, "--data-root", tmp_path / "d"),
                          "train-images-idx3-ubyte.gz: corrupt or truncated gzip")
    assert_one_line_error(cli("partition", "--scheme", "nope", "--data-root", tmp_path),
                          "unknown partition scheme 'nope'")


def test_bad_flag_is_usage_error():
    proc = cli("partition", "--clients", "many")
    assert proc.returncode == 2 and "invalid int value" in proc.stderr
