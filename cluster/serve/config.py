"""The HTTP service's configuration: `ServeSettings`, `ServeAppConfig`, and reading a Ray Serve config file.

This module owns the service's knobs (pydantic, one default each), next to the cluster's own
`cluster.config.ClusterConfig` and the algorithm's `KVCommSettings`. Serve's own knobs keep their home in the Serve
config file: `load_serve_config_file` validates a whole file with Serve's `ServeDeploySchema` (``proxy_location``,
``http_options``, ``applications[]`` with ``import_path: cluster.serve.app:app_builder``, ``args: {cluster, serve}``
and ``deployments:`` overrides such as ``num_replicas``, ``autoscaling_config``, ``max_ongoing_requests`` or
``max_queued_requests`` for ``AgentWorkerDeployment`` and ``KVCommIngress``), and each application's ``args``
with `ServeAppConfig`. The same file works with ``kvcomm serve --config`` and with ``serve run`` / ``serve deploy``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from ..config import ClusterConfig, describe_validation_error, read_yaml_mapping

APP_IMPORT_PATH = "cluster.serve.app:app_builder"
API_KEY_ENV = "KVCOMM_API_KEY"
WORKER_DEPLOYMENT = "AgentWorkerDeployment"
INGRESS_DEPLOYMENT = "KVCommIngress"


class ServeSettings(BaseModel):
    """The HTTP service's knobs (the cluster's are `ClusterConfig`, the algorithm's `KVCommSettings`, Serve's own
    deployment options the config file's ``deployments:``)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    served_model_name: str | None = None     # the id in /v1/models and chat requests; None: the cluster's model
    api_keys: list[SecretStr] = Field(default_factory=list)   # plus KVCOMM_API_KEY; none: no auth
    max_body_bytes: int = Field(1 << 20, ge=1024)             # larger request bodies get 413
    default_max_tokens: int = Field(256, ge=1)                # chat completions without max_tokens
    chat_mode: str = "kvcomm"                                 # how a chat's prompt is served unless its body's
                                                              # kvcomm.mode says (a kvcomm.engine mode; dense:
                                                              # full prefill, no reuse)
    chat_cache_share: float = Field(0.5, ge=0.0, le=1.0)     # of each worker replica's content cache
                                                              # (cluster.content_cache_bytes): the share that keeps
                                                              # chat contents across requests (0: no chat reuse)
    max_jobs_kept: int = Field(1000, ge=1)                    # finished jobs whose results stay readable (the
                                                              # oldest finished are forgotten first)
    max_in_flight: int = Field(256, ge=1)                     # jobs + chats accepted and not finished, per
                                                              # ingress replica; beyond: 429
    max_in_flight_per_key: int | None = Field(None, ge=1)     # the same per API key (None: no per-key cap)
    retry_after_s: int = Field(1, ge=1)                       # the Retry-After header of those 429s
    max_prompt_chars: int = Field(131072, ge=1)               # a chat's messages / one agent's prompt text: 400
    max_output_tokens: int = Field(4096, ge=1)                # chat max_tokens, an agent's max_new_tokens: 400
    max_job_agents: int = Field(32, ge=1)                     # agents of one job: 400 above
    max_job_turns: int = Field(128, ge=1)                     # turns of one job (rounds x agents): 400 above
    # --- routing turns to worker replicas (cluster.serve.router) ---
    route_slack_tokens: int = Field(0, ge=0)                  # replicas within this many queued tokens of the
                                                              # least loaded compete on KV locality and the
                                                              # namespace's home (0: load first, locality breaks
                                                              # ties; a fetched anchor costs ~1% of a reused
                                                              # turn's TTFT, waiting for a busy replica more)
    routing_stats_period_s: float = Field(1.0, gt=0)          # how often replicas report their queued tokens
    # --- the job store (cluster.serve.job_store) ---
    job_store_name: str = "kvcomm-job-store"                  # the detached actor all ingress replicas share
    job_store_snapshot_path: str | None = None                # job records saved here (on a path every node
                                                              # sees) and reloaded when the store restarts
    job_store_snapshot_every_s: float = Field(2.0, gt=0)      # save at most this often after a change
    job_lease_s: float = Field(10.0, gt=0)                    # a job whose driving ingress replica stopped
                                                              # renewing for this long is taken over by another

    @field_validator("chat_mode")
    @classmethod
    def _known_mode(cls, mode: str) -> str:
        from kvcomm.names import MODES
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        return mode

    @model_validator(mode="after")
    def _default_within_limit(self) -> "ServeSettings":
        if self.default_max_tokens > self.max_output_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_output_tokens "
                             f"({self.max_output_tokens})")
        return self


class ServeAppConfig(BaseModel):
    """The ``args`` of one Serve application: ``cluster`` (ClusterConfig) and ``serve`` (ServeSettings)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    serve: ServeSettings = Field(default_factory=ServeSettings)

    @classmethod
    def from_args(cls, args: Any, source: str = "application args") -> "ServeAppConfig":
        """Validate ``args``; errors name the field (``cluster.num_workers: ...``)."""
        if isinstance(args, ServeAppConfig):
            return args
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise ValueError(f"{source}: expected a mapping with 'cluster' and 'serve', got {type(args).__name__}")
        try:
            return cls.model_validate(args)
        except ValidationError as exc:
            raise ValueError(f"{source}: {describe_validation_error(exc)}") from None

    @property
    def model_name(self) -> str:
        return self.serve.served_model_name or self.cluster.model

    @property
    def chat_cache_bytes(self) -> int:
        """Bytes of each worker replica's content cache that keep chat contents (``serve.chat_cache_share``)."""
        return int(self.serve.chat_cache_share * self.cluster.content_cache_bytes)


@dataclass(frozen=True)
class ServeApplication:
    """One application of a Serve config file that this package builds."""
    name: str
    route_prefix: str
    config: ServeAppConfig
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)   # deployment name -> Serve options


@dataclass(frozen=True)
class ServeConfigFile:
    host: str
    port: int
    proxy_location: str | None
    applications: list[ServeApplication]
    raw: dict[str, Any]


def load_serve_config_file(path: str | Path) -> ServeConfigFile:
    """Read a Serve config file, validate it with Serve's `ServeDeploySchema` and each of this package's
    applications' ``args`` with `ServeAppConfig`; ``deployments:`` entries must name this app's deployments.
    Errors name the file and the field."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema
    raw = read_yaml_mapping(path, "serve config", "a mapping (a Ray Serve config file)")
    try:
        schema = ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"serve config {path}: {describe_validation_error(exc)}") from None
    apps = []
    for index, app in enumerate(schema.applications):
        if app.import_path != APP_IMPORT_PATH:
            continue
        where = f"serve config {path}: applications[{index}]"
        config = ServeAppConfig.from_args(app.args, f"{where}.args")
        overrides = {}
        for number, deployment in enumerate(app.deployments):
            if deployment.name not in (WORKER_DEPLOYMENT, INGRESS_DEPLOYMENT):
                raise ValueError(f"{where}.deployments[{number}].name: unknown deployment {deployment.name!r}; "
                                 f"this application has {WORKER_DEPLOYMENT!r} and {INGRESS_DEPLOYMENT!r}")
            override = deployment.model_dump(exclude_unset=True, exclude={"name"})
            if isinstance(override.get("autoscaling_config"), dict):   # Serve checks it only when deploying
                try:
                    AutoscalingConfig.model_validate(override["autoscaling_config"])
                except ValidationError as exc:
                    raise ValueError(f"{where}.deployments[{number}].autoscaling_config: "
                                     f"{describe_validation_error(exc)}") from None
            overrides[deployment.name] = override
        apps.append(ServeApplication(app.name, app.route_prefix or "/", config, overrides))
    if not apps:
        raise ValueError(f"serve config {path}: no application with import_path {APP_IMPORT_PATH!r}")
    http = schema.http_options
    proxy = schema.proxy_location.value if "proxy_location" in raw else None
    return ServeConfigFile(host=http.host or "127.0.0.1", port=int(http.port or 8000), proxy_location=proxy,
                           applications=apps, raw=raw)


def api_key_digests(settings: ServeSettings, environ: dict[str, str] | None = None) -> tuple[bytes, ...]:
    """SHA-256 digests of the configured keys and those in KVCOMM_API_KEY (comma separated); the keys themselves
    go no further than this function."""
    environ = os.environ if environ is None else environ
    keys = [k.get_secret_value() for k in settings.api_keys]
    keys += [k.strip() for k in environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    return tuple(hashlib.sha256(k.encode()).digest() for k in dict.fromkeys(keys))
