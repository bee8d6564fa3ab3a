"""The ``alignfl-mpi`` command line.

Launch commands::

    alignfl-mpi data import ../shared/datasets/mnist          # offline route
    alignfl-mpi data download --dataset mnist fashion-mnist   # needs internet
    alignfl-mpi partition --scheme class-pairs --outliers 600
    mpiexec -n 6 alignfl-mpi run                              # 1 server + 5 clients
    mpiexec -n 6 alignfl-mpi run --config run.toml --set rounds=3
    alignfl-mpi report runs/alignfl/results.h5 --out report
    alignfl-mpi report runs/a/results.h5 runs/b/results.h5 --baseline runs/a/results.h5
    alignfl-mpi show runs/alignfl/results.h5                   # also while the run writes it
    alignfl-mpi sweep --epsilon 1 10 inf --lip 0 0.1 --np 6 --out runs/sweep
    alignfl-mpi reference --partition data/partitions/<file>.h5 --out runs/reference

Every user error prints one line ``alignfl-mpi: error: ...`` and exits with status 2.

Each subcommand imports its module when it runs: ``--help``, ``show`` and ``data`` start
without torch (about 2 s less), and ``run`` is the only one that loads mpi4py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .errors import AlignFLError

log = logging.getLogger("alignfl_mpi")


def _add_data_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None,
                   help="data root (default: $ALIGNFL_DATA_ROOT or ./data)")


def _cmd_data_import(args: argparse.Namespace) -> int:
    from .datasets import data_root, import_dataset

    ds = import_dataset(args.dir, name=args.dataset, root=args.data_root)
    print(f"imported {ds.info.name}: {len(ds.train_labels)} train + {len(ds.test_labels)} "
          f"test images into {data_root(args.data_root) / ds.info.name}")
    return 0


def _cmd_data_download(args: argparse.Namespace) -> int:
    from .datasets import data_root, download_dataset

    for name in args.dataset:
        ds = download_dataset(name, root=args.data_root)
        print(f"downloaded {ds.info.name} into {data_root(args.data_root) / ds.info.name}")
    return 0


def _cmd_data_list(args: argparse.Namespace) -> int:
    from .datasets import available, data_root

    print(f"data root: {data_root(args.data_root)}")
    for name, present in available(args.data_root).items():
        print(f"  {name:<16}{'present' if present else 'missing'}")
    return 0


def _scheme_params(args: argparse.Namespace) -> dict:
    params = {}
    if args.per_class is not None:
        params["per_class"] = args.per_class
    if args.alpha is not None:
        params["alpha"] = args.alpha
    return params


def _cmd_partition(args: argparse.Namespace) -> int:
    import time

    from .datasets import data_root
    from .partition import PartitionRequest, default_partition_path, describe, make_partition

    request = PartitionRequest(dataset=args.dataset, scheme=args.scheme,
                               n_clients=args.clients, params=_scheme_params(args),
                               n_outliers=args.outliers, outlier_dataset=args.outlier_dataset,
                               outlier_client=args.outlier_client, seed=args.seed)
    output = Path(args.output) if args.output else default_partition_path(
        request, data_root(args.data_root))
    start = time.perf_counter()
    clients = make_partition(request, output=output, root=args.data_root, force=args.force)
    print(describe(clients))
    print(f"wrote {output} in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .runtime import main_run

    return main_run(args, comm=args.comm)


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import run_report

    written = run_report([Path(p) for p in args.results], out=Path(args.out),
                         partition=Path(args.partition) if args.partition else None,
                         baseline=args.baseline)
    for path in written:
        print(path)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from .show import summary

    print(summary(Path(args.results), last=args.last))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import parse_epsilon, run_sweep

    written = run_sweep(config=args.config, epsilons=[parse_epsilon(e) for e in args.epsilon],
                        lips=args.lip, np_=args.np, out=Path(args.out), launcher=args.launcher,
                        dp_mode=args.dp_mode, extra=args.set, dry_run=args.dry_run,
                        preset=args.preset)
    for path in written:
        print(path)
    return 0


def _cmd_reference(args: argparse.Namespace) -> int:
    from .config import DEFAULT_PRESET, load_config
    from .reference import centralized, centralized_vae, fedavg_classifier

    out = Path(args.out)
    part = Path(args.partition)
    if args.what in ("all", "vae"):
        cfg = load_config(args.config, overrides=args.set, preset=args.preset or DEFAULT_PRESET)
        hist = centralized_vae(part, cfg, out=out / "centralized-vae", epochs=args.vae_epochs,
                               seed=args.seed)
        last = hist[-1]
        dims = sorted((k for k in last if k.startswith("latent_var_") and k[11:].isdigit()),
                      key=lambda k: int(k[11:]))
        print(f"centralized-vae (upper bound of the global VAE, latent_dim {len(dims)}, "
              f"{len(hist)} epochs): latent acc {last['latent_accuracy']:.4f} | f1 "
              f"{last['latent_f1']:.4f} | recon {last['recon_error']:.3f} | latent var "
              f"{' '.join(f'{last[k]:.3g}' for k in dims)} (min/max "
              f"{last['latent_var_min_ratio']:.3f}) -> {out / 'centralized-vae'}")
    if args.what in ("all", "classifiers"):
        acc = centralized(part, out=out / "centralized", epochs=args.epochs, seed=args.seed)
        print(f"centralized: task accuracy {acc[-1]:.4f} -> {out / 'centralized'}")
        acc = fedavg_classifier(part, out=out / "fedavg-classifier", rounds=args.rounds,
                                local_epochs=args.local_epochs, seed=args.seed)
        print(f"fedavg-classifier: task accuracy {acc[-1]:.4f} -> "
              f"{out / 'fedavg-classifier'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``alignfl-mpi``."""
    parser = argparse.ArgumentParser(prog="alignfl-mpi", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"alignfl-mpi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="import, download or list datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = dsub.add_parser("import", help="validate IDX files in DIR and copy them into the data root")
    p.add_argument("dir", help="folder with the four IDX files (gzipped or plain)")
    p.add_argument("--dataset", default=None,
                   help="dataset name (guessed from the folder name when omitted)")
    _add_data_root(p)
    p.set_defaults(func=_cmd_data_import)
    p = dsub.add_parser("download", help="download with torchvision (needs internet)")
    p.add_argument("--dataset", nargs="+", default=["mnist", "fashion-mnist"])
    _add_data_root(p)
    p.set_defaults(func=_cmd_data_download)
    p = dsub.add_parser("list", help="show which datasets are in the data root")
    _add_data_root(p)
    p.set_defaults(func=_cmd_data_list)

    p = sub.add_parser("partition", help="split a dataset over clients into an HDF5 file")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--scheme", default="class-pairs",
                   help="class-pairs (default), dirichlet or iid")
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--per-class", type=int, default=None,
                   help="class-pairs: samples per class (default 6000)")
    p.add_argument("--alpha", type=float, default=None, help="dirichlet: concentration (0.5)")
    p.add_argument("--outliers", type=int, default=600,
                   help="cross-domain outlier images (default 600; 0 for none)")
    p.add_argument("--outlier-dataset", default=None,
                   help="outlier domain (default: fashion-mnist for mnist and vice versa)")
    p.add_argument("--outlier-client", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "-o", default=None,
                   help="output file (default DATA_ROOT/partitions/<settings>.h5)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    _add_data_root(p)
    p.set_defaults(func=_cmd_partition)

    p = sub.add_parser("run", help="run ALIGN-FL under mpiexec (rank 0 = server)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="shipped config to start from (default: paper, the reference code's "
                        "settings; also paper-dim8, classic, dp-eps2); --config and --set "
                        "apply on top")
    p.add_argument("--config", "-c", default=None, help="TOML or YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set rounds=3 --set server.epochs=2")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--output", "-o", default=None, help="results directory (output.dir)")
    p.add_argument("--rounds", type=int, default=None, help="shortcut for --set rounds=N")
    p.add_argument("--seed", type=int, default=None, help="shortcut for --set seed=N")
    _add_data_root(p)
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", "-q", action="store_true", help="warnings only")
    verbosity.add_argument("--verbose", "-v", action="store_true", help="debug output")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("report", help="tables and figures of one or more runs")
    p.add_argument("results", nargs="+", metavar="RESULTS",
                   help="results.h5 files or run folders (finished, crashed or partial runs)")
    p.add_argument("--out", "-o", default="report", help="output folder (default ./report)")
    p.add_argument("--partition", default=None,
                   help="partition file for the latent plots (default: the one stored in "
                        "each results file, when that file exists)")
    p.add_argument("--baseline", default=None, metavar="RUN",
                   help="compare every run with this one (one of the RESULTS, by path or run "
                        "name); runs that differ only in seed are grouped, with mean ± sd")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("show", help="terminal summary of a results file (also of a running job)")
    p.add_argument("results", metavar="RESULTS", help="results.h5 file or run folder")
    p.add_argument("--last", type=int, default=20,
                   help="rounds shown in the per-round table, the last ones (default 20; 0: all)")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("sweep", help="privacy-utility grid: one run per (epsilon, lambda_lip)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="shipped config every run starts from (default: paper, as for run)")
    p.add_argument("--config", "-c", default=None,
                   help="config file on top of the preset, for every run")
    p.add_argument("--epsilon", nargs="+", default=["1", "2", "5", "10", "inf"],
                   help="target epsilons; 'inf' = no DP (default: 1 2 5 10 inf)")
    p.add_argument("--lip", nargs="+", type=float, default=[0.0, 0.01, 0.1, 1.0],
                   help="lambda_lip values (default: 0 0.01 0.1 1)")
    p.add_argument("--dp-mode", choices=("decoder", "full"), default=None,
                   help="DP mode of finite-epsilon runs (default: the config's, else full)")
    p.add_argument("--np", type=int, default=6, help="ranks per run (n_clients + 1)")
    p.add_argument("--out", "-o", default="runs/sweep", help="folder of the runs")
    p.add_argument("--launcher", default="mpiexec", help='MPI launcher, e.g. "srun --mpi=pmi2"')
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("reference", help="centralised upper bounds on the real partitions: "
                                         "the global VAE, the digit classifier (and its FedAvg)")
    p.add_argument("--partition", required=True, help="partition HDF5 file")
    p.add_argument("--out", "-o", default="runs/reference", help="output folder")
    p.add_argument("--what", choices=("all", "vae", "classifiers"), default="all",
                   help="which references to train (default all)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="config the VAE comes from (server.model, batch_size, lr, kl_weight), "
                        "as for run (default paper)")
    p.add_argument("--config", "-c", default=None, help="config file on top of the preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, as for run")
    p.add_argument("--vae-epochs", type=int, default=10,
                   help="epochs of the centralised VAE on the real union (default 10)")
    p.add_argument("--epochs", type=int, default=5,
                   help="epochs of the centralised classifier (default 5)")
    p.add_argument("--rounds", type=int, default=5, help="FedAvg rounds (default 5)")
    p.add_argument("--local-epochs", type=int, default=2, help="FedAvg local epochs (2)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_reference)
    return parser


LAUNCHER_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
"""Environment variables in which MPI launchers (MPICH/Hydra, Open MPI, PMIx, srun) pass
a process its rank, so it is known before MPI is initialised."""


def launcher_rank() -> int:
    """This process's rank as its launcher set it, or 0 when not launched as a rank.

    >>> import os
    >>> os.environ["PMI_RANK"] = "3"; launcher_rank()
    3
    >>> del os.environ["PMI_RANK"]
    """
    import os

    for var in LAUNCHER_RANK_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the arguments; under mpiexec only rank 0 prints usage, help and errors.

    The other ranks exit with the same status, silently.
    """
    import contextlib
    import io

    parser = build_parser()
    if launcher_rank() == 0:
        return parser.parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, comm: Any = None) -> int:
    """Entry point: parse, dispatch, and turn user errors into one line and exit 2.

    ``comm``: the communicator ``run`` uses (``COMM_WORLD`` when None).
    """
    args = _parse(argv)
    args.comm = comm
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except AlignFLError as exc:
        if launcher_rank() == 0:  # under mpiexec, printed once
            print(f"alignfl-mpi: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alignfl-mpi: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
