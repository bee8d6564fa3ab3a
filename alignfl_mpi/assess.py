"""Per-round evaluation on rank 0: what the server's global model learned, and pictures.

Against the real test set of the partition file:

* latent logistic-regression accuracy and weighted F1 of the global VAE (stratified
  80/20 split of the test latents, seed 42, as the paper's code does);
* reconstruction error of the global VAE;
* PNG grids: samples of the global VAE and of every stored client decoder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .client import round_seed
from .config import RunConfig
from .evaluation import evaluate_vae, save_image_grid

log = logging.getLogger(__name__)

GRID_PER_ROW = 10


@dataclass
class RoundEvaluator:
    """Evaluates the server state after each round."""

    cfg: RunConfig
    partition: Path
    test_images: np.ndarray
    test_labels: np.ndarray
    device: torch.device
    png_dir: Path | None = None

    def evaluate(self, state: Any, *, round_: int) -> dict[str, float]:
        """Metrics of this round (flat dict of floats); writes PNGs when enabled."""
        metrics = evaluate_vae(state.vae, self.test_images, self.test_labels,
                               device=self.device, seed=42)
        if self.png_dir is not None:
            self.write_grids(state, round_=round_)
        return {k: float(v) for k, v in metrics.items()}

    @torch.no_grad()
    def write_grids(self, state: Any, *, round_: int) -> list[Path]:
        """``global_rNNNN.png`` (global VAE from N(0, I)) and ``clients_rNNNN.png``
        (one row per stored client decoder, sampled from its prior)."""
        assert self.png_dir is not None
        seed = round_seed(self.cfg.seed, 999, round_)
        gen = torch.Generator().manual_seed(seed)
        was_training = state.vae.training
        state.vae.eval()
        z = torch.randn(GRID_PER_ROW * 5, state.spec.latent_dim, generator=gen).to(self.device)
        global_imgs = state.vae.decode(z).reshape(-1, *state.spec.image_shape).cpu()
        state.vae.train(was_training)
        paths = [save_image_grid(global_imgs, self.png_dir / f"global_r{round_:04d}.png",
                                 nrow=GRID_PER_ROW)]
        if state.registry:
            rows, labels = [], []
            for cid in sorted(state.registry):
                rows.append(state.sample_client(cid, GRID_PER_ROW, seed=seed + cid).cpu())
                labels.append(f"client {cid}")
            paths.append(save_image_grid(torch.cat(rows),
                                         self.png_dir / f"clients_r{round_:04d}.png",
                                         nrow=GRID_PER_ROW, labels=labels))
        return paths
