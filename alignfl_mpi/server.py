"""The server's state that every strategy shares: the global VAE and the decoder registry.

Plain PyTorch, no MPI, no strategy. The server keeps the latest accepted decoder and
prior of every client (validated as untrusted input, probed before use), and draws the
round's synthetic pool from them (prior -> decoder, labelled with the client id):
``samples_per_client`` images per stored decoder, or, with ``server.pool_size`` > 0, a
pool of that total size split over the stored decoders by ``server.pool_weighting``
(:func:`pool_shares`), so that the server's cost per round does not grow with the number
of clients. What a strategy does with the pool (ALIGN-FL
trains the global VAE on it; the averaging strategies only evaluate it) and any state of
its own live in :mod:`alignfl_mpi.strategies`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .arrays import arrays_to_state, state_arrays
from .errors import AlignFLError, MessageError
from .models import ModelSpec, build_decoder, build_vae, decoder_state_shapes, model_spec
from .prior import CLASS_WEIGHTS, GaussianMixturePrior
from .seeds import Role, derive_seed

if TYPE_CHECKING:
    from .config import RunConfig

log = logging.getLogger(__name__)


@dataclass
class DecoderEntry:
    """A client's latest accepted decoder and prior."""

    client_id: int
    spec: ModelSpec
    decoder: torch.nn.Module
    prior: GaussianMixturePrior
    round: int
    metrics: dict[str, float]
    class_weights: np.ndarray | None = None  # conditional decoders: label distribution

    def sample(self, n: int, *, generator: torch.Generator,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` images (prior -> decoder) and their class labels (-1 if unconditional)."""
        z = self.prior.sample(n, generator=generator).to(device)
        if self.class_weights is None:
            return self.decoder(z), torch.full((n,), -1, dtype=torch.long)
        y = torch.multinomial(torch.from_numpy(self.class_weights).double(), n,
                              replacement=True, generator=generator)
        n_classes = self.spec.n_classes
        onehot = torch.nn.functional.one_hot(y, n_classes).float().to(device)
        return self.decoder(torch.cat([z, onehot], dim=1)), y


def split_class_weights(model: ModelSpec, prior: dict[str, np.ndarray]
                        ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Separate a conditional decoder's label distribution from its latent prior.

    Raises:
        MessageError: A conditional decoder without a valid distribution, or an
            unconditional one with one.
    """
    prior = dict(prior)
    weights = prior.pop(CLASS_WEIGHTS, None)
    if not model.n_classes:
        if weights is not None:
            raise MessageError("class weights sent with an unconditional decoder")
        return prior, None
    if weights is None or weights.shape != (model.n_classes,):
        raise MessageError(f"a conditional decoder needs class weights of shape "
                           f"({model.n_classes},)")
    weights = np.asarray(weights, np.float64)
    if not np.isfinite(weights).all() or (weights < 0).any() or abs(weights.sum() - 1) > 1e-4:
        raise MessageError("class weights must be a probability vector")
    return prior, weights / weights.sum()


def pool_shares(weights: Mapping[int, Fraction | int], total: int) -> dict[int, int]:
    """Split ``total`` images over decoders in proportion to ``weights`` (largest remainder).

    Each decoder's quota ``total * w / sum(w)`` is computed exactly (as a fraction), its
    integer part is given, and the images left over go one each to the largest fractional
    parts, ties to the lower client id. The shares sum to ``total`` exactly; a decoder may
    get 0.

    Args:
        weights: Client id -> non-negative weight (exact: an int or a Fraction); at least
            one weight must be positive when ``weights`` is not empty.
        total: Images to split (>= 0).

    Returns:
        Client id -> share, in client id order.

    >>> pool_shares({0: 1, 1: 1, 2: 1}, 10)
    {0: 4, 1: 3, 2: 3}
    >>> pool_shares({3: 1, 7: 3}, 6)
    {3: 2, 7: 4}
    """
    if total < 0:
        raise ValueError(f"pool size must be >= 0, got {total}")
    ids = sorted(weights)
    if not ids:
        return {}
    w = {cid: Fraction(weights[cid]) for cid in ids}
    if any(v < 0 for v in w.values()):
        raise ValueError("pool weights must be non-negative")
    sum_w = sum(w.values(), Fraction(0))
    if sum_w <= 0:
        raise ValueError("at least one pool weight must be positive")
    quota = {cid: total * w[cid] / sum_w for cid in ids}
    shares = {cid: math.floor(q) for cid, q in quota.items()}
    left = total - sum(shares.values())
    by_remainder = sorted(ids, key=lambda cid: (-(quota[cid] - shares[cid]), cid))
    for cid in by_remainder[:left]:
        shares[cid] += 1
    return shares


def pool_weights(registry: Mapping[int, DecoderEntry], *, weighting: str,
                 round_: int) -> dict[int, Fraction]:
    """Each stored decoder's exact weight in the pool under ``weighting``.

    ``uniform``: 1 each. ``samples``: the client's sample count (``metrics["n_samples"]``);
    uniform for all when any stored decoder lacks a positive, finite count. ``recency``:
    ``1 / (1 + age)``, the age in rounds ``round_ - entry.round`` (0 for a decoder of this
    round; never negative).

    Raises:
        ValueError: An unknown weighting.
    """
    if weighting == "uniform":
        return {cid: Fraction(1) for cid in registry}
    if weighting == "samples":
        counts: dict[int, Fraction] = {}
        for cid, e in registry.items():
            n = e.metrics.get("n_samples")
            if n is None or not math.isfinite(n) or n <= 0:
                log.warning("client %d's stored decoder has no sample count; the pool is "
                            "split uniformly", cid)
                return {c: Fraction(1) for c in registry}
            counts[cid] = Fraction(float(n))
        return counts
    if weighting == "recency":
        return {cid: Fraction(1, 1 + max(0, round_ - e.round)) for cid, e in registry.items()}
    raise ValueError(f"unknown pool weighting {weighting!r}")


MAX_SPEC_WIDTH = 2**20
"""Largest layer width or latent size a received spec may name (checked before building)."""

MAX_SPEC_LAYERS = 32
"""Most hidden layers a received spec may have."""

MAX_PRIOR_COMPONENTS = 4096
"""Most mixture components a received prior may have."""

PROBE_SAMPLES = 256
"""Samples drawn from a received decoder's own prior to probe its outputs."""

PROBE_SEED = 20250717
"""Seed of the probe's private generator (the global RNG is never touched)."""


def _check_spec_bounds(spec: dict[str, Any]) -> None:
    """Bound a received spec's sizes before anything is built from it."""
    hidden = spec.get("hidden", ())
    if isinstance(hidden, (list, tuple)) and len(hidden) > MAX_SPEC_LAYERS:
        raise MessageError(f"decoder spec has {len(hidden)} hidden layers, over "
                           f"{MAX_SPEC_LAYERS}")
    sizes = [("latent_dim", spec.get("latent_dim", 1)), ("n_classes", spec.get("n_classes", 0))]
    sizes += [("hidden", h) for h in (hidden if isinstance(hidden, (list, tuple)) else ())]
    for key, value in sizes:
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_SPEC_WIDTH:
            raise MessageError(f"decoder spec {key} {value} is over {MAX_SPEC_WIDTH}")


def validate_update(*, spec: dict[str, Any], state: dict[str, np.ndarray],
                    prior: dict[str, np.ndarray], image_shape: tuple[int, int, int],
                    max_params: int | None = None
                    ) -> tuple[ModelSpec, GaussianMixturePrior]:
    """Check a received update against the model zoo before anything is built from it.

    Only shapes are derived from the spec (on the ``meta`` device), so an enormous spec
    costs nothing; the decoder itself is built only after every check passed.

    Args:
        spec: The received architecture dict.
        state: The received decoder tensors.
        prior: The received prior arrays (and class weights of a conditional decoder).
        image_shape: The server's image shape; the decoder must produce it.
        max_params: Largest parameter count accepted (e.g. the message limit / 4).

    Raises:
        MessageError: Unregistered architecture, a spec over the size bounds, wrong tensor
            names, shapes or dtypes, non-finite values, an invalid prior, or the wrong
            image shape. Nothing else.
    """
    _check_spec_bounds(spec)
    try:
        model = ModelSpec.from_dict(spec)
    except AlignFLError as exc:
        raise MessageError(f"invalid decoder spec: {exc}") from None
    except Exception as exc:  # a type ModelSpec's checks did not foresee
        raise MessageError(f"invalid decoder spec ({type(exc).__name__})") from None
    if tuple(model.image_shape) != tuple(image_shape):
        raise MessageError(f"decoder image shape {model.image_shape} != server's {image_shape}")
    try:
        expected = decoder_state_shapes(model)
    except Exception as exc:
        raise MessageError(f"decoder spec cannot be built ({type(exc).__name__})") from None
    n_params = sum(int(np.prod(s)) for s in expected.values())
    if max_params is not None and n_params > max_params:
        raise MessageError(f"decoder spec has {n_params} parameters, over the {max_params} "
                           "that fit the message limit")
    missing, extra = set(expected) - set(state), set(state) - set(expected)
    if missing or extra:
        raise MessageError(f"decoder tensors do not match the {model.arch} spec "
                           f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})")
    for name, shape in expected.items():
        arr = state[name]
        if tuple(arr.shape) != tuple(shape):
            raise MessageError(f"decoder tensor {name} has shape {tuple(arr.shape)}, "
                               f"spec says {tuple(shape)}")
        if arr.dtype.kind != "f":
            raise MessageError(f"decoder tensor {name} has dtype {arr.dtype}, not floating point")
        if not np.isfinite(arr).all():
            raise MessageError(f"decoder tensor {name} has non-finite values")
    prior, _ = split_class_weights(model, prior)
    gm = GaussianMixturePrior.from_arrays(prior, latent_dim=model.latent_dim)
    if gm.n_components > MAX_PRIOR_COMPONENTS:
        raise MessageError(f"prior has {gm.n_components} components, over "
                           f"{MAX_PRIOR_COMPONENTS}")
    return model, gm


@torch.no_grad()
def probe_decoder(entry: DecoderEntry, *, device: torch.device) -> None:
    """Decode samples of the entry's own prior; refuse outputs no image can have.

    A decoder whose weights are all finite can still output NaN or Inf (overflowing
    layers), values outside ``[0, 1]``, or one constant image: storing it would poison
    every later synthetic pool and the global model.

    Raises:
        MessageError: Non-finite, out-of-range or constant outputs.
    """
    gen = torch.Generator().manual_seed(PROBE_SEED)
    x, _ = entry.sample(PROBE_SAMPLES, generator=gen, device=device)
    x = x.float()
    if not torch.isfinite(x).all():
        raise MessageError(f"decoder outputs non-finite values on {PROBE_SAMPLES} samples of "
                           "its own prior")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise MessageError(f"decoder outputs values in [{lo:.3g}, {hi:.3g}], outside the image "
                           "range [0, 1]")
    if float((x.amax(dim=0) - x.amin(dim=0)).max()) <= 1e-6:
        raise MessageError(f"decoder outputs one constant image for {PROBE_SAMPLES} samples of "
                           "its own prior")


class ServerState:
    """The global VAE and the decoder registry: what every strategy's server side shares."""

    def __init__(self, cfg: RunConfig, *, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        torch.manual_seed(derive_seed(cfg.seed, Role.SERVER_INIT))
        self.spec = model_spec(cfg.server.model)
        self.vae = build_vae(self.spec).to(device)
        self.registry: dict[int, DecoderEntry] = {}
        self.max_params = int(cfg.server.max_message_mb * 2**20) // 4
        self.last_classes = torch.empty(0, dtype=torch.long)
        self.last_evicted: list[int] = []  # decoders dropped by the last sample_synthetic
        self.rounds_done = 0

    # --- decoder registry ---------------------------------------------------------------
    def accept(self, client_id: int, *, spec: dict[str, Any], state: dict[str, np.ndarray],
               prior: dict[str, np.ndarray], round_: int, metrics: dict[str, float]) -> None:
        """Validate and store a client's decoder and prior, replacing its previous one.

        Raises:
            MessageError: The update is invalid; the stored decoder is kept.
        """
        model, gm = validate_update(spec=spec, state=state, prior=prior,
                                    image_shape=self.spec.image_shape,
                                    max_params=self.max_params)
        decoder = build_decoder(model)
        decoder.load_state_dict(arrays_to_state(state), strict=True)
        decoder.to(self.device).eval()
        _, class_weights = split_class_weights(model, prior)
        entry = DecoderEntry(client_id=client_id, spec=model, decoder=decoder, prior=gm,
                             round=round_, metrics=dict(metrics), class_weights=class_weights)
        probe_decoder(entry, device=self.device)
        self.registry[client_id] = entry

    def global_arrays(self) -> dict[str, np.ndarray]:
        """The global VAE's state as contiguous numpy arrays."""
        return state_arrays(self.vae)

    def load_global(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the global VAE's weights (a strategy's aggregate)."""
        self.vae.load_state_dict(arrays_to_state(arrays), strict=True)

    # --- sampling -----------------------------------------------------------------------
    @torch.no_grad()
    def sample_synthetic(self, *, round_: int,
                         n_per_client: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the round's synthetic pool from the stored decoders (prior -> decoder).

        With ``server.pool_size`` 0 (or ``n_per_client`` given), every stored decoder gives
        ``n_per_client`` (default ``server.samples_per_client``) images. Otherwise the pool
        holds ``pool_size`` images split by :func:`pool_shares` under
        ``server.pool_weighting``; a decoder with a share of 0 is not sampled this round.
        The decoders are drawn in client id order from one generator seeded by
        ``(seed, SERVER_SAMPLE, round_)``. A decoder whose draw is non-finite or outside
        ``[0, 1]`` is evicted (:attr:`last_evicted`) and its share is left out of the pool.

        Returns:
            ``(images (M, C, H, W) float in [0, 1] on the server device, labels (M,)
            client ids)``; empty tensors when no decoder is stored yet. The class labels
            of conditional decoders' samples (-1 otherwise) are kept in
            :attr:`last_classes`.
        """
        shares = {cid: n for cid, n in
                  self.pool_plan(round_=round_, n_per_client=n_per_client).items() if n}
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, Role.SERVER_SAMPLE,
                                                        round_))
        self.last_evicted = []
        if not shares:
            self.last_classes = torch.empty(0, dtype=torch.long)
            return torch.empty(0, *self.spec.image_shape), torch.empty(0, dtype=torch.long)
        images, classes = [], []
        for cid, n in shares.items():
            x, y = self.registry[cid].sample(n, generator=gen, device=self.device)
            images.append(x.reshape(n, *self.spec.image_shape))
            classes.append(y)
        pool = torch.cat(images)
        labels = torch.repeat_interleave(torch.tensor(list(shares), dtype=torch.long),
                                         torch.tensor(list(shares.values())))
        self.last_classes = torch.cat(classes)
        # one pass over the whole pool instead of three small reductions per decoder
        flat = pool.reshape(len(pool), -1)
        bad = ~torch.isfinite(flat).all(dim=1) | (flat.amin(dim=1) < 0) | (flat.amax(dim=1) > 1)
        if not bool(bad.any()):
            return pool, labels
        for cid in labels[bad.cpu()].unique().tolist():
            # the probe saw finite outputs, but this draw is not: never let it into the
            # pool, and drop the decoder so that it cannot spoil later rounds either
            log.error("round %d: client %d's decoder produced non-finite or out-of-range "
                      "images; it is evicted until the client sends a new one",
                      round_ + 1, cid)
            del self.registry[cid]
            self.last_evicted.append(cid)
        keep = ~torch.isin(labels, torch.tensor(self.last_evicted, dtype=torch.long))
        self.last_classes = self.last_classes[keep]
        if not bool(keep.any()):
            return torch.empty(0, *self.spec.image_shape), torch.empty(0, dtype=torch.long)
        return pool[keep.to(pool.device)], labels[keep]

    def pool_plan(self, *, round_: int, n_per_client: int | None = None) -> dict[int, int]:
        """Images each stored decoder gives to round ``round_``'s pool, in client id order.

        ``n_per_client`` (or ``server.samples_per_client`` when ``server.pool_size`` is 0)
        from each; otherwise ``pool_size`` split by ``server.pool_weighting``.
        """
        s = self.cfg.server
        if n_per_client is not None or s.pool_size == 0:
            n = n_per_client or s.samples_per_client
            return {cid: n for cid in sorted(self.registry)}
        weights = pool_weights(self.registry, weighting=s.pool_weighting, round_=round_)
        return pool_shares(weights, s.pool_size)

    def registry_bytes(self) -> int:
        """Bytes held by the stored decoders' tensors (parameters and buffers).

        The priors (a few hundred bytes each) and Python overhead are not counted.
        """
        return sum(t.numel() * t.element_size() for e in self.registry.values()
                   for t in e.decoder.state_dict().values())

    @torch.no_grad()
    def sample_client(self, client_id: int, n: int, *, seed: int) -> torch.Tensor:
        """``n`` images from one stored decoder (for grids and privacy measurements)."""
        gen = torch.Generator().manual_seed(seed)
        x, _ = self.registry[client_id].sample(n, generator=gen, device=self.device)
        return x.reshape(n, *self.spec.image_shape)

    # --- checkpointing ------------------------------------------------------------------
    def decoder_arrays(self, client_id: int) -> dict[str, Any]:
        """One stored decoder as plain arrays: spec, round, state and prior."""
        e = self.registry[client_id]
        return {"spec": e.spec.to_dict(), "round": e.round, "metrics": dict(e.metrics),
                "state": state_arrays(e.decoder), "prior": prior_arrays(e)}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the global VAE, the registry, the round."""
        registry = {}
        for cid in self.registry:
            d = self.decoder_arrays(cid)
            registry[str(cid)] = {"spec": d["spec"], "round": d["round"],
                                  "metrics": d["metrics"],
                                  "decoder": arrays_to_state(d["state"]),
                                  "prior": arrays_to_state(d["prior"])}
        return {"vae": self.vae.state_dict(), "registry": registry,
                "rounds_done": self.rounds_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vae.load_state_dict(state["vae"])
        self.rounds_done = int(state["rounds_done"])
        self.registry.clear()
        for cid, e in state["registry"].items():
            self.accept(int(cid), spec=e["spec"],
                        state={k: v.numpy() for k, v in e["decoder"].items()},
                        prior={k: v.numpy() for k, v in e["prior"].items()},
                        round_=int(e["round"]), metrics=dict(e["metrics"]))


def prior_arrays(entry: DecoderEntry) -> dict[str, np.ndarray]:
    """A stored decoder's prior as arrays, with a conditional decoder's class weights."""
    arrays = entry.prior.to_arrays()
    if entry.class_weights is not None:
        arrays[CLASS_WEIGHTS] = entry.class_weights
    return arrays
