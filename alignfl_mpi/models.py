"""Model zoo: VAE architectures, their spec, decoder rebuild and the VAE loss.

Every architecture is a :class:`VAE` subclass registered under a name in
:data:`MODEL_REGISTRY`. Its ``decoder`` attribute is a self-contained module
mapping ``z`` of shape ``(B, latent_dim)`` to images ``(B, C, H, W)`` in
``[0, 1]``, so ``vae.decoder.state_dict()`` is exactly what a client shares and
:func:`build_decoder` is what the server uses to rebuild it from a
:class:`ModelSpec`.

Adding an architecture is one registry entry::

    @register_model("my_arch")
    class MyVAE(VAE):
        default_hidden = (64,)

        @staticmethod
        def build_decoder(spec: ModelSpec) -> nn.Module: ...

        def __init__(self, spec: ModelSpec) -> None: ...
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from alignfl_mpi.errors import ConfigError

if TYPE_CHECKING:
    from alignfl_mpi.config import ModelConfig

__all__ = [
    "CONDITIONAL_CLASSES",
    "KL_REDUCTIONS",
    "MODEL_REGISTRY",
    "ConvVAE",
    "MLPVAE",
    "ModelSpec",
    "VAE",
    "build_decoder",
    "build_vae",
    "decoder_from_state",
    "decoder_state_shapes",
    "latent_means",
    "model_spec",
    "register_model",
    "vae_loss",
]

MODEL_REGISTRY: dict[str, type[VAE]] = {}


def register_model(name: str) -> Callable[[type[VAE]], type[VAE]]:
    """Class decorator that adds a :class:`VAE` subclass to :data:`MODEL_REGISTRY`.

    Args:
        name: The registry key, used as ``ModelSpec.arch``.

    Returns:
        The decorator; it returns the class unchanged.

    Raises:
        ValueError: If ``name`` is already registered.
    """

    def decorator(cls: type[VAE]) -> type[VAE]:
        if name in MODEL_REGISTRY:
            raise ValueError(f"model architecture {name!r} is already registered")
        MODEL_REGISTRY[name] = cls
        return cls

    return decorator


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(value: object, key: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
        raise ConfigError(
            f"model.{key} must be a list of integers (got {value!r}); fix it in the config"
        )
    if any(v < 1 for v in value):
        raise ConfigError(
            f"model.{key} must contain only positive integers (got {list(value)}); "
            "fix it in the config"
        )
    return tuple(value)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Which VAE to build; shared with the server so it can rebuild a decoder.

    Attributes:
        arch: Registry key in :data:`MODEL_REGISTRY` (``"mlp"`` or ``"conv"``).
        latent_dim: Size of the latent space.
        hidden: Layer widths (``"mlp"``: encoder widths, mirrored by the
            decoder) or channels (``"conv"``). Empty means the architecture's
            default; after construction it always holds the resolved widths.
        image_shape: ``(C, H, W)`` of the images.
        spectral_norm: Wrap the decoder's Linear/Conv layers in spectral
            normalisation.
        n_classes: 0 for a plain VAE; ``K > 0`` makes it a conditional VAE: the
            one-hot label is appended to the encoder's features and to the
            decoder's input, so the decoder maps ``(z, onehot(y))`` to an image.

    Example:
        >>> ModelSpec(arch="mlp").hidden
        (512, 256, 128)
        >>> ModelSpec.from_dict(ModelSpec(arch="conv").to_dict()).hidden
        (32, 64)
    """

    arch: str
    latent_dim: int = 2
    hidden: tuple[int, ...] = ()
    image_shape: tuple[int, int, int] = (1, 28, 28)
    spectral_norm: bool = False
    n_classes: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or self.arch not in MODEL_REGISTRY:
            raise ConfigError(
                f"model.arch: unknown architecture {self.arch!r}; "
                f"choose one of {sorted(MODEL_REGISTRY)}"
            )
        if not _is_int(self.latent_dim) or self.latent_dim < 1:
            raise ConfigError(
                f"model.latent_dim must be an integer >= 1 (got {self.latent_dim!r}); "
                "set e.g. latent_dim = 2"
            )
        hidden = _int_tuple(self.hidden, "hidden") or MODEL_REGISTRY[self.arch].default_hidden
        object.__setattr__(self, "hidden", hidden)
        shape = _int_tuple(self.image_shape, "image_shape")
        if len(shape) != 3:
            raise ConfigError(
                f"model.image_shape must have 3 entries (C, H, W) (got {list(shape)}); "
                "set e.g. image_shape = [1, 28, 28]"
            )
        object.__setattr__(self, "image_shape", shape)
        if not isinstance(self.spectral_norm, bool):
            raise ConfigError(
                f"model.spectral_norm must be true or false (got {self.spectral_norm!r})"
            )
        if not _is_int(self.n_classes) or self.n_classes < 0:
            raise ConfigError(f"model.n_classes must be an integer >= 0 (got {self.n_classes!r})")
        MODEL_REGISTRY[self.arch].check_spec(self)

    @property
    def decoder_input_dim(self) -> int:
        """Width of the decoder's input: ``latent_dim`` plus ``n_classes`` if conditional."""
        return self.latent_dim + self.n_classes

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (lists, not tuples) that :meth:`from_dict` accepts."""
        return {
            "arch": self.arch,
            "latent_dim": self.latent_dim,
            "hidden": list(self.hidden),
            "image_shape": list(self.image_shape),
            "spectral_norm": self.spectral_norm,
            "n_classes": self.n_classes,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """Build a spec from a mapping, refusing unknown keys and wrong types.

        Args:
            d: Keys as in :meth:`to_dict`; only ``arch`` is required.

        Returns:
            The validated spec.

        Raises:
            ConfigError: On an unknown or missing key, a wrong type, an unknown
                architecture or an invalid value; the message names the key.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"model must be a table of keys (got {type(d).__name__})")
        allowed = [f.name for f in fields(cls)]
        for key in d:
            if key not in allowed:
                raise ConfigError(
                    f"model.{key}: unknown key; allowed keys are {allowed}"
                )
        if "arch" not in d:
            raise ConfigError(
                f"model.arch is missing; set it to one of {sorted(MODEL_REGISTRY)}"
            )
        return cls(**dict(d))


class VAE(nn.Module):
    """Base class: an encoder, two linear heads and a self-contained decoder.

    Subclasses set :attr:`default_hidden`, implement :meth:`build_decoder` and
    call ``super().__init__`` with their encoder and its feature size.

    Attributes:
        encoder: Maps images to flat features ``(B, feature_dim)``.
        fc_mu: Linear head for the posterior mean.
        fc_logvar: Linear head for the posterior log-variance.
        decoder: Maps ``z`` ``(B, latent_dim)`` to images in ``[0, 1]``.
    """

    default_hidden: ClassVar[tuple[int, ...]] = ()

    def __init__(self, *, spec: ModelSpec, encoder: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.encoder = encoder
        self.fc_mu = nn.Linear(feature_dim + spec.n_classes, spec.latent_dim)
        self.fc_logvar = nn.Linear(feature_dim + spec.n_classes, spec.latent_dim)
        self.decoder = self.build_decoder(spec)

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        """Raise :class:`ConfigError` if ``spec`` cannot be built by this class."""

    @staticmethod
    def build_decoder(spec: ModelSpec) -> nn.Module:
        """Return a freshly initialised decoder for ``spec``."""
        raise NotImplementedError

    def _condition(self, h: Tensor, y: Tensor | None) -> Tensor:
        if not self.spec.n_classes:
            return h
        if y is None:
            raise ValueError("a conditional VAE needs the labels y")
        return torch.cat([h, one_hot(y, self.spec.n_classes, dtype=h.dtype)], dim=1)

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return the posterior ``(mu, logvar)``, each ``(B, latent_dim)``."""
        features = self._condition(self.encoder(x), y)
        return self.fc_mu(features), self.fc_logvar(features)

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        """Sample ``z = mu + exp(logvar / 2) * eps`` in training mode; ``mu`` in eval mode."""
        if not self.training:
            return mu
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """Map latents ``(B, latent_dim)`` (and labels, if conditional) to images in ``[0, 1]``."""
        return self.decoder(self._condition(z, y))

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(recon, mu, logvar)`` for images ``x`` of shape ``(B, C, H, W)``."""
        mu, logvar = self.encode(x, y)
        return self.decode(self.reparameterize(mu, logvar), y), mu, logvar


def one_hot(y: Tensor, n_classes: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot rows of the labels ``y`` (B,) as ``(B, n_classes)``.

    >>> one_hot(torch.tensor([2, 0]), 3).tolist()
    [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    """
    return torch.nn.functional.one_hot(y.long(), n_classes).to(dtype)


def _maybe_sn(layer: nn.Module, spec: ModelSpec) -> nn.Module:
    return _spectral_norm(layer) if spec.spectral_norm else layer


@register_model("mlp")
class MLPVAE(VAE):
    """Fully connected VAE (the paper's default): 784-512-256-128 and mirrored."""

    default_hidden = (512, 256, 128)

    @staticmethod
    def build_decoder(spec: ModelSpec) -> nn.Module:
        """Return ``latent-128-256-512-784`` with ReLU, Sigmoid and a reshape."""
        widths = [spec.decoder_input_dim, *reversed(spec.hidden)]
        layers: list[nn.Module] = []
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            layers += [_maybe_sn(nn.Linear(n_in, n_out), spec), nn.ReLU()]
        layers += [
            _maybe_sn(nn.Linear(widths[-1], math.prod(spec.image_shape)), spec),
            nn.Sigmoid(),
            nn.Unflatten(1, spec.image_shape),
        ]
        return nn.Sequential(*layers)

    def __init__(self, spec: ModelSpec) -> None:
        widths = [math.prod(spec.image_shape), *spec.hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        super().__init__(spec=spec, encoder=nn.Sequential(*layers), feature_dim=widths[-1])


@register_model("conv")
class ConvVAE(VAE):
    """Convolutional VAE: stride-2 4x4 convolutions, mirrored by transposed ones."""

    default_hidden = (32, 64)

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        """Require H and W divisible by ``2 ** len(hidden)``."""
        factor = 2 ** len(spec.hidden)
        _, height, width = spec.image_shape
        if height % factor or width % factor:
            raise ConfigError(
                f"model.image_shape {list(spec.image_shape)}: height and width must be "
                f"divisible by {factor} for {len(spec.hidden)} conv layers; "
                "use fewer model.hidden channels"
            )

    @staticmethod
    def _grid(spec: ModelSpec) -> tuple[int, int, int]:
        factor = 2 ** len(spec.hidden)
        _, height, width = spec.image_shape
        return spec.hidden[-1], height // factor, width // factor

    @staticmethod
    def build_decoder(spec: ModelSpec) -> nn.Module:
        """Return Linear-ReLU-Unflatten, then ConvTranspose2d-ReLU blocks and a Sigmoid."""
        grid = ConvVAE._grid(spec)
        channels = [*reversed(spec.hidden), spec.image_shape[0]]
        layers: list[nn.Module] = [
            _maybe_sn(nn.Linear(spec.decoder_input_dim, math.prod(grid)), spec),
            nn.ReLU(),
            nn.Unflatten(1, grid),
        ]
        for n_in, n_out in zip(channels[:-1], channels[1:]):
            layers += [_maybe_sn(nn.ConvTranspose2d(n_in, n_out, 4, 2, 1), spec), nn.ReLU()]
        layers[-1] = nn.Sigmoid()
        return nn.Sequential(*layers)

    def __init__(self, spec: ModelSpec) -> None:
        channels = [spec.image_shape[0], *spec.hidden]
        layers: list[nn.Module] = []
        for n_in, n_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(n_in, n_out, 4, 2, 1), nn.ReLU()]
        layers.append(nn.Flatten())
        feature_dim = math.prod(self._grid(spec))
        super().__init__(spec=spec, encoder=nn.Sequential(*layers), feature_dim=feature_dim)


def build_vae(spec: ModelSpec) -> VAE:
    """Return a freshly initialised VAE for ``spec``.

    Args:
        spec: The model spec.

    Returns:
        The VAE; its ``decoder`` is what a client shares.
    """
    return MODEL_REGISTRY[spec.arch](spec)  # type: ignore[call-arg]  # zoo classes take spec


def build_decoder(spec: ModelSpec) -> nn.Module:
    """Return a decoder alone, with the parameter names of ``build_vae(spec).decoder``.

    Args:
        spec: The model spec (typically received from a client).

    Returns:
        A freshly initialised decoder; load the shared state dict into it.
    """
    return MODEL_REGISTRY[spec.arch].build_decoder(spec)


def decoder_from_state(spec: ModelSpec, state: Mapping[str, Tensor]) -> nn.Module:
    """Return a decoder for ``spec`` holding ``state`` (checked strictly), on the CPU.

    The decoder is built on the ``meta`` device and the tensors of ``state`` become its
    parameters and buffers (``load_state_dict(..., assign=True)``), cast to the dtype the
    spec builds, so nothing is initialised at random or allocated only to be overwritten
    (both were most of the cost of accepting a decoder on the server). The decoder
    therefore shares memory with ``state``: pass tensors nothing else writes to
    (:func:`~alignfl_mpi.arrays.arrays_to_state` gives copies). A decoder with a tensor
    the state dict cannot hold (a non-persistent buffer) is built and initialised as
    usual instead.

    Raises:
        RuntimeError: ``state`` does not match the spec's tensors (``load_state_dict``).
    """
    with torch.device("meta"):
        decoder = build_decoder(spec)
    expected = decoder.state_dict()
    names = {n for n, _ in decoder.named_parameters()} | {n for n, _ in decoder.named_buffers()}
    if not names <= set(expected):  # pragma: no cover - no registered decoder has them
        decoder = build_decoder(spec)
        decoder.load_state_dict(state, strict=True)
        return decoder
    own = {k: (v.to(dtype=expected[k].dtype).contiguous() if k in expected else v)
           for k, v in state.items()}
    decoder.load_state_dict(own, strict=True, assign=True)
    return decoder


def decoder_state_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Return the name and shape of every tensor in the decoder's state dict.

    With ``spectral_norm`` the names include the parametrisation tensors. The shapes are
    derived once per spec (on the ``meta`` device) and remembered.

    Args:
        spec: The model spec.

    Returns:
        Mapping from state-dict key to shape (a new dict on every call).

    Example:
        >>> decoder_state_shapes(ModelSpec(arch="mlp", hidden=(8,)))
        {'0.weight': (8, 2), '0.bias': (8,), '2.weight': (784, 8), '2.bias': (784,)}
    """
    return dict(_decoder_state_shapes(spec))


@functools.lru_cache(maxsize=64)
def _decoder_state_shapes(spec: ModelSpec) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):  # shapes only: nothing is allocated, however wide the spec
        decoder = build_decoder(spec)
    return tuple((k, tuple(v.shape)) for k, v in decoder.state_dict().items())


KL_REDUCTIONS = ("sum", "mean")
"""How :func:`vae_loss` reduces the KL term over the latent dimensions."""


def vae_loss(
    recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, *, kl_weight: float = 1.0,
    kl_reduction: str = "sum",
) -> tuple[Tensor, Tensor, Tensor]:
    """Return the VAE loss and its two terms, each averaged over the batch.

    Args:
        recon: Reconstructions, same shape as ``x``.
        x: Inputs ``(B, ...)``.
        mu: Posterior means ``(B, latent_dim)``.
        logvar: Posterior log-variances ``(B, latent_dim)``.
        kl_weight: Weight of the KL term.
        kl_reduction: ``sum``: the per-sample KL(N(mu, exp(logvar)) || N(0, I)) summed
            over the latent dims (the proper ELBO); ``mean``: averaged over the latent
            dims, as the reference code's ``mse_loss_function_with_gp`` does (its
            ``-0.5 * torch.mean(...)`` over batch and dims). ``mean`` with weight ``w``
            equals ``sum`` with weight ``w / latent_dim``.

    Returns:
        ``(loss, recon_term, kl_term)``: ``recon_term`` is the per-sample sum of
        squared errors, ``kl_term`` the per-sample KL reduced over the latent dims as
        chosen, and ``loss = recon_term + kl_weight * kl_term``.

    Example:
        >>> x = torch.zeros(1, 2)
        >>> loss, rec, kl = vae_loss(x + 1, x, torch.ones(1, 1), torch.zeros(1, 1))
        >>> float(rec), float(kl), float(loss)
        (2.0, 0.5, 2.5)
        >>> mu, lv = torch.ones(1, 2), torch.zeros(1, 2)
        >>> [float(vae_loss(x, x, mu, lv, kl_reduction=r)[2]) for r in KL_REDUCTIONS]
        [1.0, 0.5]
    """
    if kl_reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")
    recon_term = (recon - x).pow(2).flatten(1).sum(dim=1).mean()
    kl_elements = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    kl_per_sample = kl_elements.sum(dim=1) if kl_reduction == "sum" else kl_elements.mean(dim=1)
    kl_term = kl_per_sample.mean()
    return recon_term + kl_weight * kl_term, recon_term, kl_term


#: Labels a conditional VAE knows: the 10 classes and the outlier label 10.
CONDITIONAL_CLASSES = 11


def model_spec(cfg: ModelConfig) -> ModelSpec:
    """The model-zoo spec of a ``[model]`` config table."""
    return ModelSpec(arch=cfg.arch, latent_dim=cfg.latent_dim, hidden=tuple(cfg.hidden),
                     spectral_norm=cfg.spectral_norm,
                     n_classes=CONDITIONAL_CLASSES if cfg.conditional else 0)


@torch.no_grad()
def latent_means(vae: VAE, data: Tensor, *, device: torch.device, batch_size: int = 2048,
                 labels: Tensor | None = None) -> np.ndarray:
    """Encoder means of ``data`` as float64 numpy ``(N, D)``, in batches, in eval mode."""
    was_training = vae.training
    vae.eval()
    out = [vae.encode(data[i:i + batch_size].to(device),
                      None if labels is None else labels[i:i + batch_size].to(device))[0].cpu()
           for i in range(0, len(data), batch_size)]
    vae.train(was_training)
    return torch.cat(out).double().numpy()
