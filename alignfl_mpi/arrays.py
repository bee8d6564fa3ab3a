"""Conversions between torch tensors and numpy arrays: images and state dicts.

Images are stored as uint8 ``(N, H, W)`` (partitions, synthetic pools) and used as
float32 ``(N, 1, H, W)`` in ``[0, 1]``; state dicts travel and are stored as numpy.

>>> x = images_to_tensor(np.array([[[0, 255]]], np.uint8))
>>> x.shape, x.dtype, x.max().item()
(torch.Size([1, 1, 1, 2]), torch.float32, 1.0)
>>> to_uint8_images(x).tolist()
[[[0, 255]]]
>>> arrays_to_state(state_arrays({"w": torch.ones(2)}))["w"].tolist()
[1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` -> float32 ``(N, 1, H, W)`` in ``[0, 1]`` (a new tensor)."""
    return torch.from_numpy(np.asarray(images)).unsqueeze(1).float().div_(255.0)


def to_uint8_images(x: Any) -> np.ndarray:
    """Images in ``[0, 1]`` (tensor or array, ``(N, H, W)`` or ``(N, 1, H, W)``) -> uint8.

    Values are clipped to ``[0, 1]`` and rounded half up; uint8 input is returned as is.

    Returns:
        A uint8 array ``(N, H, W)``.

    >>> to_uint8_images(np.array([[[-0.1, 0.5, 1.2]]])).tolist()
    [[[0, 128, 255]]]
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"images must be (N, H, W) or (N, 1, H, W), got {x.shape}")
    if x.dtype == np.uint8:
        return x
    return np.floor(np.clip(x.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def state_arrays(state: Mapping[str, torch.Tensor] | torch.nn.Module) -> dict[str, np.ndarray]:
    """A state dict (or a module's) as contiguous CPU numpy arrays that own their memory.

    Raises:
        TypeError: An entry is not a tensor, or has a dtype numpy cannot hold (bfloat16).
    """
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    arrays: dict[str, np.ndarray] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(tensor).__name__}, "
                            "not a tensor")
        try:
            arrays[name] = np.array(tensor.detach().cpu().numpy(), copy=True, order="C")
        except TypeError:
            raise TypeError(f"state dict entry {name!r} has dtype {tensor.dtype}, which numpy "
                            "cannot hold; use float32") from None
    return arrays


def arrays_to_state(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """numpy arrays -> CPU tensors (each owns a copy) for ``module.load_state_dict``."""
    return {name: torch.from_numpy(np.array(array, copy=True, order="C"))
            for name, array in arrays.items()}
