"""`kvcomm serve`'s command line (argparse only: Ray and Serve load when the command runs)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local.yaml"


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``kvcomm serve`` to an argparse subparsers object (``func``: `serve_main`)."""
    parser = subparsers.add_parser(
        "serve", help="serve the HTTP API (jobs, OpenAI chat, metrics) with Ray Serve",
        description="Start a local Ray cluster (or join one with --address) and serve the applications of a Ray "
                    "Serve config file until Ctrl-C. API keys: serve.api_keys in the file or the KVCOMM_API_KEY "
                    "environment variable (comma separated).")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="Ray Serve config file (default: %(default)s)")
    parser.add_argument("--host", default=None, help="bind address (default: the file's http_options.host)")
    parser.add_argument("--port", type=int, default=None, help="port (default: the file's http_options.port)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (auto, ray://...); default: start a local one")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local cluster (default: all)")
    parser.set_defaults(func=serve_main)
    return parser


def serve_main(args: argparse.Namespace) -> int:
    from .app import run_server
    try:
        return run_server(args.config, host=args.host, port=args.port, address=args.address, num_cpus=args.num_cpus)
    except (ValueError, FileNotFoundError) as exc:   # a bad or missing config file: one line naming the field
        print(f"kvcomm serve: error: {exc}", file=sys.stderr)
        return 2


