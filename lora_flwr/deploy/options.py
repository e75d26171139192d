"""Command-line options of the launchers, and their exit codes.

``scripts/deploy_local.py`` and ``scripts/flwr_run_sim.py`` share the experiment
options; the deployment adds its security and CPU options. Parsing returns a
typed, frozen record instead of an ``argparse.Namespace``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_flwr.deploy.cpus import parse_cpus
from lora_flwr.deploy.errors import BadInput

INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C


@dataclass(frozen=True)
class LaunchOptions:
    """What every launcher needs: the experiment and how long to wait for it."""

    config: str  # TOML file
    overrides: tuple[str, ...]  # ``--set KEY=VALUE``, in order
    output_dir: str | None  # results root; None: the config's output_dir
    num_supernodes: int | None  # None: fed.num_clients
    timeout: float  # seconds to wait for the run
    keep_homes: bool  # keep the per-process FLWR_HOME tree


@dataclass(frozen=True)
class DeployOptions(LaunchOptions):
    """A real deployment's options: credentials, threads and CPU pinning."""

    insecure: bool = False  # no TLS, no SuperNode authentication
    tls_dir: Path | None = None  # credentials directory; None: throwaway ones
    generate_certs: bool = False  # write fresh credentials into tls_dir first
    node_threads: int | None = None  # torch threads per SuperNode
    server_cpus: frozenset[int] | None = None  # pin the SuperLink side
    node_cpus: frozenset[int] | None = None  # pin the SuperNodes


def build_parser(doc: str | None) -> argparse.ArgumentParser:
    """Command-line options shared by the deployment and simulation scripts.

    The description is the first paragraph of ``doc`` (the script's docstring).
    """
    parser = argparse.ArgumentParser(
        description=(doc or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="configs/smoke.toml", help="TOML file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set fed.num_rounds=3 (repeatable)",
    )
    parser.add_argument(
        "--output-dir", default=None, help="results root (default: config output_dir)"
    )
    parser.add_argument(
        "--num-supernodes",
        type=int,
        default=None,
        help="SuperNodes = partitions (default: fed.num_clients)",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds to wait for the run"
    )
    parser.add_argument(
        "--keep-homes",
        action="store_true",
        help="keep the per-process FLWR_HOME dirs (state, installed FABs)",
    )
    return parser


def _launch_options(args: argparse.Namespace) -> LaunchOptions:
    return LaunchOptions(
        config=str(args.config),
        overrides=tuple(args.set),
        output_dir=args.output_dir,
        num_supernodes=args.num_supernodes,
        timeout=float(args.timeout),
        keep_homes=bool(args.keep_homes),
    )


def parse_args(argv: Sequence[str] | None, doc: str | None = None) -> LaunchOptions:
    """Parse the shared options (``scripts/flwr_run_sim.py``)."""
    return _launch_options(build_parser(doc).parse_args(argv))


def _add_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the security options (in their own group) and the threads and CPU ones."""
    sec = parser.add_argument_group(
        "security (default: TLS + SuperNode auth with throwaway credentials)"
    )
    sec.add_argument(
        "--tls-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="credentials: ca.pem, server.pem, server.key (SANs 127.0.0.1, "
        "localhost), node-<i>.key / node-<i>.pub (OpenSSH ECDSA) for i < N",
    )
    sec.add_argument(
        "--generate-certs",
        action="store_true",
        help="write fresh throwaway credentials into --tls-dir first "
        "(refuses to overwrite)",
    )
    parser.add_argument(
        "--node-threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads per SuperNode (node config num-threads); default: the "
        "cores shared between the nodes; 0: torch's default (every core)",
    )
    parser.add_argument(
        "--server-cpus",
        type=parse_cpus,
        default=None,
        metavar="LIST",
        help="pin the SuperLink, its SuperExec and the ServerApp to these CPUs "
        "(e.g. 0 or 0-1 or 0,2); default: not pinned",
    )
    parser.add_argument(
        "--node-cpus",
        type=parse_cpus,
        default=None,
        metavar="LIST",
        help="pin the SuperNodes and their ClientApp processes to these CPUs",
    )
    sec.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP, no SuperNode authentication (prints a warning)",
    )


def parse_deploy_args(
    argv: Sequence[str] | None, doc: str | None = None
) -> DeployOptions:
    """Parse the shared options plus the deployment's security and CPU options.

    Invalid combinations end the program through ``parser.error`` (exit code 2).
    """
    parser = build_parser(doc)
    _add_deploy_arguments(parser)
    args = parser.parse_args(argv)
    if args.insecure and (args.tls_dir is not None or args.generate_certs):
        parser.error("--insecure excludes --tls-dir and --generate-certs")
    if args.generate_certs and args.tls_dir is None:
        parser.error("--generate-certs needs --tls-dir")
    if args.node_threads is not None and args.node_threads < 0:
        parser.error(f"--node-threads should be >= 0, not {args.node_threads}")
    return DeployOptions(
        **dataclasses.asdict(_launch_options(args)),
        insecure=bool(args.insecure),
        tls_dir=args.tls_dir,
        generate_certs=bool(args.generate_certs),
        node_threads=args.node_threads,
        server_cpus=args.server_cpus,
        node_cpus=args.node_cpus,
    )


def exit_code(launch: Callable[[], object], errors: tuple[type[Exception], ...]) -> int:
    """Run ``launch`` and return the launcher's exit code.

    0 when it returns; 2 (the message on stderr) on :class:`BadInput`, found
    before any process started; 1 on one of ``errors``; 130 on
    Ctrl-C or SIGTERM (the launchers turn SIGTERM into ``KeyboardInterrupt``
    after they have stopped their processes).
    """
    try:
        launch()
    except BadInput as exc:
        print(f"ERROR: {exc}", file=sys.stderr, flush=True)
        return 2
    except errors as exc:
        print(f"\nERROR: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; every process started here was stopped", file=sys.stderr)
        return INTERRUPTED
    return 0
