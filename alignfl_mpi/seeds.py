"""Derived seeds: one :class:`Role` per random stream, so that no two streams collide.

Every random stream of a run is seeded from ``(run seed, role, *ids)`` through numpy's
``SeedSequence``: a resumed round draws exactly what the uninterrupted run drew, and two
roles never share a stream, whatever the client ids and round numbers (each role's ids
have a fixed length, and the role is part of the entropy).

>>> derive_seed(0, Role.CLIENT_ROUND, 3, 1) == derive_seed(0, Role.CLIENT_ROUND, 3, 1)
True
>>> len({derive_seed(0, role, 0) for role in Role}) == len(Role)
True
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Role(IntEnum):
    """What a derived seed is for; the ids each role takes are in its comment."""

    CLIENT_INIT = 1            # (client,): a client's initial VAE weights
    CLIENT_ROUND = 2           # (client, round): shuffling, Lipschitz points, prior fit
    SERVER_INIT = 3            # (): the global VAE's initial weights (and the reference VAE's)
    SERVER_SAMPLE = 4          # (round,): the synthetic pool drawn from the decoders
    SERVER_TRAIN = 5           # (round,): the global VAE's training on the pool
    CLASSIFIER_INIT = 6        # (): the server's digit classifier's initial weights
    CLASSIFIER_TRAIN = 7       # (round,): its training on the labelled pool
    EVAL_LIPSCHITZ = 8         # (round, client): latent points of the Lipschitz report
    EVAL_QUALITY = 9           # (round,): the global VAE's samples for FID and friends
    EVAL_GRIDS = 10            # (round,): the PNG sample grids
    REFERENCE_TRAIN = 11       # (epoch,): the centralised references' training
    REFERENCE_CLIENT = 12      # (client, round): the FedAvg classifier reference's clients
    STRATEGY = 13              # (round,): a strategy's own server-side randomness
    PARTICIPANTS = 14          # (round,): the clients asked in a round


def derive_seed(seed: int, role: Role, *ids: int) -> int:
    """A 32-bit seed for ``role`` from the run seed and the role's ids."""
    return int(np.random.SeedSequence([int(seed), int(role), *map(int, ids)])
               .generate_state(1)[0])
