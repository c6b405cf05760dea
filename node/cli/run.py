"""`gossiptrain run`: start one node (join a swarm with --initial-peer, or start a new one)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import typing

import uvloop

from node.config import FIELDS, ConfigError, NodeConfig, load_toml, merge_config

EXIT_CONFIG = 2  # bad configuration or manifest mismatch: retrying will not help


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per NodeConfig field; unset flags stay None so env/file/defaults show through."""
    hints = typing.get_type_hints(NodeConfig)
    for name in FIELDS:
        flag = "--" + name.replace("_", "-")
        kind = hints[name]
        if kind == list[str]:
            singular = {"initial_peers": "--initial-peer", "data": "--data", "announce": "--announce",
                        "trusted_peers": "--trusted-peer"}[name]
            parser.add_argument(singular, dest=name, action="append", default=None, metavar="VALUE",
                                help=f"{name} (repeatable)")
        else:
            parser.add_argument(flag, dest=name, type=kind, default=None, metavar=kind.__name__.upper(),
                                help=f"default: {FIELDS[name].default!r}")


def add_parser(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser("run", help="run one node", description=__doc__)
    parser.add_argument("--config", default=os.environ.get("GOSSIPTRAIN_CONFIG"), help="TOML config file")
    add_config_flags(parser)
    parser.set_defaults(handler=main, stop_while_starting=True)  # see node/cli/main.py


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    file_values = load_toml(args.config) if args.config else {}
    return merge_config({name: getattr(args, name) for name in FIELDS}, os.environ, file_values)


def load_config_or_exit(args: argparse.Namespace, prefix: str, suffix: str = "", code: int = EXIT_CONFIG) -> NodeConfig | int:
    """The verb's config from its flags, environment and file; on a ConfigError, print prefix + error + suffix
    to stderr and return ``code``, the verb's exit status."""
    try:
        return config_from_args(args)
    except ConfigError as error:
        print(f"{prefix}{error}{suffix}", file=sys.stderr)
        return code


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    for noisy in ("hivemind", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level.upper())))


async def run_node(cfg: NodeConfig) -> int:
    from node.daemon import Node, StartupError
    from node.join.procedure import JoinError
    from node.net.membership import ManifestMismatch

    # a stop signal while starting (waiting for a peers file, p2pd, the DHT, building the model) cancels
    # the start-up, which shuts down whatever it had started; once up, the node's own handlers take over
    loop = asyncio.get_running_loop()
    creating = asyncio.ensure_future(Node.create(cfg))
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:  # as when running: a second signal exits at once (a model build cannot be interrupted)
            print("gossiptrain: second signal while starting: exiting now", file=sys.stderr, flush=True)
            os._exit(1)
        creating.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        node = await creating
    except asyncio.CancelledError:
        print("gossiptrain: stopped while starting", file=sys.stderr)
        return 0
    except (ManifestMismatch, StartupError) as error:
        print(f"gossiptrain: error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except JoinError as error:
        print(f"gossiptrain: error: {error}", file=sys.stderr)
        return 1
    node.install_signal_handlers()
    try:
        await node.run()
    except JoinError as error:  # no donor delivered the swarm's state (the node has left cleanly)
        print(f"gossiptrain: error: {error}", file=sys.stderr)
        return 1
    return node.exit_code


def main(args: argparse.Namespace) -> int:
    cfg = load_config_or_exit(args, "gossiptrain: config error: ")
    if isinstance(cfg, int):
        return cfg
    setup_logging(cfg.log_level)
    # until run_node installs its handlers, node.cli.main's handler exits cleanly at once: nothing has
    # been started that would need stopping
    return uvloop.run(run_node(cfg))
