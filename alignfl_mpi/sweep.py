"""Privacy-utility sweeps: one ``alignfl-mpi run`` per (epsilon, lambda_lip) setting.

    alignfl-mpi sweep --epsilon 1 2 5 10 inf --lip 0 0.01 0.1 1 --np 6 --out runs/sweep
    alignfl-mpi sweep --config base.toml --epsilon 1 inf --lip 0 --launcher "srun"
    alignfl-mpi sweep --preset classic --epsilon 1 inf --lip 0 1

Every setting runs as its own MPI job (``LAUNCHER -n NP alignfl-mpi run ...``) into
``OUT/<dataset>_eps<e>_lip<l>/results.h5``, so each results file is named after its
settings. A finished setting is skipped and an unfinished one is resumed, so a sweep
that was interrupted continues where it stopped. ``epsilon = inf`` means no DP.

Every (epsilon, lambda_lip) pair runs: under DP the Lipschitz penalty is evaluated at public
latent points and leaves epsilon unchanged. With a strategy that shares the whole VAE
(FedAvg, FedProx, ...) the DP settings are DP-FedAvg and friends (``privacy.mode = "full"``,
the N(0, I) prior those strategies share, so ``privacy.prior = "standard"``).
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_PRESET, load_config
from .errors import ConfigError
from .results import load
from .strategies import build_strategy, strategy_class

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setting:
    """One point of the grid."""

    epsilon: float
    lip: float

    def name(self, dataset: str) -> str:
        """Folder name, e.g. ``mnist_eps2_lip0.1`` or ``mnist_epsinf_lip0``.

        >>> Setting(2.0, 0.1).name("mnist"), Setting(math.inf, 0.0).name("mnist")
        ('mnist_eps2_lip0.1', 'mnist_epsinf_lip0')
        """
        eps = "inf" if math.isinf(self.epsilon) else f"{self.epsilon:g}"
        return f"{dataset}_eps{eps}_lip{self.lip:g}"

    def overrides(self, dp_mode: str, *, whole_model: bool = False) -> list[str]:
        """The ``--set`` flags of this setting (``whole_model``: the strategy shares the
        whole VAE with an N(0, I) prior).

        >>> Setting(2.0, 0.1).overrides("full", whole_model=True)[2:]
        ['client.privacy.epsilon=2.0', 'client.privacy.prior="standard"']
        """
        out = [f"client.lipschitz.weight={self.lip!r}"]
        if math.isinf(self.epsilon):
            out.append('client.privacy.mode="none"')
        else:
            out += [f'client.privacy.mode="{dp_mode}"', f"client.privacy.epsilon={self.epsilon!r}"]
            if whole_model:  # they share N(0, I): nothing to privatise
                out.append('client.privacy.prior="standard"')
        return out


def parse_epsilon(text: str) -> float:
    """``inf``/``none``/``∞`` -> infinity, else a positive float.

    >>> parse_epsilon("inf"), parse_epsilon("2")
    (inf, 2.0)
    """
    if text.lower() in ("inf", "none", "∞"):
        return math.inf
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--epsilon {text!r} is not a number or 'inf'") from None
    if value <= 0:
        raise ConfigError(f"--epsilon must be positive, got {text}")
    return value


def grid(epsilons: list[float], lips: list[float]) -> list[Setting]:
    """All combinations, in the order given."""
    for lip in lips:
        if lip < 0:
            raise ConfigError(f"--lip must be >= 0, got {lip}")
    return [Setting(e, lip) for e in epsilons for lip in lips]


def _status(results: Path) -> str:
    if not results.exists():
        return "new"

    try:
        return "finished" if load(results).finished else "partial"
    except Exception:
        return "unreadable"


def run_sweep(*, config: str | None, epsilons: list[float], lips: list[float], np_: int,
              out: Path, launcher: str = "mpiexec", dp_mode: str | None = None,
              extra: list[str] | None = None, dry_run: bool = False,
              preset: str | None = None) -> list[Path]:
    """Run every setting of the grid; returns the results files.

    Each run's config is resolved as ``alignfl-mpi run`` resolves it: ``preset`` (default
    ``paper``), then ``config`` on top, then ``extra`` and the setting's overrides. The
    settings are checked against that config, and the runs get the same ``--preset``.

    Raises:
        ConfigError: A bad grid value, preset, base config, launcher, or a failed run.
    """
    preset = preset or DEFAULT_PRESET
    base = load_config(config, overrides=extra or [], preset=preset)
    mode = dp_mode or (base.client.privacy.mode if base.client.privacy.mode != "none" else "full")
    whole = strategy_class(base.strategy).update_kind == "model"
    if dp_mode is None and whole:
        mode = "full"  # the whole VAE is shared: only mode "full" is private
    settings = grid(epsilons, lips)
    exe = shutil.which("alignfl-mpi") or str(Path(sys.executable).parent / "alignfl-mpi")
    launch = shlex.split(launcher)
    if not dry_run and shutil.which(launch[0]) is None and not Path(launch[0]).exists():
        raise ConfigError(f"launcher {launch[0]!r} not found; pass --launcher (mpiexec, srun)")
    if Path(launch[0]).name == "srun" and "MPIR_CVAR_CH4_NETMOD" not in os.environ:
        log.warning("srun launches the runs: with an MPICH that has its own PMI client (PyPI's), "
                    "export MPIR_CVAR_CH4_NETMOD=ofi, or MPI_Init can fail now and then "
                    "(docs/SLURM.md)")
    written = []
    runnable: list[Setting] = []
    refused: dict[str, list[str]] = {}
    for s in settings:
        try:
            build_strategy(load_config(
                config, overrides=[*(extra or []), *s.overrides(mode, whole_model=whole)],
                preset=preset))
            runnable.append(s)
        except ConfigError as exc:
            refused.setdefault(str(exc), []).append(s.name(base.data.dataset))
    for reason, names in refused.items():
        log.warning("%d setting(s) skipped (%s): %s", len(names), ", ".join(names), reason)
    settings = runnable
    for i, s in enumerate(settings, 1):
        run_dir = out / s.name(base.data.dataset)
        results = run_dir / "results.h5"
        state = _status(results)
        written.append(results)
        if state == "finished":
            log.info("[%d/%d] %s: finished, skipped", i, len(settings), run_dir.name)
            continue
        cmd = [*launch, "-n", str(np_), exe, "run", "--output", str(run_dir),
               "--preset", preset]
        if config:
            cmd += ["--config", config]
        for flag in [*(extra or []), *s.overrides(mode, whole_model=whole)]:
            cmd += ["--set", flag]
        if state in ("partial", "unreadable"):
            cmd.append("--resume")
        log.info("[%d/%d] %s: %s", i, len(settings), run_dir.name, shlex.join(cmd))
        if dry_run:
            continue
        t0 = time.perf_counter()
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise ConfigError(f"sweep run {run_dir.name} failed with exit status "
                              f"{proc.returncode}; fix it and rerun the sweep to continue")
        log.info("[%d/%d] %s: done in %.0f s", i, len(settings), run_dir.name,
                 time.perf_counter() - t0)
    return written
