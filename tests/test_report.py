"""Tests for alignfl_mpi.report: tables, figures and report.md from tiny results files."""

from __future__ import annotations

import base64
import csv
import doctest
import json
import math
import re

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from alignfl_mpi import report
from alignfl_mpi.errors import ConfigError, SchemaError
from alignfl_mpi.models import ModelSpec, build_vae
from alignfl_mpi.prior import standard_normal_prior
from alignfl_mpi.report import headline_table, per_round_table, run_report, runs_table
from alignfl_mpi.results import ResultsWriter, load
from alignfl_mpi.schema import ClientData, write_partition

SPEC = ModelSpec(arch="mlp", latent_dim=2, hidden=(16, 8, 4))
PHASES = ("client_training", "communication", "sampling", "server_training", "evaluation", "io")
CELL = 28 * 2 + 2  # save_image_grid: upscale 2, pad 2


def tiny_partition(path, *, n_test=200, n_outlier_test=40, seed=0):
    """A partition whose test set covers the 10 classes, plus held-out outliers."""
    rng = np.random.default_rng(seed)
    clients = [ClientData(client_id=k, images=rng.integers(0, 255, (8, 28, 28), np.uint8),
                          labels=np.full(8, 2 * k, np.int64), outlier=np.zeros(8, bool),
                          source_index=np.arange(8, dtype=np.int64)) for k in range(2)]
    return write_partition(
        path, clients=clients,
        test_images=rng.integers(0, 255, (n_test, 28, 28), np.uint8),
        test_labels=np.arange(n_test) % 10,
        outlier_test_images=rng.integers(0, 255, (n_outlier_test, 28, 28), np.uint8),
        outlier_test_labels=np.zeros(n_outlier_test, np.int64),
        attrs={"dataset": "synthetic", "outlier_dataset": "fashion-mnist", "scheme": "manual",
               "scheme_params": {}, "seed": seed, "n_outliers": 0, "outlier_client": 0,
               "source_sha256": {}, "created": "", "package_version": "test"})


def decoder_state(bias: float) -> dict[str, np.ndarray]:
    """A decoder whose output is sigmoid(bias) everywhere: black (<0) or white (>0)."""
    torch.manual_seed(1)
    state = {k[len("decoder."):]: v.numpy().copy()
             for k, v in build_vae(SPEC).state_dict().items() if k.startswith("decoder.")}
    last = max((k for k in state if k.endswith(".weight")), key=lambda k: int(k.split(".")[0]))
    state[last][:] = 0.0
    state[last.replace("weight", "bias")][:] = bias
    return state


def write_run(path, *, rounds, final=True, mode="none", epsilon=10.0, lip=0.0,
              partition="", synthetic=False, seed=0, accounted=True, shift=0.0):
    """A results file with ``rounds`` rounds; round n (from 1) has latent_accuracy 0.4 + 0.1 n.

    With DP (``mode`` not ``none``) client c records ε = (epsilon - c) · n / rounds, below
    the configured target ``epsilon``; ``shift`` is added to latent_accuracy.
    """
    config = {"rounds": 3, "seed": seed, "output": {"dir": str(path.parent)},
              "client": {"local_epochs": 2, "lipschitz": {"weight": lip},
                         "privacy": {"mode": mode, "epsilon": epsilon}}}
    w = ResultsWriter(path, config_json=json.dumps(config),
                      attrs={"n_clients": 2, "partition": str(partition),
                             "partition_attrs": {"dataset": "mnist", "scheme": "class-pairs",
                                                 "n_outliers": 4, "outlier_client": 0,
                                                 "outlier_dataset": "fashion-mnist",
                                                 "client_sizes": [10, 8]}})
    for r in range(rounds):
        clients = {c: {"status": "ok", "loss": 10.0 - r + c, "lip_empirical": 2.0 + r + c,
                       "n_samples": 10 - 2 * c} for c in range(2)}
        if mode != "none":
            for c in range(2):
                clients[c].update(epsilon=(epsilon - c) * (r + 1) / rounds,
                                  epsilon_prv=0.9 * (epsilon - c) * (r + 1) / rounds,
                                  dp_accounted=1.0 if accounted else 0.0)
        if r == rounds - 1 and rounds > 1:  # client 1 fails last: its last ε is the previous
            clients[1] = {"status": "error", "error": "boom", "traceback": "Traceback\n..."}
        w.write_round(r, clients=clients, server={"loss": 20.0 - r},
                      evaluation={"latent_accuracy": 0.5 + 0.1 * r + shift,
                                  "latent_f1": 0.4 + 0.1 * r,
                                  "recon_error": 40.0 - r, "global_fid_lenet": 300.0 - 50 * r,
                                  "pool_fid_lenet": 100.0 - r,
                                  "global_class_coverage": 0.7 + 0.1 * r,
                                  "global_class_share_3": 0.1,
                                  "survival_synthetic": 0.9 - 0.2 * r - 0.01 * epsilon,
                                  "mia_auc_outliers": 0.6 + 0.01 * epsilon},
                      timings={**{p: 0.1 * (i + 1) for i, p in enumerate(PHASES)},
                               "round": 3.0 + r},
                      synthetic=(np.full((40, 28, 28), 128, np.uint8), np.repeat([0, 1], 20))
                      if synthetic else None)
    if final:
        torch.manual_seed(0)
        w.write_final(global_state={k: v.numpy() for k, v in build_vae(SPEC).state_dict().items()},
                      global_spec=SPEC.to_dict(),
                      decoders={c: {"spec": SPEC.to_dict(), "round": rounds - 1,
                                    "state": decoder_state(-20.0 if c == 0 else 20.0),
                                    "prior": standard_normal_prior(2).to_arrays()}
                                for c in range(2)})
    return path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path, min_bytes=5000):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes, (path, len(data))
    with Image.open(path) as im:
        im.verify()


def section(md, title):
    """The text of a ``## title`` section of report.md."""
    return md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 3-round run with stored synthetic images, reported once."""
    tmp = tmp_path_factory.mktemp("finished")
    part = tiny_partition(tmp / "p.h5")
    res = write_run(tmp / "runA" / "results.h5", rounds=3, partition=part, synthetic=True)
    out = tmp / "report"
    return res, out, run_report([res.parent], out=out)  # a run folder stands for its file


def test_report_opens_with_what_was_run_and_three_numbers(finished):
    _, out, _ = finished
    md = (out / "report.md").read_text()
    titles = [line for line in md.splitlines() if line.startswith("## ")]
    assert titles[:3] == ["## What was run", "## The numbers to look at", "## Headline"]
    ran = section(md, "What was run")
    assert ("**runA**: ALIGN-FL, 2 clients on mnist (class-pairs; 4 fashion-mnist outliers on "
            "client 0), 3 rounds of 2 local epochs, no DP, seed 0; finished, 3 of 3 rounds"
            in ran)
    numbers = section(md, "The numbers to look at")
    assert "**latent accuracy 0.7** (round 1: 0.5)" in numbers
    assert "**FID-LeNet 200** (round 1: 300)" in numbers
    assert "**outlier survival 0.4** (round 1: 0.8)" in numbers
    assert "its outlier share is 0.4" in numbers  # 4 outliers of client 0's 10 images
    assert "ε spent: ∞ (no DP)." in numbers


def test_headline_table(finished):
    _, out, _ = finished
    head = section((out / "report.md").read_text(), "Headline")
    assert ("| run | strategy | privacy | ε spent | rounds | latent acc | FID-LeNet | "
            "class coverage | outlier survival | MIA AUC | round s |") in head
    assert "| runA | align-fl | none | ∞ (no DP) | 3/3 | 0.7 | 200 | 0.9 | 0.4 | 0.7 | 4 |" in head
    (row,) = read_csv(out / "headline.csv")
    assert row["run"] == "runA" and row["status"] == "finished"
    assert float(row["epsilon_spent"]) == math.inf and row["dp_accounted"] == ""
    assert row["rounds_completed"] == "3" and row["rounds"] == "3"
    assert float(row["latent_accuracy"]) == pytest.approx(0.7)
    assert float(row["fid_lenet"]) == pytest.approx(200.0)
    assert float(row["class_coverage"]) == pytest.approx(0.9)
    assert float(row["outlier_survival"]) == pytest.approx(0.4)
    assert float(row["mia_auc"]) == pytest.approx(0.7)
    assert float(row["mean_round_s"]) == pytest.approx(4.0)


def test_grouped_detail_tables(finished):
    _, out, _ = finished
    details = section((out / "report.md").read_text(), "Details (last round)")
    assert "| run | latent acc | latent F1 | recon error | server loss |" in details
    assert "| runA | 0.7 | 0.6 | 38 | 18 |" in details
    assert "| run | samples | FID-LeNet | class coverage |" in details
    assert "| runA | global | 200 | 0.9 |" in details and "| runA | pool | 98 | — |" in details
    assert "| runA | ∞ (no DP) | — | 0.4 | 0.7 |" in details  # ε spent, cross-check, ...
    assert "| runA | 0.1 | 0.2 | 0.3 | 0.4 | 0.5 | 0.6 | 4 | 12 |" in details  # timings
    clients = details.split("### Clients", 1)[1]
    assert "| runA | 0 | ok | 3/3 | 10 | 8 | ∞ | 4 |" in clients
    assert "| runA | 1 | error | 2/3 | 8 | 10 | ∞ | 4 |" in clients  # last reported values
    assert "class_share" not in details  # per-class shares stay in the CSVs


def test_summary_csv_has_every_final_value(finished):
    _, out, _ = finished
    (row,) = read_csv(out / "summary.csv")
    assert row["strategy"] == "align-fl" and row["privacy_mode"] == "none"
    assert float(row["epsilon_spent"]) == math.inf and float(row["lipschitz_weight"]) == 0.0
    assert row["local_epochs"] == "2" and row["seed"] == "0"
    assert float(row["global_class_share_3"]) == pytest.approx(0.1)
    assert float(row["client_0.lip_empirical"]) == pytest.approx(4.0)
    # client 1 failed in the last round: its final values are those of round 2
    assert float(row["client_1.lip_empirical"]) == pytest.approx(4.0)
    assert "# Summary" in (out / "summary.md").read_text()


def test_finished_run_per_round_csv_numbers_rounds_from_1(finished):
    _, out, _ = finished
    rows = read_csv(out / "rounds_runA.csv")
    assert [r["round"] for r in rows] == ["1", "2", "3"]
    np.testing.assert_allclose([float(r["eval.latent_accuracy"]) for r in rows], [0.5, 0.6, 0.7])
    np.testing.assert_allclose([float(r["server.loss"]) for r in rows], [20, 19, 18])
    np.testing.assert_allclose([float(r["timings.io"]) for r in rows], [0.6] * 3)
    assert [r["client_1.status"] for r in rows] == ["ok", "ok", "error"]
    assert rows[2]["client_1.loss"] == "" and "client_1.traceback" not in rows[0]


def test_finished_run_figures(finished):
    _, out, written = finished
    names = {p.name for p in written}
    for name in ("curves.png", "timings.png", "samples_runA.png", "latent_runA.png",
                 "synthetic_runA.png"):
        assert name in names
        assert_png(out / name, min_bytes=500 if name.startswith("synthetic") else 5000)
    assert "privacy_utility.png" not in names  # one run: nothing to compare
    md = (out / "report.md").read_text()
    for name in names:
        if name.endswith(".png"):
            assert f"]({name})" in md
    assert "## Notes" not in md  # nothing was skipped


def test_html_report_is_self_contained(finished):
    _, out, written = finished
    assert out / "report.html" in written
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    images = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(images) == sum(p.suffix == ".png" for p in written) == 5
    assert all(src.startswith("data:image/png;base64,") for src in images)
    data = base64.b64decode(images[0].split(",", 1)[1])
    assert data == (out / "curves.png").read_bytes()
    assert "<th>latent acc</th>" in page and "<td>∞ (no DP)</td>" in page
    assert "<h2>What was run</h2>" in page and "<b>latent accuracy 0.7</b>" in page


def test_samples_come_from_the_stored_models(finished):
    """Row 0: client 0's decoder (bias -20, black); row 1: client 1's (white); 2 global rows."""
    _, out, _ = finished
    grid = np.asarray(Image.open(out / "samples_runA.png").convert("L"), dtype=float)
    assert grid.shape[0] == 4 * CELL + 2
    margin = grid.shape[1] - (10 * CELL + 2)

    def row(i):  # the 10 image cells of grid row i, without the white padding
        return np.stack([grid[2 + i * CELL: (i + 1) * CELL, margin + 2 + j * CELL:
                              margin + (j + 1) * CELL] for j in range(10)])
    assert row(0).max() < 0.1 * 255 and row(1).min() > 0.9 * 255
    assert 20 < row(2).mean() < 235  # the random global VAE: grey, not a stored decoder
    assert row(2).std(axis=0).mean() > 0.5  # ten different z ~ N(0, I), not one


def test_partial_and_empty_runs(tmp_path):
    partial = write_run(tmp_path / "crashed" / "results.h5", rounds=2, final=False)
    empty = write_run(tmp_path / "empty" / "results.h5", rounds=0, final=False)
    out = tmp_path / "rep"
    written = run_report([partial, empty], out=out)
    names = {p.name for p in written}
    assert {"curves.png", "timings.png", "summary.csv", "headline.csv", "rounds_crashed.csv",
            "rounds_empty.csv", "report.html"} <= names
    assert not any(n.startswith(("samples_", "latent_", "synthetic_")) for n in names)
    rows = {r["run"]: r for r in read_csv(out / "headline.csv")}
    assert rows["crashed"]["status"] == "running" and rows["crashed"]["rounds_completed"] == "2"
    assert float(rows["crashed"]["latent_accuracy"]) == pytest.approx(0.6)
    assert rows["empty"]["rounds_completed"] == "0" and rows["empty"]["latent_accuracy"] == ""
    assert read_csv(out / "rounds_empty.csv") == []
    md = (out / "report.md").read_text()
    assert "| crashed | align-fl | none | ∞ (no DP) | 2/3 (not finished) | 0.6 |" in md
    assert "| empty | align-fl | none | ∞ (no DP) | 0/3 (not finished) | — |" in md
    assert "not finished (running or crashed), 2 of 3 rounds" in section(md, "What was run")
    assert "## The numbers to look at" not in md  # several runs: the headline table instead
    notes = section(md, "Notes (skipped parts)")
    assert "samples_crashed.png skipped: crashed has no /final group" in notes
    assert "latent_crashed.png skipped" in notes and "empty has no completed round" in notes
    assert "privacy_utility.png skipped: the runs do not differ" in notes


def test_recorded_epsilon_not_the_target(tmp_path):
    full = write_run(tmp_path / "full" / "results.h5", rounds=2, final=False, mode="full",
                     epsilon=8.0)
    median = write_run(tmp_path / "median" / "results.h5", rounds=2, final=False,
                       mode="decoder", epsilon=8.0, accounted=False)
    out = tmp_path / "rep"
    run_report([full, median], out=out)
    md = (out / "report.md").read_text()
    head = section(md, "Headline")
    # client 0 records 8·2/2 = 8 at the end, client 1 (failed last) 7·1/2 = 3.5: max 8.0
    assert "| full | align-fl | full | 8 | 2/3 (not finished) |" in head
    assert "| median | align-fl | decoder | not accounted | 2/3 (not finished) |" in head
    rows = {r["run"]: r for r in read_csv(out / "headline.csv")}
    assert float(rows["full"]["epsilon_spent"]) == 8.0 and rows["full"]["dp_accounted"] == "True"
    assert rows["median"]["epsilon_spent"] == "" and rows["median"]["dp_accounted"] == "False"
    privacy = md.split("### Privacy", 1)[1].split("###", 1)[0]
    assert "| full | 8 | 7.2 |" in privacy  # recorded ε and the cross-check (0.9 · 8)
    clients = md.split("### Clients", 1)[1].split("###", 1)[0]
    assert "| median | 0 | ok | 2/2 | 10 | 9 | 8 (not accounted) |" in clients


def test_privacy_utility_for_runs_differing_in_epsilon(tmp_path):
    paths = [write_run(tmp_path / sub / "same" / "results.h5", rounds=2, final=False,
                       mode=mode, epsilon=eps)
             for sub, mode, eps in (("a", "full", 1.0), ("b", "full", 8.0),
                                    ("c", "none", 10.0))]
    out = tmp_path / "rep"
    written = run_report(paths, out=out)
    assert out / "privacy_utility.png" in written
    assert_png(out / "privacy_utility.png")
    rows = read_csv(out / "summary.csv")
    assert [r["run"] for r in rows] == ["same", "same-2", "same-3"]
    assert [float(r["epsilon_spent"]) for r in rows] == [1.0, 8.0, math.inf]
    assert float(rows[1]["client_0.epsilon"]) == pytest.approx(8.0)
    assert float(rows[1]["client_1.epsilon"]) == pytest.approx(3.5)  # failed in the last round


def test_comparison_with_a_baseline_groups_seeds(tmp_path):
    a = [write_run(tmp_path / f"a-s{s}" / "results.h5", rounds=2, final=False, seed=s,
                   shift=0.01 * s) for s in range(2)]
    b = [write_run(tmp_path / f"b-s{s}" / "results.h5", rounds=2, final=False, seed=s,
                   lip=1.0, shift=0.1 + 0.03 * s) for s in range(2)]
    c = write_run(tmp_path / "c" / "results.h5", rounds=2, final=False, lip=2.0)
    out = tmp_path / "rep"
    written = run_report([b[0], a[0], b[1], a[1], c], out=out, baseline=a[0].parent)
    assert out / "comparison.csv" in written
    rows = read_csv(out / "comparison.csv")
    assert [r["group"] for r in rows] == ["a-s0, a-s1", "b-s0, b-s1", "c"]
    assert [r["seeds"] for r in rows] == ["0, 1", "0, 1", "0"]
    base, lip, single = rows
    assert float(base["latent_accuracy.mean"]) == pytest.approx(0.605)
    assert float(base["latent_accuracy.sd"]) == pytest.approx(0.01 / math.sqrt(2))
    assert float(lip["latent_accuracy.delta"]) == pytest.approx(0.11)
    se = math.sqrt((0.03 / math.sqrt(2)) ** 2 / 2 + (0.01 / math.sqrt(2)) ** 2 / 2)
    assert float(lip["latent_accuracy.delta_se"]) == pytest.approx(se)
    assert single["latent_accuracy.sd"] == "" and float(single["latent_accuracy.delta"]) == \
        pytest.approx(-0.005)
    assert base["latent_accuracy.delta"] == "0.0"
    md = section((out / "report.md").read_text(), "Comparison with a-s0")
    assert "| a-s0, a-s1 (baseline) | 0, 1 | 0.605 ± 0.0071 |" in md
    assert "| b-s0, b-s1 | 0, 1 | 0.715 ± 0.021 (+0.11 ± 0.016) |" in md
    assert "| c | 0 | 0.6 (−0.005 ± 0.005) |" in md


def test_unknown_baseline_is_refused(tmp_path):
    a = write_run(tmp_path / "a" / "results.h5", rounds=1, final=False)
    other = write_run(tmp_path / "other" / "results.h5", rounds=1, final=False)
    with pytest.raises(ConfigError, match=r"--baseline .*other.* is not one of the reported "
                                          r"runs \(a\); pass one of the RESULTS paths"):
        run_report([a], out=tmp_path / "rep", baseline=other)
    assert not (tmp_path / "rep").exists()
    assert run_report([a], out=tmp_path / "rep", baseline="a")[-1].name == "report.md"


def test_bad_input_raises_schema_error(tmp_path):
    bad = tmp_path / "notes.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(SchemaError, match="not a readable HDF5 file"):
        run_report([bad], out=tmp_path / "rep")
    with pytest.raises(SchemaError, match="no such file"):
        run_report([tmp_path / "missing.h5"], out=tmp_path / "rep")
    good = write_run(tmp_path / "r" / "results.h5", rounds=1, final=False)
    with pytest.raises(SchemaError, match="not a partition file"):
        run_report([good], out=tmp_path / "rep", partition=good)
    assert not (tmp_path / "rep").exists()  # refused before writing anything


def test_tables_for_notebooks(tmp_path):
    a = load(write_run(tmp_path / "a" / "results.h5", rounds=2, final=False, lip=0.5))
    b = load(write_run(tmp_path / "b" / "results.h5", rounds=1, final=False))
    rows = runs_table([a, b])
    assert [r["run"] for r in rows] == ["a", "b"] and list(rows[0]) == list(rows[1])
    assert rows[0]["lipschitz_weight"] == 0.5 and rows[1]["latent_accuracy"] == 0.5
    head = headline_table([a, b])
    assert [r["latent_accuracy"] for r in head] == [0.6, 0.5]
    per_round = per_round_table(a)
    assert [r["round"] for r in per_round] == [1, 2]
    assert per_round[1]["client_1.loss"] is None and per_round[0]["client_1.loss"] == 11.0


def test_version_1_file_is_reported_with_rounds_from_1(tmp_path):
    path = write_run(tmp_path / "old" / "results.h5", rounds=2, final=False)
    with h5py.File(path, "a") as f:  # turn it into what version 1 wrote: rounds 0 and 1
        f.attrs["schema_version"] = 1
        f["rounds"].move("0001", "0000")
        f["rounds"].move("0002", "0001")
    out = tmp_path / "rep"
    run_report([path], out=out)
    assert [r["round"] for r in read_csv(out / "rounds_old.csv")] == ["1", "2"]
    assert "(round 1: 0.5)" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["report", "{bad}"], "not a readable HDF5 file"),
    (["report", "{missing}"], "no such file"),
    (["report", "{good}", "--baseline", "{missing}"], "is not one of the reported runs"),
])
def test_cli_one_line_error(tmp_path, capsys, argv, message):
    from alignfl_mpi import cli

    bad = tmp_path / "x.h5"
    bad.write_text("x")
    good = write_run(tmp_path / "good" / "results.h5", rounds=1, final=False)
    paths = {"bad": bad, "missing": tmp_path / "missing.h5", "good": good}
    argv = [a.format(**paths) for a in argv] + ["--out", str(tmp_path / "rep")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alignfl-mpi: error: "), err
    assert message in err[0]
    assert not (tmp_path / "rep").exists()


def test_doctests():
    assert doctest.testmod(report).failed == 0


def test_privacy_panel_draws_each_groups_control_dashed():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alignfl_mpi.report import _privacy_panel

    fig, ax = plt.subplots()
    _privacy_panel(ax, [1.0, 8.0, math.inf, 1.0], [0.0, 0.0, 0.0, 1.0], [0.1, 0.2, 0.3, 0.4],
                   group_label="λ_lip", epsilon_axis=True, controls=[0.05, None, 0.07, None])
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1  # group λ_lip = 1 has no control value: no dashed line
    assert list(dashed[0].get_ydata()) == [0.05, 0.07]
    assert list(dashed[0].get_xdata()) == [1.0, 80.0]  # ∞ a decade right of the largest ε
    assert dashed[0].get_label() == "λ_lip = 0, control"
    plt.close(fig)


def test_privacy_panel_draws_unfinished_runs_hollow_outside_the_lines():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alignfl_mpi.report import _privacy_panel

    fig, ax = plt.subplots()
    _privacy_panel(ax, [1.0, 6.5, math.inf], [0.0, 0.0, 0.0], [0.1, 0.9, 0.3],
                   group_label="λ_lip", epsilon_axis=True, done=[True, False, True])
    (line,) = ax.get_lines()
    assert list(line.get_ydata()) == [0.1, 0.3]  # the unfinished run's 0.9 is not on it
    hollow = [c for c in ax.collections if len(c.get_offsets())
              and not c.get_facecolor().size]
    assert [list(c.get_offsets()[0]) for c in hollow] == [[6.5, 0.9]]
    assert "not finished" in [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)


def test_privacy_utility_notes_unfinished_runs(tmp_path):
    paths = [write_run(tmp_path / name / "results.h5", rounds=rounds, final=final, mode="full",
                       epsilon=eps)
             for name, rounds, final, eps in (("done1", 3, True, 1.0), ("done8", 3, True, 8.0),
                                             ("running", 2, False, 4.0))]
    out = tmp_path / "rep"
    run_report(paths, out=out)
    assert_png(out / "privacy_utility.png")
    md = (out / "report.md").read_text()
    assert "running is not finished (2 rounds recorded)" in md
    assert "done1 is not finished" not in md


def test_a_classifier_reference_gets_tables_and_one_note_not_vae_figures(tmp_path):
    from alignfl_mpi.reference import centralized
    part = tiny_partition(tmp_path / "p.h5")
    centralized(part, out=tmp_path / "centralized", epochs=1)
    vae_run = write_run(tmp_path / "align-fl" / "results.h5", rounds=2)
    out = tmp_path / "rep"
    written = {p.name for p in run_report([tmp_path / "centralized", vae_run], out=out)}
    assert "rounds_centralized.csv" in written and "samples_align-fl.png" in written
    assert not any(n.startswith(("samples_centralized", "latent_centralized",
                                 "synthetic_centralized")) for n in written)
    notes = section((out / "report.md").read_text(), "Notes (skipped parts)")
    assert "centralized: a classifier reference (no VAE)" in notes
    assert "lenet" not in notes  # no 'unknown architecture' noise


def test_curves_keep_one_colour_per_run_and_list_every_run(tmp_path, monkeypatch):
    from alignfl_mpi.reference import centralized
    part = tiny_partition(tmp_path / "p.h5")
    centralized(part, out=tmp_path / "centralized", epochs=2)  # task_accuracy only
    vae_a = write_run(tmp_path / "a" / "results.h5", rounds=2)
    vae_b = write_run(tmp_path / "b" / "results.h5", rounds=2)
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig) or path)
    runs = [report._Run(n, load(p)) for n, p in
            (("a", vae_a), ("b", vae_b), ("centralized", tmp_path / "centralized" / "results.h5"))]
    report._curves(runs, tmp_path / "curves.png", [])
    (fig,) = figures
    colours: dict[str, set] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert set(colours) == {"a", "b", "centralized"}
    assert all(len(c) == 1 for c in colours.values()), colours  # the same in every panel
    assert len({next(iter(c)) for c in colours.values()}) == 3  # and not shared
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["a", "b", "centralized"]
