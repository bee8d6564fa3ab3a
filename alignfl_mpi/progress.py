"""Live progress of a round on rank 0, fed by the clients' PROGRESS messages.

Clients report how many optimizer steps of their local round are done (rate-limited,
see :class:`StepReporter`); rank 0 keeps the latest report per client and renders one
status line::

    [rank 0] round 3/5 | clients done 2/5 | slowest: client 4 epoch 3/10 | 42 s | ETA 61 s

On a terminal the line is redrawn in place (at most twice a second); otherwise (a SLURM
output file, a pipe) a plain line is logged every ``output.progress_interval_s`` seconds,
never with control characters. ``--quiet`` silences it; ``--verbose`` adds a line per
client as it finishes.

>>> table = ProgressTable(n_clients=2, epochs=[10, 10])
>>> table.update(1, done=30, total=100, now=5.0)
>>> table.status(round_no=1, rounds=5, done={0}, started=0.0, now=5.0)
'round 1/5 | clients done 1/2 | slowest: client 1 epoch 4/10 | 5 s | ETA 12 s'
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TextIO

log = logging.getLogger("alignfl_mpi")

CLIENT_MIN_INTERVAL_S = 2.0
"""A client sends at most one PROGRESS message per this many seconds."""

TTY_REDRAW_S = 0.5
"""Shortest time between two redraws of the terminal status line."""


@dataclass
class ProgressTable:
    """The latest (done, total) steps of every client in the current round."""

    n_clients: int
    epochs: list[int]
    steps: dict[int, tuple[int, int, float]] = field(default_factory=dict)

    def reset(self) -> None:
        """Forget the previous round's reports."""
        self.steps.clear()

    def update(self, client: int, *, done: int, total: int, now: float) -> None:
        """Record a report (clamped to ``0 <= done <= total``)."""
        total = max(1, total)
        self.steps[client] = (min(max(0, done), total), total, now)

    def fraction(self, client: int) -> float:
        """Share of the client's local round done (0 when nothing was reported)."""
        done, total, _ = self.steps.get(client, (0, 1, 0.0))
        return done / total

    def status(self, *, round_no: int, rounds: int, done: set[int], started: float,
               now: float, asked: Collection[int] | None = None) -> str:
        """One status line: clients done (of those ``asked``, default all), the slowest busy
        client's epoch, elapsed, ETA."""
        asked = range(self.n_clients) if asked is None else sorted(asked)
        finished = sum(1 for c in asked if c in done)
        parts = [f"round {round_no}/{rounds}", f"clients done {finished}/{len(asked)}"]
        busy = [c for c in asked if c not in done]
        elapsed = now - started
        if busy:
            slowest = min(busy, key=lambda c: (self.fraction(c), c))
            frac = self.fraction(slowest)
            epochs = self.epochs[slowest]
            epoch = min(epochs, int(frac * epochs) + 1)
            parts.append(f"slowest: client {slowest} epoch {epoch}/{epochs}")
            parts.append(f"{elapsed:.0f} s")
            if frac > 0:
                parts.append(f"ETA {elapsed / frac * (1 - frac):.0f} s")
        else:
            parts.append(f"{elapsed:.0f} s")
        return " | ".join(parts)


class ProgressDisplay:
    """Renders :class:`ProgressTable` status lines on rank 0."""

    def __init__(self, *, enabled: bool, verbose: bool, interval_s: float,
                 stream: TextIO | None = None) -> None:
        """Choose the terminal or the plain-line mode from ``stream.isatty()``."""
        self.enabled = enabled
        self.verbose = verbose
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self.tty = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = time.monotonic()
        self._width = 0

    def show(self, line: str, *, now: float | None = None) -> None:
        """Redraw (terminal) or log (otherwise) the line when its interval has passed."""
        if not self.enabled:
            return
        now = time.monotonic() if now is None else now
        if now - self._last < (TTY_REDRAW_S if self.tty else self.interval_s):
            return
        self._last = now
        if self.tty:
            text = f"[rank 0] {line}"
            self.stream.write("\r" + text.ljust(self._width))
            self.stream.flush()
            self._width = len(text)
        else:
            log.info("%s", line)

    def client_done(self, client: int, seconds: float) -> None:
        """With ``--verbose``: one line per client that finished its round."""
        if self.enabled and self.verbose:
            self.clear()
            log.info("client %d done after %.1f s", client, seconds)

    def clear(self) -> None:
        """Remove the terminal status line (before other output, or at the round's end)."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


class StepReporter:
    """Client side: counts optimizer steps and calls ``send(done, total)`` rate-limited.

    Installed as a global optimizer step hook for the duration of one local round, so the
    training loops (plain, DP, averaging) need no change.
    """

    def __init__(self, *, total: int, send: Callable[[int, int], Any],
                 min_interval_s: float = CLIENT_MIN_INTERVAL_S) -> None:
        self.total = max(1, total)
        self.done = 0
        self._send = send
        self._min = min_interval_s
        self._last = time.monotonic()
        self._handle: Any = None

    def __enter__(self) -> StepReporter:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handle = register_optimizer_step_post_hook(self._step)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _step(self, *_: Any) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self._last >= self._min:
            self._last = now
            self._send(min(self.done, self.total), self.total)
