"""What rank 0 spends on one client update: decoding the UPDATE message and accepting it.

Encodes ``--updates`` ALIGN-FL updates of the ``paper`` preset's MLP decoder (2.27 MB, a
10-component prior) as a client rank would send them, then times, in one process, what
rank 0 does with each received buffer: ``decode_message``, ``parse_payload`` and
``AlignFL.accept`` (validation, the decoder rebuilt from the received tensors, the probe,
the registry's bank). One untimed pass first; CPU and wall milliseconds per update of the
second pass, then a cProfile of a third (``--profile``). Run by hand, not in the tests:

    OMP_NUM_THREADS=1 python benchmarks/bench_accept.py
    OMP_NUM_THREADS=1 python benchmarks/bench_accept.py --updates 100 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_server_pool import random_prior  # noqa: E402  (this folder)

from alignfl_mpi.config import load_config  # noqa: E402
from alignfl_mpi.messages import (  # noqa: E402
    ClientUpdate,
    Tag,
    decode_message,
    encode_message,
    parse_payload,
)
from alignfl_mpi.models import build_decoder, model_spec  # noqa: E402
from alignfl_mpi.server import ServerState  # noqa: E402
from alignfl_mpi.strategies.align_fl import AlignFL  # noqa: E402


def encoded_updates(n: int, *, seed: int = 0) -> tuple[list[bytes], ServerState, AlignFL]:
    """``n`` encoded paper-preset updates, and a fresh server and strategy to take them."""
    cfg = load_config(preset="paper")
    spec = model_spec(cfg.client.model)
    decoder = build_decoder(spec)
    rng = np.random.default_rng(seed)
    buffers = []
    for cid in range(n):
        state = {name: v.detach().numpy().copy() for name, v in decoder.state_dict().items()}
        prior = random_prior(rng, components=cfg.client.prior_components,
                             latent_dim=spec.latent_dim)
        update = ClientUpdate(round=0, client_id=cid, spec=spec.to_dict(), state=state,
                              prior=prior, metrics={"n_samples": 600.0})
        buffers.append(bytes(encode_message(update.to_message())))
    return buffers, ServerState(cfg, device=torch.device("cpu")), AlignFL(cfg)


def take_all(buffers: list[bytes], server: ServerState, strategy: AlignFL) -> None:
    """Rank 0's work on every buffer, as for a received UPDATE."""
    for cid, buf in enumerate(buffers):
        update = parse_payload(Tag.UPDATE, decode_message(buf, max_bytes=64 << 20))
        strategy.accept(server, cid, update, late=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--profile", action="store_true", help="cProfile one more pass")
    args = parser.parse_args(argv)
    if args.updates < 1:
        parser.error("--updates must be >= 1")
    buffers, server, strategy = encoded_updates(args.updates)
    take_all(buffers, server, strategy)  # untimed: first-call costs, the bank's blocks
    wall, cpu = time.perf_counter(), time.process_time()
    take_all(buffers, server, strategy)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"{args.updates} updates of {len(buffers[0]) / 2**20:.2f} MB")
    print(f"per update: {1e3 * cpu / args.updates:.2f} cpu ms, "
          f"{1e3 * wall / args.updates:.2f} wall ms")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        take_all(buffers, server, strategy)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
