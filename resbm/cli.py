"""`resbm`: the one console entry point. Thin: parse flags, load one typed config, run, exit.

Heavy imports (torch, grpc, hivemind) happen inside the handlers so `resbm --help` is instant.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Callable
from typing import NoReturn

Handler = Callable[[argparse.Namespace], int]


def _print_json_last(result: dict) -> None:
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


# ---- train ---------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    from node.config import TRAIN_FLAGS, TrainConfig
    from node.settings import add_flags

    p = sub.add_parser(
        "train",
        help="reference trainer: all stages in one process",
        description="Train a ResBM with every stage in this process (the reference run that a "
        "swarm must reproduce). Settings: flags > RESBM_* env > --config TOML > defaults.",
    )
    p.add_argument(
        "--config", metavar="PATH", help="TOML file with settings ([model], [optim], top-level)"
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_flags(p, TRAIN_FLAGS, TrainConfig)
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from node.config import TRAIN_FLAGS, TrainConfig
    from node.settings import from_args

    cfg = from_args(TrainConfig, args, TRAIN_FLAGS)
    from node.trainer import ReferenceTrainer

    result = ReferenceTrainer(cfg, progress=not args.no_progress).run()
    summary = (
        f"steps {result['steps']}  train loss {result['train_loss']:.4f}  "
        f"val loss {result['val_loss']:.4f}  {result['tokens_per_s']:.0f} tok/s  "
        f"boundary {result['d_model']}->{result['boundary_dim']} channels "
        f"({result['compression']}x channels, {result['wire_bytes_ratio']:.0f}x wire bytes)"
    )
    print(summary, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        _print_json_last(result)
    return 0


# ---- node ---------------------------------------------------------------------------------
def _add_node(sub: argparse._SubParsersAction) -> None:
    from node.node_config import NODE_FLAGS, NodeConfig
    from node.settings import add_flags

    p = sub.add_parser(
        "node",
        help="run one pipeline stage as a daemon",
        description="Run one ResBM stage as a daemon. Two ways to find its neighbours: a fixed "
        "pipeline (--stage K, and --next HOST:PORT of stage K+1 unless K is the last), or a "
        "swarm (--swarm ID with --initial-peers and/or --coordinator: stage, replicas and "
        "links come from the DHT; `resbm join` is the same with the settings taken from the "
        "swarm's manifest). Settings: flags > RESBM_* env > --config.",
    )
    p.add_argument("--config", metavar="PATH", help="TOML file with settings")
    add_flags(p, NODE_FLAGS, NodeConfig)
    p.set_defaults(handler=_run_node)


def _run_node(args: argparse.Namespace) -> int:
    from node.node_config import NODE_FLAGS, NodeConfig
    from node.process import run_node
    from node.settings import from_args

    cfg = from_args(NodeConfig, args, NODE_FLAGS)
    return run_node(cfg)


# ---- join ---------------------------------------------------------------------------------
def _add_join(sub: argparse._SubParsersAction) -> None:
    from node.joining import JOIN_FLAGS, JoinConfig
    from node.settings import add_flags

    p = sub.add_parser(
        "join",
        help="join a running swarm (its manifest gives model, data and schedule)",
        description="Join a running swarm in one command: find it through --coordinator or "
        "--swarm ID --initial-peers MULTIADDR..., take the model, data and schedule from its "
        "manifest, get a stage, download that stage's weights and train. Node id, checkpoints "
        "and log live under --state-dir, so a restart (e.g. by systemd) resumes as the same "
        "node. Settings: flags > RESBM_* env > --config TOML > defaults; the token only from "
        "RESBM_SECURITY__TOKEN, --token-file or the TOML file.",
    )
    p.add_argument("--config", metavar="PATH", help="TOML file with settings")
    add_flags(p, JOIN_FLAGS, JoinConfig)
    p.set_defaults(handler=_run_join)


def _run_join(args: argparse.Namespace) -> int:
    from node.joining import JOIN_FLAGS, JoinConfig
    from node.process import run_join
    from node.settings import from_args

    return run_join(from_args(JoinConfig, args, JOIN_FLAGS))


# ---- config show ----------------------------------------------------------------------------
def _add_config(sub: argparse._SubParsersAction) -> None:
    from resbm import config_show

    config_show.add_parser(sub)


# ---- coordinator / status ------------------------------------------------------------------
def _add_coordinator(sub: argparse._SubParsersAction) -> None:
    from coordinator.config import COORDINATOR_FLAGS, CoordinatorConfig
    from node.settings import add_flags

    p = sub.add_parser(
        "coordinator",
        help="run a swarm's coordinator (stage assignment, manifest, status)",
        description="Run the coordinator of a swarm: nodes Join through it to get their stage, "
        "the swarm's manifest and DHT peers. It keeps no state outside the DHT: restart it "
        "anywhere with --initial-peers of a live DHT peer. Its training settings make the "
        "swarm's manifest; it refuses to start if they differ from the one in the DHT. "
        "Settings: flags > RESBM_* env > --config TOML > defaults.",
    )
    p.add_argument(
        "--config", metavar="PATH", help="TOML file with settings ([model], [optim], top-level)"
    )
    add_flags(p, COORDINATOR_FLAGS, CoordinatorConfig)
    p.set_defaults(handler=_run_coordinator)


def _run_coordinator(args: argparse.Namespace) -> int:
    from coordinator.config import COORDINATOR_FLAGS, CoordinatorConfig
    from node.settings import from_args

    cfg = from_args(CoordinatorConfig, args, COORDINATOR_FLAGS)
    from coordinator.process import run_coordinator

    return run_coordinator(cfg)


def _add_status(sub: argparse._SubParsersAction) -> None:
    from node.joining import coordinator_arg  # the check `resbm join` makes

    p = sub.add_parser(
        "status",
        help="print a swarm's map from its coordinator",
        description="Ask a swarm's coordinator for its map: stages, nodes, steps and rates.",
    )
    p.add_argument(
        "--coordinator",
        required=True,
        metavar="HOST:PORT",
        type=coordinator_arg,
        help="the coordinator's address",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="seconds to wait (default 10)"
    )
    # a private swarm's coordinator: its token (or RESBM_SECURITY__TOKEN) and, with mutual TLS,
    # a certificate of the swarm's CA (`resbm certs --names admin`)
    p.add_argument(
        "--token-file",
        metavar="PATH",
        help="file holding the swarm access token (default: RESBM_SECURITY__TOKEN, else none)",
    )
    p.add_argument("--tls-cert", metavar="PATH", help="PEM certificate signed by the swarm's CA")
    p.add_argument("--tls-key", metavar="PATH", help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", metavar="PATH", help="PEM CA certificate of the swarm")
    p.set_defaults(handler=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from coordinator.client import CoordinatorError, format_status, status
    from node.ops_config import SecurityConfig

    token = None if args.token_file else os.environ.get("RESBM_SECURITY__TOKEN")
    security = SecurityConfig(
        token=token,
        token_file=args.token_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
    )
    try:
        st = asyncio.run(status(args.coordinator, args.timeout, security))
    except CoordinatorError as err:
        print(f"resbm status: {err}", file=sys.stderr)
        return 1
    from coordinator.history import report  # the page's /api/status object

    print(json.dumps(report(st)) if args.json else format_status(st))
    return 0


# ---- sample --------------------------------------------------------------------------------
def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="generate text from a checkpoint",
        description="Rebuild the whole model from a checkpoint (or `resbm export`) directory and "
        "continue a prompt with it.",
    )
    p.add_argument(
        "--checkpoint-dir",
        required=True,
        metavar="DIR",
        help="directory with every stage's checkpoint (a run's --checkpoint-dir, or an export)",
    )
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument(
        "--tokens", type=int, default=300, metavar="N", help="new tokens to generate (default 300)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        metavar="T",
        help="sampling temperature; 0 = greedy (default 0.8)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=40,
        metavar="K",
        help="sample among the K likeliest tokens; 0 = all (default 40)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default 0)")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when present), cpu, cuda[:N], mps (default auto)",
    )
    p.set_defaults(handler=_run_sample)


def _echo(piece: str) -> None:
    print(piece, end="", flush=True)


def _run_sample(args: argparse.Namespace) -> int:
    from node import device as devices
    from node.checkpoint import load_model, load_tokenizer
    from node.sample import generate

    model, step = load_model(args.checkpoint_dir)
    model.to(devices.resolve(args.device))
    tokenizer = load_tokenizer(args.checkpoint_dir, model.cfg.vocab_size)
    print(
        f"# {args.checkpoint_dir}: step {step}, compression {model.cfg.compression}, "
        f"tokenizer of {tokenizer.vocab_size} tokens",
        file=sys.stderr,
    )
    generate(  # streamed: each piece printed as it is sampled
        model, args.prompt, args.tokens, args.temperature, args.top_k, args.seed, tokenizer, _echo
    )
    print()
    return 0


# ---- bench ---------------------------------------------------------------------------------
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks that print a table and write results")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    from resbm.bench import (
        bandwidth,
        churn,
        codecs,
        convergence,
        device,
        flood,
        gap,
        latency,
        overhead,
        prediction,
        replicas,
    )

    benches = (convergence, gap, overhead, codecs, replicas, bandwidth, churn, device, flood)
    for bench in (*benches, latency, prediction):
        bench.add_parser(bsub)


# ---- main ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from node.version import VERSION

    parser = argparse.ArgumentParser(
        prog="resbm",
        description="Train Residual Bottleneck Models across volunteer machines.",
    )
    parser.add_argument("--version", action="version", version=f"resbm {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from resbm import certs, data_cmd, doctor, export, presets_cmd, selftest, simulate

    for add in (
        _add_train,
        _add_node,
        _add_join,
        simulate.add_parser,
        _add_coordinator,
        _add_status,
        _add_sample,
        export.add_parser,
        data_cmd.add_parser,
        presets_cmd.add_parser,
        _add_bench,
        _add_config,
        certs.add_parser,
        doctor.add_parser,
        selftest.add_parser,
    ):
        add(sub)
    return parser


def chosen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser that `args` went through last, e.g. `resbm bench gap`'s."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if not subs or name not in subs[0].choices:
            return parser
        parser = subs[0].choices[name]


def unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> NoReturn:
    """Refuse arguments a command does not take with that command's usage (argparse prints the
    top-level one, which says nothing of `train`'s flags) and, for a mistyped option, the
    nearest one it does take. Exits 2, as argparse does."""
    options = [o for a in parser._actions for o in a.option_strings]
    names = [o[2:] for o in options if o.startswith("--") and o != "--help"]
    hints = []
    for arg in extras:
        option = arg.split("=", 1)[0]  # compared without dashes: `--lr` is not near `--help`
        near = difflib.get_close_matches(option.lstrip("-"), names, n=1) if arg[:1] == "-" else []
        if near:
            hints.append(f"\n  {option}: did you mean --{near[0]}?")
    parser.error("unrecognized arguments: " + " ".join(extras) + "".join(hints))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        unrecognized(chosen(parser, args), extras)
    from node.settings import ConfigError

    try:
        return args.handler(args)
    except ConfigError as err:
        print(f"resbm {args.command}: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"resbm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"resbm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
