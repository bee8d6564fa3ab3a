"""Transport tests in one process: rank 0 of ``COMM_SELF`` sends to itself."""

from __future__ import annotations

import time

import numpy as np
import pytest

from alignfl_mpi.errors import MessageError
from alignfl_mpi.messages import ClientUpdate, Message, Stop, Tag, TrainInstruction, encode_message
from alignfl_mpi.transport import ANY_SOURCE, Transport, comm_world, node_local, world_info

MPI = pytest.importorskip("mpi4py.MPI")


def make_update(*, n_floats: int, client_id: int = 0) -> ClientUpdate:
    rng = np.random.default_rng(n_floats)
    state = {
        "fc.weight": rng.standard_normal(n_floats).astype(np.float32),
        "fc.bias": np.arange(3.0),
    }
    prior = {"means": np.ones((2, 2), dtype=np.float32)}
    return ClientUpdate(
        round=1, client_id=client_id, spec={"name": "mlp"}, state=state, prior=prior, metrics={}
    )


@pytest.fixture
def comm() -> MPI.Comm:
    comm = MPI.COMM_SELF.Dup()
    yield comm
    comm.Free()


def drain_queue(transport: Transport) -> None:
    """Fail if anything is left over: every test must consume what it sends."""
    assert transport.recv(timeout=0) is None


def test_rank_size_and_world_helpers(comm: MPI.Comm) -> None:
    transport = Transport(comm)
    assert (transport.rank, transport.size) == (0, 1)
    assert world_info(comm) == (0, 1)
    assert node_local(comm) == (0, 1)
    assert transport.comm is comm
    assert comm_world() is MPI.COMM_WORLD
    with pytest.raises(ValueError, match="at least 64"):
        Transport(comm, max_message_bytes=10)


@pytest.mark.parametrize("n_floats", [100, 600_000])  # small (eager) and ~2.4 MB (rendezvous)
def test_decoder_update_to_self(comm: MPI.Comm, n_floats: int) -> None:
    transport = Transport(comm)
    update = make_update(n_floats=n_floats)
    sent = transport.send_payload(0, update)
    assert sent == len(encode_message(update.to_message()))
    got = transport.recv(timeout=5)
    assert got is not None and got.ok, got and got.error
    assert (got.source, got.tag, got.nbytes) == (0, Tag.UPDATE, sent)
    assert isinstance(got.payload, ClientUpdate)
    for name, array in update.state.items():
        assert got.payload.state[name].dtype == array.dtype
        assert got.payload.state[name].tobytes() == array.tobytes()
    np.testing.assert_array_equal(got.payload.prior["means"], update.prior["means"])
    drain_queue(transport)


def test_messages_keep_order_and_tag_filter(comm: MPI.Comm) -> None:
    transport = Transport(comm)
    for r in range(3):
        transport.send_payload(0, TrainInstruction(round=r))
    transport.send_payload(0, Stop("bye"))
    stop = transport.recv(tag=Tag.STOP, timeout=5)
    assert stop is not None and stop.payload == Stop("bye")
    rounds = [transport.recv(source=0, timeout=5).payload.round for _ in range(3)]
    assert rounds == [0, 1, 2]
    drain_queue(transport)


@pytest.mark.parametrize("timeout", [0.0, 0.05])
def test_timeout_returns_none_promptly(comm: MPI.Comm, timeout: float) -> None:
    transport = Transport(comm)
    start = time.monotonic()
    assert transport.recv(timeout=timeout) is None
    elapsed = time.monotonic() - start
    assert timeout <= elapsed < 1.0


def test_oversized_send_is_refused_before_sending(comm: MPI.Comm) -> None:
    transport = Transport(comm, max_message_bytes=1024)
    with pytest.raises(
        MessageError, match=r"UPDATE message to rank 0 is \d+ bytes, over the limit of 1024"
    ):
        transport.send_payload(0, make_update(n_floats=1000))
    drain_queue(transport)


def test_send_to_invalid_rank(comm: MPI.Comm) -> None:
    with pytest.raises(ValueError, match="outside 0..0"):
        Transport(comm).send(1, Tag.STOP, Stop().to_message())


def test_oversized_receive_is_drained_then_next_message_arrives(comm: MPI.Comm) -> None:
    sender = Transport(comm, max_message_bytes=2**24)
    receiver = Transport(comm, max_message_bytes=4096)
    comm.Set_errhandler(MPI.ERRORS_ARE_FATAL)  # the drain must not trip a fatal handler
    big = sender.isend(0, Tag.UPDATE, make_update(n_floats=300_000).to_message())
    sender.send_payload(0, Stop("after"))
    bad = receiver.recv(timeout=5)
    assert bad is not None and not bad.ok
    assert (bad.source, bad.tag, bad.nbytes, bad.message) == (0, Tag.UPDATE, big.nbytes, None)
    assert f"is {big.nbytes} bytes, over the limit of 4096" in str(bad.error)
    assert big.test()  # the truncated receive completed the send
    assert comm.Get_errhandler() == MPI.ERRORS_ARE_FATAL  # handler restored
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    good = receiver.recv(timeout=5)
    assert good is not None and good.payload == Stop("after")
    drain_queue(receiver)


def test_malformed_and_unknown_tag_are_errors_not_crashes(comm: MPI.Comm) -> None:
    transport = Transport(comm)
    raw = [
        (b"GARBAGE!" * 4, int(Tag.UPDATE)),
        (bytes(encode_message(Stop().to_message())), 999),
        (bytes(encode_message(Message(kind="stop", meta={}))), int(Tag.STOP)),
    ]
    requests = [comm.Isend([buf, MPI.BYTE], dest=0, tag=tag) for buf, tag in raw]
    transport.send_payload(0, Stop("good"))
    first, second, third = (transport.recv(timeout=5) for _ in range(3))
    MPI.Request.Waitall(requests)
    assert (first.source, first.tag, first.message) == (0, Tag.UPDATE, None)
    assert "bad magic" in str(first.error) and "rank 0" in str(first.error)
    assert (second.tag, second.message) == (999, None)
    assert "unknown tag" in str(second.error)
    assert third.tag == Tag.STOP and third.message is not None and third.payload is None
    assert "meta keys" in str(third.error)
    good = transport.recv(timeout=5)
    assert good is not None and good.ok and good.payload == Stop("good")
    drain_queue(transport)


def test_non_finite_update_is_an_error_received(comm: MPI.Comm) -> None:
    transport = Transport(comm)
    update = make_update(n_floats=10, client_id=3)
    update.state["fc.weight"][4] = np.inf
    transport.send_payload(0, update)
    got = transport.recv(timeout=5)
    assert got is not None and got.payload is None
    assert "non-finite values in state/fc.weight (0 NaN, 1 Inf)" in str(got.error)
    drain_queue(transport)


def test_any_source_constant_matches_mpi() -> None:
    assert ANY_SOURCE == MPI.ANY_SOURCE
