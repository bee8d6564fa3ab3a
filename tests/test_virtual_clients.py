"""Many clients per rank and partial participation: placement, sampling, and one run that
resumes on another number of ranks and still equals the uninterrupted run bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from mpi_helpers import find_mpiexec

from alignfl_mpi.config import RunConfig, load_config, participants_per_round
from alignfl_mpi.errors import ConfigError
from alignfl_mpi.placement import place_clients, sample_participants
from alignfl_mpi.results import load


# --- without MPI ---------------------------------------------------------------------------
def test_placement_balances_samples_and_gives_every_rank_a_client():
    sizes = [100, 90, 80, 70, 60, 50, 40, 30, 20, 10]
    placed = place_clients(sizes, n_ranks=3)
    assert sorted(c for rank in placed for c in rank) == list(range(10))
    assert all(placed)
    loads = [sum(sizes[c] for c in rank) for rank in placed]
    assert max(loads) - min(loads) <= max(sizes) // 2  # greedy: within one small client
    assert place_clients(sizes, n_ranks=3) == placed  # every rank computes the same
    assert place_clients([5, 5, 5], n_ranks=3) == [[0], [1], [2]]
    # one large client: the other ranks still get one each
    assert all(place_clients([1000, 1, 1, 1], n_ranks=3))
    with pytest.raises(ValueError, match="every rank needs a client"):
        place_clients([1, 2], n_ranks=3)


def test_participants_depend_on_seed_and_round_only():
    rounds = [sample_participants(7, r, n_clients=100, k=10) for r in range(20)]
    assert all(len(set(p)) == 10 and p == sorted(p) for p in rounds)
    assert len({tuple(p) for p in rounds}) == 20  # a new draw every round
    assert rounds[3] == sample_participants(7, 3, n_clients=100, k=10)
    assert rounds[3] != sample_participants(8, 3, n_clients=100, k=10)
    # every client is asked about equally often
    counts = np.bincount(np.concatenate(rounds), minlength=100)
    assert counts.sum() == 200 and counts.max() <= 8


@pytest.mark.parametrize(("value", "n", "k"), [(1.0, 5, 5), (0.5, 20, 10), (0.01, 20, 1),
                                               (3, 20, 3), (20, 20, 20)])
def test_clients_per_round_is_a_fraction_or_a_count(value, n, k):
    assert participants_per_round(RunConfig(n_clients=n, clients_per_round=value)) == k


@pytest.mark.parametrize(("value", "message"), [
    (0.0, "must be a fraction in \\(0, 1\\] or a whole count > 1"),
    (2.5, "must be a fraction in \\(0, 1\\] or a whole count > 1"),
    (30, "is more than n_clients = 20"),
])
def test_bad_clients_per_round_is_one_line(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=["n_clients=20", f"clients_per_round={value}"])


# --- under mpiexec -------------------------------------------------------------------------
N_CLIENTS = 20


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """20 clients, participation 0.5, 3 rounds: pipelined with clients spilling to disk, 1
    round on 2 ranks (all clients on one rank); then, in one launch of 3 ranks
    (tests/mpi/sequence.py), the same 3 rounds uninterrupted and synchronous (2 client
    ranks), and the pipelined run resumed to 3 rounds (its clients now on 2 ranks). Both
    with ``client.fresh_optimizer``, whose checkpoints and spills leave Adam's moments out
    (``LocalState.checkpoint_state``); the resume scenario of conftest.py keeps them."""
    if find_mpiexec() is None:
        pytest.skip("no mpiexec available")
    from mpi_helpers import run_sequence
    from test_mpi_runtime import launch, tiny_partition, write_config

    tmp = tmp_path_factory.mktemp("virtual")
    part = tiny_partition(tmp / "p.h5", n_clients=N_CLIENTS, n_per_client=24)
    sets = ["--set", "clients_per_round=0.5", "--set", "server.quality_metrics=false",
            "--set", "output.png=false", "--set", "client.fresh_optimizer=true"]
    # pipelined, and a memory budget of ~2 clients' state: the others spill
    split_sets = [*sets, "--set", "server.pipeline=true", "--set", "rank_memory_mb=1.5",
                  "--set", f'client.private_dir="{tmp / "private"}"']
    cfg = {name: write_config(tmp / f"{name}.toml", part, tmp / name, n_clients=N_CLIENTS,
                              rounds=3) for name in ("full", "split")}
    out = {name: tmp / name / "results.h5" for name in cfg}
    out["private"] = tmp / "private"
    first = launch(2, "run", "--config", str(cfg["split"]), *split_sets, "--rounds", "1",
                   timeout=300)
    out["split_first_placement"] = (list(load(out["split"]).attrs["placement"])
                                    if out["split"].exists() else None)
    steps = [{"name": "full", "argv": ["run", "--config", str(cfg["full"]), *sets]},
             {"name": "resume", "argv": ["run", "--config", str(cfg["split"]), *split_sets,
                                         "--resume"]}]
    procs, _ = run_sequence(3, steps, tmp / "steps", timeout=400)
    out["procs"] = [first, procs["full"], procs["resume"]]
    return out


@pytest.mark.mpi
def test_runs_many_clients_per_rank_with_participation(runs):
    for proc in runs["procs"]:
        assert proc.returncode == 0, proc.stderr
    res = load(runs["full"])
    assert res.finished and res.rounds == [1, 2, 3]
    placement = list(res.attrs["placement"])
    assert sorted(set(placement)) == [1, 2] and len(placement) == N_CLIENTS
    asked = [[c for c in range(N_CLIENTS) if res.clients[c]["status"][r] == "ok"]
             for r in range(3)]
    assert asked == [sample_participants(3, r, n_clients=N_CLIENTS, k=10) for r in range(3)]
    ever = set().union(*asked)
    assert all(set(res.clients[c]["status"]) == {"not_asked"}
               for c in range(N_CLIENTS) if c not in ever)
    # the stateful server keeps every client's last decoder: it samples from all of them
    stored = [len(set().union(*asked[:r + 1])) for r in range(3)]
    assert list(res.server["n_synthetic"]) == [n * 32 for n in stored]
    assert sorted(res.final_decoders()) == sorted(ever)


@pytest.mark.mpi
def test_pipelined_resumed_on_other_ranks_equals_the_synchronous_run(runs):
    """Neither the placement, the pipeline nor spilling changes results: pipelined and over
    its memory budget, 1 round on 2 ranks and resumed on 3, equals 3 synchronous rounds on 3
    ranks bit for bit (each client's checkpoint is its own; the server's round r uses
    exactly round r's updates; a spilled state is read back as it was)."""
    # clients not asked again since they spilled are still on disk at the end
    assert list(runs["private"].glob("run-*/client_*/spilled.ckpt"))
    a, b = load(runs["full"]), load(runs["split"])
    # the results keep the placement of the run's first launch: all on rank 1 (-n 2)
    assert b.finished and runs["split_first_placement"] == [1] * N_CLIENTS
    assert list(b.attrs["placement"]) == [1] * N_CLIENTS != list(a.attrs["placement"])
    _, ga = a.final_global()
    _, gb = b.final_global()
    for k in ga:
        np.testing.assert_array_equal(ga[k], gb[k], err_msg=k)
    for key in ("loss", "n_synthetic"):
        np.testing.assert_array_equal(a.server[key], b.server[key], err_msg=key)
    np.testing.assert_array_equal(a.eval["latent_accuracy"], b.eval["latent_accuracy"])
    for c in range(N_CLIENTS):
        assert list(a.clients[c]["status"]) == list(b.clients[c]["status"])
        if "loss" in a.clients[c]:
            np.testing.assert_array_equal(a.clients[c]["loss"], b.clients[c]["loss"])


def test_pipeline_is_refused_for_strategies_that_send_the_global_model():
    from alignfl_mpi.strategies import build_strategy

    with pytest.raises(ConfigError, match="server.pipeline cannot run strategy 'fedavg'"):
        build_strategy(load_config(overrides=['strategy="fedavg"', "server.pipeline=true"]))
    build_strategy(load_config(overrides=["server.pipeline=true"]))


@pytest.mark.mpi
def test_world_size_must_fit_the_clients(tmp_path):
    if find_mpiexec() is None:
        pytest.skip("no mpiexec available")
    from test_mpi_runtime import launch, tiny_partition, write_config

    part = tiny_partition(tmp_path / "p.h5", n_clients=1)
    cfg = write_config(tmp_path / "c.toml", part, tmp_path / "run", n_clients=1)
    proc = launch(3, "run", "--config", str(cfg), timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert lines == ["alignfl-mpi: error: world size 3 does not fit the config: 1 client "
                     "runs on 1 client rank plus the server (mpiexec -n 2)"], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_lipschitz_of_a_stored_decoder_is_measured_once(tmp_path, monkeypatch):
    """The per-round evaluation costs one Lipschitz estimate per decoder received, not per
    decoder stored (with many clients most stored decoders did not change)."""
    import torch
    from strategy_helpers import local_round
    from test_mpi_runtime import tiny_partition

    import alignfl_mpi.assess as assess
    from alignfl_mpi.client import new_local_state
    from alignfl_mpi.schema import read_split
    from alignfl_mpi.server import ServerState

    part = tiny_partition(tmp_path / "p.h5", n_clients=2)
    cfg = load_config(overrides=["n_clients=2", "server.quality_metrics=false",
                                 "client.model.hidden=[16, 8]", "server.model.hidden=[16, 8]",
                                 "client.local_epochs=1", "client.prior_components=2"])
    images, labels = read_split(part)
    cpu = torch.device("cpu")
    evaluator = assess.RoundEvaluator(cfg=cfg, partition=part, test_images=images,
                                      test_labels=labels, device=cpu)
    server = ServerState(cfg, device=cpu)
    calls = []
    original = assess.lipschitz_report
    monkeypatch.setattr(assess, "lipschitz_report",
                        lambda *a, **k: calls.append(1) or original(*a, **k))

    def deliver(cid, round_):
        state = new_local_state(cid, cfg.client_config(cid), seed=round_, device=cpu)
        update = local_round(state, torch.rand(32, 1, 28, 28), round_=round_, seed=0)
        server.accept(cid, spec=update.spec, state=update.state, prior=update.prior,
                      round_=round_, metrics=update.metrics)

    deliver(0, 0)
    deliver(1, 0)
    first = evaluator.lipschitz(server, round_=0)
    assert len(calls) == 2 and sorted(first) == [0, 1]
    assert evaluator.lipschitz(server, round_=1) == first and len(calls) == 2
    deliver(0, 2)  # a new decoder from client 0 only
    third = evaluator.lipschitz(server, round_=2)
    assert len(calls) == 3 and third[1] == first[1] and third[0] != first[0]
