"""Tests for alignfl_mpi.models: shapes, decoder rebuild, loss, spec validation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn.utils import parametrize

from alignfl_mpi.errors import ConfigError
from alignfl_mpi.models import (
    MODEL_REGISTRY,
    ModelSpec,
    build_decoder,
    build_vae,
    decoder_from_state,
    decoder_state_shapes,
    vae_loss,
)

SMALL = {"mlp": (32, 16), "conv": (4, 8)}


def small_spec(arch: str, **kwargs: object) -> ModelSpec:
    return ModelSpec(arch=arch, hidden=SMALL[arch], **kwargs)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("latent_dim", [1, 2, 16])
def test_forward_shapes_and_range(arch: str, latent_dim: int) -> None:
    torch.manual_seed(0)
    vae = build_vae(small_spec(arch, latent_dim=latent_dim))
    x = torch.rand(5, 1, 28, 28)
    recon, mu, logvar = vae(x)
    assert recon.shape == (5, 1, 28, 28)
    assert mu.shape == logvar.shape == (5, latent_dim)
    images = vae.decoder(torch.randn(7, latent_dim) * 10)
    assert images.shape == (7, 1, 28, 28)
    assert images.min() >= 0 and images.max() <= 1


def test_default_hidden_per_arch_and_paper_layout() -> None:
    assert ModelSpec(arch="mlp").hidden == (512, 256, 128)
    assert ModelSpec(arch="conv").hidden == (32, 64)
    vae = build_vae(ModelSpec(arch="mlp"))
    linears = [m for m in vae.encoder if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 512), (512, 256), (256, 128)]
    dec = [m for m in vae.decoder if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in dec] == [
        (2, 128), (128, 256), (256, 512), (512, 784)]
    conv = build_vae(ModelSpec(arch="conv"))
    assert conv.fc_mu.in_features == 64 * 7 * 7
    assert isinstance(conv.decoder[-1], torch.nn.Sigmoid)
    assert set(MODEL_REGISTRY) >= {"mlp", "conv"}


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("sn", [False, True])
def test_build_decoder_loads_shared_state(arch: str, sn: bool) -> None:
    spec = small_spec(arch, latent_dim=3, spectral_norm=sn)
    torch.manual_seed(1)
    vae = build_vae(spec).eval()
    torch.manual_seed(2)
    decoder = build_decoder(spec).eval()
    z = torch.randn(4, 3)
    assert not torch.allclose(decoder(z), vae.decoder(z))
    decoder.load_state_dict(vae.decoder.state_dict(), strict=True)
    assert torch.equal(decoder(z), vae.decoder(z))
    shapes = decoder_state_shapes(spec)
    assert shapes == {k: tuple(v.shape) for k, v in vae.decoder.state_dict().items()}
    if sn:
        assert any("parametrizations" in k for k in shapes)


def test_eval_mode_is_deterministic() -> None:
    vae = build_vae(small_spec("mlp")).eval()
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(vae(x)[0], vae(x)[0])
    vae.train()
    torch.manual_seed(0)
    a = vae(x)[0]
    assert not torch.equal(a, vae(x)[0])


def test_vae_loss_matches_hand_computation() -> None:
    x = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    recon = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    mu = torch.tensor([[1.0], [0.0]])
    logvar = torch.tensor([[0.0], [math.log(2.0)]])
    # recon: sample 0 -> 1.0, sample 1 -> 0.25 + 0.25 = 0.5; mean 0.75
    # kl: sample 0 -> 0.5 * 1 = 0.5; sample 1 -> -0.5 * (1 + ln2 - 0 - 2) = 0.5 - ln2 / 2
    kl_expected = (0.5 + (0.5 - math.log(2.0) / 2)) / 2
    loss, rec, kl = vae_loss(recon, x, mu, logvar, kl_weight=2.0)
    assert rec.item() == pytest.approx(0.75)
    assert kl.item() == pytest.approx(kl_expected)
    assert loss.item() == pytest.approx(0.75 + 2.0 * kl_expected)


def test_spec_round_trip_through_json() -> None:
    spec = ModelSpec(arch="conv", latent_dim=8, hidden=(4, 8), spectral_norm=True)
    d = spec.to_dict()
    assert d["hidden"] == [4, 8] and d["image_shape"] == [1, 28, 28]
    assert ModelSpec.from_dict(json.loads(json.dumps(d))) == spec
    assert ModelSpec.from_dict({"arch": "mlp"}) == ModelSpec(arch="mlp")


@pytest.mark.parametrize(
    ("d", "key"),
    [
        ({"arch": "mlp", "latent": 2}, "model.latent"),
        ({"arch": "resnet"}, "model.arch"),
        ({}, "model.arch"),
        ({"arch": "mlp", "latent_dim": 0}, "model.latent_dim"),
        ({"arch": "mlp", "latent_dim": "2"}, "model.latent_dim"),
        ({"arch": "mlp", "latent_dim": True}, "model.latent_dim"),
        ({"arch": "mlp", "hidden": [64, 0]}, "model.hidden"),
        ({"arch": "mlp", "hidden": [64.0]}, "model.hidden"),
        ({"arch": "mlp", "image_shape": [28, 28]}, "model.image_shape"),
        ({"arch": "mlp", "spectral_norm": "yes"}, "model.spectral_norm"),
        ({"arch": "conv", "hidden": [4, 8, 16]}, "model.image_shape"),
    ],
)
def test_from_dict_rejects_bad_specs(d: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        ModelSpec.from_dict(d)
    assert "\n" not in str(info.value)


def _matrix(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    if transposed:  # ConvTranspose2d is normalised along dim 1
        weight = weight.transpose(0, 1)
    return weight.reshape(weight.shape[0], -1)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_spectral_norm_bounds_singular_values(arch: str) -> None:
    torch.manual_seed(0)
    spec = small_spec(arch, spectral_norm=True)
    decoder = build_decoder(spec).train()
    layers = [m for m in decoder.modules() if parametrize.is_parametrized(m, "weight")]
    assert len(layers) == len(spec.hidden) + 1
    for layer in layers:  # make unnormalised weights large
        with torch.no_grad():
            layer.parametrizations.weight.original.mul_(10.0)
    for _ in range(20):
        decoder(torch.randn(8, spec.latent_dim))
    for layer in layers:
        transposed = isinstance(layer, torch.nn.ConvTranspose2d)
        raw = _matrix(layer.parametrizations.weight.original, transposed)
        sigma = torch.linalg.matrix_norm(_matrix(layer.weight, transposed), ord=2)
        assert torch.linalg.matrix_norm(raw, ord=2) > 2.0
        assert 0.9 < sigma.item() <= 1.02  # power iteration: ~1, not exact


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_adam_steps_lower_the_loss(arch: str) -> None:
    torch.manual_seed(0)
    vae = build_vae(small_spec(arch))
    pattern = (torch.rand(1, 1, 28, 28) > 0.5).float()
    x = pattern * torch.linspace(0.5, 1.0, 8).view(8, 1, 1, 1)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)

    def eval_loss() -> float:
        vae.eval()
        with torch.no_grad():
            return vae_loss(*vae(x)[:1], x, *vae(x)[1:])[0].item()

    before = eval_loss()
    vae.train()
    for _ in range(30):
        opt.zero_grad()
        recon, mu, logvar = vae(x)
        vae_loss(recon, x, mu, logvar)[0].backward()
        opt.step()
    assert eval_loss() < 0.9 * before


def _reference_loss(recon, x, mu, logvar, lambda_kl):
    """The reference code's mse_loss_function_with_gp without the penalty (gen_utils.py)."""
    mse = torch.nn.functional.mse_loss(recon, x.view(recon.size()), reduction="none")
    mse = mse.sum(dim=1).mean()
    kld = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
    return mse + lambda_kl * kld


@pytest.mark.parametrize("latent_dim", [2, 8])
def test_vae_loss_mean_reduction_is_the_reference_loss(latent_dim) -> None:
    gen = torch.Generator().manual_seed(latent_dim)
    x = torch.rand(16, 784, generator=gen)
    recon = torch.rand(16, 784, generator=gen)
    mu = torch.randn(16, latent_dim, generator=gen)
    logvar = torch.randn(16, latent_dim, generator=gen)
    expected = _reference_loss(recon, x, mu, logvar, 0.1)
    loss, _, kl = vae_loss(recon, x, mu, logvar, kl_weight=0.1, kl_reduction="mean")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # ...which is the summed KL at weight 0.1 / latent_dim: the presets' kl_weight
    loss_sum, _, kl_sum = vae_loss(recon, x, mu, logvar, kl_weight=0.1 / latent_dim)
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-6)
    assert kl_sum.item() == pytest.approx(latent_dim * kl.item(), rel=1e-6)


def test_vae_loss_refuses_an_unknown_reduction() -> None:
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="kl_reduction"):
        vae_loss(z, z, z, z, kl_reduction="batchmean")


@pytest.mark.parametrize("spec", [
    ModelSpec(arch="mlp", hidden=(16, 8)),
    ModelSpec(arch="mlp", hidden=(16, 8), spectral_norm=True),
    ModelSpec(arch="conv", hidden=(4, 8)),
    ModelSpec(arch="conv", hidden=(4, 8), spectral_norm=True),
], ids=["mlp", "mlp-sn", "conv", "conv-sn"])
def test_decoder_from_state_equals_a_built_and_loaded_decoder(spec):
    torch.manual_seed(0)
    source = build_decoder(spec).eval()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    rebuilt = decoder_from_state(spec, state).eval()
    assert rebuilt.state_dict().keys() == source.state_dict().keys()
    for key, value in rebuilt.state_dict().items():
        assert torch.equal(value, state[key]), key
    z = torch.randn(5, spec.decoder_input_dim)
    with torch.no_grad():
        assert torch.equal(rebuilt(z), source(z))


def test_decoder_from_state_refuses_a_state_of_another_spec():
    state = build_decoder(ModelSpec(arch="mlp", hidden=(16, 8))).state_dict()
    with pytest.raises(RuntimeError):
        decoder_from_state(ModelSpec(arch="mlp", hidden=(16, 4)), state)


def test_decoder_from_state_casts_to_the_built_dtype_and_keeps_parameters():
    spec = ModelSpec(arch="mlp", hidden=(16, 8))
    source = build_decoder(spec)
    state = {k: v.double() for k, v in source.state_dict().items()}  # a float64 sender
    rebuilt = decoder_from_state(spec, state)
    for key, value in rebuilt.state_dict().items():
        assert value.dtype == torch.float32, key
        assert value.device.type == "cpu", key
        assert torch.equal(value, state[key].float()), key
    assert {n for n, _ in rebuilt.named_parameters()} == {n for n, _ in source.named_parameters()}
    assert all(isinstance(p, torch.nn.Parameter) for p in rebuilt.parameters())


def test_decoder_state_shapes_returns_a_fresh_dict_per_call():
    spec = ModelSpec(arch="mlp", hidden=(16, 8))
    first = decoder_state_shapes(spec)
    first.clear()  # a caller that edits its dict does not change the next one's
    assert decoder_state_shapes(spec) == {k: tuple(v.shape)
                                          for k, v in build_decoder(spec).state_dict().items()}
