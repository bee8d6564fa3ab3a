"""The server's state that every strategy shares: the global VAE and the decoder registry.

Plain PyTorch, no MPI, no strategy. The server keeps the latest accepted decoder and
prior of every client (validated as untrusted input, probed before use), and draws the
round's synthetic pool from them (prior -> decoder, labelled with the client id):
``samples_per_client`` images per stored decoder, or, with ``server.pool_size`` > 0, a
pool of that total size split over the stored decoders by ``server.pool_weighting``
(:func:`pool_shares`), so that the server's cost per round does not grow with the number
of clients. The registry (:class:`DecoderRegistry`) keeps the plain MLP decoders' parameters
stacked in a :class:`~alignfl_mpi.decoder_bank.DecoderBank`, so that :func:`draw_pool`
decodes them in batches rather than one module call per decoder. What a strategy does with
the pool (ALIGN-FL trains the global VAE on it; the averaging strategies only evaluate it)
and any state of its own live in :mod:`alignfl_mpi.strategies`.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Hashable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .arrays import arrays_to_state, state_arrays
from .decoder_bank import DecoderBank, Slot, decode_into
from .errors import AlignFLError, MessageError
from .models import (
    ModelSpec,
    build_vae,
    decoder_from_state,
    decoder_state_shapes,
    model_spec,
)
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


@dataclass(frozen=True, eq=False)
class _Tables:
    """A stored decoder's prior (and label distribution) as the pool draw uses them."""

    prior: GaussianMixturePrior
    class_weights: np.ndarray | None
    cdf: torch.Tensor               # (K,) float64 cumulative mixture weights
    means: torch.Tensor             # (K, D) float32
    stds: torch.Tensor              # (K, D) float32, exp(log_vars / 2)
    class_cdf: torch.Tensor | None  # (n_classes,) float64 cumulative label weights

    @classmethod
    def of(cls, entry: DecoderEntry) -> _Tables:
        p, cw = entry.prior, entry.class_weights
        return cls(prior=p, class_weights=cw,
                   cdf=torch.from_numpy(np.cumsum(p.weights.astype(np.float64))),
                   means=torch.from_numpy(p.means.copy()),
                   stds=torch.from_numpy(np.exp(0.5 * p.log_vars)),
                   class_cdf=None if cw is None else torch.from_numpy(np.cumsum(cw)))


class DecoderRegistry(MutableMapping[int, DecoderEntry]):
    """Client id -> stored decoder, a mapping whose MLP decoders live in a :class:`DecoderBank`.

    Storing an entry moves its decoder's parameters into the bank (when it is a plain MLP
    decoder), replacing or deleting one takes the old decoder out (its module keeps a copy
    of its parameters), so the bank always holds exactly the stored decoders.
    """

    def __init__(self) -> None:
        self._entries: dict[int, DecoderEntry] = {}
        self._slots: dict[int, Slot] = {}
        self._tables: dict[int, _Tables] = {}
        self.bank = DecoderBank()

    def __getitem__(self, client_id: int) -> DecoderEntry:
        return self._entries[client_id]

    def __setitem__(self, client_id: int, entry: DecoderEntry) -> None:
        if client_id in self._entries:
            del self[client_id]
        self._entries[client_id] = entry
        slot = self.bank.add(entry.decoder)
        if slot is not None:
            self._slots[client_id] = slot

    def __delitem__(self, client_id: int) -> None:
        del self._entries[client_id]
        self._tables.pop(client_id, None)
        slot = self._slots.pop(client_id, None)
        if slot is not None:
            self.bank.remove(slot)

    def __iter__(self) -> Iterator[int]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def slot(self, client_id: int) -> Slot | None:
        """Where the client's decoder lives in the bank; None if it is not banked."""
        return self._slots.get(client_id)

    def tables(self, client_id: int) -> _Tables:
        """The client's prior as tensors, made once per stored prior."""
        entry = self._entries[client_id]
        t = self._tables.get(client_id)
        if t is None or t.prior is not entry.prior or t.class_weights is not entry.class_weights:
            t = self._tables[client_id] = _Tables.of(entry)
        return t

    def nbytes(self) -> int:
        """Bytes of the stored decoders' tensors: the bank's blocks and the other decoders."""
        return self.bank.nbytes() + sum(
            t.numel() * t.element_size() for cid, e in self._entries.items()
            if cid not in self._slots for t in e.decoder.state_dict().values())


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
    # the same exact arithmetic in integers, cheaper than Fractions at thousands of
    # decoders: with the weights over a common denominator, quota = total * num / sum(num)
    den = math.lcm(*(v.denominator for v in w.values()))
    num = {cid: v.numerator * (den // v.denominator) for cid, v in w.items()}
    sum_num = sum(num.values())
    if sum_num <= 0:
        raise ValueError("at least one pool weight must be positive")
    shares, remainder = {}, {}
    for cid in ids:
        shares[cid], remainder[cid] = divmod(total * num[cid], sum_num)
    left = total - sum(shares.values())
    by_remainder = sorted(ids, key=lambda cid: (-remainder[cid], cid))
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


CDF_CHUNK = 1 << 22
"""Most (image, component) comparisons held at once when picking mixture components."""


def _inverse_cdf(cdf: torch.Tensor, owner: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn by each uniform ``u[j]`` from the distribution whose CDF is ``cdf[owner[j]]``.

    The index is the number of CDF values ``<= u`` (capped at the last index, should
    rounding leave the CDF's last value below ``u``): ``k`` with probability ``w_k``.

    >>> cdf = torch.tensor([[0.25, 1.0], [0.5, 1.0]], dtype=torch.float64)
    >>> u = torch.tensor([0.1, 0.3, 0.3, 0.99], dtype=torch.float64)
    >>> _inverse_cdf(cdf, torch.tensor([0, 0, 1, 1]), u).tolist()
    [0, 1, 0, 1]
    """
    k = torch.empty(len(u), dtype=torch.long)
    step = max(1, CDF_CHUNK // cdf.shape[1])
    for a in range(0, len(u), step):
        k[a:a + step] = (u[a:a + step, None] >= cdf[owner[a:a + step]]).sum(dim=1)
    return k.clamp_max_(cdf.shape[1] - 1)


@torch.no_grad()
def draw_pool(registry: DecoderRegistry, shares: Mapping[int, int], *,
              generator: torch.Generator, device: torch.device,
              batched: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images from the stored decoders: ``shares[c]`` from client ``c``, in the order given.

    The random numbers are drawn once for the whole pool of ``M`` images, in this order,
    whatever the decoders: ``M`` uniforms (float64) that pick each image's mixture
    component, ``M`` uniforms that pick its class (used by conditional decoders), and an
    ``(M, D)`` standard normal (``D`` the largest latent size) for the latent noise. Client
    ``c``'s images are the rows ``[s_c, s_c + shares[c])`` of these, ``s_c`` the shares
    before it; its latents are ``means[k] + stds[k] * noise[:, :latent_dim]``. The pool is
    thus a function of the generator's state, the shares and the stored decoders, and a
    decoder's images depend only on its own rows of the draws.

    Args:
        registry: The stored decoders.
        shares: Client id -> number of images (> 0), in pool order.
        generator: CPU generator of all the draws.
        device: Where the decoders are and the images are made.
        batched: Decode the banked MLP decoders in batched runs (see
            :mod:`alignfl_mpi.decoder_bank`); False decodes every decoder alone with its
            module, the reference the batched decode agrees with to float rounding.

    Returns:
        ``(images (M, C, H, W), client ids (M,), classes (M,))``; the class is -1 for
        unconditional decoders.
    """
    cids = list(shares)
    counts = [int(shares[c]) for c in cids]
    firsts = [0, *itertools.accumulate(counts)][:-1]
    entries = [registry[c] for c in cids]
    m = sum(counts)
    d_max = max(e.spec.latent_dim for e in entries)
    u_component = torch.rand(m, generator=generator, dtype=torch.float64)
    u_class = torch.rand(m, generator=generator, dtype=torch.float64)
    noise = torch.randn(m, d_max, generator=generator)
    tables = [registry.tables(c) for c in cids]

    def groups(key: Callable[[int], Hashable | None]) -> list[list[int]]:
        """Positions in ``cids`` with equal ``key(pos)`` (each alone if not batched)."""
        if not batched:
            return [[i] for i in range(len(cids)) if key(i) is not None]
        out: dict[Hashable, list[int]] = {}
        for i in range(len(cids)):
            k = key(i)
            if k is not None:
                out.setdefault(k, []).append(i)
        return list(out.values())

    def rows_of(group: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(owner, rows)``: each image's position in ``group`` and its pool row."""
        n = torch.tensor([counts[i] for i in group])
        owner = torch.repeat_interleave(torch.arange(len(group)), n)
        first = torch.tensor([firsts[i] for i in group]) - (torch.cumsum(n, 0) - n)
        return owner, first[owner] + torch.arange(len(owner))

    latents = torch.zeros(m, d_max)
    for group in groups(lambda i: tuple(tables[i].means.shape)):
        owner, rows = rows_of(group)
        t = [tables[i] for i in group]
        k = _inverse_cdf(torch.stack([x.cdf for x in t]), owner, u_component[rows])
        d = t[0].means.shape[1]
        means, stds = torch.stack([x.means for x in t]), torch.stack([x.stds for x in t])
        latents[rows, :d] = means[owner, k] + stds[owner, k] * noise[rows, :d]
    classes = torch.full((m,), -1, dtype=torch.long)
    class_cdfs = [t.class_cdf for t in tables]
    for group in groups(lambda i: None if (c := class_cdfs[i]) is None else c.shape[0]):
        owner, rows = rows_of(group)
        cdf = torch.stack([c for i in group if (c := class_cdfs[i]) is not None])
        classes[rows] = _inverse_cdf(cdf, owner, u_class[rows])

    images = torch.empty(m, math.prod(entries[0].spec.image_shape), device=device)
    inputs: dict[tuple[int, int], torch.Tensor] = {}

    def inputs_of(spec: ModelSpec) -> torch.Tensor:
        """Every pool row as ``spec``'s decoder input: latents (and one-hot class)."""
        key = (spec.latent_dim, spec.n_classes)
        if key not in inputs:
            x = latents[:, :spec.latent_dim]
            if spec.n_classes:
                # rows of other decoders (-1, or another class count) are clamped, not used
                onehot = torch.nn.functional.one_hot(classes.clamp(0, spec.n_classes - 1),
                                                     spec.n_classes)
                x = torch.cat([x, onehot.float()], dim=1)
            inputs[key] = x.to(device)
        return inputs[key]

    banked: dict[tuple[int, int], tuple[ModelSpec, list[tuple[Slot, int, int]]]] = {}
    for i, (cid, entry) in enumerate(zip(cids, entries)):
        slot = registry.slot(cid) if batched else None
        spec, first, n = entry.spec, firsts[i], counts[i]
        if slot is not None:
            key = (spec.latent_dim, spec.n_classes)
            banked.setdefault(key, (spec, []))[1].append((slot, first, n))
        else:
            x = inputs_of(spec)[first:first + n]
            images[first:first + n] = entry.decoder(x).reshape(n, -1)
    for spec, members in banked.values():
        decode_into(images, inputs=inputs_of(spec), members=members)
    labels = torch.repeat_interleave(torch.tensor(cids, dtype=torch.long),
                                     torch.tensor(counts))
    return images.reshape(m, *entries[0].spec.image_shape), labels, classes


MAX_SPEC_WIDTH = 2**20
"""Largest layer width or latent size a received spec may name (checked before building)."""

MAX_SPEC_LAYERS = 32
"""Most hidden layers a received spec may have."""

MAX_PRIOR_COMPONENTS = 4096
"""Most mixture components a received prior may have."""

PROBE_SAMPLES = 64
"""Samples drawn from a received decoder's own prior to probe its outputs. Enough to see
non-finite, out-of-range or constant outputs; a decoder whose bad outputs are rarer is
caught by the range check of every pool draw (:meth:`ServerState.sample_synthetic`), which
evicts it. 256 samples were a third of the cost of accepting a decoder."""

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
        self.registry = DecoderRegistry()
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
        decoder = decoder_from_state(model, arrays_to_state(state))
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
        The pool is :func:`draw_pool` of the shares in client id order, from one generator
        seeded by ``(seed, SERVER_SAMPLE, round_)``, the MLP decoders decoded in batches.
        A decoder whose draw is non-finite or outside ``[0, 1]`` is evicted
        (:attr:`last_evicted`) and its share is left out of the pool.

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
        pool, labels, self.last_classes = draw_pool(self.registry, shares, generator=gen,
                                                    device=self.device)
        # one pass over the whole pool; NaN propagates into the minimum and maximum
        lo, hi = torch.aminmax(pool.reshape(len(pool), -1), dim=1)
        bad = ~((lo >= 0) & (hi <= 1))
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

        The MLP decoders' parameters are counted as the bank holds them, unused slots of
        its blocks included (at most ``decoder_bank.SLACK_SLOTS`` decoders' worth per
        architecture); the priors (a few hundred bytes each) and Python overhead are not.
        """
        return self.registry.nbytes()

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
