"""`kvcomm plan --config FILE`: each replica's memory plan, before anything starts.

This module owns the command: it reads a Ray Serve config file (each application's ``args.cluster``) or a plain
cluster config (`cluster.config.ClusterConfig`'s fields), takes the config's model architecture (the checkpoint's
config.json, or `--architecture PRESET` when the checkpoint is not on this machine) and dtype, and prints what
`kvcomm.memory_plan.plan_memory` derives for one replica: weights, caches, scratch, KV tokens that fit, how many
jobs of a stated shape decode at once, anchor bytes per question. A config that cannot fit exits 2, naming the
knob to change. The arithmetic lives in `kvcomm.memory_plan`; nothing here imports Ray or a model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .config import ClusterConfig, describe_validation_error, read_yaml_mapping


def add_plan_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``kvcomm plan`` to an argparse subparsers object (``func``: `plan_main`)."""
    from kvcomm.memory_plan import JobShape
    shape = JobShape()
    parser = subparsers.add_parser(
        "plan", help="each replica's GPU memory plan for a config: weights, KV tokens, concurrent jobs",
        description="Print the memory plan of one replica of each cluster a config file describes (a Ray Serve "
                    "config or a cluster config); exit 2 naming the knob when it cannot fit.")
    parser.add_argument("--config", required=True, help="Ray Serve config file or cluster config (YAML)")
    parser.add_argument("--architecture", default=None,
                        help="a preset (e.g. llama-3.1-8b) to plan with when the model's checkpoint is not on this "
                             "machine")
    parser.add_argument("--agents", type=int, default=shape.agents, help="job shape: agents (fully connected)")
    parser.add_argument("--prefix", type=int, default=shape.prefix, help="job shape: system-prompt tokens per agent")
    parser.add_argument("--input", type=int, default=shape.input, help="job shape: user-input tokens")
    parser.add_argument("--output", type=int, default=shape.output, help="job shape: response tokens per agent")
    parser.add_argument("--json", default=None, help="also write the plans here")
    parser.set_defaults(func=plan_main)
    return parser


def cluster_configs(path: str | Path) -> list[tuple[str, ClusterConfig]]:
    """(name, ClusterConfig) of every application of a Serve config file, or of a plain cluster config file.
    Errors name the file and the field."""
    data = read_yaml_mapping(path, "config", "a mapping")
    if "applications" in data:
        apps = data["applications"] or []
        entries = [(str(app.get("name", f"applications[{i}]")),
                    ((app.get("args") or {}).get("cluster") or {}), f"applications[{i}].args.cluster")
                   for i, app in enumerate(apps) if isinstance(app, dict)]
    else:
        entries = [(Path(path).stem, data, "")]
    if not entries:
        raise ValueError(f"config {path} has no application to plan")
    out = []
    for name, fields, where in entries:
        try:
            out.append((name, ClusterConfig.model_validate(fields)))
        except ValidationError as exc:
            raise ValueError(f"config {path}: {where + ': ' if where else ''}{describe_validation_error(exc)}") from None
    return out


def plan_of(config: ClusterConfig, architecture: str | None = None) -> Any:
    """The `kvcomm.memory_plan.MemoryPlan` of one replica of `config` (`MemoryPlanError` when it cannot fit)."""
    from kvcomm.memory_plan import plan_memory
    from kvcomm.model_loading import ModelLoadError, model_spec_of, resolve_dtype
    from kvcomm.model_spec import PRESETS
    if architecture is not None:
        if architecture not in PRESETS:
            raise ValueError(f"unknown --architecture {architecture!r}; presets: {', '.join(PRESETS)}")
        spec, label = PRESETS[architecture], f"{config.model} as {architecture}"
    else:
        try:
            spec, label = model_spec_of(config.model, random_weights=config.random_weights), config.model
        except ModelLoadError as exc:
            raise ModelLoadError(f"{exc}; or pass --architecture PRESET") from None
    return plan_memory(spec, resolve_dtype(config.dtype, config.device), config.memory.to_memory(),
                       device_type=config.device, anchor_cache_bytes=config.budgets(
                           PRESETS[architecture] if architecture else None)["anchor_cache_on_device_bytes"],
                       content_cache_bytes=config.content_cache_bytes, max_batch_size=config.max_batch_size,
                       model=label)


def plan_main(args: argparse.Namespace) -> int:
    from kvcomm.memory_plan import JobShape, MemoryPlanError
    from kvcomm.model_loading import ModelLoadError
    shape = JobShape(agents=args.agents, prefix=args.prefix, input=args.input, output=args.output)
    reports = []
    try:
        configs = cluster_configs(args.config)
        for name, config in configs:
            plan = plan_of(config, args.architecture)
            jobs = plan.jobs(shape)
            print(f"## {name}: {config.num_workers} replica(s) of {plan.model} ({plan.dtype}) on {config.device}\n")
            print("\n".join(plan.lines(shape)))
            print(f"\nAll replicas ({config.num_workers}): {config.num_workers * plan.kv_tokens:,} KV tokens, "
                  f"{config.num_workers * jobs['jobs_decoding']} such jobs decoding at once.\n")
            reports.append({"application": name, "replicas": config.num_workers, "plan": plan.to_dict(),
                            "shape": vars(shape), "jobs": jobs})
    except (MemoryPlanError, ModelLoadError, ValueError, FileNotFoundError) as exc:
        print(f"kvcomm plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(reports, indent=2))
    return 0
