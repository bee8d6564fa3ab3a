"""The server's synthetic pool: a total size split over the stored decoders (no MPI)."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from alignfl_mpi.config import load_config
from alignfl_mpi.models import build_decoder, model_spec
from alignfl_mpi.prior import standard_normal_prior
from alignfl_mpi.seeds import Role, derive_seed
from alignfl_mpi.server import ServerState, draw_pool, pool_shares, pool_weights

CPU = torch.device("cpu")
HIDDEN = "[32, 16]"


def _server(*over: str) -> ServerState:
    cfg = load_config(overrides=[f"server.model.hidden={HIDDEN}",
                                 f"client.model.hidden={HIDDEN}", "server.samples_per_client=7",
                                 "server.epochs=1", *over])
    return ServerState(cfg, device=CPU)


def _store(server: ServerState, client_id: int, *, round_: int = 0,
           metrics: dict[str, float] | None = None, seed: int | None = None) -> None:
    """Accept a freshly initialised decoder (it passes the probe) for ``client_id``."""
    spec = model_spec(server.cfg.client.model)
    torch.manual_seed(1000 + (client_id if seed is None else seed))
    state = {k: v.detach().numpy().copy() for k, v in build_decoder(spec).state_dict().items()}
    server.accept(client_id, spec=spec.to_dict(), state=state,
                  prior=standard_normal_prior(spec.latent_dim).to_arrays(), round_=round_,
                  metrics=dict(metrics) if metrics is not None else {"n_samples": 100.0})


def _counts(labels: torch.Tensor) -> dict[int, int]:
    ids, counts = labels.unique(return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist()))


# --- the split ----------------------------------------------------------------------------------
@pytest.mark.parametrize("weights, total, expected", [
    ({0: 1, 1: 1, 2: 1}, 10, {0: 4, 1: 3, 2: 3}),        # equal remainders: lower id first
    ({5: 1, 2: 1, 9: 1}, 4, {2: 2, 5: 1, 9: 1}),         # ties by id, not by insertion order
    ({0: 1, 1: 2, 2: 3, 3: 4}, 7, {0: 1, 1: 1, 2: 2, 3: 3}),  # quotas .7 1.4 2.1 2.8
    ({0: 1, 1: 1000}, 10, {0: 0, 1: 10}),                # a decoder may get nothing
    ({0: 1, 1: 3}, 0, {0: 0, 1: 0}),
    ({}, 50, {}),
])
def test_largest_remainder_exact_cases(weights, total, expected):
    shares = pool_shares(weights, total)
    assert shares == expected and list(shares) == sorted(expected)


def test_shares_sum_to_the_pool_and_stay_within_one_of_their_quota():
    rnd = random.Random(4)
    for _ in range(200):
        k = rnd.randint(1, 300)
        weights = {rnd.randrange(10**6): Fraction(rnd.randint(0, 50), rnd.randint(1, 9))
                   for _ in range(k)}
        if not any(weights.values()):
            continue
        total = rnd.randint(0, 20000)
        shares = pool_shares(weights, total)
        assert sum(shares.values()) == total and set(shares) == set(weights)
        sum_w = sum(weights.values())
        for cid, n in shares.items():
            quota = total * weights[cid] / sum_w
            assert quota - 1 < n < quota + 1
            if weights[cid] == 0:
                assert n == 0


def test_split_refuses_bad_input():
    with pytest.raises(ValueError, match="at least one pool weight"):
        pool_shares({0: 0, 1: 0}, 5)
    with pytest.raises(ValueError, match="non-negative"):
        pool_shares({0: -1, 1: 2}, 5)
    with pytest.raises(ValueError, match=">= 0"):
        pool_shares({0: 1}, -1)


# --- the weights --------------------------------------------------------------------------------
def test_weights_by_samples_and_recency_and_the_uniform_fallback():
    server = _server()
    _store(server, 0, round_=0, metrics={"n_samples": 100.0})
    _store(server, 1, round_=1, metrics={"n_samples": 300.0})
    _store(server, 2, round_=3, metrics={"n_samples": 50.0})
    reg = server.registry
    assert pool_weights(reg, weighting="uniform", round_=3) == {0: 1, 1: 1, 2: 1}
    assert pool_weights(reg, weighting="samples", round_=3) == {0: 100, 1: 300, 2: 50}
    assert pool_weights(reg, weighting="recency", round_=3) == {
        0: Fraction(1, 4), 1: Fraction(1, 3), 2: Fraction(1)}
    # a decoder stored for a later round than the one sampled counts as age 0
    assert pool_weights(reg, weighting="recency", round_=0)[2] == 1
    reg[1].metrics.pop("n_samples")
    assert pool_weights(reg, weighting="samples", round_=3) == {0: 1, 1: 1, 2: 1}
    reg[1].metrics["n_samples"] = float("nan")
    assert pool_weights(reg, weighting="samples", round_=3) == {0: 1, 1: 1, 2: 1}
    with pytest.raises(ValueError, match="unknown pool weighting"):
        pool_weights(reg, weighting="loss", round_=3)


# --- the pool the server draws ------------------------------------------------------------------
def test_pool_size_bounds_the_pool_whatever_the_number_of_decoders():
    for n_decoders in (1, 3, 40):
        server = _server("server.pool_size=100")
        for cid in range(n_decoders):
            _store(server, cid)
        images, labels = server.sample_synthetic(round_=0)
        assert images.shape == (100, 1, 28, 28) and labels.shape == (100,)
        counts = _counts(labels)
        assert sum(counts.values()) == 100
        assert max(counts.values()) - min(counts.values()) <= 1  # uniform
        assert float(images.min()) >= 0 and float(images.max()) <= 1
        assert len(server.last_classes) == 100


def test_samples_weighting_is_proportional_to_the_client_sample_counts():
    server = _server("server.pool_size=400", 'server.pool_weighting="samples"')
    _store(server, 0, metrics={"n_samples": 100.0})
    _store(server, 1, metrics={"n_samples": 300.0})
    _, labels = server.sample_synthetic(round_=0)
    assert _counts(labels) == {0: 100, 1: 300}
    assert labels.tolist() == [0] * 100 + [1] * 300  # client id order


def test_recency_weighting_favours_newer_decoders():
    server = _server("server.pool_size=110", 'server.pool_weighting="recency"')
    _store(server, 0, round_=0)  # age 2 at round 2: weight 1/3
    _store(server, 1, round_=1)  # age 1: 1/2
    _store(server, 2, round_=2)  # age 0: 1
    _, labels = server.sample_synthetic(round_=2)
    assert _counts(labels) == {0: 20, 1: 30, 2: 60}  # 110 * (2, 3, 6) / 11
    # all old (ages 20, 19, 18): quotas 34.86, 36.60, 38.53 -> closer, still ordered
    _, labels = server.sample_synthetic(round_=20)
    assert _counts(labels) == {0: 35, 1: 37, 2: 38}


def _reference(server: ServerState, round_: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images from every decoder, in id order, from the round's generator, each decoder
    decoded alone by its module (the batched decode agrees with it to float rounding)."""
    gen = torch.Generator().manual_seed(derive_seed(server.cfg.seed, Role.SERVER_SAMPLE, round_))
    shares = {cid: n for cid in sorted(server.registry)}
    images, labels, _ = draw_pool(server.registry, shares, generator=gen, device=CPU,
                                  batched=False)
    return images, labels


def test_pool_size_zero_draws_samples_per_client_from_every_decoder():
    server = _server()  # pool_size 0: samples_per_client (7) from each decoder
    for cid in (4, 1, 2):
        _store(server, cid)
    expected_images, expected_labels = _reference(server, 3, 7)
    images, labels = server.sample_synthetic(round_=3)
    assert torch.equal(labels, expected_labels)
    assert labels.tolist() == [1] * 7 + [2] * 7 + [4] * 7
    torch.testing.assert_close(images, expected_images, rtol=0, atol=1e-6)
    # an explicit n_per_client still wins over the setting
    images5, labels5 = server.sample_synthetic(round_=3, n_per_client=5)
    assert labels5.tolist() == [1] * 5 + [2] * 5 + [4] * 5
    torch.testing.assert_close(images5, _reference(server, 3, 5)[0], rtol=0, atol=1e-6)
    # a uniform pool of exactly 7 per decoder draws the same stream, bit for bit
    uniform = _server("server.pool_size=21")
    uniform.registry = server.registry
    assert torch.equal(uniform.sample_synthetic(round_=3)[0], images)
    # and another round draws other images
    assert (server.sample_synthetic(round_=4)[0] - images).abs().max() > 1e-2


def test_pool_is_reproducible_and_skips_decoders_with_no_share():
    server = _server("server.pool_size=10", 'server.pool_weighting="samples"')
    _store(server, 0, metrics={"n_samples": 1.0})
    _store(server, 1, metrics={"n_samples": 10000.0})
    assert server.pool_plan(round_=0) == {0: 0, 1: 10}
    a, la = server.sample_synthetic(round_=5)
    b, lb = server.sample_synthetic(round_=5)
    assert torch.equal(a, b) and la.tolist() == [1] * 10 == lb.tolist()


def test_a_bad_decoder_with_a_share_is_evicted_and_its_share_left_out():
    server = _server("server.pool_size=30")
    for cid in range(3):
        _store(server, cid)
    entry = server.registry[1]  # as if a bad decoder had slipped through the probe
    with torch.no_grad():
        for p in entry.decoder.parameters():
            p.fill_(float("nan"))
    images, labels = server.sample_synthetic(round_=0)
    assert torch.isfinite(images).all() and _counts(labels) == {0: 10, 2: 10}
    assert server.last_evicted == [1] and sorted(server.registry) == [0, 2]
    # the next round splits the pool over the decoders left
    _, labels = server.sample_synthetic(round_=1)
    assert _counts(labels) == {0: 15, 2: 15} and server.last_evicted == []


def test_registry_bytes_counts_the_stored_decoder_tensors():
    server = _server()
    assert server.registry_bytes() == 0
    _store(server, 0)
    one = sum(p.numel() * 4 for p in server.registry[0].decoder.state_dict().values())
    assert server.registry_bytes() == one > 0
    _store(server, 1)
    _store(server, 0)  # a new decoder replaces the old one
    assert server.registry_bytes() == 2 * one
    # the paper preset's MLP decoder: about 2.3 MB, so 1000 of them are about 2.3 GB
    paper = model_spec(load_config(preset="paper").client.model)
    size = sum(v.numel() * 4 for v in build_decoder(paper).state_dict().values())
    assert 2.0e6 < size < 2.6e6
    assert np.isclose(size * 1000 / 1e9, 2.3, atol=0.3)
