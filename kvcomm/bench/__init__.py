"""Benchmarks that compare modes side by side in one run: runner, fidelity (+ anchor sweep), TTFT, quality."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable


def write_json_report(path: str | None, report: dict[str, Any]) -> None:
    """Write a benchmark report as JSON (parent folders created) and say where on stderr; no-op without a path."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {path}", file=sys.stderr)


def publish(report: dict[str, Any], table: str, json_path: str | None, plot_path: str | None,
            draw: Callable[[str], None]) -> None:
    """What a benchmark's command line ends with: the table on stdout, the JSON report, and the plot (`draw(path)`)
    when a path is given."""
    print(table)
    write_json_report(json_path, report)
    if plot_path:
        draw(plot_path)
        print(f"wrote {plot_path}", file=sys.stderr)
