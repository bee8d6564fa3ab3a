"""Run configuration: frozen, keyword-only dataclasses loaded strictly from TOML or YAML.

Every field is documented in its class docstring and in the README's config reference.
Unknown keys and wrong types are errors that name the key. CLI ``--set a.b=value`` flags
override the file; the resolved config is stored with the results.

Example file (TOML)::

    rounds = 3
    [client]
    local_epochs = 2
    [[clients]]            # per-client overrides, one table per client (optional)
    model = {arch = "conv", latent_dim = 4}
    [server]
    epochs = 5
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .models import build_vae, model_spec


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A VAE from the model zoo.

    Attributes:
        arch: Registry name: ``mlp`` (the paper's) or ``conv``.
        latent_dim: Latent dimension (the paper uses 2).
        hidden: Layer widths (mlp) or channels (conv); empty for the architecture default.
        spectral_norm: Spectrally normalise the decoder's layers.
        conditional: A conditional VAE: the decoder takes the class label (11 classes:
            the 10 digits and the outlier label 10), and the client shares its label
            distribution so the server can draw labelled samples.
    """

    arch: str = "mlp"
    latent_dim: int = 2
    hidden: tuple[int, ...] = ()
    spectral_norm: bool = False
    conditional: bool = False


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which partition the clients train on.

    Attributes:
        partition: Partition HDF5 file. Empty: ``DATA_ROOT/partitions/<settings>.h5``,
            created from the fields below when it does not exist yet.
        data_root: Data root for datasets and default partitions (empty: ``--data-root``,
            ``$ALIGNFL_DATA_ROOT`` or ``./data``).
        dataset: In-domain dataset (``mnist`` or ``fashion-mnist``).
        scheme: ``class-pairs``, ``dirichlet`` or ``iid``.
        scheme_params: Scheme parameters, e.g. ``{per_class = 6000}`` or ``{alpha = 0.5}``.
        outliers: Cross-domain outlier images placed on ``outlier_client``.
        outlier_dataset: Outlier domain (empty: the other dataset).
        outlier_client: Client that receives the outliers.
        partition_seed: Seed of the partition.
    """

    partition: str = ""
    data_root: str = ""
    dataset: str = "mnist"
    scheme: str = "class-pairs"
    scheme_params: dict[str, Any] = field(default_factory=dict)
    outliers: int = 600
    outlier_dataset: str = ""
    outlier_client: int = 0
    partition_seed: int = 0


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """DP-SGD on the client (Opacus).

    Attributes:
        mode: ``none``, ``decoder`` (only the decoder is privatised) or ``full`` (the VAE).
        epsilon: Target epsilon for the whole run (all rounds x local epochs x steps).
        delta: Target delta.
        clipping: ``adaptive`` (quantile clipping of Andrew et al. 2019, accounted),
            ``median`` (the reference code's rule: bound = median per-sample norm of the
            batch; NOT covered by the accountant) or ``flat`` (fixed ``max_grad_norm``).
        max_grad_norm: Fixed clip bound (flat) or initial bound (adaptive).
        target_quantile: Adaptive clipping: quantile of norms the bound tracks.
        clipbound_lr: Adaptive clipping: geometric learning rate of the bound.
        count_noise_multiplier: Adaptive clipping: noise multiplier of the clipped count.
        accountant: ``rdp`` (default) or ``prv``; the other is reported as a cross-check.
        prior: In DP modes, ``dp`` (noisy sufficient statistics, budget share
            ``prior_epsilon_fraction``) or ``standard`` (data-independent N(0, I)).
        prior_epsilon_fraction: With ``prior = "dp"``: the prior's share of epsilon in the
            additive split, which fixes the ratio of the prior's noise to DP-SGD's; both
            are then scaled by one factor until the jointly composed epsilon meets the target.
    """

    mode: str = "none"
    epsilon: float = 10.0
    delta: float = 1e-5
    clipping: str = "adaptive"
    max_grad_norm: float = 1.0
    target_quantile: float = 0.5
    clipbound_lr: float = 0.2
    count_noise_multiplier: float = 10.0
    accountant: str = "rdp"
    prior: str = "dp"
    prior_epsilon_fraction: float = 0.1


@dataclass(frozen=True, kw_only=True)
class LipschitzConfig:
    """Lipschitz regularisation of the client's decoder.

    Attributes:
        weight: lambda_lip, the weight of the gradient penalty (0 disables it).
        form: ``two-sided``: (||grad_z D(z)|| - 1)^2 as in the reference code, or
            ``hinge``: max(0, ||grad_z D(z)|| - target)^2.
        target: The hinge's Lipschitz target K.
        grad_norm_mode: What the penalty's gradient norm is: ``sum`` (the reference code:
            the gradient of the summed output, ||J^T 1||), ``random`` (||J v|| for a random
            unit v) or ``spectral`` (the exact ||J||_2 via latent_dim Jacobian-vector products).
    """

    weight: float = 0.0
    form: str = "two-sided"
    target: float = 1.0
    grad_norm_mode: str = "sum"


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """One client's model and local training.

    Attributes:
        model: The client's VAE (clients may differ).
        device: ``auto`` (``cuda:{local_rank % n_gpus}`` if CUDA is present, else ``cpu``),
            ``cpu``, ``cuda`` or ``cuda:N``.
        private_dir: The client's private folder: its checkpoints (encoder, optimizer,
            privacy accountant and the secret seed of its DP noise). Never under
            ``output.dir``, created 0700; empty means node-local
            ``$ALIGNFL_PRIVATE_DIR`` or ``$TMPDIR/alignfl-private-<uid>`` (see docs/PRIVACY.md).
        local_epochs: Local epochs per round (the paper uses 10).
        batch_size: Local batch size.
        lr: Adam learning rate.
        kl_weight: Weight of the KL term (lambda_kl), on the KL summed over the latent
            dims. The reference code's lambda_kl = 0.1 on the KL averaged over the dims
            is ``kl_weight = 0.1 / latent_dim`` here (the ``paper`` preset).
        prior_components: Components of the shared diagonal Gaussian-mixture prior.
        prior_fit_on: What the prior is fitted on (without DP): ``z``, reparameterised
            latent samples mu + sigma * eps collected at every training step of the
            round (the reference code; the ``paper`` preset), or ``mu``, the final
            encoder's means of the client's data. In DP modes the prior is always the
            DP fit on clipped latent means (``privacy.prior``); this key is not used.
        prior_fitter: How the prior's GMM is fitted (without DP): ``sklearn``, scikit-learn's
            ``GaussianMixture(covariance_type="diag", random_state=42)`` as in the
            reference code (the ``paper`` preset), or ``em``, alignfl_mpi's own EM
            (k-means++ seeding from the round's seed, variance floor 1e-4).
        fresh_optimizer: Start every round with a new Adam (zero moment estimates), as the
            reference code does (the ``paper`` preset); false keeps the optimizer's state
            from round to round.
        privacy: DP-SGD settings.
        lipschitz: Decoder Lipschitz regularisation.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    device: str = "auto"
    private_dir: str = ""
    local_epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    kl_weight: float = 1.0
    prior_components: int = 10
    prior_fit_on: str = "mu"
    prior_fitter: str = "em"
    fresh_optimizer: bool = False
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    lipschitz: LipschitzConfig = field(default_factory=LipschitzConfig)


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """The stateful server.

    Attributes:
        model: The global VAE trained on synthetic data.
        device: As for clients; ``auto`` puts the server on ``cuda:0`` when present.
        samples_per_client: Synthetic images drawn from each client's decoder per round
            (when ``pool_size`` is 0).
        pool_size: The synthetic pool's total size per round, split over the stored
            decoders by ``pool_weighting`` (0: ``samples_per_client`` from each), so that
            the server's cost per round does not grow with the number of clients.
        pipeline: Send round r+1's TRAIN as soon as round r's updates are in, so that the
            clients train while the server samples, trains and evaluates round r (strategies
            whose clients start from the global model keep the barrier). The results are
            the same as without it; the round time approaches max(client, server) time.
        pool_weighting: How ``pool_size`` is split over the stored decoders: ``uniform``,
            ``samples`` (by each client's sample count) or ``recency`` (by 1 / (1 + age),
            the age in rounds of the stored decoder).
        epochs: Server epochs per round on the pooled synthetic data.
        batch_size: Server batch size.
        lr: Adam learning rate of the global VAE.
        kl_weight: KL weight of the global VAE (on the KL summed over the latent dims;
            the reference's 0.1 on the averaged KL is ``0.1 / latent_dim``).
        fresh_optimizer: Train the global VAE with a new Adam every round, as the
            reference code does (the ``paper`` preset); false keeps its state.
        round_deadline_s: Seconds to wait for client updates each round; 0 waits for all.
            A client that misses it is a straggler and its stored decoder is used.
        max_message_mb: Largest accepted message; larger ones are rejected.
        final_drain_s: At the end, seconds to wait for stragglers' late messages.
        start_timeout_s: Seconds to wait for every client's set-up (READY) before round 0.
        stop_timeout_s: At the very end, seconds to wait for every client's answer to STOP;
            ranks that have not answered by then are aborted (the results are complete).
        classifier_epochs: Train a digit classifier (LeNet) on the labelled synthetic pool
            for this many epochs every round and report ``task_accuracy`` on the real test
            set (0: off; needs conditional client decoders).
        quality_metrics: Every round, FID-LeNet, precision/recall, density/coverage and
            class coverage of the global VAE's samples and of the synthetic pool, in the
            feature space of a LeNet trained on the real training set (cached under
            ``DATA_ROOT/feature_nets/``; skipped when the dataset is not in the data root).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    device: str = "auto"
    samples_per_client: int = 1000
    pool_size: int = 0
    pool_weighting: str = "uniform"
    pipeline: bool = False
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    kl_weight: float = 1.0
    fresh_optimizer: bool = False
    round_deadline_s: float = 0.0
    max_message_mb: float = 64.0
    final_drain_s: float = 60.0
    start_timeout_s: float = 600.0
    stop_timeout_s: float = 30.0
    quality_metrics: bool = True
    classifier_epochs: int = 0


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """Where results go (written by rank 0 only).

    Attributes:
        dir: Run directory: ``results.h5``, ``checkpoints/`` and ``png/``.
        save_synthetic: Store each round's synthetic dataset (gzip) in the results.
        png: Write PNG sample grids every round.
        checkpoint: Checkpoint every round (needed for ``--resume``).
        progress_interval_s: Rank 0's live progress line: on a terminal it is redrawn in
            place; otherwise (a SLURM output file) a plain line is logged this often.
    """

    dir: str = "runs/alignfl"
    save_synthetic: bool = False
    png: bool = True
    checkpoint: bool = True
    progress_interval_s: float = 30.0


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A whole run.

    Attributes:
        seed: Seed of models, sampling and shuffling.
        strategy: A registered strategy (:data:`alignfl_mpi.strategies.STRATEGIES`):
            ``align-fl`` (share decoders, the server trains on synthetic data) or a
            baseline that shares the whole VAE and averages (``fedavg``, ``fedprox``, ...).
        strategy_options: The strategy's own options (e.g. FedProx's ``mu``); each
            strategy names the ones it takes and refuses any other.
        rounds: Federated rounds.
        n_clients: Number of clients (any number >= 1); they are placed on the client ranks
            (ranks 1..N), balanced by sample count, and a rank trains its clients one after
            another.
        clients_per_round: The clients asked each round, sampled from (seed, round): a
            fraction in (0, 1] of ``n_clients`` (1: all), or a whole count > 1.
        rank_memory_mb: Memory budget of one client rank for its clients' state (VAE,
            optimizer, privacy and strategy state), in MB; above it the least recently
            trained clients' states spill to their private folders and are read back when
            they are asked again (0: no limit, everything stays in memory).
        data: The partition.
        client: Defaults for every client.
        clients: Per-client overrides (tables with any ``client`` keys), one per client.
        server: The server.
        output: The results.
    """

    seed: int = 0
    strategy: str = "align-fl"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    rounds: int = 5
    n_clients: int = 5
    clients_per_round: float = 1.0
    rank_memory_mb: float = 0.0
    data: DataConfig = field(default_factory=DataConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    clients: tuple[dict[str, Any], ...] = ()
    server: ServerConfig = field(default_factory=ServerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def client_config(self, client_id: int) -> ClientConfig:
        """The resolved config of one client: ``client`` with its override applied."""
        base = to_dict(self.client)
        if self.clients:
            override = self.clients[client_id]
            model = override.get("model")
            if isinstance(model, dict) and model.get("arch", base["model"]["arch"]) != \
                    base["model"]["arch"] and "hidden" not in model:
                base["model"]["hidden"] = []  # another architecture: its own default widths
            base = _merge(base, override)
        return from_dict(ClientConfig, base, where=f"clients[{client_id}]")


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {where!r} must be a table, got {value!r}")
        return from_dict(tp, value, where=where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {where!r} must be a list, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {where!r} must be a table, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"config key {where!r} must be {_type_name(tp)}, "
                              f"got {type(value).__name__} {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], *, where: str = "") -> Any:
    """Build a config dataclass from a dict, refusing unknown keys and wrong types.

    >>> from_dict(ModelConfig, {"arch": "conv", "latent_dim": 4}).latent_dim
    4
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {name!r}{hint}; valid keys here: "
                              f"{', '.join(fields)}")
        kwargs[key] = _convert(value, hints[key], name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """A JSON-safe dict of a config (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def to_json(cfg: Any) -> str:
    """The config as sorted JSON (stored with the results)."""
    return json.dumps(to_dict(cfg), sort_keys=True)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r}; use .toml or .yaml")
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: invalid syntax: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # yaml.YAMLError has no common base we can name without yaml
        if type(exc).__module__.startswith("yaml"):
            raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
        raise
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of keys")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value``; the value is read as TOML, else taken as a string.

    >>> parse_override("server.epochs=3")
    (['server', 'epochs'], 3)
    >>> parse_override("client.device=cpu")
    (['client', 'device'], 'cpu')
    """
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set rounds=3")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set a dotted key in a nested dict; numeric parts index the ``clients`` list."""
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[int(part)]
            continue
        if path[i + 1].isdigit():
            node = node.setdefault(part, [])
            idx = int(path[i + 1])
            while len(node) <= idx:
                node.append({})
            continue
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a table")
    if isinstance(node, list):
        node[int(path[-1])] = value
    else:
        node[path[-1]] = value


PRESET_DIR = Path(__file__).resolve().parent / "configs"
"""The shipped presets (``alignfl_mpi/configs/NAME.toml``, package data; ``configs/`` in
the repository points here)."""

DEFAULT_PRESET = "paper"
"""The preset ``alignfl-mpi run`` starts from when ``--preset`` is not given."""

PRIOR_FIT_ON = ("z", "mu")
PRIOR_FITTERS = ("em", "sklearn")


def available_presets() -> list[str]:
    """Names of the shipped presets, sorted.

    >>> "paper" in available_presets()
    True
    """
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    """The file of a shipped preset.

    Raises:
        ConfigError: Unknown name; the message lists the available presets.
    """
    names = available_presets()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; available presets: "
                          f"{', '.join(names)} (or pass a file with --config)")
    return PRESET_DIR / f"{name}.toml"


def load_config(path: str | os.PathLike | None = None, *,
                overrides: list[str] | tuple[str, ...] = (),
                preset: str | None = None) -> RunConfig:
    """Load a config: a preset, then a config file on top, then overrides; validate.

    Without ``preset`` the base is the built-in defaults of the dataclasses (the
    ``classic`` preset); ``alignfl-mpi run`` passes ``preset="paper"`` unless told otherwise.

    Raises:
        ConfigError: The preset, file, a key, a type or a value is invalid.
    """
    data = read_config_file(preset_path(preset)) if preset else {}
    if path:
        data = _merge(data, read_config_file(path))
    for text in overrides:
        key_path, value = parse_override(text)
        apply_override(data, key_path, value)
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    check_prior_fit(cfg)
    return cfg


def check_prior_fit(cfg: RunConfig) -> None:
    """Refuse an unknown ``prior_fit_on`` or ``prior_fitter`` (client defaults and
    per-client overrides)."""
    for k in range(cfg.n_clients):
        where = f"clients[{k}]" if cfg.clients else "client"
        _check_choice(f"{where}.prior_fit_on", cfg.client_config(k).prior_fit_on,
                      PRIOR_FIT_ON)
        _check_choice(f"{where}.prior_fitter", cfg.client_config(k).prior_fitter,
                      PRIOR_FITTERS)


def _positive(where: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"config key {where!r} must be {'>= 0' if allow_zero else '> 0'}, "
                          f"got {value}")


def validate(cfg: RunConfig) -> None:
    """Value checks that types alone cannot express."""
    _positive("rounds", cfg.rounds)
    if not isinstance(cfg.strategy, str) or not cfg.strategy:
        raise ConfigError("config key 'strategy' must name a strategy, e.g. \"align-fl\"")
    for key, value in cfg.strategy_options.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"config key 'strategy_options.{key}' must be a finite number or "
                              f"a string, got {value!r}")
    _positive("n_clients", cfg.n_clients)
    _positive("rank_memory_mb", cfg.rank_memory_mb, allow_zero=True)
    cpr = cfg.clients_per_round
    if not (math.isfinite(cpr) and cpr > 0 and (cpr <= 1 or float(cpr).is_integer())):
        raise ConfigError(f"config key 'clients_per_round' must be a fraction in (0, 1] or a "
                          f"whole count > 1, got {cpr}")
    if cpr > cfg.n_clients:
        raise ConfigError(f"clients_per_round = {cpr:g} is more than n_clients = "
                          f"{cfg.n_clients}; lower it or use a fraction")
    if cfg.clients and len(cfg.clients) != cfg.n_clients:
        raise ConfigError(f"config has {len(cfg.clients)} [[clients]] tables but n_clients = "
                          f"{cfg.n_clients}; give one table per client or none")
    for k in range(cfg.n_clients):
        c = cfg.client_config(k)
        where = f"clients[{k}]" if cfg.clients else "client"
        for name in ("local_epochs", "batch_size", "prior_components"):
            _positive(f"{where}.{name}", getattr(c, name))
        _positive(f"{where}.lr", c.lr)
        _positive(f"{where}.kl_weight", c.kl_weight, allow_zero=True)
        _check_device(f"{where}.device", c.device)
        _check_private_dir(f"{where}.private_dir", c.private_dir, cfg.output.dir)
        _check_choice(f"{where}.lipschitz.form", c.lipschitz.form, ("two-sided", "hinge"))
        _check_choice(f"{where}.lipschitz.grad_norm_mode", c.lipschitz.grad_norm_mode,
                      ("sum", "random", "spectral"))
        _positive(f"{where}.lipschitz.weight", c.lipschitz.weight, allow_zero=True)
        _positive(f"{where}.lipschitz.target", c.lipschitz.target)
        _check_model(f"{where}.model", c.model)
        if c.model.conditional and (c.privacy.mode != "none" or c.lipschitz.weight > 0):
            raise ConfigError(f"{where}.model.conditional cannot be combined with DP or "
                              "lipschitz.weight > 0 (the label distribution and the "
                              "conditional penalty are not privatised); use a plain VAE")
    s = cfg.server
    for name in ("samples_per_client", "epochs", "batch_size"):
        _positive(f"server.{name}", getattr(s, name))
    _positive("server.pool_size", s.pool_size, allow_zero=True)
    _check_choice("server.pool_weighting", s.pool_weighting, POOL_WEIGHTINGS)
    _positive("server.lr", s.lr)
    _positive("server.round_deadline_s", s.round_deadline_s, allow_zero=True)
    _positive("server.max_message_mb", s.max_message_mb)
    _positive("server.final_drain_s", s.final_drain_s, allow_zero=True)
    _positive("server.start_timeout_s", s.start_timeout_s)
    _positive("server.stop_timeout_s", s.stop_timeout_s)
    _positive("output.progress_interval_s", cfg.output.progress_interval_s)
    _check_device("server.device", s.device)
    _check_model("server.model", s.model)
    if not 0 <= cfg.data.outlier_client < cfg.n_clients:
        raise ConfigError(f"data.outlier_client {cfg.data.outlier_client} is out of range "
                          f"0..{cfg.n_clients - 1}")


def _check_private_dir(where: str, private_dir: str, output_dir: str) -> None:
    """A client's private folder must not lie inside the run folder (rank 0 reads that)."""
    if not private_dir:
        return
    private, out = Path(private_dir).resolve(), Path(output_dir).resolve()
    if private == out or out in private.parents:
        raise ConfigError(f"config key {where!r}: {private_dir} is inside output.dir "
                          f"{output_dir}, which the server reads; choose a folder outside it")


POOL_WEIGHTINGS = ("uniform", "samples", "recency")
"""How ``server.pool_size`` is split over the stored decoders."""


def participants_per_round(cfg: RunConfig) -> int:
    """How many clients are asked each round (``clients_per_round`` resolved).

    >>> participants_per_round(RunConfig(n_clients=10, clients_per_round=0.25))
    3
    >>> participants_per_round(RunConfig(n_clients=10, clients_per_round=4))
    4
    """
    cpr = cfg.clients_per_round
    if cpr <= 1:
        return max(1, min(cfg.n_clients, int(math.floor(cpr * cfg.n_clients + 0.5))))
    return int(cpr)


MESSAGE_OVERHEAD_BYTES = 64 * 2**10
"""Room for a message's header (names, spec, metrics) on top of its tensor bytes."""


def largest_message_bytes(cfg: RunConfig, *, whole_model: bool) -> tuple[int, str]:
    """Upper bound on the largest message the configured run sends, and what it is.

    With ``whole_model=False`` (ALIGN-FL) clients send their decoder and prior; with
    ``True`` (the averaging strategies) the whole VAE travels both ways. Shapes come from
    the model zoo on the ``meta`` device (nothing built).
    """

    def vae_bytes(model: ModelConfig, *, whole: bool) -> int:
        with torch.device("meta"):
            vae = build_vae(model_spec(model))
        module = vae if whole else vae.decoder
        return sum(t.numel() * t.element_size() for t in module.state_dict().values())

    whole = whole_model
    best, what = 0, ""
    for k in range(cfg.n_clients):
        c = cfg.client_config(k)
        prior = 4 * c.prior_components * (2 * c.model.latent_dim + 1) + 8 * 16
        size = vae_bytes(c.model, whole=whole) + prior + MESSAGE_OVERHEAD_BYTES
        if size > best:
            best, what = size, f"client {k}'s {'model' if whole else 'decoder update'}"
    if whole:
        size = vae_bytes(cfg.server.model, whole=True) + MESSAGE_OVERHEAD_BYTES
        if size > best:
            best, what = size, "the global model"
    return best, what


def check_message_limit(cfg: RunConfig, *, whole_model: bool) -> None:
    """Refuse a ``server.max_message_mb`` smaller than a message the run must send.

    Raises:
        ConfigError: One line with the size needed.
    """
    need, what = largest_message_bytes(cfg, whole_model=whole_model)
    limit = cfg.server.max_message_mb * 2**20
    if need > limit:
        raise ConfigError(f"server.max_message_mb = {cfg.server.max_message_mb:g} is smaller "
                          f"than {what} (up to {need / 2**20:.2f} MB); set "
                          f"server.max_message_mb >= {math.ceil(need / 2**20 * 100) / 100:g}")


def _check_choice(where: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"config key {where!r}: unknown value {value!r}; choose one of: "
                          f"{', '.join(choices)}")


def _check_model(where: str, model: ModelConfig) -> None:
    """Build the model-zoo spec now, so a bad model fails at start on every rank."""
    try:
        model_spec(model)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {str(exc).removeprefix('model.')}") from None


def _check_device(where: str, device: str) -> None:
    if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:")
                                             and device[5:].isdigit()):
        return
    raise ConfigError(f"config key {where!r}: unknown device {device!r}; use auto, cpu, "
                      "cuda or cuda:N")
