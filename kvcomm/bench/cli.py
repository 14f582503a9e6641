"""What every `kvcomm bench` benchmark of this package shares on the command line: the model options (declared once
in `kvcomm.cli_args`, here with the benchmarks' thread advice) and `standalone_main`, which runs a benchmark's
`add_arguments` / `cli_main` pair as ``python -m kvcomm.bench.<name>``. What each benchmark measures and its other
options live in its own module.
"""
from __future__ import annotations

import argparse
from typing import Callable, Sequence

from ..cli_args import add_model_args, apply_threads

THREADS_HELP = "torch CPU threads (on a CPU shared with other jobs, 1 is often fastest)"


def model_options(parser: argparse.ArgumentParser, *, threads_help: str = THREADS_HELP) -> None:
    """``--model/--random-weights/--device/--dtype/--threads`` for a benchmark that runs the model in this process."""
    add_model_args(parser, threads_help=threads_help)


def standalone_main(name: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                    cli_main: Callable[[argparse.Namespace], int], argv: Sequence[str] | None = None,
                    description: str | None = None) -> int:
    """``python -m kvcomm.bench.<name>``: the benchmark's own options parsed from `argv`, then its `cli_main`."""
    parser = argparse.ArgumentParser(prog=f"python -m kvcomm.bench.{name}", description=description)
    add_arguments(parser)
    return cli_main(parser.parse_args(list(argv) if argv is not None else None))


__all__ = ["THREADS_HELP", "apply_threads", "model_options", "standalone_main"]
