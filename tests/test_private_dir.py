"""Client secrets stay in the client's private folder, never under the run folder."""

from __future__ import annotations

import os

import pytest
from mpi_helpers import find_mpiexec

from alignfl_mpi.checkpoint import load_checkpoint
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
def test_dp_secret_never_lands_in_the_run_folder(small_runs):
    proc, out = small_runs["dp_private"]  # a run of the small_runs launch (conftest.py)
    private = out.parent / "private"
    assert proc.returncode == 0, proc.stderr
    res = load(out / "results.h5")
    assert [list(res.clients[c]["status"]) for c in (0, 1)] == [["ok", "ok"]] * 2
    secrets = []
    for c in (0, 1):
        folder = client_private_dir(str(private), str(out), c)
        assert folder.stat().st_mode & 0o777 == 0o700
        ckpts = sorted(folder.glob("round_*.ckpt"))
        assert ckpts, f"no private checkpoint for client {c}"
        state = load_checkpoint(ckpts[-1])
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
def test_fresh_run_drops_stale_private_checkpoints_and_resume_needs_them(resume_scenario):
    """The launches are conftest.py's resume_scenario: a 3-round run whose run folder is then
    deleted, a fresh run into it with 1 round, resumes to 2 and 3 rounds, then client 1's
    private checkpoints deleted and a resume to 4 rounds."""
    s = resume_scenario
    procs = s["procs"]
    assert procs["full"].returncode == 0, procs["full"].stderr
    assert procs["fresh"].returncode == 0, procs["fresh"].stderr
    # the fresh run dropped the 3-round run's private checkpoints of rounds 2 and 3
    assert s["ckpts_after_fresh"] == ["round_0001.ckpt"]
    assert procs["resume2"].returncode == 0, procs["resume2"].stderr
    res = load(s["after_resume2"])
    assert res.finished and [list(res.clients[c]["status"]) for c in (0, 1)] == [["ok"] * 2] * 2
    proc = procs["no_ckpt"]  # client 1 cannot resume: the job ends
    assert proc.returncode != 0
    assert "client 1: AlignFLError: client 1: no checkpoint in" in proc.stderr
    res = load(s["after_no_ckpt"])
    assert res.rounds == [1, 2, 3] and not res.finished  # round 4 never recorded
