"""Live progress (PROGRESS messages, the status line) and output printed once."""

from __future__ import annotations

import io
import logging

import pytest
from mpi_helpers import find_mpiexec, run_cli

from alignfl_mpi.errors import MessageError
from alignfl_mpi.messages import (
    Message,
    Progress,
    Tag,
    decode_message,
    encode_message,
    parse_payload,
)
from alignfl_mpi.progress import ProgressDisplay, ProgressTable, StepReporter


def test_progress_message_roundtrip_and_bounds():
    msg = Progress(round=2, client_id=1, done=3, total=10).to_message()
    assert parse_payload(Tag.PROGRESS, decode_message(encode_message(msg), max_bytes=4096)) == \
        Progress(round=2, client_id=1, done=3, total=10)
    bad = Message(kind="progress", meta={**msg.meta, "done": 11})
    with pytest.raises(MessageError, match="done exceeds total"):
        parse_payload(Tag.PROGRESS, bad)


def test_status_names_the_slowest_busy_client():
    table = ProgressTable(n_clients=3, epochs=[5, 10, 10])
    table.update(0, done=90, total=100, now=1.0)
    table.update(1, done=20, total=100, now=1.0)
    line = table.status(round_no=2, rounds=4, done={2}, started=0.0, now=10.0)
    assert line == "round 2/4 | clients done 1/3 | slowest: client 1 epoch 3/10 | 10 s | ETA 40 s"
    table.update(1, done=500, total=100, now=2.0)  # clamped
    assert table.fraction(1) == 1.0


def test_plain_lines_without_control_characters(caplog):
    stream = io.StringIO()  # not a terminal, like a SLURM output file
    display = ProgressDisplay(enabled=True, verbose=True, interval_s=0.0, stream=stream)
    with caplog.at_level(logging.INFO, logger="alignfl_mpi"):
        display.show("round 1/2 | clients done 0/2", now=1e9)
        display.client_done(1, 2.5)
        display.clear()
    assert stream.getvalue() == ""
    assert [r.getMessage() for r in caplog.records] == ["round 1/2 | clients done 0/2",
                                                       "client 1 done after 2.5 s"]


def test_terminal_line_is_redrawn_in_place():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    display = ProgressDisplay(enabled=True, verbose=False, interval_s=30.0, stream=stream)
    display.show("round 1/2 | a long line", now=1e9)
    display.show("round 1/2 | short", now=1e9 + 1)
    display.clear()
    text = stream.getvalue()
    assert text.startswith("\r[rank 0] round 1/2 | a long line\r[rank 0] round 1/2 | short")
    assert text.endswith("\r") and "\n" not in text


def test_step_reporter_counts_optimizer_steps_rate_limited():
    import torch

    sent = []
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.1)
    with StepReporter(total=4, send=lambda d, t: sent.append((d, t)), min_interval_s=0.0):
        for _ in range(5):
            opt.step()
    opt.step()  # after the round: no longer counted
    assert sent == [(1, 4), (2, 4), (3, 4), (4, 4), (4, 4)]
    sent.clear()
    with StepReporter(total=4, send=lambda d, t: sent.append((d, t)), min_interval_s=3600):
        opt.step()
    assert sent == []


mpi = pytest.mark.skipif(find_mpiexec() is None, reason="no mpiexec available")


@pytest.mark.mpi
@mpi
def test_progress_lines_reach_rank_0(small_runs):
    proc, _ = small_runs["progress"]  # a run of the small_runs launch (conftest.py)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "clients done" in line]
    assert any("slowest: client" in line and "epoch" in line for line in lines), proc.stderr
    assert any("ETA" in line for line in lines), proc.stderr
    assert "client 0 done after" in proc.stderr and "client 1 done after" in proc.stderr
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr  # a log file stays plain


@pytest.mark.mpi
@mpi
def test_bad_flag_is_printed_once(tmp_path):
    proc = run_cli(3, "run", "--bogus", timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == ["alignfl-mpi: error: unrecognized arguments: --bogus"], proc.stderr
    assert proc.stderr.count("usage:") == 1
