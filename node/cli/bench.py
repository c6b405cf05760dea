"""`gossiptrain bench exchange|state-sync|verify|wan|fuzz|wire|partition|devices|joins`: benchmarks that print figures.

- exchange: pair-exchange throughput; state-sync: how long a joiner takes to download the state;
- verify: whether replay verification tells honest peers from cheaters, and what it costs;
- wan: a real swarm over an emulated WAN (root; its own flags: python -m node.bench.wan --help);
- fuzz: random and mutated frames and DHT records against a live node (node/bench/fuzz.py);
- wire: the loss and bytes of each wire dtype, side by side (node/bench/wire.py);
- partition: how soon a swarm cut apart by an emulated outage is one view again (root; node/bench/partition.py);
- devices: one node on N CPU processes (`--devices cpu:N`) against one process on the same cores (node/bench/devices.py);
- joins: the join vetting replayed on run histories, how often it would refuse an honest donor (node/bench/joins.py).
"""

from __future__ import annotations

import argparse
import sys

EXCHANGE_NUMEL = 25_000_000


def add_parser(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser("bench", help="benchmarks that print figures")
    parser.add_argument("what", choices=["exchange", "state-sync", "verify", "wan", "fuzz", "wire", "partition",
                                         "devices", "joins"],
                        help="wan, wire, partition, devices and joins take their own flags: python -m node.bench.wan "
                             "--help (and node.bench.wire, node.bench.partition, node.bench.devices, node.bench.joins)")
    parser.add_argument(
        "--numel", type=int, nargs="+", default=None, metavar="N",
        help="exchange: fp32 parameters per side, one value (default 25M); state-sync: state sizes in parameters, "
             "one or more (default: the default model's parameter count and 100M); verify: vector sizes for the "
             "LSH signature and start digest timings (default 1M 10M 100M; with --tiny 1M)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=None, metavar="N",
                        help="verify: start states (trials) to test (default 12)")
    parser.add_argument("--tiny", action="store_true",
                        help="verify: a small model and an 8-step round, for a smoke run")
    parser.add_argument("--model", default=None, metavar="MODEL",
                        help="verify: calibrate the tolerances for this model (a preset such as llama-25m, or a "
                             "transformers config.json; default: the builtin GPT)")
    parser.add_argument("--count", type=int, default=None, metavar="N",
                        help="fuzz: cases per stream handler and per DHT record kind (default 10000)")
    parser.add_argument("--seed", type=int, default=None, help="fuzz: the seed every case is drawn from (default 13)")
    parser.add_argument("--targets", default=None, metavar="A,B",
                        help="fuzz: handlers and record kinds to fuzz (default all: exchange,state,audit,presence,"
                             "ready,commitment,receipts,vote)")
    parser.add_argument("--verbose", action="store_true", help="fuzz: one line per case")
    parser.set_defaults(handler=main, passthrough=True)  # wan: its own flags (node/bench/wan.py)


def main(args: argparse.Namespace) -> int:
    if args.what == "devices":
        from node.bench import devices

        if args.numel is not None or args.trials is not None or args.count is not None:
            print("bench devices: --numel, --trials and --count are not devices flags "
                  "(python -m node.bench.devices --help)", file=sys.stderr)
            return 2
        return devices.main(list(args.node_args) + ["--repeats", str(args.repeats)] + (["--tiny"] if args.tiny else []))
    if args.what == "joins":
        from node.bench import joins

        return joins.main(list(args.node_args))
    if args.what == "partition":
        from node.bench import partition

        if (args.numel is not None or args.trials is not None or args.tiny or args.repeats != 3 or args.count is not None
                or args.model is not None):
            print("bench partition: --numel, --repeats, --trials, --tiny and --count are not partition flags "
                  "(python -m node.bench.partition --help)", file=sys.stderr)
            return 2
        return partition.main(list(args.node_args))
    if args.what == "wire":
        from node.bench import wire

        if args.numel is not None or args.trials is not None or args.repeats != 3 or args.count is not None:
            print("bench wire: --numel, --repeats, --trials and --count are not wire flags "
                  "(python -m node.bench.wire --help)", file=sys.stderr)
            return 2
        return wire.main(list(args.node_args) + (["--tiny"] if args.tiny else []))
    if args.what == "wan":
        from node.bench import wan

        if args.numel is not None or args.trials is not None or args.tiny or args.repeats != 3 or args.model is not None:
            print("bench wan: --numel, --repeats, --trials and --tiny are not wan flags "
                  "(python -m node.bench.wan --help)", file=sys.stderr)
            return 2
        return wan.main(list(args.node_args))
    if args.node_args:
        print(f"bench {args.what}: unrecognized arguments: {' '.join(args.node_args)}", file=sys.stderr)
        return 2
    fuzz_flags = args.count is not None or args.seed is not None or args.targets is not None or args.verbose
    if args.what == "fuzz":
        from node.bench import fuzz

        if args.numel is not None or args.trials is not None or args.tiny or args.repeats != 3 or args.model is not None:
            print("bench fuzz: --numel, --repeats, --trials and --tiny are not fuzz flags", file=sys.stderr)
            return 2
        count = fuzz.DEFAULT_COUNT if args.count is None else args.count
        if count < 1:
            print("bench fuzz: --count must be >= 1", file=sys.stderr)
            return 2
        try:
            targets = fuzz.parse_targets(args.targets)
        except argparse.ArgumentTypeError as error:
            print(f"bench fuzz: {error}", file=sys.stderr)
            return 2
        return fuzz.run_benchmark(count, fuzz.DEFAULT_SEED if args.seed is None else args.seed, targets,
                                  verbose=args.verbose)
    if fuzz_flags:
        print(f"bench {args.what}: --count, --seed, --targets and --verbose are for bench fuzz", file=sys.stderr)
        return 2
    if args.what != "verify" and (args.trials is not None or args.tiny or args.model is not None):
        print(f"bench {args.what}: --trials, --tiny and --model are for bench verify", file=sys.stderr)
        return 2
    if args.what == "verify":
        from node.bench import verify as bench_verify

        trials = bench_verify.DEFAULT_TRIALS if args.trials is None else args.trials
        return bench_verify.run_benchmark(trials, args.tiny, args.numel, args.repeats, args.model or "builtin")
    if args.what == "state-sync":
        from node.bench import state as bench_state

        return bench_state.run_benchmark(args.numel or bench_state.default_sizes(), args.repeats)
    from node.bench.exchange import run_benchmark

    if args.numel is not None and len(args.numel) != 1:
        print("bench exchange: --numel takes one value", file=sys.stderr)
        return 2
    return run_benchmark(args.numel[0] if args.numel else EXCHANGE_NUMEL, args.repeats)
