"""Tests for alignfl_mpi.checkpoint: the clients' raw checkpoint format, its atomic write
(O_DIRECT, or buffered where the file system refuses it) and the one reader of both formats."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from strategy_helpers import local_round

from alignfl_mpi import checkpoint
from alignfl_mpi.arrays import state_arrays
from alignfl_mpi.checkpoint import (
    RAW_MAGIC,
    load_checkpoint,
    save_checkpoint,
    save_raw_checkpoint,
)
from alignfl_mpi.client import new_local_state
from alignfl_mpi.config import ClientConfig, ModelConfig
from alignfl_mpi.errors import AlignFLError

CPU = torch.device("cpu")
CFG = ClientConfig(model=ModelConfig(hidden=(16, 8)), local_epochs=1, batch_size=16, lr=1e-2)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def assert_same_tree(a: Any, b: Any, where: str = "state") -> None:
    """Equal values of equal types (any mapping reads back as a dict), tensors by dtype,
    shape and bits."""
    kind = dict if isinstance(a, dict) else type(a)
    assert isinstance(b, kind) if kind is dict else type(b) is kind, \
        f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a,
                           b.view(torch.uint8) if b.dtype == torch.bool else b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), where
    else:
        assert a == b, where


def trained_state(images: torch.Tensor, strategy: str = "align-fl"):
    state = new_local_state(0, CFG, seed=3, device=CPU)
    start = state_arrays(new_local_state(1, CFG, seed=3, device=CPU).vae)
    local_round(state, images, round_=0, seed=0, strategy=strategy, global_state=start)
    return state


def test_a_trained_client_state_round_trips_as_torch_save_does(images, tmp_path):
    state = trained_state(images, "moon")  # VAE, Adam state, MOON's previous models
    state.extra["privacy"] = {"secret": 2**63 - 5, "clip_bound": None, "sgd_history":
                              [[1.25, 0.01, 6]], "plan": {"sigma": float("inf")}}
    saved = state.state_dict()
    save_checkpoint(tmp_path / "torch.ckpt", saved)
    save_raw_checkpoint(tmp_path / "raw.ckpt", saved)
    assert (tmp_path / "raw.ckpt").read_bytes()[:8] == RAW_MAGIC
    # the reader takes both formats, and they agree value for value and type for type
    assert_same_tree(load_checkpoint(tmp_path / "torch.ckpt"), saved)
    assert_same_tree(load_checkpoint(tmp_path / "raw.ckpt"), saved)


@pytest.mark.parametrize("fresh", [False, True])
def test_resumed_client_repeats_the_next_round_bit_for_bit(images, tmp_path, fresh):
    """As the runtime checkpoints: ``checkpoint_state``, which leaves Adam's moments out only
    when ``fresh_optimizer`` clears them at the next round's start anyway."""
    cfg = dataclasses.replace(CFG, fresh_optimizer=fresh)
    state = new_local_state(0, cfg, seed=3, device=CPU)
    local_round(state, images, round_=0, seed=0)
    saved = state.checkpoint_state()
    assert bool(saved["optimizer"]["state"]) is not fresh and state.optimizer.state
    assert saved["optimizer"]["param_groups"] == state.optimizer.state_dict()["param_groups"]
    save_raw_checkpoint(tmp_path / "round_0001.ckpt", saved)
    save_raw_checkpoint(tmp_path / "whole.ckpt", state.state_dict())
    small = (tmp_path / "round_0001.ckpt").stat().st_size
    assert (small < (tmp_path / "whole.ckpt").stat().st_size / 2) is fresh
    after = local_round(state, images, round_=1, seed=0)
    resumed = new_local_state(0, cfg, seed=99, device=CPU)  # other initial weights
    resumed.load_state_dict(load_checkpoint(tmp_path / "round_0001.ckpt"))
    replay = local_round(resumed, images, round_=1, seed=0)
    assert replay.metrics["loss"] == after.metrics["loss"]
    for name, value in after.state.items():
        np.testing.assert_array_equal(replay.state[name], value, err_msg=name)
    for name, value in after.prior.items():
        np.testing.assert_array_equal(replay.prior[name], value, err_msg=name)
    assert_same_tree(resumed.optimizer.state_dict(), state.optimizer.state_dict())


def test_scalars_containers_and_arrays_keep_their_types(tmp_path):
    state = {"t": torch.arange(6, dtype=torch.int64).reshape(2, 3).t(),  # not contiguous
             "bf": torch.linspace(0, 1, 5).bfloat16(), "flags": torch.tensor([True, False]),
             "empty": torch.empty(0, 4), "scalar": torch.tensor(7.5),
             "np": np.arange(4, dtype=np.float64), "np_empty": np.zeros((0,), np.int32),
             "nums": [1, 2.5, float("nan"), float("-inf"), True, None, "é"],
             "pair": (0.9, 0.999), 3: {"nested": ((), [])}}
    save_raw_checkpoint(tmp_path / "c.ckpt", state)
    back = load_checkpoint(tmp_path / "c.ckpt")
    assert_same_tree(back, state)
    back["t"] += 1  # loaded tensors are writable and the caller's own
    back["np"] += 1
    assert state["t"][0, 0] == 0 and state["np"][0] == 0


def test_checkpoint_is_private_and_holds_no_pickle(tmp_path):
    old = os.umask(0o022)
    try:
        save_raw_checkpoint(tmp_path / "c.ckpt", {"w": torch.ones(3)})
    finally:
        os.umask(old)
    path = tmp_path / "c.ckpt"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    magic, n = struct.unpack_from("<8sQ", data)
    header = json.loads(data[16:16 + n])  # a JSON header, then raw bytes: nothing to run
    assert magic == RAW_MAGIC and header["arrays"] == [["torch", "float32", [3], 0, 12]]
    assert len(data) % 4096 == 0  # whole blocks, as O_DIRECT writes them


def test_values_that_cannot_be_stored_are_refused_before_writing(tmp_path):
    for bad in ({"s": {1, 2}}, {(1, 2): 0}, {"o": np.array([object()])}):
        with pytest.raises(TypeError, match="checkpoint"):
            save_raw_checkpoint(tmp_path / "c.ckpt", bad)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.ckpt"
    save_raw_checkpoint(path, {"w": torch.zeros(1000)})

    def half_then_fail(fd: int, buf: memoryview) -> None:
        os.write(fd, buf[:4096])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_all", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_raw_checkpoint(path, {"w": torch.ones(1000)})
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]  # no temporary left
    assert torch.equal(load_checkpoint(path)["w"], torch.zeros(1000))


@pytest.mark.parametrize("where", ["open", "write"])
def test_file_systems_without_o_direct_get_a_buffered_write(tmp_path, monkeypatch, where):
    if not getattr(os, "O_DIRECT", 0):
        pytest.skip("no O_DIRECT on this platform")
    real_open, real_write = os.open, os.write
    direct_fds: set[int] = set()
    calls: list[bool] = []

    def fake_open(path: Any, flags: int, *args: Any) -> int:
        if not flags & os.O_CREAT:  # not the temporary's creation
            calls.append(bool(flags & os.O_DIRECT))
        if flags & os.O_DIRECT and where == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags & ~os.O_DIRECT, *args)
        (direct_fds.add if flags & os.O_DIRECT else direct_fds.discard)(fd)
        return fd

    def fake_write(fd: int, data: Any) -> int:
        if fd in direct_fds:  # a partial block, then the refusal
            real_write(fd, bytes(data[:100]))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(checkpoint.os, "open", fake_open)
    monkeypatch.setattr(checkpoint.os, "write", fake_write)
    state = {"w": torch.randn(3000), "n": 4}
    save_raw_checkpoint(tmp_path / "c.ckpt", state)
    monkeypatch.undo()
    assert calls == [True, False]  # O_DIRECT first, then the ordinary write
    assert_same_tree(load_checkpoint(tmp_path / "c.ckpt"), state)


def test_the_staging_buffer_is_reused(tmp_path):
    save_raw_checkpoint(tmp_path / "a.ckpt", {"w": torch.randn(50_000)})
    first = checkpoint._stage
    save_raw_checkpoint(tmp_path / "b.ckpt", {"w": torch.randn(40_000)})
    assert checkpoint._stage is first  # no new memory per checkpoint
    save_raw_checkpoint(tmp_path / "c.ckpt", {"w": torch.randn(900_000)})
    assert checkpoint._stage is not None and len(checkpoint._stage) >= 3_600_000


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    n = struct.unpack_from("<8sQ", data)[1]
    header = json.loads(data[16:16 + n])
    if how == "truncated":
        del data[len(data) // 2:]
    elif how == "header length":
        struct.pack_into("<8sQ", data, 0, RAW_MAGIC, 2**40)
    else:
        if how == "dtype":
            header["arrays"][0][1] = "object"
        elif how == "outside":
            header["arrays"][0][3] = header["data_bytes"]
        elif how == "shape":
            header["arrays"][0][2] = [10**6]
        elif how == "tag":
            header["tree"] = {"eval": "print(1)"}
        elif how == "index":
            header["tree"]["d"][0][1] = {"T": 7}
        new = json.dumps(header, separators=(",", ":")).encode()
        start = -(-(16 + n) // 64) * 64  # the data stay where they are
        assert len(new) <= start - 16
        new = new.ljust(max(n, len(new)))  # JSON may end in blanks
        data[8:16] = struct.pack("<Q", len(new))
        data[16:16 + len(new)] = new
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "header length", "dtype", "outside", "shape",
                                 "tag", "index"])
def test_a_damaged_checkpoint_is_one_line_error(tmp_path, how):
    path = tmp_path / "round_0002.ckpt"
    save_raw_checkpoint(path, {"w": torch.randn(5000), "n": 1})
    _corrupt(path, how)
    with pytest.raises(AlignFLError, match=r"round_0002.ckpt is unreadable \(\w+\); delete it"):
        load_checkpoint(path)


def test_no_byte_of_an_earlier_checkpoint_remains(tmp_path):
    """The staging buffer is reused: padding and header gaps are zeroed, so one client's
    checkpoint never carries bytes of another's."""
    secret = torch.full((40_000,), 7.0)  # 0x40e00000 in every word
    save_raw_checkpoint(tmp_path / "a.ckpt", {"s": secret, "name": "x" * 3000})
    save_raw_checkpoint(tmp_path / "b.ckpt", {"a": torch.zeros(3), "b": torch.zeros(5)})
    data = (tmp_path / "b.ckpt").read_bytes()
    assert struct.pack("<f", 7.0) not in data and b"xxxx" not in data
