"""The stateful server algorithm: decoder registry, synthetic sampling, global training.

Plain PyTorch, no MPI. The server keeps the latest accepted decoder and prior of every
client. Each round it samples ``samples_per_client`` images per client (prior -> decoder,
labelled with the client id), pools them, and trains the persistent global VAE on the
pool for ``epochs`` epochs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .client import CLASS_WEIGHTS, model_spec, round_seed
from .config import RunConfig
from .errors import AlignFLError, MessageError
from .models import ModelSpec, build_decoder, build_vae, decoder_state_shapes, vae_loss
from .prior import GaussianMixturePrior, standard_normal_prior

log = logging.getLogger(__name__)

SERVER_ROLE = 0  # role id for derived seeds; clients use 1 + client_id
CLASSIFIER_INIT = 2**31 - 1  # "round" of the digit classifier's initial weights


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


def average_states(states: list[dict[str, np.ndarray]], weights: list[float]
                   ) -> dict[str, np.ndarray]:
    """Weighted average of state dicts (FedAvg); integer tensors take the first state's.

    >>> average_states([{"w": np.array([0.0])}, {"w": np.array([3.0])}], [1, 2])["w"]
    array([2.])
    """
    total = float(sum(weights))
    out = {}
    for name, first in states[0].items():
        if first.dtype.kind != "f":
            out[name] = first.copy()
            continue
        acc = np.zeros(first.shape, np.float64)
        for st, w in zip(states, weights):
            acc += st[name].astype(np.float64) * (w / total)
        out[name] = acc.astype(first.dtype)
    return out


class ServerState:
    """The server's state: global VAE + optimizer, and the decoder registry."""

    def __init__(self, cfg: RunConfig, *, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        torch.manual_seed(round_seed(cfg.seed, SERVER_ROLE, 0))
        self.spec = model_spec(cfg.server.model)
        self.vae = build_vae(self.spec).to(device)
        self.optimizer = torch.optim.Adam(self.vae.parameters(), lr=cfg.server.lr)
        self.registry: dict[int, DecoderEntry] = {}
        self.max_params = int(cfg.server.max_message_mb * 2**20) // 4
        self.pending: dict[int, tuple[dict[str, np.ndarray], float]] = {}
        self.last_classes = torch.empty(0, dtype=torch.long)
        self.last_evicted: list[int] = []  # decoders dropped by the last sample_synthetic
        self.classifier: Any = None  # digit classifier on the synthetic pool (optional)
        self.classifier_optimizer: Any = None
        self.rounds_done = 0

    # --- decoder registry ---------------------------------------------------------------
    def accept(self, client_id: int, *, spec: dict[str, Any], state: dict[str, np.ndarray],
               prior: dict[str, np.ndarray], round_: int, metrics: dict[str, float]) -> None:
        """Validate and store a client's update, replacing its previous one.

        Raises:
            MessageError: The update is invalid; the stored decoder is kept.
        """
        model, gm = validate_update(spec=spec, state=state, prior=prior,
                                    image_shape=tuple(self.spec.image_shape),
                                    max_params=self.max_params)
        decoder = build_decoder(model)
        decoder.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                                strict=True)
        decoder.to(self.device).eval()
        _, class_weights = split_class_weights(model, prior)
        entry = DecoderEntry(client_id=client_id, spec=model, decoder=decoder, prior=gm,
                             round=round_, metrics=dict(metrics), class_weights=class_weights)
        probe_decoder(entry, device=self.device)
        self.registry[client_id] = entry

    def accept_full(self, client_id: int, *, spec: dict[str, Any], state: dict[str, np.ndarray],
                    round_: int, metrics: dict[str, float]) -> None:
        """FedAvg/FedProx: validate a whole-VAE update and keep it for averaging.

        Its decoder part also goes into the registry (with the N(0, I) prior the VAE was
        trained towards), so that the evaluation can sample what the server saw.

        Raises:
            MessageError: The spec differs from the global model's, or the tensors do not
                match it.
        """
        if spec != self.spec.to_dict():
            raise MessageError(f"model spec {spec} differs from the global model's "
                               f"{self.spec.to_dict()}; FedAvg needs identical models")
        expected = {k: tuple(v.shape) for k, v in self.vae.state_dict().items()}
        if set(expected) != set(state):
            raise MessageError("model tensors do not match the global model")
        for name, shape in expected.items():
            if tuple(state[name].shape) != shape:
                raise MessageError(f"model tensor {name} has shape {tuple(state[name].shape)}, "
                                   f"expected {shape}")
        self.pending[client_id] = (state, float(metrics.get("n_samples", 1.0)))
        prefix = "decoder."
        decoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        prior = standard_normal_prior(self.spec.latent_dim).to_arrays()
        self.accept(client_id, spec=spec, state=decoder, prior=prior, round_=round_,
                    metrics=metrics)

    def average_pending(self) -> dict[str, float]:
        """FedAvg: replace the global VAE by the sample-weighted mean of this round's updates."""
        if not self.pending:
            return {"n_averaged": 0.0}
        ids = sorted(self.pending)
        avg = average_states([self.pending[c][0] for c in ids], [self.pending[c][1] for c in ids])
        self.vae.load_state_dict({k: torch.from_numpy(v) for k, v in avg.items()}, strict=True)
        self.pending.clear()
        return {"n_averaged": float(len(ids))}

    def global_arrays(self) -> dict[str, np.ndarray]:
        """The global VAE's state as contiguous numpy arrays (sent to FedAvg clients)."""
        return {k: np.ascontiguousarray(v.detach().cpu().numpy())
                for k, v in self.vae.state_dict().items()}

    # --- sampling -----------------------------------------------------------------------
    @torch.no_grad()
    def sample_synthetic(self, *, round_: int,
                         n_per_client: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n_per_client`` images from every stored decoder (prior -> decoder).

        Returns:
            ``(images (M*K, C, H, W) float in [0, 1] on the server device, labels (M*K,)
            client ids)``; empty tensors when no decoder is stored yet. The class labels
            of conditional decoders' samples (-1 otherwise) are kept in
            :attr:`last_classes`.
        """
        n = n_per_client or self.cfg.server.samples_per_client
        gen = torch.Generator().manual_seed(round_seed(self.cfg.seed, SERVER_ROLE, 2 * round_ + 1))
        images, labels, classes = [], [], []
        self.last_evicted = []
        for cid in sorted(self.registry):
            x, y = self.registry[cid].sample(n, generator=gen, device=self.device)
            if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
                # the probe saw finite outputs, but this draw is not: never let it into the
                # pool, and drop the decoder so that it cannot spoil later rounds either
                log.error("round %d: client %d's decoder produced non-finite or out-of-range "
                          "images; it is evicted until the client sends a new one",
                          round_ + 1, cid)
                del self.registry[cid]
                self.last_evicted.append(cid)
                continue
            images.append(x.reshape(n, *self.spec.image_shape))
            labels.append(torch.full((n,), cid, dtype=torch.long))
            classes.append(y)
        if not images:
            self.last_classes = torch.empty(0, dtype=torch.long)
            return torch.empty(0, *self.spec.image_shape), torch.empty(0, dtype=torch.long)
        self.last_classes = torch.cat(classes)
        return torch.cat(images), torch.cat(labels)

    @torch.no_grad()
    def sample_client(self, client_id: int, n: int, *, seed: int) -> torch.Tensor:
        """``n`` images from one stored decoder (for grids and privacy measurements)."""
        gen = torch.Generator().manual_seed(seed)
        x, _ = self.registry[client_id].sample(n, generator=gen, device=self.device)
        return x.reshape(n, *self.spec.image_shape)

    # --- global training ----------------------------------------------------------------
    def train_global(self, images: torch.Tensor, *, round_: int) -> dict[str, float]:
        """Train the persistent global VAE on the synthetic pool for ``server.epochs``."""
        s = self.cfg.server
        n = len(images)
        if not bool(torch.isfinite(images).all()):
            log.error("round %d: the synthetic pool holds non-finite values; the global model "
                      "is not trained this round", round_)
            return {"n_synthetic": float(n), "pool_rejected": 1.0}
        rs = round_seed(self.cfg.seed, SERVER_ROLE, 2 * round_ + 2)
        torch.manual_seed(rs)
        gen = torch.Generator().manual_seed(rs)
        self.vae.train()
        history = []
        skipped = 0
        for _ in range(s.epochs):
            order = torch.randperm(n, generator=gen)
            sums, seen = np.zeros(3), 0
            for start in range(0, n, s.batch_size):
                x = images[order[start:start + s.batch_size]].to(self.device)
                recon, mu, logvar = self.vae(x)
                loss, rec, kl = vae_loss(recon, x, mu, logvar, kl_weight=s.kl_weight)
                values = np.array([loss.item(), rec.item(), kl.item()])
                if not np.isfinite(values[0]):
                    skipped += 1  # never step the optimizer on a non-finite loss
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                sums += values * len(x)
                seen += len(x)
            history.append(sums / max(seen, 1) if seen else np.full(3, np.nan))
        if skipped:
            log.warning("round %d: %d global training steps skipped on a non-finite loss",
                        round_, skipped)
        last = history[-1]
        return {"loss": float(last[0]), "recon": float(last[1]), "kl": float(last[2]),
                "first_epoch_loss": float(history[0][0]), "n_synthetic": float(n),
                "skipped_steps": float(skipped)}

    # --- digit classifier on the labelled synthetic pool ---------------------------------
    def train_classifier(self, images: torch.Tensor, classes: torch.Tensor, *,
                         round_: int) -> dict[str, float]:
        """Train the persistent digit classifier on the pool's labelled digits (0-9).

        Only conditional decoders' samples carry labels; the outlier label 10 and
        unlabelled samples (-1) are left out.
        """
        from .metrics import LeNet

        keep = (classes >= 0) & (classes < 10)
        if not bool(keep.any()):
            return {"classifier_samples": 0.0}
        rs = round_seed(self.cfg.seed, SERVER_ROLE, 2 * round_ + 3)
        if self.classifier is None:
            torch.manual_seed(round_seed(self.cfg.seed, SERVER_ROLE, CLASSIFIER_INIT))
            self.classifier = LeNet(n_classes=10).to(self.device)
            self.classifier_optimizer = torch.optim.Adam(self.classifier.parameters(), lr=1e-3)
        x, y = images[keep], classes[keep].to(self.device)
        gen = torch.Generator().manual_seed(rs)
        self.classifier.train()
        total = 0.0
        for _ in range(self.cfg.server.classifier_epochs):
            order = torch.randperm(len(x), generator=gen)
            total = 0.0
            for start in range(0, len(x), self.cfg.server.batch_size):
                idx = order[start:start + self.cfg.server.batch_size]
                loss = torch.nn.functional.cross_entropy(self.classifier(x[idx]), y[idx])
                self.classifier_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.classifier_optimizer.step()
                total += loss.item() * len(idx)
        return {"classifier_loss": total / len(x), "classifier_samples": float(len(x))}

    # --- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: model, optimizer, registry, round."""
        registry = {}
        for cid, e in self.registry.items():
            registry[str(cid)] = {
                "spec": e.spec.to_dict(), "round": e.round, "metrics": e.metrics,
                "decoder": {k: v.detach().cpu() for k, v in e.decoder.state_dict().items()},
                "prior": {k: torch.from_numpy(np.array(v))
                          for k, v in self._prior_arrays(e).items()},
            }
        out = {"vae": self.vae.state_dict(), "optimizer": self.optimizer.state_dict(),
               "registry": registry, "rounds_done": self.rounds_done}
        if self.classifier is not None:
            out["classifier"] = self.classifier.state_dict()
            out["classifier_optimizer"] = self.classifier_optimizer.state_dict()
        return out

    @staticmethod
    def _prior_arrays(entry: DecoderEntry) -> dict[str, np.ndarray]:
        arrays = entry.prior.to_arrays()
        if entry.class_weights is not None:
            arrays[CLASS_WEIGHTS] = entry.class_weights
        return arrays

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vae.load_state_dict(state["vae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rounds_done = int(state["rounds_done"])
        if "classifier" in state:
            from .metrics import LeNet

            self.classifier = LeNet(n_classes=10).to(self.device)
            self.classifier.load_state_dict(state["classifier"])
            self.classifier_optimizer = torch.optim.Adam(self.classifier.parameters(), lr=1e-3)
            self.classifier_optimizer.load_state_dict(state["classifier_optimizer"])
        self.registry.clear()
        for cid, e in state["registry"].items():
            self.accept(int(cid), spec=e["spec"],
                        state={k: v.numpy() for k, v in e["decoder"].items()},
                        prior={k: v.numpy() for k, v in e["prior"].items()},
                        round_=int(e["round"]), metrics=dict(e["metrics"]))
