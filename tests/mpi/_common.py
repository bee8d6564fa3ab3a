"""Shared bits of the multi-rank test scripts: import path, fixtures and the verdict.

Each script collects its failures in a list and ends with :func:`finish`, which combines
every rank's verdict with ``Allreduce`` so that all ranks pass or fail together.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run straight from a checkout

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from alignfl_mpi.messages import ClientUpdate  # noqa: E402


def make_update(
    *,
    client_id: int,
    n_rows: int = 8,
    n_cols: int = 16,
    round: int = 0,  # noqa: A002
) -> ClientUpdate:
    """Build a deterministic update: the same arguments give identical arrays on every rank."""
    rng = np.random.default_rng(1000 + client_id)
    state = {
        "fc.weight": rng.standard_normal((n_rows, n_cols)).astype(np.float32),
        "fc.bias": rng.standard_normal(n_rows).astype(np.float32),
        "bn.num_batches_tracked": np.array(client_id, dtype=np.int64),
    }
    prior = {"weights": np.full(3, 1 / 3), "means": rng.standard_normal((3, 4)).astype(np.float32)}
    return ClientUpdate(
        round=round,
        client_id=client_id,
        spec={"name": "mlp_vae", "latent_dim": 4},
        state=state,
        prior=prior,
        metrics={"loss": float(client_id)},
    )


def same_update(got: ClientUpdate, want: ClientUpdate) -> list[str]:
    """Differences between two updates (empty when identical, arrays bit for bit)."""
    problems = []
    for field in ("round", "client_id", "spec", "metrics"):
        if getattr(got, field) != getattr(want, field):
            problems.append(f"{field}: {getattr(got, field)!r} != {getattr(want, field)!r}")
    for group in ("state", "prior"):
        g, w = getattr(got, group), getattr(want, group)
        if list(g) != list(w):
            problems.append(f"{group} keys {list(g)} != {list(w)}")
            continue
        for name in w:
            if g[name].dtype != w[name].dtype or g[name].shape != w[name].shape:
                problems.append(
                    f"{group}/{name}: {g[name].dtype}{g[name].shape} "
                    f"!= {w[name].dtype}{w[name].shape}"
                )
            elif g[name].tobytes() != w[name].tobytes():
                problems.append(f"{group}/{name}: values differ")
    return problems


def finish(comm: MPI.Comm, name: str, failures: list[str]) -> None:
    """Print this rank's failures, combine verdicts over all ranks and exit 0 or 1."""
    for failure in failures:
        print(f"[rank {comm.rank}] FAIL {name}: {failure}", file=sys.stderr, flush=True)
    mine = np.array([0 if failures else 1], dtype=np.int32)
    everyone = np.zeros(1, dtype=np.int32)
    comm.Allreduce(mine, everyone, op=MPI.MIN)
    passed = bool(everyone[0])
    if comm.rank == 0:
        print(f"{'PASS' if passed else 'FAIL'} {name} on {comm.size} ranks", flush=True)
    sys.exit(0 if passed else 1)
