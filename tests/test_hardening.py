"""Unit tests (no MPI) of the defences against broken or hostile ranks."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
from strategy_helpers import make_strategy

from alignfl_mpi.config import largest_message_bytes, load_config
from alignfl_mpi.errors import ConfigError, MessageError
from alignfl_mpi.messages import (
    ClientUpdate,
    Message,
    RemoteError,
    Tag,
    decode_message,
    encode_message,
    parse_payload,
)
from alignfl_mpi.models import build_decoder, model_spec
from alignfl_mpi.prior import GaussianMixturePrior, standard_normal_prior
from alignfl_mpi.runlock import RunLock
from alignfl_mpi.server import DecoderEntry, ServerState, probe_decoder, validate_update
from alignfl_mpi.strategies import build_strategy

CPU = torch.device("cpu")
HIDDEN = "[16, 8, 4]"


def _cfg(*over: str):
    return load_config(overrides=[f"server.model.hidden={HIDDEN}", f"client.model.hidden={HIDDEN}",
                                  "server.epochs=1", "server.batch_size=16", *over])


def _decoder_state(seed: int = 0) -> tuple[dict, dict]:
    spec = model_spec(_cfg().client.model)
    torch.manual_seed(seed)
    state = {k: v.detach().numpy().copy() for k, v in build_decoder(spec).state_dict().items()}
    return spec.to_dict(), state


def _roundtrip(msg: Message):
    return parse_payload(Tag.UPDATE, decode_message(encode_message(msg), max_bytes=1 << 22))


def _update(**meta) -> Message:
    spec, state = _decoder_state()
    msg = ClientUpdate(round=0, client_id=0, spec=spec, state=state,
                        prior=standard_normal_prior(2).to_arrays()).to_message()
    return Message(kind=msg.kind, meta={**msg.meta, **meta}, tensors=msg.tensors)


# --- message validation is total ------------------------------------------------------------
@pytest.mark.parametrize("meta, reason", [
    ({"metrics": {"loss": 10**400}}, "metric 'loss' must be a finite number"),
    ({"metrics": {"loss": 2**60}}, "metric 'loss' must be a finite number"),
    ({"metrics": {"": 1.0}}, "metric name '' is not allowed"),
    ({"metrics": {"status": 1.0}}, "metric name 'status' is not allowed"),
    ({"metrics": {f"m{i}": 1.0 for i in range(65)}}, "65 metrics, over the limit of 64"),
    ({"round": 2**63}, "'round' must be an integer in 0..2147483647"),
    ({"client_id": 2**31}, "'client_id' must be an integer in 0.."),
])
def test_update_meta_is_bounded(meta, reason):
    with pytest.raises(MessageError, match=reason):
        _roundtrip(_update(**meta))


def test_error_text_must_be_storable():
    err = RemoteError(rank=1, host="h", round=0, exc_type="E", message="ok", traceback="")
    for field, value in (("message", "a\x00b"), ("host", "\ud800"), ("exc_type", "x" * 3000)):
        msg = err.to_message()
        bad = Message(kind=msg.kind, meta={**msg.meta, field: value})
        with pytest.raises(MessageError, match=f"'{field}' must be a string"):
            parse_payload(Tag.ERROR, decode_message(
                encode_message(bad) if field != "host" else _ascii_encoded(bad), max_bytes=1 << 20))


def _ascii_encoded(msg: Message) -> bytes:
    """A lone surrogate can only travel JSON-escaped; build such a buffer by hand."""
    import json
    import struct

    raw = json.dumps({"kind": msg.kind, "meta": msg.meta, "tensors": []}).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return b"AFL1" + struct.pack("<I", len(raw)) + raw


def test_text_that_is_not_utf8_cannot_be_encoded():
    with pytest.raises(MessageError, match="not valid UTF-8"):
        encode_message(Message(kind="x", meta={"host": "\ud800"}))


def test_enormous_spec_is_refused_before_building():
    spec, state = _decoder_state()
    huge = {**spec, "hidden": [10**6, 10**6, 10**6]}
    with pytest.raises(MessageError, match="parameters, over the 262144"):
        validate_update(spec=huge, state=state, prior=standard_normal_prior(2).to_arrays(),
                        image_shape=(1, 28, 28), max_params=2**18)
    with pytest.raises(MessageError, match="over 1048576"):
        validate_update(spec={**spec, "hidden": [2**40]}, state=state,
                        prior=standard_normal_prior(2).to_arrays(), image_shape=(1, 28, 28))


def test_integer_decoder_tensors_are_refused():
    spec, state = _decoder_state()
    key = next(iter(state))
    state[key] = state[key].astype(np.int64)
    with pytest.raises(MessageError, match="not floating point"):
        validate_update(spec=spec, state=state, prior=standard_normal_prior(2).to_arrays(),
                        image_shape=(1, 28, 28))


def test_prior_variances_are_bounded():
    prior = standard_normal_prior(2).to_arrays()
    prior["log_vars"] = np.full_like(prior["log_vars"], 41.0)
    with pytest.raises(MessageError, match=r"log-variances must lie in \[-40, 40\]"):
        GaussianMixturePrior.from_arrays(prior)


# --- a finite update cannot poison the global model ------------------------------------------
def _entry(state: dict) -> DecoderEntry:
    spec_dict, _ = _decoder_state()
    from alignfl_mpi.models import ModelSpec

    spec = ModelSpec.from_dict(spec_dict)
    decoder = build_decoder(spec)
    decoder.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return DecoderEntry(client_id=0, spec=spec, decoder=decoder.eval(),
                        prior=standard_normal_prior(2), round=0, metrics={})


def test_probe_refuses_nan_constant_and_accepts_honest_decoders():
    _, honest = _decoder_state()
    probe_decoder(_entry(honest), device=CPU)  # a fresh decoder varies with z: accepted
    nan = {k: v.copy() for k, v in honest.items()}
    names = [k for k in nan if k.endswith("weight")]
    nan[names[0]][:] = 3e38
    nan[names[1]][:] = 3e38
    nan[names[1]].reshape(-1)[::2] = -3e38
    assert all(np.isfinite(v).all() for v in nan.values())
    with pytest.raises(MessageError, match="non-finite values"):
        probe_decoder(_entry(nan), device=CPU)
    const = {k: np.zeros_like(v) for k, v in honest.items()}
    with pytest.raises(MessageError, match="one constant image"):
        probe_decoder(_entry(const), device=CPU)


def test_probe_does_not_touch_the_global_rng():
    _, honest = _decoder_state()
    entry = _entry(honest)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    probe_decoder(entry, device=CPU)
    assert torch.equal(torch.rand(3), expected)


def test_server_refuses_nan_decoder_and_keeps_the_old_one():
    server = ServerState(_cfg(), device=CPU)
    spec, honest = _decoder_state()
    prior = standard_normal_prior(2).to_arrays()
    server.accept(0, spec=spec, state=honest, prior=prior, round_=0, metrics={})
    nan = {k: v.copy() for k, v in honest.items()}
    first = [k for k in nan if k.endswith("weight")][0]
    nan[first][:] = 3e38
    with pytest.raises(MessageError, match="decoder outputs"):
        server.accept(0, spec=spec, state={k: v * (1e30 if k == first else 1) for k, v
                                           in honest.items()} | {first: nan[first]},
                      prior={**prior, "means": np.full((1, 2), 1e30, np.float32)},
                      round_=1, metrics={})
    assert server.registry[0].round == 0


def test_global_training_refuses_nonfinite_pool_and_skips_nonfinite_steps():
    server = ServerState(_cfg(), device=CPU)
    before = {k: v.clone() for k, v in server.vae.state_dict().items()}
    pool = torch.rand(32, 1, 28, 28)
    pool[3, 0, 0, 0] = float("nan")
    out = make_strategy(cfg=server.cfg).train_global(server, pool, round_=0)
    assert out["pool_rejected"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in server.vae.state_dict().items())
    # a finite pool whose loss is not finite: every step is skipped, nothing is stepped
    original = server.vae.forward

    def inf_forward(x):
        recon, mu, logvar = original(x)
        return recon, mu * float("inf"), logvar

    server.vae.forward = inf_forward
    out = make_strategy(cfg=server.cfg).train_global(server, torch.rand(32, 1, 28, 28),
                                                      round_=1)
    assert out["skipped_steps"] == 2.0 and math.isnan(out["loss"])
    assert all(torch.equal(before[k], v) for k, v in server.vae.state_dict().items())


# --- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, reason", [
    ("server.start_timeout_s=-1", "'server.start_timeout_s' must be > 0"),
    ("server.final_drain_s=-1", "'server.final_drain_s' must be >= 0"),
    ("server.stop_timeout_s=0", "'server.stop_timeout_s' must be > 0"),
    ("server.max_message_mb=0.00001", "server.max_message_mb = 1e-05 is smaller than"),
])
def test_bad_server_values(override, reason):
    with pytest.raises(ConfigError, match=reason):
        build_strategy(load_config(overrides=[override]))


def test_message_limit_covers_the_largest_update():
    cfg = load_config()
    need, what = largest_message_bytes(cfg, whole_model=False)
    spec = model_spec(cfg.client.model)
    decoder = sum(v.numel() * 4 for v in build_decoder(spec).state_dict().values())
    assert decoder < need < decoder + 128 * 2**10 and what == "client 0's decoder update"
    fedavg = load_config(overrides=['strategy="fedavg"'])
    assert largest_message_bytes(fedavg, whole_model=True)[0] > 2 * decoder  # whole VAE
    with pytest.raises(ConfigError, match=r"set server.max_message_mb >= 2\.2"):
        build_strategy(load_config(overrides=["server.max_message_mb=1"]))


# --- the run-folder lock ----------------------------------------------------------------------
def test_run_lock_names_the_holder(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(ConfigError, match=f"in use by host {socket.gethostname()} pid "
                                          f"{os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    RunLock(tmp_path).acquire()


def test_decoder_with_nonfinite_samples_is_evicted_from_the_pool():
    server = ServerState(_cfg(), device=CPU)
    spec, honest = _decoder_state()
    prior = standard_normal_prior(2).to_arrays()
    server.accept(0, spec=spec, state=honest, prior=prior, round_=0, metrics={})
    server.accept(1, spec=spec, state=honest, prior=prior, round_=0, metrics={})
    bad = {k: v.copy() for k, v in honest.items()}
    names = [k for k in bad if k.endswith("weight")]
    bad[names[0]][:] = 3e38
    bad[names[1]][:] = 3e38
    bad[names[1]].reshape(-1)[::2] = -3e38
    server.registry[1] = _entry(bad)  # as if it had slipped through the probe
    images, labels = server.sample_synthetic(round_=0, n_per_client=32)
    assert torch.isfinite(images).all() and labels.unique().tolist() == [0]
    assert server.last_evicted == [1] and sorted(server.registry) == [0]
