"""Building the Serve application, and `kvcomm serve`.

* `build_app(config, deployments=...)`: the ingress (`cluster.serve.ingress.KVCommIngress`) bound to the worker
  deployment (`cluster.serve.worker.AgentWorkerDeployment`, routed by `cluster.serve.router.KVCommRouter`). Worker
  replicas get one placement-group bundle each (``{"CPU": k}`` or ``{"GPU": 1, "CPU": k}``) with the configured
  strategy, and ``cluster.num_workers`` replicas unless the config file's ``deployments:`` say otherwise (for
  example Serve's standard ``autoscaling_config``: each request to a worker is one turn, so
  ``target_ongoing_requests`` is a target of turns in flight per replica). ``deployments:`` entries override the
  defaults set here field by field, exactly as Serve applies them under ``serve run`` / ``serve deploy``.
* `app_builder(args)`: the ``import_path`` target of a Serve config file (``cluster.serve.app:app_builder``).
* `run_server(config_file)`: the body of ``kvcomm serve``: start Ray (or join a cluster), Serve with the file's
  ``http_options``, ``proxy_location`` and ``tracing_config``, every application of the file with its
  ``deployments:``; serve until Ctrl-C or SIGTERM, then shut everything this call started down, leaving no process
  behind.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ray import serve

from ..runtime import RayRuntime, Terminated, signals_held, sigterm_as_interrupt
from .config import (INGRESS_DEPLOYMENT, WORKER_DEPLOYMENT, ServeAppConfig, ServeConfigFile, api_key_digests,
                     load_serve_config_file)
from .ingress import IngressSettings, KVCommIngress
from .worker import AgentWorkerDeployment

ROUTER_CLASS = "cluster.serve.router.KVCommRouter"


def deployment_defaults(config: ServeAppConfig) -> dict[str, dict[str, Any]]:
    """The Serve options this application's deployments get unless ``deployments:`` overrides them."""
    cluster, settings = config.cluster, config.serve
    return {
        WORKER_DEPLOYMENT: dict(
            num_replicas=cluster.num_workers,
            ray_actor_options={"num_cpus": cluster.cpus_per_worker, "num_gpus": cluster.gpus_per_worker},
            placement_group_bundles=[cluster.bundle()], placement_group_strategy=cluster.placement_strategy,
            max_ongoing_requests=max(cluster.max_queued_turns, 1),
            request_router_config={"request_router_class": ROUTER_CLASS,
                                   "request_router_kwargs": {"slack_tokens": settings.route_slack_tokens},
                                   "request_routing_stats_period_s": settings.routing_stats_period_s,
                                   "request_routing_stats_timeout_s": max(1.0, 2 * settings.routing_stats_period_s)},
            health_check_period_s=10.0, health_check_timeout_s=60.0, graceful_shutdown_timeout_s=30.0),
        INGRESS_DEPLOYMENT: dict(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000),
    }


def deployment_options(config: ServeAppConfig, deployments: dict[str, dict[str, Any]] | None = None
                       ) -> dict[str, dict[str, Any]]:
    """`deployment_defaults` with ``deployments:`` overrides applied (an ``autoscaling_config`` replaces the fixed
    ``num_replicas``, as in Serve)."""
    options = deployment_defaults(config)
    for name, override in (deployments or {}).items():
        merged = {**options[name], **override}
        if "autoscaling_config" in override and "num_replicas" not in override:
            merged.pop("num_replicas", None)
        options[name] = merged
    return options


def build_app(config: ServeAppConfig, *, deployments: dict[str, dict[str, Any]] | None = None,
              environ: dict[str, str] | None = None) -> Any:
    """The Serve `Application` (see the module docstring)."""
    options = deployment_options(config, deployments)
    workers = serve.deployment(name=WORKER_DEPLOYMENT, **options[WORKER_DEPLOYMENT])(AgentWorkerDeployment).bind(
        config.cluster.worker_settings(pool_detached=True), config.chat_cache_bytes)
    settings = IngressSettings.from_config(config, api_key_digests(config.serve, environ))
    ingress = serve.deployment(name=INGRESS_DEPLOYMENT, **options[INGRESS_DEPLOYMENT])(KVCommIngress)
    return ingress.bind(workers, settings)


def app_builder(args: dict[str, Any] | None = None) -> Any:
    """The ``import_path`` target of a Serve config file: ``args`` are a `ServeAppConfig` as a mapping (Serve
    applies the file's ``deployments:`` itself)."""
    return build_app(ServeAppConfig.from_args(args))


SAVE_BEFORE_KILL_TIMEOUT_S = 30.0   # how long a detached actor may take to save its snapshot before it is killed


def kill_service_actors(config: ServeAppConfig) -> None:
    """Remove the detached actors an application created (its anchor pool and job store), if they exist; each one
    with a snapshot path saves it first (`ray.kill` skips their `__ray_shutdown__`: up to a minute of committed
    anchors and the last seconds of job records would be lost)."""
    import ray
    actors = [(config.cluster.pool_actor_name, "save_snapshot", config.cluster.pool_snapshot_path),
              (config.serve.job_store_name, "flush", config.serve.job_store_snapshot_path)]
    for name, save, snapshot_path in actors:
        try:
            actor = ray.get_actor(name, namespace=config.cluster.ray_namespace)
        except ValueError:
            continue
        if snapshot_path:
            try:
                ray.get(getattr(actor, save).remote(), timeout=SAVE_BEFORE_KILL_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - best effort: the periodic saves stand
                print(f"[serve] {name}: last snapshot not saved ({type(exc).__name__}: {exc})", flush=True)
        ray.kill(actor)


# ------------------------------------------------------------------------------------------------------------
# `kvcomm serve`
# ------------------------------------------------------------------------------------------------------------
def run_server(config: str | Path | ServeConfigFile, *, host: str | None = None, port: int | None = None,
               address: str | None = None, num_cpus: int | None = None, ready: Any = None) -> int:
    """Start Ray (or join `address`), Serve on host:port, every application of the config file; serve until
    Ctrl-C (or until `ready(urls)` returns, for callers that drive the server themselves: its int is the exit
    status); then shut down the applications (all of Serve when this call started the Ray cluster, else only the
    file's applications: a joined cluster may serve others), their pool and job-store actors (saving their
    snapshots first) and a Ray cluster this call started.

    Ctrl-C is a normal way to stop (exit status 0 while serving; 130 when it interrupts the start or `ready`): it
    prints one line and shuts down, without a traceback; a second Ctrl-C during the shutdown skips waiting for
    Serve's graceful shutdown. SIGTERM does the same as Ctrl-C when this runs in the main thread."""
    import signal
    spec = config if isinstance(config, ServeConfigFile) else load_serve_config_file(config)
    host, port = host or spec.host, port or spec.port
    code = 0
    runtime = previous_sigterm = None
    try:
        runtime = RayRuntime(address, num_cpus=num_cpus)
        previous_sigterm = sigterm_as_interrupt()     # after ray.init, which installs its own handler
        start: dict[str, Any] = {"http_options": {"host": host, "port": port}}
        if spec.proxy_location is not None:
            start["proxy_location"] = spec.proxy_location
        if spec.raw.get("tracing_config") is not None:   # Serve's tracing hook (off unless the file enables it)
            start["tracing_config"] = spec.raw["tracing_config"]
        serve.start(**start)
        urls = []
        for app in spec.applications:
            options = deployment_options(app.config, app.deployments)[WORKER_DEPLOYMENT]
            replicas = options.get("num_replicas", "autoscaled")
            print(f"[serve] deploying {app.name!r} ({replicas} worker replica(s) of {app.config.cluster.model}) ...",
                  flush=True)
            serve.run(build_app(app.config, deployments=app.deployments), name=app.name,
                      route_prefix=app.route_prefix)
            urls.append(f"http://{host}:{port}{app.route_prefix.rstrip('/')}")
        for url in urls:
            print(f"[serve] ready at {url}  (POST /v1/jobs, /v1/chat/completions; GET /v1/models, /healthz, "
                  "/metrics)", flush=True)
        if ready is not None:
            outcome = ready(urls)
            code = outcome if isinstance(outcome, int) else 0
        else:
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt as stop:
                why = "SIGTERM: " if isinstance(stop, Terminated) else ""
                print(f"\n[serve] {why}shutting down ...", flush=True)
    except KeyboardInterrupt:
        print("\n[serve] interrupted: shutting down ...", flush=True)
        code = 130
    finally:
        try:
            _shut_down(spec, runtime)
        finally:
            if previous_sigterm is not None:
                signal.signal(signal.SIGTERM, previous_sigterm)
    return code


# Ray's own line when `serve.shutdown()` ends its controller while the driver still waits on it (harmless: the
# controller is meant to go); every other line passes.
_SHUTDOWN_NOISE = ("ServeController.graceful_shutdown failed",)


class _FilteredStream:
    """A text stream that drops whole lines containing one of `noise` and passes everything else on."""

    def __init__(self, stream: Any, noise: tuple[str, ...]):
        self._stream, self._noise, self._pending = stream, noise, ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if not any(n in line for n in self._noise):
                self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending and not any(n in self._pending for n in self._noise):
            self._stream.write(self._pending)
        self._pending = ""
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _shut_down(spec: ServeConfigFile, runtime: RayRuntime | None) -> None:
    """Serve, the applications' detached actors and (when `runtime` started it) the Ray cluster. A Ctrl-C (or
    SIGTERM) during Serve's graceful shutdown skips the rest of it; none is taken while the Ray cluster stops."""
    import ray
    streams = sys.stdout, sys.stderr                 # Ray prints its error messages to stdout
    sys.stdout, sys.stderr = (_FilteredStream(stream, _SHUTDOWN_NOISE) for stream in streams)
    try:
        try:
            if ray.is_initialized():
                if runtime is not None and runtime.owned:
                    serve.shutdown()
                else:          # a cluster we joined may serve other applications: remove only ours
                    for app in spec.applications:
                        serve.delete(app.name)
                for app in spec.applications:
                    kill_service_actors(app.config)
        except KeyboardInterrupt:
            owned = runtime is not None and runtime.owned
            print("[serve] interrupted again: not waiting for Serve's graceful shutdown"
                  + ("" if owned else " (`serve shutdown` stops what is left on the cluster)"), flush=True)
        if runtime is not None:
            with signals_held():
                runtime.close()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams
