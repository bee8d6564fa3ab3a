"""What the server can make of a run's final client decoders, under other server settings.

The global VAE of ALIGN-FL learns only from the synthetic pool, so part of its gap to the
centralised VAE may be the server's training (pool size, epochs) rather than the clients'
decoders. This replays the server's rounds on a finished run's *final* decoders and priors
(as stored in its results file), once per variant of the server settings, and scores the
global VAE after every replayed round exactly as the run did (``evaluation.evaluate_vae`` on
the partition's test set):

    python experiments/server_replay.py runs/quality-full/align-fl-s0 \\
        --variant as-run \\
        --variant epochs10=server.epochs=10 \\
        --variant pool5x=server.samples_per_client=5000 \\
        --variant pool5x-epochs10=server.samples_per_client=5000,server.epochs=10

A variant is ``NAME`` or ``NAME=KEY=VALUE[,KEY=VALUE...]`` (keys as for ``--set``).

Each replay starts a new global VAE (the run's seed) and samples every round from the same
final decoders; the run itself sampled round r from the decoders of round r. So ``as-run``
is the replay's own baseline, and the variants are compared with it; the run's recorded
numbers are printed beside them. What the replay cannot show is anything on the client side
(local epochs, prior components, the decoders' quality).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignfl_mpi.config import (  # noqa: E402
    RunConfig,
    apply_override,
    from_dict,
    parse_override,
    validate,
)
from alignfl_mpi.evaluation import evaluate_vae  # noqa: E402
from alignfl_mpi.results import load  # noqa: E402
from alignfl_mpi.schema import TEST, read_split  # noqa: E402
from alignfl_mpi.server import ServerState  # noqa: E402
from alignfl_mpi.strategies import build_strategy  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME`` or ``NAME=KEY=VALUE[,KEY=VALUE...]`` -> (name, overrides).

    >>> parse_variant("as-run"), parse_variant("e10=server.epochs=10,server.lr=0.002")
    (('as-run', []), ('e10', ['server.epochs=10', 'server.lr=0.002']))
    """
    name, _, rest = text.partition("=")
    return name, [o for o in rest.split(",") if o]


def replay(run: Path, overrides: list[str], *, rounds: int | None,
           device: torch.device) -> list[dict[str, float]]:
    """Replay the server's rounds on ``run``'s final decoders; the evaluation per round."""
    res = load(run / "results.h5")
    data = copy.deepcopy(res.config)
    for text in overrides:
        key_path, value = parse_override(text)
        apply_override(data, key_path, value)
    cfg: RunConfig = from_dict(RunConfig, data)
    validate(cfg)
    if cfg.strategy != "align-fl":
        raise SystemExit(f"{run}: strategy {cfg.strategy!r}; the replay is for align-fl runs")
    server = ServerState(cfg, device=device)
    strategy = build_strategy(cfg)
    decoders = res.final_decoders()
    if not decoders:
        raise SystemExit(f"{run}: no final decoders (an unfinished run?)")
    for cid, d in sorted(decoders.items()):
        server.accept(cid, spec=d["spec"], state=d["state"], prior=d["prior"],
                      round_=d["round"], metrics={})
    test_x, test_y = read_split(res.attrs["partition"], TEST)
    history = []
    for r in range(rounds or cfg.rounds):
        images, _ = server.sample_synthetic(round_=r)
        strategy.train_global(server, images, round_=r)
        history.append({k: float(v) for k, v in evaluate_vae(server.vae, test_x, test_y,
                                                             seed=42, device=device).items()})
    return history


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished align-fl run folder (results.h5)")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME or NAME=KEY=VALUE[,KEY=VALUE...] (repeat); default: as-run")
    p.add_argument("--rounds", type=int, default=None, help="rounds to replay (the run's)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    res = load(args.run / "results.h5")
    ev = res.eval
    print(f"run {args.run}: {len(res.rounds)} rounds; recorded latent accuracy by round "
          + ", ".join(f"{a:.3f}" for a in ev["latent_accuracy"])
          + f"; final recon {ev['recon_error'][-1]:.2f}\n")
    print("| variant | overrides | latent acc by round | final latent acc | final recon | "
          "min/max latent var (worst round) | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for text in args.variant or ["as-run"]:
        name, overrides = parse_variant(text)
        t0 = time.perf_counter()
        hist = replay(args.run, overrides, rounds=args.rounds, device=device)
        accs = ", ".join(f"{h['latent_accuracy']:.3f}" for h in hist)
        worst = min(h["latent_var_min_ratio"] for h in hist)
        print(f"| {name} | {' '.join(overrides) or '—'} | {accs} | "
              f"{hist[-1]['latent_accuracy']:.3f} | {hist[-1]['recon_error']:.2f} | "
              f"{worst:.3f} | {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
