"""The command-line options every model-loading command shares (``--model``, ``--random-weights``, ``--device``,
``--dtype``, ``--threads``), declared once; `apply_threads` acts on ``--threads``. Imports nothing heavy."""
from __future__ import annotations

import argparse

from .names import EMBEDDED_MODEL


def add_model_args(parser: argparse.ArgumentParser, *, local: bool = True,
                   threads_help: str = "torch CPU threads (default: all cores)") -> None:
    """Add ``--model`` and ``--random-weights``; with `local` (the model runs in this process) also ``--device``,
    ``--dtype`` and ``--threads``. Cluster commands pass ``local=False``: their workers choose devices."""
    parser.add_argument("--model", default=EMBEDDED_MODEL,
                        help="embedded name, HF checkpoint dir, .gguf file, or preset (with --random-weights)")
    parser.add_argument("--random-weights", action="store_true", help="random weights for a preset architecture")
    if local:
        parser.add_argument("--device", default="cpu")
        parser.add_argument("--dtype", default=None,
                            help="float32 / bfloat16 / float16 (default: fp32 on CPU, bf16 on GPU)")
        parser.add_argument("--threads", type=int, default=None, help=threads_help)


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU thread count from ``--threads`` (a no-op when it was not given)."""
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)


__all__ = ["add_model_args", "apply_threads"]
