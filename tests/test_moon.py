"""MOON: the contrastive term, the previous model in the client's state; one tiny run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi_helpers import find_mpiexec
from strategy_helpers import local_round

from alignfl_mpi.checkpoint import load_checkpoint, save_raw_checkpoint
from alignfl_mpi.client import new_local_state
from alignfl_mpi.config import ClientConfig, ModelConfig, load_config
from alignfl_mpi.errors import ConfigError
from alignfl_mpi.models import ModelSpec, build_vae
from alignfl_mpi.strategies import build_strategy
from alignfl_mpi.strategies.moon import PREVIOUS_KEY, ContrastiveTerm, Moon, contrastive_loss

CPU = torch.device("cpu")
HIDDEN = (16, 8)
CFG = ClientConfig(model=ModelConfig(hidden=HIDDEN), local_epochs=1, batch_size=16, lr=1e-2)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _arrays(seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return {k: v.numpy().copy() for k, v in
            build_vae(ModelSpec(arch="mlp", hidden=HIDDEN)).state_dict().items()}


GLOBALS = [_arrays(1), _arrays(2)]  # the global models of rounds 0 and 1


def _rounds(strategy: str, images, n: int = 2, **options):
    """``n`` local rounds of a fresh client; its state and its updates."""
    state = new_local_state(0, CFG, seed=0, device=CPU)
    updates = [local_round(state, images, round_=r, seed=0, strategy=strategy,
                           global_state=GLOBALS[r], **options) for r in range(n)]
    return state, updates


# --- the term ------------------------------------------------------------------------------
def test_contrastive_loss_equals_the_formula():
    gen = torch.Generator().manual_seed(3)
    z, zg, zp = (torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    t = 0.3

    def cos(a, b):
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))

    pos, neg = torch.exp(cos(z, zg) / t), torch.exp(cos(z, zp) / t)
    expected = (-torch.log(pos / (pos + neg))).mean()
    assert float(contrastive_loss(z, zg, [zp], temperature=t)) == pytest.approx(
        float(expected), rel=1e-12)
    # every further previous model is one more negative in the denominator
    zq = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    neg2 = torch.exp(cos(z, zq) / t)
    expected2 = (-torch.log(pos / (pos + neg + neg2))).mean()
    assert float(contrastive_loss(z, zg, [zp, zq], temperature=t)) == pytest.approx(
        float(expected2), rel=1e-12)


def test_contrastive_loss_is_lower_when_z_is_closer_to_the_global_representation():
    z = torch.tensor([[1.0, 0.2], [0.5, -1.0]])
    near, far = z + 0.05, torch.tensor([[-1.0, 0.4], [0.3, 1.0]])
    low = contrastive_loss(z, near, [far], temperature=0.5)
    high = contrastive_loss(z, far, [near], temperature=0.5)
    assert float(low) < float(torch.log(torch.tensor(2.0))) < float(high)


@pytest.mark.parametrize(("kind", "heads"), [("mu", ("fc_mu.",)),
                                             ("z", ("fc_mu.", "fc_logvar."))])
def test_term_gradient_reaches_the_encoder_and_its_heads_only(images, kind, heads):
    vae = build_vae(ModelSpec(arch="mlp", hidden=HIDDEN))
    glob = {k: torch.from_numpy(v) for k, v in GLOBALS[0].items()}
    vae.load_state_dict(glob)
    term = ContrastiveTerm(vae, [{k: torch.from_numpy(v) for k, v in GLOBALS[1].items()}],
                           weight=2.0, temperature=0.5, kind=kind)
    with torch.no_grad():  # the local model moves away from the global one
        for p in vae.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _, mu, _ = vae(images)
    value = term(vae, images, mu)
    assert value.ndim == 0 and float(value.detach()) > 0
    value.backward()
    for name, p in vae.named_parameters():
        reached = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert reached == name.startswith(("encoder.", *heads)), name
    # the frozen copies hold the global and previous weights, untouched and without grads
    for frozen, source in ((term.glob, glob), (term.previous[0], GLOBALS[1])):
        for name, p in frozen.state_dict().items():
            np.testing.assert_array_equal(p.numpy(), np.asarray(source[name]), err_msg=name)
        assert not any(p.requires_grad for p in frozen.parameters())


# --- the client round ----------------------------------------------------------------------
def test_first_round_is_fedavg_and_previous_model_is_kept_in_extra(images):
    state, (u0, u1) = _rounds("moon", images)
    _, (f0, _) = _rounds("fedavg", images)
    for name, value in f0.state.items():  # no previous model yet: no term, FedAvg's round
        np.testing.assert_array_equal(u0.state[name], value, err_msg=name)
    assert f0.metrics["penalty"] == u0.metrics["penalty"] == 0.0
    assert u1.metrics["penalty"] > 0  # the term is on from the second round
    *_, previous = state.extra[PREVIOUS_KEY]  # the model at the end of the last round
    assert len(state.extra[PREVIOUS_KEY]) == 2 and set(previous) == set(u1.state)
    for name, value in u1.state.items():
        assert previous[name].device.type == "cpu"
        np.testing.assert_array_equal(previous[name].numpy(), value, err_msg=name)


def test_previous_model_survives_the_client_checkpoint(images, tmp_path):
    state, _ = _rounds("moon", images, n=1)
    save_raw_checkpoint(tmp_path / "c.ckpt", state.checkpoint_state())  # as the runtime saves it
    after = local_round(state, images, round_=1, seed=0, strategy="moon",
                        global_state=GLOBALS[1])
    resumed = new_local_state(0, CFG, seed=5, device=CPU)
    resumed.load_state_dict(load_checkpoint(tmp_path / "c.ckpt"))  # and loads it
    replay = local_round(resumed, images, round_=1, seed=0, strategy="moon",
                         global_state=GLOBALS[1])
    assert replay.metrics["penalty"] == after.metrics["penalty"] > 0
    for name, value in after.state.items():
        np.testing.assert_array_equal(replay.state[name], value, err_msg=name)


def test_buffer_keeps_the_newest_models(images):
    state, updates = _rounds("moon", images, n=2, buffer_size=1)
    (previous,) = state.extra[PREVIOUS_KEY]
    for name, value in updates[-1].state.items():
        np.testing.assert_array_equal(previous[name].numpy(), value, err_msg=name)


def test_term_changes_the_round_and_mu_zero_is_fedavg_bit_for_bit(images):
    _, (_, fedavg) = _rounds("fedavg", images)
    _, (_, off) = _rounds("moon", images, mu=0.0)
    _, (_, on) = _rounds("moon", images, mu=5.0)
    for name, value in fedavg.state.items():
        np.testing.assert_array_equal(off.state[name], value, err_msg=name)
    assert off.metrics["penalty"] == 0.0
    assert any(not np.array_equal(on.state[k], fedavg.state[k]) for k in fedavg.state)
    # the term's gradient reaches the mean head
    assert not np.array_equal(on.state["fc_mu.weight"], fedavg.state["fc_mu.weight"])


# --- configuration -------------------------------------------------------------------------
def _cfg(*extra: str):
    return load_config(overrides=['strategy="moon"', "n_clients=2", *extra])


def test_options_defaults_and_validation_in_one_line():
    assert Moon.OPTIONS == {"mu": 1.0, "temperature": 0.5, "buffer_size": 5,
                            "representation": "z"}  # the reference code's
    assert build_strategy(_cfg("strategy_options.temperature=0.1")).options == \
        {"mu": 1.0, "temperature": 0.1, "buffer_size": 5, "representation": "z"}
    for setting, message in (("strategy_options.mu=-1", "mu must be a finite number >= 0"),
                             ("strategy_options.temperature=0",
                              "temperature must be a finite number > 0"),
                             ("strategy_options.buffer_size=0", "buffer_size must be >= 1"),
                             ("strategy_options.buffer_size=1.5", "must be an integer"),
                             ('strategy_options.representation="x"',
                              "representation must be one of z, mu"),
                             ('client.privacy.mode="decoder"',
                              "would send a non-private encoder; use 'full'")):
        with pytest.raises(ConfigError, match=message) as info:
            build_strategy(_cfg(setting))
        assert "\n" not in str(info.value)


# --- DP-MOON -------------------------------------------------------------------------------
def test_dp_moon_clips_the_contrastive_term_with_each_samples_loss():
    """The term joins each sample's loss before clipping: the clipper's per-sample gradient
    norms of ``vae loss + l_con`` equal one backward per sample (so the clipping, and the
    accounting, cover the term's gradient), and differ from the norms without it."""
    from test_privacy import effective_tensors
    from torch.nn.utils import parametrize

    from alignfl_mpi.models import ModelSpec, build_vae
    from alignfl_mpi.privacy import PerSampleClipper, per_sample_vae_loss

    torch.manual_seed(0)
    vae = build_vae(ModelSpec(arch="mlp", hidden=(16, 8))).eval()  # eval: z = mu
    previous = [{k: v + 0.1 * torch.randn_like(v) for k, v in vae.state_dict().items()}]
    glob = build_vae(ModelSpec(arch="mlp", hidden=(16, 8)))
    term = ContrastiveTerm(glob, previous, weight=5.0, temperature=0.5, kind="mu")
    x = torch.rand(6, 1, 28, 28)
    clipper = PerSampleClipper(vae)
    with clipper.capture():
        recon, mu, logvar = vae(x)
    base = per_sample_vae_loss(recon, x, mu, logvar, kl_weight=0.5)[0]
    extra = term.per_sample(vae, x, mu, logvar)
    assert extra.shape == (6,) and (extra > 0).all()
    clipper.backward(base + extra)
    norms = clipper.norms()
    rows, plain = [], []
    with parametrize.cached():
        tensors = effective_tensors(clipper)
        for i in range(len(x)):
            r, m, lv = vae(x[i:i + 1])
            loss = per_sample_vae_loss(r, x[i:i + 1], m, lv, kl_weight=0.5)[0].sum()
            grads = torch.autograd.grad(loss + term.per_sample(vae, x[i:i + 1], m, lv).sum(),
                                        tensors, retain_graph=True)
            rows.append(torch.cat([g.flatten() for g in grads]))
            plain.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, tensors)]))
    expected = torch.stack(rows).double().norm(dim=1)
    torch.testing.assert_close(norms, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, torch.stack(plain).double().norm(dim=1), rtol=1e-3)


def test_dp_moon_round_is_accounted_and_the_term_changes_the_update(images):
    """DP-MOON's second round: epsilon recorded as DP-FedAvg's (same plan, same steps);
    the contrastive term (mu = 5) changes the privatised update."""
    from test_dp_baselines import dp_cfg, fresh_state

    def two_rounds(strategy, **options):
        state = fresh_state(dp_cfg())
        return [local_round(state, images, round_=r, seed=0, strategy=strategy,
                            global_state=GLOBALS[r], **options) for r in range(2)][1]

    fedavg, moon = two_rounds("fedavg"), two_rounds("moon", mu=5.0)
    assert moon.metrics["epsilon"] == fedavg.metrics["epsilon"] > 0
    assert moon.metrics["dp_accounted"] == 1.0
    assert any(not np.array_equal(moon.state[k], fedavg.state[k]) for k in fedavg.state)


# --- under mpiexec -------------------------------------------------------------------------
@pytest.mark.skipif(find_mpiexec() is None, reason="no mpiexec available")
def test_moon_runs_under_mpiexec(small_runs):
    from alignfl_mpi.results import load

    proc, folder = small_runs["moon"]  # a run of the small_runs launch (conftest.py)
    assert proc.returncode == 0, proc.stderr
    res = load(folder / "results.h5")
    assert res.finished and res.config["strategy"] == "moon"
    assert list(res.server["n_averaged"]) == [2.0, 2.0]
    for c in (0, 1):  # no term in a client's first round, the term from its second
        penalty = res.clients[c]["penalty"]
        assert penalty[0] == 0.0 and penalty[1] > 0
