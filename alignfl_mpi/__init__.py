"""alignfl_mpi: an MPI runtime for ALIGN-FL.

Rank 0 is a stateful server that trains a global VAE on synthetic data sampled
from every client's shared decoder and latent prior; ranks 1..N are clients that
train their own VAE on private data and share only the decoder and the prior.
"""

__version__ = "0.1.0"
