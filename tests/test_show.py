"""Tests for ``alignfl-mpi show`` and for reading a results file while a run writes it."""

from __future__ import annotations

import doctest
import json
import multiprocessing
import re
import time

from test_report import read_csv, tiny_partition, write_run

from alignfl_mpi import cli, show
from alignfl_mpi.report import run_report
from alignfl_mpi.results import ResultsWriter, load
from alignfl_mpi.show import summary


def table_rows(text, title):
    """The data rows of the table under the line starting with ``title``."""
    lines = text.split("\n" + title, 1)[1].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("  ") or line.startswith("  ("):
            break
        rows.append(line.split())
    return rows


def test_show_finished_run(tmp_path):
    path = write_run(tmp_path / "runA" / "results.h5", rounds=3)
    text = summary(path.parent)  # a run folder stands for its results.h5
    assert text.splitlines()[0] == str(path)
    assert "  status    finished, 3 of 3 rounds" in text
    assert "  run       align-fl, 2 clients, seed 0, 2 local epochs per round" in text
    assert ("  data      mnist class-pairs, 4 fashion-mnist outliers on client 0; clients of "
            "10, 8 images") in text
    assert "  privacy   none (ε = ∞, no DP)" in text
    assert "schema 2" in text
    rounds = table_rows(text, "rounds (from 1")
    assert [r[0] for r in rounds] == ["1", "2", "3"]
    # round, clients ok, server loss, latent acc, FID-LeNet, class cov., survival, MIA, s
    assert rounds[0] == ["1", "2/2", "20", "0.5", "300", "0.7", "0.8", "0.7", "3"]
    assert rounds[2][:4] == ["3", "1/2", "18", "0.7"]
    clients = table_rows(text, "clients (last round 3")
    assert clients[0] == ["0", "ok", "3/3", "10", "8", "∞", "4", "—", "—"]
    assert clients[1] == ["1", "error", "2/3", "8", "10", "∞", "4", "—", "—"]
    assert "round 3, client 1: boom" in text.split("\nerrors\n", 1)[1]


def test_show_partial_dp_run(tmp_path):
    path = write_run(tmp_path / "dp" / "results.h5", rounds=2, final=False, mode="full",
                     epsilon=8.0)
    text = summary(path)
    assert re.search(r"status    running or stopped, 2 of 3 rounds written \(file last "
                     r"written \d+ s ago", text)
    # recorded ε: client 0 ends at 8, client 1 (failed in round 2) at 3.5; the target is 8 too
    assert "privacy   full, ? clipping; ε spent (recorded, max over clients): 8 (target 8" in text
    clients = table_rows(text, "clients (last round 2")
    assert clients[0][5] == "8" and clients[1][5] == "3.5"


def test_show_not_accounted_and_empty(tmp_path):
    path = write_run(tmp_path / "median" / "results.h5", rounds=1, final=False,
                     mode="decoder", accounted=False)
    text = summary(path)
    assert "ε spent (recorded, max over clients): not accounted" in text
    assert "dp_accounted = 0" in text
    assert table_rows(text, "clients (last round 1")[0][5:7] == ["10", "(not"]
    empty = write_run(tmp_path / "empty" / "results.h5", rounds=0, final=False)
    text = summary(empty)
    assert "0 of 3 rounds written" in text and text.endswith("no completed round yet")


def test_show_last_rounds(tmp_path):
    path = write_run(tmp_path / "r" / "results.h5", rounds=3)
    text = summary(path, last=2)
    assert [r[0] for r in table_rows(text, "rounds (from 1")] == ["2", "3"]
    assert "(1 earlier round not shown; --last 0 shows all)" in text


def test_show_cli(tmp_path, capsys):
    path = write_run(tmp_path / "r" / "results.h5", rounds=2, final=False)
    assert cli.main(["show", str(path), "--last", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(str(path)) and "2 of 3 rounds written" in out
    part = tiny_partition(tmp_path / "p.h5")
    for bad, message in ((tmp_path / "missing.h5", "no such file"),
                         (part, "not a results file")):
        assert cli.main(["show", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("alignfl-mpi: error: ") and message in err[0]


# --------------------------------------------------------------- a run still writing


def _write_rounds(path, started, stop, n_max):
    """A run's rank 0: one round after another until told to stop, then the final state."""
    w = ResultsWriter(path, config_json=json.dumps({"rounds": n_max}), attrs={"n_clients": 2})
    started.set()
    for r in range(n_max):
        w.write_round(r, clients={c: {"status": "ok", "loss": float(r)} for c in range(2)},
                      server={"loss": 1.0}, evaluation={"latent_accuracy": r / n_max},
                      timings={"round": 0.01})
        w.update_timings(r, {"round": 0.02, "io": 0.01})
        if stop.wait(0.1):  # a round takes a while; the run goes on until told to stop
            break
    w.set_attrs({"status": "finished"})


def test_show_and_report_while_a_run_writes(tmp_path):
    path = tmp_path / "live" / "results.h5"
    ctx = multiprocessing.get_context("spawn")
    started, stop = ctx.Event(), ctx.Event()
    writer = ctx.Process(target=_write_rounds, args=(path, started, stop, 5000))
    writer.start()
    try:
        assert started.wait(60)
        seen, reads = 0, 0
        deadline = time.monotonic() + 60
        while (seen < 5 or reads < 10) and time.monotonic() < deadline:
            res = load(path)
            n = len(res.rounds)
            assert res.rounds == list(range(1, n + 1))  # consistent: rounds 1..n, no gaps
            assert res.attrs["rounds_completed"] == n
            assert len(res.eval.get("latent_accuracy", [])) == n
            assert n >= seen  # monotone across reads
            seen, reads = n, reads + 1
            text = summary(path)
            assert "running or stopped" in text or n == 0
        assert seen >= 5 and reads >= 10, (seen, reads)
        written = run_report([path], out=tmp_path / "rep")  # a report of the running job
        assert written[-1].name == "report.md"
        (head,) = read_csv(tmp_path / "rep" / "headline.csv")
        assert head["status"] == "running" and int(head["rounds_completed"]) >= seen
        assert "(not finished)" in (tmp_path / "rep" / "report.md").read_text()
    finally:
        stop.set()
        writer.join(60)
    assert writer.exitcode == 0
    final = load(path)
    assert final.finished and final.rounds == list(range(1, len(final.rounds) + 1))
    assert len(final.rounds) > seen - 1


def test_doctests():
    assert doctest.testmod(show).failed == 0
