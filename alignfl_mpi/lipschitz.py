"""Decoder Lipschitz regularisation (client) and Lipschitz measurements (server).

Two things live here:

* :func:`make_penalty` builds the gradient penalty a client adds to its VAE loss
  (``ClientConfig.lipschitz``). It is evaluated at latent points interpolated between
  the posterior means of the batch, WGAN-GP style, and trains the decoder through a
  double backward (``create_graph=True``).
* :func:`make_latent_penalty` is the same penalty at latent points drawn from a public
  distribution (N(0, I) or an already released DP prior). It does not read data, so a
  DP-SGD client adds its gradient after the noise (``privacy.PrivateTrainer``).
* :func:`empirical_lipschitz`, :func:`spectral_upper_bound` and :func:`lipschitz_report`
  measure a decoder's Lipschitz constant from below and from above; the server records
  them every round.

What the penalty measures depends on ``grad_norm_mode`` (:data:`GRAD_NORM_MODES`). For a
decoder ``D: R^d -> R^P`` (``P = C*H*W`` pixels) with Jacobian ``J(z)`` (``P x d``):

* ``"sum"`` (default; the reference code): the norm of
  ``autograd.grad(D(z), z, grad_outputs=ones)``, i.e. ``||J(z)^T 1||``, the gradient of
  the *total output intensity* ``sum_p D_p(z)``. It is the local Lipschitz constant of
  that scalar, not of ``D``: ``||J^T 1|| <= sqrt(P) * ||J||_2``, and it is 0 whenever
  moving in latent space only moves ink around (pixel changes that cancel in the sum).
  The two-sided target ``||J^T 1|| = 1`` therefore constrains one output direction,
  and pulls the total-intensity gradient *up* to 1 where it is smaller. (One backward
  pass of the batch sum gives every row its own ``J(z_i)^T 1`` because rows are
  decoded independently; a layer that mixes rows, such as BatchNorm in training mode,
  would break that.)
* ``"random"``: ``||J(z) v||`` for a random unit ``v`` in latent space (one
  Jacobian-vector product): a lower bound of ``||J(z)||_2`` with
  ``E||J v||^2 = ||J||_F^2 / d``.
* ``"spectral"``: the exact local Lipschitz constant ``||J(z)||_2`` (largest singular
  value), from ``d`` Jacobian-vector products; cheap for the small latent dims used here.

>>> from alignfl_mpi.config import LipschitzConfig
>>> g = torch.Generator().manual_seed(0)
>>> pen = make_penalty(LipschitzConfig(weight=1.0), generator=g)
>>> vae = type("V", (nn.Module,), {"decode": lambda self, z: 2.0 * z})()
>>> tensor, value = pen(vae, torch.randn(4, 2))
>>> round(float(value), 6)  # ||J^T 1|| = ||(2, 2)|| = 2.83 -> (2.83 - 1)^2
3.343146
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp

from alignfl_mpi.config import LipschitzConfig
from alignfl_mpi.errors import ConfigError

# torch.func.jvp scripts a helper internally and warns about it on every first call.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated",
                        category=FutureWarning)

__all__ = [
    "GRAD_NORM_MODES",
    "PENALTY_FORMS",
    "Penalty",
    "empirical_lipschitz",
    "jacobian_spectral_norms",
    "lipschitz_report",
    "make_latent_penalty",
    "make_penalty",
    "operator_norm",
    "spectral_upper_bound",
]

Penalty = Callable[[nn.Module, Tensor], tuple[Tensor, Tensor | float]]
LatentPenalty = Callable[[nn.Module], tuple[Tensor, Tensor | float]]

PENALTY_FORMS = ("two-sided", "hinge")
GRAD_NORM_MODES = ("sum", "random", "spectral")

_OPERATOR_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
# Lipschitz constants of parameter-free layers; LeakyReLU is handled separately.
_FIXED_FACTORS: dict[type[nn.Module], float] = {
    nn.ReLU: 1.0,
    nn.Tanh: 1.0,
    nn.Sigmoid: 0.25,
    nn.Identity: 1.0,
    nn.Flatten: 1.0,
    nn.Unflatten: 1.0,
    nn.Dropout: 1.0,  # identity in eval mode, where the bound is taken
}
_EPS = 1e-12


# ------------------------------------------------------------------------- penalty


def make_penalty(
    cfg: LipschitzConfig,
    *,
    generator: torch.Generator,
    grad_norm_mode: str | None = None,
) -> Penalty:
    """Build the decoder gradient penalty of a client's plain training (``client.train_vae``).

    The returned ``penalty(vae, mu)`` detaches the batch's posterior means ``mu``
    ``(B, d)``, draws ``a ~ U(0, 1)`` per row and a permutation ``pi`` of the batch
    (both from ``generator`` on the CPU, then moved to ``mu.device``), evaluates a
    gradient norm ``n_i`` of ``vae.decode`` at ``z_i = a_i mu_i + (1 - a_i) mu_pi(i)``
    and returns ``weight * mean(phi(n_i))`` with

    * ``two-sided``: ``phi(n) = (n - 1)^2`` (the reference code, WGAN-GP),
    * ``hinge``: ``phi(n) = max(0, n - target)^2`` (only penalises norms above K).

    The norm is built with ``create_graph=True``, so the penalty's gradient reaches the
    decoder's parameters. See the module docstring for what each ``grad_norm_mode``
    measures.

    Args:
        cfg: Weight (lambda_lip), form and hinge target.
        generator: CPU generator of the interpolation weights, the permutation and
            (``"random"`` mode) the probe directions; seeded for reproducibility.
        grad_norm_mode: ``"sum"`` (default: the reference code's ``||J^T 1||``),
            ``"random"`` or ``"spectral"``. ``None`` takes ``cfg.grad_norm_mode`` when
            the config has that field, else ``"sum"``.

    Returns:
        ``penalty(vae, mu) -> (penalty_tensor, penalty_tensor.detach())`` (no host sync). With
        ``cfg.weight == 0`` it returns a constant zero and draws nothing.

    Raises:
        ConfigError: If the form or the mode is unknown, or the weight or target is
            negative.
    """
    at = _penalty_at(cfg, generator=generator, grad_norm_mode=grad_norm_mode)

    def penalty(vae: nn.Module, mu: Tensor) -> tuple[Tensor, Tensor | float]:
        if cfg.weight == 0.0:
            zero = mu.new_zeros(())
            return zero, 0.0
        return at(vae, _interpolate(mu.detach(), generator))

    return penalty


def make_latent_penalty(
    cfg: LipschitzConfig,
    *,
    prior: Any,
    n_points: int,
    generator: torch.Generator,
    grad_norm_mode: str | None = None,
) -> LatentPenalty:
    """The gradient penalty of :func:`make_penalty` at ``n_points`` draws from ``prior``.

    Every call draws fresh points ``z ~ prior`` (``prior.sample(n, generator=...)``, e.g. a
    ``GaussianMixturePrior``: N(0, I) or a released DP prior) instead of interpolating
    posterior means. Nothing here reads training data, which is what lets a DP-SGD client
    add this term's gradient after the noise without changing its privacy accounting.

    Args:
        cfg: Weight, form, target and grad norm mode, as for :func:`make_penalty`.
        prior: Public latent distribution with ``sample(n, *, generator)``.
        n_points: Points per call (a fixed number, not the realised batch size).
        generator: CPU generator of the points (and of ``"random"`` probe directions).
        grad_norm_mode: As for :func:`make_penalty`.

    Returns:
        ``penalty(vae) -> (penalty_tensor, penalty_tensor.detach())`` (no host sync).

    >>> from alignfl_mpi.prior import standard_normal_prior
    >>> pen = make_latent_penalty(LipschitzConfig(weight=1.0), prior=standard_normal_prior(2),
    ...                           n_points=4, generator=torch.Generator().manual_seed(0))
    >>> vae = type("V", (nn.Module,), {"decode": lambda self, z: 2.0 * z})()
    >>> round(float(pen(vae)[1]), 6)  # ||J^T 1|| = 2.83 at every point
    3.343146
    """
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    at = _penalty_at(cfg, generator=generator, grad_norm_mode=grad_norm_mode)

    def penalty(vae: nn.Module) -> tuple[Tensor, Tensor | float]:
        param = next(iter(vae.parameters()), None)
        if cfg.weight == 0.0:
            return torch.zeros((), device=None if param is None else param.device), 0.0
        z = prior.sample(n_points, generator=generator)
        if param is not None:
            z = z.to(device=param.device, dtype=param.dtype)
        return at(vae, z.requires_grad_(True))

    return penalty


def _penalty_at(
    cfg: LipschitzConfig, *, generator: torch.Generator, grad_norm_mode: str | None
) -> Callable[[nn.Module, Tensor], tuple[Tensor, Tensor | float]]:
    """Validate ``cfg``; return ``(vae, z) -> weight * mean(phi(n(z)))`` at given points."""
    mode = grad_norm_mode or getattr(cfg, "grad_norm_mode", "sum")
    if cfg.form not in PENALTY_FORMS:
        raise ConfigError(f"lipschitz.form {cfg.form!r} is unknown; use one of {PENALTY_FORMS}")
    if mode not in GRAD_NORM_MODES:
        raise ConfigError(f"lipschitz grad_norm_mode {mode!r} is unknown; "
                          f"use one of {GRAD_NORM_MODES}")
    if cfg.weight < 0 or cfg.target < 0:
        raise ConfigError(f"lipschitz.weight and lipschitz.target must be >= 0, "
                          f"got {cfg.weight} and {cfg.target}")
    weight, target, form = float(cfg.weight), float(cfg.target), cfg.form

    def at(vae: nn.Module, z: Tensor) -> tuple[Tensor, Tensor | float]:
        norms = _grad_norms(vae.decode, z, mode=mode,  # type: ignore[arg-type]
                            generator=generator)  # nn.Module: decode is a method
        if form == "two-sided":
            per_point = (norms - 1.0).square()
        else:
            per_point = torch.relu(norms - target).square()
        value = weight * per_point.mean()
        return value, value.detach()  # a tensor: reading it as a float syncs the device

    return at


def _interpolate(mu: Tensor, generator: torch.Generator) -> Tensor:
    """``a * mu + (1 - a) * mu[perm]`` with ``a ~ U(0, 1)`` per row, as a grad leaf."""
    a = torch.rand(mu.shape[0], 1, generator=generator).to(device=mu.device, dtype=mu.dtype)
    perm = torch.randperm(mu.shape[0], generator=generator).to(mu.device)
    return (a * mu + (1.0 - a) * mu[perm]).requires_grad_(True)


def _grad_norms(
    decode: Callable[[Tensor], Tensor], z: Tensor, *, mode: str, generator: torch.Generator
) -> Tensor:
    """Per-point gradient norms ``(B,)`` of ``decode`` at ``z``, differentiable."""
    if mode == "sum":
        out = decode(z)
        (grad,) = torch.autograd.grad(out, z, grad_outputs=torch.ones_like(out),
                                      create_graph=True)
        return (grad.flatten(1).square().sum(1) + _EPS).sqrt()
    if mode == "random":
        v = torch.randn(z.shape, generator=generator).to(device=z.device, dtype=z.dtype)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(_EPS)
        tangent = jvp(decode, (z,), (v,))[1]
        return (tangent.flatten(1).square().sum(1) + _EPS).sqrt()
    return jacobian_spectral_norms(decode, z)


def jacobian_spectral_norms(decode: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """Exact ``||J(z_i)||_2`` per row of ``z``, from ``d`` Jacobian-vector products.

    Rows must be decoded independently (no batch statistics). The result is
    differentiable with respect to the parameters ``decode`` uses.

    Args:
        decode: Maps ``(B, d)`` to ``(B, ...)``.
        z: Latent points ``(B, d)``.

    Returns:
        ``(B,)`` largest singular values of the per-row Jacobians, in ``z``'s dtype.

    >>> w = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> jacobian_spectral_norms(lambda z: z @ w.T, torch.zeros(2, 2)).tolist()
    [3.0, 3.0]
    """
    columns = []
    for j in range(z.shape[1]):
        e = torch.zeros_like(z)
        e[:, j] = 1.0
        tangent = jvp(decode, (z,), (e,))[1]
        columns.append(tangent.flatten(1))
    jac = torch.stack(columns, dim=2)  # (B, P, d)
    gram = jac.transpose(1, 2) @ jac  # (B, d, d); eigvalsh's gradient is always stable
    top = torch.linalg.eigvalsh(gram.double())[:, -1].to(z.dtype)
    return top.clamp_min(_EPS).sqrt()


# -------------------------------------------------------------------- measurements


def empirical_lipschitz(decoder: nn.Module, latents: Tensor, *, batch_size: int = 256) -> float:
    """The largest Jacobian spectral norm of ``decoder`` over the given latent points.

    ``max_i ||J(z_i)||_2`` with ``J(z) = dD(z)/dz`` (``P x d``), computed exactly from
    ``d`` Jacobian-vector products per batch, in eval mode and without gradients.
    This is a **lower bound** of the decoder's true Lipschitz constant
    ``sup_z ||J(z)||_2``: it only sees the points it is given (typically the
    encoder means of real data, or prior samples).

    Args:
        decoder: Maps ``(B, d)`` to images; any device.
        latents: ``(N, d)`` points (any device; moved to the decoder's).
        batch_size: Points per Jacobian batch.

    Returns:
        The maximum over the points (0.0 for no points).

    Raises:
        ValueError: If ``latents`` is not 2-D or ``batch_size < 1``.
    """
    if latents.ndim != 2:
        raise ValueError(f"latents must be (N, d), got shape {tuple(latents.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    param = next(iter(decoder.parameters()), None)
    device = param.device if param is not None else latents.device
    dtype = param.dtype if param is not None else torch.float32
    best = 0.0
    with _eval_mode(decoder), torch.no_grad():
        for start in range(0, latents.shape[0], batch_size):
            z = latents[start:start + batch_size].to(device=device, dtype=dtype)
            best = max(best, float(jacobian_spectral_norms(decoder, z).max()))
    return best


def operator_norm(
    layer: nn.Module,
    input_shape: Sequence[int],
    *,
    max_iter: int = 300,
    tol: float = 1e-10,
    seed: int = 0,
) -> float:
    """Spectral norm of a Linear or (transposed) convolution as a linear operator.

    The bias is ignored (it does not change a Lipschitz constant). A ``Linear`` is
    exact (``torch.linalg.matrix_norm(ord=2)``, float64). A convolution's operator norm
    depends on the input's spatial size and is *not* the matrix norm of its reshaped
    kernel, so it is computed for the layer's actual input shape, in float64, from the
    operator ``A`` and its adjoint ``A^T`` (a vector-Jacobian product): the largest
    eigenvalue of ``A^T A`` by Lanczos iteration (a Krylov subspace with full
    re-orthogonalisation and Rayleigh-Ritz). Plain power iteration stalls here: the
    top singular values of a convolution on a grid are nearly degenerate. The Ritz
    value approaches the norm from below; iteration stops when the residual of the
    top Ritz pair is under ``tol`` relative, or the Krylov space is invariant (exact).

    Spectrally normalised layers (``torch.nn.utils.parametrizations.spectral_norm``)
    use their effective ``weight``; call this in eval mode so that reading the weight
    does not advance the parametrisation's own power iteration.

    Args:
        layer: ``nn.Linear``, ``nn.ConvNd`` or ``nn.ConvTransposeNd``.
        input_shape: The layer's input shape without the batch dimension.
        max_iter: Largest Krylov dimension (operator applications).
        tol: Relative residual at which the top Ritz value is accepted.
        seed: Seed of the random start vector.

    Returns:
        The operator norm.

    Raises:
        TypeError: If ``layer`` is not one of the supported types.

    >>> lin = nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = lin.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, -4.0]]))
    >>> operator_norm(lin, (2,))
    4.0
    """
    if not isinstance(layer, _OPERATOR_LAYERS):
        raise TypeError(f"operator_norm supports Linear and (transposed) convolutions, "
                        f"not {type(layer).__name__}")
    with torch.no_grad():
        weight = layer.weight.detach().double()
    if isinstance(layer, nn.Linear):
        return float(torch.linalg.matrix_norm(weight, ord=2))
    shape = (1, *input_shape)

    def gram(v: Tensor) -> Tensor:  # v -> A^T A v on flat vectors
        out = vjp(lambda x: _conv_without_bias(layer, x, weight), v.reshape(shape))
        y, adjoint = out[0], out[1]  # (output, vjp function); torch's stub says 3-tuple
        return adjoint(y)[0].flatten()

    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(math.prod(shape), generator=gen, dtype=torch.float64)
    return math.sqrt(max(_top_eigenvalue(gram, start.to(weight.device), max_iter=max_iter,
                                         tol=tol), 0.0))


def _top_eigenvalue(
    apply: Callable[[Tensor], Tensor], start: Tensor, *, max_iter: int, tol: float
) -> float:
    """Largest eigenvalue of a symmetric PSD operator by Lanczos with re-orthogonalisation."""
    dim = min(max_iter, start.numel())
    basis = torch.zeros(dim, start.numel(), dtype=start.dtype, device=start.device)
    images = torch.zeros_like(basis)
    basis[0] = start / start.norm()
    theta = 0.0
    for k in range(dim):
        images[k] = apply(basis[k])
        v, w = basis[:k + 1], images[:k + 1]
        ritz = v @ w.T
        values, vectors = torch.linalg.eigh((ritz + ritz.T) / 2)
        theta, s = float(values[-1]), vectors[:, -1]
        residual = float((s @ w - theta * (s @ v)).norm())
        if theta <= 0.0 or residual <= tol * theta or k + 1 == dim:
            return theta
        r = images[k] - v.T @ (v @ images[k])
        r = r - v.T @ (v @ r)  # twice is enough (Kahan-Parlett)
        r_norm = float(r.norm())
        if r_norm <= 1e-13 * float(images[k].norm()):
            return theta  # invariant subspace: theta is exact
        basis[k + 1] = r / r_norm
    return theta


def _conv_without_bias(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """Apply a (transposed) convolution's linear part with the given weight."""
    if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        if layer.padding_mode != "zeros":
            raise ValueError("transposed convolutions support only zero padding")
        fn = {1: nn.functional.conv_transpose1d, 2: nn.functional.conv_transpose2d,
              3: nn.functional.conv_transpose3d}[x.ndim - 2]
        return fn(x, weight, None, layer.stride, layer.padding,  # type: ignore[arg-type]
                  layer.output_padding, layer.groups, layer.dilation)
    return layer._conv_forward(x, weight, None)  # type: ignore[operator]  # a ConvNd


def spectral_upper_bound(
    decoder: nn.Module, *, input_shape: Sequence[int] | None = None
) -> float:
    """An upper bound of the decoder's Lipschitz constant: the product of layer norms.

    For a chain ``D = f_L o ... o f_1`` the Lipschitz constant is at most the product of
    the layers' constants: the operator norm for Linear/Conv/ConvTranspose layers
    (:func:`operator_norm`, with each convolution's input shape captured by forward
    hooks on a dummy pass), 1/4 for Sigmoid (its largest slope), ``max(1, |slope|)``
    for LeakyReLU and 1 for ReLU, Tanh, Identity, Flatten, Unflatten and Dropout (eval).
    Works for both model-zoo architectures and for spectrally normalised decoders.

    The decoder must be an ``nn.Sequential`` (possibly nested) of these layers: skip
    connections or arithmetic between layers would invalidate the bound, so any other
    container or layer type is refused. Convolution norms come from a Lanczos
    iteration that converges from below; at its tolerance the product is an upper
    bound up to about 1e-9 relative.

    Args:
        decoder: The decoder (any device); it is put in eval mode during the call.
        input_shape: The decoder's input shape without batch dimension; by default
            ``(in_features,)`` of a leading Linear.

    Returns:
        The bound.

    Raises:
        ValueError: On a layer or container the bound cannot handle, or when the input
            shape cannot be inferred.
    """
    chain = list(_chain(decoder))
    if input_shape is None:
        first = next((m for m in chain if isinstance(m, _OPERATOR_LAYERS)), None)
        if not isinstance(first, nn.Linear):
            raise ValueError("cannot infer the decoder's input shape (its first layer is "
                             "not Linear); pass input_shape")
        input_shape = (first.in_features,)
    with _eval_mode(decoder), torch.no_grad():
        shapes = _layer_input_shapes(decoder, chain, tuple(input_shape))
        bound = 1.0
        for layer in chain:
            bound *= _layer_factor(layer, shapes.get(layer))
    return bound


def lipschitz_report(decoder: nn.Module, latents: Tensor) -> dict[str, float]:
    """Both Lipschitz measurements of a decoder, for the round's metrics.

    Args:
        decoder: The decoder.
        latents: ``(N, d)`` points for :func:`empirical_lipschitz`.

    Returns:
        ``{"lip_empirical": lower bound at the points, "lip_upper_bound": layer product}``.
    """
    return {
        "lip_empirical": empirical_lipschitz(decoder, latents),
        "lip_upper_bound": spectral_upper_bound(decoder, input_shape=(latents.shape[1],)),
    }


def _chain(module: nn.Module) -> Iterator[nn.Module]:
    """The layers of a (nested) ``nn.Sequential`` in order; refuse anything else."""
    if isinstance(module, _OPERATOR_LAYERS) or _activation_factor(module) is not None:
        yield module
    elif isinstance(module, nn.Sequential):
        for child in module:
            yield from _chain(child)
    else:
        raise ValueError(f"spectral_upper_bound cannot bound {type(module).__name__}: it "
                         "needs an nn.Sequential of Linear/Conv/ConvTranspose layers and "
                         f"{', '.join(t.__name__ for t in _FIXED_FACTORS)} or LeakyReLU")


def _activation_factor(module: nn.Module) -> float | None:
    """The Lipschitz constant of a parameter-free layer, or None if unknown."""
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(module.negative_slope))
    return _FIXED_FACTORS.get(type(module))


def _layer_factor(layer: nn.Module, shape: tuple[int, ...] | None) -> float:
    if not isinstance(layer, _OPERATOR_LAYERS):
        factor = _activation_factor(layer)
        if factor is None:
            raise ValueError(f"no Lipschitz constant known for layer {layer!r}")
        return float(factor)
    if shape is None:
        raise ValueError(f"layer {layer!r} did not run in the dummy forward pass")
    return operator_norm(layer, shape)


def _layer_input_shapes(
    decoder: nn.Module, chain: list[nn.Module], input_shape: tuple[int, ...]
) -> dict[nn.Module, tuple[int, ...]]:
    """Each operator layer's input shape (no batch dim), from one dummy forward pass."""
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        shapes[module] = tuple(args[0].shape[1:])

    handles = [m.register_forward_pre_hook(hook) for m in chain
               if isinstance(m, _OPERATOR_LAYERS)]
    try:
        param = next(iter(decoder.parameters()), None)
        decoder(torch.zeros((1, *input_shape), device=None if param is None else param.device,
                            dtype=None if param is None else param.dtype))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block; every submodule's previous mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode
