"""The federated strategies behind one interface (:class:`Strategy`), and their registry.

Adding a strategy is one file here (a :class:`Strategy` subclass) plus one line in
:data:`STRATEGIES`. Nothing outside this package asks which strategy runs: the runtime,
the config checks and the reports go through :func:`build_strategy` and the class
attributes.

>>> sorted(STRATEGIES)
['align-fl', 'fedadam', 'fedavg', 'fedprox', 'moon']
>>> strategy_class("fedprox").OPTIONS
{'mu': 0.01}
"""

from __future__ import annotations

import difflib

from ..config import RunConfig
from ..errors import ConfigError
from .align_fl import AlignFL
from .base import Strategy
from .fedadam import FedAdam
from .fedavg import FedAvg
from .fedprox import FedProx
from .moon import Moon

__all__ = ["DEFAULT_STRATEGY", "STRATEGIES", "Strategy", "build_strategy", "strategy_class"]

STRATEGIES: dict[str, type[Strategy]] = {
    AlignFL.name: AlignFL,
    FedAvg.name: FedAvg,
    FedProx.name: FedProx,
    FedAdam.name: FedAdam,
    Moon.name: Moon,
}
"""The registry: the config's ``strategy`` value -> its class."""

DEFAULT_STRATEGY = RunConfig().strategy
"""The strategy of a config that names none (and of results files written before the
config recorded it)."""


def strategy_class(name: str) -> type[Strategy]:
    """The class registered as ``name``.

    Raises:
        ConfigError: No strategy of that name (the message lists them).
    """
    try:
        return STRATEGIES[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(STRATEGIES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"config key 'strategy': unknown value {name!r}; {hint}choose one "
                          f"of: {', '.join(STRATEGIES)}") from None


def build_strategy(cfg: RunConfig) -> Strategy:
    """The run's strategy, with the config checked against it.

    Every rank calls this at start, so a setting the strategy refuses fails there, with
    one line, before anything is trained or written.

    Raises:
        ConfigError: An unknown strategy, an unknown option, or a refused setting.
    """
    strategy = strategy_class(cfg.strategy)(cfg)
    strategy.validate()
    return strategy
