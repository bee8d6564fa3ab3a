"""Atomic checkpoints: written to a temporary file in the same folder, then renamed.

A crash mid-write leaves the previous checkpoint intact. Loading uses
``torch.load(weights_only=True)``, so a checkpoint cannot run code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import AlignFLError
from .fileio import atomic_path

CHECKPOINT_MODE = 0o600
"""Checkpoints are private to the owner (a client's holds its DP secret seed)."""


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (mode 0600) and return the path."""
    path = Path(path)
    with atomic_path(path, mode=CHECKPOINT_MODE) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Raises:
        AlignFLError: The file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise AlignFLError(f"checkpoint {path} not found; run without --resume to start fresh")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt pickle stream, wrong format, ...
        raise AlignFLError(f"checkpoint {path} is unreadable ({type(exc).__name__}); "
                           "delete it to start fresh") from None


def rng_state() -> dict[str, Any]:
    """The global torch RNG states (CPU and, when present, CUDA)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
