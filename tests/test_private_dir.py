"""Client secrets stay in the client's private folder, never under the run folder."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from mpi_helpers import find_mpiexec, run_cli
from test_failures import fast_config

from alignfl_mpi.config import load_config
from alignfl_mpi.errors import ConfigError
from alignfl_mpi.private import client_private_dir, ensure_private
from alignfl_mpi.results import load


def test_private_folder_is_0700_and_checked(tmp_path):
    path = ensure_private(tmp_path / "a" / "b" / "client_0")
    for folder in (path, path.parent, path.parent.parent):
        assert folder.stat().st_mode & 0o777 == 0o700
    os.chmod(path, 0o755)
    with pytest.raises(ConfigError, match=r"is open to others \(mode 0o755\); chmod 700"):
        ensure_private(path)


def test_private_dir_inside_the_run_folder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is inside output.dir"):
        load_config(overrides=[f'output.dir="{tmp_path}/run"',
                               f'client.private_dir="{tmp_path}/run/secrets"'])
    load_config(overrides=[f'output.dir="{tmp_path}/run"',
                           f'client.private_dir="{tmp_path}/secrets"'])


def test_default_private_folder_is_outside_the_run_and_per_run(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNFL_PRIVATE_DIR", str(tmp_path / "node-local"))
    a = client_private_dir("", str(tmp_path / "run-a"), 1)
    b = client_private_dir("", str(tmp_path / "run-b"), 1)
    assert a.parent != b.parent and a.name == b.name == "client_1"
    assert (tmp_path / "node-local") in a.parents and (tmp_path / "run-a") not in a.parents


@pytest.mark.mpi
@pytest.mark.skipif(find_mpiexec() is None, reason="no mpiexec available")
def test_dp_secret_never_lands_in_the_run_folder(tmp_path):
    cfg, out = fast_config(tmp_path, n_clients=2, rounds=2, output="png = false")
    cfg.write_text(cfg.read_text().replace("checkpoint = false", ""))
    private = tmp_path / "private"
    try:
        proc = run_cli(3, "run", "--config", str(cfg), "--set", "client.privacy.mode=\"full\"",
                       "--set", "client.privacy.epsilon=5", "--set",
                       f'client.private_dir="{private}"', timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"run hung\n{exc.stderr}")
    assert proc.returncode == 0, proc.stderr
    res = load(out / "results.h5")
    assert [list(res.clients[c]["status"]) for c in (0, 1)] == [["ok", "ok"]] * 2
    secrets = []
    for c in (0, 1):
        folder = client_private_dir(str(private), str(out), c)
        assert folder.stat().st_mode & 0o777 == 0o700
        ckpts = sorted(folder.glob("round_*.ckpt"))
        assert ckpts, f"no private checkpoint for client {c}"
        state = torch.load(ckpts[-1], weights_only=True)
        secrets.append(int(state["extra"]["privacy"]["secret"]))
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.relative_to(out).as_posix() for p in files if "checkpoints" in p.parts) \
        == ["checkpoints/server.ckpt"]
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert str(secret).encode() not in data, path
            assert secret.to_bytes(8, "little") not in data, path


@pytest.mark.mpi
@pytest.mark.skipif(find_mpiexec() is None, reason="no mpiexec available")
def test_fresh_run_drops_stale_private_checkpoints_and_resume_needs_them(tmp_path):
    import shutil

    cfg, out = fast_config(tmp_path, n_clients=2, rounds=3, output="png = false")
    cfg.write_text(cfg.read_text().replace("checkpoint = false", ""))
    private = f'client.private_dir="{tmp_path / "private"}"'

    def run(*extra):
        try:
            return run_cli(3, "run", "--config", str(cfg), "--set", private, *extra, timeout=240)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"run hung\n{exc.stderr}")

    assert run().returncode == 0
    shutil.rmtree(out)  # the run folder is gone; the clients' private folders are not
    assert run("--rounds", "1").returncode == 0
    folder = client_private_dir(str(tmp_path / "private"), str(out), 0)
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["round_0001.ckpt"]
    proc = run("--resume", "--rounds", "2")
    assert proc.returncode == 0, proc.stderr
    res = load(out / "results.h5")
    assert res.finished and [list(res.clients[c]["status"]) for c in (0, 1)] == [["ok"] * 2] * 2
    for ckpt in client_private_dir(str(tmp_path / "private"), str(out), 1).glob("*.ckpt"):
        ckpt.unlink()
    proc = run("--resume", "--rounds", "3")  # client 1 cannot resume: the job ends
    assert proc.returncode != 0
    assert "client 1: AlignFLError: client 1: no checkpoint in" in proc.stderr
    res = load(out / "results.h5")
    assert res.rounds == [1, 2] and not res.finished  # round 3 never recorded
