"""Message tags, payload dataclasses and the wire format between ranks.

Every message is one byte buffer, so nothing crosses a rank boundary as pickle::

    offset 0   b"AFL1"                      magic (4 bytes)
    offset 4   uint32 little-endian         header length H
    offset 8   UTF-8 JSON header            H bytes, padded with spaces so 8 + H is a multiple of 8
    offset 8+H tensor data                  the data section

The header is a JSON object with exactly three keys::

    {"kind": "update",
     "meta": {...JSON-safe...},
     "tensors": [{"name": "state/fc.weight", "dtype": "float32", "shape": [4, 3],
                  "offset": 0, "nbytes": 48}, ...]}

``offset`` is relative to the start of the data section. Each tensor is stored as raw
little-endian C-order bytes; the first starts at offset 0 and each next one at the end of
the previous one rounded up to a multiple of 8 (zero padding in between). The buffer ends
exactly where the last tensor ends. Only the dtypes in :data:`ALLOWED_DTYPES` may appear.

Decoding uses only :func:`json.loads` and :func:`numpy.frombuffer`, so a message can never
run code on the receiver, and every decoded array is a fresh, writable copy. Anything that
does not match the layout above raises :class:`~alignfl_mpi.errors.MessageError` with a
one-line reason.

The payload dataclasses (:class:`StartInstruction`, :class:`TrainInstruction`,
:class:`ClientUpdate`, :class:`RemoteError`, :class:`Stop`) each know their :class:`Tag`
and convert to and from a :class:`Message`; ``from_message`` is the trust boundary and
checks every field.
"""

from __future__ import annotations

import json
import math
import re
import socket
import struct
import traceback as traceback_module
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

import numpy as np

from alignfl_mpi.errors import MessageError

__all__ = [
    "ALLOWED_DTYPES",
    "Bye",
    "MAGIC",
    "PAYLOAD_TYPES",
    "Progress",
    "Ready",
    "GlobalModel",
    "UPDATE_KINDS",
    "ClientUpdate",
    "Message",
    "Payload",
    "RemoteError",
    "StartInstruction",
    "Stop",
    "Tag",
    "TrainInstruction",
    "decode_message",
    "encode_message",
    "parse_payload",
]

MAGIC = b"AFL1"
"""First four bytes of every message; bump the digit when the layout changes."""

PREAMBLE_BYTES = 8
"""Magic plus the uint32 header length."""

ALIGNMENT = 8
"""Every tensor starts at a multiple of this many bytes from the data section."""

MAX_NDIM = 32
"""Largest number of dimensions a tensor on the wire may have."""

MAX_TRACEBACK_CHARS = 20_000
"""A :class:`RemoteError` keeps at most the last this many characters of a traceback."""

MAX_TEXT_CHARS = 2_000
"""Longest short string field (host, device, exception type and message, reasons)."""

MAX_META_INT = 2**31 - 1
"""Largest integer a count in the metadata (round, client id, rank, samples) may hold."""

MAX_EXACT_INT = 2**53
"""Largest integer magnitude accepted as a number (it converts to float exactly)."""

MAX_DIM = 2**31 - 1
"""Largest size of one tensor dimension."""

MAX_EMPTY_BYTES = 2**32
"""Bound on the product of a zero-size tensor's non-zero dimensions times its item size,
so that even an empty array can always be allocated."""

MAX_METRICS = 64
"""Most scalar metrics an update may carry."""

METRIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
"""Pattern of an accepted metric name (they become HDF5 attribute names)."""

RESERVED_METRICS = frozenset({"status", "error", "traceback", "message_bytes", "update_round",
                              "busy_round", "unsolicited", "answer_s"})
"""Names the server sets itself; a client may not send a metric under them."""

_WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "uint8": np.dtype("|u1"),
    "bool": np.dtype("|b1"),
}

ALLOWED_DTYPES: tuple[str, ...] = tuple(_WIRE_DTYPES)
"""Dtype names that may appear in a message."""

_HEADER_KEYS = frozenset({"kind", "meta", "tensors"})
_ENTRY_KEYS = frozenset({"name", "dtype", "shape", "offset", "nbytes"})


class Tag(IntEnum):
    """MPI tag of each message kind; the sender comes from the MPI status, never the tag."""

    START = 1
    """Server to client: the run may begin, or is aborted with a reason."""
    TRAIN = 2
    """Server to client: train round ``r``."""
    UPDATE = 3
    """Client to server: decoder weights and latent prior after round ``r``."""
    ERROR = 4
    """Client to server: a :class:`RemoteError`."""
    STOP = 5
    """Server to client: finish and exit."""
    READY = 6
    """Client to server: set-up finished (host, device, data size)."""
    MODEL = 7
    """Server to client: the global model's weights (FedAvg/FedProx baselines only)."""
    BYE = 8
    """Client to server: STOP received; this rank sends nothing more and finalizes."""
    PROGRESS = 9
    """Client to server: how far its local round is (rate-limited, for the live status)."""


@dataclass(frozen=True, kw_only=True, eq=False)
class Message:
    """A decoded message: a kind, JSON-safe metadata and named arrays.

    Attributes:
        kind: Short name of the payload type, for example ``"update"``.
        meta: JSON-safe metadata (dicts with string keys, lists, str, int, finite float,
            bool, None). Tuples are sent as JSON arrays and arrive as lists.
        tensors: Named arrays in insertion order; dtypes from :data:`ALLOWED_DTYPES`.
    """

    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


# --------------------------------------------------------------------------- encoding


def encode_message(msg: Message) -> bytearray:
    """Encode a message into one byte buffer (see the module docstring for the layout).

    Args:
        msg: The message; its arrays may have any byte order and memory layout.

    Returns:
        The encoded buffer.

    Raises:
        MessageError: If the kind is empty, the metadata is not JSON-safe, a tensor name is
            not a non-empty string, a value is not a NumPy array or its dtype is not allowed.

    >>> msg = Message(kind="demo", meta={"round": 1}, tensors={"w": np.arange(3.0)})
    >>> buf = encode_message(msg)
    >>> bytes(buf[:4]), len(buf) % 8
    (b'AFL1', 0)
    >>> decode_message(buf, max_bytes=1024).tensors["w"].tolist()
    [0.0, 1.0, 2.0]
    """
    if not isinstance(msg.kind, str) or not msg.kind:
        raise MessageError(f"message kind must be a non-empty string, got {msg.kind!r}")
    if not isinstance(msg.meta, dict):
        raise MessageError(f"message meta must be a dict, got {type(msg.meta).__name__}")
    _check_json_safe(msg.meta, "meta")
    entries, blocks, data_bytes = _layout_tensors(msg.tensors)
    try:
        header = json.dumps(
            {"kind": msg.kind, "meta": msg.meta, "tensors": entries},
            allow_nan=False,
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MessageError(f"message text is not valid UTF-8 ({exc.reason})") from None
    header += b" " * (-(PREAMBLE_BYTES + len(header)) % ALIGNMENT)
    data_start = PREAMBLE_BYTES + len(header)
    out = bytearray(data_start + data_bytes)
    out[:PREAMBLE_BYTES] = MAGIC + struct.pack("<I", len(header))
    out[PREAMBLE_BYTES:data_start] = header
    view = np.frombuffer(out, dtype=np.uint8)
    for offset, data in blocks:
        start = data_start + offset
        view[start : start + data.nbytes] = data.reshape(-1).view(np.uint8)
    return out


def _layout_tensors(
    tensors: Mapping[str, np.ndarray],
) -> tuple[list[dict[str, Any]], list[tuple[int, np.ndarray]], int]:
    """Convert arrays to wire dtypes and place them in the data section.

    Returns:
        The header entries, ``(offset, little-endian C-order array)`` pairs and the size of
        the data section in bytes.
    """
    if not isinstance(tensors, Mapping):
        raise MessageError(f"message tensors must be a dict, got {type(tensors).__name__}")
    entries: list[dict[str, Any]] = []
    blocks: list[tuple[int, np.ndarray]] = []
    cursor = 0
    for name, array in tensors.items():
        if not isinstance(name, str) or not name:
            raise MessageError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(array, np.ndarray):
            raise MessageError(f"tensor {name!r} is a {type(array).__name__}, not a NumPy array")
        wire = _WIRE_DTYPES.get(array.dtype.name) if array.dtype.fields is None else None
        if wire is None:
            raise MessageError(
                f"tensor {name!r} has dtype {array.dtype}, not one of {', '.join(ALLOWED_DTYPES)}"
            )
        if array.ndim > MAX_NDIM:
            raise MessageError(f"tensor {name!r} has {array.ndim} dimensions, over {MAX_NDIM}")
        data = np.asarray(array, dtype=wire, order="C")
        offset = _align(cursor)
        entries.append(
            {
                "name": name,
                "dtype": array.dtype.name,
                "shape": list(array.shape),
                "offset": offset,
                "nbytes": data.nbytes,
            }
        )
        blocks.append((offset, data))
        cursor = offset + data.nbytes
    return entries, blocks, cursor


def _check_json_safe(value: Any, where: str) -> None:
    """Raise MessageError unless ``value`` survives a strict JSON round-trip."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MessageError(f"{where} is {value}; JSON metadata must be finite")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json_safe(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise MessageError(f"{where} has a non-string key {key!r}")
            _check_json_safe(item, f"{where}.{key}")
        return
    raise MessageError(f"{where} is a {type(value).__name__}, which is not JSON-safe")


def _align(n: int) -> int:
    """Round ``n`` up to a multiple of :data:`ALIGNMENT`."""
    return -(-n // ALIGNMENT) * ALIGNMENT


# --------------------------------------------------------------------------- decoding


def decode_message(buf: bytes | bytearray | memoryview | np.ndarray, *, max_bytes: int) -> Message:
    """Decode and validate one message buffer.

    Args:
        buf: The received bytes (any contiguous buffer).
        max_bytes: Largest accepted buffer size in bytes.

    Returns:
        The message; its arrays are fresh writable copies in native byte order.

    Raises:
        MessageError: If the buffer is larger than ``max_bytes`` or not a well-formed message:
            bad magic, header length beyond the buffer, header not a UTF-8 JSON object of the
            expected shape, unknown dtype, shape that does not match ``nbytes``, offsets that
            overlap, leave gaps or point outside the buffer, duplicate tensor names, non-zero
            padding or trailing bytes.

    >>> decode_message(b"AFL0" + bytes(4), max_bytes=64)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    alignfl_mpi.errors.MessageError: bad magic b'AFL0' (expected b'AFL1'): not an alignfl_mpi ...
    """
    try:
        view = memoryview(buf).cast("B")  # type: ignore[arg-type]  # ndarray: a buffer
    except (TypeError, ValueError) as exc:
        raise MessageError(f"message buffer is not a contiguous byte buffer ({exc})") from None
    total = len(view)
    if total > max_bytes:
        raise MessageError(f"message is {total} bytes, over the limit of {max_bytes}")
    if total < PREAMBLE_BYTES:
        raise MessageError(
            f"message is {total} bytes, shorter than the {PREAMBLE_BYTES}-byte preamble"
        )
    magic = bytes(view[:4])
    if magic != MAGIC:
        raise MessageError(f"bad magic {magic!r} (expected {MAGIC!r}): not an alignfl_mpi message")
    (header_len,) = struct.unpack_from("<I", view, 4)
    if header_len > total - PREAMBLE_BYTES:
        raise MessageError(
            f"header length {header_len} exceeds the {total - PREAMBLE_BYTES} bytes "
            "after the preamble"
        )
    data_start = PREAMBLE_BYTES + header_len
    if data_start % ALIGNMENT:
        raise MessageError(f"header length {header_len} leaves the data section unaligned")
    kind, meta, entries = _parse_header(bytes(view[PREAMBLE_BYTES:data_start]))
    tensors: dict[str, np.ndarray] = {}
    cursor = 0  # end of the previous tensor, relative to the data section
    for index, entry in enumerate(entries):
        name, dtype_name, shape, offset, nbytes = _check_entry(entry, index)
        if name in tensors:
            raise MessageError(f"duplicate tensor name {name!r}")
        _check_placement(
            view, name=name, offset=offset, nbytes=nbytes, cursor=cursor, data_start=data_start
        )
        tensors[name] = _read_array(
            view, name=name, dtype_name=dtype_name, shape=shape, start=data_start + offset
        )
        cursor = offset + nbytes
    if data_start + cursor != total:
        raise MessageError(f"{total - data_start - cursor} trailing bytes after the last tensor")
    return Message(kind=kind, meta=meta, tensors=tensors)


def _parse_header(raw: bytes) -> tuple[str, dict[str, Any], list[Any]]:
    """Parse the JSON header and check its top-level shape."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MessageError(
            f"header is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    try:
        header = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_parse_finite_float,
            object_pairs_hook=_object_without_duplicates,
        )
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"header is not valid JSON ({_one_line(exc)})") from None
    if not isinstance(header, dict):
        raise MessageError(f"header is a JSON {type(header).__name__}, not an object")
    if set(header) != _HEADER_KEYS:
        raise MessageError(f"header keys are {sorted(header)}, expected {sorted(_HEADER_KEYS)}")
    kind, meta, entries = header["kind"], header["meta"], header["tensors"]
    if not isinstance(kind, str) or not kind:
        raise MessageError(f"header kind must be a non-empty string, got {kind!r}")
    if not isinstance(meta, dict):
        raise MessageError(f"header meta must be an object, got {type(meta).__name__}")
    if not isinstance(entries, list):
        raise MessageError(f"header tensors must be a list, got {type(entries).__name__}")
    return kind, meta, entries


def _check_entry(entry: Any, index: int) -> tuple[str, str, tuple[int, ...], int, int]:
    """Check one tensor-table entry; return (name, dtype, shape, offset, nbytes)."""
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise MessageError(f"tensor entry {index} is {keys}, expected keys {sorted(_ENTRY_KEYS)}")
    name, dtype_name, shape = entry["name"], entry["dtype"], entry["shape"]
    if not isinstance(name, str) or not name:
        raise MessageError(f"tensor entry {index} has an invalid name {name!r}")
    if not isinstance(dtype_name, str) or dtype_name not in _WIRE_DTYPES:
        raise MessageError(
            f"tensor {name!r} has unknown dtype {dtype_name!r}; "
            f"allowed: {', '.join(ALLOWED_DTYPES)}"
        )
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(_is_count(d) and d <= MAX_DIM for d in shape)):
        raise MessageError(f"tensor {name!r} has an invalid shape {str(shape)[:80]}")
    itemsize = _WIRE_DTYPES[dtype_name].itemsize
    if math.prod(d for d in shape if d) * itemsize > MAX_EMPTY_BYTES and 0 in shape:
        raise MessageError(f"tensor {name!r} is empty but its other dimensions are too large "
                           f"({str(shape)[:80]})")
    offset, nbytes = entry["offset"], entry["nbytes"]
    if not _is_count(offset) or not _is_count(nbytes):
        raise MessageError(f"tensor {name!r} has an invalid offset {offset!r} or nbytes {nbytes!r}")
    expected = math.prod(shape) * itemsize
    if expected != nbytes:
        raise MessageError(
            f"tensor {name!r}: shape {shape} of {dtype_name} needs {expected} bytes "
            f"but nbytes is {nbytes}"
        )
    return name, dtype_name, tuple(shape), offset, nbytes


def _check_placement(
    view: memoryview, *, name: str, offset: int, nbytes: int, cursor: int, data_start: int
) -> None:
    """Check that a tensor sits exactly at the next aligned offset, inside the buffer."""
    if offset < cursor:
        raise MessageError(
            f"tensor {name!r} at offset {offset} overlaps the previous tensor (ends at {cursor})"
        )
    if data_start + offset + nbytes > len(view):
        raise MessageError(
            f"tensor {name!r} (offset {offset}, {nbytes} bytes) extends beyond the "
            f"{len(view) - data_start}-byte data section"
        )
    if offset != _align(cursor):
        raise MessageError(f"tensor {name!r} is at offset {offset}, expected {_align(cursor)}")
    if any(view[data_start + cursor : data_start + offset]):
        raise MessageError(f"non-zero padding before tensor {name!r}")


def _read_array(
    view: memoryview, *, name: str, dtype_name: str, shape: tuple[int, ...], start: int
) -> np.ndarray:
    """Copy one tensor out of the buffer into a native-order array."""
    native = np.dtype(dtype_name)
    count = math.prod(shape)
    if count == 0:
        return np.empty(shape, dtype=native)
    wire = _WIRE_DTYPES[dtype_name]
    if (
        dtype_name == "bool"
        and np.frombuffer(view, dtype=np.uint8, count=count, offset=start).max() > 1
    ):
        raise MessageError(f"tensor {name!r} has bool bytes other than 0 and 1")
    return np.frombuffer(view, dtype=wire, count=count, offset=start).reshape(shape).astype(native)


def _is_count(value: Any) -> bool:
    """Return True for a non-negative JSON integer (bool excluded)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _parse_finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return result


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (safe for any JSON value).

    >>> _short("x" * 100, 10)
    "'xxxxxxxx..."
    """
    try:
        text = repr(value)
    except ValueError:  # an int too long for repr
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "..."


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- payload checks


def _check_kind(msg: Message, kind: str) -> None:
    if msg.kind != kind:
        raise MessageError(f"expected a {kind!r} message, got {msg.kind!r}")


def _check_meta(
    msg: Message, kind: str, checks: Mapping[str, Any], *, tensors: bool = False
) -> dict[str, Any]:
    """Check kind, the exact set of meta keys and each value; return the meta dict.

    Args:
        msg: The message to check.
        kind: The expected kind.
        checks: For each required key, a predicate ``value -> bool`` and a description.
        tensors: Whether the message may carry tensors.
    """
    _check_kind(msg, kind)
    meta = msg.meta
    if set(meta) != set(checks):
        raise MessageError(
            f"{kind!r} message meta keys are {sorted(meta)}, expected {sorted(checks)}"
        )
    for key, (predicate, description) in checks.items():
        if not predicate(meta[key]):
            raise MessageError(
                f"{kind!r} message meta {key!r} must be {description}, "
                f"got {_short(meta[key])}"
            )
    if not tensors and msg.tensors:
        raise MessageError(f"{kind!r} message must not carry tensors, got {list(msg.tensors)[:3]}")
    return meta


def _is_int(value: Any) -> bool:
    """An integer (bool excluded) within +-:data:`MAX_META_INT`."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_META_INT


def _is_meta_count(value: Any) -> bool:
    """A non-negative integer up to :data:`MAX_META_INT`."""
    return _is_count(value) and value <= MAX_META_INT


def _is_number(value: Any) -> bool:
    """A finite float, or an integer that converts to float exactly (never overflows).

    >>> _is_number(1.5), _is_number(10**400), _is_number(True)
    (True, False, False)
    """
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) <= MAX_EXACT_INT
    return isinstance(value, float) and math.isfinite(value)


def is_text(value: Any, *, max_chars: int = MAX_TEXT_CHARS) -> bool:
    """A string that can be stored anywhere: bounded, no NUL, valid UTF-8 (no surrogates).

    >>> is_text("node-1"), is_text("a\\x00b"), is_text("\\ud800"), is_text("x" * 3000)
    (True, False, False, False)
    """
    if not isinstance(value, str) or len(value) > max_chars or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_metric_name(name: Any) -> bool:
    """A metric name a client may send: :data:`METRIC_NAME`, not a reserved name.

    >>> is_metric_name("loss"), is_metric_name(""), is_metric_name("status")
    (True, False, False)
    """
    return (isinstance(name, str) and METRIC_NAME.fullmatch(name) is not None
            and name not in RESERVED_METRICS)


_BOOL = (lambda v: isinstance(v, bool), "a bool")
_STR = (is_text, f"a string of at most {MAX_TEXT_CHARS} characters without NUL")
_LONG_STR = (lambda v: is_text(v, max_chars=MAX_TRACEBACK_CHARS),
             f"a string of at most {MAX_TRACEBACK_CHARS} characters without NUL")
_DICT = (lambda v: isinstance(v, dict), "an object")
_COUNT = (_is_meta_count, f"an integer in 0..{MAX_META_INT}")
MAX_CLIENTS_PER_MESSAGE = 65536
"""Most client ids one TRAIN instruction may name."""
_CLIENT_IDS = (
    lambda v: isinstance(v, list) and len(v) <= MAX_CLIENTS_PER_MESSAGE
    and all(_is_meta_count(x) for x in v) and len(set(v)) == len(v),
    f"a list of at most {MAX_CLIENTS_PER_MESSAGE} distinct client ids",
)
_INT = (_is_int, f"an integer in -{MAX_META_INT}..{MAX_META_INT}")
_DEADLINE = (
    lambda v: v is None or (_is_number(v) and v > 0),
    "null or a positive number of seconds",
)


# --------------------------------------------------------------------------- payloads


@dataclass(frozen=True)
class StartInstruction:
    """Server to client: the run may begin (``ok``), or is aborted with ``reason``."""

    TAG: ClassVar[Tag] = Tag.START
    KIND: ClassVar[str] = "start"

    ok: bool
    reason: str = ""

    def to_message(self) -> Message:
        """Return the wire message."""
        return Message(kind=self.KIND, meta={"ok": self.ok, "reason": self.reason})

    @classmethod
    def from_message(cls, msg: Message) -> StartInstruction:
        """Check and convert a received message; raises MessageError if it does not fit."""
        meta = _check_meta(msg, cls.KIND, {"ok": _BOOL, "reason": _STR})
        return cls(ok=meta["ok"], reason=meta["reason"])


@dataclass(frozen=True, kw_only=True)
class TrainInstruction:
    """Server to a client rank: train round ``round`` for the clients ``clients``.

    Attributes:
        round: Round index, from 0.
        clients: The ids of the rank's clients asked this round, in the order the rank
            answers them (one UPDATE or ERROR each).
        deadline_s: Seconds the client has to reply, or None for no deadline.
        options: JSON-safe per-round options (for example a changed learning rate).
    """

    TAG: ClassVar[Tag] = Tag.TRAIN
    KIND: ClassVar[str] = "train"

    round: int
    clients: tuple[int, ...] = ()
    deadline_s: float | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def to_message(self) -> Message:
        """Return the wire message."""
        deadline = None if self.deadline_s is None else float(self.deadline_s)
        return Message(
            kind=self.KIND,
            meta={"round": self.round, "clients": [int(c) for c in self.clients],
                  "deadline_s": deadline, "options": self.options},
        )

    @classmethod
    def from_message(cls, msg: Message) -> TrainInstruction:
        """Check and convert a received message; raises MessageError if it does not fit."""
        meta = _check_meta(
            msg, cls.KIND, {"round": _COUNT, "clients": _CLIENT_IDS, "deadline_s": _DEADLINE,
                            "options": _DICT}
        )
        deadline = meta["deadline_s"]
        return cls(
            round=meta["round"],
            clients=tuple(meta["clients"]),
            deadline_s=None if deadline is None else float(deadline),
            options=meta["options"],
        )


UPDATE_KINDS = ("decoder", "model")
"""What a :class:`ClientUpdate` carries: the decoder (ALIGN-FL) or the whole VAE."""


@dataclass(frozen=True, kw_only=True, eq=False)
class ClientUpdate:
    """Client to server: what a client shares after a round.

    ``kind`` says what ``state`` holds (:data:`UPDATE_KINDS`): ``"decoder"`` (ALIGN-FL:
    the decoder only, with the client's latent prior) or ``"model"`` (the averaging
    strategies: the whole VAE, encoder included). On the wire the state arrays are named
    ``state/<key>`` and the prior arrays ``prior/<key>``, state first, each in insertion
    order.

    Attributes:
        round: Round index the update belongs to.
        client_id: The client's id.
        spec: JSON-safe architecture dict from which the server rebuilds the model.
        state: Decoder or whole-VAE state dict as NumPy arrays.
        kind: ``"decoder"`` or ``"model"``.
        prior: Latent prior arrays (see :mod:`alignfl_mpi.prior`).
        metrics: Scalar training metrics of the round.
    """

    TAG: ClassVar[Tag] = Tag.UPDATE
    KIND: ClassVar[str] = "update"
    STATE_PREFIX: ClassVar[str] = "state/"
    PRIOR_PREFIX: ClassVar[str] = "prior/"

    round: int
    client_id: int
    spec: dict[str, Any]
    state: dict[str, np.ndarray]
    kind: str = "decoder"
    prior: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def to_message(self) -> Message:
        """Return the wire message (finiteness is checked by the receiver)."""
        tensors = {self.STATE_PREFIX + k: v for k, v in self.state.items()}
        tensors.update({self.PRIOR_PREFIX + k: v for k, v in self.prior.items()})
        metrics = {k: float(v) for k, v in self.metrics.items()}
        meta = {
            "round": self.round,
            "client_id": self.client_id,
            "spec": self.spec,
            "update_kind": self.kind,
            "metrics": metrics,
        }
        return Message(kind=self.KIND, meta=meta, tensors=tensors)

    @classmethod
    def from_message(cls, msg: Message) -> ClientUpdate:
        """Check and convert a received message.

        Raises:
            MessageError: On missing or mistyped meta keys, a tensor without the ``state/`` or
                ``prior/`` prefix, an empty state, non-numeric metrics, or NaN/Inf in any array.
        """
        checks = {"round": _COUNT, "client_id": _COUNT, "spec": _DICT, "update_kind": _STR,
                  "metrics": _DICT}
        meta = _check_meta(msg, cls.KIND, checks, tensors=True)
        where = f"update from client {meta['client_id']} for round {meta['round']}"
        if meta["update_kind"] not in UPDATE_KINDS:
            raise MessageError(f"{where}: unknown update kind {_short(meta['update_kind'])}; "
                               f"expected one of {', '.join(UPDATE_KINDS)}")
        metrics = meta["metrics"]
        if len(metrics) > MAX_METRICS:
            raise MessageError(f"{where}: {len(metrics)} metrics, over the limit of {MAX_METRICS}")
        for key, value in metrics.items():
            if not is_metric_name(key):
                raise MessageError(f"{where}: metric name {_short(key)} is not allowed (letters, "
                                   "digits and _, at most 64, not a reserved name)")
            if not _is_number(value):
                raise MessageError(f"{where}: metric {key!r} must be a finite number, "
                                   f"got {_short(value)}")
        state: dict[str, np.ndarray] = {}
        prior: dict[str, np.ndarray] = {}
        for name, array in msg.tensors.items():
            if name.startswith(cls.STATE_PREFIX) and len(name) > len(cls.STATE_PREFIX):
                state[name[len(cls.STATE_PREFIX) :]] = array
            elif name.startswith(cls.PRIOR_PREFIX) and len(name) > len(cls.PRIOR_PREFIX):
                prior[name[len(cls.PRIOR_PREFIX) :]] = array
            else:
                raise MessageError(
                    f"{where}: tensor {name!r} is neither 'state/...' nor 'prior/...'"
                )
            _check_finite(array, where=where, name=name)
        if not state:
            raise MessageError(f"{where}: the {meta['update_kind']} state is empty")
        return cls(
            round=meta["round"],
            client_id=meta["client_id"],
            spec=meta["spec"],
            state=state,
            kind=meta["update_kind"],
            prior=prior,
            metrics={k: float(v) for k, v in metrics.items()},
        )


def _check_finite(array: np.ndarray, *, where: str, name: str) -> None:
    """Raise MessageError if a floating-point array holds NaN or Inf."""
    if array.dtype.kind != "f" or np.isfinite(array).all():
        return
    n_nan = int(np.isnan(array).sum())
    n_inf = int(np.isinf(array).sum())
    raise MessageError(f"{where}: non-finite values in {name} ({n_nan} NaN, {n_inf} Inf)")


@dataclass(frozen=True, kw_only=True)
class RemoteError:
    """Client to server: an exception on a client, as data.

    Attributes:
        rank: Rank of the failing process.
        host: Its host name.
        round: Round in which it failed, or -1 before the first round.
        client_id: The client whose set-up or round failed, or -1 for the rank itself.
        exc_type: Qualified exception type name, for example ``"ValueError"``.
        message: ``str(exc)``.
        traceback: Formatted traceback (at most the last :data:`MAX_TRACEBACK_CHARS` characters).
    """

    TAG: ClassVar[Tag] = Tag.ERROR
    KIND: ClassVar[str] = "error"

    rank: int
    host: str
    round: int
    exc_type: str
    message: str
    traceback: str
    client_id: int = -1

    @classmethod
    def from_exception(cls, exc: BaseException, *, rank: int, round: int,  # noqa: A002
                       client_id: int = -1) -> RemoteError:
        """Capture an exception on this host.

        Args:
            exc: The exception (its ``__traceback__`` is formatted).
            rank: This process's rank.
            round: The current round, or -1 before the first round.

        Returns:
            The error payload.

        >>> err = RemoteError.from_exception(ValueError("boom"), rank=2, round=0)
        >>> err.exc_type, err.message, err.rank
        ('ValueError', 'boom', 2)
        """
        exc_cls = type(exc)
        exc_type = exc_cls.__qualname__
        if exc_cls.__module__ != "builtins":
            exc_type = f"{exc_cls.__module__}.{exc_type}"
        text = "".join(traceback_module.format_exception(exc))
        return cls(
            rank=rank,
            host=socket.gethostname(),
            round=round,
            exc_type=exc_type,
            message=str(exc),
            traceback=text[-MAX_TRACEBACK_CHARS:],
            client_id=client_id,
        )

    def summary(self) -> str:
        """One line for logs: where it failed, the type and the first line of the message."""
        first = self.message.strip().splitlines()[0] if self.message.strip() else ""
        who = f"client {self.client_id} on " if self.client_id >= 0 else ""
        where = f"{who}rank {self.rank} on {self.host} failed in round {self.round}"
        return f"{where}: {self.exc_type}: {first}"

    def to_message(self) -> Message:
        """Return the wire message."""
        meta = {
            "rank": self.rank,
            "host": self.host,
            "round": self.round,
            "exc_type": self.exc_type,
            "message": self.message,
            "traceback": self.traceback,
            "client_id": self.client_id,
        }
        return Message(kind=self.KIND, meta=meta)

    @classmethod
    def from_message(cls, msg: Message) -> RemoteError:
        """Check and convert a received message; raises MessageError if it does not fit."""
        checks = {
            "rank": _COUNT,
            "host": _STR,
            "round": _INT,
            "exc_type": _STR,
            "message": _LONG_STR,
            "traceback": _LONG_STR,
            "client_id": _INT,
        }
        meta = _check_meta(msg, cls.KIND, checks)
        return cls(**meta)


@dataclass(frozen=True)
class Stop:
    """Server to client: finish and exit."""

    TAG: ClassVar[Tag] = Tag.STOP
    KIND: ClassVar[str] = "stop"

    reason: str = ""

    def to_message(self) -> Message:
        """Return the wire message."""
        return Message(kind=self.KIND, meta={"reason": self.reason})

    @classmethod
    def from_message(cls, msg: Message) -> Stop:
        """Check and convert a received message; raises MessageError if it does not fit."""
        meta = _check_meta(msg, cls.KIND, {"reason": _STR})
        return cls(reason=meta["reason"])


@dataclass(frozen=True, kw_only=True)
class Bye:
    """Client to server: the answer to STOP; the client sends nothing after it."""

    TAG: ClassVar[Tag] = Tag.BYE
    KIND: ClassVar[str] = "bye"

    client_id: int

    def to_message(self) -> Message:
        """Return the wire message."""
        return Message(kind=self.KIND, meta={"client_id": self.client_id})

    @classmethod
    def from_message(cls, msg: Message) -> Bye:
        """Check and convert a received message; raises MessageError if it does not fit."""
        meta = _check_meta(msg, cls.KIND, {"client_id": _COUNT})
        return cls(client_id=meta["client_id"])


@dataclass(frozen=True, kw_only=True)
class Progress:
    """Client to server: ``done`` of ``total`` optimizer steps of round ``round`` are done."""

    TAG: ClassVar[Tag] = Tag.PROGRESS
    KIND: ClassVar[str] = "progress"

    round: int
    client_id: int
    done: int
    total: int

    def to_message(self) -> Message:
        """Return the wire message."""
        return Message(kind=self.KIND, meta={"round": self.round, "client_id": self.client_id,
                                             "done": self.done, "total": self.total})

    @classmethod
    def from_message(cls, msg: Message) -> Progress:
        """Check and convert a received message; raises MessageError if it does not fit."""
        meta = _check_meta(msg, cls.KIND, {"round": _COUNT, "client_id": _COUNT,
                                           "done": _COUNT, "total": _COUNT})
        if meta["done"] > meta["total"]:
            raise MessageError(f"progress {meta['done']}/{meta['total']}: done exceeds total")
        return cls(**meta)


@dataclass(frozen=True, kw_only=True)
class Ready:
    """Client to server: set-up is done; where the client runs and on how much data.

    Attributes:
        client_id: The client's id.
        host: Host name.
        device: Torch device string, e.g. ``"cuda:1"`` or ``"cpu"``.
        n_samples: Local training samples.
        setup_s: Seconds the set-up took.
    """

    TAG: ClassVar[Tag] = Tag.READY
    KIND: ClassVar[str] = "ready"

    client_id: int
    host: str
    device: str
    n_samples: int
    setup_s: float

    def to_message(self) -> Message:
        """Return the wire message."""
        return Message(kind=self.KIND, meta={"client_id": self.client_id, "host": self.host,
                                             "device": self.device, "n_samples": self.n_samples,
                                             "setup_s": float(self.setup_s)})

    @classmethod
    def from_message(cls, msg: Message) -> Ready:
        """Check and convert a received message; raises MessageError if it does not fit."""
        meta = _check_meta(msg, cls.KIND, {"client_id": _COUNT, "host": _STR, "device": _STR,
                                           "n_samples": _COUNT,
                                           "setup_s": (_is_number, "a number")})
        return cls(**{**meta, "setup_s": float(meta["setup_s"])})


@dataclass(frozen=True, kw_only=True, eq=False)
class GlobalModel:
    """Server to client: the global VAE's weights for round ``round`` (baselines only).

    Attributes:
        round: Round index the weights are for.
        state: Full VAE state dict as NumPy arrays.
    """

    TAG: ClassVar[Tag] = Tag.MODEL
    KIND: ClassVar[str] = "model"

    round: int
    state: dict[str, np.ndarray]

    def to_message(self) -> Message:
        """Return the wire message."""
        return Message(kind=self.KIND, meta={"round": self.round}, tensors=dict(self.state))

    @classmethod
    def from_message(cls, msg: Message) -> GlobalModel:
        """Check and convert a received message; raises MessageError if it does not fit."""
        meta = _check_meta(msg, cls.KIND, {"round": _COUNT}, tensors=True)
        for name, array in msg.tensors.items():
            _check_finite(array, where=f"global model for round {meta['round']}", name=name)
        return cls(round=meta["round"], state=dict(msg.tensors))


Payload = (StartInstruction | TrainInstruction | ClientUpdate | RemoteError | Stop | Ready
           | GlobalModel | Bye | Progress)
"""Any payload dataclass."""

PAYLOAD_TYPES: dict[Tag, Any] = {  # the payload classes (TAG, to/from_message)
    Tag.START: StartInstruction,
    Tag.TRAIN: TrainInstruction,
    Tag.UPDATE: ClientUpdate,
    Tag.ERROR: RemoteError,
    Tag.STOP: Stop,
    Tag.READY: Ready,
    Tag.MODEL: GlobalModel,
    Tag.BYE: Bye,
    Tag.PROGRESS: Progress,
}
"""The payload class carried under each tag."""


def parse_payload(tag: Tag, msg: Message) -> Payload:
    """Convert a message received under ``tag`` into its payload dataclass.

    Args:
        tag: The MPI tag it arrived with.
        msg: The decoded message.

    Returns:
        The payload.

    Raises:
        MessageError: If the message kind does not belong to the tag or a field is invalid.

    >>> parse_payload(Tag.STOP, Stop("done").to_message())
    Stop(reason='done')
    """
    return PAYLOAD_TYPES[Tag(tag)].from_message(msg)
