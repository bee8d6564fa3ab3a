"""The server and client loops of ``alignfl-mpi run``, over a :class:`Transport`.

Launch::

    mpiexec -n 6 alignfl-mpi run                        # 1 server + 5 clients, paper setup
    mpiexec -n 6 alignfl-mpi run --config run.toml --resume

Protocol, one round ``r`` (server side / client side)::

    server_start:   START(ok | reason)  ->  client_start: load partition group, build VAE
    server_round:   TRAIN(r)            ->  client_round: E local epochs, fit prior
                    <- UPDATE(r) | ERROR   (decoder spec + weights + prior, never encoder/data)
                    sample, train global VAE, evaluate, write results, checkpoint
    server_stop:    STOP                ->  client_stop

A client that raises sends ERROR (rank, host, traceback) and the server counts a failure
for that client and round. A client that misses ``server.round_deadline_s`` is a
straggler: the server goes on with its stored decoder and takes the late UPDATE later.

Failures (docs/DESIGN.md, "Failure model"): any exception on rank 0 that is not a user
error before the first round aborts every rank within seconds (``MPI_Abort``), after one
line on stderr and the traceback in ``RUN_DIR/error.log``; the results file keeps every
completed round. A client rank whose own loop fails (outside the training step) sends an
ERROR naming no client and aborts the job; rank 0 stops on that ERROR at once. Every
message from a client is untrusted: a bad one is rejected with a
reason naming its rank. STOP is answered by BYE; the server waits at most
``server.stop_timeout_s`` for them (draining anything else) and aborts the rest.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .arrays import images_to_tensor, to_uint8_images
from .assess import RoundEvaluator, client_outlier_survival, reference_classifier
from .checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_raw_checkpoint,
    set_rng_state,
)
from .client import LocalState, SharedUpdate, new_local_state
from .config import DEFAULT_PRESET, RunConfig, load_config, participants_per_round, to_json
from .datasets import data_root as resolve_data_root
from .errors import AlignFLError, ConfigError, MessageError
from .messages import (
    Bye,
    ClientUpdate,
    Progress,
    Ready,
    RemoteError,
    StartInstruction,
    Stop,
    Tag,
    TrainInstruction,
)
from .partition import PartitionRequest, default_partition_path, make_partition
from .placement import place_clients, sample_participants
from .private import client_private_dir, ensure_private
from .progress import CLIENT_MIN_INTERVAL_S, ProgressDisplay, ProgressTable, StepReporter
from .results import RESULTS_NAME, ResultsWriter, load
from .runlock import RunLock
from .schema import CHECKPOINT_NAME, client_sizes, read_client, read_partition_info, read_split
from .server import ServerState
from .strategies import Strategy, build_strategy

log = logging.getLogger("alignfl_mpi")


# --- set-up ---------------------------------------------------------------------------
def setup_logging(rank: int, *, quiet: bool = False, verbose: bool = False) -> None:
    """``[rank N]``-prefixed logging; rank 0 at INFO, clients at WARNING unless verbose."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    if rank != 0 and not verbose:
        level = max(level, logging.WARNING)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"
                                           if verbose else f"[rank {rank}] %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    # Python warnings go through logging, printed by rank 0 and the first client only:
    # every client runs the same code, so the same warning would repeat once per rank
    logging.captureWarnings(True)
    if rank > 1 and not verbose:
        import warnings

        warnings.simplefilter("ignore")


def set_threads(local_size: int) -> int:
    """One share of the node's cores per rank, unless ``OMP_NUM_THREADS`` is set."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    n = max(1, (os.cpu_count() or 1) // max(1, local_size))
    torch.set_num_threads(n)
    return n


def pick_device(spec: str, *, local_rank: int) -> torch.device:
    """``auto`` -> ``cuda:{local_rank % n_gpus}`` when CUDA is present, else the CPU.

    Raises:
        ConfigError: A CUDA device is requested on a host without it.
    """
    if spec == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return torch.device(f"cuda:{local_rank % n}") if n else torch.device("cpu")
    if spec.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(spec[5:]) if ":" in spec else 0
        if index >= n:
            raise ConfigError(f"device {spec!r} requested but {socket.gethostname()} has "
                              f"{n} CUDA device(s); use device = \"auto\" or \"cpu\"")
    return torch.device(spec)


def resolve_config(args: Any) -> RunConfig:
    """The preset (``--preset``, default ``paper``), the config file on top, ``--set``
    overrides, then the shortcut flags."""
    overrides = list(args.set or [])
    if args.rounds is not None:
        overrides.append(f"rounds={args.rounds}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.output:
        overrides.append(f"output.dir={_toml_str(args.output)}")
    if args.data_root:
        overrides.append(f"data.data_root={_toml_str(args.data_root)}")
    preset = getattr(args, "preset", None) or DEFAULT_PRESET
    return load_config(args.config, overrides=overrides, preset=preset)


def _toml_str(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def partition_path(cfg: RunConfig) -> Path:
    """The configured partition file, or the default one under the data root."""

    if cfg.data.partition:
        return Path(cfg.data.partition)
    root = resolve_data_root(cfg.data.data_root or None)
    return default_partition_path(partition_request(cfg), root)


def partition_request(cfg: RunConfig) -> Any:

    d = cfg.data
    return PartitionRequest(dataset=d.dataset, scheme=d.scheme, n_clients=cfg.n_clients,
                            params=dict(d.scheme_params), n_outliers=d.outliers,
                            outlier_dataset=d.outlier_dataset or None,
                            outlier_client=d.outlier_client, seed=d.partition_seed)


def run_paths(cfg: RunConfig) -> tuple[Path, Path, Path]:
    """``(results file, checkpoint folder, png folder)`` of a run."""
    out = Path(cfg.output.dir)
    return out / RESULTS_NAME, out / "checkpoints", out / "png"


ERROR_LOG = "error.log"
"""File in the run folder that receives rank 0's traceback when it aborts the job."""


def prepare_run_dir(cfg: RunConfig) -> None:
    """Create the run folder and its sub-folders, or refuse with one line.

    Raises:
        ConfigError: A path (or one of its parents) exists but is not a folder, or it
            cannot be created.
    """
    results, ckpt_dir, png_dir = run_paths(cfg)
    folders = [results.parent]
    if cfg.output.checkpoint:
        folders.append(ckpt_dir)
    if cfg.output.png:
        folders.append(png_dir)
    for parent in results.parent.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"output path {results.parent} is under the file {parent}; "
                              "choose another --output")
    for folder in folders:
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"output path {folder} exists but is not a folder; remove it or "
                              "choose another --output")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the output folder {folder} ({exc.strerror or exc})"
                              "; choose another --output") from None
    if results.exists() and not results.is_file():
        raise ConfigError(f"{results} exists but is not a file; remove it or choose another "
                          "--output")


def _round_no(r: int) -> int:
    """The round number people and files see: the runtime's 0-based index + 1."""
    return r + 1


def _clean_text(text: str, limit: int = 2000) -> str:
    """A reason fit for logs and HDF5: valid UTF-8, no NUL, at most ``limit`` characters."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\0")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- entry point ----------------------------------------------------------------------
def main_run(args: Any, comm: Any = None) -> int:
    """``alignfl-mpi run``: rank 0 runs the server, ranks 1..N the clients.

    ``comm`` is the communicator of the run (``COMM_WORLD`` when None); every rank of it
    takes part. One set of processes may run several runs one after another, each on its
    own communicator (the tests do, to import torch once for several runs).
    """
    # the one deferred import: importing mpi4py initialises MPI, which only a launched
    # run may do (the loops above are tested without MPI, over a fake transport)
    from .transport import Transport, comm_world, node_local

    if comm is None:
        comm = comm_world()
    rank, size = comm.Get_rank(), comm.Get_size()
    local_rank, local_size = node_local(comm)
    setup_logging(rank, quiet=args.quiet, verbose=args.verbose)
    set_threads(local_size)
    try:
        cfg = resolve_config(args)
        strategy = build_strategy(cfg)
        if not 2 <= size <= cfg.n_clients + 1:
            n = cfg.n_clients
            fits = ("1 client runs on 1 client rank plus the server (mpiexec -n 2)" if n == 1
                    else f"{n} clients run on 1 to {n} client ranks plus the server "
                         f"(mpiexec -n 2 .. {n + 1})")
            raise ConfigError(f"world size {size} does not fit the config: {fits}")
    except AlignFLError:
        if rank == 0:
            raise  # the CLI prints it once; the other ranks exit quietly with the same status
        return 2
    transport = Transport(comm, max_message_bytes=int(cfg.server.max_message_mb * 2**20))
    if rank == 0:
        display = ProgressDisplay(enabled=not args.quiet, verbose=args.verbose,
                                  interval_s=cfg.output.progress_interval_s)
        return Server(transport, cfg, strategy, resume=args.resume, local_rank=local_rank,
                      display=display).run()
    return ClientLoop(transport, cfg, strategy, resume=args.resume, local_rank=local_rank).run()


# --- a rank that aborts the job ----------------------------------------------------
class RankAborted(AlignFLError):
    """A client rank reported a failure outside the training step, after which it aborts
    the job itself: rank 0 stops at once, so no round is recorded while the abort lands."""


def _rank_abort_notice(rcv: Any) -> RankAborted | None:
    """The :class:`RankAborted` for an ERROR that names no client (the rank's own loop
    failed), else None."""
    if rcv.ok and rcv.tag == Tag.ERROR and rcv.payload.client_id < 0:
        err: RemoteError = rcv.payload
        return RankAborted(f"client rank {rcv.source} failed outside training and aborts the "
                           f"job: {err.summary()}")
    return None


# --- client side ----------------------------------------------------------------------
@dataclass
class ClientSlot:
    """One client hosted by a client rank: its private state, data and checkpoints."""

    client_id: int
    ckpt_dir: Path
    resume: bool
    state: LocalState | None = None
    data: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    outliers: np.ndarray = field(default_factory=lambda: np.zeros((0, 28, 28), np.uint8))
    classifier: Any = None
    setup_error: BaseException | None = None
    spilled: bool = False  # its state is in SPILL_NAME in ckpt_dir, not in memory
    nbytes: int = 0  # its state's size when it last became resident (rank_memory_mb)


class ClientLoop:
    """A client rank: hosts its placed clients, answers each TRAIN with one UPDATE or ERROR
    per client asked, one client after another."""

    def __init__(self, transport: Any, cfg: RunConfig, strategy: Strategy, *, resume: bool,
                 local_rank: int) -> None:
        self.transport = transport
        self.cfg = cfg
        self.strategy = strategy
        self.rank = transport.rank
        self.resume = resume
        self.local_rank = local_rank
        self.slots: dict[int, ClientSlot] = {}
        self.client_id = self.rank - 1  # the client being served (set per client)
        self.global_state: dict[str, np.ndarray] | None = None  # the last MODEL received
        self.pending: list[Any] = []  # PROGRESS sends in flight
        self.updates: list[Any] = []  # UPDATE sends in flight (at most UPDATES_IN_FLIGHT)
        self.resident: list[int] = []  # clients whose state is in memory, least recent first

    # attributes of the client being served, for the per-client methods and test hooks
    @property
    def slot(self) -> ClientSlot:
        return self.slots[self.client_id]

    @property
    def state(self) -> LocalState | None:
        return self.slot.state

    @property
    def data(self) -> torch.Tensor | None:
        return self.slot.data

    @property
    def labels(self) -> torch.Tensor | None:
        return self.slot.labels

    def run(self) -> int:
        """Serve until STOP. A failure outside the training step aborts the job."""
        try:
            return self._serve()
        except BaseException as exc:  # the loop itself broke: never a silent exit
            log.error("client %d: %s: %s; aborting the job", self.client_id,
                      type(exc).__name__, exc, exc_info=True)
            try:
                err = RemoteError.from_exception(exc, rank=self.rank, round=-1)
                self.transport.isend(0, Tag.ERROR, err.to_message())  # rank 0 stops on it
            finally:
                from .transport import finalize_abort

                finalize_abort(self.transport.comm, 1)

    def _serve(self) -> int:
        start = self.client_start()
        if not start.ok:
            return 2
        while True:
            rcv = self.transport.recv(source=0)
            if rcv is None:
                continue
            if not rcv.ok:
                log.warning("bad message from the server ignored: %s", rcv.error)
                continue
            if rcv.tag == Tag.STOP:
                for pending in self.pending + self.updates:
                    pending.wait()
                first = min(self.slots) if self.slots else self.rank - 1
                self.transport.send(0, Tag.BYE, Bye(client_id=first).to_message())
                return 0
            if rcv.tag == Tag.MODEL:
                self.global_state = rcv.payload.state
            elif rcv.tag == Tag.TRAIN:
                self.client_round(rcv.payload)

    def client_start(self) -> StartInstruction:
        """Set up every client placed on this rank; one READY (or ERROR) per client."""
        rcv = self.transport.recv(source=0, tag=Tag.START)
        start = rcv.payload if rcv.ok else StartInstruction(ok=False, reason=str(rcv.error))
        if not start.ok:
            return start
        path = partition_path(self.cfg)
        placed = place_clients(client_sizes(path), n_ranks=self.transport.size - 1)
        for cid in placed[self.rank - 1]:
            # private: encoder, optimizer, accountant and the DP secret never go to the
            # run folder
            ckpt = client_private_dir(self.cfg.client_config(cid).private_dir,
                                      self.cfg.output.dir, cid)
            self.slots[cid] = ClientSlot(client_id=cid, ckpt_dir=ckpt, resume=self.resume)
            self.client_id = cid
            self._set_up(self.slots[cid], path)
        self.client_id = min(self.slots)
        return start

    def _set_up(self, slot: ClientSlot, path: Path) -> None:
        t0 = time.perf_counter()
        cid = slot.client_id
        try:
            ccfg = self.cfg.client_config(cid)
            if self.cfg.output.checkpoint or self.resume or self.cfg.rank_memory_mb > 0:
                ensure_private(slot.ckpt_dir)
            if not self.resume:  # a fresh run: no older run's checkpoints may be mixed in
                for old in slot.ckpt_dir.glob("round_*.ckpt"):
                    old.unlink()
            (slot.ckpt_dir / SPILL_NAME).unlink(missing_ok=True)  # an older job's spill
            device = pick_device(ccfg.device, local_rank=self.local_rank)
            part = read_client(path, cid)
            # on the client's device once: no copy per step (a rank may host many clients)
            slot.data = images_to_tensor(part.images).to(device)
            slot.labels = torch.from_numpy(part.labels).to(device)
            slot.state = new_local_state(cid, ccfg, seed=self.cfg.seed, device=device)
            slot.state.extra["total_rounds"] = self.cfg.rounds
            self.resident.append(cid)
            self._enforce_budget(keep=cid)
            slot.outliers = part.images[part.outlier]
            if len(slot.outliers) and ccfg.privacy.mode == "none":  # DP: not covered by ε
                slot.classifier = reference_classifier(path, device=device)
            log.info("client %d on %s, rank %d, device %s, %d samples (%d outliers)", cid,
                     socket.gethostname(), self.rank, device, len(part.labels),
                     int(part.outlier.sum()))
            if not len(part.labels):
                raise AlignFLError(f"client {cid} has no training samples")
            ready = Ready(client_id=cid, host=socket.gethostname(), device=str(device),
                          n_samples=len(part.labels), setup_s=time.perf_counter() - t0)
            self.transport.send(0, Tag.READY, ready.to_message())
        except Exception as exc:  # reported now, and again with every TRAIN
            slot.setup_error = exc
            log.error("client %d set-up failed: %s", cid, exc)
            err = RemoteError.from_exception(exc, rank=self.rank, round=-1, client_id=cid)
            self.transport.send(0, Tag.ERROR, err.to_message())

    def client_round(self, instruction: TrainInstruction) -> None:
        """Train every client the instruction names, in its order: one answer each."""
        for cid in instruction.clients:
            if cid not in self.slots:
                log.warning("rank %d: TRAIN names client %d, which this rank does not host; "
                            "ignored", self.rank, cid)
                continue
            self.client_id = cid
            self.train_client(instruction)

    def train_client(self, instruction: TrainInstruction) -> None:
        """One client's round: train, checkpoint, send UPDATE; or send ERROR."""
        r = instruction.round
        slot = self.slot
        if slot.spilled:
            self._unspill(slot)
        if slot.resume and slot.setup_error is None and slot.state is not None:
            # outside the try: a client that cannot resume would go on from fresh weights
            # and silently spoil the resumed run, so it ends the job (ClientLoop.run)
            self._load_checkpoint(before_round=r)
            slot.state.extra["total_rounds"] = self.cfg.rounds  # --rounds may have changed
            slot.resume = False
        try:
            if slot.setup_error is not None:
                raise slot.setup_error
            assert slot.state is not None and slot.data is not None
            interval = min(CLIENT_MIN_INTERVAL_S, self.cfg.output.progress_interval_s / 2)
            cid = slot.client_id
            with StepReporter(total=self._expected_steps(), min_interval_s=interval,
                              send=lambda done, total: self._send_progress(r, cid, done,
                                                                           total)):
                update = self.local_train(r)
            if slot.classifier is not None:
                update.metrics["survival_recon_client"] = client_outlier_survival(
                    slot.state.vae, slot.outliers, slot.classifier, device=slot.state.device)
            if self.cfg.output.checkpoint:
                self._save_checkpoint()
            payload = ClientUpdate(round=r, client_id=slot.client_id, spec=update.spec,
                                   state=update.state, kind=update.kind, prior=update.prior,
                                   metrics=update.metrics)
            # encoding fails here, not in the loop: too big, not encodable, ...
            self._send_update(payload)
        except Exception as exc:
            log.error("client %d failed in round %d: %s", slot.client_id, _round_no(r), exc)
            err = RemoteError.from_exception(exc, rank=self.rank, round=r,
                                             client_id=slot.client_id)
            self.transport.send(0, Tag.ERROR, err.to_message())
        if slot.state is not None:
            if slot.client_id in self.resident:
                self.resident.remove(slot.client_id)
            self.resident.append(slot.client_id)
            self._enforce_budget(keep=slot.client_id)

    # -- the rank's memory budget (rank_memory_mb) ------------------------------------------
    def _enforce_budget(self, *, keep: int) -> None:
        """Spill the least recently trained clients' states while over the budget.

        Only ``keep`` (just set up or trained) is measured; the others' sizes are those
        recorded when they last became resident.
        """
        budget = self.cfg.rank_memory_mb * 2**20
        if budget <= 0:
            return
        self.slots[keep].nbytes = _state_bytes(self.slots[keep].state)
        total = sum(self.slots[c].nbytes for c in self.resident)
        while len(self.resident) > 1 and total > budget:
            victim = next(c for c in self.resident if c != keep)
            slot = self.slots[victim]
            assert slot.state is not None
            save_raw_checkpoint(slot.ckpt_dir / SPILL_NAME, slot.state.checkpoint_state())
            slot.state, slot.spilled = None, True
            self.resident.remove(victim)
            total -= slot.nbytes
            log.debug("client %d spilled to %s", victim, slot.ckpt_dir)

    def _unspill(self, slot: ClientSlot) -> None:
        """Read a spilled client's state back (the same state, bit for bit)."""
        ccfg = self.cfg.client_config(slot.client_id)
        device = pick_device(ccfg.device, local_rank=self.local_rank)
        state = new_local_state(slot.client_id, ccfg, seed=self.cfg.seed, device=device)
        state.load_state_dict(load_checkpoint(slot.ckpt_dir / SPILL_NAME))
        slot.state, slot.spilled = state, False
        (slot.ckpt_dir / SPILL_NAME).unlink(missing_ok=True)

    def _expected_steps(self) -> int:
        """Optimizer steps of one local round (expected, with Poisson batches under DP)."""
        assert self.state is not None and self.data is not None
        c = self.state.cfg
        return c.local_epochs * max(1, -(-len(self.data) // c.batch_size))

    def _send_update(self, payload: ClientUpdate) -> None:
        """Start an UPDATE send and go on; wait only while too many are in flight.

        The rank trains its next client while rank 0 takes this update: the receiver
        pulls the bytes when it gets to them, so nothing here waits for rank 0's poll.
        Messages from one rank arrive in the order they were sent, so an ERROR sent
        later is never taken before this UPDATE.
        """
        self.updates = [p for p in self.updates if not p.test()]
        while len(self.updates) >= UPDATES_IN_FLIGHT:
            self.updates.pop(0).wait()
        self.updates.append(self.transport.isend(0, Tag.UPDATE, payload.to_message()))

    def _send_progress(self, r: int, client_id: int, done: int, total: int) -> None:
        """Start a PROGRESS send; never wait for it (its buffer lives in ``self.pending``)."""
        self.pending = [p for p in self.pending if not p.test()]
        msg = Progress(round=r, client_id=client_id, done=done, total=total).to_message()
        self.pending.append(self.transport.isend(0, Tag.PROGRESS, msg))

    def local_train(self, round_: int) -> SharedUpdate:
        """One round of local training of the client being served (tests replace this)."""
        assert self.state is not None and self.data is not None
        return self.strategy.client_round(self.state, self.data, round_=round_,
                                          labels=self.labels, global_state=self.global_state)

    def _save_checkpoint(self) -> None:
        slot = self.slot
        assert slot.state is not None
        done = slot.state.rounds_done
        save_raw_checkpoint(slot.ckpt_dir / f"round_{done:04d}.ckpt",
                            slot.state.checkpoint_state())
        for old in sorted(slot.ckpt_dir.glob("round_*.ckpt"))[:-2]:
            old.unlink()

    def _load_checkpoint(self, *, before_round: int) -> None:
        """Load the newest local checkpoint taken at or before the start of ``before_round``.

        A client that was not asked in some rounds (partial participation) has an older
        newest checkpoint: it resumes from that, as it would have gone on.
        """
        slot = self.slot
        assert slot.state is not None
        candidates = [p for p in sorted(slot.ckpt_dir.glob("round_*.ckpt"))
                      if int(p.stem.split("_")[1]) <= before_round]
        if not candidates:
            if before_round > 0 and self._asked_before(before_round):
                raise AlignFLError(f"client {slot.client_id}: no checkpoint in "
                                   f"{slot.ckpt_dir} for round {before_round}; cannot resume")
            return
        slot.state.load_state_dict(load_checkpoint(candidates[-1]))
        log.info("client %d resumed from %s", slot.client_id, candidates[-1].name)

    def _asked_before(self, round_: int) -> bool:
        """Whether the client being served was asked in a round before ``round_``."""
        k = participants_per_round(self.cfg)
        return any(self.client_id in sample_participants(self.cfg.seed, r,
                                                         n_clients=self.cfg.n_clients, k=k)
                   for r in range(round_))


UPDATES_IN_FLIGHT = 2
"""UPDATE sends a client rank may have in flight while it trains its next clients; each
holds its encoded buffer (one decoder), so this bounds the memory they take."""

SPILL_NAME = "spilled.ckpt"
"""A spilled client's state in its private folder (``rank_memory_mb``)."""


def _state_bytes(state: LocalState | None) -> int:
    """Bytes of the tensors a client keeps: VAE, optimizer, extra (accountant, MOON's
    previous models)."""
    if state is None:
        return 0

    def walk(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, np.ndarray):
            return int(obj.nbytes)
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, list | tuple):
            return sum(walk(v) for v in obj)
        return 0

    return walk(state.state_dict())


# --- server side ----------------------------------------------------------------------
@dataclass
class RoundRecord:
    """What the server learned about each client in one round."""

    clients: dict[int, dict[str, Any]] = field(default_factory=dict)
    comm_bytes: int = 0
    started: float = 0.0  # when the round's TRAIN instructions were sent


class Server:
    """Rank 0: the stateful server. Owns all results, checkpoints, logs and PNGs."""

    def __init__(self, transport: Any, cfg: RunConfig, strategy: Strategy, *, resume: bool,
                 local_rank: int, display: ProgressDisplay | None = None) -> None:
        self.transport = transport
        self.cfg = cfg
        self.strategy = strategy
        self.resume = resume
        self.local_rank = local_rank
        self.n = cfg.n_clients
        self.display = display or ProgressDisplay(enabled=False, verbose=False, interval_s=1.0)
        self.progress = ProgressTable(n_clients=self.n, epochs=[
            cfg.client_config(k).local_epochs for k in range(self.n)])
        self.busy: dict[int, int] = {}  # client id -> round it is working on
        self.n_ranks = transport.size - 1  # client ranks 1..n_ranks
        self.placement: list[list[int]] = []  # per client rank: its clients (server_start)
        self.rank_of: dict[int, int] = {}  # client id -> its rank
        self.queue: dict[int, list[int]] = {}  # rank -> clients asked, not answered, in order
        self.asked: dict[int, RoundRecord] = {}  # rounds asked ahead (server.pipeline)
        self.results_path, self.ckpt_dir, self.png_dir = run_paths(cfg)
        self.lock = RunLock(self.results_path.parent)
        self.outbox: list[Any] = []  # sends in flight (never blocks on a client)
        self.asked_at: dict[int, float] = {}  # client -> when its current request was sent
        self.writer: ResultsWriter | None = None

    def _results(self) -> ResultsWriter:
        """The results file's writer (it exists from the end of :meth:`server_start`)."""
        assert self.writer is not None, "no results writer before server_start"
        return self.writer

    def _send(self, rank: int, payload: Any) -> None:
        """Start a send to a client rank without waiting for it to be received."""
        self.outbox = [p for p in self.outbox if not p.test()]
        self.outbox.append(self.transport.isend(rank, payload.TAG, payload.to_message()))

    # -- start ----------------------------------------------------------------------
    def run(self) -> int:
        """Start, run every round, stop. Any failure ends the whole job within seconds.

        A user error found during set-up (bad partition, locked or unusable run folder,
        ...) stops every client with START(ok=False) and is printed once by the CLI.
        Anything else, at any time, aborts all ranks (:meth:`_fail`).
        """
        try:
            try:
                self.server_start()
            except AlignFLError as exc:
                self._broadcast(StartInstruction(ok=False, reason=str(exc)))
                self._flush_outbox(timeout=5.0)
                raise
            self._broadcast(StartInstruction(ok=True))
            self.wait_ready()
            for r in range(self.start_round, self.cfg.rounds):
                self.server_round(r)
            self.server_stop()
        except AlignFLError:
            if self.writer is None:  # set-up: the clients were told; the CLI prints it
                raise
            self._fail(*_exc_info())
        except BaseException:
            self._fail(*_exc_info())
        finally:
            self.lock.release()  # the process may go on to another run (an abort never returns)
        return 0

    def _fail(self, exc: BaseException, tb_text: str) -> None:
        """Print one line, keep the traceback in the run folder's log, abort every rank."""
        import sys

        from .transport import finalize_abort

        code = 2 if isinstance(exc, AlignFLError) else 130 if isinstance(
            exc, KeyboardInterrupt) else 1
        where = ""
        try:
            path = self.results_path.parent / ERROR_LOG
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} rank 0 on "
                         f"{socket.gethostname()}:\n{tb_text}\n")
            where = f"; traceback in {path}"
        except OSError:  # no run folder to keep it in: the traceback goes to stderr
            log.error("%s", tb_text.rstrip())
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        kind = "" if isinstance(exc, AlignFLError) else f"{type(exc).__name__}: "
        kept = ""
        if self.writer is not None:
            kept = f"; {self.results_path} keeps every completed round"
        for handler in logging.getLogger().handlers:
            handler.flush()
        what = "" if isinstance(exc, RankAborted) else "server failed: "
        print(f"alignfl-mpi: error: {what}{kind}{reason}{kept}{where}; aborting all "
              "ranks", file=sys.stderr, flush=True)
        finalize_abort(self.transport.comm, code)

    def _broadcast(self, payload: Any) -> None:
        for rank in range(1, self.n_ranks + 1):
            self._send(rank, payload)

    def _flush_outbox(self, *, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every send in flight; True when all completed."""
        end = time.monotonic() + timeout
        while True:
            self.outbox = [p for p in self.outbox if not p.test()]
            if not self.outbox:
                return True
            if time.monotonic() >= end:
                return False
            time.sleep(0.005)

    def server_start(self) -> None:

        cfg = self.cfg
        path = partition_path(cfg)
        if not path.exists():
            if cfg.data.partition:
                raise ConfigError(f"partition file {path} not found; create it with "
                                  "'alignfl-mpi partition' or fix data.partition")
            log.info("creating partition %s", path)
            make_partition(partition_request(cfg), output=path,
                           root=cfg.data.data_root or None)
        self.partition = read_partition_info(path, expected_clients=self.n)
        sizes = client_sizes(path)
        empty = [k for k, size in enumerate(sizes) if size == 0]
        if empty:
            raise ConfigError(f"partition {path}: client(s) {empty[:10]}"
                              f"{' ...' if len(empty) > 10 else ''} have no training samples; "
                              "re-partition (fewer clients, another scheme or alpha)")
        self.placement = place_clients(sizes, n_ranks=self.n_ranks)
        self.rank_of = {c: rank for rank, clients in enumerate(self.placement, 1)
                        for c in clients}
        self.test_images, self.test_labels = read_split(path)
        prepare_run_dir(cfg)
        self.lock.acquire()
        self.device = pick_device(cfg.server.device, local_rank=self.local_rank)
        self.state = ServerState(cfg, device=self.device)
        self.start_round = 0
        if self.resume:
            self._check_resumed_config()
            self.start_round = self._load_server_checkpoint()
        attrs = {"partition": str(path), "n_clients": self.n, "world_size": self.n_ranks + 1,
                 "placement": [self.rank_of[c] for c in range(self.n)],
                 "partition_attrs": {k: self.partition.attrs[k] for k in
                                     ("dataset", "outlier_dataset", "scheme", "scheme_params",
                                      "seed", "n_outliers", "outlier_client", "source_sha256",
                                      "client_sizes")},
                 "server_host": socket.gethostname(), "server_device": str(self.device)}
        self.writer = ResultsWriter(self.results_path, config_json=to_json(cfg), attrs=attrs,
                                    resume_from_round=self.start_round if self.resume else None)
        self.evaluator = self._make_evaluator()
        self._results().set_attrs(self.evaluator.attrs())
        log.info("server on %s, device %s; %d clients on %d ranks, %d rounds, partition %s",
                 socket.gethostname(), self.device, self.n, self.n_ranks, cfg.rounds, path)

    def _check_resumed_config(self) -> None:
        """Refuse ``--resume`` with settings other than the run's own (``rounds`` may grow).

        A key that the stored config lacks was added to alignfl_mpi after the run started;
        it compares as its built-in default, which is the behaviour the run had.

        Raises:
            ConfigError: A key differs from the config stored in the results file.
        """
        if not self.results_path.exists():
            return

        stored_cfg = load(self.results_path).config
        now_cfg = json.loads(to_json(self.cfg))  # as stored: tuples become lists
        changed = changed_settings(stored_cfg, now_cfg)
        if changed:
            stored, now = _flatten(stored_cfg), _flatten(now_cfg)
            shown = ", ".join(f"{k} ({now.get(k)!r} now, {stored.get(k)!r} stored)"
                              for k in changed[:4])
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            raise ConfigError(f"--resume: the settings differ from the run's own in {shown}"
                              f"{more}; resume with the run's settings (its --preset, --config "
                              "and --set) or start a new run with another --output")

    def _load_server_checkpoint(self) -> int:
        """Restore the server from its checkpoint; returns the round to continue with.

        Without a checkpoint, resuming is allowed only while no round has been recorded
        (a run killed during round 0): it then starts from round 0.
        """
        path = self.ckpt_dir / CHECKPOINT_NAME
        if not path.exists():
            if self.results_path.exists():

                done = int(load(self.results_path).attrs.get("rounds_completed", 0))
                if done:
                    raise AlignFLError(f"--resume: {self.results_path} has {done} rounds but "
                                       f"there is no checkpoint {path}; cannot continue")
            log.warning("--resume: no checkpoint in %s; starting from round 0", self.ckpt_dir)
            return 0
        ckpt = load_checkpoint(path)
        self.state.load_state_dict(ckpt["server"])
        self.strategy.load_state_dict(ckpt.get("strategy", {}), self.state)
        set_rng_state(ckpt["rng"])
        log.info("resuming after round %d", self.state.rounds_done)
        return self.state.rounds_done

    def _make_evaluator(self) -> Any:

        return RoundEvaluator(cfg=self.cfg, partition=self.partition.path,
                              test_images=self.test_images, test_labels=self.test_labels,
                              device=self.device, png_dir=self.png_dir if self.cfg.output.png
                              else None)

    def wait_ready(self) -> None:
        """Wait for every client's READY (or set-up ERROR), up to ``server.start_timeout_s``.

        Set-up time thus never counts against the first round's deadline. A client that
        is not ready in time is treated as busy: a straggler until it answers.
        """
        pending = set(range(self.n))
        end = time.monotonic() + self.cfg.server.start_timeout_s
        info: dict[str, Any] = {}
        while pending:
            rcv = self.transport.recv(timeout=max(0.0, end - time.monotonic()))
            if rcv is None:
                break
            if (notice := _rank_abort_notice(rcv)) is not None:
                raise notice
            c = self._set_up_client(rcv, pending)
            if c is None:
                continue
            pending.discard(c)
            if rcv.ok and rcv.tag == Tag.READY:
                ready: Ready = rcv.payload
                info[str(c)] = {"host": ready.host, "device": ready.device,
                                "n_samples": ready.n_samples, "setup_s": ready.setup_s}
            elif rcv.ok and rcv.tag == Tag.ERROR:
                info[str(c)] = {"error": rcv.payload.summary()}
                log.warning("client %d set-up failed: %s", c, rcv.payload.summary())
            else:
                info[str(c)] = {"error": _clean_text(str(rcv.error))}
                log.warning("client %d (rank %d): rejected set-up message: %s", c, rcv.source,
                            rcv.error)
        for c in sorted(pending):
            log.warning("client %d not ready after %.0f s; treated as a straggler", c,
                        self.cfg.server.start_timeout_s)
            self.busy[c] = -1
            self.queue.setdefault(self.rank_of[c], []).append(c)
        self._results().set_attrs({"clients_info": info})
        where = [f"{v.get('host', '?')}:{v.get('device', 'failed')}"
                 for _, v in sorted(info.items(), key=lambda kv: int(kv[0]))]
        if len(where) <= 10:
            log.info("clients ready: %s", ", ".join(
                f"{c}@{w}" for c, w in zip(sorted(map(int, info)), where)))
        else:  # many clients: how many on each host and device
            counts = {w: where.count(w) for w in sorted(set(where))}
            log.info("clients ready: %d of %d (%s)", sum(n for w, n in counts.items()
                                                         if not w.endswith(":failed")),
                     self.n, ", ".join(f"{n} on {w}" for w, n in counts.items()))

    def _set_up_client(self, rcv: Any, pending: set[int]) -> int | None:
        """The client a set-up message is about, or None (logged) when it names none of
        the sender's clients still setting up."""
        hosted = [c for c in self._hosted(rcv.source) if c in pending]
        if not hosted:
            log.warning("rank %d: set-up message ignored: none of its clients is setting up",
                        rcv.source)
            return None
        if rcv.ok and rcv.tag in (Tag.READY, Tag.ERROR):
            claimed = rcv.payload.client_id
            if claimed in hosted:
                return int(claimed)
            log.warning("rank %d: set-up message for client %d, which it does not host or "
                        "which is set up already; ignored", rcv.source, claimed)
            return None
        return hosted[0]  # a bad message answers the rank's next client in line

    def _hosted(self, rank: int) -> list[int]:
        """The clients placed on ``rank`` (none for a rank that is not a client rank)."""
        return self.placement[rank - 1] if 1 <= rank <= self.n_ranks else []

    # -- one round --------------------------------------------------------------------
    def ask(self, r: int) -> RoundRecord:
        """Send round ``r``'s TRAIN to the ranks of its sampled clients; the round's record.

        Clients still busy with an earlier round (stragglers) are not asked again.
        """
        cfg = self.cfg
        record = RoundRecord(started=time.perf_counter())
        deadline = cfg.server.round_deadline_s or None
        sampled = sample_participants(cfg.seed, r, n_clients=self.n,
                                      k=participants_per_round(cfg))
        asked = [c for c in sampled if c not in self.busy]
        for c in range(self.n):
            if c in self.busy:
                record.clients[c] = {"status": "straggler", "busy_round": _round_no(self.busy[c])}
            elif c not in sampled:
                record.clients[c] = {"status": "not_asked"}
        before = self.strategy.configure_round(self.state, r) if asked else []
        for rank in range(1, self.n_ranks + 1):
            clients = [c for c in self._hosted(rank) if c in asked]
            if not clients:
                continue
            for payload in before:
                self._send(rank, payload)
            self._send(rank, TrainInstruction(round=r, clients=tuple(clients),
                                              deadline_s=deadline))
            self.queue.setdefault(rank, []).extend(clients)
            for c in clients:
                self.busy[c] = r
                self.asked_at[c] = time.perf_counter()
        self.asked[r] = record
        return record

    def server_round(self, r: int) -> None:
        """Collect round ``r``'s updates, aggregate or train, evaluate, write, checkpoint.

        With ``server.pipeline`` the next round's TRAIN goes out as soon as this round's
        updates are in, so the clients train round r+1 while the server works on round r;
        the server's round r still uses exactly round r's updates.
        """
        cfg = self.cfg
        record = self.asked.pop(r, None) or self.ask(r)
        t_round = record.started
        deadline = cfg.server.round_deadline_s or None
        self.collect(r, record, deadline=deadline)
        t_collect = time.perf_counter() - t_round
        for c in range(self.n):
            if self.busy.get(c) == r:
                record.clients[c] = {"status": "straggler", "busy_round": _round_no(r)}
                log.warning("round %d: client %d missed the %.1f s deadline; using its stored "
                            "decoder", _round_no(r), c, deadline or 0)
        if cfg.server.pipeline and r + 1 < cfg.rounds:
            self.ask(r + 1)

        t0 = time.perf_counter()
        images, labels = self.state.sample_synthetic(round_=r)
        t_sampling = time.perf_counter() - t0
        t0 = time.perf_counter()
        server_metrics = self.strategy.aggregate(self.state, r, (images, labels))
        if self.state.last_evicted:
            server_metrics["decoders_evicted"] = float(len(self.state.last_evicted))
        t_server = time.perf_counter() - t0
        self.state.rounds_done = r + 1

        t0 = time.perf_counter()
        evaluation, per_client = self.evaluator.evaluate(self.state, round_=r,
                                                         pool=(images, labels))
        evaluation.update(self.strategy.evaluate(self.state, r, self.evaluator))
        for c, values in per_client.items():
            record.clients.setdefault(c, {"status": "idle"}).update(values)
        t_eval = time.perf_counter() - t0

        # the busiest client rank's training: the sum of its clients' own train_s (a rank
        # trains them one after another); under DP train_s stays on the client (it depends
        # on the secret batch sizes), so the server's answer time of its last one stands in
        per_rank: dict[int, float] = {}
        for c, v in record.clients.items():
            if v.get("status") not in ("ok", "late"):
                continue
            rank = self.rank_of.get(c, 0)
            if "train_s" in v:
                per_rank[rank] = per_rank.get(rank, 0.0) + float(v["train_s"])
            else:
                per_rank[rank] = max(per_rank.get(rank, 0.0), float(v.get("answer_s", 0.0)))
        t_client = max(per_rank.values(), default=0.0)
        timings = {"client_training": t_client,
                   "communication": max(0.0, t_collect - t_client),
                   "collect": t_collect, "sampling": t_sampling, "server_training": t_server,
                   "evaluation": t_eval}
        t0 = time.perf_counter()
        synthetic = None
        if cfg.output.save_synthetic and len(images):
            synthetic = (to_uint8_images(images.cpu()), labels.numpy())
        timings["io"] = 0.0
        timings["round"] = time.perf_counter() - t_round
        self._results().write_round(r, clients=record.clients, server=server_metrics,
                                evaluation=evaluation, timings=timings, synthetic=synthetic)
        if cfg.output.checkpoint:
            save_checkpoint(self.ckpt_dir / CHECKPOINT_NAME,
                            {"server": self.state.state_dict(),
                             "strategy": self.strategy.state_dict(), "rng": rng_state(),
                             "round": r, "version": __version__})
        timings["io"] = time.perf_counter() - t0
        timings["round"] = time.perf_counter() - t_round
        self._results().update_timings(r, timings)  # now including the I/O of this round
        self._progress(r, record, server_metrics, evaluation, timings)

    def collect(self, r: int, record: RoundRecord, *, deadline: float | None) -> None:
        """Receive updates until every client asked in round ``r`` answered or time is up.

        Meanwhile the live progress line is refreshed from the clients' PROGRESS messages.
        """
        started = time.monotonic()
        end = None if deadline is None else started + deadline
        self.progress.reset()
        asked = {c for c, v in self.busy.items() if v == r}
        try:
            while any(v == r for v in self.busy.values()):
                now = time.monotonic()
                timeout = 0.5 if end is None else max(0.0, min(0.5, end - now))
                rcv = self.transport.recv(timeout=timeout)
                if rcv is not None:
                    before = {c for c, v in self.busy.items() if v == r}
                    self.handle(rcv, r, record)
                    for c in sorted(before - set(self.busy)):
                        self.display.client_done(c, time.monotonic() - started)
                elif end is not None and time.monotonic() >= end:
                    return
                done = {c for c in asked if self.busy.get(c) != r}
                self.display.show(self.progress.status(
                    round_no=_round_no(r), rounds=self.cfg.rounds, done=done, started=started,
                    now=time.monotonic(), asked=asked))
        finally:
            self.display.clear()

    def handle(self, rcv: Any, r: int, record: RoundRecord) -> None:
        """Take one message from a client rank: store an update, or count a failure.

        An UPDATE or ERROR answers the request of the client it names, which must be
        placed on the sending rank; a message that names none (undecodable, or of an
        unexpected kind) answers the rank's oldest open request. Only the first answer
        to a request counts; anything else (a second message, a message nobody asked
        for) is rejected and counted as ``unsolicited``. Every rejection is logged with
        the sender's rank.
        """
        rank = rcv.source
        hosted = self._hosted(rank)
        if not hosted:
            log.warning("round %d: message from unexpected rank %d ignored", _round_no(r), rank)
            return
        record.comm_bytes += rcv.nbytes
        if rcv.ok and rcv.tag == Tag.PROGRESS:  # informational: never an answer
            prog: Progress = rcv.payload
            if prog.client_id in hosted and self.busy.get(prog.client_id) == prog.round:
                self.progress.update(prog.client_id, done=prog.done, total=prog.total,
                                     now=time.monotonic())
            return
        if (notice := _rank_abort_notice(rcv)) is not None:
            raise notice
        c, forced = self._answering(rcv, rank, hosted)
        who = f"client {c} (rank {rank})"
        if c not in self.busy:
            what = str(rcv.error) if not rcv.ok else f"unsolicited {Tag(rcv.tag).name} message"
            log.warning("round %d: rejected message from %s: %s", _round_no(r), who, what)
            idle = record.clients.setdefault(c, {"status": "idle"})
            idle["unsolicited"] = int(idle.get("unsolicited", 0)) + 1
            return
        was_round = self.busy.pop(c)
        if c in self.queue.get(rank, []):
            self.queue[rank].remove(c)
        entry: dict[str, Any] = {"message_bytes": rcv.nbytes}
        if c in self.asked_at:
            entry["answer_s"] = time.perf_counter() - self.asked_at.pop(c)
        if forced is not None:
            entry.update(status="rejected", error=_clean_text(forced))
            log.warning("round %d: rejected message from %s: %s", _round_no(r), who, forced)
        elif not rcv.ok:
            entry.update(status="rejected", error=_clean_text(str(rcv.error)))
            log.warning("round %d: rejected message from %s: %s", _round_no(r), who, rcv.error)
        elif rcv.tag == Tag.ERROR:
            err: RemoteError = rcv.payload
            entry.update(status="error", error=err.summary(), traceback=err.traceback)
            log.warning("round %d: client %d failed: %s", _round_no(r), c, err.summary())
        elif rcv.tag == Tag.UPDATE:
            entry.update(self._take_update(rcv.payload, c=c, who=who, asked=was_round, r=r))
        elif rcv.tag == Tag.READY and was_round == -1:
            entry.update(status="ready")
            log.info("round %d: %s is ready (late)", _round_no(r), who)
        else:
            reason = f"unexpected {Tag(rcv.tag).name} message"
            entry.update(status="rejected", error=reason)
            log.warning("round %d: rejected message from %s: %s", _round_no(r), who, reason)
        record.clients[c] = entry

    def _answering(self, rcv: Any, rank: int, hosted: list[int]) -> tuple[int, str | None]:
        """The client a message from ``rank`` answers, and a rejection reason if it must be
        refused whatever it holds (it names a client that ``rank`` does not host)."""
        oldest = (self.queue.get(rank) or hosted)[0]
        if not (rcv.ok and rcv.tag in (Tag.UPDATE, Tag.ERROR, Tag.READY)):
            return oldest, None
        claimed = int(rcv.payload.client_id)
        if claimed in hosted:
            return claimed, None
        what = {Tag.UPDATE: "update", Tag.ERROR: "error report"}.get(rcv.tag, "ready message")
        return oldest, f"{what} claims client {claimed}, which rank {rank} does not host"

    def _take_update(self, upd: ClientUpdate, *, c: int, who: str, asked: int,
                     r: int) -> dict[str, Any]:
        """Validate and store one update; the record entry for it."""
        late = asked != r
        try:
            if upd.client_id != c:
                raise MessageError(f"update claims client {upd.client_id} but came from {who}")
            if upd.round != asked:
                raise MessageError(f"update is for round {_round_no(upd.round)} but the client "
                                   f"was asked for round {_round_no(asked)}")
            self.strategy.accept(self.state, c, upd, late=late)
        except Exception as exc:  # MessageError, or a validator gap: the update is refused
            reason = _clean_text(str(exc) if isinstance(exc, AlignFLError)
                                 else f"update could not be validated ({type(exc).__name__})")
            if not isinstance(exc, AlignFLError):
                log.error("round %d: validating the update of %s raised", _round_no(r), who,
                          exc_info=True)
            log.warning("round %d: rejected update from %s: %s", _round_no(r), who, reason)
            return {"status": "rejected", "error": reason}
        if late:
            log.info("round %d: late update of client %d for round %d accepted", _round_no(r),
                     c, _round_no(upd.round))
        return {**upd.metrics, "status": "late" if late else "ok",
                "update_round": _round_no(upd.round)}

    def _progress(self, r: int, record: RoundRecord, server: dict[str, Any],
                  evaluation: dict[str, Any], timings: dict[str, float]) -> None:
        ok = sum(1 for v in record.clients.values() if v.get("status") in ("ok", "late"))
        parts = [f"round {r + 1}/{self.cfg.rounds}", f"clients ok {ok}/{self.n}"]
        if "loss" in server:
            parts.append(f"server loss {server['loss']:.2f}")
        for key, label in (("latent_accuracy", "latent acc"), ("latent_f1", "f1"),
                           ("recon_error", "recon"), ("task_accuracy", "task acc")):
            if key in evaluation:
                parts.append(f"{label} {evaluation[key]:.3f}")
        parts.append(f"{timings['round']:.1f} s")
        log.info(" | ".join(parts))

    # -- stop -------------------------------------------------------------------------
    def server_stop(self) -> None:
        """Drain stragglers, write the final models, then STOP every client and collect BYEs.

        Bounded for every rank: stragglers get ``server.final_drain_s`` to deliver, then
        the clients get ``server.stop_timeout_s`` to answer STOP with BYE while every
        other message is drained (a flooding rank's pending sends complete). A client
        that has not said BYE by then, or a send that never completed, aborts the job:
        the results are already complete.
        """
        end = time.monotonic() + self.cfg.server.final_drain_s
        record = RoundRecord()
        while self.busy and time.monotonic() < end:
            rcv = self.transport.recv(timeout=max(0.0, end - time.monotonic()))
            if rcv is not None:
                self.handle(rcv, self.cfg.rounds, record)
        if self.busy:
            log.error("clients %s still busy after %.0f s; results are complete, aborting them",
                      sorted(self.busy), self.cfg.server.final_drain_s)
        self._write_final()
        if self.busy:
            from .transport import finalize_abort

            finalize_abort(self.transport.comm, 3)
        self._broadcast(Stop())
        missing = self._collect_byes(timeout=self.cfg.server.stop_timeout_s)
        sent = self._flush_outbox(timeout=1.0)
        if missing or not sent:
            from .transport import finalize_abort

            clients = sorted(c for rank in missing for c in self._hosted(rank))
            log.error("client ranks %s with clients %s did not stop within %.0f s%s; results "
                      "are complete, aborting them", missing, clients,
                      self.cfg.server.stop_timeout_s, "" if sent else " (sends still pending)")
            finalize_abort(self.transport.comm, 3)
        log.info("results in %s", self.results_path)

    def _collect_byes(self, *, timeout: float) -> list[int]:
        """Drain messages until every client rank said BYE; return the ranks that did not in
        time."""
        waiting = set(range(1, self.n_ranks + 1))
        end = time.monotonic() + timeout
        dropped = 0
        while waiting and time.monotonic() < end:
            rcv = self.transport.recv(timeout=max(0.0, end - time.monotonic()))
            if rcv is None:
                break
            if rcv.ok and rcv.tag == Tag.BYE and rcv.source in waiting:
                waiting.discard(rcv.source)
            else:
                dropped += 1
        while self.transport.recv(timeout=0.0) is not None:  # anything still queued
            dropped += 1
        if dropped:
            log.warning("%d message(s) after STOP dropped", dropped)
        return sorted(waiting)

    def _write_final(self) -> None:
        decoders = {}
        for cid in self.state.registry:
            d = self.state.decoder_arrays(cid)
            decoders[cid] = {k: d[k] for k in ("spec", "round", "state", "prior")}
        self._results().write_final(global_state=self.state.global_arrays(),
                                global_spec=self.state.spec.to_dict(), decoders=decoders)


def _exc_info() -> tuple[BaseException, str]:
    """The exception being handled and its formatted traceback."""
    import sys
    import traceback

    exc = sys.exc_info()[1]
    assert exc is not None
    return exc, "".join(traceback.format_exception(exc))


RESUME_MAY_CHANGE = ("rounds", "data.data_root", "data.partition", "output.", "server.device",
                     "server.pipeline", "rank_memory_mb",
                     "client.device", "clients.", "server.round_deadline_s",
                     "server.final_drain_s", "server.start_timeout_s", "server.stop_timeout_s",
                     "client.private_dir")
"""Config keys (prefixes) that a resumed run may set differently: where things are and how
long to wait, never what is computed."""


def changed_settings(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The flattened config keys whose values differ between a run's stored config and
    ``now``, less those that may change on resume.

    A key that ``stored`` lacks (added to alignfl_mpi after that run started) compares as
    its built-in default: the behaviour the run had. Per-client keys
    (``clients.N.key``) default to ``client.key``.

    >>> now = json.loads(to_json(RunConfig()))
    >>> old = json.loads(to_json(RunConfig())); del old["client"]["fresh_optimizer"]
    >>> changed_settings(old, now)
    []
    >>> now["client"]["fresh_optimizer"] = True
    >>> changed_settings(old, now)
    ['client.fresh_optimizer']
    """
    flat_stored, flat_now = _flatten(stored), _flatten(now)
    defaults = _flatten(json.loads(to_json(RunConfig())))

    def default(key: str) -> Any:
        parts = key.split(".")
        if parts[0] == "clients" and len(parts) > 2:
            return defaults.get(".".join(["client", *parts[2:]]))
        return defaults.get(key)

    return [k for k in sorted(set(flat_stored) | set(flat_now))
            if flat_stored.get(k, default(k)) != flat_now.get(k)
            and not _may_change_on_resume(k)]


def _may_change_on_resume(key: str) -> bool:
    if key.startswith("clients.") and not key.endswith((".device", ".private_dir")):
        return False
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESUME_MAY_CHANGE)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists of tables get their index.

    >>> _flatten({"a": {"b": 1}, "c": [{"d": 2}]})
    {'a.b': 1, 'c.0.d': 2}
    """
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}
