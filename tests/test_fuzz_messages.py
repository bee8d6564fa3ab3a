"""Property-based fuzzing of everything that decodes a message from another rank.

The property: for any bytes, headers, tensor tables or payloads, decoding, payload
validation and the server's acceptance of an update raise nothing but
:class:`~alignfl_mpi.errors.MessageError` (and the server's state is unchanged when they
do). A few hundred examples run in the suite; ``python benchmarks/fuzz_messages.py`` runs
``ALIGNFL_FUZZ_EXAMPLES`` (default 10,000) of each.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignfl_mpi.config import load_config
from alignfl_mpi.errors import MessageError
from alignfl_mpi.messages import (
    ALLOWED_DTYPES,
    ClientUpdate,
    Message,
    Tag,
    decode_message,
    encode_message,
    parse_payload,
)
from alignfl_mpi.models import build_decoder, model_spec
from alignfl_mpi.prior import standard_normal_prior
from alignfl_mpi.server import ServerState

EXAMPLES = int(os.environ.get("ALIGNFL_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="ALIGNFL_FUZZ_EXAMPLES" not in
                os.environ, suppress_health_check=[HealthCheck.too_slow,
                                                   HealthCheck.data_too_large])
LIMIT = 1 << 20

# --- values an attacker can put in JSON ------------------------------------------------------
huge_ints = st.sampled_from([2**31, 2**53 + 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**300])
ints = st.one_of(st.integers(-3, 40), huge_ints)
floats = st.floats(allow_nan=False, allow_infinity=False)
texts = st.one_of(st.text(max_size=12), st.sampled_from(["", "\x00", "a\x00b", "\ud800",
                                                         "x" * 3000, "status", "loss"]))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)), max_leaves=12)

META_KEYS = ["round", "client_id", "spec", "metrics", "ok", "reason", "deadline_s", "options",
             "rank", "host", "exc_type", "message", "traceback", "device", "n_samples",
             "setup_s"]
KINDS = ["update", "error", "ready", "bye", "start", "train", "stop", "model", "x", ""]
metas = st.dictionaries(st.one_of(st.sampled_from(META_KEYS), texts), json_values, max_size=8)
specs = st.fixed_dictionaries({"arch": st.sampled_from(["mlp", "conv", "nope", 3])}, optional={
    "latent_dim": st.one_of(st.integers(-1, 6), huge_ints, floats, texts),
    "hidden": st.one_of(st.lists(st.one_of(st.integers(-2, 64), huge_ints), max_size=5),
                        texts, json_values),
    "image_shape": st.one_of(st.just([1, 28, 28]), st.lists(st.integers(-1, 40), max_size=4)),
    "spectral_norm": st.one_of(st.booleans(), ints),
    "n_classes": st.one_of(st.integers(-1, 12), huge_ints),
    "extra": json_values,
})
entry = st.fixed_dictionaries({
    "name": texts, "dtype": st.sampled_from([*ALLOWED_DTYPES, "float16", "object", ""]),
    "shape": st.one_of(st.lists(st.one_of(st.integers(0, 9), huge_ints), max_size=4),
                       json_values),
    "offset": st.one_of(st.integers(0, 64), huge_ints, json_values),
    "nbytes": st.one_of(st.integers(0, 64), huge_ints, json_values)})


def hand_built(header: object, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return b"AFL1" + struct.pack("<I", len(raw)) + raw + data


def decode_everywhere(buf: bytes) -> None:
    """Decode under every tag, as the transport would; only MessageError may escape."""
    try:
        msg = decode_message(buf, max_bytes=LIMIT)
    except MessageError:
        return
    for tag in Tag:
        try:
            parse_payload(tag, msg)
        except MessageError:
            pass


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(buf: bytes) -> None:
    decode_everywhere(buf)
    decode_everywhere(b"AFL1" + buf)


@FUZZ
@given(st.sampled_from(KINDS), metas, st.lists(entry, max_size=3), st.binary(max_size=96))
def test_random_headers_and_tensor_tables(kind, meta, entries, data) -> None:
    decode_everywhere(hand_built({"kind": kind, "meta": meta, "tensors": entries}, data))
    decode_everywhere(hand_built({"kind": kind, "meta": meta, "tensors": []}, b""))


# --- the server's acceptance of a decoded update -----------------------------------------------
@pytest.fixture(scope="module")
def server() -> ServerState:
    cfg = load_config(overrides=["server.model.hidden=[16, 8, 4]", "client.model.hidden=[16, 8, 4]",
                                 "server.max_message_mb=1"])
    return ServerState(cfg, device=torch.device("cpu"))


def honest_state(spec_dict: dict) -> dict[str, np.ndarray]:
    spec = model_spec(load_config(overrides=["client.model.hidden=[16, 8, 4]"]).client.model)
    assert spec.to_dict()["hidden"] == list(spec_dict["hidden"])
    torch.manual_seed(0)
    return {k: v.detach().numpy().copy() for k, v in build_decoder(spec).state_dict().items()}


arrays = st.one_of(
    st.builds(lambda v, n: np.full(n, v, np.float32), st.floats(width=32), st.integers(0, 4)),
    st.builds(lambda n: np.zeros((n, 2), np.float32), st.integers(0, 3)),
    st.just(np.array([1], np.int64)), st.just(np.zeros((0, 2**20), np.float32)))


@FUZZ
@given(data=st.data())
def test_update_acceptance(server: ServerState, data) -> None:
    spec = model_spec(load_config(overrides=["client.model.hidden=[16, 8, 4]"]).client.model)
    base = spec.to_dict()
    state = honest_state(base)
    prior = standard_normal_prior(spec.latent_dim).to_arrays()
    choice = data.draw(st.sampled_from(["spec", "state", "prior", "scale", "metrics"]))
    if choice == "spec":
        base = data.draw(specs)
    elif choice == "state":
        key = data.draw(st.sampled_from([*state, "junk"]))
        state[key] = data.draw(arrays)
    elif choice == "prior":
        key = data.draw(st.sampled_from(["weights", "means", "log_vars", "class_weights", "x"]))
        prior[key] = data.draw(arrays)
    elif choice == "scale":  # finite weights, possibly overflowing or saturating outputs
        factor = data.draw(st.sampled_from([0.0, 1e3, 1e19, 3e38, -3e38]))
        key = data.draw(st.sampled_from(list(state)))
        state[key] = (state[key] * factor).astype(np.float32)
    metrics = data.draw(st.dictionaries(texts, st.one_of(floats, ints), max_size=3)) \
        if choice == "metrics" else {"loss": 1.0}
    upd = ClientUpdate(round=0, client_id=0, spec=base, state=state, prior=prior, metrics={})
    msg = upd.to_message()
    msg = Message(kind=msg.kind, meta=dict(msg.meta, metrics=metrics), tensors=msg.tensors)
    try:
        buf = encode_message(msg)
    except MessageError:
        return
    before = dict(server.registry)
    try:
        payload = parse_payload(Tag.UPDATE, decode_message(buf, max_bytes=LIMIT))
        server.accept(0, spec=payload.spec, state=payload.state, prior=payload.prior,
                      round_=0, metrics=payload.metrics)
    except MessageError:
        assert server.registry == before  # a refused update changes nothing
        return
    # whatever was accepted, the synthetic pool stays finite and in range (a decoder that
    # slipped through the probe is evicted at sampling time)
    images, _ = server.sample_synthetic(round_=0, n_per_client=64)
    assert torch.isfinite(images).all()
    assert len(images) == 0 or (0 <= float(images.min()) and float(images.max()) <= 1)
    assert 0 in server.registry or server.last_evicted == [0]
