"""Conditional-VAE clients, the synthetic-only classifier and the reference classifiers."""

import numpy as np
import pytest
import torch
from strategy_helpers import local_round, make_strategy

from alignfl_mpi.client import new_local_state
from alignfl_mpi.config import ClientConfig, ModelConfig, load_config
from alignfl_mpi.errors import ConfigError, MessageError
from alignfl_mpi.models import ModelSpec, build_vae
from alignfl_mpi.prior import CLASS_WEIGHTS
from alignfl_mpi.server import ServerState

CPU = torch.device("cpu")


def test_conditional_vae_takes_labels():
    vae = build_vae(ModelSpec(arch="mlp", latent_dim=2, hidden=(32, 16, 8), n_classes=11))
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 3, 10, 5])
    recon, mu, _ = vae(x, y)
    assert recon.shape == (4, 1, 28, 28) and mu.shape == (4, 2)
    assert vae.decoder[0].in_features == 2 + 11
    with pytest.raises(ValueError, match="needs the labels"):
        vae(x)
    # the label changes the output: the decoder is really conditioned
    z = torch.zeros(2, 2)
    assert not torch.allclose(vae.decode(z, torch.tensor([0, 0])),
                              vae.decode(z, torch.tensor([1, 1])))
    conv = build_vae(ModelSpec(arch="conv", latent_dim=3, hidden=(4, 8), n_classes=11))
    assert conv(x, y)[0].shape == (4, 1, 28, 28)


def _conditional_update(classes=(2, 3)):
    cfg = ClientConfig(model=ModelConfig(hidden=(32, 16, 8), conditional=True),
                       local_epochs=1, prior_components=2)
    st = new_local_state(1, cfg, seed=0, device=CPU)
    labels = torch.tensor([classes[i % len(classes)] for i in range(40)])
    return local_round(st, torch.rand(40, 1, 28, 28), round_=0, seed=0, labels=labels)


def test_server_samples_only_the_clients_classes():
    upd = _conditional_update()
    np.testing.assert_allclose(upd.prior[CLASS_WEIGHTS][[2, 3]], [0.5, 0.5])
    cfg = load_config(overrides=["server.samples_per_client=200", "server.epochs=1",
                                 "server.classifier_epochs=1",
                                 "server.model.hidden=[32, 16, 8]"])
    server = ServerState(cfg, device=CPU)
    server.accept(1, spec=upd.spec, state=upd.state, prior=upd.prior, round_=0, metrics={})
    images, ids = server.sample_synthetic(round_=0)
    assert images.shape == (200, 1, 28, 28) and set(ids.tolist()) == {1}
    assert set(server.last_classes.tolist()) == {2, 3}
    strategy = make_strategy(cfg=server.cfg)
    m = strategy.train_classifier(server, images, server.last_classes, round_=0)
    assert m["classifier_samples"] == 200 and strategy.classifier is not None
    other = ServerState(cfg, device=CPU)
    other.load_state_dict(server.state_dict())
    restored = make_strategy(cfg=server.cfg)
    restored.load_state_dict(strategy.state_dict(), other)
    assert other.registry[1].class_weights is not None and restored.classifier is not None
    x = images[:8]
    assert torch.equal(restored.classifier(x), strategy.classifier(x))


def test_class_weights_are_validated():
    upd = _conditional_update()
    cfg = load_config(overrides=["server.model.hidden=[32, 16, 8]"])
    server = ServerState(cfg, device=CPU)
    prior = {k: v for k, v in upd.prior.items() if k != CLASS_WEIGHTS}
    with pytest.raises(MessageError, match="needs class weights"):
        server.accept(1, spec=upd.spec, state=upd.state, prior=prior, round_=0, metrics={})
    bad = dict(upd.prior, **{CLASS_WEIGHTS: np.full(11, 0.5)})
    with pytest.raises(MessageError, match="probability vector"):
        server.accept(1, spec=upd.spec, state=upd.state, prior=bad, round_=0, metrics={})


def test_conditional_refuses_dp():
    with pytest.raises(ConfigError, match="conditional cannot be combined with DP"):
        load_config(overrides=["client.model.conditional=true", "client.privacy.mode=full"])


def test_reference_classifiers(tmp_path):
    from test_mpi_runtime import tiny_partition

    from alignfl_mpi.reference import centralized, fedavg_classifier
    from alignfl_mpi.results import load

    part = tiny_partition(tmp_path / "p.h5", n_clients=3, n_per_client=60)
    accs = centralized(part, out=tmp_path / "c", epochs=3)
    assert accs[-1] > 0.9  # the tiny classes are trivially separable
    res = load(tmp_path / "c" / "results.h5")
    assert res.config["strategy"] == "centralized" and len(res.eval["task_accuracy"]) == 3
    fed = fedavg_classifier(part, out=tmp_path / "f", rounds=2, local_epochs=1)
    assert len(fed) == 2 and all(0 <= a <= 1 for a in fed)
    assert load(tmp_path / "f" / "results.h5").finished
