"""FedAdam: the server's Adam step, its options, its state; one tiny run under mpiexec."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from mpi_helpers import find_mpiexec

from alignfl_mpi.config import load_config
from alignfl_mpi.errors import ConfigError
from alignfl_mpi.messages import ClientUpdate
from alignfl_mpi.server import ServerState
from alignfl_mpi.strategies import build_strategy
from alignfl_mpi.strategies.fedadam import FedAdam, adam_step

CPU = torch.device("cpu")


def _cfg(*extra: str):
    return load_config(overrides=['strategy="fedadam"', "n_clients=2",
                                  "client.model.hidden=[16, 8]", "server.model.hidden=[16, 8]",
                                  *extra])


def _hand_adam(w, avg, m, v, *, eta, b1, b2, tau):
    """Adam on one float64 scalar, written out: the reference for the vectorised step."""
    delta = avg - w
    m = b1 * m + (1 - b1) * delta
    v = b2 * v + (1 - b2) * delta ** 2
    return w + eta * m / (math.sqrt(v) + tau), m, v


def test_adam_step_equals_hand_computed_adam_for_two_rounds():
    opts = {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    current = {"w": np.array([0.5, -0.2, 0.0], np.float32), "n": np.array(4, np.int64)}
    averages = [{"w": np.array([0.52, -0.25, 1e-5], np.float32), "n": np.array(7, np.int64)},
                {"w": np.array([0.4, -0.25, 0.3], np.float32), "n": np.array(9, np.int64)}]
    moments = {"m": {}, "v": {}}
    hand = [(float(w), 0.0, 0.0) for w in current["w"]]
    for avg in averages:
        current, moments = adam_step(current, avg, moments, names={"w", "n"}, **opts)
        hand = [_hand_adam(w, float(a), m, v, eta=0.1, b1=0.9, b2=0.99, tau=1e-3)
                for (w, m, v), a in zip(hand, avg["w"])]
        assert current["w"].dtype == np.float32
        np.testing.assert_allclose(current["w"], [h[0] for h in hand], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(moments["m"]["w"], [h[1] for h in hand], rtol=1e-5)
        np.testing.assert_allclose(moments["v"]["w"], [h[2] for h in hand], rtol=1e-5)
        assert int(current["n"]) == int(avg["n"])  # integer tensors take the average
    assert moments["m"]["w"].dtype == np.float64 and "n" not in moments["m"]
    # the Adam step is not FedAvg's: the global model is not the average
    assert abs(current["w"][2] - averages[1]["w"][2]) > 0.01


def _update(server, k, state, n=10.0):
    return ClientUpdate(round=0, client_id=k, spec=server.spec.to_dict(), state=state,
                        kind="model", metrics={"n_samples": n})


def _round(strategy, server, r, shift):
    """Two clients at global + shift and global + 3 shift: the mean is global + 2 shift."""
    glob = server.global_arrays()
    for k, scale in ((0, 1.0), (1, 3.0)):
        st = {name: (v + scale * shift if v.dtype.kind == "f" else v) for name, v in glob.items()}
        strategy.accept(server, k, _update(server, k, st), late=False)
    return strategy.aggregate(server, r, server.sample_synthetic(round_=r))


def test_server_takes_adam_steps_with_moments_carried_across_rounds():
    cfg = _cfg()
    strategy, server = build_strategy(cfg), ServerState(cfg, device=CPU)
    name = "fc_mu.bias"
    w0 = float(server.global_arrays()[name][0])
    hand = (w0, 0.0, 0.0)
    for r, shift in enumerate((0.01, -0.002)):
        metrics = _round(strategy, server, r, np.float32(shift))
        assert metrics["n_averaged"] == 2.0 and metrics["server_step_norm"] > 0
        avg = hand[0] + 2 * shift  # what every client sent, averaged
        hand = _hand_adam(hand[0], avg, hand[1], hand[2], eta=0.1, b1=0.9, b2=0.99, tau=1e-3)
        assert float(server.global_arrays()[name][0]) == pytest.approx(hand[0], abs=2e-6)
    # round 2 moved against its own (negative) delta: momentum from round 1 dominates
    assert hand[0] > w0 + 2 * 0.01


def test_spectral_norm_buffers_take_the_average():
    cfg = _cfg("client.model.spectral_norm=true", "server.model.spectral_norm=true")
    strategy, server = build_strategy(cfg), ServerState(cfg, device=CPU)
    params = {n for n, _ in server.vae.named_parameters()}
    buffers = [n for n in server.global_arrays() if n not in params]
    assert buffers  # the power-iteration vectors
    glob = server.global_arrays()
    _round(strategy, server, 0, np.float32(0.01))
    after = server.global_arrays()
    for n in buffers:
        np.testing.assert_allclose(after[n], glob[n] + 0.02, rtol=1e-6, err_msg=n)
    moved = next(n for n in params if n.endswith("original"))
    assert not np.allclose(after[moved], glob[moved] + 0.02)


def test_options_have_defaults_and_are_validated_in_one_line():
    assert FedAdam.OPTIONS == {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    assert build_strategy(_cfg("strategy_options.eta=0.01")).options["eta"] == 0.01
    for setting, message in (("eta=0", "eta must be a finite number > 0"),
                             ("tau=-1e-3", "tau must be a finite number > 0"),
                             ("tau=0", "tau must be a finite number > 0"),
                             ("beta_1=1.0", "beta_1 must be in \\[0, 1\\)"),
                             ("beta_2=-0.1", "beta_2 must be in \\[0, 1\\)"),
                             ("mu=0.1", "not an option of strategy 'fedadam'")):
        with pytest.raises(ConfigError, match=message) as info:
            build_strategy(_cfg(f"strategy_options.{setting}"))
        assert "\n" not in str(info.value)


def test_state_dict_round_trip_continues_bit_for_bit():
    cfg = _cfg()
    a, server_a = build_strategy(cfg), ServerState(cfg, device=CPU)
    _round(a, server_a, 0, np.float32(0.01))
    buffer = io.BytesIO()
    torch.save({"server": server_a.state_dict(), "strategy": a.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)  # as the runtime loads checkpoints
    assert all(t.dtype == torch.float64 for t in ckpt["strategy"]["v"].values())
    b, server_b = build_strategy(cfg), ServerState(cfg, device=CPU)
    server_b.load_state_dict(ckpt["server"])
    b.load_state_dict(ckpt["strategy"], server_b)
    for strategy, server in ((a, server_a), (b, server_b)):
        _round(strategy, server, 1, np.float32(-0.003))
    for name, value in server_a.global_arrays().items():
        np.testing.assert_array_equal(server_b.global_arrays()[name], value, err_msg=name)
    for key in ("m", "v"):
        for name, value in a.moments[key].items():
            np.testing.assert_array_equal(b.moments[key][name], value)


mpi = pytest.mark.skipif(find_mpiexec() is None, reason="no mpiexec available")
SETS = ("--set", 'strategy="fedadam"')


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    """Tiny FedAdam runs in ONE launch of 2 ranks (tests/mpi/sequence.py), shared by the
    tests below: two rounds in one go (``full``), then one round (``short``) resumed to two
    (``resumed``). Returns the folder and each run's result."""
    from mpi_helpers import run_sequence
    from test_mpi_runtime import tiny_partition, write_config

    folder = tmp_path_factory.mktemp("fedadam")
    part = tiny_partition(folder / "p.h5", n_clients=2)
    full = write_config(folder / "full.toml", part, folder / "full", n_clients=2, rounds=2)
    short = write_config(folder / "short.toml", part, folder / "short", n_clients=2, rounds=1)
    steps = [{"name": "full", "argv": ["run", "--config", str(full), *SETS]},
             {"name": "short", "argv": ["run", "--config", str(short), *SETS]},
             {"name": "resumed", "argv": ["run", "--config", str(short), *SETS, "--resume",
                                          "--rounds", "2"]}]
    procs, _ = run_sequence(2, steps, folder / "steps", timeout=300)
    return folder, procs


@mpi
def test_fedadam_runs_under_mpiexec(two_rounds):
    from alignfl_mpi.results import load

    folder, procs = two_rounds
    assert procs["full"].returncode == 0, procs["full"].stderr
    res = load(folder / "full" / "results.h5")
    assert res.finished and res.config["strategy"] == "fedadam"
    assert list(res.server["n_averaged"]) == [2.0, 2.0]
    assert (res.server["server_step_norm"] > 0).all()
    assert np.isfinite(res.eval["latent_accuracy"]).all()


@mpi
@pytest.mark.slow
def test_fedadam_resume_is_bit_for_bit_under_mpiexec(two_rounds):
    """One round, then ``--resume`` to two: the same global model as two in one go."""
    from alignfl_mpi.results import load

    folder, procs = two_rounds
    assert procs["short"].returncode == 0, procs["short"].stderr
    proc = procs["resumed"]
    assert proc.returncode == 0, proc.stderr
    assert "resuming after round 1" in proc.stderr
    _, a = load(folder / "full" / "results.h5").final_global()
    _, b = load(folder / "short" / "results.h5").final_global()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
