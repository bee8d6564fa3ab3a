"""Typed point-to-point messages over MPI: the only module that imports mpi4py.

A :class:`Transport` wraps a communicator that is passed in (``COMM_WORLD``, a ``Dup()`` of
it or ``COMM_SELF`` in tests). It sends one encoded byte buffer per message with the
upper-case buffer calls only (never pickle) and receives with matched probes, so that:

- the sender is ``status.Get_source()``, never derived from the tag;
- a receive with a ``timeout`` polls ``Improbe`` with a short sleep, so a deadline works;
- a bad incoming message never kills the receiver and never stays in the queue. A message
  over ``max_message_bytes`` is drained by receiving it into an 8-byte buffer: under MPI the
  truncated receive completes with ``MPI_ERR_TRUNCATE`` and consumes the message, so its
  full size is never allocated here. A message with an unknown tag, one that does not
  decode, or one whose payload fails validation (for example NaN in a decoder tensor) is
  returned as a :class:`Received` with ``error`` set and the sender's rank.

MPICH does not complete a blocking ``Send`` to the calling rank until it is received, even
for a few bytes, so sends to oneself use ``Isend`` and are completed by a later
:meth:`Transport.recv`.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
from mpi4py import MPI

from alignfl_mpi.errors import MessageError
from alignfl_mpi.messages import (
    Message,
    Payload,
    Tag,
    decode_message,
    encode_message,
    parse_payload,
)

__all__ = [
    "ANY_SOURCE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "PendingSend",
    "Received",
    "Transport",
    "comm_world",
    "finalize_abort",
    "gentle_barrier",
    "node_local",
    "world_info",
]

log = logging.getLogger(__name__)

ANY_SOURCE: int = MPI.ANY_SOURCE
"""Source wildcard for :meth:`Transport.recv`."""

DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20
"""Default upper bound on one message (256 MiB)."""

_DRAIN_BYTES = 8
"""Size of the receive buffer used to drain an oversized message."""


@dataclass(frozen=True, eq=False)
class Received:
    """One message taken off the queue, good or bad.

    Attributes:
        source: Rank of the sender, from the MPI status.
        tag: The tag it arrived with: a :class:`Tag`, or the raw int when unknown (then
            ``error`` is set).
        message: The decoded message, or None when it was dropped.
        nbytes: Size of the message on the wire.
        error: Why the message was rejected, or None when it is good.
        payload: The payload dataclass for the tag (for example a
            :class:`~alignfl_mpi.messages.ClientUpdate`), or None when rejected. A message
            that decodes but whose payload fails validation keeps ``message`` for logging.
    """

    source: int
    tag: Tag | int
    message: Message | None
    nbytes: int
    error: MessageError | None = None
    payload: Payload | None = None

    @property
    def ok(self) -> bool:
        """True when the message decoded and its payload validated."""
        return self.error is None


#: Sleep between polls while waiting for a message, a send or the other ranks. MPICH's
#: blocking calls (``MPI_Wait``, ``MPI_Barrier``, the collectives) spin a core until they
#: complete; with more ranks than cores (a workstation, many client ranks per node) a
#: waiting rank then takes CPU from the ranks it waits for. Every wait here polls instead.
POLL_INTERVAL_S = 0.005


def gentle_barrier(comm: MPI.Comm, poll_interval: float = POLL_INTERVAL_S) -> None:
    """A barrier that sleeps between polls (``Ibarrier`` and ``Test``) instead of spinning."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(poll_interval)


class PendingSend:
    """A non-blocking send in flight; keeps the encoded buffer alive until it completes."""

    def __init__(self, request: MPI.Request, buffer: bytearray) -> None:
        """Wrap a started ``Isend`` and the buffer it reads from."""
        self._request = request
        self._buffer: bytearray | None = buffer
        self.nbytes = len(buffer)

    def test(self) -> bool:
        """Return True once the send has completed (then the buffer is released)."""
        if self._buffer is None:
            return True
        if self._request.Test():
            self._buffer = None
        return self._buffer is None

    def wait(self, poll_interval: float = POLL_INTERVAL_S) -> int:
        """Wait until the send has completed; return the number of bytes sent.

        Polls with ``Test`` and a short sleep instead of ``MPI_Wait``, which spins a core
        (see :data:`POLL_INTERVAL_S`).
        """
        while not self.test():
            time.sleep(poll_interval)
        return self.nbytes


class Transport:
    """Typed, size-bounded send and receive of :class:`~alignfl_mpi.messages.Message`."""

    def __init__(
        self, comm: MPI.Comm, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> None:
        """Wrap a communicator.

        Args:
            comm: The communicator; it is used as is (not duplicated).
            max_message_bytes: Largest message this rank sends or accepts.

        Raises:
            ValueError: If ``max_message_bytes`` is smaller than 64.
        """
        if max_message_bytes < 64:
            raise ValueError(f"max_message_bytes must be at least 64, got {max_message_bytes}")
        self._comm = comm
        self._max = int(max_message_bytes)
        self._self_sends: list[PendingSend] = []
        self._drain_buffer = bytearray(_DRAIN_BYTES)

    @property
    def comm(self) -> MPI.Comm:
        """The wrapped communicator (for :func:`finalize_abort`)."""
        return self._comm

    @property
    def rank(self) -> int:
        """Rank of this process in the communicator."""
        return self._comm.Get_rank()

    @property
    def size(self) -> int:
        """Number of ranks in the communicator."""
        return self._comm.Get_size()

    @property
    def max_message_bytes(self) -> int:
        """Largest message this rank sends or accepts."""
        return self._max

    # ------------------------------------------------------------------ sending

    def send(self, dest: int, tag: Tag, msg: Message) -> int:
        """Encode and send a message; blocks until the buffer may be reused.

        A send to this rank itself returns at once; a later :meth:`recv` completes it.

        Args:
            dest: Destination rank.
            tag: Message tag.
            msg: The message.

        Returns:
            The number of bytes sent.

        Raises:
            MessageError: If the message cannot be encoded or exceeds ``max_message_bytes``
                (nothing is sent then).
        """
        pending = self.isend(dest, tag, msg)
        if dest == self.rank:
            self._self_sends.append(pending)
            return pending.nbytes
        return pending.wait()

    def send_payload(self, dest: int, payload: Payload) -> int:
        """Send a payload dataclass under its own tag; see :meth:`send`."""
        return self.send(dest, payload.TAG, payload.to_message())

    def isend(self, dest: int, tag: Tag, msg: Message) -> PendingSend:
        """Encode and start sending a message without waiting for it to complete.

        Args:
            dest: Destination rank.
            tag: Message tag.
            msg: The message.

        Returns:
            A handle; call :meth:`PendingSend.wait` before relying on delivery.

        Raises:
            MessageError: As for :meth:`send`.
        """
        tag = Tag(tag)
        if not 0 <= dest < self.size:
            raise ValueError(f"destination rank {dest} is outside 0..{self.size - 1}")
        buffer = encode_message(msg)
        if len(buffer) > self._max:
            raise MessageError(
                f"{tag.name} message to rank {dest} is {len(buffer)} bytes, "
                f"over the limit of {self._max}"
            )
        request = self._comm.Isend([buffer, MPI.BYTE], dest=dest, tag=int(tag))
        return PendingSend(request, buffer)

    # ------------------------------------------------------------------ receiving

    def recv(
        self,
        *,
        source: int = ANY_SOURCE,
        tag: int | None = None,
        timeout: float | None = None,
        poll_interval: float = POLL_INTERVAL_S,
    ) -> Received | None:
        """Take the next matching message off the queue.

        Args:
            source: Rank to receive from, or :data:`ANY_SOURCE`.
            tag: Tag to receive, or None for any tag.
            timeout: Seconds to wait; None waits forever, 0 only looks once.
            poll_interval: Sleep between probes while waiting.

        Returns:
            The message (check :attr:`Received.ok`), or None if none arrived in time.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        mpi_tag = MPI.ANY_TAG if tag is None else int(tag)
        while True:
            self._progress_self_sends()
            status = MPI.Status()
            handle = self._comm.Improbe(source=source, tag=mpi_tag, status=status)
            if handle is not None:
                return self._receive(handle, status)
            if deadline is None:
                time.sleep(poll_interval)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(poll_interval, remaining))

    def _receive(self, handle: MPI.Message, status: MPI.Status) -> Received:
        """Receive a matched message and turn it into a :class:`Received`."""
        source, raw_tag, nbytes = status.Get_source(), status.Get_tag(), status.Get_count(MPI.BYTE)
        tag = _known_tag(raw_tag)
        label = f"message from rank {source} with tag {getattr(tag, 'name', tag)}"
        if nbytes > self._max:
            self._drain(handle)
            error = MessageError(
                f"{label} is {nbytes} bytes, over the limit of {self._max}; dropped"
            )
            log.debug("%s", error)
            return Received(source=source, tag=tag, message=None, nbytes=nbytes, error=error)
        buffer = np.empty(nbytes, dtype=np.uint8)
        handle.Recv([buffer, MPI.BYTE])
        if not isinstance(tag, Tag):
            return Received(
                source, tag, None, nbytes, MessageError(f"{label}: unknown tag; dropped")
            )
        try:
            message = decode_message(buffer, max_bytes=self._max)
        except MessageError as exc:
            return Received(source, tag, None, nbytes, MessageError(f"{label}: {exc}"))
        except Exception as exc:  # a validator gap: still only a rejected message
            log.error("%s: decoder raised %s", label, type(exc).__name__, exc_info=True)
            return Received(source, tag, None, nbytes,
                            MessageError(f"{label}: undecodable ({type(exc).__name__})"))
        try:
            payload = parse_payload(tag, message)
        except MessageError as exc:
            return Received(source, tag, message, nbytes, MessageError(f"{label}: {exc}"))
        except Exception as exc:
            log.error("%s: payload check raised %s", label, type(exc).__name__, exc_info=True)
            return Received(source, tag, message, nbytes,
                            MessageError(f"{label}: invalid payload ({type(exc).__name__})"))
        return Received(source, tag, message, nbytes, None, payload)

    def _drain(self, handle: MPI.Message) -> None:
        """Consume a matched message without allocating its size (truncated receive).

        The communicator's error handler is switched to ``ERRORS_RETURN`` for the call, so a
        communicator with ``ERRORS_ARE_FATAL`` does not abort on the expected truncation.
        """
        previous = self._comm.Get_errhandler()
        try:
            self._comm.Set_errhandler(MPI.ERRORS_RETURN)
            try:
                handle.Recv([self._drain_buffer, MPI.BYTE])
            except MPI.Exception as exc:
                if exc.Get_error_class() != MPI.ERR_TRUNCATE:
                    raise
        finally:
            self._comm.Set_errhandler(previous)
            previous.Free()

    def _progress_self_sends(self) -> None:
        """Release the buffers of completed sends to this rank."""
        if self._self_sends:
            self._self_sends = [p for p in self._self_sends if not p.test()]


def _known_tag(raw_tag: int) -> Tag | int:
    """Return the :class:`Tag` for a raw tag value, or the int itself when unknown."""
    try:
        return Tag(raw_tag)
    except ValueError:
        return raw_tag


def comm_world() -> MPI.Comm:
    """Return ``MPI.COMM_WORLD``, so that other modules need not import mpi4py."""
    return MPI.COMM_WORLD


def world_info(comm: MPI.Comm) -> tuple[int, int]:
    """Return ``(rank, size)`` of a communicator."""
    return comm.Get_rank(), comm.Get_size()


def node_local(comm: MPI.Comm) -> tuple[int, int]:
    """Return ``(rank, size)`` among the ranks of ``comm`` on this node (collective call).

    The ranks first meet in a polling barrier, so that those done importing early do not
    spin in ``Split_type`` while the others still import.
    """
    gentle_barrier(comm)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_rank(), local.Get_size()
    finally:
        local.Free()


#: Seconds between flushing this rank's output and ``MPI_Abort``. The process manager
#: (Hydra, ``srun``) forwards a rank's stdout/stderr through a pipe that it stops reading
#: once the abort kills the job, so a line written just before the abort was lost on a
#: loaded machine (seen in CI); the pause lets it be forwarded first.
ABORT_GRACE_S = 1.0


def finalize_abort(comm: MPI.Comm, code: int, grace_s: float = ABORT_GRACE_S) -> NoReturn:
    """Abort every rank of ``comm`` with exit status ``code`` (for unrecoverable errors).

    Flushes this rank's logging handlers, stdout and stderr, and waits ``grace_s`` for the
    process manager to forward them, before ``MPI_Abort``.
    """
    for handler in logging.getLogger().handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more to forward
            pass
    time.sleep(grace_s)
    comm.Abort(code)
    raise SystemExit(code)  # not reached: MPI_Abort does not return
