"""Wire format and payload tests (pure Python, no MPI)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from alignfl_mpi.arrays import arrays_to_state, state_arrays
from alignfl_mpi.errors import MessageError
from alignfl_mpi.messages import (
    ALLOWED_DTYPES,
    MAGIC,
    PAYLOAD_TYPES,
    ClientUpdate,
    Message,
    RemoteError,
    StartInstruction,
    Stop,
    Tag,
    TrainInstruction,
    decode_message,
    encode_message,
    parse_payload,
)

LIMIT = 64 * 2**20


def make_update(*, seed: int = 0, client_id: int = 1, round: int = 3) -> ClientUpdate:  # noqa: A002
    """Build a small decoder update with mixed dtypes and a scalar tensor."""
    rng = np.random.default_rng(seed)
    state = {
        "fc.weight": rng.standard_normal((7, 5)).astype(np.float32),
        "fc.bias": rng.standard_normal(7).astype(np.float32),
        "bn.num_batches_tracked": np.array(12, dtype=np.int64),
        "out.weight": rng.standard_normal((3, 7)),
    }
    prior = {
        "weights": np.full(4, 0.25),
        "means": rng.standard_normal((4, 2)).astype(np.float32),
        "log_vars": np.zeros((4, 2), dtype=np.float32),
    }
    spec = {"name": "mlp_vae", "latent_dim": 2, "hidden": (32, 16), "in_shape": [1, 28, 28]}
    return ClientUpdate(
        round=round,
        client_id=client_id,
        spec=spec,
        state=state,
        prior=prior,
        metrics={"loss": 1.5, "n": 60},
    )


def split(buf: bytes | bytearray) -> tuple[dict, bytes]:
    """Split a valid buffer into its header object and data section."""
    (header_len,) = struct.unpack_from("<I", buf, 4)
    return json.loads(bytes(buf[8 : 8 + header_len])), bytes(buf[8 + header_len :])


def build(
    header: object, data: bytes = b"", *, magic: bytes = MAGIC, header_len: int | None = None
) -> bytes:
    """Assemble a buffer by hand from any header object, padding the header to 8 bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    length = len(raw) if header_len is None else header_len
    return magic + struct.pack("<I", length) + raw + data


def simple_buffer() -> bytes:
    """Encode a valid message with two tensors, the first of which needs padding after it."""
    msg = Message(kind="t", meta={}, tensors={"a": np.arange(3, dtype=np.int32), "b": np.ones(2)})
    return bytes(encode_message(msg))


def assert_arrays_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Assert the same names in the same order, same dtype and shape, identical bytes."""
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), name


# --------------------------------------------------------------------------- round trips


def roundtrip(msg: Message) -> Message:
    return decode_message(encode_message(msg), max_bytes=LIMIT)


def test_message_roundtrip_all_dtypes_bit_exact() -> None:
    rng = np.random.default_rng(1)
    tensors = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f64": np.array([np.pi, -0.0, 5e-324, np.finfo(np.float64).max]),
        "i64": np.array([[-(2**63), 2**63 - 1]], dtype=np.int64),
        "i32": np.arange(-5, 6, dtype=np.int32).reshape(11, 1, 1),
        "u8": np.arange(256, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    assert set(ALLOWED_DTYPES) == {"float32", "float64", "int64", "int32", "uint8", "bool"}
    out = roundtrip(Message(kind="demo", meta={"x": [1, "two", None, True, 0.5]}, tensors=tensors))
    assert out.kind == "demo"
    assert out.meta == {"x": [1, "two", None, True, 0.5]}
    assert_arrays_equal(out.tensors, tensors)


def test_roundtrip_big_endian_and_non_contiguous_inputs() -> None:
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    tensors = {
        "be": base.astype(">f4"),
        "strided": base[:, ::2],
        "fortran": np.asfortranarray(base),
    }
    out = roundtrip(Message(kind="k", tensors=tensors))
    assert out.tensors["be"].dtype == np.float32
    np.testing.assert_array_equal(out.tensors["be"], base.astype(np.float32))
    np.testing.assert_array_equal(out.tensors["strided"], base[:, ::2])
    np.testing.assert_array_equal(out.tensors["fortran"], base)


def test_layout_preamble_alignment_and_exact_length() -> None:
    buf = simple_buffer()
    assert buf[:4] == MAGIC
    header, data = split(buf)
    header_len = struct.unpack_from("<I", buf, 4)[0]
    assert (8 + header_len) % 8 == 0
    offsets = [t["offset"] for t in header["tensors"]]
    assert offsets == [0, 16]  # 12 bytes of int32, padded to 16
    assert len(data) == 16 + 16  # ends exactly at the end of the last tensor
    assert [t["dtype"] for t in header["tensors"]] == ["int32", "float64"]


def test_decoded_arrays_are_writable_copies() -> None:
    buf = bytearray(simple_buffer())
    out = decode_message(buf, max_bytes=LIMIT)
    buf[-16:] = bytes(16)  # the receiver reusing its buffer must not change the message
    np.testing.assert_array_equal(out.tensors["b"], [1.0, 1.0])
    out.tensors["b"][0] = 7.0
    assert out.tensors["b"][0] == 7.0


def test_decode_accepts_uint8_array_and_memoryview() -> None:
    buf = simple_buffer()
    for form in (np.frombuffer(buf, dtype=np.uint8), memoryview(buf)):
        np.testing.assert_array_equal(decode_message(form, max_bytes=LIMIT).tensors["a"], [0, 1, 2])


def test_decoder_update_roundtrip() -> None:
    update = make_update()
    msg = update.to_message()
    assert list(msg.tensors)[:2] == ["state/fc.weight", "state/fc.bias"]
    assert list(msg.tensors)[-1] == "prior/log_vars"
    out = parse_payload(Tag.UPDATE, roundtrip(msg))
    assert isinstance(out, ClientUpdate)
    assert (out.round, out.client_id) == (3, 1)
    assert out.spec == {
        "name": "mlp_vae",
        "latent_dim": 2,
        "hidden": [32, 16],
        "in_shape": [1, 28, 28],
    }
    assert out.metrics == {"loss": 1.5, "n": 60.0}
    assert all(isinstance(v, float) for v in out.metrics.values())
    assert_arrays_equal(out.state, update.state)
    assert_arrays_equal(out.prior, update.prior)


@pytest.mark.parametrize(
    "payload",
    [
        StartInstruction(True),
        StartInstruction(ok=False, reason="partition file has 3 clients, world has 4"),
        TrainInstruction(round=0),
        TrainInstruction(round=7, deadline_s=12.5, options={"lr": 1e-3, "epochs": 2}),
        RemoteError(
            rank=2,
            host="node7",
            round=-1,
            exc_type="ValueError",
            message="bad\nthing",
            traceback="tb",
        ),
        Stop(),
        Stop(reason="finished"),
    ],
)
def test_small_payload_roundtrip(payload: object) -> None:
    out = parse_payload(payload.TAG, roundtrip(payload.to_message()))
    assert type(out) is type(payload)
    assert out == payload


def test_payload_types_cover_every_tag() -> None:
    assert set(PAYLOAD_TYPES) == set(Tag)
    assert {cls.TAG for cls in PAYLOAD_TYPES.values()} == set(Tag)


def test_train_instruction_deadline_int_becomes_float() -> None:
    out = TrainInstruction.from_message(
        roundtrip(TrainInstruction(round=1, deadline_s=30).to_message())
    )
    assert out.deadline_s == 30.0 and isinstance(out.deadline_s, float)


def test_remote_error_from_exception() -> None:
    def fail() -> None:
        raise KeyError("missing client 4")

    try:
        fail()
    except KeyError as exc:
        err = RemoteError.from_exception(exc, rank=4, round=2)
    assert (err.rank, err.round, err.exc_type) == (4, 2, "KeyError")
    assert err.message == "'missing client 4'"
    assert "in fail" in err.traceback and err.traceback.rstrip().endswith(
        "KeyError: 'missing client 4'"
    )
    assert err.host
    assert err.summary() == f"rank 4 on {err.host} failed in round 2: KeyError: 'missing client 4'"
    assert RemoteError.from_message(roundtrip(err.to_message())) == err


def test_remote_error_qualifies_non_builtin_types() -> None:
    err = RemoteError.from_exception(json.JSONDecodeError("x", "doc", 0), rank=1, round=0)
    assert err.exc_type == "json.decoder.JSONDecodeError"


def test_state_dict_helpers_roundtrip() -> None:
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    arrays = state_arrays(module.state_dict())
    assert list(arrays) == list(module.state_dict())
    assert arrays["1.num_batches_tracked"].dtype == np.int64
    arrays["0.weight"][0, 0] = 123.0  # a copy: the module is untouched
    assert module.state_dict()["0.weight"][0, 0].item() != 123.0
    tensors = arrays_to_state(roundtrip(Message(kind="s", tensors=arrays)).tensors)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    fresh.load_state_dict(tensors)
    assert torch.equal(fresh.state_dict()["0.weight"], torch.from_numpy(arrays["0.weight"]))


def test_state_dict_helpers_reject_bfloat16() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="bfloat16"):
        state_arrays({"w": torch.zeros(2, dtype=torch.bfloat16)})


# --------------------------------------------------------------------------- encode errors


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        (Message(kind=""), "kind"),
        (Message(kind="k", meta={"x": float("nan")}), "meta.x is nan"),
        (Message(kind="k", meta={"x": {1: 2}}), "non-string key"),
        (Message(kind="k", meta={"x": np.float32(1)}), "meta.x is a float32"),
        (Message(kind="k", tensors={"w": np.array([object()])}), "dtype object"),
        (Message(kind="k", tensors={"w": np.zeros(2, np.float16)}), "dtype float16"),
        (Message(kind="k", tensors={"w": [1.0]}), "not a NumPy array"),
        (Message(kind="k", tensors={"": np.zeros(1)}), "non-empty"),
    ],
)
def test_encode_rejects(msg: Message, reason: str) -> None:
    with pytest.raises(MessageError, match=reason):
        encode_message(msg)


# --------------------------------------------------------------------------- decode errors


def test_bad_magic() -> None:
    buf = bytearray(simple_buffer())
    buf[:4] = b"PK\x03\x04"
    with pytest.raises(MessageError, match="bad magic"):
        decode_message(buf, max_bytes=LIMIT)


def test_shorter_than_preamble() -> None:
    with pytest.raises(MessageError, match="shorter than the 8-byte preamble"):
        decode_message(b"AFL", max_bytes=LIMIT)


def test_header_length_beyond_buffer() -> None:
    buf = bytearray(simple_buffer())
    buf[4:8] = struct.pack("<I", 2**32 - 1)
    with pytest.raises(MessageError, match="header length 4294967295 exceeds"):
        decode_message(buf, max_bytes=LIMIT)


def test_unaligned_header_length() -> None:
    with pytest.raises(MessageError, match="unaligned"):
        decode_message(MAGIC + struct.pack("<I", 3) + b"{} ", max_bytes=LIMIT)


def test_message_over_max_bytes() -> None:
    buf = simple_buffer()
    with pytest.raises(MessageError, match=f"{len(buf)} bytes, over the limit of {len(buf) - 1}"):
        decode_message(buf, max_bytes=len(buf) - 1)
    assert decode_message(buf, max_bytes=len(buf)).kind == "t"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"{'kind': 'x'}", "not valid JSON"),
        (b"[1, 2, 3]", "JSON list, not an object"),
        (b'"just a string"', "JSON str, not an object"),
        (b'{"kind": "x", "meta": {"a": NaN}, "tensors": []}', "NaN is not allowed"),
        (b'{"kind": "x", "meta": {"a": 1e999}, "tensors": []}', "out of range"),
        (b'{"kind": "x", "kind": "y", "meta": {}, "tensors": []}', "duplicate key"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"kind": "x", "meta": {}}', "header keys"),
        (b'{"kind": "x", "meta": {}, "tensors": [], "code": "rm -rf"}', "header keys"),
        (b'{"kind": 3, "meta": {}, "tensors": []}', "kind must be"),
        (b'{"kind": "x", "meta": [], "tensors": []}', "meta must be an object"),
        (b'{"kind": "x", "meta": {}, "tensors": {}}', "tensors must be a list"),
    ],
)
def test_bad_header(header: bytes, reason: str) -> None:
    with pytest.raises(MessageError, match=reason):
        decode_message(build(header), max_bytes=LIMIT)


def entry(**overrides: object) -> dict:
    base = {"name": "w", "dtype": "float64", "shape": [2], "offset": 0, "nbytes": 16}
    base.update(overrides)
    return base


DATA16 = np.array([1.0, 2.0]).tobytes()


@pytest.mark.parametrize(
    ("entries", "data", "reason"),
    [
        ([entry(dtype="object")], DATA16, "unknown dtype 'object'"),
        ([entry(dtype="<f8")], DATA16, "unknown dtype"),
        ([entry(shape=[3])], DATA16, r"shape \[3\] of float64 needs 24 bytes but nbytes is 16"),
        ([entry(shape=[2, -1], nbytes=16)], DATA16, "invalid shape"),
        ([entry(shape=[True, 2])], DATA16, "invalid shape"),
        ([entry(shape="2")], DATA16, "invalid shape"),
        ([entry(shape=[1] * 33, nbytes=8)], DATA16[:8], "invalid shape"),
        ([entry(offset=-8)], DATA16, "invalid offset"),
        ([entry(nbytes=16.0)], DATA16, "invalid offset"),
        ([entry(offset=8)], DATA16, "extends beyond"),
        ([entry(shape=[2**30], nbytes=2**33)], DATA16, "extends beyond"),
        ([entry(shape=[2**40], nbytes=2**43)], DATA16, "invalid shape"),
        ([entry(shape=[0, 2**31 - 1, 2**31 - 1], nbytes=0)], DATA16, "empty but its other"),
        ([entry(), entry(name="v", offset=8)], DATA16 * 2, "overlaps the previous tensor"),
        ([entry(), entry(name="v", offset=24)], DATA16 * 2 + bytes(8), "at offset 24, expected 16"),
        ([entry(), entry(name="w", offset=16)], DATA16 * 2, "duplicate tensor name 'w'"),
        ([entry()], DATA16 + b"junk", "4 trailing bytes"),
        ([], b"\x00", "1 trailing bytes"),
        ([entry(name="")], DATA16, "invalid name"),
        ([{"name": "w", "dtype": "float64"}], DATA16, "expected keys"),
        (["w"], DATA16, "expected keys"),
        ([entry(dtype="bool", shape=[2], nbytes=2)], b"\x01\x02", "bool bytes other than 0 and 1"),
        (
            [entry(dtype="int32", shape=[1], nbytes=4), entry(name="v", offset=8, nbytes=16)],
            b"\x01\x00\x00\x00\xff\x00\x00\x00" + DATA16,
            "non-zero padding",
        ),
    ],
)
def test_bad_tensor_table(entries: list, data: bytes, reason: str) -> None:
    buf = build({"kind": "x", "meta": {}, "tensors": entries}, data)
    with pytest.raises(MessageError, match=reason):
        decode_message(buf, max_bytes=LIMIT)


def test_hand_built_valid_buffer_decodes() -> None:
    """The hand builder itself is correct, so the failures above come from the one lie each."""
    buf = build(
        {"kind": "x", "meta": {}, "tensors": [entry(), entry(name="v", offset=16)]}, DATA16 * 2
    )
    out = decode_message(buf, max_bytes=LIMIT)
    np.testing.assert_array_equal(out.tensors["v"], [1.0, 2.0])


def test_errors_are_one_line() -> None:
    with pytest.raises(MessageError) as info:
        decode_message(build(b"{\n\n oops"), max_bytes=LIMIT)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- payload validation


def with_tensor(msg: Message, name: str, value: np.ndarray) -> Message:
    tensors = dict(msg.tensors)
    tensors[name] = value
    return Message(kind=msg.kind, meta=msg.meta, tensors=tensors)


def with_meta(msg: Message, **changes: object) -> Message:
    meta = {k: v for k, v in {**msg.meta, **changes}.items() if v is not ...}
    return Message(kind=msg.kind, meta=meta, tensors=msg.tensors)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_decoder_update_rejects_non_finite(bad: float) -> None:
    msg = make_update(client_id=5, round=2).to_message()
    weight = msg.tensors["state/fc.weight"].copy()
    weight[1, 2] = bad
    wire = roundtrip(with_tensor(msg, "state/fc.weight", weight))
    with pytest.raises(
        MessageError, match="client 5 for round 2: non-finite values in state/fc.weight"
    ):
        ClientUpdate.from_message(wire)


def test_decoder_update_rejects_non_finite_prior() -> None:
    msg = make_update().to_message()
    means = np.full((4, 2), np.nan, dtype=np.float32)
    with pytest.raises(MessageError, match=r"non-finite values in prior/means \(8 NaN, 0 Inf\)"):
        ClientUpdate.from_message(roundtrip(with_tensor(msg, "prior/means", means)))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"round": ...}, "meta keys"),
        ({"extra": 1}, "meta keys"),
        ({"round": -1}, r"'round' must be an integer in 0\.\."),
        ({"round": True}, r"'round' must be an integer in 0\.\."),
        ({"client_id": "3"}, "'client_id' must be"),
        ({"spec": [1]}, "'spec' must be an object"),
        ({"metrics": {"loss": "low"}}, "metric 'loss' must be a finite number"),
        ({"metrics": {"ok": True}}, "metric 'ok' must be a finite number"),
    ],
)
def test_decoder_update_rejects_bad_meta(change: dict, reason: str) -> None:
    msg = with_meta(make_update().to_message(), **change)
    with pytest.raises(MessageError, match=reason):
        ClientUpdate.from_message(roundtrip(msg))


def test_decoder_update_rejects_bad_tensor_names_and_empty_state() -> None:
    msg = make_update().to_message()
    with pytest.raises(MessageError, match="'opt/momentum' is neither"):
        ClientUpdate.from_message(with_tensor(msg, "opt/momentum", np.zeros(1)))
    only_prior = Message(kind="update", meta=msg.meta, tensors={"prior/w": np.ones(1)})
    with pytest.raises(MessageError, match="decoder state is empty"):
        ClientUpdate.from_message(only_prior)


@pytest.mark.parametrize(
    ("tag", "msg", "reason"),
    [
        (Tag.UPDATE, Stop().to_message(), "expected a 'update' message, got 'stop'"),
        (Tag.START, Message(kind="start", meta={"ok": 1, "reason": ""}), "'ok' must be a bool"),
        (
            Tag.TRAIN,
            Message(kind="train", meta={"round": 1, "deadline_s": 0, "options": {}}),
            "deadline_s",
        ),
        (Tag.TRAIN, Message(kind="train", meta={"round": 1, "deadline_s": None}), "meta keys"),
        (
            Tag.STOP,
            Message(kind="stop", meta={"reason": ""}, tensors={"x": np.zeros(1)}),
            "must not carry tensors",
        ),
        (Tag.ERROR, Message(kind="error", meta={"rank": 1}), "meta keys"),
    ],
)
def test_payload_validation(tag: Tag, msg: Message, reason: str) -> None:
    with pytest.raises(MessageError, match=reason):
        parse_payload(tag, msg)


# --------------------------------------------------------------------------- fuzz


def test_random_truncations_and_corruptions_only_raise_message_error() -> None:
    rng = np.random.default_rng(1234)
    buffers = [bytes(encode_message(make_update(seed=s).to_message())) for s in range(3)]
    buffers.append(simple_buffer())
    outcomes = {"ok": 0, "error": 0}
    for _ in range(1500):
        buf = bytearray(buffers[rng.integers(len(buffers))])
        mode = rng.integers(3)
        if mode == 0:
            buf = buf[: rng.integers(len(buf))]
        elif mode == 1:
            for pos in rng.integers(len(buf), size=rng.integers(1, 4)):
                buf[pos] = rng.integers(256)
        else:
            pos = rng.integers(len(buf))
            buf = (
                buf[:pos]
                + bytes(rng.integers(0, 256, size=rng.integers(1, 16), dtype=np.uint8))
                + buf[pos:]
            )
        try:
            msg = decode_message(buf, max_bytes=LIMIT)
            if msg.kind == "update":
                ClientUpdate.from_message(msg)
        except MessageError as exc:
            assert "\n" not in str(exc)
            outcomes["error"] += 1
        else:
            outcomes["ok"] += 1
    assert outcomes["error"] > 1000  # truncations always fail; most other edits too
