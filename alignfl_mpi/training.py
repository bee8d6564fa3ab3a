"""The one minibatch training loop: clients, server, metrics and references all use it.

A caller supplies ``loss_fn(idx) -> (loss, logged)``: the loss of the minibatch with
indices ``idx`` and the values to report (tensors or floats, means over the batch).
The loop owns the shuffling (one permutation per epoch from the caller's generator),
the optimizer step and the bookkeeping; it never calls ``.item()`` per batch unless
asked to skip non-finite losses, so it does not synchronise an accelerator per step.

>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> w = torch.nn.Parameter(torch.zeros(1))
>>> x = torch.full((8,), 3.0)
>>> opt = torch.optim.SGD([w], lr=0.5)
>>> def loss_fn(idx):
...     loss = ((w - x[idx]) ** 2).mean()
...     return loss, {"loss": loss}
>>> hist = train_minibatches(opt, 8, loss_fn, epochs=3, batch_size=4,
...                          generator=torch.Generator().manual_seed(0))
>>> [round(h["loss"], 3) for h in hist], round(float(w), 3)
([4.5, 0.0, 0.0], 3.0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, Mapping[str, torch.Tensor | float]]]
"""``idx -> (loss, logged values)`` for one minibatch."""

SKIPPED = "skipped_steps"
"""Key of the per-epoch count of steps skipped on a non-finite loss (``skip_nonfinite``)."""


def train_minibatches(optimizer: torch.optim.Optimizer, n: int, loss_fn: LossFn, *,
                      epochs: int, batch_size: int, generator: torch.Generator,
                      skip_nonfinite: bool = False) -> list[dict[str, float]]:
    """``epochs`` passes over ``n`` samples in shuffled minibatches of ``batch_size``.

    Args:
        optimizer: Stepped once per minibatch (after ``zero_grad`` and ``backward``).
        n: Number of samples; ``loss_fn`` receives index tensors into them.
        loss_fn: The minibatch loss and the values to log.
        generator: The epochs' permutations (``torch.randperm(n, generator=...)``).
        skip_nonfinite: Never step on a non-finite loss (costs one host sync per step);
            such steps are counted under :data:`SKIPPED` and left out of the means.

    Returns:
        One dict per epoch: every logged value's sample-weighted mean over the epoch's
        (not skipped) minibatches, computed in float64; NaN for an epoch with none.
    """
    history: list[dict[str, float]] = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        sums: dict[str, torch.Tensor | float] = {}
        seen, skipped = 0, 0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            loss, logged = loss_fn(idx)
            if skip_nonfinite and not bool(torch.isfinite(loss.detach())):
                skipped += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            k = len(idx)
            for name, value in logged.items():
                v = value.detach().double() * k if isinstance(value, torch.Tensor) else (
                    float(value) * k)
                sums[name] = sums.get(name, 0.0) + v
            seen += k
        epoch = {name: float(v) / seen for name, v in sums.items()} if seen else {}
        if skip_nonfinite:
            epoch[SKIPPED] = float(skipped)
        history.append(epoch)
    return history


def last_epoch(history: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, float]:
    """The last epoch's values of ``keys`` (NaN where it logged none).

    >>> last_epoch([{"loss": 2.0}, {"loss": 1.0}], ("loss", "kl"))
    {'loss': 1.0, 'kl': nan}
    """
    last = history[-1] if history else {}
    return {k: last.get(k, float("nan")) for k in keys}
