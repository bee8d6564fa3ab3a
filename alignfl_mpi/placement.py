"""Which client runs on which rank, and which clients a round asks.

Clients are not ranks: ``n_clients`` clients are placed on the client ranks (1..N), balanced
by sample count, and a rank trains its clients one after another. Every rank computes the
same placement from the partition's client sizes, so it is never sent. Each round asks
``clients_per_round`` of them, sampled from ``(seed, round)`` alone: the choice does not
depend on the placement, on stragglers or on a resume.

>>> place_clients([10, 50, 20, 20], n_ranks=2)
[[1], [0, 2, 3]]
>>> sample_participants(0, 3, n_clients=10, k=10) == list(range(10))
True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .seeds import Role, derive_seed


def place_clients(sizes: Sequence[int], *, n_ranks: int) -> list[list[int]]:
    """Clients onto ``n_ranks`` ranks, balanced by sample count.

    Longest first: each client, largest first (ties by id), goes to the rank with the
    fewest samples so far (ties: the lowest rank). No rank is left without a client when
    there are at least as many clients as ranks.

    Returns:
        For each rank (the first client rank first), its client ids in increasing order.

    Raises:
        ValueError: More ranks than clients, or no rank.
    """
    if n_ranks < 1 or n_ranks > len(sizes):
        raise ValueError(f"{n_ranks} client ranks for {len(sizes)} clients: every rank needs "
                         "a client")
    loads = [0] * n_ranks
    counts = [0] * n_ranks
    out: list[list[int]] = [[] for _ in range(n_ranks)]
    for cid in sorted(range(len(sizes)), key=lambda c: (-int(sizes[c]), c)):
        # the emptiest rank; a rank with no client yet first, so that every rank gets one
        rank = min(range(n_ranks), key=lambda r: (counts[r] > 0, loads[r], r))
        out[rank].append(cid)
        loads[rank] += int(sizes[cid])
        counts[rank] += 1
    return [sorted(clients) for clients in out]


def sample_participants(seed: int, round_: int, *, n_clients: int, k: int) -> list[int]:
    """The ``k`` clients asked in round ``round_`` (sorted), from ``(seed, round)`` alone.

    >>> a = sample_participants(1, 0, n_clients=20, k=5)
    >>> a == sample_participants(1, 0, n_clients=20, k=5) and len(set(a)) == 5
    True
    """
    if k >= n_clients:
        return list(range(n_clients))
    rng = np.random.default_rng(derive_seed(seed, Role.PARTICIPANTS, round_))
    return sorted(int(c) for c in rng.choice(n_clients, size=k, replace=False))
