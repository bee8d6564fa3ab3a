"""The GPU scaling check's pure parts (benchmarks/bench_gpu.py): nvidia-smi parsing, the
sampler against a fake nvidia-smi, the plan and the rendered tables. No MPI, no GPU."""

from __future__ import annotations

import doctest
import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "bench_gpu.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_gpu"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_gpu", None)
        sys.path.remove(str(BENCH))


def test_doctests(bench):
    result = doctest.testmod(bench)
    assert result.attempted >= 8 and result.failed == 0


def test_parse_gpu_query_takes_the_first_gpu_and_keeps_missing_as_none(bench):
    assert bench.parse_gpu_query("[N/A], 512\n90, 1\n") == (None, 512.0)
    assert bench.parse_gpu_query("garbage") == (None, None)


def test_window_stats_without_samples_reports_missing_not_zero(bench):
    stats = bench.window_stats([], [(0.0, 1.0)])
    assert stats["samples"] == 0
    assert all(stats[k] is None for k in ("util_mean", "util_peak", "mem_peak_mib",
                                           "procs_peak", "proc_mem_sum_peak_mib",
                                           "rank_mem_peak_mib"))


def test_sampler_without_nvidia_smi_is_missing(bench):
    sampler = bench.GpuSampler(interval_s=0.1, command="no-such-nvidia-smi-here")
    sampler.start()
    sampler.stop()
    assert not sampler.available and sampler.stats([(0.0, 1e12)]) is None


def test_sampler_reads_a_fake_nvidia_smi(bench, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n"
                    'case "$1" in\n'
                    f'  --query-gpu=*) echo "40, 2048" ;;\n'
                    f'  --query-compute-apps=*) echo "{os.getpid()}, 700"; echo "1, [N/A]" ;;\n'
                    "esac\n")
    fake.chmod(0o755)
    sampler = bench.GpuSampler(interval_s=0.05, command=str(fake))
    start = time.monotonic()
    sampler.start()
    time.sleep(0.4)
    sampler.stop()
    stats = sampler.stats([(start, time.monotonic())])
    assert stats["samples"] >= 2
    assert (stats["util_mean"], stats["util_peak"], stats["mem_peak_mib"]) == (40.0, 40.0, 2048.0)
    assert stats["procs_peak"] == 2 and stats["proc_mem_sum_peak_mib"] == 700.0
    # this test process has no MPI rank: no per-rank memory
    assert stats["rank_mem_peak_mib"] is None
    assert sampler.errors == []


def _row(bench, series, ranks, collect, **extra):
    return {"series": series, "client_ranks": ranks, "clients": 100, "local_epochs": 1,
            "name": f"{series}{ranks}", "status": "ok", "collect": collect,
            "collect_rounds": [collect * 0.6, collect * 0.4], "client_cpu": 10.0,
            "server_phase": 2.0, "run_wall": 30.0, **extra}


def test_render_gives_speedup_efficiency_and_missing_gpu_columns(bench):
    gpu = {"gpu_run": {"util_peak": 95.0, "mem_peak_mib": 9000.0,
                       "rank_mem_peak_mib": {"0": 800.0, "1": 1200.0, "2": 1500.0}},
           "gpu_collect": {"util_mean": 61.0}}
    doc = {"environment": {"cuda_device": "NVIDIA H200", "cpus": 16}, "mode": "full",
           "config": {"device": "cuda", "strong_clients": 100, "scheme": "dirichlet",
                      "clients_per_rank": 125, "rounds": 2, "checkpoints": False,
                      "sample_s": 0.3},
           "data": "mnist", "gpu_sampled": True, "elapsed_s": 300.0,
           "runs": [_row(bench, "strong", 1, 20.0), _row(bench, "strong", 2, 8.0, **gpu),
                    {"series": "weak", "client_ranks": 8, "name": "weak8",
                     "status": "skipped", "reason": "12 s of budget left"}],
           "server_pool": {"status": "timeout", "device": "cuda", "pool_size": 5000,
                           "epochs": 1, "rounds": 3,
                           "rows": [{"decoders": 10, "registry_bytes": 27.2e6, "accept_s": 0.1,
                                     "sample": 0.01, "train": 0.2, "total": 0.21}]}}
    text = bench.render(doc)
    lines = text.splitlines()
    strong = [line for line in lines if line.startswith("| 2 | 100 |")]
    assert strong == ["| 2 | 100 | 8.00 | 3.20 | 2.50 | 1.25 | 10.0 | 2.00 | 61 / 95 | 9000 | "
                      "800 / 1500 | 30.0 |"]
    assert "| 1 | 100 | 20.00 | 8.00 | 1.00 | 1.00 | 10.0 | 2.00 | n/a / n/a | n/a | n/a / n/a |" \
        in text
    assert "Weak scaling" not in text  # no weak run finished
    assert "weak8 (skipped: 12 s of budget left)" in text
    assert "(timeout: rows so far)" in text and "| 10 | 27.2 | 0.1 | 0.010 |" in text


def test_plot_writes_a_png(bench, tmp_path):
    doc = {"runs": [_row(bench, "strong", 1, 20.0), _row(bench, "strong", 2, 11.0),
                    _row(bench, "weak", 1, 9.0)], "environment": {}}
    path = bench.plot(doc, tmp_path / "scaling.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.plot({"runs": []}, tmp_path / "none.png") is None


def test_bad_arguments_fail_with_one_line(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", "/tmp/x", "--device", "cpu", "--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args([])
    assert "--out is required" in capsys.readouterr().err
