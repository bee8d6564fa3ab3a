import json

import pytest

from alignfl_mpi.config import (
    RunConfig,
    load_config,
    parse_override,
    to_json,
)
from alignfl_mpi.errors import ConfigError


def test_builtin_default_is_the_paper_setup_with_the_classic_loss_and_prior():
    cfg = load_config()
    assert cfg.n_clients == 5 and cfg.data.scheme == "class-pairs"
    assert cfg.data.outliers == 600 and cfg.data.outlier_client == 0
    c = cfg.client_config(3)
    assert c.model.arch == "mlp" and c.model.latent_dim == 2 and c.local_epochs == 10
    assert c.batch_size == 128 and c.lr == 1e-3
    # the named settings in which the paper preset differs (tests/test_presets.py)
    assert (c.kl_weight, c.prior_fit_on, cfg.server.epochs) == (1.0, "mu", 10)
    assert load_config(preset="paper").client.prior_fit_on == "z"


def test_a_preset_under_a_file_under_overrides(tmp_path):
    (tmp_path / "a.toml").write_text('rounds = 2\n[client]\nprior_fit_on = "mu"\n')
    cfg = load_config(tmp_path / "a.toml", preset="paper-dim8", overrides=["rounds=4"])
    assert cfg.rounds == 4 and cfg.client.prior_fit_on == "mu"
    assert cfg.client.model.latent_dim == 8 and cfg.server.epochs == 5


def test_toml_and_yaml_files(tmp_path):
    (tmp_path / "a.toml").write_text(
        'rounds = 2\nn_clients = 2\n[client]\nlocal_epochs = 1\n'
        '[[clients]]\nmodel = {arch = "conv", latent_dim = 4}\n[[clients]]\ndevice = "cpu"\n')
    cfg = load_config(tmp_path / "a.toml")
    assert cfg.rounds == 2
    assert cfg.client_config(0).model.arch == "conv" and cfg.client_config(0).local_epochs == 1
    assert cfg.client_config(1).model.arch == "mlp" and cfg.client_config(1).device == "cpu"
    (tmp_path / "b.yaml").write_text("rounds: 4\nserver:\n  epochs: 2\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg.rounds == 4 and cfg.server.epochs == 2


@pytest.mark.parametrize("text, fragment", [
    ("roundz = 3", "unknown config key 'roundz' (did you mean 'rounds'?)"),
    ("[server]\nepoch = 3", "unknown config key 'server.epoch'"),
    ("rounds = 'three'", "config key 'rounds' must be int"),
    ("rounds = true", "config key 'rounds' must be int"),
    ("rounds = 0", "'rounds' must be > 0"),
    ("[client]\ndevice = 'gpu'", "unknown device 'gpu'"),
    ("[client.model]\nhidden = 'wide'", "must be a list"),
    ("n_clients = 2\n[[clients]]\ndevice = 'cpu'", "1 [[clients]] tables but n_clients = 2"),
    ("[[clients]]\nlocal_epoch = 1\n" * 5, "unknown config key 'clients[0].local_epoch'"),
    ("rounds = ", "invalid syntax"),
])
def test_strict_errors(tmp_path, text, fragment):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)").replace("?", r"\?")):
        load_config(path)


def test_missing_and_unknown_format(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ConfigError, match="unknown config format '.json'"):
        load_config(tmp_path / "c.json")


def test_overrides_win_over_file(tmp_path):
    (tmp_path / "a.toml").write_text("rounds = 2\n[server]\nepochs = 3\n")
    cfg = load_config(tmp_path / "a.toml", overrides=["rounds=7", "server.epochs=1",
                                                       "client.device=cpu",
                                                       "clients.1.model.arch=conv",
                                                       "n_clients=2", "clients.0.lr=0.01"])
    assert cfg.rounds == 7 and cfg.server.epochs == 1 and cfg.client.device == "cpu"
    assert cfg.client_config(1).model.arch == "conv" and cfg.client_config(0).lr == 0.01
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("rounds")


def test_resolved_config_roundtrips_through_json():
    cfg = load_config(overrides=["rounds=3", "client.model.hidden=[64, 32, 16]"])
    back = load_config(overrides=[])  # defaults
    data = json.loads(to_json(cfg))
    assert data["rounds"] == 3 and data["client"]["model"]["hidden"] == [64, 32, 16]
    from alignfl_mpi.config import from_dict
    assert from_dict(RunConfig, data) == cfg != back


def test_per_client_architecture_gets_its_own_default_widths(tmp_path):
    (tmp_path / "a.toml").write_text(
        'n_clients = 2\n[client.model]\nhidden = [64, 32, 16]\n'
        '[[clients]]\n[[clients]]\nmodel = {arch = "conv", latent_dim = 3}\n')
    cfg = load_config(tmp_path / "a.toml")
    assert cfg.client_config(0).model.hidden == (64, 32, 16)
    assert cfg.client_config(1).model.hidden == () and cfg.client_config(1).model.arch == "conv"


def test_unbuildable_model_fails_at_load():
    with pytest.raises(ConfigError, match="client.model: image_shape .* divisible by 8"):
        load_config(overrides=['client.model.arch="conv"', "client.model.hidden=[8, 8, 8]"])
