"""experiments/quality_table.py and the summary step of experiments/quality.sh, on small
hand-made results files with known values. No MPI: quality.sh skips runs that are finished."""

from __future__ import annotations

import doctest
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignfl_mpi.results import ResultsWriter

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def qt():
    spec = importlib.util.spec_from_file_location("quality_table",
                                                  EXPERIMENTS / "quality_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality_table"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("quality_table", None)


def write_run(path: Path, acc, recon=None, var=None, *, f1=None, task=None) -> None:
    """A finished results file whose round n has the n-th value of each list."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = ResultsWriter(path, config_json=json.dumps({"rounds": len(acc)}),
                      attrs={"partition": "p.h5"})
    for r, a in enumerate(acc):
        evaluation = {"latent_accuracy": a, "latent_f1": a if f1 is None else f1}
        if recon is not None:
            evaluation.update(recon_error=recon[r], latent_var_min_ratio=var[r])
        if task is not None:
            evaluation["task_accuracy"] = task[r]
        w.write_round(r, clients={}, server={"loss": 1.0}, evaluation=evaluation,
                      timings={"round": 1.0})
    w.write_final(global_state={}, global_spec={}, decoders={})


def add_classifier(out: Path, seeds=(0, 1), rounds=10, *, final_shortfall=0.03):
    """Classifier runs ending ``final_shortfall`` (+ seed/100) below a centralised LeNet
    whose last epoch is 0.99 (its first 0.9)."""
    for s in seeds:
        task = list(np.linspace(0.5, 0.99 - final_shortfall - s / 100, rounds))
        write_run(out / f"align-fl-cond-s{s}" / "results.h5", [0.8] * rounds, task=task)
        ref = out / f"classifier-ref-s{s}" / "centralized" / "results.h5"
        ref.parent.mkdir(parents=True)
        w = ResultsWriter(ref, config_json="{}", attrs={"partition": "p.h5"})
        for r, acc in enumerate([0.9, 0.99]):
            w.write_round(r, clients={}, server={}, evaluation={"task_accuracy": acc},
                          timings={})
        w.write_final(global_state={}, global_spec={}, decoders={})


def make_folder(out: Path, seeds=(0, 1), rounds=10, *, final_gap=0.8, var_floor=0.2):
    """ALIGN-FL closes gap ``final_gap`` (+ seed/100) in the last round and 0.72 in round 3
    of a FedAvg at 0.6 against a centralised VAE at 0.9 (two epochs: 0.5, then 0.9)."""
    for s in seeds:
        gaps = np.linspace(0.1, final_gap + s / 100, rounds)
        if rounds >= 3:
            gaps[2] = 0.72
        write_run(out / f"align-fl-s{s}" / "results.h5", list(0.6 + 0.3 * gaps),
                  [30.0 - r for r in range(rounds)], [var_floor + 0.01 * r for r in range(rounds)])
        write_run(out / f"fedavg-s{s}" / "results.h5", [0.6] * rounds, [40.0] * rounds,
                  [0.5] * rounds)
        write_run(out / f"central-s{s}" / "centralized-vae" / "results.h5", [0.5, 0.9],
                  [30.0, 20.0], [0.4, 0.6], f1=0.88)


def test_doctests(qt):
    assert doctest.testmod(qt).failed == 0


def test_collect_and_goals_from_known_values(qt, tmp_path):
    make_folder(tmp_path, final_gap=0.8)
    q = qt.collect(tmp_path, ["0", "1"], 10)
    assert q.acc_alignfl.shape == (2, 10)
    np.testing.assert_allclose(q.acc_central, [0.9, 0.9])  # the last epoch, not the first
    np.testing.assert_allclose(q.closure[:, 9], [0.8, 0.81])
    np.testing.assert_allclose(q.closure[:, 2], [0.72, 0.72])
    np.testing.assert_allclose(q.recon_ratio[:, -1], [21 / 20, 21 / 20])
    verdicts = [(g.value, g.met) for g in qt.goals(q)]
    assert verdicts == [("80.5%", True), ("72.0%", True), ("1.05 x", True),
                        ("worst 0.200", True)]


def test_goals_fail_just_below_their_thresholds(qt, tmp_path):
    make_folder(tmp_path, final_gap=0.78, var_floor=0.04)
    q = qt.collect(tmp_path, ["0", "1"], 10)
    met = {g.text.split(" >=")[0].split(" <=")[0]: g.met for g in qt.goals(q)}
    assert met == {"gap closed by round 10": False, "gap closed by round 3": True,
                   "recon error": True,
                   "no latent dim below 5% of the largest variance, any round and seed": False}


def test_per_seed_rows(qt, tmp_path):
    make_folder(tmp_path, final_gap=0.8)
    text = qt.markdown(qt.collect(tmp_path, ["0", "1"], 10))
    assert "| 0 | 72.0% | 80.0% | 1.05 | 0.200 (1) |" in text
    assert "| 1 | 72.0% | 81.0% | 1.05 | 0.200 (1) |" in text


def test_markdown_table_rows_and_scaled_down_note(qt, tmp_path):
    make_folder(tmp_path, seeds=(0,), rounds=4)
    text = qt.markdown(qt.collect(tmp_path, ["0"], 4))
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4
    assert rows[2].split(" | ")[4] == "0.7200"  # gap closed in round 3, one seed: no ± sd
    assert "round 4 stands in for round 10" in text
    assert "F1 0.8800" in text


def test_cli_missing_run_is_one_line_and_exit_2(qt, tmp_path, capsys):
    make_folder(tmp_path, seeds=(0,))
    assert qt.main([str(tmp_path), "--seeds", "0", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "align-fl-s1/results.h5 is missing" in err and "quality.sh" in err


def test_cli_corrupt_results_file_is_one_line_and_exit_2(qt, tmp_path, capsys):
    make_folder(tmp_path, seeds=(0,))
    (tmp_path / "fedavg-s0" / "results.h5").write_bytes(b"not hdf5")
    assert qt.main([str(tmp_path), "--seeds", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "fedavg-s0/results.h5" in err and "not a readable HDF5 file" in err


def test_cli_too_few_rounds_names_the_run(qt, tmp_path, capsys):
    make_folder(tmp_path, seeds=(0,), rounds=3)
    assert qt.main([str(tmp_path), "--seeds", "0", "--rounds", "10"]) == 2
    err = capsys.readouterr().err
    assert "has 3 rounds of 'latent_accuracy', not 10" in err and "align-fl-s0" in err


def test_cli_labels_must_match_folders(qt, tmp_path, capsys):
    assert qt.main([str(tmp_path), "--labels", "a", "b"]) == 2
    assert "2 labels for 1 folders" in capsys.readouterr().err


def test_figure_with_two_folders_sharing_the_bounds(qt, tmp_path, capsys):
    a, b = tmp_path / "paper", tmp_path / "pool"
    make_folder(a, final_gap=0.6)
    make_folder(b, final_gap=1.1)
    shutil.rmtree(b / "fedavg-s0")
    os.symlink(a / "fedavg-s0", b / "fedavg-s0")
    png = tmp_path / "fig" / "quality.png"
    assert qt.main([str(a), str(b), "--seeds", "0", "1", "--labels", "paper", "pool",
                    "--figure", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.count("## ") == 2 and "gap closed by round 10 >= 80%: 60.5% -> FAIL" in out
    assert "gap closed by round 10 >= 80%: 110.5% -> PASS" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    qa, qb = qt.collect(a, ["0", "1"], 10), qt.collect(b, ["0", "1"], 10)
    assert qa.bounds_from[0] == qb.bounds_from[0]  # FedAvg seed 0 drawn once


def test_quality_sh_skips_finished_runs_and_writes_summary_and_figure(tmp_path):
    make_folder(tmp_path, seeds=(0, 1))
    env = dict(os.environ, OUT=str(tmp_path), SEEDS="0 1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(EXPERIMENTS / "quality.sh")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("finished, skipped") == 4  # align-fl and fedavg, two seeds
    assert "mpiexec" not in proc.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "seeds 0, 1; 10 rounds" in summary and "-> PASS" in summary
    assert (tmp_path / "quality.png").stat().st_size > 10_000


def test_classifier_table_and_goal(qt, tmp_path):
    make_folder(tmp_path)
    assert qt.collect_classifier(tmp_path, ["0", "1"], 10) is None  # none: no section
    add_classifier(tmp_path, final_shortfall=0.03)
    c = qt.collect_classifier(tmp_path, ["0", "1"], 10)
    np.testing.assert_allclose(c.central, [0.99, 0.99])  # the last epoch
    np.testing.assert_allclose(c.shortfall[:, -1], [0.03, 0.04])
    goal = qt.classifier_goal(c)
    assert goal.met and goal.value.startswith("0.035 below")
    text = qt.classifier_markdown(c)
    assert text.count("\n| ") == 12 and "centralised LeNet (last epoch): 0.9900 ± 0.0000" in text


def test_classifier_goal_fails_past_004(qt, tmp_path):
    make_folder(tmp_path)
    add_classifier(tmp_path, final_shortfall=0.04)  # 0.04 and 0.05: mean 0.045
    assert not qt.classifier_goal(qt.collect_classifier(tmp_path, ["0", "1"], 10)).met


def test_classifier_runs_for_some_seeds_only_is_an_error(qt, tmp_path, capsys):
    make_folder(tmp_path)
    add_classifier(tmp_path, seeds=(0,))
    assert qt.main([str(tmp_path), "--seeds", "0", "1"]) == 2
    assert "align-fl-cond-s1/results.h5 is missing" in capsys.readouterr().err


def test_quality_sh_classifier_knob_skips_finished_runs_and_adds_the_goal(tmp_path):
    make_folder(tmp_path, seeds=(0,))
    add_classifier(tmp_path, seeds=(0,))
    env = dict(os.environ, OUT=str(tmp_path), SEEDS="0", CLASSIFIER="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(EXPERIMENTS / "quality.sh")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "== align-fl-cond-s0: finished, skipped" in proc.stdout
    assert "== classifier-ref-s0" not in proc.stdout  # finished: not trained again
    assert "synthetic-only classifier within 0.04 of the centralised one by round 10: " \
           "0.030 below" in (tmp_path / "summary.md").read_text()


def test_quality_sh_trains_a_missing_reference_on_the_runs_partition(tmp_path):
    """A missing centralised LeNet is trained on the partition the run recorded (a stub
    ``alignfl-mpi`` on PATH logs its arguments instead)."""
    out = tmp_path / "out"
    make_folder(out, seeds=(0,))
    add_classifier(out, seeds=(0,))
    shutil.rmtree(out / "classifier-ref-s0")
    stub = tmp_path / "bin" / "alignfl-mpi"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    stub.chmod(0o755)
    env = dict(os.environ, OUT=str(out), SEEDS="0", CLASSIFIER="1",
               PATH=f"{stub.parent}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
                    f"{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(EXPERIMENTS / "quality.sh")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert "== classifier-ref-s0" in proc.stdout
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == [f"reference --what classifiers --partition p.h5 --out "
                     f"{out}/classifier-ref-s0 --seed 0"]
    assert proc.returncode != 0  # the stub trained nothing, so the summary cannot be made
    assert "classifier-ref-s0/centralized/results.h5 is missing" in proc.stderr
