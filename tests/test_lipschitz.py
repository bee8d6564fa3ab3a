"""Tests for alignfl_mpi.lipschitz: the gradient penalty and the Lipschitz measurements."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from alignfl_mpi.client import LocalState, penalty_term, train_vae
from alignfl_mpi.config import ClientConfig, LipschitzConfig
from alignfl_mpi.errors import ConfigError
from alignfl_mpi.lipschitz import (
    GRAD_NORM_MODES,
    empirical_lipschitz,
    jacobian_spectral_norms,
    lipschitz_report,
    make_penalty,
    operator_norm,
    spectral_upper_bound,
)
from alignfl_mpi.models import ModelSpec, build_vae

SMALL = {"mlp": (32, 16), "conv": (4, 8)}


class LinearVAE(nn.Module):
    """Just a decoder ``z -> W z`` shaped as (B, 1, 4, 4) images, with ``decode``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            linear.weight.copy_(weight)
        self.decoder = nn.Sequential(linear, nn.Unflatten(1, (1, 4, 4)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


def orthonormal_columns(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q.float()


def brute_force_norm(layer: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Operator norm from the explicit matrix: the layer (no bias) on every basis vector."""
    n_in = math.prod(input_shape)
    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *input_shape)
    with torch.no_grad():
        layer = layer.double()
        bias, layer.bias = layer.bias, None
        columns = layer(basis).reshape(n_in, -1)
        layer.bias = bias
        layer.float()
    return float(torch.linalg.matrix_norm(columns.T, ord=2))


# ------------------------------------------------------------------- measurements


def test_linear_decoder_empirical_equals_spectral_norm_equals_bound() -> None:
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(3, 20))  # y = W z + b, no activation
    exact = float(torch.linalg.matrix_norm(decoder[0].weight.detach().double(), ord=2))
    latents = torch.randn(50, 3)
    assert empirical_lipschitz(decoder, latents, batch_size=7) == pytest.approx(exact, abs=1e-4)
    assert spectral_upper_bound(decoder) == pytest.approx(exact, abs=1e-4)
    report = lipschitz_report(decoder, latents)
    assert set(report) == {"lip_empirical", "lip_upper_bound"}
    assert report["lip_empirical"] == pytest.approx(report["lip_upper_bound"], abs=1e-4)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("sn", [False, True])
def test_zoo_decoders_empirical_below_upper_bound(arch: str, sn: bool) -> None:
    torch.manual_seed(1)
    decoder = build_vae(ModelSpec(arch=arch, latent_dim=2, hidden=SMALL[arch],
                                  spectral_norm=sn)).decoder
    decoder.train()
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    report = lipschitz_report(decoder, torch.randn(300, 2) * 3)
    assert 0 < report["lip_empirical"] <= report["lip_upper_bound"]
    assert decoder.training  # mode restored
    after = decoder.state_dict()  # eval mode: spectral norm's u, v did not move
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_mlp_upper_bound_is_product_of_matrix_norms_times_quarter() -> None:
    torch.manual_seed(2)
    decoder = build_vae(ModelSpec(arch="mlp", latent_dim=2, hidden=SMALL["mlp"])).decoder
    norms = [float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))
             for m in decoder if isinstance(m, nn.Linear)]
    assert len(norms) == 3
    assert spectral_upper_bound(decoder) == pytest.approx(math.prod(norms) / 4, rel=1e-9)


def test_spectral_norm_decoder_uses_effective_weight() -> None:
    torch.manual_seed(3)
    decoder = build_vae(ModelSpec(arch="mlp", latent_dim=2, hidden=SMALL["mlp"],
                                  spectral_norm=True)).decoder.eval()
    linears = [m for m in decoder if isinstance(m, nn.Linear)]
    originals = [m.parametrizations.weight.original.detach().double() for m in linears]
    raw = math.prod(float(torch.linalg.matrix_norm(w, ord=2)) for w in originals)
    effective = math.prod(float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))
                          for m in linears)
    bound = spectral_upper_bound(decoder)
    assert bound == pytest.approx(effective / 4, rel=1e-9)
    assert bound == pytest.approx(0.25, rel=0.05) and bound < raw / 4


@pytest.mark.parametrize(
    ("layer", "input_shape"),
    [
        (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 5, 5)),
        (nn.Conv2d(1, 2, 4, stride=1, padding=0, dilation=2), (1, 9, 8)),
        (nn.ConvTranspose2d(3, 2, 4, stride=2, padding=1), (3, 3, 3)),
        (nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"), (2, 7)),
    ],
)
def test_conv_power_iteration_matches_explicit_matrix(layer: nn.Module,
                                                      input_shape: tuple[int, ...]) -> None:
    torch.manual_seed(4)
    layer.reset_parameters()
    exact = brute_force_norm(layer, input_shape)
    assert operator_norm(layer, input_shape) == pytest.approx(exact, rel=1e-6)


def test_conv_norm_depends_on_input_size_not_just_kernel() -> None:
    torch.manual_seed(5)
    conv = nn.Conv2d(1, 1, 3, padding=1)
    small, large = operator_norm(conv, (1, 2, 2)), operator_norm(conv, (1, 12, 12))
    assert small == pytest.approx(brute_force_norm(conv, (1, 2, 2)), rel=1e-6)
    assert large == pytest.approx(brute_force_norm(conv, (1, 12, 12)), rel=1e-6)
    assert abs(small - large) > 1e-3 * large


def test_upper_bound_of_hand_built_conv_decoder_uses_captured_shapes() -> None:
    torch.manual_seed(6)
    decoder = nn.Sequential(nn.Linear(2, 4 * 3 * 3), nn.ReLU(), nn.Unflatten(1, (4, 3, 3)),
                            nn.ConvTranspose2d(4, 2, 4, 2, 1), nn.LeakyReLU(0.2),
                            nn.Sequential(nn.Conv2d(2, 1, 3, padding=1)), nn.Sigmoid())
    expected = (float(torch.linalg.matrix_norm(decoder[0].weight.detach().double(), ord=2))
                * brute_force_norm(decoder[3], (4, 3, 3))
                * brute_force_norm(decoder[5][0], (2, 6, 6)) / 4)
    assert spectral_upper_bound(decoder) == pytest.approx(expected, rel=1e-6)
    assert empirical_lipschitz(decoder, torch.randn(64, 2)) <= expected


def test_upper_bound_refuses_what_it_cannot_bound() -> None:
    with pytest.raises(ValueError, match="BatchNorm1d"):
        spectral_upper_bound(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="input_shape"):
        spectral_upper_bound(nn.Sequential(nn.Conv2d(1, 1, 3)))
    assert spectral_upper_bound(nn.Sequential(nn.Conv2d(1, 1, 3, bias=False)),
                                input_shape=(1, 5, 5)) > 0
    with pytest.raises(ValueError, match="latents"):
        empirical_lipschitz(nn.Sequential(nn.Linear(2, 3)), torch.zeros(4))


def test_jacobian_spectral_norms_per_point_of_relu_net() -> None:
    decoder = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU())
    with torch.no_grad():
        decoder[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    z = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0]])  # active units differ
    assert jacobian_spectral_norms(decoder, z).tolist() == pytest.approx([3.0, 1.0, 0.0],
                                                                         abs=1e-5)
    assert empirical_lipschitz(decoder, z[1:]) == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------------ penalty


def isometry_weight(mode: str) -> torch.Tensor:
    """A linear map whose measured gradient norm is exactly 1 under ``mode``."""
    q = orthonormal_columns(16, 2)
    if mode == "sum":  # the reference measures ||W^T 1||
        return q / torch.linalg.vector_norm(q.T @ torch.ones(16))
    return q  # orthonormal columns: ||W v|| = ||W||_2 = 1


@pytest.mark.parametrize("mode", GRAD_NORM_MODES)
def test_penalty_zero_for_isometry_and_exact_for_scaled_map(mode: str) -> None:
    weight = isometry_weight(mode)
    mu = torch.randn(32, 2)

    def value(scale: float, **cfg: object) -> float:
        pen = make_penalty(LipschitzConfig(**cfg), generator=torch.Generator().manual_seed(0),
                           grad_norm_mode=mode)
        return pen(LinearVAE(scale * weight), mu)[1]

    assert value(1.0, weight=5.0) == pytest.approx(0.0, abs=1e-8)
    assert value(3.0, weight=5.0) == pytest.approx(5.0 * (3.0 - 1.0) ** 2, rel=1e-4)
    assert value(0.5, weight=2.0) == pytest.approx(2.0 * 0.25, rel=1e-4)
    assert value(3.0, weight=2.0, form="hinge", target=1.0) == pytest.approx(8.0, rel=1e-4)
    assert value(3.0, weight=2.0, form="hinge", target=5.0) == 0.0
    assert value(0.5, weight=2.0, form="hinge", target=1.0) == 0.0


def test_penalty_trains_the_decoder_not_the_encoder() -> None:
    torch.manual_seed(7)
    vae = build_vae(ModelSpec(arch="mlp", latent_dim=2, hidden=SMALL["mlp"]))
    _, mu, _ = vae(torch.rand(16, 1, 28, 28))
    pen = make_penalty(LipschitzConfig(weight=1.0), generator=torch.Generator().manual_seed(0))
    tensor, value = pen(vae, mu)
    assert tensor.ndim == 0 and value == pytest.approx(float(tensor.detach())) and value > 0
    tensor.backward()
    decoder_grads = [p.grad for p in vae.decoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in decoder_grads)
    assert all(p.grad is None for p in vae.encoder.parameters())  # mu was detached


def test_penalty_is_reproducible_from_the_generator() -> None:
    torch.manual_seed(8)
    vae = build_vae(ModelSpec(arch="mlp", latent_dim=2, hidden=SMALL["mlp"]))
    mu = torch.randn(16, 2)

    def value(seed: int) -> float:
        pen = make_penalty(LipschitzConfig(weight=1.0),
                           generator=torch.Generator().manual_seed(seed))
        return pen(vae, mu)[1]

    assert value(1) == value(1) != value(2)


def test_penalty_weight_zero_is_free_and_bad_settings_are_refused() -> None:
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    pen = make_penalty(LipschitzConfig(weight=0.0), generator=g)
    tensor, value = pen(LinearVAE(isometry_weight("sum") * 3), torch.randn(4, 2))
    assert value == 0.0 and float(tensor) == 0.0 and torch.equal(g.get_state(), state)
    with pytest.raises(ConfigError, match="form"):
        make_penalty(LipschitzConfig(weight=1.0, form="one-sided"), generator=g)
    with pytest.raises(ConfigError, match="grad_norm_mode"):
        make_penalty(LipschitzConfig(weight=1.0), generator=g, grad_norm_mode="frobenius")
    with pytest.raises(ConfigError, match=">= 0"):
        make_penalty(LipschitzConfig(weight=-1.0), generator=g)


# ----------------------------------------------------- the penalty does its job


def two_factor_images(n: int, seed: int) -> torch.Tensor:
    """Images a * (bright left half) + b * (bright top half), with a, b ~ U(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    left, top = torch.sigmoid((13.5 - xx) * 1.5), torch.sigmoid((13.5 - yy) * 1.5)
    ab = torch.rand(n, 2, 1, 1, generator=g)
    return (ab[:, :1] * left + ab[:, 1:] * top).clamp(0, 1)


def train_epochs(vae, optimizer, data, *, epochs, batch_size, generator, penalty):
    """The client's VAE training (kl_weight 1) with an optional ``(vae, mu)`` penalty."""
    cfg = ClientConfig(local_epochs=epochs, batch_size=batch_size, kl_weight=1.0)
    state = LocalState(client_id=0, cfg=cfg, vae=vae, optimizer=optimizer,
                       device=torch.device("cpu"))
    term = None if penalty is None else penalty_term(penalty)
    return train_vae(state, data, generator=generator, terms=(term,))


def trained_lipschitz(penalty_cfg: LipschitzConfig | None, *, mode: str = "sum",
                      seed: int = 0) -> float:
    """Train a small MLP VAE on 512 images; the decoder's Lipschitz at the encoder means."""
    torch.manual_seed(seed)
    data = two_factor_images(512, seed)
    vae = build_vae(ModelSpec(arch="mlp", latent_dim=2, hidden=(64, 32, 16)))
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    penalty = (make_penalty(penalty_cfg, generator=generator, grad_norm_mode=mode)
               if penalty_cfg else None)
    metrics = train_epochs(vae, optimizer, data, epochs=20, batch_size=64,
                           generator=generator, penalty=penalty)
    assert (metrics["penalty"] > 0) == (penalty is not None)
    vae.eval()
    with torch.no_grad():
        mu = vae.encode(data)[0]
    return empirical_lipschitz(vae.decoder, mu)


@pytest.fixture(scope="module")
def unpenalised_lipschitz() -> float:
    return trained_lipschitz(None)


@pytest.mark.parametrize(
    ("cfg", "mode"),
    [(LipschitzConfig(weight=1.0), "sum"),  # the reference code's penalty
     (LipschitzConfig(weight=10.0, form="hinge", target=1.0), "spectral")],
)
def test_penalty_lowers_measured_decoder_lipschitz(unpenalised_lipschitz: float,
                                                   cfg: LipschitzConfig, mode: str) -> None:
    # Checked over seeds 0-2 when written: unpenalised 5.8-7.0, penalised 1.6-3.7.
    assert unpenalised_lipschitz > 4.0
    assert trained_lipschitz(cfg, mode=mode) < 0.65 * unpenalised_lipschitz


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("mode", GRAD_NORM_MODES)
def test_penalty_trains_every_zoo_decoder_including_spectral_norm(arch: str, mode: str) -> None:
    torch.manual_seed(9)
    vae = build_vae(ModelSpec(arch=arch, latent_dim=2, hidden=SMALL[arch], spectral_norm=True))
    generator = torch.Generator().manual_seed(0)
    penalty = make_penalty(LipschitzConfig(weight=1.0, form="hinge", target=0.0),
                           generator=generator, grad_norm_mode=mode)
    metrics = train_epochs(vae, torch.optim.Adam(vae.parameters(), lr=1e-3),
                           torch.rand(32, 1, 28, 28), epochs=1, batch_size=16,
                           generator=generator, penalty=penalty)
    # hinge with K = 0 is mean(norm^2): positive unless the decoder is constant
    assert math.isfinite(metrics["loss"]) and metrics["penalty"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", GRAD_NORM_MODES)
def test_penalty_and_measurements_on_cuda(mode: str) -> None:
    torch.manual_seed(10)
    vae = build_vae(ModelSpec(arch="conv", latent_dim=2, hidden=SMALL["conv"],
                              spectral_norm=True)).cuda()
    _, mu, _ = vae(torch.rand(8, 1, 28, 28, device="cuda"))
    pen = make_penalty(LipschitzConfig(weight=1.0), generator=torch.Generator().manual_seed(0),
                       grad_norm_mode=mode)
    tensor, value = pen(vae, mu)
    assert tensor.device.type == "cuda" and math.isfinite(value)
    tensor.backward()
    report = lipschitz_report(vae.decoder, mu.detach())
    cpu = lipschitz_report(vae.decoder.cpu(), mu.detach().cpu())
    assert report == pytest.approx(cpu, rel=1e-4)


# ------------------------------------------------------------- penalty at public points


def test_latent_penalty_is_exact_at_prior_points_and_reads_no_data() -> None:
    from alignfl_mpi.lipschitz import make_latent_penalty
    from alignfl_mpi.prior import GaussianMixturePrior, standard_normal_prior

    weight = isometry_weight("sum")
    for mode in GRAD_NORM_MODES:  # a linear map: the same norm at every point
        pen = make_latent_penalty(LipschitzConfig(weight=2.0), prior=standard_normal_prior(2),
                                  n_points=8, generator=torch.Generator().manual_seed(0),
                                  grad_norm_mode=mode)
        assert pen(LinearVAE(3.0 * isometry_weight(mode)))[1] == pytest.approx(8.0, rel=1e-4)
    # the points are draws of the given prior, from the given generator, n_points per call
    prior = GaussianMixturePrior(weights=[1.0], means=[[5.0, -5.0]], log_vars=[[-20.0, -20.0]])
    seen = []

    def decode(z: torch.Tensor) -> torch.Tensor:
        seen.append(z.detach().clone())
        return LinearVAE(weight).decode(z)

    vae = LinearVAE(weight)
    vae.decode = decode
    g = torch.Generator().manual_seed(3)
    pen = make_latent_penalty(LipschitzConfig(weight=1.0), prior=prior, n_points=5, generator=g)
    pen(vae)
    assert seen[0].shape == (5, 2)
    torch.testing.assert_close(seen[0], torch.tensor([[5.0, -5.0]]).expand(5, 2), atol=1e-3,
                               rtol=0)
    first = g.get_state()
    pen(vae)  # a fresh draw every call
    assert not torch.equal(first, g.get_state())
    # weight 0: nothing drawn, zero penalty
    g0 = torch.Generator().manual_seed(0)
    state = g0.get_state()
    zero = make_latent_penalty(LipschitzConfig(weight=0.0), prior=prior, n_points=5,
                               generator=g0)
    assert zero(vae)[1] == 0.0 and torch.equal(g0.get_state(), state)
    with pytest.raises(ValueError, match="n_points"):
        make_latent_penalty(LipschitzConfig(weight=1.0), prior=prior, n_points=0, generator=g)


def test_latent_penalty_trains_only_the_decoder() -> None:
    from alignfl_mpi.lipschitz import make_latent_penalty
    from alignfl_mpi.prior import standard_normal_prior

    torch.manual_seed(2)
    vae = build_vae(ModelSpec(arch="mlp", latent_dim=2, hidden=SMALL["mlp"]))
    pen = make_latent_penalty(LipschitzConfig(weight=1.0), prior=standard_normal_prior(2),
                              n_points=16, generator=torch.Generator().manual_seed(0))
    tensor, value = pen(vae)
    assert value > 0
    tensor.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.decoder.parameters())
    assert all(p.grad is None for p in vae.encoder.parameters())


def test_penalty_reports_its_value_as_a_tensor_without_a_host_sync() -> None:
    """The logged value stays a (detached) tensor: reading it as a float per step would
    synchronise an accelerator once per minibatch."""
    g = torch.Generator().manual_seed(0)
    vae = type("V", (torch.nn.Module,), {"decode": lambda self, z: 2.0 * z})()
    value, logged = make_penalty(LipschitzConfig(weight=1.0), generator=g)(vae, torch.randn(4, 2))
    assert isinstance(logged, torch.Tensor) and not logged.requires_grad
    assert torch.equal(logged, value.detach())
