"""Atomic checkpoints: written to a temporary file in the same folder, then renamed.

A crash mid-write leaves the previous checkpoint intact. Two writers, one reader:

* :func:`save_checkpoint` (rank 0's server checkpoint, once per round): ``torch.save``.
* :func:`save_raw_checkpoint` (a client's checkpoint, once per client and round, so a rank
  hosting 100 clients writes 100 per round): a pickle-free raw file, a JSON header that
  describes the state's tree and the raw bytes of its tensors and arrays. It is copied into
  one reused page-aligned buffer and written with ``O_DIRECT`` where the file system takes
  it: no zip, no CRC, no pickling, and the bytes bypass the page cache, so the rank's
  memory does not grow by a copy of every client's state each round (on the 2-core VM of
  docs/PERFORMANCE.md, page-cache growth cost about 2 ms of CPU per MB).
* :func:`load_checkpoint` reads both: the raw format is parsed, never executed, and
  ``torch.save`` files are read with ``torch.load(weights_only=True)``; neither can run
  code.

>>> import tempfile
>>> path = Path(tempfile.mkdtemp()) / "c.ckpt"
>>> state = {"w": torch.arange(3.0), "step": 2, "betas": (0.9, 0.999), 0: [None, "x"]}
>>> _ = save_raw_checkpoint(path, state)
>>> back = load_checkpoint(path)
>>> back["w"].tolist(), back["step"], back["betas"], back[0]
([0.0, 1.0, 2.0], 2, (0.9, 0.999), [None, 'x'])
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import AlignFLError
from .fileio import atomic_path

CHECKPOINT_MODE = 0o600
"""Checkpoints are private to the owner (a client's holds its DP secret seed)."""

RAW_MAGIC = b"AFLCKPT1"
"""First 8 bytes of a raw checkpoint (format 1); ``torch.save`` files start with ``PK``."""

_PREAMBLE = struct.Struct("<8sQ")  # magic, header length
_TENSOR_ALIGN = 64  # each tensor's bytes start on a 64-byte boundary of the file
_BLOCK = 4096  # O_DIRECT: buffer address, file offset and length are multiples of it
_TORCH_DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
    torch.complex128)}
_NUMPY_KINDS = "biufc"  # bool, signed, unsigned, float, complex: never object or void


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (mode 0600) and return the path."""
    path = Path(path)
    with atomic_path(path, mode=CHECKPOINT_MODE) as tmp:
        torch.save(state, tmp)
    return path


def save_raw_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (mode 0600) in the raw format; return the path.

    ``state`` is a tree of dicts (string or integer keys), lists, tuples, ``None``, bools,
    ints, floats, strings, tensors (any device; read back on the CPU) and NumPy arrays.
    Like :func:`save_checkpoint` the file is renamed into place only once it is complete,
    and neither writer calls ``fsync``: the checkpoint survives a crash of the process, and
    with ``O_DIRECT`` its bytes are on the device, not only in the page cache, when the
    rename happens.

    Raises:
        TypeError: ``state`` holds a value of another type (nothing is written).
    """
    path = Path(path)
    arrays: list[torch.Tensor | np.ndarray] = []
    tree = _encode(state, arrays)
    table, spans, data_bytes = [], [], 0
    for a in arrays:  # each array's place in the data section, 64-byte aligned
        data_bytes = _align(data_bytes, _TENSOR_ALIGN)
        nbytes = _nbytes(a)
        dtype = str(a.dtype).removeprefix("torch.") if isinstance(a, torch.Tensor) \
            else a.dtype.str
        kind = "torch" if isinstance(a, torch.Tensor) else "numpy"
        table.append([kind, dtype, list(a.shape), data_bytes, nbytes])
        spans.append((data_bytes, nbytes))
        data_bytes += nbytes
    header = json.dumps({"tree": tree, "arrays": table, "data_bytes": data_bytes},
                        separators=(",", ":"), allow_nan=True).encode()
    start = _align(_PREAMBLE.size + len(header), _TENSOR_ALIGN)
    size = _align(start + data_bytes, _BLOCK)
    buf = _staging(size)
    view = np.frombuffer(buf, dtype=np.uint8, count=size)
    view[:start] = 0
    view[:_PREAMBLE.size] = np.frombuffer(_PREAMBLE.pack(RAW_MAGIC, len(header)), np.uint8)
    view[_PREAMBLE.size:_PREAMBLE.size + len(header)] = np.frombuffer(header, np.uint8)
    end = 0  # the buffer is reused: no byte of an earlier checkpoint may remain
    for a, (offset, nbytes) in zip(arrays, spans, strict=True):
        view[start + end:start + offset] = 0
        _copy_into(view[start + offset:start + offset + nbytes], a)
        end = offset + nbytes
    view[start + end:] = 0
    del view
    with atomic_path(path, mode=CHECKPOINT_MODE) as tmp:
        _write_file(tmp, memoryview(buf)[:size])
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` or :func:`save_raw_checkpoint`.

    Raises:
        AlignFLError: The file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise AlignFLError(f"checkpoint {path} not found; run without --resume to start fresh")
    try:
        with open(path, "rb") as f:
            raw = f.read(len(RAW_MAGIC)) == RAW_MAGIC
        if raw:
            return _load_raw(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt pickle stream, wrong format, truncated file, ...
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


# --- the raw format ---------------------------------------------------------------------
def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def _nbytes(a: torch.Tensor | np.ndarray) -> int:
    if isinstance(a, torch.Tensor):
        return a.numel() * a.element_size()
    return int(a.nbytes)


def _encode(obj: Any, arrays: list[torch.Tensor | np.ndarray]) -> Any:
    """``obj`` as JSON: containers tagged (``d`` dict, ``l`` list, ``t`` tuple), tensors
    (``T``) and arrays (``A``) by their index in ``arrays``, scalars as they are."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj  # repr round-trips exactly; NaN and infinities as JSON's extensions
    if isinstance(obj, torch.Tensor):
        arrays.append(obj.detach())
        return {"T": len(arrays) - 1}
    if isinstance(obj, np.ndarray) and obj.dtype.kind in _NUMPY_KINDS:
        arrays.append(obj)
        return {"A": len(arrays) - 1}
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise TypeError(f"checkpoint dict key {key!r} is not a string or an integer")
        return {"d": [[key, _encode(v, arrays)] for key, v in obj.items()]}
    if isinstance(obj, list):
        return {"l": [_encode(v, arrays) for v in obj]}
    if isinstance(obj, tuple):
        return {"t": [_encode(v, arrays) for v in obj]}
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__}")


def _decode(node: Any, arrays: list[torch.Tensor | np.ndarray]) -> Any:
    if not isinstance(node, dict):
        if node is None or isinstance(node, bool | int | float | str):
            return node
        raise ValueError("malformed checkpoint tree")
    if len(node) != 1:
        raise ValueError("malformed checkpoint tree")
    ((tag, value),) = node.items()
    if tag in ("T", "A"):
        return arrays[value]
    if tag == "d":
        return {key: _decode(v, arrays) for key, v in value}
    if tag == "l":
        return [_decode(v, arrays) for v in value]
    if tag == "t":
        return tuple(_decode(v, arrays) for v in value)
    raise ValueError(f"unknown checkpoint tree tag {tag!r}")


def _copy_into(dst: np.ndarray, a: torch.Tensor | np.ndarray) -> None:
    """Copy ``a``'s bytes into the uint8 view ``dst``."""
    if not len(dst):
        return
    if isinstance(a, torch.Tensor):
        torch.from_numpy(dst).copy_(a.cpu().contiguous().reshape(-1).view(torch.uint8))
    else:
        dst[:] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _load_raw(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        if f.readinto(data) != len(data):
            raise ValueError("short read")
    magic, header_len = _PREAMBLE.unpack_from(data)
    if magic != RAW_MAGIC or _PREAMBLE.size + header_len > len(data):
        raise ValueError("truncated header")
    header = json.loads(bytes(data[_PREAMBLE.size:_PREAMBLE.size + header_len]))
    start = _align(_PREAMBLE.size + header_len, _TENSOR_ALIGN)
    data_bytes = int(header["data_bytes"])
    if start + data_bytes > len(data):
        raise ValueError("truncated data")
    arrays: list[torch.Tensor | np.ndarray] = []
    for kind, dtype, shape, offset, nbytes in header["arrays"]:
        offset, nbytes, shape = int(offset), int(nbytes), [int(s) for s in shape]
        if offset < 0 or nbytes < 0 or offset + nbytes > data_bytes or min(shape, default=0) < 0:
            raise ValueError("array outside the data")
        if kind == "torch":
            tdtype = _TORCH_DTYPES[dtype]
            count = math.prod(shape)
            if count * torch.empty((), dtype=tdtype).element_size() != nbytes:
                raise ValueError("array size mismatch")
            arrays.append(torch.frombuffer(data, dtype=tdtype, count=count,
                                           offset=start + offset).reshape(shape)
                          if count else torch.empty(shape, dtype=tdtype))
        elif kind == "numpy":
            ndtype = np.dtype(dtype)
            if ndtype.kind not in _NUMPY_KINDS or math.prod(shape) * ndtype.itemsize != nbytes:
                raise ValueError("array dtype or size mismatch")
            arrays.append(np.frombuffer(data, dtype=ndtype, count=math.prod(shape),
                                        offset=start + offset).reshape(shape))
        else:
            raise ValueError(f"unknown array kind {kind!r}")
    state = _decode(header["tree"], arrays)
    if not isinstance(state, dict):
        raise ValueError("a checkpoint holds a dict")
    return state


# --- writing: one reused page-aligned buffer, O_DIRECT where the file system takes it ----
_stage: mmap.mmap | None = None


def _staging(size: int) -> mmap.mmap:
    """This process's staging buffer (page-aligned, reused), at least ``size`` bytes.

    One per process and not locked: checkpoints are written by one thread at a time.
    """
    global _stage
    if _stage is None or len(_stage) < size:
        _stage = mmap.mmap(-1, _align(size, _BLOCK))
    return _stage


def _write_file(tmp: Path, buf: memoryview) -> None:
    """Write ``buf`` (page-aligned, a multiple of 4096 bytes) to the existing file ``tmp``.

    ``O_DIRECT`` first; a file system that refuses it (tmpfs on older kernels, some FUSE
    and network file systems: ``EINVAL``) gets an ordinary buffered write.
    """
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            fd = os.open(tmp, os.O_WRONLY | direct)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        else:
            try:
                _write_all(fd, buf)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            finally:
                os.close(fd)
    fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        _write_all(fd, buf)
    finally:
        os.close(fd)


def _write_all(fd: int, buf: memoryview) -> None:
    done = 0
    while done < len(buf):
        n = os.write(fd, buf[done:])
        if n <= 0:
            raise OSError(errno.EIO, "write returned no progress")
        done += n
