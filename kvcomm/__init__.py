"""KVCOMM (arXiv 2510.12872) in one process: reuse one agent's KV cache in another agent's prompt, with
anchor-interpolated offsets, and a dense oracle to compare every reuse mode against.

The public surface is below (each name imported from its home on first use); the layout is in README.md and the
design in ARCHITECTURE.md. This package is not the cluster: it imports neither Ray nor pydantic (`actors` and
`cluster` build on it, never the other way round).
"""
from __future__ import annotations

from .lazy_exports import exporter

_HOMES = {
    # the shared names and knobs
    "MODES": "names", "POOL_MODES": "names", "EMBEDDED_MODEL": "names", "KVCommConfig": "config",
    # weights and the model
    "load_model": "model_loading", "LoadedModel": "model_formats", "ModelLoadError": "model_formats",
    "ModelRunner": "runner", "KVSegment": "kv",
    # one turn
    "KVCommEngine": "engine", "TurnRequest": "engine", "TurnResult": "engine", "SharedContent": "engine",
    "ContextLengthError": "engine", "build_engine": "engine", "AnchorPool": "anchor_pool",
    "AgentTemplate": "templates", "GenerationParams": "sampling", "Sampling": "sampling",
    # jobs and chats
    "run_job": "job_runner", "run_jobs": "job_runner", "JobResult": "job_runner", "TurnRecord": "job_runner",
    "ChatTurns": "chat", "ChatRequest": "chat",
}
__all__ = sorted(_HOMES)
__getattr__ = exporter(__name__, _HOMES, globals())
