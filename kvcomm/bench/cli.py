"""The command-line boilerplate every `kvcomm bench` benchmark of this package shares.

`model_options` adds ``--model/--random-weights/--device/--dtype/--threads``, `apply_threads` honours
``--threads``, and `standalone_main` runs a benchmark's `add_arguments` / `cli_main` pair as
``python -m kvcomm.bench.<name>``. What each benchmark measures and its other options live in its own module.
"""
from __future__ import annotations

import argparse
from typing import Callable, Sequence

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
THREADS_HELP = "torch CPU threads (on a CPU shared with other jobs, 1 is often fastest)"


def model_options(parser: argparse.ArgumentParser, *, threads_help: str = THREADS_HELP) -> None:
    """The model, device and thread options (`cluster.cli` adds its own copies where it shares a parser)."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="embedded name, HF checkpoint dir, .gguf file, or preset (with --random-weights)")
    parser.add_argument("--random-weights", action="store_true", help="random weights for a preset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 on CPU, "
                                                     "bf16 on GPU)")
    parser.add_argument("--threads", type=int, default=None, help=threads_help)


def apply_threads(args: argparse.Namespace) -> None:
    """``--threads``, when given, as torch's CPU thread count."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def standalone_main(name: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                    cli_main: Callable[[argparse.Namespace], int], argv: Sequence[str] | None = None,
                    description: str | None = None) -> int:
    """``python -m kvcomm.bench.<name>``: the benchmark's own options parsed from `argv`, then its `cli_main`."""
    parser = argparse.ArgumentParser(prog=f"python -m kvcomm.bench.{name}", description=description)
    add_arguments(parser)
    return cli_main(parser.parse_args(list(argv) if argv is not None else None))
