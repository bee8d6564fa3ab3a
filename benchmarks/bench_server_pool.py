"""Server time per round against the number of stored decoders, at a fixed pool budget.

One round of the ALIGN-FL server is ``ServerState.sample_synthetic`` (the pool, drawn
from every stored decoder) plus ``AlignFL.train_global`` (the global VAE trained on it).
With ``server.pool_size`` > 0 the pool has the same size whatever the number of
clients, so the round should cost about the same for 10, 100 or 1000 stored decoders
(the issue's goal: flat within 20%). The decoders are the paper preset's MLP decoders
with random weights and a 10-component prior, each accepted through
``ServerState.accept`` (validated and probed, as a client's update would be). Run by
hand, not in the tests:

    OMP_NUM_THREADS=1 python benchmarks/bench_server_pool.py
    OMP_NUM_THREADS=1 python benchmarks/bench_server_pool.py --decoders 10 100 1000 \
        --pool-size 5000 --epochs 1 --rounds 3 --weighting uniform

It prints, per number of decoders, the registry's memory (``registry_bytes``), the time
``accept`` took for all of them, and the median sampling, training and total time per
round over ``--rounds`` rounds (after one untimed round), as wall time and as this
process's CPU time (on a shared machine the load inflates wall times; the CPU time is
the work), each total with its ratio to the first row's. ``--pool-size 0`` shows the
old behaviour for contrast (``samples_per_client`` from every decoder).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignfl_mpi.config import POOL_WEIGHTINGS, load_config  # noqa: E402
from alignfl_mpi.models import build_decoder, model_spec  # noqa: E402
from alignfl_mpi.server import ServerState  # noqa: E402
from alignfl_mpi.strategies.align_fl import AlignFL  # noqa: E402

CPU = torch.device("cpu")


def random_prior(rng: np.random.Generator, *, components: int,
                 latent_dim: int) -> dict[str, np.ndarray]:
    """A random diagonal Gaussian mixture, as arrays (what a client sends)."""
    weights = rng.dirichlet(np.ones(components)).astype(np.float32)
    return {"weights": weights / weights.sum(),
            "means": rng.normal(0, 1.5, (components, latent_dim)).astype(np.float32),
            "log_vars": rng.normal(-1, 0.3, (components, latent_dim)).astype(np.float32)}


def fill_registry(server: ServerState, n: int, *, seed: int) -> float:
    """Accept ``n`` random paper-preset decoders; the seconds it took."""
    spec = model_spec(server.cfg.client.model)
    decoder = build_decoder(spec)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for cid in range(n):
        torch.manual_seed(seed * 100003 + cid)
        for module in decoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.reset_parameters()
        state = {k: v.detach().numpy().copy() for k, v in decoder.state_dict().items()}
        prior = random_prior(rng, components=server.cfg.client.prior_components,
                             latent_dim=spec.latent_dim)
        server.accept(cid, spec=spec.to_dict(), state=state, prior=prior,
                      round_=int(rng.integers(0, 5)),
                      metrics={"n_samples": float(rng.integers(20, 600))})
    return time.perf_counter() - start


def measure(n: int, args: argparse.Namespace) -> dict[str, float]:
    """Median sampling / training / total seconds per round (wall and CPU) for ``n``."""
    cfg = load_config(preset="paper", overrides=[
        f"server.pool_size={args.pool_size}", f'server.pool_weighting="{args.weighting}"',
        f"server.epochs={args.epochs}", f"seed={args.seed}"])
    server = ServerState(cfg, device=CPU)
    accept_s = fill_registry(server, n, seed=args.seed)
    strategy = AlignFL(cfg)
    times: dict[str, list[float]] = {k: [] for k in ("sample", "train", "total", "sample_cpu",
                                                     "train_cpu", "total_cpu")}
    pool = 0
    images, _ = server.sample_synthetic(round_=4)  # untimed: first-call costs, Adam's state
    strategy.train_global(server, images, round_=4)
    for r in range(5, 5 + args.rounds):
        w0, c0 = time.perf_counter(), time.process_time()
        images, _ = server.sample_synthetic(round_=r)
        w1, c1 = time.perf_counter(), time.process_time()
        strategy.train_global(server, images, round_=r)
        w2, c2 = time.perf_counter(), time.process_time()
        for key, value in (("sample", w1 - w0), ("train", w2 - w1), ("total", w2 - w0),
                           ("sample_cpu", c1 - c0), ("train_cpu", c2 - c1),
                           ("total_cpu", c2 - c0)):
            times[key].append(value)
        pool = len(images)
    row: dict[str, float] = {k: statistics.median(v) for k, v in times.items()}
    row.update(decoders=n, registry_bytes=server.registry_bytes(), accept_s=accept_s, pool=pool)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decoders", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--pool-size", type=int, default=5000)
    p.add_argument("--weighting", default="uniform", choices=POOL_WEIGHTINGS)
    p.add_argument("--epochs", type=int, default=1, help="server.epochs (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds timed per row (median)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(f"paper preset, server.pool_size={args.pool_size}, pool_weighting={args.weighting}, "
          f"server.epochs={args.epochs}, median of {args.rounds} rounds, "
          f"torch threads {torch.get_num_threads()}")
    print("wall: seconds on the clock; cpu: seconds of this process's CPU time (what a shared "
          "machine's load does not inflate); ratio: to the first row")
    print(f"{'decoders':>8} {'registry MB':>12} {'accept s':>9} {'pool':>6} | {'sample':>7} "
          f"{'train':>7} {'total':>7} {'ratio':>6} | {'sample':>7} {'train':>7} {'total':>7} "
          f"{'ratio':>6}")
    print(f"{'':>8} {'':>12} {'':>9} {'':>6} | {'wall s':>7} {'wall s':>7} {'wall s':>7} "
          f"{'wall':>6} | {'cpu s':>7} {'cpu s':>7} {'cpu s':>7} {'cpu':>6}")
    base: dict[str, float] = {}
    for n in args.decoders:
        row = measure(n, args)
        base = base or row
        print(f"{n:>8} {row['registry_bytes'] / 1e6:>12.1f} {row['accept_s']:>9.1f} "
              f"{int(row['pool']):>6} | {row['sample']:>7.3f} {row['train']:>7.3f} "
              f"{row['total']:>7.3f} {row['total'] / base['total']:>6.2f} | "
              f"{row['sample_cpu']:>7.3f} {row['train_cpu']:>7.3f} {row['total_cpu']:>7.3f} "
              f"{row['total_cpu'] / base['total_cpu']:>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
