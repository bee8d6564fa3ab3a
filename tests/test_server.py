import numpy as np
import pytest
import torch
from strategy_helpers import local_round, make_strategy

from alignfl_mpi.client import new_local_state
from alignfl_mpi.config import ClientConfig, ModelConfig, load_config
from alignfl_mpi.errors import MessageError
from alignfl_mpi.messages import ClientUpdate, decode_message, encode_message
from alignfl_mpi.server import ServerState, validate_update

CPU = torch.device("cpu")


def _update(arch="mlp", latent=2, seed=0, epochs=1):
    cfg = ClientConfig(model=ModelConfig(arch=arch, latent_dim=latent,
                                         hidden=(64, 32, 16) if arch == "mlp" else (8, 16)),
                       local_epochs=epochs, prior_components=3)
    st = new_local_state(0, cfg, seed=seed, device=CPU)
    data = torch.rand(64, 1, 28, 28)
    return st, local_round(st, data, round_=0, seed=seed)


def _server(**over):
    cfg = load_config(overrides=["server.samples_per_client=20", "server.epochs=1",
                                 "server.model.hidden=[64, 32, 16]",
                                 *[f"{k}={v}" for k, v in over.items()]])
    return ServerState(cfg, device=CPU)


def test_update_contains_decoder_and_prior_only():
    st, upd = _update()
    dec_keys = set(st.vae.decoder.state_dict())
    assert set(upd.state) == dec_keys
    enc_params = {id(p) for n, p in st.vae.named_parameters() if not n.startswith("decoder.")}
    assert enc_params, "the VAE has encoder parameters"
    # no array equals any encoder tensor
    enc_arrays = [p.detach().numpy() for n, p in st.vae.named_parameters()
                  if not n.startswith("decoder.")]
    for arr in upd.state.values():
        assert not any(a.shape == arr.shape and np.array_equal(a, arr) for a in enc_arrays)
    msg = ClientUpdate(round=0, client_id=0, spec=upd.spec, state=upd.state,
                        prior=upd.prior, metrics=upd.metrics).to_message()
    wire = encode_message(msg)
    payload = sum(a.nbytes for a in upd.state.values()) + sum(a.nbytes for a in upd.prior.values())
    # the wire carries the decoder and prior plus a small header: no room for 64 images
    assert len(wire) - payload < 4096 < 64 * 784
    names = decode_message(wire, max_bytes=2**30).tensors
    assert all(k.startswith(("state/", "prior/")) for k in names)


def test_accept_sample_train_and_mixed_architectures():
    server = _server()
    _, a = _update("mlp", 2, seed=1)
    _, b = _update("conv", 4, seed=2)
    server.accept(0, spec=a.spec, state=a.state, prior=a.prior, round_=0, metrics=a.metrics)
    server.accept(1, spec=b.spec, state=b.state, prior=b.prior, round_=0, metrics=b.metrics)
    images, labels = server.sample_synthetic(round_=0)
    assert images.shape == (40, 1, 28, 28) and labels.tolist() == [0] * 20 + [1] * 20
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    again, _ = server.sample_synthetic(round_=0)
    assert torch.equal(images, again)  # seeded per round
    before = [p.detach().clone() for p in server.vae.parameters()]
    m = make_strategy(cfg=server.cfg).train_global(server, images, round_=0)
    assert np.isfinite(m["loss"]) and m["n_synthetic"] == 40
    assert any(not torch.equal(p, q) for p, q in zip(before, server.vae.parameters()))


def test_state_dict_roundtrip_restores_registry():
    server = _server()
    _, a = _update("conv", 3)
    server.accept(2, spec=a.spec, state=a.state, prior=a.prior, round_=4, metrics={"x": 1.0})
    server.rounds_done = 5
    other = _server()
    other.load_state_dict(server.state_dict())
    assert other.rounds_done == 5 and other.registry[2].round == 4
    x1, _ = server.sample_synthetic(round_=3)
    x2, _ = other.sample_synthetic(round_=3)
    assert torch.equal(x1, x2)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda s, st, p: s.update(arch="resnet"), "invalid decoder spec"),
    (lambda s, st, p: st.pop(next(iter(st))), "do not match"),
    (lambda s, st, p: st.update({"evil": np.zeros(3, np.float32)}), "do not match"),
    (lambda s, st, p: st.update({k: np.zeros((1, 1), np.float32) for k in list(st)[:1]}),
     "has shape"),
    (lambda s, st, p: st[next(iter(st))].__setitem__((0,) * st[next(iter(st))].ndim, np.nan),
     "non-finite"),
    (lambda s, st, p: p.update(means=p["means"][:, :1]), "prior shapes inconsistent"),
    (lambda s, st, p: s.update(image_shape=[1, 32, 32]), "image shape"),
])
def test_validate_rejects(mutate, fragment):
    _, upd = _update()
    spec, state = dict(upd.spec), {k: v.copy() for k, v in upd.state.items()}
    prior = {k: v.copy() for k, v in upd.prior.items()}
    mutate(spec, state, prior)
    with pytest.raises(MessageError, match=fragment):
        validate_update(spec=spec, state=state, prior=prior, image_shape=(1, 28, 28))


def test_rejected_update_keeps_stored_decoder():
    server = _server()
    _, good = _update()
    server.accept(0, spec=good.spec, state=good.state, prior=good.prior, round_=0, metrics={})
    bad_state = {k: v.copy() for k, v in good.state.items()}
    bad_state[next(iter(bad_state))][...] = np.inf
    with pytest.raises(MessageError):
        server.accept(0, spec=good.spec, state=bad_state, prior=good.prior, round_=1, metrics={})
    assert server.registry[0].round == 0


