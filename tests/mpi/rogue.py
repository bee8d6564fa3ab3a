"""A hostile client rank for MPMD launches: it speaks the wire format, then abuses it.

Usage (rank 2 of 4, beside three ``alignfl-mpi run`` ranks)::

    mpiexec -n 2 alignfl-mpi run --config C : -n 1 python tests/mpi/rogue.py C MODE MARKER \
            : -n 1 alignfl-mpi run --config C

It joins the collective start-up like a real client, answers START with a valid READY,
and then answers TRAIN of round r with hostile class r of the catalogue below; from round
len(catalogue) on, with the whole catalogue at once (most of it unsolicited). MODE:

* ``polite``: answers STOP with BYE, like a real client;
* ``flood``: after the last TRAIN, sends FLOOD_COUNT more messages (valid-looking,
  unsolicited, some over the size limit) before answering STOP with BYE;
* ``deaf``: never answers STOP (sleeps); the server must abort it within its bound.

MARKER is a file path that the pickle payload would create if anything unpickled it.
"""

import json
import pickle
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from alignfl_mpi.config import load_config  # noqa: E402
from alignfl_mpi.messages import (  # noqa: E402
    Bye,
    ClientUpdate,
    Message,
    Ready,
    RemoteError,
    Tag,
    decode_message,
    encode_message,
    parse_payload,
)
from alignfl_mpi.models import (
    build_decoder,  # noqa: E402
    model_spec,  # noqa: E402
)
from alignfl_mpi.prior import standard_normal_prior  # noqa: E402
from alignfl_mpi.transport import node_local  # noqa: E402

FLOOD_COUNT = 300

config_path, mode, marker = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = load_config(config_path)
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
me = rank - 1
node_local(comm)  # the collective every rank of alignfl-mpi run makes at start
limit = int(cfg.server.max_message_mb * 2**20)
spec = model_spec(cfg.client_config(me).model)
honest = {k: v.detach().numpy().copy() for k, v in build_decoder(spec).state_dict().items()}
prior = standard_normal_prior(spec.latent_dim).to_arrays()


class Exploit:
    """Pickle payload: unpickling it would create MARKER."""

    def __reduce__(self):
        return (Path(marker).touch, ())


def raw(tag, data):
    comm.Send([bytearray(data), MPI.BYTE], dest=0, tag=int(tag))


def send(tag, msg):
    raw(tag, encode_message(msg))


def update_msg(r, *, client_id=me, state=None, spec_dict=None, prior_arrays=None,
               metrics=None, round_=None):
    upd = ClientUpdate(round=r if round_ is None else round_, client_id=client_id,
                        spec=spec_dict or spec.to_dict(), state=state or honest,
                        prior=prior if prior_arrays is None else prior_arrays, metrics={})
    msg = upd.to_message()
    meta = dict(msg.meta, metrics=metrics if metrics is not None else {"loss": 1.0})
    return Message(kind=msg.kind, meta=meta, tensors=msg.tensors)


def hand_built(meta, entries, data):
    header = json.dumps({"kind": "update", "meta": meta, "tensors": entries}).encode()
    header += b" " * (-(8 + len(header)) % 8)
    return b"AFL1" + struct.pack("<I", len(header)) + header + data


def nan_decoder():
    """Finite weights whose forward pass overflows to inf - inf = NaN."""
    state = {k: v.copy() for k, v in honest.items()}
    names = [k for k in state if k.endswith("weight")]
    state[names[0]][:] = 3e38
    w = state[names[1]]
    w[:] = 3e38
    w.reshape(-1)[::2] = -3e38
    return state


def hostile(r):
    """(class name, tag, bytes) for every kind of bad message."""
    base = {"round": r, "client_id": me, "spec": spec.to_dict(), "metrics": {}}
    yield "random bytes", Tag.UPDATE, np.random.default_rng(r).bytes(4096)
    yield "pickle bytes", Tag.UPDATE, pickle.dumps(Exploit())
    yield "unknown tag", 99, encode_message(Message(kind="update"))
    yield "spoofed client id", Tag.UPDATE, encode_message(update_msg(r, client_id=0))
    yield "zero-size tensor with a huge dimension", Tag.UPDATE, hand_built(
        base, [{"name": "state/w", "dtype": "float32", "shape": [0, 2**62], "offset": 0,
                "nbytes": 0}], b"")
    yield "huge integer metric", Tag.UPDATE, encode_message(
        update_msg(r, metrics={"loss": 10**30}))
    yield "round over 2**63", Tag.UPDATE, encode_message(update_msg(r, round_=2**63))
    yield "empty metric name", Tag.UPDATE, encode_message(update_msg(r, metrics={"": 1.0}))
    yield "enormous spec", Tag.UPDATE, encode_message(update_msg(
        r, spec_dict={**spec.to_dict(), "hidden": [10**6, 10**6, 10**6]}))
    yield "NaN-output decoder", Tag.UPDATE, encode_message(update_msg(r, state=nan_decoder()))
    yield "prior variance", Tag.UPDATE, encode_message(update_msg(r, prior_arrays={
        **prior, "log_vars": np.full_like(prior["log_vars"], 100.0)}))
    yield "prior weights", Tag.UPDATE, encode_message(update_msg(r, prior_arrays={
        **prior, "weights": np.array([-0.5], np.float32)}))
    yield "wrong round", Tag.UPDATE, encode_message(update_msg(r, round_=r + 7))
    yield "NUL in error text", Tag.ERROR, encode_message(Message(kind="error", meta={
        "rank": rank, "host": "h", "round": r, "exc_type": "E", "message": "a\x00b",
        "traceback": "", "client_id": me}))
    yield "oversized", Tag.UPDATE, bytes(limit + 1024)
    yield "unsolicited ready", Tag.READY, encode_message(Ready(
        client_id=me, host="h", device="cpu", n_samples=1, setup_s=0.0).to_message())


def recv_from_server():
    status = MPI.Status()
    msg = comm.mprobe(source=0, tag=MPI.ANY_TAG, status=status)
    buf = np.empty(status.Get_count(MPI.BYTE), np.uint8)
    msg.Recv([buf, MPI.BYTE])
    tag = Tag(status.Get_tag())
    return tag, parse_payload(tag, decode_message(buf, max_bytes=2**31))


tag, start = recv_from_server()
assert tag == Tag.START and start.ok, start
send(Tag.READY, Ready(client_id=me, host="rogue", device="cpu", n_samples=1,
                      setup_s=0.0).to_message())
while True:
    tag, payload = recv_from_server()
    if tag == Tag.TRAIN:
        catalogue = list(hostile(payload.round))
        if payload.round < len(catalogue):
            # round r is answered by class r alone: each class is once the answer that
            # the server validates in depth
            _name, bad_tag, data = catalogue[payload.round]
            raw(bad_tag, data)
        else:  # later rounds: the whole catalogue at once, most of it unsolicited
            for _name, bad_tag, data in catalogue:
                raw(bad_tag, data)
        if mode == "flood" and payload.round == cfg.rounds - 1:
            flood = encode_message(update_msg(payload.round))
            for i in range(FLOOD_COUNT):
                raw(Tag.UPDATE, bytes(limit + 1) if i % 10 == 0 else flood)
    elif tag == Tag.STOP:
        if mode == "deaf":
            time.sleep(3600)
        send(Tag.BYE, Bye(client_id=me).to_message())
        break
    else:
        send(Tag.ERROR, RemoteError.from_exception(RuntimeError(f"unexpected {tag!r}"),
                                                   rank=rank, round=-1).to_message())
