"""Benchmark: one plain epoch vs one DP epoch (adaptive clipping) of the paper's MLP VAE.

The DP epoch is :class:`alignfl_mpi.privacy.PrivateTrainer` (Poisson batches, ghost norms +
book-keeping clipped sums, adaptive clip bound, Gaussian noise, Adam). The plain epoch is
:func:`alignfl_mpi.client.train_vae`. Both start from the same weights; one warm-up epoch
each, then ``--repeats`` timed epochs of each, interleaved; the medians are compared, in
wall-clock time and in this process's CPU time (steadier on a shared machine).

With ``--lip W`` (default 1.0; 0 skips it) the DP epoch with the Lipschitz penalty is timed
as well: the penalty at ``batch_size`` points drawn from N(0, I), its gradient added after
the noise (``PrivateTrainer(regulariser=...)``), as a private client with
``lipschitz.weight > 0`` runs it. For reference the plain epoch with the plain route's
penalty (interpolated posterior means) is timed too. Targets: DP <= 2x plain, DP with the
penalty <= 3x plain.

Launch (CPU, as in docs/PRIVACY.md)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_dp_epoch.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dp_epoch.py --lip 1.0
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_dp_epoch.py --data P.h5 --client 0
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_dp_epoch.py --compare

``--compare`` also times the alternatives considered (flat clipping, fixed batches; same
noise): Opacus ghost clipping (two backward passes), Opacus per-sample hooks, and
``torch.func.vmap`` over the whole VAE.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignfl_mpi.arrays import images_to_tensor  # noqa: E402
from alignfl_mpi.client import LocalState, penalty_term, train_vae  # noqa: E402
from alignfl_mpi.config import ClientConfig, LipschitzConfig, PrivacyConfig  # noqa: E402
from alignfl_mpi.lipschitz import make_latent_penalty, make_penalty  # noqa: E402
from alignfl_mpi.models import ModelSpec, build_vae  # noqa: E402
from alignfl_mpi.prior import standard_normal_prior  # noqa: E402
from alignfl_mpi.privacy import (  # noqa: E402
    PrivateTrainer,
    make_clip_rule,
    per_sample_vae_loss,
    plan_privacy,
)

TARGET_RATIO = 2.0
PENALTY_TARGET_RATIO = 3.0


def load_images(args: argparse.Namespace) -> torch.Tensor:
    """``--n`` random images, or client ``--client`` of the partition ``--data``."""
    if args.data:
        from alignfl_mpi.schema import read_client

        return images_to_tensor(read_client(args.data, args.client).images)
    gen = torch.Generator().manual_seed(0)
    return torch.rand(args.n, 1, 28, 28, generator=gen)


def fresh_vae(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_vae(ModelSpec(arch="mlp"))


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)`` of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    times = [timed(fn)[0] for _ in range(repeats)]
    return statistics.median(times), times


def synchronised(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    if device.type != "cuda":
        return fn

    def run() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def plain_epoch_fn(data: torch.Tensor, batch_size: int, device: torch.device,
                   lip: float = 0.0) -> Callable[[], object]:
    vae = fresh_vae().to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    penalty = (make_penalty(LipschitzConfig(weight=lip), generator=torch.Generator().manual_seed(4))
               if lip > 0 else None)
    state = LocalState(client_id=0, cfg=ClientConfig(local_epochs=1, batch_size=batch_size,
                                                     kl_weight=1.0),
                       vae=vae, optimizer=opt, device=device)
    term = None if penalty is None else penalty_term(penalty)
    return synchronised(lambda: train_vae(state, data, generator=gen, terms=(term,)), device)


def dp_epoch_fn(data: torch.Tensor, batch_size: int, mode: str, clipping: str,
                device: torch.device, lip: float = 0.0) -> tuple[Callable[[], object], str]:
    cfg = PrivacyConfig(mode=mode, clipping=clipping, prior="standard")
    plan = plan_privacy(cfg, n_samples=len(data), batch_size=batch_size, local_epochs=10,
                        total_rounds=5)
    vae = fresh_vae().to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    penalty = None
    if lip > 0:
        penalty = make_latent_penalty(LipschitzConfig(weight=lip),
                                      prior=standard_normal_prior(2), n_points=batch_size,
                                      generator=torch.Generator().manual_seed(4))
    trainer = PrivateTrainer(vae, opt, mode=mode, plan=plan, rule=make_clip_rule(cfg),
                             kl_weight=1.0, device=device, seed=2, regulariser=penalty)
    info = (f"sigma={plan.noise_multiplier:.4f} (grad noise {trainer.grad_noise_multiplier:.4f}),"
            f" q={plan.sample_rate:.5f}, {plan.steps_per_epoch} steps/epoch")
    return synchronised(lambda: trainer.train(data, epochs=1), device), info


def _batches(data: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(3))
    return [data[order[i:i + batch_size]] for i in range(0, len(data), batch_size)]


def opacus_epoch_fn(data: torch.Tensor, batch_size: int, ghost: bool) -> Callable[[], object]:
    """Opacus: ghost clipping (two backward passes) or per-sample hooks, flat clipping."""
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    vae = fresh_vae()
    adam = torch.optim.Adam(vae.parameters(), lr=1e-3)
    kw = dict(noise_multiplier=0.76, max_grad_norm=1.0, expected_batch_size=batch_size)
    if ghost:
        model = GradSampleModuleFastGradientClipping(vae, max_grad_norm=1.0,
                                                     use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(adam, **kw)
    else:
        model = GradSampleModule(vae)
        opt = DPOptimizer(adam, **kw)

    def epoch() -> None:
        for x in _batches(data, batch_size):
            recon, mu, logvar = model(x)
            losses = per_sample_vae_loss(recon, x, mu, logvar, kl_weight=1.0)[0]
            if ghost:
                DPTensorFastGradientClipping(model, opt, losses, "mean").backward()
            else:
                losses.mean().backward()
            opt.step()
            opt.zero_grad()

    return epoch


def vmap_epoch_fn(data: torch.Tensor, batch_size: int) -> Callable[[], object]:
    """torch.func: per-sample gradients of the whole VAE materialised, then clip + noise."""
    from torch.func import functional_call, grad, vmap

    vae = fresh_vae()
    adam = torch.optim.Adam(vae.parameters(), lr=1e-3)
    params = dict(vae.named_parameters())

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        recon, mu, logvar = functional_call(vae, p, (x.unsqueeze(0),))
        return per_sample_vae_loss(recon, x.unsqueeze(0), mu, logvar, kl_weight=1.0)[0].sum()

    per_sample = vmap(grad(loss_one), in_dims=(None, 0), randomness="different")

    def epoch() -> None:
        for x in _batches(data, batch_size):
            detached = {k: v.detach() for k, v in params.items()}
            grads = per_sample(detached, x)
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
            factors = (1.0 / (norms + 1e-6)).clamp(max=1.0)
            for name, p in params.items():
                g = torch.einsum("b,b...->...", factors, grads[name])
                p.grad = (g + 0.76 * torch.randn_like(g)) / batch_size
            adam.step()

    return epoch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="partition HDF5 (default: random images)")
    parser.add_argument("--client", type=int, default=0, help="client group of --data")
    parser.add_argument("--n", type=int, default=12000, help="random images (no --data)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--mode", default="full", choices=("full", "decoder"))
    parser.add_argument("--clipping", default="adaptive", choices=("adaptive", "flat"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lip", type=float, default=1.0,
                        help="lipschitz.weight of the penalty case (0: skip it)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--compare", action="store_true",
                        help="also time Opacus ghost/hooks and torch.func vmap routes")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    device = torch.device(args.device)

    torch.manual_seed(0)
    data = load_images(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"device {device}; {len(data)} images, batch {args.batch_size}, MLP VAE "
          f"{sum(p.numel() for p in fresh_vae().parameters())} parameters")
    runs = {"plain": plain_epoch_fn(data, args.batch_size, device)}
    runs["DP"], info = dp_epoch_fn(data, args.batch_size, args.mode, args.clipping, device)
    if args.lip > 0:
        runs["DP+penalty"], _ = dp_epoch_fn(data, args.batch_size, args.mode, args.clipping,
                                            device, lip=args.lip)
        runs["plain+penalty"] = plain_epoch_fn(data, args.batch_size, device, lip=args.lip)
    print(f"DP route: mode={args.mode}, clipping={args.clipping}, {info}"
          + (f"; penalty weight {args.lip} (grad_norm_mode sum)" if args.lip > 0 else ""))
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so a busy machine slows all alike
        for name, fn in runs.items():
            times[name].append(timed(fn))
    checks = [("DP", "plain", TARGET_RATIO), ("DP+penalty", "plain", PENALTY_TARGET_RATIO),
              ("DP+penalty", "plain+penalty", None)]
    for label, index in (("wall", 0), ("CPU", 1)):
        med = {name: statistics.median(t[index] for t in ts) for name, ts in times.items()}
        print(f"[{label} time] " + ", ".join(
            f"{name} epoch: {med[name]:.3f} s {[round(t[index], 3) for t in times[name]]}"
            for name in runs))
        for num, den, target in checks:
            if num not in med:
                continue
            ratio = med[num] / med[den]
            verdict = "" if target is None else (
                f" -> {'meets' if ratio <= target else 'MISSES'} the <= {target}x target")
            print(f"[{label} time] ratio {num}/{den}: {ratio:.2f}x{verdict}")
    t_plain = statistics.median(t[0] for t in times["plain"])
    if args.compare and device.type != "cpu":
        print("--compare runs on the CPU only; skipped")
    elif args.compare:
        routes = {"opacus ghost clipping": lambda: opacus_epoch_fn(data, args.batch_size, True),
                  "opacus per-sample hooks": lambda: opacus_epoch_fn(data, args.batch_size,
                                                                     False),
                  "torch.func vmap (whole VAE)": lambda: vmap_epoch_fn(data, args.batch_size)}
        for name, make in routes.items():
            fn = make()
            fn()  # warm-up
            t, times = median_time(fn, args.repeats)
            print(f"{name}: {t:.3f} s (median of {[round(x, 3) for x in times]}) "
                  f"= {t / t_plain:.2f}x plain")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
