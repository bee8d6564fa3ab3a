"""The decoder bank and the batched pool draw: same images as one decoder at a time (no MPI)."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from alignfl_mpi.config import load_config
from alignfl_mpi.decoder_bank import BLOCK_SLOTS, SLACK_SLOTS, DecoderBank, mlp_layers
from alignfl_mpi.models import ModelSpec, build_decoder
from alignfl_mpi.prior import CLASS_WEIGHTS
from alignfl_mpi.server import ServerState, _inverse_cdf, draw_pool, pool_shares

CPU = torch.device("cpu")
MLP_A = ModelSpec(arch="mlp", latent_dim=2, hidden=(32, 16))
MLP_B = ModelSpec(arch="mlp", latent_dim=3, hidden=(24,))
CONDITIONAL = ModelSpec(arch="mlp", latent_dim=2, hidden=(16, 8), n_classes=11)
CONDITIONAL_5 = ModelSpec(arch="mlp", latent_dim=3, hidden=(16,), n_classes=5)
CONV = ModelSpec(arch="conv", latent_dim=2, hidden=(4, 8))
SPECTRAL = ModelSpec(arch="mlp", latent_dim=2, hidden=(16,), spectral_norm=True)


def _server(*over: str, block_slots: int | None = None) -> ServerState:
    cfg = load_config(overrides=["server.model.hidden=[32, 16]", "server.epochs=1", *over])
    server = ServerState(cfg, device=CPU)
    if block_slots is not None:
        server.registry.bank = DecoderBank(block_slots=block_slots)
    return server


def _update(spec: ModelSpec, seed: int, *, components: int = 3) -> dict:
    """A freshly initialised decoder and a random prior, as a client would send them."""
    torch.manual_seed(seed)
    state = {k: v.detach().numpy().copy() for k, v in build_decoder(spec).state_dict().items()}
    rng = np.random.default_rng(seed)
    prior = {"weights": rng.dirichlet(np.ones(components)).astype(np.float32),
             "means": rng.normal(0, 1.5, (components, spec.latent_dim)).astype(np.float32),
             "log_vars": rng.normal(-1, 0.3, (components, spec.latent_dim)).astype(np.float32)}
    if spec.n_classes:
        prior[CLASS_WEIGHTS] = rng.dirichlet(np.ones(spec.n_classes))
    return {"spec": spec.to_dict(), "state": state, "prior": prior}


def _accept(server: ServerState, cid: int, spec: ModelSpec, seed: int | None = None,
            **kw) -> None:
    server.accept(cid, **_update(spec, cid if seed is None else seed, **kw), round_=0,
                  metrics={"n_samples": 100.0})


def _draw(server: ServerState, shares: dict[int, int], *, batched: bool = True, seed: int = 7):
    return draw_pool(server.registry, shares, generator=torch.Generator().manual_seed(seed),
                     device=CPU, batched=batched)


def _mixed_server(**kw) -> ServerState:
    server = _server(**kw)
    for cid in range(6):
        _accept(server, cid, MLP_A, components=1 + cid % 4)
    for cid in (6, 7, 8):
        _accept(server, cid, MLP_B)
    for cid in (9, 10):
        _accept(server, cid, CONDITIONAL)
    _accept(server, 11, CONV)
    _accept(server, 12, SPECTRAL)
    _accept(server, 13, CONDITIONAL_5)
    return server


# --- the batched draw is the per-decoder draw ---------------------------------------------------
@pytest.mark.parametrize("block_slots", [BLOCK_SLOTS, 2])
def test_batched_pool_equals_the_per_decoder_pool_on_mixed_architectures(block_slots):
    server = _mixed_server(block_slots=block_slots)
    reg = server.registry
    banked = [*range(11), 13]
    assert all(reg.slot(c) is not None for c in banked)  # MLP, conditional MLP: banked
    assert reg.slot(11) is None and reg.slot(12) is None  # conv, spectral norm: one by one
    # runs of equal shares, a lone row (decoded as two), shares above BMM_MAX_ROWS
    shares = {0: 3, 1: 3, 2: 3, 3: 1, 4: 12, 5: 3, 6: 5, 7: 5, 8: 9, 9: 4, 10: 2, 11: 6, 12: 2,
              13: 7}
    images, labels, classes = _draw(server, shares)
    ref_images, ref_labels, ref_classes = _draw(server, shares, batched=False)
    assert images.shape == (sum(shares.values()), 1, 28, 28)
    assert torch.equal(labels, ref_labels) and torch.equal(classes, ref_classes)
    assert labels.tolist() == [c for c, n in shares.items() for _ in range(n)]
    conditional = (labels == 9) | (labels == 10) | (labels == 13)
    assert (classes[conditional] >= 0).all() and (classes[~conditional] == -1).all()
    assert (classes[labels == 13] < 5).all()
    torch.testing.assert_close(images, ref_images, rtol=0, atol=1e-6)
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    # every decoder's rows are its own images: distinct decoders, distinct pictures
    assert (images[labels == 0].mean(0) - images[labels == 1].mean(0)).abs().max() > 1e-3


def test_a_decoders_images_do_not_depend_on_its_slot_or_the_other_decoders():
    a = _server(block_slots=4)
    for cid in range(10):
        _accept(a, cid, MLP_A)
    b = _server(block_slots=4)  # the same decoders, stored in another order, with removals
    for cid in [9, 100, 3, 101, 7, 0, 102, 5, 1, 2, 103, 8, 6, 4]:
        _accept(b, cid, MLP_A)
    for cid in (101, 100, 103, 102):
        del b.registry[cid]
    slots_a = [(a.registry.slot(c).block, a.registry.slot(c).index) for c in range(10)]
    slots_b = [(b.registry.slot(c).block, b.registry.slot(c).index) for c in range(10)]
    assert [i for _, i in slots_a] != [i for _, i in slots_b]
    shares = {c: 1 + c % 4 for c in range(10)}  # 1: a lone row, decoded as two
    assert torch.equal(_draw(a, shares)[0], _draw(b, shares)[0])  # bit for bit


def test_the_pool_after_a_checkpoint_round_trip_is_the_same_bit_for_bit():
    server = _server("server.pool_size=37", 'server.pool_weighting="recency"', block_slots=4)
    for cid in range(9):
        _accept(server, cid, MLP_A if cid != 4 else CONV)
    _accept(server, 2, MLP_A, seed=50)  # replaced: the stored order and the slots change
    del server.registry[6]
    _accept(server, 6, MLP_A, seed=60)
    other = _server("server.pool_size=37", 'server.pool_weighting="recency"')
    other.load_state_dict(server.state_dict())
    for r in (0, 3):
        x, y = server.sample_synthetic(round_=r)
        x2, y2 = other.sample_synthetic(round_=r)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(server.last_classes, other.last_classes)


# --- the bank: one copy of every decoder --------------------------------------------------------
def _bytes(spec: ModelSpec) -> int:
    return sum(v.numel() * 4 for v in build_decoder(spec).state_dict().values())


def test_the_bank_holds_every_decoder_once_and_modules_see_their_slot():
    server = _server(block_slots=4)
    one = _bytes(MLP_A)
    for n in range(1, 11):
        _accept(server, n, MLP_A)
        # blocks of 4, the last one grown to 1, 2, 4 slots: fewer than 4 unused
        assert n * one <= server.registry_bytes() < (n + 4) * one
    assert server.registry_bytes() == 10 * one  # blocks of 4, 4 and 2: no slack here
    for cid in range(1, 11):
        slot = server.registry.slot(cid)
        for lin, w in zip(mlp_layers(server.registry[cid].decoder), slot.block.weights):
            assert lin.weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
            assert torch.equal(lin.weight, w[slot.index])
    _accept(server, 11, CONV)  # not banked: counted as its own tensors
    assert server.registry_bytes() == 10 * one + _bytes(CONV)
    for cid in range(1, 12):
        del server.registry[cid]
    assert server.registry_bytes() == 0 and len(server.registry.bank) == 0


def test_unused_slots_stay_few_as_decoders_come_and_go():
    server, one = _server(), _bytes(MLP_A)
    ids = list(range(40))
    for n, cid in enumerate(ids, 1):
        _accept(server, cid, MLP_A, seed=0)
        assert n * one <= server.registry_bytes() <= (n + SLACK_SLOTS) * one
    random.Random(3).shuffle(ids)
    for n, cid in enumerate(ids, 1):
        del server.registry[cid]
        assert (40 - n) * one <= server.registry_bytes() <= (40 - n + SLACK_SLOTS) * one
    assert server.registry_bytes() == 0


def test_a_decoder_leaving_the_bank_keeps_its_weights_and_the_others_stay_put():
    server = _server(block_slots=4)
    for cid in range(7):
        _accept(server, cid, MLP_A)
    z = torch.randn(5, 2)
    with torch.no_grad():
        before = {cid: server.registry[cid].decoder(z) for cid in range(7)}
    old = server.registry[2]
    _accept(server, 2, MLP_A, seed=99)  # replaced: the old module gets its own copy back
    del server.registry[0]  # the stack's last decoder moves into slot 0
    for cid in (20, 21, 22):
        _accept(server, cid, MLP_A, seed=cid)  # reuse the freed slots
    with torch.no_grad():
        assert torch.equal(old.decoder(z), before[2])
        bank_ptrs = {w.untyped_storage().data_ptr() for stack in
                     server.registry.bank._stacks.values() for b in stack for w in b.weights}
        assert all(p.untyped_storage().data_ptr() not in bank_ptrs
                   for p in old.decoder.parameters())
        for cid in (1, 3, 4, 5, 6):
            assert torch.equal(server.registry[cid].decoder(z), before[cid])
        assert not torch.equal(server.registry[2].decoder(z), before[2])


def test_an_in_place_edit_of_a_stored_decoder_reaches_the_batched_draw():
    server = _server("server.pool_size=40")
    for cid in range(4):
        _accept(server, cid, MLP_A)
    with torch.no_grad():
        server.registry[2].decoder[-3].bias.fill_(float("inf"))  # last Linear: saturated
        server.registry[1].decoder[0].weight.fill_(float("nan"))
    images, labels = server.sample_synthetic(round_=0)
    assert server.last_evicted == [1] and sorted(server.registry) == [0, 2, 3]
    assert labels.tolist() == [0] * 10 + [2] * 10 + [3] * 10
    assert torch.equal(images[labels == 2], torch.ones(10, 1, 28, 28))  # inf -> sigmoid 1


def test_only_plain_mlp_decoders_are_banked():
    assert mlp_layers(build_decoder(MLP_A)) is not None
    assert mlp_layers(build_decoder(CONDITIONAL)) is not None
    assert mlp_layers(build_decoder(CONV)) is None
    assert mlp_layers(build_decoder(SPECTRAL)) is None
    other = torch.nn.Sequential(*build_decoder(MLP_A)[:-2], torch.nn.Tanh(),
                                torch.nn.Unflatten(1, (1, 28, 28)))
    assert mlp_layers(other) is None
    bank = DecoderBank()
    decoder = build_decoder(MLP_A)
    assert bank.add(decoder) is not None and bank.add(decoder) is None  # not twice
    with pytest.raises(ValueError, match="not in the bank"):
        DecoderBank().remove(bank.add(build_decoder(MLP_A)))


# --- the random draws ---------------------------------------------------------------------------
def test_components_are_drawn_with_their_weights():
    cdf = torch.tensor([[0.2, 0.2, 1.0], [0.5, 1.0, 1.0]], dtype=torch.float64)
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    owner = torch.arange(40000) % 2
    k = _inverse_cdf(cdf, owner, u)
    first, second = k[owner == 0].bincount(minlength=3), k[owner == 1].bincount(minlength=3)
    assert first[1] == 0 and second[2] == 0  # weight 0: never drawn
    assert abs(first[0] / 20000 - 0.2) < 0.015 and abs(second[0] / 20000 - 0.5) < 0.015
    # a CDF that ends below 1 by rounding still gives a valid index
    assert _inverse_cdf(torch.tensor([[0.5, 0.9999999]], dtype=torch.float64),
                        torch.tensor([0]), torch.tensor([0.99999995],
                                                        dtype=torch.float64)).tolist() == [1]


def test_the_pool_is_a_function_of_seed_round_and_registry():
    server = _mixed_server()
    shares = {c: 3 for c in range(14)}
    a = _draw(server, shares, seed=1)[0]
    assert torch.equal(a, _draw(server, shares, seed=1)[0])
    assert not torch.equal(a, _draw(server, shares, seed=2)[0])


def _shares_with_fractions(weights: dict[int, Fraction], total: int) -> dict[int, int]:
    """Largest remainder in Fractions (what pool_shares computes in integers)."""
    ids = sorted(weights)
    sum_w = sum(weights.values(), Fraction(0))
    quota = {c: total * weights[c] / sum_w for c in ids}
    shares = {c: int(q) for c, q in quota.items()}
    for c in sorted(ids, key=lambda c: (-(quota[c] - shares[c]), c))[:total - sum(shares.values())]:
        shares[c] += 1
    return shares


def test_integer_shares_equal_the_fraction_arithmetic():
    rnd = random.Random(11)
    for _ in range(300):
        weights = {rnd.randrange(5000): Fraction(rnd.randint(0, 40), rnd.randint(1, 12))
                   for _ in range(rnd.randint(1, 60))}
        if any(weights.values()):
            total = rnd.randint(0, 5000)
            assert pool_shares(weights, total) == _shares_with_fractions(weights, total)
