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
    OMP_NUM_THREADS=1 python benchmarks/bench_server_pool.py --decoders 10 1000 --profile
    OMP_NUM_THREADS=1 python benchmarks/bench_server_pool.py --kernels
    OMP_NUM_THREADS=1 python benchmarks/bench_server_pool.py --device cuda --json pool.json

It prints, per number of decoders, the registry's memory (``registry_bytes``), the time
``accept`` took for all of them, and the median sampling, training and total time per
round over ``--rounds`` rounds (after one untimed round), as wall time and as this
process's CPU time (on a shared machine the load inflates wall times; the CPU time is
the work), each total with its ratio to the first row's. ``--pool-size 0`` shows the
old behaviour for contrast (``samples_per_client`` from every decoder). ``--profile``
adds, per row, the functions that took the most time in one more sampling round
(cProfile, own time), e.g. how much of it the batched products (``torch.bmm``) are.
``--kernels`` times those products alone, layer by layer (see :func:`kernels`).
``--device`` puts the server (its registry, pool and global VAE) on that device (default
``cpu``); on a GPU each timing waits for the device to finish (``torch.cuda.synchronize``),
and the CPU times are the host's only. ``--json`` also writes the rows to a file.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from collections.abc import Callable
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
    device = torch.device(getattr(args, "device", "cpu"))
    server = ServerState(cfg, device=device)
    accept_s = fill_registry(server, n, seed=args.seed)
    strategy = AlignFL(cfg)
    times: dict[str, list[float]] = {k: [] for k in ("sample", "train", "total", "sample_cpu",
                                                     "train_cpu", "total_cpu")}
    pool = 0
    images, _ = server.sample_synthetic(round_=4)  # untimed: first-call costs, Adam's state
    strategy.train_global(server, images, round_=4)
    for r in range(5, 5 + args.rounds):
        synchronize(device)
        w0, c0 = time.perf_counter(), time.process_time()
        images, _ = server.sample_synthetic(round_=r)
        synchronize(device)
        w1, c1 = time.perf_counter(), time.process_time()
        strategy.train_global(server, images, round_=r)
        synchronize(device)
        w2, c2 = time.perf_counter(), time.process_time()
        for key, value in (("sample", w1 - w0), ("train", w2 - w1), ("total", w2 - w0),
                           ("sample_cpu", c1 - c0), ("train_cpu", c2 - c1),
                           ("total_cpu", c2 - c0)):
            times[key].append(value)
        pool = len(images)
    row: dict[str, float] = {k: statistics.median(v) for k, v in times.items()}
    row.update(decoders=n, registry_bytes=server.registry_bytes(), accept_s=accept_s, pool=pool)
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(server.sample_synthetic, round_=5 + args.rounds)
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(8)
        print(f"--- {n} decoders: one sampling round, by own time ---")
        print("\n".join(line for line in out.getvalue().splitlines()
                        if line.strip() and not line.startswith(("   Ordered", "   List"))))
    return row


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernels() -> None:
    """Each layer's batched product of the paper MLP decoder for a 5000-image pool.

    The same 5000 images, so the same multiply-adds, as 1000 decoders x 5 rows (what the
    bank computes at 1000 clients: ``W @ x^T``) and as 10 decoders x 500 rows (10
    clients: ``x @ W^T``), beside one streaming read of the 1000 decoders' weights (a sum):
    the bound that memory traffic alone would set. Best of 3, CPU seconds.
    """
    spec = model_spec(load_config(preset="paper").client.model)
    widths = [spec.decoder_input_dim, *reversed(spec.hidden), 784]
    print(f"{'layer':>10} | {'read s':>7} | {'1000 x 5 s':>10} {'GMAC/s':>7} | "
          f"{'10 x 500 s':>10} {'GMAC/s':>7}")
    total = {"read": 0.0, "small": 0.0, "large": 0.0}
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        times = layer_times(n_in, n_out)
        macs = 5000 * n_in * n_out / 1e9
        for key, value in times.items():
            total[key] += value
        print(f"{f'{n_in}->{n_out}':>10} | {times['read']:>7.3f} | {times['small']:>10.3f} "
              f"{macs / times['small']:>7.1f} | {times['large']:>10.3f} "
              f"{macs / times['large']:>7.1f}", flush=True)
    print(f"{'all':>10} | {total['read']:>7.3f} | {total['small']:>10.3f} {'':>7} | "
          f"{total['large']:>10.3f}")


def layer_times(n_in: int, n_out: int) -> dict[str, float]:
    """CPU seconds of one layer: read 1000 weights, 1000 x 5 rows, 10 x 500 rows."""
    weights = torch.randn(1000, n_out, n_in)
    x_small, x_large = torch.randn(1000, 5, n_in), torch.randn(10, 500, n_in)
    return {"read": best_cpu(lambda: weights.sum()),
            "small": best_cpu(lambda: torch.bmm(weights, x_small.mT)),
            "large": best_cpu(lambda: torch.bmm(x_large, weights[:10].mT))}


def best_cpu(fn: Callable[[], object], repeat: int = 3) -> float:
    """Least CPU time of ``repeat`` calls (after one untimed call)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decoders", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--pool-size", type=int, default=5000)
    p.add_argument("--weighting", default="uniform", choices=POOL_WEIGHTINGS)
    p.add_argument("--epochs", type=int, default=1, help="server.epochs (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds timed per row (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="print a cProfile of one more sampling round per row")
    p.add_argument("--kernels", action="store_true",
                   help="time the decoder's batched products alone (see kernels()), then stop")
    p.add_argument("--device", default="cpu",
                   help="the server's device: cpu (default), cuda or cuda:N")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r}: not a device; use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.kernels:
        kernels()
        return 0
    print(f"paper preset, server.pool_size={args.pool_size}, pool_weighting={args.weighting}, "
          f"server.epochs={args.epochs}, median of {args.rounds} rounds, "
          f"torch threads {torch.get_num_threads()}"
          + ("" if device.type == "cpu" else f", device {device}"))
    print("wall: seconds on the clock; cpu: seconds of this process's CPU time (what a shared "
          "machine's load does not inflate); ratio: to the first row")
    print(f"{'decoders':>8} {'registry MB':>12} {'accept s':>9} {'pool':>6} | {'sample':>7} "
          f"{'train':>7} {'total':>7} {'ratio':>6} | {'sample':>7} {'train':>7} {'total':>7} "
          f"{'ratio':>6}")
    print(f"{'':>8} {'':>12} {'':>9} {'':>6} | {'wall s':>7} {'wall s':>7} {'wall s':>7} "
          f"{'wall':>6} | {'cpu s':>7} {'cpu s':>7} {'cpu s':>7} {'cpu':>6}")
    base: dict[str, float] = {}
    rows = []
    for n in args.decoders:
        row = measure(n, args)
        rows.append(row)
        base = base or row
        print(f"{n:>8} {row['registry_bytes'] / 1e6:>12.1f} {row['accept_s']:>9.1f} "
              f"{int(row['pool']):>6} | {row['sample']:>7.3f} {row['train']:>7.3f} "
              f"{row['total']:>7.3f} {row['total'] / base['total']:>6.2f} | "
              f"{row['sample_cpu']:>7.3f} {row['train_cpu']:>7.3f} {row['total_cpu']:>7.3f} "
              f"{row['total_cpu'] / base['total_cpu']:>6.2f}", flush=True)
        if args.json:  # after every row, so a run stopped early still leaves its rows
            args.json.write_text(json.dumps(
                {"device": str(device), "pool_size": args.pool_size,
                 "weighting": args.weighting, "epochs": args.epochs, "rounds": args.rounds,
                 "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
