"""`misotts bench`: the benchmark (bench/run.py) as a subcommand of the misotts CLI."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    from .run import add_args, run

    p = subparsers.add_parser("bench", help="latency, throughput and memory next to transformers and the "
                                            "bandwidth floor (seeded random weights)")
    add_args(p)
    p.set_defaults(func=run)
