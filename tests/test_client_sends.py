"""A client rank's UPDATE sends: started without waiting, at most UPDATES_IN_FLIGHT at once."""

from __future__ import annotations

import numpy as np

from alignfl_mpi.config import RunConfig
from alignfl_mpi.messages import ClientUpdate, Tag
from alignfl_mpi.runtime import UPDATES_IN_FLIGHT, ClientLoop
from alignfl_mpi.strategies import strategy_class


class _Pending:
    """A send that completes only when the test says so (or when waited for)."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name, self.done = log, name, False

    def test(self) -> bool:
        return self.done

    def wait(self) -> int:
        self.log.append(f"wait {self.name}")
        self.done = True
        return 0


class _Transport:
    rank, size = 1, 2

    def __init__(self) -> None:
        self.log: list[str] = []
        self.sent: list[_Pending] = []

    def isend(self, dest: int, tag: Tag, msg) -> _Pending:
        assert dest == 0 and tag == Tag.UPDATE
        pending = _Pending(self.log, str(msg.meta["client_id"]))
        self.log.append(f"isend {pending.name}")
        self.sent.append(pending)
        return pending


def _loop() -> tuple[ClientLoop, _Transport]:
    cfg = RunConfig()
    transport = _Transport()
    loop = ClientLoop(transport, cfg, strategy_class(cfg.strategy)(cfg), resume=False,
                      local_rank=0)
    return loop, transport


def _update(client_id: int) -> ClientUpdate:
    return ClientUpdate(round=0, client_id=client_id, spec={"arch": "mlp"},
                        state={"w": np.zeros(3, np.float32)})


def test_updates_are_started_without_waiting_up_to_the_bound():
    loop, transport = _loop()
    for cid in range(UPDATES_IN_FLIGHT):
        loop._send_update(_update(cid))
    assert transport.log == [f"isend {c}" for c in range(UPDATES_IN_FLIGHT)]
    assert len(loop.updates) == UPDATES_IN_FLIGHT


def test_a_send_over_the_bound_waits_for_the_oldest_only():
    loop, transport = _loop()
    for cid in range(UPDATES_IN_FLIGHT + 1):
        loop._send_update(_update(cid))
    assert transport.log[-2:] == ["wait 0", f"isend {UPDATES_IN_FLIGHT}"]
    assert transport.log.count("wait 0") == 1 and sum("wait" in x for x in transport.log) == 1
    assert [p.name for p in loop.updates] == [str(c) for c in range(1, UPDATES_IN_FLIGHT + 1)]


def test_completed_sends_are_dropped_without_waiting():
    loop, transport = _loop()
    for cid in range(UPDATES_IN_FLIGHT):
        loop._send_update(_update(cid))
    for pending in transport.sent:
        pending.done = True  # rank 0 took them while the rank trained
    loop._send_update(_update(9))
    assert not any(x.startswith("wait") for x in transport.log)
    assert [p.name for p in loop.updates] == ["9"]
